"""SSD scan (Mamba2) on GPU: check the Pallas kernels against the reference, then time them.

    PYTHONPATH=. python3 benchmarks/bench_ssd.py [--out DIR] [--shapes 0,1,2] [--segs seg64,none]
        [--variants NAME:field=value,field=value;NAME:...] [--profile] [--checks 0,1,2]
        [--no-check] [--no-time] [--ref] [--smoke]

1. Correctness (skip with --no-check): outputs and every gradient (random cotangents; initial and
   final states included) of the Pallas path against the XLA reference run in float64, on odd
   shapes (ragged length, two groups, random segments with runs of length 1), float32 and
   bfloat16. Prints BAD lines and goes on to the timing.
2. Timing (skip with --no-time): forward and forward+backward (jax.vjp with a fixed cotangent)
   of the op on the issue's shapes, bf16 x/dt/B/C/z, f32 A/D/dt_bias, softplus, D and z on,
   chunk 256, with 64 random-length segments a row (seg64) and without (none); the default
   config (pick_config) and each --variants entry (SSDConfig field overrides on top of it), and
   the XLA reference with --ref. Compile time (lower + compile) is reported apart. Median of 7
   groups of 5 back-to-back calls after a warm-up; the calls rotate between input sets that
   together hold at least twice the L2, so no call finds its inputs there.
3. --profile: every kernel and XLA piece of the default config's forward and backward timed
   alone (the pipeline run eagerly through pallas_kernels.ssd.vjp.profiling), per shape and
   segment mode: where the backward's time goes.
4. Writes --out/ssd_<device>.json (default benchmarks/results/; --smoke adds _smoke) after every
   measurement, so a run cut off at its time limit keeps what it measured; prints a table last.
mamba_ssm's side (mamba_chunk_scan_combined with seq_idx) is timed by its anchor script in the
same call; the figures in TARGETS_MS are its 2026-12-01 fwd+bwd times, for the printed ratio.
On CPU the kernels run through the Pallas interpreter; --smoke: one tiny shape, chunk 32, one
check, one call per timing (seconds of work, minutes of interpreter compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.ssd_scan import ssd_scan_reference
from pallas_kernels.ssd import SSDConfig, pick_config, ssd_scan_pallas
from pallas_kernels.ssd import vjp as ssd_vjp

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# (batch, length, heads, headdim, d_state), one group.
SHAPES = [(8, 2048, 64, 64, 128), (1, 16384, 64, 64, 128), (4, 2048, 80, 64, 128)]
# mamba_ssm's fwd+bwd with seq_idx on one H200, 2026-12-01 (issue 15).
TARGETS_MS = {SHAPES[0]: 3.37, SHAPES[1]: 5.20, SHAPES[2]: 4.22}
CHUNK = 256
NUM_SEGMENTS = 64
L2_BYTES = 60 * 2**20
# (name, (batch, length, heads, headdim, groups, d_state), dtype, segments, initial states)
CHECKS = [
    ("odd_f32_seg_states", (2, 1000, 8, 64, 2, 128), "float32", "random", True),
    ("odd_bf16_seg_states", (2, 1000, 8, 64, 2, 128), "bfloat16", "random", True),
    ("odd_bf16_noseg", (1, 777, 8, 64, 1, 128), "bfloat16", "none", False),
]
SMOKE_SHAPE = (1, 80, 4, 16, 16)
SMOKE_CHECK = ("smoke_f32_seg_states", (1, 50, 4, 16, 2, 16), "float32", "random", True)
SMOKE_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class Run:
    interpret: bool
    chunk: int
    groups: int
    per_group: int
    warmup: int


# ------------------------------------------------------------------------------------------------
# Inputs.


def random_segments(rng, batch, length, count):
    """(b, t) int32 ids 0..count-1: `count` runs a row with random lengths (at least 1)."""
    count = min(count, length)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=count - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def make_inputs(seed, batch, length, heads, headdim, groups, d_state, dtype):
    """(x, dt, A, B, C, D, z, dt_bias) as Mamba2 feeds the op: dt' = softplus(dt + dt_bias) in
    about [0.001, 0.1] at dt = 0, A in [-16, -1]."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0, dt_=dtype):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32)).astype(dt_)

    f32 = jnp.float32
    dt_floor = rng.uniform(0.001, 0.1, heads)
    return (normal((batch, length, heads, headdim)), normal((batch, length, heads), 0.5),
            jnp.asarray(-rng.uniform(1.0, 16.0, heads), f32),
            normal((batch, length, groups, d_state)), normal((batch, length, groups, d_state)),
            normal((heads,), 1.0, f32), normal((batch, length, heads, headdim)),
            jnp.asarray(np.log(np.expm1(dt_floor)), f32))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------
# Timing (the shared harness's time_calls loop, small so that it can move onto it).


def time_calls(fn, inputs, *, warmup, groups, per_group):
    """Median, min and max seconds per call of fn(*inputs[i % len(inputs)]): warm-up calls, then
    groups of back-to-back calls blocked on at the group's end."""
    calls = 0

    def call():
        nonlocal calls
        out = fn(*inputs[calls % len(inputs)])
        calls += 1
        return out

    for _ in range(warmup):
        jax.block_until_ready(call())
    per_call = []
    for _ in range(groups):
        t0 = time.perf_counter()
        jax.block_until_ready([call() for _ in range(per_group)])
        per_call.append((time.perf_counter() - t0) / per_group)
    return dict(median_ms=1e3 * statistics.median(per_call), min_ms=1e3 * min(per_call),
                max_ms=1e3 * max(per_call))


def compile_fn(fn, run: Run, *args):
    """jit(fn) compiled for args; through the interpreter without XLA's backend optimisations
    (the interpreter's programs run for milliseconds: that halves their compile time)."""
    opts = dict(xla_backend_optimization_level=0) if run.interpret else None
    return jax.jit(fn).lower(*args).compile(compiler_options=opts)


def rotation_count(bytes_per_set: int, backend: str) -> int:
    if backend == "cpu":
        return 1
    return max(2, math.ceil(2 * L2_BYTES / bytes_per_set))


def tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


# ------------------------------------------------------------------------------------------------
# 1. Correctness.


_REFERENCE = {}


def check(name, shape, dtype, seg_mode, with_init, run: Run):
    batch, length, heads, headdim, groups, d_state = shape
    args = make_inputs(17, batch, length, heads, headdim, groups, d_state, jnp.dtype(dtype))
    rng = np.random.default_rng(5)
    seg = None
    slots = 1
    if seg_mode == "random":
        # Many short runs (several of length 1) with ids reused along a row; one slot unused.
        slots = 6
        seg = random_segments(rng, batch, length, length // 8) % (slots - 1)
    init = (jnp.asarray(0.5 * rng.standard_normal((batch, slots, heads, headdim, d_state)),
                        jnp.float32) if with_init else None)
    kw = dict(dt_softplus=True, segment_ids=seg, chunk_size=run.chunk, return_final_states=True,
              num_segments=slots)
    arrays = list(args) + ([init] if with_init else [])

    def split(a):
        return a[:8], (a[8] if with_init else None)

    def with_grads(fn):
        def run_(arrays, cts):
            out, vjp = jax.vjp(fn, *arrays)
            return out, vjp(cts)
        return run_

    def ours(*a):
        xs, h0 = split(a)
        return ssd_scan_pallas(*xs, initial_states=h0, interpret=run.interpret, **kw)

    cts = (jnp.asarray(rng.standard_normal(args[0].shape), args[0].dtype),
           jnp.asarray(rng.standard_normal((batch, slots, heads, headdim, d_state)),
                       jnp.float32))
    out, grads = compile_fn(with_grads(ours), run, arrays, cts)(arrays, cts)
    with jax.enable_x64(True):
        def ref(arrays, seg, cts):
            def f(*a):
                xs, h0 = split(a)
                return ssd_scan_reference(*xs, initial_states=h0, **dict(kw, segment_ids=seg))

            out, vjp = jax.vjp(f, *arrays)
            return out, vjp(cts)

        a64 = [jnp.asarray(a, jnp.float64) for a in arrays]
        c64 = tuple(jnp.asarray(c, jnp.float64) for c in cts)
        # The float32 and bfloat16 checks of one shape share the float64 reference's compile.
        key = (shape, seg_mode, with_init)
        if key not in _REFERENCE:
            _REFERENCE[key] = compile_fn(ref, run, a64, seg, c64)
        out_r, grads_r = _REFERENCE[key](a64, seg, c64)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"] + (["initial_states"] if with_init
                                                               else [])
    errs = {"y": rel(out[0], out_r[0]), "final_states": rel(out[1], out_r[1])}
    errs.update({"d" + n: rel(g, gr) for n, g, gr in zip(names, grads, grads_r)})
    # bf16 inputs are rounded before both runs; what is left is bf16 rounding of the matmul
    # operands, the outputs and the gradients.
    tol = 1e-4 if dtype == "float32" else 3e-2
    bad = [k for k, v in errs.items() if not (np.isfinite(v) and v < tol)]
    return dict(name=name, shape=shape, dtype=dtype, segments=seg_mode, initial_states=with_init,
                ok=not bad, bad=bad, tolerance=tol, errors=errs)


# ------------------------------------------------------------------------------------------------
# 2. Timing.


def timing_sets(shape, seg_mode, run: Run, backend: str, count: int | None = None):
    batch, length, heads, headdim, d_state = shape
    sets = []
    n = count
    i = 0
    while n is None or i < n:
        args = make_inputs(100 + i, batch, length, heads, headdim, 1, d_state, jnp.bfloat16)
        seg = (random_segments(np.random.default_rng(200 + i), batch, length, NUM_SEGMENTS)
               if seg_mode == "seg64" else None)
        ct = jnp.asarray(np.random.default_rng(300 + i).standard_normal(args[0].shape,
                                                                        np.float32),
                         jnp.bfloat16)
        sets.append((*args, seg, ct))
        if n is None:
            n = rotation_count(tree_bytes(sets[0]), backend)
        i += 1
    return sets


def op_fns(impl, config, run: Run):
    def f(x, dt, A, B, C, D, z, dt_bias, seg):
        kw = dict(dt_softplus=True, segment_ids=seg, chunk_size=run.chunk)
        if impl == "reference":
            return ssd_scan_reference(x, dt, A, B, C, D, z, dt_bias, **kw)
        return ssd_scan_pallas(x, dt, A, B, C, D, z, dt_bias, interpret=run.interpret,
                               config=config, **kw)

    def fwd(*a):
        return f(*a[:9])

    def fwdbwd(*a):
        *xs, seg, ct = a
        _, vjp = jax.vjp(lambda *d: f(*d, seg), *xs)
        return vjp(ct)

    return fwd, fwdbwd


def time_case(shape, seg_mode, impl, variant, config, sets, run: Run):
    fwd, fwdbwd = op_fns(impl, config, run)
    rec = dict(shape=shape, segments=seg_mode, impl=impl, variant=variant,
               config=None if config is None else dataclasses.asdict(config))
    for label, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        t0 = time.perf_counter()
        compiled = compile_fn(fn, run, *sets[0])
        rec[f"compile_s_{label}"] = time.perf_counter() - t0
        rec[f"{label}_ms"] = time_calls(compiled, sets, warmup=run.warmup, groups=run.groups,
                                        per_group=run.per_group)
    return rec


def parse_variants(text: str | None) -> list[tuple[str, dict]]:
    """"name:field=value,field=value;name:..." -> [(name, {field: value})]."""
    if not text:
        return []
    fields = {f.name: f for f in dataclasses.fields(SSDConfig)}
    out = []
    for item in text.split(";"):
        name, _, body = item.partition(":")
        overrides = {}
        for kv in filter(None, body.split(",")):
            key, _, value = kv.partition("=")
            if key not in fields:
                raise SystemExit(f"--variants: {key!r} is not an SSDConfig field "
                                 f"({', '.join(fields)})")
            overrides[key] = (int(value) if value.lstrip("-").isdigit()
                              else None if value == "None" else value)
        out.append((name.strip(), overrides))
    return out


# ------------------------------------------------------------------------------------------------
# 3. Per-kernel profile.


def profile_case(shape, seg_mode, run: Run):
    """{piece: median ms} of every kernel and XLA piece of forward and backward, each timed
    alone on the inputs the eager pipeline hands it."""
    (x, dt, A, B, C, D, z, dt_bias, seg, ct), = timing_sets(shape, seg_mode, run, "cpu", count=1)
    times = {}

    def timer(name, fn, *args):
        jitted = compile_fn(fn, run, *args)
        out = jax.block_until_ready(jitted(*args))
        times[name] = time_calls(jitted, [args], warmup=run.warmup, groups=run.groups,
                                 per_group=run.per_group)["median_ms"]
        return out

    plan = ssd_vjp.make_plan(x, dt, B, D, z, dt_bias, dt_softplus=True,
                             has_seg=seg is not None, chunk_size=run.chunk, has_init=False,
                             return_states=False, interpret=run.interpret, config=None)
    with ssd_vjp.profiling(timer):
        seg_lo = seg_hi = None
        if seg is not None:
            seg_lo, seg_hi = ssd_vjp._step(
                "segment_bounds (xla)",
                functools.partial(ssd_vjp.segment_bounds, chunk=plan.st.chunk,
                                  padded=plan.st.padded), seg)
        _, res = ssd_vjp._ssd_fwd(plan, run.interpret, x, dt, A, B, C, D, z, dt_bias, seg_lo,
                                  seg_hi, None, None)
        ssd_vjp._ssd_bwd(plan, run.interpret, res, ct)
    fwd = sum(v for k, v in times.items() if not k.startswith("bwd."))
    bwd = sum(v for k, v in times.items() if k.startswith("bwd."))
    return dict(shape=shape, segments=seg_mode, config=dataclasses.asdict(plan.cfg),
                pieces_ms=times, sum_fwd_ms=fwd, sum_bwd_ms=bwd)


# ------------------------------------------------------------------------------------------------
# Reporting.


def device_slug(kind: str, backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    kind = kind.lower()
    for name in ("h200", "h100", "a100", "b200"):
        if name in kind:
            return f"nvidia-{name}"
    return "-".join("".join(c if c.isalnum() else " " for c in kind).split())


def git_commit():
    if os.environ.get("PACKMAMBA_GIT_COMMIT"):
        return os.environ["PACKMAMBA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=REPO, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def table(data) -> str:
    lines = [f"{'shape':24s} {'segs':6s} {'impl/variant':22s} {'fwd ms':>8s} {'f+b ms':>8s} "
             f"{'f+b/mamba':>9s} {'compile s':>9s}"]
    for r in data["timings"]:
        target = TARGETS_MS.get(tuple(r["shape"]))
        fb = r["fwdbwd_ms"]["median_ms"]
        ratio = f"{fb / target:.2f}x" if target and r["segments"] == "seg64" else ""
        lines.append(f"{str(tuple(r['shape'])):24s} {r['segments']:6s} "
                     f"{r['impl'] + '/' + r['variant']:22s} {r['fwd_ms']['median_ms']:8.3f} "
                     f"{fb:8.3f} {ratio:>9s} "
                     f"{r['compile_s_fwd'] + r['compile_s_fwdbwd']:9.1f}")
    for p in data["profiles"]:
        lines.append(f"profile {tuple(p['shape'])} {p['segments']}: sum fwd "
                     f"{p['sum_fwd_ms']:.3f} ms, sum bwd {p['sum_bwd_ms']:.3f} ms")
        for k, v in sorted(p["pieces_ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {k:32s} {v:8.3f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS,
                   help="folder for ssd_<device>.json (default benchmarks/results/)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes through the interpreter on CPU: checks the script")
    p.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,2 (default all)")
    p.add_argument("--segs", default=None,
                   help="segment modes to time: seg64, none (default both; --smoke: seg64)")
    p.add_argument("--variants", default=None,
                   help="extra configs: 'name:field=value,...;name:...' over pick_config's")
    p.add_argument("--profile", action="store_true", help="time every piece alone")
    p.add_argument("--checks", default=None, help="indices into CHECKS (default all)")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--ref", action="store_true", help="also time the XLA reference")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0]
    if args.smoke:
        run = Run(interpret=backend != "gpu", chunk=SMOKE_CHUNK, groups=1, per_group=1,
                  warmup=1)
        shapes, checks = [SMOKE_SHAPE], [SMOKE_CHECK]
    else:
        run = Run(interpret=backend != "gpu", chunk=CHUNK, groups=7, per_group=5, warmup=1)
        shapes = ([SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes
                  else list(SHAPES))
        checks = ([CHECKS[int(i)] for i in args.checks.split(",")] if args.checks
                  else list(CHECKS))
    segs = [s for s in (args.segs or ("seg64" if args.smoke else "seg64,none")).split(",") if s]
    slug = device_slug(device.device_kind, backend)
    path = args.out / f"ssd_{slug}{'_smoke' if args.smoke else ''}.json"
    data = dict(device=device.device_kind, device_name=str(device), kind=slug, backend=backend,
                jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_commit(),
                command="PYTHONPATH=. python3 benchmarks/bench_ssd.py " + shlex.join(argv),
                chunk=run.chunk, num_segments=NUM_SEGMENTS, targets_fwdbwd_ms=
                {str(k): v for k, v in TARGETS_MS.items()},
                checks=[], timings=[], profiles=[], errors=[])

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)

    def guarded(what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed piece must not end the run
            traceback.print_exc()
            print(f"BAD {what}: {type(e).__name__}: {e}", flush=True)
            data["errors"].append(dict(what=what, error=f"{type(e).__name__}: {e}"))
            save()
            return None

    if not args.no_check:
        for name, shape, dtype, seg_mode, init in checks:
            r = guarded(f"check {name}", lambda: check(name, shape, dtype, seg_mode, init, run))
            if r is not None:
                data["checks"].append(r)
                errs = " ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
                print(f"{'ok ' if r['ok'] else 'BAD'} check {name}: {errs}", flush=True)
                save()
    variants = parse_variants(args.variants)
    if not args.no_time:
        for shape in shapes:
            for seg_mode in segs:
                sets = timing_sets(shape, seg_mode, run, backend)
                base = pick_config(shape[0], shape[1], shape[2], 1, run.chunk)
                cases = [("pallas", "default", base)]
                cases += [("pallas", name, dataclasses.replace(base, **ov))
                          for name, ov in variants]
                if args.ref:
                    cases.append(("reference", "xla", None))
                for impl, name, cfg in cases:
                    r = guarded(f"time {shape} {seg_mode} {impl}/{name}",
                                lambda: time_case(shape, seg_mode, impl, name, cfg, sets, run))
                    if r is not None:
                        data["timings"].append(r)
                        print(f"{shape} {seg_mode} {impl}/{name}: fwd "
                              f"{r['fwd_ms']['median_ms']:.3f} ms, fwd+bwd "
                              f"{r['fwdbwd_ms']['median_ms']:.3f} ms (compile "
                              f"{r['compile_s_fwd']:.1f} + {r['compile_s_fwdbwd']:.1f} s)",
                              flush=True)
                        save()
                del sets
    if args.profile:
        for shape in shapes:
            for seg_mode in segs:
                r = guarded(f"profile {shape} {seg_mode}",
                            lambda: profile_case(shape, seg_mode, run))
                if r is not None:
                    data["profiles"].append(r)
                    save()
    save()
    print(table(data))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
