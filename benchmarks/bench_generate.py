"""Generation against mamba_ssm on the ROCm blog's experiment, both sides in the same call.

mamba-2.8b with random weights in bfloat16, prompt 1024, 1024 new tokens, batch 1, 2, 4, ...,
128: total time (prompts on the host to tokens on the host), decode ms per step, peak device
memory, and the first call's compile time apart. Two sampling settings, the same on both sides:

    blog   temperature 0.7, top-p 0.9, repetition penalty 1.2 (the ROCm blog's)
    fast   temperature 0.7, top-p 0.9 (mamba_ssm's fastest path: no repetition penalty)

    PYTHONPATH=. python3 benchmarks/bench_generate.py --anchor .anchor --out DIR   # GPU, ~9 min
    PYTHONPATH=. python3 benchmarks/bench_generate.py --profile --out DIR          # GPU, ~4 min
    PYTHONPATH=. python3 benchmarks/bench_generate.py --smoke --out DIR            # CPU check

--anchor DIR: the folder holding mamba_ssm's driver gen_torch.py and mamba_site.tar.xz (not in
the repository; ../shared/anchor/README.md says how to carry it). The site is unpacked into
--anchor-pythonpath (default /tmp/site) unless it is there already, and gen_torch.py runs as
`python3 gen_torch.py OUT.json 1,2,...,128 --preset 2.8b [sampling flags]` with only that
PYTHONPATH. Its rows (total_s, peak_gib) go into our JSON beside ours, with the ratios.

Writes DIR/generate_<slug>.json (default benchmarks/results/) and generate_<slug>.png (total
time of both sides, ours / mamba_ssm, our decode ms per step, peak memory); --profile writes
generate_<slug>_profile.json and .txt (the kernel tables); --smoke adds the variant _smoke.

Method. Our side runs in one subprocess per setting (a fresh process, so the device's
peak_bytes_in_use, a high-water mark, belongs to that setting; batch sizes run in increasing
order, and every buffer grows with the batch, so the peak read after a batch size is its
own). Random weights are made on the device layer by layer in the inference layout (see
`build_model`). First a compile phase, in a process of its own, compiles every function of
every batch size in parallel threads (XLA compiles release the GIL: a call spends about one
compile's time, not eight) into a persistent cache, and records each one's compile seconds
(`compile` in the JSON); the measured processes load the executables from that cache, so no
compile and no XLA autotuning (whose scratch buffers would count in the peak) happens in them.
Each batch size runs once untimed (first_call_s; compile_s is its tracing and cache loading),
then --repeats timed runs; medians are reported. Then gen_torch.py runs the same batches (its
warm-up call captures the CUDA graphs). --time-budget
bounds the whole call: each phase gets what the later ones leave, and a batch size that does
not fit is skipped (recorded as skipped).

--profile: per batch size in --profile-batches (1, 128) and decode implementation (xla,
pallas), times 32 decode steps, traces 5 with jax.profiler and prints the per-kernel table
(top kernels, kernels per step, busy vs wall, time by category: GEMMs, the decode kernels,
sampling's sort/scan, copies, other fusions), plus a check that the Pallas layer step matches
the XLA one on the device. It samples with the first of --settings (blog: the repetition
penalty on; --settings fast for the other).

--preset mamba2-2.7b (mamba2-tiny for a smoke) runs Mamba2LM the same way, --profile included
(its Pallas decode step: the state-update kernel and the residual add + norm;
gen_torch.py drives mamba_ssm's Mamba2 for --anchor).

--state-dtype: the storage dtype of our decode SSM state between steps (generation's
state_dtype; the update stays float32). auto (the default) is generation's default, the
model's compute dtype as mamba_ssm keeps its state: bfloat16 for the default --dtype, half the
bytes of a float32 state's update, which dominates a step at large batch. A dtype other than
auto's gets a variant in the result files' names, f32state or bf16state
(generate_<slug>_f32state.json, ..._profile_f32state), so they sit beside the default ones;
the JSON records the dtype that ran (state_dtype) and the flag (state_dtype_arg).

--fuse-in-proj-rows N: pallas_kernels.decode.config.FUSE_IN_PROJ_ROWS for the run (Mamba1's
Pallas decode step fuses in_proj into the conv kernel up to that batch; the library's default
is 32; 0 turns it off), MAMBA2_FUSE_IN_PROJ_ROWS for a Mamba2 preset (32); the result files
get the variant fuseN.

--defer-norm: MAMBA2_DEFER_NORM on for the run (Mamba2's gated norm scale applied in the next
residual add; off by default: it did not pay on one H100); the result files get the variant
defernorm.

--add-norm-in-proj-rows N: ADD_NORM_IN_PROJ_ROWS for the run (the fused in_proj kernel, either
family's, also does the block's residual add and RMSNorm up to that batch; 0, off, by default
until timed); the result files get the variant addnormN.

--state-sums-parts-rows N: STATE_SUMS_PARTS_ROWS for the run (Mamba1's state kernel, one row a
program, sums x_proj's partials itself instead of an XLA reduction; 0, off, by default until
timed); the result files get the variant sumpartsN.

--bisect-rows N: jax_packmamba.sampling.BISECT_ROWS for the run (top-k / top-p find their cut
by a search of the keys instead of a sort of the vocabulary from that batch; 0, never, by
default until timed); the result files get the variant bisectN. --bisect-impl xla|pallas:
sampling.BISECT_IMPL for the run (the search as XLA's reductions or one Pallas kernel a search;
pallas gets the variant bisectkernel).

--prefilter K: our sampler's top-p prefilter (jax_packmamba.sampling: the cut from the K
largest logits, the full sort only when a row's nucleus is larger; the same tokens). Off by
default. Random weights give flat logits whose 0.9-nucleus is most of the vocabulary, so with
them it falls back to the sort every step: it can only add time here, which is what it costs
when it does not help.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import harness

SETTINGS = {
    "blog": dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2),
    "fast": dict(temperature=0.7, top_p=0.9),
}
# mamba_ssm's generate(cg=True) totals on an H200 (2026-12-01, no penalty): only to plan the
# time budget (which batches fit), never reported.
ANCHOR_ESTIMATE_S = {1: 3.6, 2: 3.6, 4: 3.7, 8: 3.9, 16: 4.2, 32: 4.8, 64: 6.2, 128: 8.5}
# Issue 26's targets: total time at most 0.7x mamba_ssm's; the batch-1 decode step at most 1.3x
# the time to read the weights once at the device's memory bandwidth (TB/s, its datasheet).
TARGET_RATIO = 0.7
TARGET_STEP_FACTOR = 1.3
HBM_TB_S = {"H100": 3.35, "H200": 4.8}


def step_target_ms(config, dtype: str, device_kind: str) -> float | None:
    """TARGET_STEP_FACTOR x the weight-read bound of a decode step (None on other devices)."""
    tb_s = next((v for k, v in HBM_TB_S.items() if k in device_kind), None)
    if tb_s is None:
        return None
    weight_bytes = config.num_params() * {"float32": 4}.get(dtype, 2)
    return TARGET_STEP_FACTOR * weight_bytes / (tb_s * 1e12) * 1e3


MAMBA2_PRESETS = ("mamba2-2.7b", "mamba2-tiny")
DEFAULT_BATCHES = "1,2,4,8,16,32,64,128"


def parse_args(argv=None):
    p = harness.argument_parser(__doc__)
    harness.add_anchor_args(p)
    p.add_argument(
        "--preset",
        default=None,
        help="2.8b (default; smoke: tiny), another Mamba1 preset, or mamba2-2.7b "
        "(smoke: mamba2-tiny)",
    )
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--scan-impl", default="auto", help="selective scan of the prefill")
    p.add_argument(
        "--decode-impl",
        default="auto",
        help="decode step: auto (the Pallas kernels on a GPU), pallas or xla",
    )
    p.add_argument(
        "--state-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="storage dtype of our decode SSM state (generation's state_dtype; auto: the "
        "compute dtype, as mamba_ssm)",
    )
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024 (smoke 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 1024 (smoke 8)")
    p.add_argument("--batches", default=None, help=f"default {DEFAULT_BATCHES} (smoke 1,2)")
    p.add_argument("--settings", default="blog,fast", help="sampling settings, in this order")
    p.add_argument(
        "--prefilter",
        type=int,
        default=0,
        help="our sampler's top-p prefilter K (0: off, the full sort every step)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch after the first")
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole call")
    p.add_argument(
        "--no-precompile",
        action="store_true",
        help="compile each batch size at its first call instead of all in parallel",
    )
    p.add_argument(
        "--compile-cache",
        default=None,
        help="persistent compilation cache folder (default: a fresh temporary one)",
    )
    p.add_argument(
        "--fuse-in-proj-rows",
        type=int,
        default=None,
        help="pallas_kernels.decode.config.FUSE_IN_PROJ_ROWS for this run (Mamba1's Pallas "
        "decode step: in_proj fused into the conv kernel up to this batch; default: the "
        "library's); a value gets the variant fuseN in the result files' names",
    )
    p.add_argument(
        "--defer-norm",
        action="store_true",
        help="pallas_kernels.decode.config.MAMBA2_DEFER_NORM on for this run (Mamba2's gated "
        "norm scale applied in the next residual add); the result files get the variant "
        "defernorm",
    )
    p.add_argument(
        "--add-norm-in-proj-rows",
        type=int,
        default=None,
        help="pallas_kernels.decode.config.ADD_NORM_IN_PROJ_ROWS for this run (the fused in_proj "
        "kernel also does the block's residual add and norm up to this batch); a value gets "
        "the variant addnormN",
    )
    p.add_argument(
        "--state-sums-parts-rows",
        type=int,
        default=None,
        help="pallas_kernels.decode.config.STATE_SUMS_PARTS_ROWS for this run (Mamba1's state "
        "kernel sums x_proj's partials itself up to this batch); a value gets the variant "
        "sumpartsN",
    )
    p.add_argument(
        "--bisect-rows",
        type=int,
        default=None,
        help="jax_packmamba.sampling.BISECT_ROWS for this run (the sampler's top-k / top-p cut "
        "by a search, no sort, from this batch); a value gets the variant bisectN",
    )
    p.add_argument(
        "--bisect-impl",
        choices=("xla", "pallas"),
        default=None,
        help="jax_packmamba.sampling.BISECT_IMPL for this run (the search as XLA's reductions "
        "or one Pallas kernel a search); pallas gets the variant bisectkernel",
    )
    p.add_argument("--profile", action="store_true", help="profile decode steps instead")
    p.add_argument("--profile-batches", default="1,128")
    p.add_argument("--profile-impls", default="xla,pallas")
    p.add_argument("--profile-steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--trace-steps", type=int, default=5, help="traced decode steps")
    # Internal: one setting of our side, run as a subprocess by the parent.
    p.add_argument("--worker", default=None, help=argparse_hidden())
    p.add_argument("--worker-json", type=pathlib.Path, default=None, help=argparse_hidden())
    p.add_argument("--worker-budget", type=float, default=None, help=argparse_hidden())
    p.add_argument("--worker-precompile", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)
    for name, full, small in (
        ("preset", "2.8b", "tiny"),
        ("prompt_len", 1024, 16),
        ("new_tokens", 1024, 8),
        ("batches", DEFAULT_BATCHES, "1,2"),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if args.smoke else full)
    if args.repeats < 0:
        p.error(f"--repeats must be at least 0, got {args.repeats}")
    args.batch_list = sorted({int(b) for b in args.batches.split(",")})
    args.setting_list = args.settings.split(",")
    unknown = [s for s in args.setting_list if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; choose from {sorted(SETTINGS)}")
    if args.preset.startswith("mamba2-") and args.preset not in MAMBA2_PRESETS:
        p.error(f"--preset {args.preset}: the Mamba2 presets here are {list(MAMBA2_PRESETS)}")
    if args.prefilter < 0:
        p.error(f"--prefilter must be at least 0, got {args.prefilter}")
    try:
        args.state_dtype_ran = resolved_state_dtype(args)
    except ValueError as e:  # an unknown preset, or a state dtype the model refuses
        p.error(str(e))
    return args


def state_dtype_arg(args):
    """--state-dtype as generation's state_dtype: None for auto (the compute dtype)."""
    return None if args.state_dtype == "auto" else args.state_dtype


def resolved_state_dtype(args) -> str:
    """The name of the dtype our decode SSM state is stored in: generation.resolve_state_dtype
    for the preset and --dtype (imports jax, but starts no device backend)."""
    import jax.numpy as jnp

    from jax_packmamba.config import preset_config
    from jax_packmamba.generation import resolve_state_dtype

    config = preset_config(args.preset, dtype=args.dtype)
    return jnp.dtype(resolve_state_dtype(state_dtype_arg(args), config)).name


def state_variant(args) -> str | None:
    """The result files' variant: None when the state is stored in auto's dtype (the compute
    dtype), else f32state or bf16state, the dtype that ran."""
    if args.state_dtype_ran == resolved_state_dtype(argparse_namespace(args, state_dtype="auto")):
        return None
    return {"float32": "f32state", "bfloat16": "bf16state"}[args.state_dtype_ran]


def set_decode_rules(args) -> None:
    """--fuse-in-proj-rows, --defer-norm, --add-norm-in-proj-rows, --state-sums-parts-rows,
    --bisect-rows and --bisect-impl, where given, into the decode step's rules (read when a
    step is traced): FUSE_IN_PROJ_ROWS for a Mamba1 preset, MAMBA2_FUSE_IN_PROJ_ROWS for a
    Mamba2 one; MAMBA2_DEFER_NORM; ADD_NORM_IN_PROJ_ROWS; STATE_SUMS_PARTS_ROWS; the sampler's
    BISECT_ROWS and BISECT_IMPL."""
    import jax_packmamba.sampling as sampling
    import pallas_kernels.decode.config as decode_config

    if args.fuse_in_proj_rows is not None:
        name = "MAMBA2_FUSE_IN_PROJ_ROWS" if args.preset in MAMBA2_PRESETS else "FUSE_IN_PROJ_ROWS"
        setattr(decode_config, name, args.fuse_in_proj_rows)
    if args.defer_norm:
        decode_config.MAMBA2_DEFER_NORM = True
    if args.add_norm_in_proj_rows is not None:
        decode_config.ADD_NORM_IN_PROJ_ROWS = args.add_norm_in_proj_rows
    if args.state_sums_parts_rows is not None:
        decode_config.STATE_SUMS_PARTS_ROWS = args.state_sums_parts_rows
    if args.bisect_rows is not None:
        sampling.BISECT_ROWS = args.bisect_rows
    if args.bisect_impl is not None:
        sampling.BISECT_IMPL = args.bisect_impl


def decode_variant(args) -> str | None:
    """The result files' variant for --fuse-in-proj-rows, --defer-norm,
    --add-norm-in-proj-rows, --state-sums-parts-rows, --bisect-rows and --bisect-impl pallas:
    None without any."""
    fuse = None if args.fuse_in_proj_rows is None else f"fuse{args.fuse_in_proj_rows}"
    rows = args.add_norm_in_proj_rows
    add_norm = None if rows is None else f"addnorm{rows}"
    sums = args.state_sums_parts_rows
    sums = None if sums is None else f"sumparts{sums}"
    bisect = None if args.bisect_rows is None else f"bisect{args.bisect_rows}"
    kernel = "bisectkernel" if args.bisect_impl == "pallas" else None
    parts = (fuse, "defernorm" if args.defer_norm else None, add_norm, sums, bisect, kernel)
    return "_".join(v for v in parts if v) or None


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


# ------------------------------------------------------------------------------------------------
# Our side (imports jax; the parent process never starts a device backend).


def jax_modules():
    import jax

    from jax_packmamba import generation

    return jax, generation


def build_model(config, device):
    """Random weights made on the device directly in the inference layout: each layer is
    initialised (float32, as MambaLM does) and cast in its own jitted call, so the float32 model
    never exists whole in device memory."""
    import jax
    from flax import nnx

    from jax_packmamba import LM, Block
    from jax_packmamba import generation as gen

    dtype = config.compute_dtype
    with jax.default_device(device):
        # Embedding, final norm and head: from a one-layer model, whose layer is dropped.
        shell = jax.jit(
            lambda: gen.prepare(LM(dataclasses.replace(config, n_layer=1), rngs=nnx.Rngs(0)))
        )()
        init_layer = jax.jit(
            lambda key: gen.inference_state(
                nnx.split(Block(config, rngs=nnx.Rngs(key)))[1], "layers", dtype
            )
        )
        key = jax.random.key(1)
        layers = tuple(init_layer(jax.random.fold_in(key, i)) for i in range(config.n_layer))
    block_graph = nnx.split(nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0))))[0]
    params = {**shell.params, "layers": layers}
    return gen.PreparedModel(config=config, graphs=(block_graph, *shell.graphs[1:]), params=params)


def model_config(args, device):
    import importlib

    from jax_packmamba.config import preset_config

    scan_impl = args.scan_impl
    if scan_impl == "auto" and device.platform == "gpu":
        kernels = (
            "pallas_kernels.ssd"
            if args.preset in MAMBA2_PRESETS
            else "pallas_kernels.selective_scan"
        )
        try:
            importlib.import_module(kernels)
        except ImportError as e:
            print(
                f"Pallas scan unavailable ({e}); prefill uses the reference scan", file=sys.stderr
            )
            scan_impl = "reference"
    return preset_config(args.preset, dtype=args.dtype, scan_impl=scan_impl)


def use_compile_cache(path):
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def prompts_for(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed + batch)
    return [rng.integers(0, vocab, length).astype(np.int32) for _ in range(batch)]


def precompile(prepared, batches, args, sampling, impls) -> dict:
    """Compiles every function a generation runs, for every batch size and decode impl, in
    parallel threads (XLA compiles release the GIL), lowering from shapes (no device memory for
    inputs). Executables go to the persistent cache (and stay in this process's), so later
    calls load them instead of compiling. Returns {wall_s, jobs: [[name, batch, seconds]]} or
    {error} (the runs then compile as usual)."""
    jax, gen = jax_modules()
    import jax.numpy as jnp

    config = prepared.config
    sds = jax.ShapeDtypeStruct
    start = time.perf_counter()
    i32 = lambda shape: sds(shape, jnp.int32)  # noqa: E731

    def lowerings(batch, impl):
        inputs = gen.prefill_inputs(prompts_for(batch, args.prompt_len, config.vocab_size), config)
        size, (rows, length) = len(inputs.rows), inputs.tokens.shape
        vocab = config.padded_vocab_size
        residual = sds((rows, length, config.d_model), jnp.float32)
        layer = (
            prepared.graphs[0],
            prepared.params["layers"][0],
            residual,
            i32((rows, length)),
            i32((size,)),
            i32((size,)),
        )
        store = jnp.dtype(gen.resolve_state_dtype(state_dtype_arg(args), config)).name
        yield (
            "prefill_layer",
            gen._prefill_layer.lower(*layer, num_segments=inputs.num_segments, store=store),
        )
        yield "embed", gen._embed.lower(gen._table(prepared), i32((rows, length)))
        yield (
            "prefill_head",
            gen._prefill_head.lower(
                gen._head_params(prepared),
                prepared.graphs,
                config,
                residual,
                i32((size,)),
                i32((size,)),
            ),
        )
        yield (
            "seen",
            gen._seen.lower(i32((rows, length)), i32((rows, length)), size=size, vocab=vocab),
        )
        _, conv, ssm = jax.eval_shape(
            lambda *a: gen._prefill_layer(*a, num_segments=inputs.num_segments, store=store),
            *layer,
        )
        state = gen.DecodeState(conv=(conv,) * config.n_layer, ssm=(ssm,) * config.n_layer)
        start_args = (
            sds((size, vocab), jnp.float32),
            state,
            sds((size, vocab), jnp.bool_),
            jax.random.key(0),
            sampling.params(),
            jnp.int32(batch),
        )
        start_kw = dict(
            mode=sampling.mode,
            vocab_size=config.vocab_size,
            columns=gen.new_token_bucket(args.new_tokens),
        )
        yield "start", gen._start.lower(*start_args, **start_kw)
        run = jax.eval_shape(lambda *a: gen._start(*a, **start_kw), *start_args)
        yield (
            f"decode_loop[{impl}]",
            gen.decode_loop_for(run.token.shape[0]).lower(
                prepared,
                run,
                jnp.int32(args.new_tokens),
                sampling.params(),
                mode=sampling.mode,
                impl=impl,
                vocab_size=config.vocab_size,
            ),
        )

    def compile_one(job):
        name, batch, low = job
        t0 = time.perf_counter()
        low.compile()
        return [name, batch, time.perf_counter() - t0]

    try:
        jobs = [
            (name, batch, low)
            for impl in impls
            for batch in batches
            for name, low in lowerings(batch, impl)
        ]
        # Longest first: the decode loops.
        jobs.sort(key=lambda j: not j[0].startswith("decode_loop"))
        workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(compile_one, jobs))
    except Exception as e:  # noqa: BLE001 - the runs compile as usual
        return dict(error=f"{type(e).__name__}: {e}"[:2000], wall_s=time.perf_counter() - start)
    return dict(wall_s=time.perf_counter() - start, threads=workers, jobs=done)


def run_once(prepared, prompts, sampling, impl, new_tokens, state_dtype):
    """(prefill seconds, decode seconds): prompts on the host to tokens on the host."""
    jax, gen = jax_modules()
    start = time.perf_counter()
    prefilled = gen.prefill_batch(prepared, prompts, state_dtype=state_dtype)
    jax.block_until_ready((prefilled.logits, prefilled.state, prefilled.seen))
    mid = time.perf_counter()
    tokens, count = gen.decode_batch(prepared, prefilled, new_tokens, sampling, decode_impl=impl)
    end = time.perf_counter()  # decode_batch returns numpy: the tokens are on the host
    if int(count.min()) != new_tokens:
        raise RuntimeError(f"a sequence stopped early: {count}")
    return mid - start, end - mid


def summary(precompiled) -> str:
    if "error" in precompiled:
        return f"FAILED ({precompiled['error']})"
    loops = [j for j in precompiled["jobs"] if j[0].startswith("decode_loop")]
    return (
        f"{len(precompiled['jobs'])} functions in {precompiled['wall_s']:.1f} s on "
        f"{precompiled['threads']} threads; decode loops "
        + ", ".join(f"batch {b} {t:.1f} s" for _, b, t in loops)
    )


def worker(args):
    """One setting of our side (or, for --worker compile, the compile phase): writes
    --worker-json after every batch size."""
    jax, gen = jax_modules()
    from jax_packmamba.sampling import SamplingConfig

    t0 = time.perf_counter()
    deadline = t0 + (args.worker_budget or args.time_budget)
    if args.compile_cache:
        use_compile_cache(args.compile_cache)
    device = jax.devices()[0]
    info = harness.device_info(device)
    config = model_config(args, device)
    impl = gen.resolve_decode_impl(args.decode_impl, config)
    # The compile phase compiles what the settings run: they share one sampling mode.
    sampling = SamplingConfig(
        **SETTINGS[args.setting_list[0] if args.worker == "compile" else args.worker],
        seed=0,
        prefilter=args.prefilter,
    )
    prepared = build_model(config, device)
    jax.block_until_ready(prepared)
    init_s = time.perf_counter() - t0
    init_peak, weights_bytes = harness.device_memory(device)
    print(
        f"[ours {args.worker}] {args.preset} on {device.device_kind}: init {init_s:.1f} s, "
        f"weights {(weights_bytes or 0) / 2**30:.2f} GiB, decode_impl {impl}, state "
        f"{args.state_dtype_ran}",
        file=sys.stderr,
    )
    precompiled = None
    if args.worker_precompile:
        precompiled = precompile(prepared, args.batch_list, args, sampling, [impl])
        print(f"[ours {args.worker}] compiled: {summary(precompiled)}", file=sys.stderr)
    if args.worker == "compile":
        harness.write_json(
            args.worker_json, dict(device=dataclasses.asdict(info), precompile=precompiled)
        )
        return 0
    record = dict(
        setting=args.worker,
        sampling=SETTINGS[args.worker],
        decode_impl=impl,
        state_dtype=args.state_dtype_ran,
        state_dtype_arg=args.state_dtype,
        device=dataclasses.asdict(info),
        config=dataclasses.asdict(config),
        num_params=config.num_params(),
        init_s=init_s,
        weights_bytes_in_use=weights_bytes,
        peak_bytes_after_init=init_peak,
        precompile=precompiled,
        rows=[],
        skipped=[],
    )
    previous = None
    for batch in args.batch_list:
        if previous is not None:
            # A batch costs at most ~1.5x the previous one's runs, plus its compile.
            estimate = previous["compile_s"] + 1.5 * (1 + args.repeats) * previous["total_s"]
            if time.perf_counter() + estimate > deadline:
                record["skipped"].append(batch)
                continue
        prompts = prompts_for(batch, args.prompt_len, config.vocab_size)
        _, in_use_before = harness.device_memory(device)
        with gen.compile_stats() as compiled:
            start = time.perf_counter()
            run_once(prepared, prompts, sampling, impl, args.new_tokens, state_dtype_arg(args))
            first = time.perf_counter() - start
        runs = [
            run_once(prepared, prompts, sampling, impl, args.new_tokens, state_dtype_arg(args))
            for _ in range(args.repeats)
        ] or [(float("nan"), float("nan"))]
        peak, _ = harness.device_memory(device)
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        row = dict(
            batch=batch,
            total_s=prefill + decode,
            prefill_s=prefill,
            decode_s=decode,
            decode_ms_per_step=1e3 * decode / max(args.new_tokens - 1, 1),
            new_tok_s=batch * args.new_tokens / (prefill + decode),
            peak_gib=None if peak is None else peak / 2**30,
            bytes_in_use_before=in_use_before,
            first_call_s=first,
            compile_s=compiled.seconds,
            compiles=compiled.compiles,
            cache_hits=compiled.cache_hits,
            compiled=[(n, round(t, 2)) for n, t in compiled.backend if t > 0.05],
            runs=[list(r) for r in runs],
        )
        if not args.repeats:  # smoke: the first call is all there is
            row.update(total_s=first, prefill_s=None, decode_s=None, decode_ms_per_step=None)
        record["rows"].append(row)
        previous = dict(row, total_s=row["total_s"] if args.repeats else first)
        print(
            f"[ours {args.worker}] batch {batch:4d}: total {row['total_s']:.3f} s (prefill "
            f"{prefill:.3f}, decode {decode:.3f} s = {row['decode_ms_per_step'] or 0:.2f} "
            f"ms/step), peak {row['peak_gib'] or 0:.2f} GiB, first call {first:.1f} s "
            f"(compile {compiled.seconds:.1f} s: {compiled.compiles} compiles, "
            f"{compiled.cache_hits} from the cache)",
            file=sys.stderr,
            flush=True,
        )
        harness.write_json(args.worker_json, record)
    record["wall_s"] = time.perf_counter() - t0
    harness.write_json(args.worker_json, record)
    return 0


# ------------------------------------------------------------------------------------------------
# The anchor (mamba_ssm), as a subprocess.


def anchor_site(args) -> str:
    site = pathlib.Path(args.anchor_pythonpath or "/tmp/site")
    tar = args.anchor / "mamba_site.tar.xz"
    if not (site / "mamba_ssm").exists() and tar.exists():
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xJf", str(tar), "-C", str(site)], check=True)
    return str(site)


def anchor_batches(batches, budget, args):
    """The batch sizes whose estimated cost (a warm-up and a timed generate each) fits."""
    scale = (args.prompt_len + args.new_tokens) / 2048
    chosen, cost = [], 25.0  # model build and CUDA start
    for b in batches:
        est = 2.3 * scale * ANCHOR_ESTIMATE_S.get(b, ANCHOR_ESTIMATE_S[128] * b / 128)
        if cost + est > budget:
            break
        chosen.append(b)
        cost += est
    return chosen


def run_anchor(args, setting, batches, budget):
    script = args.anchor / "gen_torch.py"
    if not script.is_file():
        return dict(status="error", error=f"{script} is not a file", rows=[])
    flags = [
        "--temperature",
        str(SETTINGS[setting]["temperature"]),
        "--top-p",
        str(SETTINGS[setting]["top_p"]),
        "--repetition-penalty",
        str(SETTINGS[setting].get("repetition_penalty", 1.0)),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = anchor_site(args)
    with tempfile.TemporaryDirectory(prefix="anchor_") as tmp:
        out = pathlib.Path(tmp) / "anchor.json"
        cmd = [
            sys.executable,
            str(script),
            str(out),
            ",".join(map(str, batches)),
            "--preset",
            args.preset,
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.new_tokens),
            *flags,
        ]
        t0 = time.perf_counter()
        status = "ok"
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=max(30.0, budget + 30)
            )
            tail = (proc.stdout + proc.stderr)[-3000:]
            if proc.returncode != 0:
                status = f"error (exit {proc.returncode})"
        except subprocess.TimeoutExpired as e:
            status, tail = "timeout", str(e.stdout or "")[-3000:]
        print(
            f"[mamba_ssm {setting}] {status} in {time.perf_counter() - t0:.0f} s\n{tail[-1500:]}",
            file=sys.stderr,
            flush=True,
        )
        result = json.loads(out.read_text()) if out.exists() else {}
    return dict(
        status=status,
        command=" ".join(cmd),
        wall_s=time.perf_counter() - t0,
        output_tail=tail if status != "ok" else None,
        torch=result.get("torch"),
        device=result.get("device"),
        rows=result.get("rows", []),
    )


# ------------------------------------------------------------------------------------------------
# The parent: both sides, both settings, the comparison.


def run_ours(args, setting, budget, precompile_first):
    """Our side of one setting (setting "compile": the compile phase): a subprocess (smoke:
    in this process)."""
    with tempfile.TemporaryDirectory(prefix="ours_") as tmp:
        path = pathlib.Path(tmp) / "ours.json"
        argv = [*sys.argv[1:]] if not args.smoke else []
        worker_args = [
            "--worker",
            setting,
            "--worker-json",
            str(path),
            "--worker-budget",
            str(budget),
            "--compile-cache",
            str(args.compile_cache),
        ]
        if precompile_first:
            worker_args.append("--worker-precompile")
        if args.smoke:
            worker(
                parse_args(
                    [
                        "--smoke",
                        "--preset",
                        args.preset,
                        "--dtype",
                        args.dtype,
                        "--scan-impl",
                        args.scan_impl,
                        "--prompt-len",
                        str(args.prompt_len),
                        "--new-tokens",
                        str(args.new_tokens),
                        "--batches",
                        args.batches,
                        "--repeats",
                        str(args.repeats),
                        "--decode-impl",
                        args.decode_impl,
                        "--state-dtype",
                        args.state_dtype,
                        "--prefilter",
                        str(args.prefilter),
                        *worker_args,
                    ]
                )
            )
        else:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, *argv, *worker_args], env=env, timeout=budget + 120
                )
                if proc.returncode != 0:
                    print(f"[ours {setting}] exit {proc.returncode}", file=sys.stderr)
            except subprocess.TimeoutExpired:
                print(
                    f"[ours {setting}] timed out; keeping the batch sizes it finished",
                    file=sys.stderr,
                )
        return json.loads(path.read_text()) if path.exists() else dict(rows=[], error="no output")


def compare(ours, anchor):
    theirs = {r["batch"]: r for r in anchor.get("rows", [])}
    out = []
    for r in ours.get("rows", []):
        t = theirs.get(r["batch"])
        row = dict(
            batch=r["batch"],
            ours_total_s=r["total_s"],
            ours_decode_ms_per_step=r["decode_ms_per_step"],
            ours_peak_gib=r["peak_gib"],
            ours_first_call_s=r["first_call_s"],
            ours_compile_s=r["compile_s"],
        )
        if t:
            row.update(
                mamba_ssm_total_s=t["total_s"],
                mamba_ssm_peak_gib=t.get("peak_gib"),
                total_ratio=r["total_s"] / t["total_s"],
                peak_ratio=(
                    r["peak_gib"] / t["peak_gib"] if r["peak_gib"] and t.get("peak_gib") else None
                ),
            )
        out.append(row)
    return out


def targets(settings, step_ms: float | None):
    checks = {}
    for name, s in settings.items():
        rows = [r for r in s["comparison"] if "total_ratio" in r]
        checks[name] = dict(
            total_ratio_max=max((r["total_ratio"] for r in rows), default=None),
            total_ratio_met=bool(rows) and all(r["total_ratio"] <= TARGET_RATIO for r in rows),
            peak_met=bool(rows)
            and all(r["peak_ratio"] is not None and r["peak_ratio"] <= 1 for r in rows),
            batch1_step_ms=next(
                (r["ours_decode_ms_per_step"] for r in s["comparison"] if r["batch"] == 1), None
            ),
        )
        step = checks[name]["batch1_step_ms"]
        checks[name]["batch1_step_met"] = None not in (step, step_ms) and step <= step_ms
    return checks


def table(name, setting) -> str:
    lines = [
        f"{name}: {setting['sampling']}",
        "| batch | ours s | mamba_ssm s | ours / mamba_ssm | ours decode ms/step | "
        "peak GiB ours / mamba_ssm | ours first call s (compile) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in setting["comparison"]:
        ratio = f"{r['total_ratio']:.2f}x" if "total_ratio" in r else "-"
        theirs = f"{r['mamba_ssm_total_s']:.2f}" if "mamba_ssm_total_s" in r else "-"
        peak_theirs = f"{r['mamba_ssm_peak_gib']:.1f}" if r.get("mamba_ssm_peak_gib") else "-"
        step = r["ours_decode_ms_per_step"]
        lines.append(
            f"| {r['batch']} | {r['ours_total_s']:.2f} | {theirs} | {ratio} | "
            f"{'-' if step is None else f'{step:.2f}'} | "
            f"{(r['ours_peak_gib'] or 0):.1f} / {peak_theirs} | "
            f"{r['ours_first_call_s']:.1f} ({r['ours_compile_s']:.1f}) |"
        )
    return "\n".join(lines)


def orchestrate(args, argv):
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget
    own_cache = args.compile_cache is None
    if own_cache:
        args.compile_cache = tempfile.mkdtemp(prefix="jax_packmamba_cache_")
    with_anchor = args.anchor is not None
    # First every compile, in a process of its own: the measured processes then load the
    # executables from the persistent cache, so neither compiling nor XLA's autotuning (whose
    # scratch buffers count in peak_bytes_in_use) happens in them.
    compile_first = not args.no_precompile and not args.smoke
    phases = ([("compile", "ours")] if compile_first else []) + [
        (s, side)
        for s in args.setting_list
        for side in ("ours", "anchor")
        if side == "ours" or with_anchor
    ]
    # Shares of the time left that each phase may use, the later phases' reserved.
    weight = {"ours": 1.0, "anchor": 0.7, "compile": 1.0}
    settings, compiled = {}, None
    for k, (setting, side) in enumerate(phases):
        left = deadline - time.perf_counter()
        rest = sum(weight["compile" if s == "compile" else d] for s, d in phases[k:])
        budget = left * weight["compile" if setting == "compile" else side] / rest
        if setting == "compile":
            compiled = run_ours(args, setting, budget, precompile_first=True).get("precompile")
            print(f"[compile] {summary(compiled) if compiled else 'no result'}", file=sys.stderr)
            continue
        entry = settings.setdefault(setting, dict(sampling=SETTINGS[setting]))
        if side == "ours":
            entry["ours"] = run_ours(args, setting, budget, precompile_first=False)
        else:
            batches = anchor_batches(args.batch_list, budget, args)
            entry["mamba_ssm"] = run_anchor(args, setting, batches, budget)
            entry["mamba_ssm"]["skipped"] = [b for b in args.batch_list if b not in batches]
    for entry in settings.values():
        entry["comparison"] = compare(entry.get("ours", {}), entry.get("mamba_ssm", {}))

    first = next((s["ours"] for s in settings.values() if s.get("ours", {}).get("device")), None)
    if first is not None:
        info = harness.DeviceInfo(**first["device"])
    else:
        info = harness.DeviceInfo(kind="unknown", name="unknown", backend="unknown", slug="unknown")
    head = harness.header(info, script=__file__, argv=argv)
    from jax_packmamba.config import preset_config

    step_ms = step_target_ms(preset_config(args.preset), args.dtype, info.kind)
    variant = "_".join(
        v for v in (state_variant(args), decode_variant(args), "smoke" if args.smoke else None) if v
    )
    path = harness.result_path("generate", info.slug, variant or None, out_dir=args.out)
    png = path.with_suffix(".png")
    for moved in harness.retire(path, commit=head["git_commit"], companions=[png]):
        print(f"generate: moved the previous result to {moved}", file=sys.stderr)
    report = dict(
        **head,
        benchmark="generate: ours (jax_packmamba) against mamba_ssm generate(cg=True)",
        preset=args.preset,
        dtype=args.dtype,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        decode_impl=args.decode_impl,
        state_dtype=args.state_dtype_ran,
        state_dtype_arg=args.state_dtype,
        prefilter=args.prefilter,
        batches=args.batch_list,
        compile=compiled,
        settings=settings,
        targets=targets(settings, step_ms),
        target_total_ratio=TARGET_RATIO,
        target_batch1_step_ms=step_ms,
        notes=(
            "total: prompts on the host to generated tokens on the host; ours: prefill (one "
            "packed pass) + decode (one jitted while_loop), median of `repeats` timed runs "
            "after an untimed first call (first_call_s; compile_s its tracing and loading "
            "from the persistent cache that the compile phase filled: `compile` has each "
            "function's compile seconds, compiled in parallel threads); mamba_ssm: "
            "gen_torch.py's generate(cg=True), one timed call after a warm-up; peak: each "
            "side's allocator high-water mark (jax peak_bytes_in_use in a fresh process per "
            "setting; torch max_memory_allocated after a reset per batch)"
        ),
        wall_s=time.perf_counter() - t0,
    )
    harness.write_json(path, report)
    plot(report, png)
    for name, entry in settings.items():
        print("\n" + table(name, entry), file=sys.stderr)
    print(
        f"\ntargets: {json.dumps(report['targets'])}\nwrote {path} and {png.name} in "
        f"{report['wall_s']:.0f} s",
        file=sys.stderr,
    )
    if own_cache:
        import shutil

        shutil.rmtree(args.compile_cache, ignore_errors=True)
    return 0


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    styles = {"blog": "-", "fast": "--"}
    for name, s in report["settings"].items():
        rows = s["comparison"]
        if not rows:
            continue
        ls = styles.get(name, ":")
        b = [r["batch"] for r in rows]
        axes[0].plot(
            b, [r["ours_total_s"] for r in rows], "o" + ls, color="C0", label=f"ours, {name}"
        )
        both = [r for r in rows if "total_ratio" in r]
        if both:
            bb = [r["batch"] for r in both]
            axes[0].plot(
                bb,
                [r["mamba_ssm_total_s"] for r in both],
                "s" + ls,
                color="C1",
                label=f"mamba_ssm, {name}",
            )
            axes[1].plot(bb, [r["total_ratio"] for r in both], "o" + ls, label=name)
            peaks = [r for r in both if r.get("mamba_ssm_peak_gib")]
            axes[3].plot(
                [r["batch"] for r in peaks],
                [r["mamba_ssm_peak_gib"] for r in peaks],
                "s" + ls,
                color="C1",
                label=f"mamba_ssm, {name}",
            )
        steps = [r for r in rows if r["ours_decode_ms_per_step"] is not None]
        axes[2].plot(
            [r["batch"] for r in steps],
            [r["ours_decode_ms_per_step"] for r in steps],
            "o" + ls,
            label=f"ours, {name}",
        )
        peaks = [r for r in rows if r["ours_peak_gib"] is not None]
        axes[3].plot(
            [r["batch"] for r in peaks],
            [r["ours_peak_gib"] for r in peaks],
            "o" + ls,
            color="C0",
            label=f"ours, {name}",
        )
    axes[1].axhline(TARGET_RATIO, color="k", lw=0.8, ls=":", label=f"target {TARGET_RATIO}")
    step_ms = report["target_batch1_step_ms"]
    if step_ms is not None:
        axes[2].axhline(
            step_ms, color="k", lw=0.8, ls=":", label=f"batch-1 target {step_ms:.2f} ms"
        )
    titles = [
        f"total time (prompt {report['prompt_len']}, {report['new_tokens']} new)",
        "ours / mamba_ssm (total time)",
        "our decode ms per step",
        "peak device memory",
    ]
    for ax, title, ylabel in zip(axes, titles, ("s", "ratio", "ms", "GiB")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    preset = report["preset"]
    name = preset if preset.startswith("mamba2-") else f"mamba-{preset}"
    fig.suptitle(
        f"{name} ({report['dtype']}, random weights) on "
        f"{report['device']}: jax_packmamba (decode {report['decode_impl']}) vs "
        f"mamba_ssm generate(cg=True)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# --profile: where a decode step's time goes.


CATEGORIES = (
    (
        "decode kernels",
        # decode_conv also names decode_conv_x_proj (a substring match)
        (
            "decode_in_proj_conv",
            "decode_conv",
            "decode_ssm_update",
            "decode_ssd_update",
            "decode_add",
        ),
    ),
    (
        "gemm",
        (
            "gemm",
            "gemv",
            "nvjet",
            "cutlass",
            "xmma",
            "cublas",
            "matmul",
            "triton_dot",
            "__dot",
            "dot_",
        ),
    ),
    (
        "sort/scan/top-k (sampling)",
        ("sort", "cub", "radix", "scan", "topk", "top_k", "sampling_key"),
    ),
    ("rng", ("threefry", "rng", "philox")),
    (
        "copy",
        ("copy", "dynamic_slice", "dynamic-slice", "memcpy", "memset", "transpose", "concatenate"),
    ),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other fusions"


def kernel_table(trace_dir, steps: int, *, plane_prefix: str = "/device:GPU") -> dict:
    """Per-kernel figures of a jax.profiler trace over `steps` decode steps (the kernels of
    harness.device_events)."""
    events, lines_seen = harness.device_events(trace_dir, plane_prefix=plane_prefix)
    if not events:
        return dict(error=f"no events on {plane_prefix}* planes in the trace", lines=lines_seen)
    start, end = events[0][1], max(e[1] + e[2] for e in events)
    busy = harness.busy_ns(events)
    per_name = {}
    for name, _, dur in events:
        total, count = per_name.get(name, (0.0, 0))
        per_name[name] = (total + dur, count + 1)
    kernels = sorted(((n, t, c) for n, (t, c) in per_name.items()), key=lambda x: -x[1])
    by_cat = {}
    for name, total, count in kernels:
        cat = category(name)
        t, c = by_cat.get(cat, (0.0, 0))
        by_cat[cat] = (t + total, c + count)
    us = 1e-3 / steps  # ns in the trace -> us per step
    return dict(
        steps=steps,
        kernels_per_step=len(events) / steps,
        wall_ms_per_step=(end - start) * us / 1e3,
        busy_ms_per_step=busy * us / 1e3,
        categories={
            k: dict(us_per_step=t * us, per_step=c / steps)
            for k, (t, c) in sorted(by_cat.items(), key=lambda x: -x[1][0])
        },
        top=[
            dict(
                name=n,
                category=category(n),
                us_per_step=t * us,
                per_step=c / steps,
                mean_us=t / c / 1e3,
            )
            for n, t, c in kernels[:30]
        ],
        lines=lines_seen,
    )


def format_table(title, t) -> str:
    if "error" in t:
        return f"{title}: {t['error']} (trace lines: {t.get('lines')})"
    busy = t["busy_ms_per_step"] / t["wall_ms_per_step"]
    out = [
        f"{title}: {t['wall_ms_per_step']:.3f} ms wall / step in the trace, GPU busy "
        f"{t['busy_ms_per_step']:.3f} ms ({100 * busy:.0f}%), "
        f"{t['kernels_per_step']:.0f} kernels / step",
        "  by category:  "
        + "; ".join(
            f"{k} {v['us_per_step']:.0f} us ({v['per_step']:.0f})"
            for k, v in t["categories"].items()
        ),
        f"  {'us/step':>8} {'n/step':>6} {'mean us':>8}  kernel",
    ]
    for k in t["top"][:25]:
        out.append(
            f"  {k['us_per_step']:8.1f} {k['per_step']:6.1f} {k['mean_us']:8.2f}  "
            f"{k['name'][:90]}  [{k['category']}]"
        )
    return "\n".join(out)


PROFILE_PROMPT = 64  # prompt tokens of a profiled batch (a decode step does not depend on it)
PROFILE_WARM = 2  # untimed decode steps (the first call)


def argparse_namespace(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def layer_check(prepared, batch, impl, state_dtype=None):
    """Max relative difference of one layer's decode step between `impl` and XLA, on random
    states stored in state_dtype (generation's; None: the compute dtype) (the kernels'
    correctness on this device)."""
    jax, gen = jax_modules()
    import jax.numpy as jnp
    from flax import nnx

    from jax_packmamba.config import Mamba2Config
    from jax_packmamba.model import MixerState

    config = prepared.config
    k = jax.random.split(jax.random.key(7), 3)
    residual = jax.random.normal(k[0], (batch, config.d_model))
    if isinstance(config, Mamba2Config):
        conv_shape = (batch, config.d_conv - 1, config.conv_dim)
        ssm_shape = (batch, config.nheads, config.headdim, config.d_state)
    else:
        conv_shape = (batch, config.d_conv - 1, config.d_inner)
        ssm_shape = (batch, config.d_inner, config.d_state)
    conv = jax.random.normal(k[1], conv_shape).astype(config.compute_dtype)
    ssm = jax.random.normal(k[2], ssm_shape).astype(gen.resolve_state_dtype(state_dtype, config))
    params = prepared.params["layers"][0]

    def block_step(p, r, c, s, impl):
        r, cache = nnx.merge(prepared.graphs[0], p)(r, cache=MixerState(c, s), decode_impl=impl)
        return r, cache.conv, cache.ssm

    outs = {
        i: jax.jit(lambda p, r, c, s, i=i: block_step(p, r, c, s, i))(params, residual, conv, ssm)
        for i in ("xla", impl)
    }
    rel = lambda a, b: float(
        jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))  # noqa: E731
        / jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-6)
    )
    return {
        name: rel(a, b) for name, a, b in zip(("residual", "conv", "ssm"), outs[impl], outs["xla"])
    }


def profile_one(prepared, batch, impl, sampling, args, tmp):
    jax, gen = jax_modules()
    import jax.numpy as jnp

    config = prepared.config
    warm, timed, traced = PROFILE_WARM, args.profile_steps, args.trace_steps
    total = 1 + warm + timed + traced
    prompts = prompts_for(batch, min(args.prompt_len, PROFILE_PROMPT), config.vocab_size)
    params = sampling.params()
    loop = lambda run, limit: gen.decode_loop_for(run.token.shape[0])(  # noqa: E731
        prepared,
        run,
        jnp.int32(limit),
        params,
        mode=sampling.mode,
        impl=impl,
        vocab_size=config.vocab_size,
    )
    with gen.compile_stats() as compiled:
        start = time.perf_counter()
        prefilled = gen.prefill_batch(prepared, prompts, state_dtype=state_dtype_arg(args))
        run = gen._begin(prepared, prefilled, total, sampling)
        run = jax.block_until_ready(loop(run, 1 + warm))
        first = time.perf_counter() - start
    with gen.compile_stats() as again:
        start = time.perf_counter()
        run = jax.block_until_ready(loop(run, 1 + warm + timed))
        step_ms = 1e3 * (time.perf_counter() - start) / timed
    if again.compiles:  # the timing would include a compile
        raise RuntimeError(f"the timed steps compiled {again.backend}")
    trace_dir = pathlib.Path(tmp) / f"trace_{batch}_{impl}"
    with jax.profiler.trace(str(trace_dir)):
        run = jax.block_until_ready(loop(run, total))
    del run
    return dict(
        batch=batch,
        impl=impl,
        decode_ms_per_step=step_ms,
        first_call_s=first,
        compile_s=compiled.seconds,
        kernels=kernel_table(trace_dir, traced),
    )


def profile(args, argv):
    jax, gen = jax_modules()
    from jax_packmamba.sampling import SamplingConfig

    t0 = time.perf_counter()
    device = jax.devices()[0]
    new = harness.new_result(
        "generate",
        script=__file__,
        argv=argv,
        out_dir=args.out,
        smoke=args.smoke,
        variant="_".join(v for v in ("profile", state_variant(args), decode_variant(args)) if v),
        companions=[".txt"],
        device=device,
    )
    config = model_config(args, device)
    prepared = build_model(config, device)
    setting = args.setting_list[0]
    sampling = SamplingConfig(**SETTINGS[setting], seed=0, prefilter=args.prefilter)
    batches = [int(b) for b in args.profile_batches.split(",")]
    impls = args.profile_impls.split(",")
    if device.platform != "gpu":  # the smoke path: the same kernels through the interpreter
        impls = ["pallas_interpret" if i == "pallas" else i for i in impls]
    impls = [gen.resolve_decode_impl(i, config) for i in impls]
    shapes = argparse_namespace(
        args,
        prompt_len=min(args.prompt_len, PROFILE_PROMPT),
        new_tokens=1 + PROFILE_WARM + args.profile_steps + args.trace_steps,
    )
    precompiled = precompile(prepared, batches, shapes, sampling, impls)
    print(f"compiled: {summary(precompiled)}", file=sys.stderr)
    results, text = [], []
    with tempfile.TemporaryDirectory(prefix="profile_") as tmp:
        for batch in batches:
            for impl in impls:
                try:
                    r = profile_one(prepared, batch, impl, sampling, args, tmp)
                    if impl != "xla":
                        r["layer_check_vs_xla"] = layer_check(
                            prepared, batch, impl, state_dtype_arg(args)
                        )
                except Exception as e:  # noqa: BLE001 - report and go on to the next
                    r = dict(batch=batch, impl=impl, error=f"{type(e).__name__}: {e}"[:3000])
                results.append(r)
                title = f"batch {batch}, decode_impl {impl}"
                if "error" in r:
                    block = f"{title}: FAILED {r['error']}"
                else:
                    block = (
                        f"{title}: {r['decode_ms_per_step']:.3f} ms/step timed over "
                        f"{args.profile_steps} steps (first call {r['first_call_s']:.1f} s, "
                        f"compile {r['compile_s']:.1f} s)"
                        + (
                            f"; layer check vs xla (max rel diff) {r['layer_check_vs_xla']}"
                            if "layer_check_vs_xla" in r
                            else ""
                        )
                        + "\n"
                        + format_table("  trace", r["kernels"])
                    )
                print(block + "\n", file=sys.stderr, flush=True)
                text.append(block)
                report = dict(
                    **new.header,
                    benchmark="generate --profile: decode steps",
                    preset=args.preset,
                    dtype=args.dtype,
                    state_dtype=args.state_dtype_ran,
                    state_dtype_arg=args.state_dtype,
                    setting=setting,
                    sampling=SETTINGS[setting],
                    prefilter=args.prefilter,
                    precompile=precompiled,
                    results=results,
                    wall_s=time.perf_counter() - t0,
                )
                harness.write_json(new.path, report)
                new.companions[0].write_text("\n\n".join(text) + "\n")
    print(
        f"wrote {new.path} and {new.companions[0].name} in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    set_decode_rules(args)  # before anything is traced (the workers get the flags too)
    if args.worker:
        return worker(args)
    if args.profile:
        return profile(args, argv)
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
