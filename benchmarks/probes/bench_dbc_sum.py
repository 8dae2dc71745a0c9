"""The dB/dC channel-sum step of the scan backward, alone: ways to add the gradient kernel's
per-channel-block partial rows (b, d_blocks, t, 2n) float32 and join them with d(dt) into the
x_proj output's cotangent (b, t, dt_rank + 2n), as the 1.4b step does (the profiler named it
input_concatenate_fusion: 17.9 ms a step, 0.37 ms a layer, session 2).

    PYTHONPATH=. python3 benchmarks/probes/bench_dbc_sum.py [--out DIR]
    PYTHONPATH=. python3 benchmarks/probes/bench_dbc_sum.py --smoke --out DIR   # CPU check

The 1.4b layer's shape on a GPU: batch 8, 4096 channels in 128 blocks of 32, length 2048, 2 x
d_state 16, dt_rank 128; on CPU and with --smoke a small one (1, 16, 64, 32, 8). Each variant is
checked against a float64 sum and timed with harness.time_calls: 3 warm-up calls, median of 7
groups of 10 back-to-back calls, rotating between input sets (harness.rotation_count).
Writes --out/dbc_sum_<slug>.json (default benchmarks/results/; --smoke: _smoke); a result there
from another commit moves to history/ first.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness

GPU_SHAPE = dict(batch=8, d_blocks=128, length=2048, two_n=32, dt_rank=128)
SMALL_SHAPE = dict(batch=1, d_blocks=16, length=64, two_n=32, dt_rank=8)


def post(dbc, ddt):
    n = dbc.shape[-1] // 2
    return jnp.concatenate([ddt, dbc[..., n:].astype(ddt.dtype), dbc[..., :n].astype(ddt.dtype)],
                           axis=-1)


def fused(parts, ddt):
    return post(parts.sum(1), ddt)


def barrier(parts, ddt):
    return post(jax.lax.optimization_barrier(parts.sum(1)), ddt)


def matvec(parts, ddt):
    b, nd, t, n2 = parts.shape
    ones = jnp.ones((nd,), jnp.float32)
    s = jnp.einsum("bkx,k->bx", parts.reshape(b, nd, t * n2), ones,
                   precision=jax.lax.Precision.HIGHEST).reshape(b, t, n2)
    return post(s, ddt)


def two_level(parts, ddt):
    b, nd, t, n2 = parts.shape
    s = parts.reshape(b, 16, nd // 16, t, n2).sum(2)
    return post(jax.lax.optimization_barrier(s).sum(1), ddt)


VARIANTS = dict(fused=fused, barrier=barrier, matvec=matvec, two_level=two_level)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = harness.argument_parser(__doc__)
    args = ap.parse_args(argv)
    new = harness.new_result("dbc_sum", script=__file__, argv=argv, out_dir=args.out,
                             smoke=args.smoke)
    info = new.info
    shape = GPU_SHAPE if info.backend == "gpu" and not args.smoke else SMALL_SHAPE
    b, nd, t, n2, r = shape.values()

    def input_set(i):
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), i))
        return (jax.random.normal(k1, (b, nd, t, n2), jnp.float32),
                jax.random.normal(k2, (b, t, r), jnp.bfloat16))

    first = input_set(0)
    sets = [first] + [input_set(i) for i in range(
        1, harness.rotation_count(harness.tree_bytes(first), backend=info.backend))]
    want = np.asarray(sets[0][0], np.float64).sum(1)
    n = n2 // 2
    rows = []
    for name, fn in VARIANTS.items():
        f = jax.jit(fn)
        got = np.asarray(f(*sets[0])[..., r:], np.float64)
        err = np.abs(np.concatenate([got[..., n:], got[..., :n]], -1) - want).max()
        timing = harness.time_calls(f, sets, warmup=3, groups=7, per_group=10)
        rows.append(dict(variant=name, ms=1e3 * timing.median_s,
                         range=[1e3 * timing.min_s, 1e3 * timing.max_s],
                         max_abs_err_vs_float64=float(err)))
        print(f"{name:10s} {rows[-1]['ms']:.3f} ms  err {err:.2e}", flush=True)
    result = dict(**new.header, shape=shape, input_sets=len(sets),
                  note="bf16 output; error is of the bf16-rounded sums", rows=rows)
    harness.write_json(new.path, result)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
