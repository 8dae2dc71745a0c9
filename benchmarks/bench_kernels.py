"""The causal conv and decode-step kernels on GPU (bench_scan.py and bench_ssd.py time the scans).

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--out DIR] [--smoke]

conv: forward and forward+backward of the Pallas causal conv (silu, bias, width 4, bf16, 64
random-length segments a row) at (8, 2048, 4096) and (8, 2048, 5120). decode: one Mamba1 mixer
core (mixer_core_pallas) at mamba-2.8b's widths, batch 1, 32 and 128, bf16. harness.time_calls
(median of 7 groups of 5 calls, inputs rotated past the L2); writes --out/kernels_<device>.json.
Only public entry points are used, so the same script times an older tree. On CPU the kernels
run through the Pallas interpreter; --smoke: tiny shapes, one call each.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jax_packmamba.ops import positions_from_segment_ids
from pallas_kernels.causal_conv1d import causal_conv1d_pallas
from pallas_kernels.decode import mixer_core_pallas

CONV_SHAPES = [(8, 2048, 4096), (8, 2048, 5120)]  # (batch, length, channels), width 4
DECODE = dict(d_inner=5120, d_state=16, dt_rank=160, d_conv=4, batches=(1, 32, 128))
SMOKE_CONV, SMOKE_DECODE = (
    [(1, 64, 96)],
    dict(d_inner=64, d_state=16, dt_rank=8, d_conv=4, batches=(2,)),
)


def conv_set(i, shape):
    batch, length, channels = shape
    rng = np.random.default_rng(i)
    cuts = [
        np.sort(rng.choice(np.arange(1, length), min(63, length - 1), replace=False))
        for _ in range(batch)
    ]
    seg = np.stack([np.searchsorted(c, np.arange(length), side="right") for c in cuts])
    bf = jnp.bfloat16
    return (
        jnp.asarray(rng.standard_normal(shape), bf),
        jnp.asarray(0.5 * rng.standard_normal((channels, 4)), bf),
        jnp.asarray(rng.standard_normal(channels), bf),
        positions_from_segment_ids(jnp.asarray(seg, jnp.int32)),
        jnp.asarray(rng.standard_normal(shape), bf),
    )


def decode_set(i, batch, d_inner, d_state, dt_rank, d_conv):
    rng, e, n, r = np.random.default_rng(i), d_inner, d_state, dt_rank
    shapes = [
        ((batch, 2 * e), 1.0),
        ((batch, d_conv - 1, e), 1.0),
        ((batch, e, n), 1.0),
        ((e, d_conv), 0.5),
        ((e,), 0.5),
        ((e, r + 2 * n), e**-0.5),
        ((r, e), r**-0.5),
        ((e,), 0.5),
        ((e, n), 0.5),
        ((e,), 1.0),
    ]
    xs = [scale * rng.standard_normal(shape) for shape, scale in shapes]
    # The states and the float32 parameters (dt_bias, A_log, D) stay float32.
    return tuple(
        jnp.asarray(x, jnp.float32 if k in (2, 7, 8, 9) else jnp.bfloat16) for k, x in enumerate(xs)
    )


def timed(fn, make, backend, smoke):
    first = make(0)
    n = harness.rotation_count(harness.tree_bytes(first), backend=backend)
    sets = [first] + [make(i) for i in range(1, n)]
    t = harness.time_calls(jax.jit(fn), sets, groups=1 if smoke else 7, per_group=1 if smoke else 5)
    return dict(
        median_ms=1e3 * t.median_s, min_ms=1e3 * t.min_s, max_ms=1e3 * t.max_s, input_sets=n
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = harness.argument_parser(__doc__).parse_args(argv)
    new = harness.new_result(
        "kernels", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke
    )
    backend, interpret = new.info.backend, new.info.backend != "gpu"
    data = dict(**new.header, conv=[], decode=[])
    for shape in SMOKE_CONV if args.smoke else CONV_SHAPES:

        def conv(x, w, b, pos):
            return causal_conv1d_pallas(x, w, b, pos, activation="silu", interpret=interpret)

        def fwdbwd(x, w, b, pos, ct):
            return jax.vjp(lambda *a: conv(*a, pos), x, w, b)[1](ct)

        def make(i, shape=shape):
            return conv_set(i, shape)

        rec = dict(
            shape=shape,
            fwd_ms=timed(lambda *a: conv(*a[:4]), make, backend, args.smoke),
            fwdbwd_ms=timed(fwdbwd, make, backend, args.smoke),
        )
        data["conv"].append(rec)
        print(
            f"conv {shape}: fwd {rec['fwd_ms']['median_ms']:.3f} ms, fwd+bwd "
            f"{rec['fwdbwd_ms']['median_ms']:.3f} ms",
            flush=True,
        )
        harness.write_json(new.path, data)
    dims = dict(SMOKE_DECODE if args.smoke else DECODE)
    for batch in dims.pop("batches"):

        def make(i, batch=batch):
            return decode_set(i, batch, **dims)

        rec = dict(
            batch=batch,
            **dims,
            step_ms=timed(
                lambda *a: mixer_core_pallas(*a, interpret=interpret), make, backend, args.smoke
            ),
        )
        data["decode"].append(rec)
        print(f"decode mixer core, batch {batch}: {rec['step_ms']['median_ms']:.4f} ms", flush=True)
        harness.write_json(new.path, data)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
