"""Compile time of one training step (default: 1.4b packed 8 x 2048), first and from jax's
persistent compilation cache, each in a fresh process.

    PYTHONPATH=. python3 benchmarks/probes/compile_time.py --preset 1.4b --cache-dir DIR
    PYTHONPATH=. python3 benchmarks/probes/compile_time.py --preset 1.4b --scan-layers \
        --remat save_kernel_outputs
    PYTHONPATH=. python3 benchmarks/probes/compile_time.py --preset 1.4b --part kernels
    PYTHONPATH=. python3 benchmarks/probes/compile_time.py --smoke

Runs itself twice in subprocesses with the same cache folder (the first fills it, the second
loads from it); each child lowers and compiles train/step.py's step and reports lower_s and
compile_s. `--layers 4,12` adds first compiles of the same preset cut to those layer counts,
each with an empty cache: compile time against depth. The layers run as configured
(MambaConfig.scan_layers): unrolled by default, where compile time grows about linearly with
depth; `--scan-layers` runs them under one lax.scan, where it is about flat (1.4b on one H100:
2.4 s lower + 38.7 s compile scanned, 7.0 + 64.8 s unrolled; docs/performance.md). `--remat`
picks the layers' remat policy (config.REMAT). Each child also records the compiled program's
memory_analysis (temp_size_in_bytes: the step's scratch memory, known before it runs).

`--part kernels` compiles instead only the preset's sequence op (Mamba1's selective scan,
Mamba2's SSD scan) forward and backward at one layer's shapes, rows x seq_len, with the config's
scan_impl (the Pallas kernels on a GPU): the fixed part of the step's compile that does not
depend on depth (on a GPU, mostly Triton compiling the kernels).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import harness, workloads


def child(
    preset: str,
    rows: int,
    seq_len: int,
    smoke: bool,
    n_layer: int | None,
    scan_layers: bool = False,
    remat: str = "none",
    part: str = "step",
) -> dict:
    import jax

    from benchmarks.bench_train import _memory_analysis

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    config = workloads.model_config(
        ("mamba2-tiny" if preset.startswith("mamba2") else "tiny") if smoke else preset,
        backend=jax.default_backend(),
        remat=remat,
        scan_layers=scan_layers,
    )
    if n_layer:
        config = dataclasses.replace(config, n_layer=n_layer)
    t0 = time.perf_counter()
    if part == "kernels":
        fn, args = kernels_program(config, rows, seq_len)
        lowered = jax.jit(fn).lower(*args)
    else:
        setup = workloads.train_setup(config, jax.devices()[0])
        batch = setup.put_batch(workloads.packed_batch(rows=rows, seq_len=seq_len)["arrays"])
        state = jax.eval_shape(lambda: setup.compiled.init(0))
        t0 = time.perf_counter()
        lowered = setup.compiled.train_step.lower(state, batch)
    t1 = time.perf_counter()
    exe = lowered.compile()
    t2 = time.perf_counter()
    return dict(
        part=part,
        n_layer=config.n_layer,
        scan_layers=config.scan_layers,
        remat=config.remat,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        memory_analysis=_memory_analysis(exe),
    )


def kernels_program(config, rows: int, seq_len: int):
    """(gradient function, abstract arguments) of the config's sequence op alone at one layer's
    shapes: the loss sum(y * cotangent) differentiated with respect to every float input."""
    import jax
    import jax.numpy as jnp

    from jax_packmamba import Mamba2Config
    from jax_packmamba.ops import selective_scan, ssd_scan

    b, t, dtype, f32 = rows, seq_len, config.compute_dtype, jnp.float32

    def spec(shape, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt)

    if isinstance(config, Mamba2Config):
        h, p, g, n = config.nheads, config.headdim, config.ngroups, config.d_state
        floats = (spec((b, t, h, p)), spec((b, t, h)), spec((h,), f32))
        floats += (spec((b, t, g, n)), spec((b, t, g, n)), spec((h,), f32), spec((h,), f32))

        def op(x, dt, A, B, C, D, dt_bias, seg):
            return ssd_scan(
                x, dt, A, B, C, D, None, dt_bias, dt_softplus=True, segment_ids=seg,
                chunk_size=config.chunk_size, impl=config.scan_impl,
            )  # fmt: skip
    else:
        e, n = config.d_inner, config.d_state
        floats = (spec((b, t, e)), spec((b, t, e)), spec((e, n), f32), spec((b, t, n)))
        floats += (spec((b, t, n)), spec((e,), f32), spec((b, t, e)), spec((e,), f32))

        def op(u, delta, A, B, C, D, z, delta_bias, seg):
            return selective_scan(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, segment_ids=seg,
                impl=config.scan_impl,
            )  # fmt: skip

    def loss(*args):
        *inputs, seg, ct = args
        return jnp.sum(op(*inputs, seg).astype(f32) * ct)

    grad = jax.grad(loss, argnums=tuple(range(len(floats))))
    out_shape = floats[0].shape
    return grad, (*floats, spec((b, t), jnp.int32), spec(out_shape, f32))


def main(argv=None) -> int:
    ap = harness.argument_parser(__doc__)
    ap.add_argument("--preset", default="1.4b")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--cache-dir", default=None, help="compilation cache (default: a temp dir)")
    ap.add_argument(
        "--layers",
        default="",
        help="comma-separated layer counts to also compile once each (fresh cache)",
    )
    harness.add_layer_args(ap)
    ap.add_argument(
        "--part",
        choices=("step", "kernels"),
        default="step",
        help="step: the training step; kernels: the sequence op alone (see above)",
    )
    ap.add_argument("--n-layer", type=int, default=None, help="internal: the child's depth")
    ap.add_argument("--child", action="store_true", help="internal: one measurement")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.seq_len = 2, 64
    if args.child:
        print(
            json.dumps(
                child(
                    args.preset,
                    args.rows,
                    args.seq_len,
                    args.smoke,
                    args.n_layer,
                    args.scan_layers,
                    args.remat,
                    args.part,
                )
            )
        )
        return 0
    new = harness.new_result(
        "compile_time", script=__file__, argv=sys.argv[1:], out_dir=args.out, smoke=args.smoke
    )
    cache = args.cache_dir or tempfile.mkdtemp(prefix="xla_cache_")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
    cmd = (
        [
            sys.executable,
            __file__,
            "--child",
            "--preset",
            args.preset,
            "--rows",
            str(args.rows),
            "--seq-len",
            str(args.seq_len),
        ]
        + (["--smoke"] if args.smoke else [])
        + (["--scan-layers"] if args.scan_layers else [])
        + ["--remat", args.remat, "--part", args.part]
    )
    depths = [int(n) for n in args.layers.split(",") if n]
    plan = [("first", cmd, env), ("cached", cmd, env)] + [
        (
            f"first_{n}_layers",
            cmd + ["--n-layer", str(n)],
            dict(os.environ, JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="xla_cache_")),
        )
        for n in depths
    ]
    runs = []
    for name, run_cmd, run_env in plan:
        proc = subprocess.run(run_cmd, env=run_env, capture_output=True, text=True)
        if proc.returncode:
            runs.append(dict(run=name, error=proc.stderr[-2000:]))
            break
        runs.append(dict(run=name, **json.loads(proc.stdout.strip().splitlines()[-1])))
        print(runs[-1], flush=True)
    harness.write_json(
        new.path,
        dict(
            **new.header,
            preset=args.preset,
            scan_layers=args.scan_layers,
            remat=args.remat,
            part=args.part,
            rows=args.rows,
            seq_len=args.seq_len,
            runs=runs,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
