"""Segment-aware attention, forward + backward: the reference against each GPU path.

A packed batch of 8 rows x 2048 tokens, 64 segments a row (random lengths summing to 2048),
Bamba-9B-like heads (32 query heads, 8 key/value heads, head dim 128), bfloat16. Each impl of
`jp.attention` is first checked against the reference (relative error of out, dq, dk, dv), then
timed fwd+bwd (jax.vjp with a random cotangent) on the harness; "speedup" is the reference's
median over the impl's. On a GPU the impls are reference, cudnn, cudnn_packed (max_segments =
the row's segment count) and jax's own Pallas flash attention with segment ids
(jax.experimental.pallas.ops.gpu.attention.mha, k and v repeated to every head: no GQA there),
as a yardstick for a kernel of our own; off a GPU the reference alone.

    PYTHONPATH=. python3 benchmarks/bench_attention.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_packmamba as jp
from benchmarks import harness

SHAPE = dict(batch=8, length=2048, segments=64, heads=32, kv_heads=8, head_dim=128)
SMOKE = dict(batch=2, length=64, segments=4, heads=4, kv_heads=2, head_dim=16)


def packed_ids(batch, length, segments, seed=0):
    """(b, t) ids 1..segments per row, the cut points drawn at random (every segment >= 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), segments - 1, replace=False))
        rows.append(np.repeat(np.arange(1, segments + 1), np.diff(np.r_[0, cuts, length])))
    return jnp.asarray(np.stack(rows), jnp.int32)


def pallas_mha(q, k, v, ids):
    from jax.experimental.pallas.ops.gpu.attention import mha

    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(a, group, axis=2) for a in (k, v))
    return mha(q, k, v, ids, sm_scale=float(q.shape[-1]) ** -0.5, causal=True)


def fwd_bwd(attend):
    def step(q, k, v, g, ids):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, ids), q, k, v)
        return (out, *vjp(g))

    return jax.jit(step)


def main(argv=None) -> int:
    args = harness.argument_parser(__doc__).parse_args(argv)
    shape = SMOKE if args.smoke else SHAPE
    argv = sys.argv[1:] if argv is None else argv
    run = harness.new_result(
        "attention", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke
    )
    ids = packed_ids(shape["batch"], shape["length"], shape["segments"])
    keys = jax.random.split(jax.random.key(0), 4)
    b, t, h, kv, d = (shape[n] for n in ("batch", "length", "heads", "kv_heads", "head_dim"))
    q, k, v, g = (
        jax.random.normal(key, s, jnp.bfloat16)
        for key, s in zip(keys, [(b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)])
    )
    impls = {
        name: (
            lambda q, k, v, ids, name=name: jp.attention(
                q, k, v, segment_ids=ids, impl=name, max_segments=shape["segments"]
            )
        )
        for name in ("reference", "cudnn", "cudnn_packed")
    }
    impls["jax_pallas_mha"] = pallas_mha
    if run.info.backend != "gpu":
        impls = {"reference": impls["reference"]}
    result = dict(run.header, shape=shape, dtype="bfloat16", timings=[], errors=[])
    inputs = [(q, k, v, g, ids)]
    want = None
    for name, attend in impls.items():
        fn = fwd_bwd(attend)
        try:
            got = jax.block_until_ready(fn(*inputs[0]))
        except Exception as e:  # noqa: BLE001 - one path failing must not hide the others
            result["errors"].append(dict(impl=name, error=f"{type(e).__name__}: {e}"[:2000]))
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        want = got if want is None else want
        rel = {
            n: float(
                jnp.linalg.norm((a - w).astype(jnp.float32))
                / jnp.linalg.norm(w.astype(jnp.float32))
            )
            for n, a, w in zip(("out", "dq", "dk", "dv"), got, want)
        }
        timing = harness.time_calls(fn, inputs, groups=3 if args.smoke else 7)
        row = dict(
            impl=name,
            fwdbwd_ms=timing.median_s * 1e3,
            min_ms=timing.min_s * 1e3,
            max_ms=timing.max_s * 1e3,
            rel_err_vs_reference=rel,
        )
        baseline = result["timings"][0]["fwdbwd_ms"] if result["timings"] else row["fwdbwd_ms"]
        row["speedup"] = baseline / row["fwdbwd_ms"]
        result["timings"].append(row)
        print(f"{name:>15}: {row['fwdbwd_ms']:9.3f} ms  x{row['speedup']:.2f}  rel err {rel}")
        harness.write_json(run.path, result)
    harness.write_json(run.path, result)
    print(f"wrote {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
