"""Generation speed and memory: prompt 1024, generate 1024, batch 1, 2, 4, ... 128.

The measurement published Mamba inference studies make (e.g. the ROCm blog's mamba-2.8b on an
MI210): for each batch size, the time of the packed prefill (all prompts in one pass, each
sequence's final state taken from the scan), of the decode loop (one jitted while_loop of
recurrent steps), their total, and the device's peak memory. Weights are random (speed does not
depend on them); compute in --dtype (bfloat16) with the residual stream, norms and scan state in
float32, as in training.

    PYTHONPATH=. python3 benchmarks/bench_generate.py                    # GPU, 2.8b
    PYTHONPATH=. python3 benchmarks/bench_generate.py --smoke --out DIR  # CPU check, seconds

Writes --out/generate_<slug>.json (default benchmarks/results/; --smoke: generate_<slug>_smoke.*:
the harness header, shapes, per batch size the medians and every repeat) and the plot beside it
(.png); a result there from another commit moves to history/ first.

Method: random weights are made on the device layer by layer directly in the inference layout
(layers stacked, projection weights in --dtype; see `jax_packmamba.generate.prepare`), so the
float32 training copy never exists whole in device memory (the JSON records the peak after
initialisation too). Batch sizes run in increasing order in one process; `peak_bytes_in_use` is
a high-water mark over the process, and since every buffer grows with the batch, the peak read
after a batch size's runs is that batch size's peak (the JSON also records bytes in use before
each batch size). Each batch size is compiled and run once (reported as first_call_s), then the
prefill and the decode (on the prefill's output) are each timed --repeats times with
harness.time_calls (groups of one call, blocking after each: a generation is one call, not a
stream of them); medians are reported. A batch size is skipped when the time left in
--time-budget cannot cover it (estimated from the previous one), so the run ends in bounded
time. --smoke: the tiny preset, batches 1 and 2, prompt 32, 16 new tokens, one repeat.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness
from jax_packmamba import MambaBlock, MambaConfig, MambaLM

# The module (the package re-exports its generate function under the same name).
gen = importlib.import_module("jax_packmamba.generate")


def parse_args(argv=None):
    p = harness.argument_parser(__doc__)
    p.add_argument("--preset", default=None, help="default 2.8b (smoke: tiny)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--scan-impl", default="auto",
                   help="selective scan for the prefill (auto: the Pallas kernel on GPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024 (smoke 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 1024 (smoke 16)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="batch sizes 1, 2, 4, ... up to this (default 128; smoke 2)")
    p.add_argument("--batches", help="comma-separated batch sizes instead (e.g. 64,128)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per batch size, after one untimed (default 2; smoke 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--time-budget", type=float, default=440.0,
                   help="seconds; batch sizes that would not fit are skipped")
    args = p.parse_args(argv)
    smoke = args.smoke
    for name, full, small in (("preset", "2.8b", "tiny"), ("prompt_len", 1024, 32),
                              ("new_tokens", 1024, 16), ("max_batch", 128, 2),
                              ("repeats", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def build_model(config, device):
    """Random weights made on the device directly in the inference layout.

    Each layer is initialised (float32, as MambaLM does) and cast in its own jitted call and
    written into preallocated stacked buffers (donated, so in place): the float32 model never
    exists whole on the device, and the init peak stays near the inference weights' size.
    """
    dtype = config.compute_dtype
    with jax.default_device(device):
        # Embedding, final norm and head: from a one-layer model, whose layer is dropped.
        shell = jax.jit(lambda: gen.prepare(MambaLM(dataclasses.replace(config, n_layer=1),
                                                    rngs=nnx.Rngs(0))))()
        init_layer = jax.jit(lambda key: gen.inference_state(
            MambaBlock(config, rngs=nnx.Rngs(key)), "layers", dtype))
        key = jax.random.key(1)
        block_graph = nnx.split(nnx.eval_shape(lambda: MambaBlock(config, rngs=nnx.Rngs(0))))[0]
        abstract = jax.eval_shape(init_layer, key)
        stacked = jax.jit(lambda: jax.tree.map(
            lambda x: jnp.zeros((config.n_layer, *x.shape), x.dtype), abstract))()

        @functools.partial(jax.jit, donate_argnums=0)
        def put(stacked, layer, i):
            return jax.tree.map(lambda s, x: s.at[i].set(x), stacked, layer)

        for i in range(config.n_layer):
            stacked = put(stacked, init_layer(jax.random.fold_in(key, i)), i)
    params = {**shell.params, "layers": stacked}
    return gen.PreparedModel(config=config, graphs=(block_graph, *shell.graphs[1:]), params=params)


def time_batch(prepared, prompts, args):
    """(first call seconds, prefill Timing, decode Timing)."""
    sampling = dict(temperature=args.temperature, seed=0)

    def prefill(prompts):
        return gen.prefill(prepared, prompts)

    def decode(logits, state):
        return gen.decode(prepared, logits, state, args.new_tokens, **sampling)

    start = time.perf_counter()
    logits, state = prefill(prompts)
    jax.block_until_ready(decode(logits, state))
    first = time.perf_counter() - start
    timing = dict(warmup=0, groups=args.repeats, per_group=1)
    prefill_t = harness.time_calls(prefill, [(prompts,)], **timing)
    decode_t = harness.time_calls(decode, [(logits, state)], keep_outputs=True, **timing)
    for _, count in decode_t.outputs:
        assert int(np.min(count)) == args.new_tokens, np.asarray(count)
    return first, prefill_t, decode_t


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    wall = time.perf_counter()
    device = jax.devices()[0]
    new = harness.new_result("generate", script=__file__, argv=argv, out_dir=args.out,
                             smoke=args.smoke, companions=[".png"], device=device)
    out, (png,) = new.path, new.companions
    scan_impl = args.scan_impl
    if scan_impl == "auto" and device.platform == "gpu":
        try:
            import pallas_kernels.selective_scan  # noqa: F401
        except ImportError as e:
            print(f"Pallas scan unavailable ({e}); prefill uses the reference scan", file=sys.stderr)
            scan_impl = "reference"
    config = MambaConfig.preset(args.preset, dtype=args.dtype, scan_impl=scan_impl)

    start = time.perf_counter()
    prepared = build_model(config, device)
    jax.block_until_ready(prepared)
    init_s = time.perf_counter() - start
    init_peak, weights_bytes = harness.device_memory(device)
    print(f"{args.preset} on {device.device_kind}: init {init_s:.1f} s, weights in use "
          f"{(weights_bytes or 0) / 2**30:.2f} GiB", file=sys.stderr)

    rng = np.random.default_rng(0)
    if args.batches:
        batches = sorted(int(b) for b in args.batches.split(","))
    else:
        batches = [1 << i for i in range(args.max_batch.bit_length()) if 1 << i <= args.max_batch]
    results, skipped, previous = [], [], None
    for batch in batches:
        elapsed = time.perf_counter() - wall
        if previous is not None:
            # Cost grows at most linearly with the batch; compile time is ~constant.
            estimate = previous["first_call_s"] + 2 * sum(previous["total_s"])
            if elapsed + estimate > args.time_budget:
                skipped.append(batch)
                continue
        _, in_use_before = harness.device_memory(device)
        prompts = [rng.integers(0, config.vocab_size, args.prompt_len).astype(np.int32) for _ in range(batch)]
        first, prefill_t, decode_t = time_batch(prepared, prompts, args)
        peak, _ = harness.device_memory(device)
        prefill = prefill_t.group_s
        decode = decode_t.group_s
        total = [a + b for a, b in zip(prefill, decode)]
        row = dict(
            batch=batch,
            prefill_s_median=statistics.median(prefill),
            decode_s_median=statistics.median(decode),
            total_s_median=statistics.median(total),
            decode_ms_per_step=1e3 * statistics.median(decode) / max(args.new_tokens - 1, 1),
            decode_tokens_per_s=batch * args.new_tokens / statistics.median(decode),
            total_tokens_per_s=batch * args.new_tokens / statistics.median(total),
            prefill_tokens_per_s=batch * args.prompt_len / statistics.median(prefill),
            peak_bytes_in_use=peak,
            peak_gib=None if peak is None else peak / 2**30,
            bytes_in_use_before=in_use_before,
            first_call_s=first,
            prefill_s=prefill,
            decode_s=decode,
            total_s=total,
        )
        results.append(row)
        previous = row
        print(f"batch {batch:4d}: prefill {row['prefill_s_median']:.3f} s, decode "
              f"{row['decode_s_median']:.3f} s ({row['decode_ms_per_step']:.2f} ms/step, "
              f"{row['decode_tokens_per_s']:.0f} tok/s), total {row['total_s_median']:.3f} s, peak "
              f"{row['peak_gib'] if peak is None else round(row['peak_gib'], 2)} GiB, first call "
              f"{first:.1f} s", file=sys.stderr)

    report = dict(
        **new.header,
        benchmark="generate: packed prefill + recurrent decode",
        device_kind=device.device_kind, platform=device.platform,
        jaxlib_version=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        python=platform.python_version(),
        preset=args.preset, config=dataclasses.asdict(config),
        num_params=config.num_params(),
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
        temperature=args.temperature, scan_impl=scan_impl,
        weights_bytes_in_use=weights_bytes, peak_bytes_after_init=init_peak, init_s=init_s,
        notes=("prefill: all prompts packed into rows and run in one pass; decode: new_tokens - 1 "
               "recurrent steps in one while_loop (the first token comes from the prefill "
               "logits); times are medians of `repeats` runs after one untimed run; peak memory "
               "is the device's peak_bytes_in_use after the batch size's runs, batch sizes in "
               "increasing order"),
        results=results, skipped_batches=skipped,
        wall_s=time.perf_counter() - wall,
    )
    harness.write_json(out, report)
    plot(report, png)
    print(f"wrote {out} and {png.name} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    if not rows:
        return
    b = [r["batch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(b, [r["total_s_median"] for r in rows], "o-", label="total")
    ax.plot(b, [r["prefill_s_median"] for r in rows], "s--", label="prefill")
    ax.plot(b, [r["decode_s_median"] for r in rows], "^--", label="decode")
    ax.set_ylabel("seconds")
    ax.set_title(f"time: prompt {report['prompt_len']}, generate {report['new_tokens']}")
    ax.legend()
    ax = axes[1]
    ax.plot(b, [r["decode_tokens_per_s"] for r in rows], "o-", label="decode")
    ax.plot(b, [r["total_tokens_per_s"] for r in rows], "s--", label="generated / total time")
    ax.set_ylabel("generated tokens / s")
    ax.set_yscale("log")
    ax.set_title("throughput")
    ax.legend()
    ax = axes[2]
    if all(r["peak_gib"] is not None for r in rows):
        ax.plot(b, [r["peak_gib"] for r in rows], "o-")
    else:
        ax.text(0.5, 0.5, "not reported by this device", ha="center", transform=ax.transAxes)
    ax.set_ylabel("GiB")
    ax.set_title("peak device memory")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"mamba-{report['preset']} ({report['config']['dtype']}, random weights) on "
                 f"{report['device_kind']}, jax {report['jax_version']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
