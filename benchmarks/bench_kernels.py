"""The causal conv, decode-step and norm kernels on GPU (bench_scan.py and bench_ssd.py time
the scans).

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--out DIR] [--smoke] [--sections S,...]

conv: forward and forward+backward of the Pallas causal conv (silu, bias, width 4, bf16, 64
random-length segments a row) at (8, 2048, 4096) and (8, 2048, 5120). decode: one Mamba1 mixer
core (mixer_core_pallas) at mamba-2.8b's widths, batch 1, 32 and 128, bf16. norms: forward and
forward+backward of the row norms (jax_packmamba.ops.rms_norm) with impl "reference" (XLA)
and "pallas", at mamba2-1.3b's 8 x 2048 tokens: "add" (bf16 hidden + float32 residual, bf16
normed; mamba_ssm's fused add + RMSNorm), "stream" (the Block's call: float32 stream, no
residual, bf16 normed) at d_model 2048, and "gated" (bf16 x, z) at d_inner 4096, one group.
--sections picks among conv, decode, norms (default all); --norm-sweep: instead, the norm
kernels alone under each tiling and backward prefetch setting of NORM_SWEEP
(pallas_kernels/norm/vjp.py's constants), into --out/kernels_norm_sweep_<device>.json;
--decode-sweep: instead, a decode step's pieces at mamba-2.8b's widths as the step runs them,
LAYERS copies (each with its own weights and states) in one jitted call, so that the weights
come from DRAM and no host dispatch is timed: mixer_pallas (in_proj to out_proj's input) with
in_proj unfused and fused under MIXER_SWEEP's tilings, and the mixer core under each
DECODE_SWEEP tiling, into --out/kernels_decode_sweep_<device>.json (microseconds a layer).
harness.time_calls (median of 7 groups of 5 calls, inputs rotated past the L2); writes
--out/kernels_<device>.json.
Only public entry points are used, so the same script times an older tree. On CPU the kernels
run through the Pallas interpreter; --smoke: tiny shapes, one call each.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jax_packmamba.ops import add_rms_norm, gated_rms_norm, positions_from_segment_ids
from pallas_kernels.causal_conv1d import causal_conv1d_pallas
from pallas_kernels.decode import mixer_core_pallas, mixer_pallas, pick_config

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


NORMS = [("add", 16384, 2048), ("stream", 16384, 2048), ("gated", 16384, 4096)]
SMOKE_NORMS = [("add", 40, 96), ("stream", 40, 96), ("gated", 40, 96)]
SECTIONS = ("conv", "decode", "norms")
# (TILE_ELEMENTS, BWD_PROGRAMS_PER_SM, BWD_PREFETCH, ELEMENTS_PER_WARP) of
# pallas_kernels/norm/vjp.py (the last sets GATED_ELEMENTS_PER_WARP too). Swept on one H100
# (2026-12-07, results/kernels_norm_sweep_nvidia-h100.json and norm/DESIGN.md): the prefetch
# is on, and the gated norm runs at 256 a warp, the others at 512.
NORM_SWEEP = [
    (4096, 2, True, 512),
    (4096, 2, False, 512),
    (4096, 2, True, 256),
    (4096, 1, True, 256),
]


# The decode sweep: LAYERS copies a call, CARRIED_STEPS steps of them where states are carried.
LAYERS = 16
CARRIED_STEPS = 4
D_MODEL = 2560  # mamba-2.8b, in_proj's input width for the mixer sweep
DECODE_SWEEP_BATCHES = (1, 8, 32, 128)
# DecodeConfig fields over pick_config's choice (the first: pick_config itself).
DECODE_SWEEP = [
    {},
    dict(block_rows=32, num_warps_conv=4, num_warps_state=8),
    dict(block_rows=64, num_warps_conv=8, num_warps_state=8, block_state=16),
    dict(block_rows=32, conv_blocks_per_program=1, num_warps_state=8),
    dict(
        block_rows=64,
        conv_blocks_per_program=1,
        block_conv=32,
        num_warps_conv=8,
        block_state=16,
        num_warps_state=8,
    ),
    dict(conv_blocks_per_program=1),
    dict(conv_blocks_per_program=4),
    dict(block_conv=32),
    dict(block_conv=16),
    dict(block_conv=128, num_warps_conv=8),
    dict(block_state=16),
    dict(block_state=64, num_warps_state=8),
    dict(num_warps_conv=2, num_warps_state=2),
    dict(block_conv=32, block_state=16, num_warps_conv=2, num_warps_state=2),
    dict(x_proj_in_conv=False),  # the conv step alone, x_proj as XLA's (the default past 16 rows)
    dict(state_one_row=True),  # the state kernel one row a program, no dot
]


MIXER_BATCHES = (1, 4, 16)
# mixer_pallas: in_proj through the mixer core, XLA's in_proj first (fuse_in_proj False), then
# the fused kernel under DecodeConfig fields over pick_config's.
MIXER_SWEEP = [
    dict(fuse_in_proj=False),
    dict(fuse_in_proj=True),
    dict(fuse_in_proj=True, block_conv=32),
    dict(fuse_in_proj=True, num_stages_in_proj=4),
    dict(fuse_in_proj=True, block_k=256),
    dict(fuse_in_proj=True, block_conv=32, num_stages_in_proj=4),
    dict(fuse_in_proj=True, num_warps_in_proj=8),
]


def unrolled_us(fn, sets, backend, smoke, carry=None) -> dict:
    """Microseconds of fn a copy: fn on every set of `sets` in one jitted call (whose inputs
    together are past the L2, so nothing is read from a previous copy's cache). carry(set,
    fn's output) -> the next set: the copies then run CARRIED_STEPS times in a loop that
    carries the sets, donated from call to call, as the decode loop carries its states (so the
    kernels' in-place outputs are written in place, not into copies)."""
    groups, per_group = (1, 1) if smoke else (7, 5)
    if carry is None:
        call = jax.jit(lambda sets: [fn(*s) for s in sets])
        t = harness.time_calls(call, [(sets,)], groups=groups, per_group=per_group)
        steps = 1
    else:
        steps = CARRIED_STEPS

        def loop(sets):
            sets = jax.lax.fori_loop(
                0, steps, lambda _, sets: [carry(s, fn(*s)) for s in sets], sets
            )
            return sets, jax.tree.leaves(sets)[1].ravel()[0]

        state = [tuple(jnp.copy(a) for a in s) for s in sets]
        call = jax.jit(loop, donate_argnums=0)
        t = harness.time_calls(call, [()], groups=groups, per_group=per_group, state=state)
    per = 1e6 / (len(sets) * steps)
    return dict(median_us=t.median_s * per, min_us=t.min_s * per, max_us=t.max_s * per)


def time_tilings(data, part, fn, sets, base, sweep, state_at, run):
    """fn(*set, config=base with each sweep entry's fields) on the sets, the conv and SSM
    states (the set's arrays state_at and state_at + 1) carried in place; one record a tiling
    in data[part], written as it comes (a tiling that fails to compile or run is printed and
    skipped)."""

    def carry(s, out):
        return (*s[:state_at], out[1], out[2], *s[state_at + 2 :])

    batch = sets[0][0].shape[0]
    for fields in sweep:
        cfg = dataclasses.replace(base, **fields)
        call = functools.partial(fn, config=cfg, interpret=run["interpret"])
        label = f"{part.replace('_', ' ')} batch {batch} {fields or 'pick_config'}"
        try:
            t = unrolled_us(call, sets, run["backend"], run["smoke"], carry=carry)
        except jax.errors.JaxRuntimeError as e:  # e.g. past the registers or shared memory
            print(f"{label}: failed: {str(e)[:120]}", flush=True)
            continue
        data[part].append(dict(batch=batch, config=dataclasses.asdict(cfg), **t))
        print(f"{label}: {t['median_us']:.2f} us", flush=True)
        harness.write_json(run["new"].path, data)


def decode_sweep(new, smoke, parts) -> int:
    backend = new.info.backend
    interpret = backend != "gpu"
    data = dict(**new.header, layers=LAYERS, mixer=[], mixer_core=[])
    key = jax.random.key(0)
    layers = 2 if smoke else LAYERS
    dims = dict(SMOKE_DECODE if smoke else DECODE)
    dims.pop("batches")
    d_model = 128 if smoke else D_MODEL
    run = dict(new=new, backend=backend, smoke=smoke, interpret=interpret)
    for batch in ((2,) if smoke else MIXER_BATCHES) if "mixer" in parts else ():
        sets = []
        for i in range(layers):
            core = decode_set(i, batch, **dims)
            key_i = jax.random.fold_in(key, 1000 + i)
            hidden = jax.random.normal(key_i, (batch, d_model), jnp.bfloat16)
            w = jax.random.normal(key_i, (d_model, 2 * dims["d_inner"]), jnp.bfloat16)
            sets.append((hidden, w * d_model**-0.5, *core[1:]))
        base = pick_config(batch, dims["d_inner"], dims["d_state"], d_model)

        def tiles(fields, e=dims["d_inner"]):  # the fused kernel needs whole blocks
            cfg = dataclasses.replace(base, **fields)
            return not cfg.fuse_in_proj or not (d_model % cfg.block_k or e % cfg.block_conv)

        tiling = [f for f in MIXER_SWEEP[: 2 if smoke else None] if tiles(f)]
        # The states are the sets' third and fourth arrays (after hidden and in_proj).
        time_tilings(data, "mixer", mixer_pallas, sets, base, tiling, 2, run)
    for batch in ((2,) if smoke else DECODE_SWEEP_BATCHES) if "mixer_core" in parts else ():
        sets = [decode_set(i, batch, **dims) for i in range(layers)]
        base = pick_config(batch, dims["d_inner"], dims["d_state"])
        time_tilings(
            data,
            "mixer_core",
            mixer_core_pallas,
            sets,
            base,
            DECODE_SWEEP[: 2 if smoke else None],
            1,
            run,
        )
    print(f"wrote {new.path}")
    return 0


def norm_set(i, kind, rows, cols):
    rng, bf, f32 = np.random.default_rng(i), jnp.bfloat16, jnp.float32
    normal = lambda dtype, scale=1.0: jnp.asarray(  # noqa: E731
        scale * rng.standard_normal((rows, cols)), dtype
    )
    weight = jnp.asarray(1.0 + 0.1 * rng.standard_normal(cols), f32)
    if kind == "add":  # hidden, residual, weight, d_stream, d_normed
        return normal(bf), normal(f32, 3.0), weight, normal(f32), normal(bf)
    if kind == "stream":
        return normal(f32, 3.0), weight, normal(f32), normal(bf)
    return normal(bf), normal(bf), weight, normal(bf)  # x, z, weight, d_out


def norm_fns(kind, impl):
    """(forward, forward+backward) of one norm case; the arguments are norm_set's."""
    eps, bf = 1e-5, jnp.bfloat16
    if kind == "add":

        def f(h, r, w):
            return add_rms_norm(h, r, w, eps=eps, out_dtype=bf, impl=impl)

        def fwdbwd(h, r, w, g_stream, g):
            return jax.vjp(f, h, r, w)[1]((g_stream, g))

        return lambda h, r, w, *_: f(h, r, w), fwdbwd
    if kind == "stream":

        def f(s, w):
            return add_rms_norm(s, None, w, eps=eps, out_dtype=bf, impl=impl)

        def fwdbwd(s, w, g_stream, g):
            return jax.vjp(f, s, w)[1]((g_stream, g))

        return lambda s, w, *_: f(s, w), fwdbwd

    def f(x, z, w):
        return gated_rms_norm(x, z, w, group_size=x.shape[-1], eps=eps, impl=impl)

    def fwdbwd(x, z, w, g):
        return jax.vjp(f, x, z, w)[1](g)

    return lambda x, z, w, _: f(x, z, w), fwdbwd


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


def norm_sweep(new, smoke) -> int:
    import pallas_kernels.norm.vjp as norm_vjp

    backend = new.info.backend
    impl = "pallas" if backend == "gpu" else "pallas_interpret"
    data = dict(**new.header, norm_sweep=[])
    norms = SMOKE_NORMS if smoke else NORMS
    # The input sets do not depend on the tiling: made once (at these sizes making them takes
    # longer than compiling and timing a tiling).
    makers = {
        kind: functools.cache(functools.partial(norm_set, kind=kind, rows=rows, cols=cols))
        for kind, rows, cols in norms
    }
    for tile, programs_per_sm, prefetch, per_warp in NORM_SWEEP[:2] if smoke else NORM_SWEEP:
        norm_vjp.TILE_ELEMENTS, norm_vjp.BWD_PROGRAMS_PER_SM = tile, programs_per_sm
        norm_vjp.BWD_PREFETCH, norm_vjp.ELEMENTS_PER_WARP = prefetch, per_warp
        norm_vjp.GATED_ELEMENTS_PER_WARP = per_warp
        jax.clear_caches()  # the backward's program count is read when it is traced
        for kind, rows, cols in norms:
            fwd, fwdbwd = norm_fns(kind, impl)
            rec = dict(
                kind=kind,
                rows=rows,
                cols=cols,
                tile_elements=tile,
                bwd_programs_per_sm=programs_per_sm,
                bwd_prefetch=prefetch,
                elements_per_warp=per_warp,
                fwd_ms=timed(fwd, makers[kind], backend, smoke),
                fwdbwd_ms=timed(fwdbwd, makers[kind], backend, smoke),
            )
            data["norm_sweep"].append(rec)
            print(
                f"norm {kind} {rows}x{cols} tile {tile}, {programs_per_sm} bwd programs/SM, "
                f"prefetch {'on' if prefetch else 'off'}, {per_warp} a warp: fwd {rec['fwd_ms']['median_ms']:.3f} "
                f"ms, fwd+bwd {rec['fwdbwd_ms']['median_ms']:.3f} ms",
                flush=True,
            )
            harness.write_json(new.path, data)
    print(f"wrote {new.path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--norm-sweep", action="store_true", help="time the norm kernels under NORM_SWEEP's tilings"
    )
    parser.add_argument(
        "--decode-sweep",
        action="store_true",
        help="time a decode step's mixer under MIXER_SWEEP's and DECODE_SWEEP's tilings",
    )
    parser.add_argument(
        "--decode-parts",
        default="mixer,mixer_core",
        help="what --decode-sweep times: mixer, mixer_core or both (default)",
    )
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if not sections or any(s not in SECTIONS for s in sections):
        parser.error(f"--sections: choose from {','.join(SECTIONS)}, got {args.sections!r}")
    new = harness.new_result(
        "kernels_norm_sweep"
        if args.norm_sweep
        else "kernels_decode_sweep"
        if args.decode_sweep
        else "kernels",
        script=__file__,
        argv=argv,
        out_dir=args.out,
        smoke=args.smoke,
    )
    backend, interpret = new.info.backend, new.info.backend != "gpu"
    if args.norm_sweep:
        return norm_sweep(new, args.smoke)
    if args.decode_sweep:
        return decode_sweep(new, args.smoke, args.decode_parts.split(","))
    data = dict(**new.header, conv=[], decode=[], norms=[])
    conv_shapes = SMOKE_CONV if args.smoke else CONV_SHAPES
    for shape in conv_shapes if "conv" in sections else []:

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
    for batch in dims.pop("batches") if "decode" in sections else []:

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
    pallas_impl = "pallas" if backend == "gpu" else "pallas_interpret"
    for kind, rows, cols in (SMOKE_NORMS if args.smoke else NORMS) if "norms" in sections else []:
        rec = dict(kind=kind, rows=rows, cols=cols)
        for impl in ("reference", pallas_impl):
            fwd, fwdbwd = norm_fns(kind, impl)

            def make(i, kind=kind, rows=rows, cols=cols):
                return norm_set(i, kind, rows, cols)

            rec[impl.removesuffix("_interpret")] = dict(
                fwd_ms=timed(fwd, make, backend, args.smoke),
                fwdbwd_ms=timed(fwdbwd, make, backend, args.smoke),
            )
        data["norms"].append(rec)
        ref, pal = rec["reference"], rec["pallas"]
        print(
            f"norm {kind} {rows}x{cols}: fwd {ref['fwd_ms']['median_ms']:.3f} -> "
            f"{pal['fwd_ms']['median_ms']:.3f} ms, fwd+bwd {ref['fwdbwd_ms']['median_ms']:.3f} "
            f"-> {pal['fwdbwd_ms']['median_ms']:.3f} ms (reference -> pallas)",
            flush=True,
        )
        harness.write_json(new.path, data)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
