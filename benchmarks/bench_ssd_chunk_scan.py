"""The SSD chunk-scan forward kernel alone: Triton (kernel.chunk_scan) against Mosaic GPU
(chunk_scan_mgpu.chunk_scan), in one process, on the step-speed shapes (issue 25).

    PYTHONPATH=. python3 benchmarks/bench_ssd_chunk_scan.py [--out DIR] [--smoke]
        [--shapes 0,1,2,3] [--once]

Per shape (batch, length, heads, headdim, d_state), one group, bf16, chunk 256, D and z on,
64 random-length segments a row: the kernels' inputs (dt', cumulative decays, C B^T, h_in) are
made once by the Triton kernels before them; each chunk scan is compiled (lower + compile, timed
apart), checked against the other (max |diff| / max |y|), then timed by harness.time_calls
(warm-up, block_until_ready, median of 7 groups of 5 calls, rotating between input sets that
together exceed twice the L2). io_gb_s: the bytes of the kernel's inputs and outputs over its
median time, what it would move reading and writing each array once. Writes
ssd_chunk_scan_mosaic_<device>.json. On CPU (--smoke) both run in their interpreters. --once:
one set, two calls of each kernel and no file, for a profiler:
    ncu -k regex:ssd_chunk_scan --launch-count 4 --section LaunchStats --section Occupancy
        --section SpeedOfLight python3 benchmarks/bench_ssd_chunk_scan.py --shapes 0 --once
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.bench_ssd import CHUNK, NUM_SEGMENTS, input_set
from pallas_kernels.ssd import chunk_scan_mgpu, kernel
from pallas_kernels.ssd import vjp as ssd_vjp

SHAPES = [
    (8, 2048, 64, 64, 128),
    (1, 16384, 64, 64, 128),
    (4, 2048, 80, 64, 128),
    (32, 2048, 64, 64, 128),
]
SMOKE_SHAPE, SMOKE_CHUNK = (1, 200, 2, 64, 64), 128


def scan_inputs(seed, shape, chunk, interpret):
    """(plan, the chunk scan's inputs) for one random input set."""
    b, t, h, p, n = shape
    x, dt, A, B, C, D, z, bias, seg, _ = input_set(seed, shape, "seg64")
    plan = ssd_vjp.make_plan(
        x,
        B,
        D,
        dt_softplus=True,
        chunk_size=chunk,
        has_init=False,
        return_states=False,
        interpret=interpret,
        config=None,
    )
    st = plan.st

    @jax.jit
    def prepare(x, dt, A, B, C, seg):
        seg_lo, _ = ssd_vjp.segment_bounds(seg, st.chunk, st.padded)
        cs, dtp = ssd_vjp._cumsum(plan, interpret, dict(dt=dt, A=A, bias=bias), seg_lo)
        launch = ssd_vjp._launch(plan, interpret)
        cb = kernel.chunk_cb(dict(C=C, B=B), st=st, **launch)
        S = kernel.chunk_states(
            dict(x=x, B=B, cs=cs, dtp=dtp, seg_lo=seg_lo), mode="fwd", st=st, **launch
        )
        S = S.reshape(b, st.n_chunks, h, p * n)
        h_in, _ = ssd_vjp._pass_states(
            plan, interpret, S, ssd_vjp.chunk_decay(cs, seg_lo, st=st), None
        )
        return dict(
            x=x,
            z=z,
            C=C,
            cb=cb,
            cs=cs,
            dtp=dtp,
            h_in=h_in.reshape(b, -1, h, p, n),
            D=D,
            seg_lo=seg_lo,
        )

    return plan, prepare(x, dt, A, B, C, seg)


def main(argv=None) -> int:
    parser = harness.argument_parser(__doc__)
    parser.add_argument(
        "--shapes", default=",".join(map(str, range(len(SHAPES)))), help="indices into SHAPES"
    )
    parser.add_argument("--once", action="store_true", help="one call each (for a profiler)")
    args = parser.parse_args(argv)
    res = harness.new_result(
        "ssd_chunk_scan_mosaic",
        script=__file__,
        argv=sys.argv[1:],
        out_dir=args.out,
        smoke=args.smoke,
    )
    interpret = res.info.backend == "cpu"
    shapes, chunk = (
        ([SMOKE_SHAPE], SMOKE_CHUNK)
        if args.smoke
        else ([SHAPES[int(i)] for i in args.shapes.split(",")], CHUNK)
    )
    quick = interpret or args.once
    data = dict(
        res.header, chunk=chunk, segments_per_row=NUM_SEGMENTS, dtype="bfloat16", results=[]
    )
    for shape in shapes:
        plan, first = scan_inputs(0, shape, chunk, interpret)
        n_sets = (
            1
            if args.once
            else harness.rotation_count(harness.tree_bytes(first), backend=res.info.backend)
        )
        sets = [(first,)] + [
            (scan_inputs(s, shape, chunk, interpret)[1],) for s in range(1, n_sets)
        ]
        fns = dict(
            triton=functools.partial(kernel.chunk_scan, **ssd_vjp._launch(plan, interpret)),
            mosaic=functools.partial(chunk_scan_mgpu.chunk_scan, interpret=interpret),
        )
        row = dict(shape=dict(zip(("batch", "length", "heads", "headdim", "d_state"), shape)))
        outs = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            try:
                call = (
                    jax.jit(functools.partial(fn, st=plan.st, y_dtype=jnp.bfloat16))
                    .lower(first)
                    .compile()
                )
            except Exception as e:  # a variant that does not compile is a result, not the end
                row[name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
                print(name, row[name]["error"][:500], flush=True)
                continue
            compile_s = time.perf_counter() - t0
            out = call(first)
            outs[name] = np.asarray(out[0], np.float32)
            timing = harness.time_calls(
                call,
                sets,
                warmup=0 if quick else 3,
                groups=1 if quick else 7,
                per_group=1 if quick else 5,
            )
            io = harness.tree_bytes(first) + harness.tree_bytes(out)
            row[name] = dict(
                median_ms=timing.median_s * 1e3,
                min_ms=timing.min_s * 1e3,
                max_ms=timing.max_s * 1e3,
                compile_s=compile_s,
                io_gb_s=io / timing.median_s / 1e9,
            )
        for name in outs.keys() - {"triton"}:
            row[name]["over_triton"] = row[name]["median_ms"] / row["triton"]["median_ms"]
            row[name]["max_abs_diff_over_max_abs"] = float(
                np.abs(outs[name] - outs["triton"]).max() / np.abs(outs["triton"]).max()
            )
        data["results"].append(row)
        if not args.once:
            harness.write_json(res.path, data)
        print(
            shape,
            {
                k: {m: round(x, 4) for m, x in v.items() if m != "error"}
                for k, v in row.items()
                if k != "shape"
            },
            flush=True,
        )
    print(f"wrote {res.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
