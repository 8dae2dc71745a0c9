"""The Pallas causal conv's two kernel designs, A/B: the time walk against the tile-parallel
kernels (pallas_kernels/causal_conv1d/DESIGN.md, "Tile kernels"), and the walking backward's
blocks of steps (bwd_unroll; DESIGN.md, "Loads ahead").

    PYTHONPATH=. python3 benchmarks/bench_conv.py [--out DIR] [--smoke]

At (8, 2048, 4352) (mamba2-1.3b's xBC: d_inner 4096 + 2 x 128 of B and C) and (8, 2048, 4096)
(mamba-1.4b's d_inner), width 4, silu, bias, bf16, 64 random-length segments a row, each
variant's forward and forward+backward (jax.vjp, random bf16 cotangent): harness.time_calls
(median of 7 groups of 5 calls, inputs rotated past the L2), plus the per-kernel device time of
the forward+backward from a profiler trace (the forward, the backward and XLA's reduction of the
weight-gradient partials apart). "walk" and "tile_walk" run the walking backward one step a loop
iteration (bwd_unroll=1), "tile_walk_u2", "_u4" and "_u8" in blocks of 2, 4 and 8 steps,
"tile_walk_u2_pipe" and "_u4_pipe" in blocks of 2 and 4 software-pipelined (bwd_pipeline: the
loop carries the next block's loads, issued before this block's arithmetic), all of whose
gradients on input set 0 must be bit-identical to tile_walk's (`bit_identical_to_u1`, on a GPU;
through the interpreter on CPU, XLA fuses a * b + c into FMAs differently for different loop
bodies, an ulp apart in places). At the mamba2-1.3b shape also the output as Mamba2's x, B and
C (GROUPS), as the model calls it: "walk_groups" splits after the walking kernel (copies),
"tile_groups" has the tile kernels write the three arrays, "tile_walk_groups" (and
"tile_walk_u2_groups" ...) the tile forward and the walking backward (which reads the groups'
cotangents as they are: every boundary is a multiple of its 128 channels a program); and
"..._groups_linked" (walk, tile, tile_walk): the same with rows 1.. linked to the row before
(their first run continues it: the conv reads the previous row's last w - 1 inputs as its
prefix, DESIGN.md "Inputs before t = 0"), which should cost the unlinked time plus O(b w e)
(their max_rel_diff differs from the first variant's only at the linked rows' first w - 1
outputs). Writes --out/conv_<device>.json. `bound_ms` is the DRAM time
of the unique bytes (forward: read x, write out; backward: read x and g, write dx) at 3.35 TB/s
(an H100 SXM's peak). On CPU the kernels run through the Pallas interpreter; --smoke: tiny
shapes, one call each. About 85 s on one H100 before the bwd_unroll variants (27 variants
now, 16 then), most of it compiling.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jax_packmamba.ops import positions_from_segment_ids
from pallas_kernels.causal_conv1d import TileConfig, causal_conv1d_pallas

SHAPES = [(8, 2048, 4352), (8, 2048, 4096)]  # (batch, length, channels), width 4
# Three 128-channel blocks, so that the smoke runs the tile kernels' groups in-kernel too.
SMOKE_SHAPES = [(1, 40, 264)]
# Channel groups timed at a shape besides the plain output: Mamba2's x, B and C out of xBC
# (mamba2-1.3b: d_inner 4096, one group of d_state 128). "walk" splits after its kernel, as the
# model does with it; "tile" writes the three arrays.
GROUPS = {(8, 2048, 4352): (4096, 128, 128), (1, 40, 264): (128, 128, 8)}
SEGMENTS = 64  # a row
WIDTH = 4
HBM_BYTES_PER_S = 3.35e12
# (name, kernel, tile config, the walking backward's bwd_unroll and bwd_pipeline); TileConfig()
# is the default the "tile" impl runs. The tile tilings timed before (DESIGN.md, "Measured") lost
# and are gone.
BASE_VARIANTS = [
    ("walk", "walk", None, 1, False),
    ("tile", "tile", TileConfig(), None, None),
    ("tile_walk", "tile_walk", TileConfig(), 1, False),
]
UNROLLED_VARIANTS = [(f"tile_walk_u{u}", "tile_walk", TileConfig(), u, False) for u in (2, 4, 8)]
UNROLLED_VARIANTS += [(f"tile_walk_u{u}_pipe", "tile_walk", TileConfig(), u, True) for u in (2, 4)]
VARIANTS = BASE_VARIANTS + UNROLLED_VARIANTS
# (variant, linked) at a GROUPS shape: every variant unlinked, the base ones linked too.
GROUP_VARIANTS = [(v, False) for v in VARIANTS] + [(v, True) for v in BASE_VARIANTS]


def conv_set(i, shape, groups=None):
    """(x, weight, bias, positions, cotangent) of input set i; with groups the cotangent is
    a tuple, one per channel group."""
    batch, length, channels = shape
    rng = np.random.default_rng(i)
    cuts = [
        np.sort(rng.choice(np.arange(1, length), min(SEGMENTS - 1, length - 1), replace=False))
        for _ in range(batch)
    ]
    seg = np.stack([np.searchsorted(c, np.arange(length), side="right") for c in cuts])
    k = jax.random.split(jax.random.key(i), 4)
    bf = jnp.bfloat16
    ct = jax.random.normal(k[3], shape, bf)
    if groups is not None:
        ct = tuple(jnp.split(ct, np.cumsum(groups)[:-1].tolist(), axis=-1))
    return (
        jax.random.normal(k[0], shape, bf),
        (0.5 * jax.random.normal(k[1], (channels, WIDTH))).astype(bf),
        jax.random.normal(k[2], (channels,), bf),
        positions_from_segment_ids(jnp.asarray(seg, jnp.int32)),
        ct,
    )


def fns(kernel_name, tile, bwd_unroll, bwd_pipeline, interpret, groups=None, linked=False):
    """(forward, forward+backward) of one variant; both take conv_set's tuple. linked: rows
    1.. continue the row before, as causal_conv1d(continues=) runs them."""
    kw = dict(
        activation="silu",
        interpret=interpret,
        kernel_name=kernel_name,
        groups=groups,
        bwd_unroll=bwd_unroll,
        bwd_pipeline=bwd_pipeline,
    )
    if tile is not None:
        kw["tile"] = tile

    def conv(x, w, b, pos):
        if not linked:
            return causal_conv1d_pallas(x, w, b, pos, **kw)
        batch, length, channels = x.shape
        k = w.shape[1] - 1
        link = jnp.broadcast_to((jnp.arange(batch) > 0)[:, None], (batch, k))
        first_run = link[:, :1] & (pos == jnp.arange(length))
        pos = pos + jnp.where(first_run, k, 0)
        prefix = jnp.zeros((batch, k, channels), x.dtype)
        return causal_conv1d_pallas(x, w, b, pos, prefix=prefix, linked=link, **kw)

    def fwd(x, w, b, pos, ct):
        return conv(x, w, b, pos)

    def fwdbwd(x, w, b, pos, ct):
        # The output is returned too: without a use XLA drops the forward kernel (the backward
        # recomputes from x), and "fwd+bwd" would time the backward alone.
        out, vjp = jax.vjp(lambda *a: conv(*a, pos), x, w, b)
        return out, vjp(ct)

    return jax.jit(fwd), jax.jit(fwdbwd)


def ms(t: harness.Timing) -> dict:
    return dict(median_ms=1e3 * t.median_s, min_ms=1e3 * t.min_s, max_ms=1e3 * t.max_s)


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |b| over the leaves (tuples of channel groups joined first)."""
    join = lambda v: jnp.concatenate(v, -1) if isinstance(v, tuple) else v  # noqa: E731
    a, b = join(a).astype(jnp.float32), join(b).astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def measure(label, fwd, fwdbwd, sets, timing, reference, u1=None) -> dict:
    """Timings of one variant, its per-kernel trace on a GPU, and its output and gradients on
    set 0 against the first variant's (`reference`, filled by the first call). u1: for the
    tile_walk variants, the gradients of the one at bwd_unroll=1 (filled by it), which every
    other's must equal bit for bit. A variant that fails records its error and the run goes on."""
    try:
        out, grads = fwd(*sets[0]), fwdbwd(*sets[0])[1]
        if not reference:
            reference.update(out=out, grads=grads)
        r = {}
        if u1 is not None:
            if not u1:
                u1.update(grads=grads)
            r["bit_identical_to_u1"] = all(
                np.array_equal(np.asarray(g), np.asarray(g1))
                for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(u1["grads"]), strict=True)
            )
        r.update(
            max_rel_diff=dict(
                out=max_rel_diff(out, reference["out"]),
                **{
                    name: max_rel_diff(g, g_ref)
                    for name, g, g_ref in zip(("dx", "dweight", "dbias"), grads, reference["grads"])
                },
            ),
            fwd_ms=ms(harness.time_calls(fwd, sets, **timing)),
            fwdbwd_ms=ms(harness.time_calls(fwdbwd, sets, **timing)),
        )
        if jax.default_backend() == "gpu":
            with tempfile.TemporaryDirectory() as d:
                harness.trace(fwdbwd, sets, 10, d)
                events, _ = harness.device_events(d)
            r["fwdbwd_kernels"] = harness.kernel_times(events, 10, ("causal_conv1d",))
    except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
        print(f"conv {label}: FAILED {type(e).__name__}: {e}", flush=True)
        return dict(error=f"{type(e).__name__}: {e}")
    print(
        f"conv {label}: fwd {r['fwd_ms']['median_ms']:.3f} ms, fwd+bwd "
        f"{r['fwdbwd_ms']['median_ms']:.3f} ms; max rel diff to the first variant "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["max_rel_diff"].items())
        + (f"; bit-identical to U=1: {r['bit_identical_to_u1']}" if u1 is not None else ""),
        flush=True,
    )
    if "fwdbwd_kernels" in r:
        per = r["fwdbwd_kernels"]["kernels"]
        print("    " + ", ".join(f"{k} {v['us_per_call']:.1f} us" for k, v in per.items()))
    return r


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    names = [v[0] for v in VARIANTS]
    parser.add_argument(
        "--variants",
        default=",".join(names),
        help=f"comma-separated subset of {','.join(names)} (default: all; a base variant "
        "brings its linked groups run)",
    )
    args = parser.parse_args(argv)
    chosen = args.variants.split(",")
    if any(v not in names for v in chosen):
        parser.error(f"--variants: choose from {','.join(names)}, got {args.variants!r}")
    variants = [v for v in VARIANTS if v[0] in chosen]
    group_variants = [(v, linked) for v, linked in GROUP_VARIANTS if v[0] in chosen]
    new = harness.new_result("conv", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke)
    backend = new.info.backend
    interpret = backend != "gpu"
    data = dict(
        **new.header,
        variants={
            n: dict(kernel=k, tile=t and dataclasses.asdict(t), bwd_unroll=u, bwd_pipeline=p)
            for n, k, t, u, p in VARIANTS
        },
        conv=[],
    )
    timing = dict(groups=1, per_group=1) if args.smoke else dict(groups=7, per_group=5)
    for shape in SMOKE_SHAPES if args.smoke else SHAPES:
        first = conv_set(0, shape)
        n = harness.rotation_count(harness.tree_bytes(first), backend=backend)
        sets = [first] + [conv_set(i, shape) for i in range(1, n)]
        elem_bytes = 2 * int(np.prod(shape))  # one bf16 (b, t, e) array
        rec = dict(
            shape=shape,
            width=WIDTH,
            input_sets=n,
            bound_ms=dict(
                fwd=1e3 * 2 * elem_bytes / HBM_BYTES_PER_S,
                bwd=1e3 * 3 * elem_bytes / HBM_BYTES_PER_S,
            ),
        )
        reference, u1 = {}, {}
        for name, kernel_name, tile, bwd_unroll, bwd_pipeline in variants:
            rec[name] = measure(
                f"{shape} {name}",
                *fns(kernel_name, tile, bwd_unroll, bwd_pipeline, interpret),
                sets,
                timing,
                reference,
                u1 if kernel_name == "tile_walk" else None,
            )
            harness.write_json(new.path, {**data, "conv": [*data["conv"], rec]})
        groups = GROUPS.get(shape)
        group_sets = [conv_set(i, shape, groups) for i in range(n)] if groups else []
        u1_groups = {}
        for (name, kernel_name, tile, bwd_unroll, bwd_pipeline), linked in (
            group_variants if groups else []
        ):
            rec[f"{name}_groups" + ("_linked" if linked else "")] = dict(
                groups=groups,
                **measure(
                    f"{shape} {name}, groups {groups}" + (", linked" if linked else ""),
                    *fns(kernel_name, tile, bwd_unroll, bwd_pipeline, interpret, groups, linked),
                    group_sets,
                    timing,
                    reference,
                    u1_groups if kernel_name == "tile_walk" and not linked else None,
                ),
            )
            harness.write_json(new.path, {**data, "conv": [*data["conv"], rec]})
        del group_sets
        print(
            f"conv {shape}: DRAM bound fwd {rec['bound_ms']['fwd']:.3f} ms, bwd "
            f"{rec['bound_ms']['bwd']:.3f} ms",
            flush=True,
        )
        data["conv"].append(rec)
        harness.write_json(new.path, data)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
