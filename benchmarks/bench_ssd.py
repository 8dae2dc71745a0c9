"""SSD scan (Mamba2) on GPU: time the Pallas kernels (and the XLA reference), per kernel too.

    PYTHONPATH=. python3 benchmarks/bench_ssd.py [--out DIR] [--shapes 0,1,2] [--segs seg64,none]
        [--variants NAME:field=value,field=value;NAME:...] [--ref] [--profile] [--smoke]

Forward and forward+backward (jax.vjp with a fixed cotangent) of the op on the shapes below:
bf16 x/dt/B/C/z, f32 A/D/dt_bias, softplus, D and z on, chunk 256, with 64 random-length
segments a row (seg64) and without (none); the default config (pick_config) and each --variants
entry (SSDConfig field overrides on top of it), and the XLA reference with --ref. Compile time
is reported apart. harness.time_calls: median of 7 groups of 5 back-to-back calls after a
warm-up, rotating between input sets that together hold twice the L2.
--profile: a jax.profiler trace of the default config's forward+backward, its GPU time split by
kernel (the kernels' names; "xla" is everything else): where the backward's time goes.
Writes --out/ssd_<device>.json after every measurement and prints a table last. mamba_ssm's
fwd+bwd times (TARGETS_MS) give the printed ratio. Correctness lives in tests/test_ssd_impls.py.
On CPU the kernels run through the Pallas interpreter; --smoke: one tiny shape, chunk 32, one
call per timing (minutes of interpreter compiles).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, workloads
from jax_packmamba.ops.ssd_scan import ssd_scan_reference
from pallas_kernels.ssd import SSDConfig, pick_config, ssd_scan_pallas

# (batch, length, heads, headdim, d_state), one group.
SHAPES = [(8, 2048, 64, 64, 128), (1, 16384, 64, 64, 128), (4, 2048, 80, 64, 128)]
# mamba_ssm's fwd+bwd with seq_idx on one H200, 2026-12-01.
TARGETS_MS = {SHAPES[0]: 3.37, SHAPES[1]: 5.20, SHAPES[2]: 4.22}
CHUNK = 256
NUM_SEGMENTS = 64
SMOKE_SHAPE = (1, 80, 4, 16, 16)
SMOKE_CHUNK = 32
PROFILE_CALLS = 5


def random_segments(rng, batch, length, count):
    """(b, t) int32 ids 0..count-1: `count` runs a row with random lengths (at least 1)."""
    count = min(count, length)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=count - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def input_set(i, shape, seg_mode):
    """(x, dt, A, B, C, D, z, dt_bias, segment_ids, cotangent) as Mamba2 feeds the op:
    dt' = softplus(dt + dt_bias) in about [0.001, 0.1] at dt = 0, A in [-16, -1]."""
    batch, length, heads, headdim, d_state = shape
    rng = np.random.default_rng(100 + i)

    def normal(shape, scale=1.0, dtype=jnp.bfloat16):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32)).astype(dtype)

    f32 = jnp.float32
    rows = (batch, length, heads, headdim)
    bc = (batch, length, 1, d_state)
    dt_floor = rng.uniform(0.001, 0.1, heads)
    seg = random_segments(rng, batch, length, NUM_SEGMENTS) if seg_mode == "seg64" else None
    return (
        normal(rows),
        normal((batch, length, heads), 0.5),
        jnp.asarray(-rng.uniform(1.0, 16.0, heads), f32),
        normal(bc),
        normal(bc),
        normal((heads,), 1.0, f32),
        normal(rows),
        jnp.asarray(np.log(np.expm1(dt_floor)), f32),
        seg,
        normal(rows),
    )


def op_fns(impl, config, *, chunk, interpret):
    def f(x, dt, A, B, C, D, z, dt_bias, seg):
        kw = dict(dt_softplus=True, segment_ids=seg, chunk_size=chunk)
        if impl == "reference":
            return ssd_scan_reference(x, dt, A, B, C, D, z, dt_bias, **kw)
        return ssd_scan_pallas(
            x, dt, A, B, C, D, z, dt_bias, interpret=interpret, config=config, **kw
        )

    def fwd(*a):
        return f(*a[:9])

    def fwdbwd(*a):
        *xs, seg, ct = a
        return jax.vjp(lambda *d: f(*d, seg), *xs)[1](ct)

    return fwd, fwdbwd


def compile_fn(fn, interpret, *args):
    # The interpreter's programs run for milliseconds: without XLA's backend optimisations they
    # compile in half the time.
    opts = dict(xla_backend_optimization_level=0) if interpret else None
    return jax.jit(fn).lower(*args).compile(compiler_options=opts)


def time_case(fns, sets, *, interpret, smoke, keep=None):
    """Each of fns compiled and timed; `keep` (a dict) receives the compiled programs by label."""
    rec = {}
    for label, fn in zip(("fwd", "fwdbwd"), fns):
        t0 = time.perf_counter()
        compiled = compile_fn(fn, interpret, *sets[0])
        rec[f"compile_s_{label}"] = time.perf_counter() - t0
        if keep is not None:
            keep[label] = compiled
        t = harness.time_calls(
            compiled, sets, groups=1 if smoke else 7, per_group=1 if smoke else 5
        )
        rec[f"{label}_ms"] = dict(
            median_ms=1e3 * t.median_s, min_ms=1e3 * t.min_s, max_ms=1e3 * t.max_s
        )
    return rec


def profile_case(compiled, sets):
    """GPU microseconds per fwd+bwd call of the compiled program, by kernel
    (harness.kernel_times), over a trace of PROFILE_CALLS calls."""
    with tempfile.TemporaryDirectory(prefix="ssd_trace_") as tmp:
        harness.trace(compiled, sets, PROFILE_CALLS, tmp)
        events, lines = harness.device_events(tmp)
    if not events:
        return dict(error="no GPU kernels in the trace", lines=lines)
    return harness.kernel_times(events, PROFILE_CALLS, prefixes=("ssd_",))


def parse_variants(text: str | None) -> list[tuple[str, dict]]:
    """ "name:field=value,field=value;name:..." -> [(name, {field: value})]."""
    try:
        return [
            (
                name.strip(),
                workloads.scan_config_overrides(filter(None, body.split(",")), SSDConfig),
            )
            for name, _, body in (v.partition(":") for v in filter(None, text.split(";")))
        ]
    except ValueError as e:
        raise SystemExit(f"--variants: {e}") from None


def table(data) -> str:
    lines = [
        f"{'shape':24s} {'segs':6s} {'impl/variant':22s} {'fwd ms':>8s} {'f+b ms':>8s} "
        f"{'f+b/mamba':>9s} {'compile s':>9s}"
    ]
    for r in data["timings"]:
        target = TARGETS_MS.get(tuple(r["shape"]))
        fb = r["fwdbwd_ms"]["median_ms"]
        ratio = f"{fb / target:.2f}x" if target and r["segments"] == "seg64" else ""
        lines.append(
            f"{str(tuple(r['shape'])):24s} {r['segments']:6s} "
            f"{r['impl'] + '/' + r['variant']:22s} {r['fwd_ms']['median_ms']:8.3f} "
            f"{fb:8.3f} {ratio:>9s} {r['compile_s_fwd'] + r['compile_s_fwdbwd']:9.1f}"
        )
    for p in data["profiles"]:
        lines.append(
            f"profile {tuple(p['shape'])} {p['segments']}: "
            + (
                p["error"]
                if "error" in p
                else f"{p['kernel_us_per_call']:.1f} us of kernels per fwd+bwd"
            )
        )
        for k, v in p.get("kernels", {}).items():
            lines.append(f"    {k:32s} {v['us_per_call']:9.1f} us  x{v['launches_per_call']:g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,2 (default all)")
    p.add_argument(
        "--segs", default=None, help="segment modes: seg64, none (default both; --smoke: seg64)"
    )
    p.add_argument(
        "--variants",
        default="",
        help="extra configs: 'name:field=value,...;name:...' over pick_config's",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="split the default config's fwd+bwd by kernel (profiler trace)",
    )
    p.add_argument("--ref", action="store_true", help="also time the XLA reference")
    args = p.parse_args(argv)
    new = harness.new_result("ssd", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke)
    interpret = new.info.backend != "gpu"
    chunk = SMOKE_CHUNK if args.smoke else CHUNK
    shapes = (
        [SMOKE_SHAPE]
        if args.smoke
        else [SHAPES[int(i)] for i in args.shapes.split(",")]
        if args.shapes
        else SHAPES
    )
    segs = [s for s in (args.segs or ("seg64" if args.smoke else "seg64,none")).split(",") if s]
    variants = parse_variants(args.variants)
    data = dict(
        **new.header,
        chunk=chunk,
        num_segments=NUM_SEGMENTS,
        targets_fwdbwd_ms={str(k): v for k, v in TARGETS_MS.items()},
        timings=[],
        profiles=[],
        errors=[],
    )

    def guarded(what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed piece must not end the run
            traceback.print_exc()
            print(f"BAD {what}: {type(e).__name__}: {e}", flush=True)
            data["errors"].append(dict(what=what, error=f"{type(e).__name__}: {e}"))
            return None

    for shape in shapes:
        for seg_mode in segs:
            first = input_set(0, shape, seg_mode)
            n = harness.rotation_count(harness.tree_bytes(first), backend=new.info.backend)
            sets = [first] + [input_set(i, shape, seg_mode) for i in range(1, n)]
            base = pick_config(shape[0], shape[1], shape[2], 1, chunk)
            cases = [("pallas", "default", base)]
            cases += [("pallas", name, dataclasses.replace(base, **ov)) for name, ov in variants]
            cases += [("reference", "xla", None)] if args.ref else []
            default = {}  # the default config's compiled programs: the profile's too
            for impl, name, cfg in cases:
                fns = op_fns(impl, cfg, chunk=chunk, interpret=interpret)
                keep = default if (impl, name) == ("pallas", "default") else None
                r = guarded(
                    f"time {shape} {seg_mode} {impl}/{name}",
                    lambda fns=fns, sets=sets, keep=keep: time_case(
                        fns, sets, interpret=interpret, smoke=args.smoke, keep=keep
                    ),
                )
                if r is not None:
                    data["timings"].append(
                        dict(
                            shape=shape,
                            segments=seg_mode,
                            impl=impl,
                            variant=name,
                            config=None if cfg is None else dataclasses.asdict(cfg),
                            **r,
                        )
                    )
                    print(
                        f"{shape} {seg_mode} {impl}/{name}: fwd {r['fwd_ms']['median_ms']:.3f}"
                        f" ms, fwd+bwd {r['fwdbwd_ms']['median_ms']:.3f} ms",
                        flush=True,
                    )
                harness.write_json(new.path, data)
            if args.profile:

                def profiled(sets=sets, default=default):
                    compiled = default.get("fwdbwd")
                    if compiled is None:  # its timing failed before compiling it
                        fwdbwd = op_fns("pallas", base, chunk=chunk, interpret=interpret)[1]
                        compiled = compile_fn(fwdbwd, interpret, *sets[0])
                    return profile_case(compiled, sets)

                r = guarded(f"profile {shape} {seg_mode}", profiled)
                if r is not None:
                    data["profiles"].append(
                        dict(shape=shape, segments=seg_mode, config=dataclasses.asdict(base), **r)
                    )
                harness.write_json(new.path, data)
            sets = None  # free this shape's inputs before the next shape's are made
    harness.write_json(new.path, data)
    print(table(data))
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
