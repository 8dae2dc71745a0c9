"""The dB/dC channel-sum step of the scan backward, alone: ways to add the gradient kernel's
per-channel-block partial rows (b, d_blocks, t, 2n) float32 and join them with d(dt) into the
x_proj output's cotangent (b, t, dt_rank + 2n), as the 1.4b step does (the profiler named it
input_concatenate_fusion: 17.9 ms a step, 0.37 ms a layer, session 2).

    PYTHONPATH=. python3 benchmarks/bench_dbc_sum.py [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# The 1.4b layer: 4096 channels in blocks of 32, 2 x d_state 16, dt_rank 128. A CPU run (a smoke
# check of the script) takes a small shape.
ON_GPU = jax.default_backend() == "gpu"
B, ND, T, N2, R = (8, 128, 2048, 32, 128) if ON_GPU else (1, 16, 64, 32, 8)


def post(dbc, ddt):
    n = N2 // 2
    return jnp.concatenate([ddt, dbc[..., n:].astype(ddt.dtype), dbc[..., :n].astype(ddt.dtype)],
                           axis=-1)


def fused(parts, ddt):
    return post(parts.sum(1), ddt)


def barrier(parts, ddt):
    return post(jax.lax.optimization_barrier(parts.sum(1)), ddt)


def matvec(parts, ddt):
    ones = jnp.ones((ND,), jnp.float32)
    s = jnp.einsum("bkx,k->bx", parts.reshape(B, ND, T * N2), ones,
                   precision=jax.lax.Precision.HIGHEST).reshape(B, T, N2)
    return post(s, ddt)


def two_level(parts, ddt):
    s = parts.reshape(B, 16, ND // 16, T, N2).sum(2)
    return post(jax.lax.optimization_barrier(s).sum(1), ddt)


VARIANTS = dict(fused=fused, barrier=barrier, matvec=matvec, two_level=two_level)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    sets = [(jax.random.normal(keys[2 * i], (B, ND, T, N2), jnp.float32),
             jax.random.normal(keys[2 * i + 1], (B, T, R), jnp.bfloat16)) for i in range(2)]
    want = np.asarray(sets[0][0], np.float64).sum(1)
    rows = []
    for name, fn in VARIANTS.items():
        f = jax.jit(fn)
        got = np.asarray(f(*sets[0])[..., R:], np.float64)
        n = N2 // 2
        err = np.abs(np.concatenate([got[..., n:], got[..., :n]], -1) - want).max()
        for _ in range(3):
            f(*sets[0]).block_until_ready()
        times = []
        for g in range(7):
            t0 = time.perf_counter()
            for i in range(10):
                out = f(*sets[i % 2])
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / 10 * 1e3)
        rows.append(dict(variant=name, ms=statistics.median(times), range=[min(times), max(times)],
                         max_abs_err_vs_float64=float(err)))
        print(f"{name:10s} {rows[-1]['ms']:.3f} ms  err {err:.2e}", flush=True)
    dev = jax.devices()[0]
    result = dict(device=dev.device_kind, jax=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  shape=dict(batch=B, d_blocks=ND, length=T, two_n=N2, dt_rank=R),
                  note="bf16 output; error is of the bf16-rounded sums", rows=rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
