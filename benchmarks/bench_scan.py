"""Selective scan on GPU: time the Pallas kernels (and the XLA reference), per kernel too.

    PYTHONPATH=. python3 benchmarks/bench_scan.py [--out DIR] [--shapes 0,1] [--segs seg64]
        [--variants field=value:field=value,...]
        [--profile CONFIGS] [--no-ref] [--anchor DIR] [--smoke]

1. Timing: forward and forward+backward on the four anchor shapes (bf16 u/delta/z/B/C, f32
   A/D/delta_bias, softplus, z and D on), without segments and with 64 random-length segments
   a row; plus the XLA reference. harness.time_calls: median of 7 groups of 5 back-to-back calls
   after warm-up, the inputs rotated between sets (harness.rotation_count: at least two, and
   together at least twice the L2, so no call finds its inputs in the L2).
2. --profile: a jax.profiler trace of forward+backward (64 segments a row) on the first shape,
   its GPU time split by kernel (the kernels' names; "xla" is everything else).
3. Prints a table last; writes --out/scan_<slug>.json (default benchmarks/results/) after every
   timing, so a run cut off at its time limit keeps what it measured.
4. --anchor DIR: runs DIR/scan_torch.py (the mamba_ssm side, its own fixed shapes;
   harness.run_anchor: DIR/scan_torch.py FILE, with --anchor-pythonpath as its PYTHONPATH) in the
   same call, its JSON under "anchor".
Correctness lives in tests/test_selective_scan_impls.py (GPU twins of every CPU check).
On CPU the kernels run through the Pallas interpreter; --smoke: one tiny shape without segments,
a kernel config with nothing unrolled, one call per timing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import harness, workloads
from jax_packmamba.ops.selective_scan import selective_scan_reference
from pallas_kernels.selective_scan import pick_config, selective_scan_pallas

ANCHOR_SCRIPT = "scan_torch.py"
# mamba_ssm 2.3.2's anchor runs on one H200: (batch, length, d_inner, d_state) -> (fwd, bwd) ms.
ANCHORS = {
    (1, 8192, 4096, 16): (0.736, 2.745),
    (8, 2048, 2048, 16): (0.595, 2.329),
    (1, 2048, 4096, 16): (0.161, 0.697),
    (4, 2048, 1536, 16): (0.236, 0.934),
}
SMOKE_SHAPE = (1, 32, 32, 4)
SMOKE_OVERRIDES = workloads.SMOKE_SCAN_OVERRIDES
NUM_SEGMENTS = 64


@dataclasses.dataclass(frozen=True)
class Run:
    """How this invocation runs: interpret (Pallas interpreter, CPU) and the timing loop."""

    interpret: bool = False
    groups: int = 7
    per_group: int = 5
    backend: str = "gpu"


def bench(fn, arg_sets, run: Run, *, warmup=1):
    """(median, min, max) ms per call (harness.time_calls, rotating over arg_sets)."""
    t = harness.time_calls(fn, arg_sets, warmup=warmup, groups=run.groups, per_group=run.per_group)
    return 1e3 * t.median_s, 1e3 * t.min_s, 1e3 * t.max_s


def time_case(shape, seg_mode, impl, config=None, key=None, *, run: Run):
    nseg = NUM_SEGMENTS if seg_mode == "seg64" else None

    def input_set(i):
        args, seg = workloads.scan_inputs(jax.random.fold_in(key, i), *shape, jnp.bfloat16, nseg)
        ct = jax.random.normal(jax.random.fold_in(key, 10 + i), shape[:3]).astype(jnp.bfloat16)
        return tuple(args.values()), seg, ct

    first = input_set(0)
    n_sets = harness.rotation_count(harness.tree_bytes(first), backend=run.backend)
    sets = [first] + [input_set(i) for i in range(1, n_sets)]

    def fwd(args, seg):
        kw = dict(delta_softplus=True, segment_ids=seg)
        if impl == "pallas":
            return selective_scan_pallas(*args, config=config, interpret=run.interpret, **kw)
        return selective_scan_reference(*args, **kw)

    def fwd_bwd(args, seg, ct):
        return jax.vjp(lambda *a: fwd(a, seg), *args)[1](ct)

    rec = dict(input_sets=len(sets), compile_s=[])
    for label, fn, fn_sets in (("fwd", fwd, [s[:2] for s in sets]), ("fwd_bwd", fwd_bwd, sets)):
        fn = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*fn_sets[0]))
        rec["compile_s"].append(round(time.perf_counter() - t0, 2))
        # Warm-up: each set once (the compile call above ran the first).
        ms = bench(fn, fn_sets, run, warmup=len(sets))
        rec[f"{label}_ms"], rec[f"{label}_range"] = ms[0], ms[1:]
    return rec


def profile(shape, cfg, key, *, run: Run):
    """GPU microseconds per forward+backward call (64 segments a row), by kernel, over a trace
    of 5 calls (harness.kernel_times)."""
    args, seg = workloads.scan_inputs(key, *shape, jnp.bfloat16, NUM_SEGMENTS)
    dy = jax.random.normal(key, shape[:3], jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(
        lambda a, s, ct: jax.vjp(
            lambda *x: selective_scan_pallas(
                *x, config=cfg, interpret=run.interpret, delta_softplus=True, segment_ids=s
            ),
            *a,
        )[1](ct)
    )
    with tempfile.TemporaryDirectory(prefix="scan_trace_") as tmp:
        harness.trace(f, [(tuple(args.values()), seg, dy)], 5, tmp)
        events, lines = harness.device_events(tmp)
    if not events:
        return dict(error="no GPU kernels in the trace", lines=lines)
    return harness.kernel_times(events, 5, prefixes=("selective_scan_",))


def parse_args(argv):
    p = harness.argument_parser(__doc__)
    p.add_argument(
        "--variants",
        default="",
        help="extra configs, comma-separated: ScanConfig overrides of the heuristic's "
        "config as field=value joined by ':' (e.g. state_split=2:window=8)",
    )
    p.add_argument("--no-ref", action="store_true")
    p.add_argument("--segs", default=None, help="default noseg,seg64 (smoke: noseg)")
    p.add_argument("--profile", default="", help="configs to split by kernel, as --variants")
    p.add_argument(
        "--shapes",
        default="",
        help="indices into ANCHORS to time, or b:l:d:n shapes, e.g. 0,8:2048:4096:16",
    )
    harness.add_anchor_args(p)
    args = p.parse_args(argv)
    if args.anchor is not None and not (args.anchor / ANCHOR_SCRIPT).is_file():
        p.error(f"--anchor {args.anchor}: no {ANCHOR_SCRIPT} there")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    new = harness.new_result("scan", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke)
    info, out = new.info, new.path
    run = Run(
        interpret=info.backend == "cpu",
        groups=1 if args.smoke else 7,
        per_group=1 if args.smoke else 5,
        backend=info.backend,
    )
    anchors = {SMOKE_SHAPE: (1.0, 1.0)} if args.smoke else ANCHORS
    print(f"device={info.kind} backend={info.backend} jax={jax.__version__}", flush=True)
    result = dict(**new.header, anchors_ms={str(k): v for k, v in anchors.items()}, timings=[])
    key = jax.random.PRNGKey(0)

    shapes = list(anchors)
    if args.shapes:
        shapes = [
            list(anchors)[int(i)] if ":" not in i else workloads.parse_shape(i)
            for i in args.shapes.split(",")
        ]
    for v in filter(None, args.profile.split(",")):
        cfg = _resolve(_parse_cfg(v), shapes[0])
        try:
            r = profile(shapes[0], cfg, jax.random.fold_in(key, 200), run=run)
        except Exception as e:
            traceback.print_exc()
            r = dict(error=repr(e)[:300])
        print("PROFILE", shapes[0], v, json.dumps(r), flush=True)
        result.setdefault("profiles", []).append(dict(shape=shapes[0], config=v, ms=r))
    segs = (args.segs or ("noseg" if args.smoke else "noseg,seg64")).split(",")
    variants = [("smoke", SMOKE_OVERRIDES) if args.smoke else ("", None)]
    variants += [(v, _parse_cfg(v)) for v in filter(None, args.variants.split(","))]
    for shape in shapes:
        for seg_mode in segs:
            for text, variant in variants:
                cfg = _resolve(variant, shape)
                name = f"pallas[{text}]" if text else "pallas"
                used = cfg or pick_config(*shape)
                try:
                    r = time_case(
                        shape, seg_mode, "pallas", cfg, jax.random.fold_in(key, 100), run=run
                    )
                except Exception as e:
                    traceback.print_exc()
                    r = dict(error=repr(e)[:300])
                r.update(shape=shape, seg=seg_mode, impl=name, config=dataclasses.asdict(used))
                if "fwd_bwd_ms" in r and shape in anchors:
                    f, b = anchors[shape]
                    r["ratio_fwd_vs_mamba"] = r["fwd_ms"] / f
                    r["ratio_fwd_bwd_vs_mamba"] = r["fwd_bwd_ms"] / (f + b)
                print("TIME", json.dumps(r), flush=True)
                result["timings"].append(r)
                harness.write_json(out, result)
            if not args.no_ref and seg_mode == "noseg":
                try:
                    r = time_case(
                        shape, seg_mode, "reference", None, jax.random.fold_in(key, 100), run=run
                    )
                except Exception as e:
                    r = dict(error=repr(e)[:300])
                r.update(shape=shape, seg=seg_mode, impl="xla_reference")
                print("TIME", json.dumps(r), flush=True)
                result["timings"].append(r)

    if args.anchor is not None:
        result["anchor"] = harness.run_anchor(
            args.anchor / ANCHOR_SCRIPT, pythonpath=args.anchor_pythonpath
        )
        print(f"anchor: {result['anchor']['status']}", flush=True)
    harness.write_json(out, result)

    print(f"\n{info.kind}, jax {jax.__version__}, {result['date']}")
    print(
        f"{'shape (b,l,d,n)':>22} {'seg':>6} {'impl':>22} {'fwd ms':>8} {'f+b ms':>8} "
        f"{'fwd/mamba':>9} {'f+b/mamba':>9} {'compile s':>10}"
    )
    for r in result["timings"]:
        if "fwd_ms" not in r:
            print(
                f"{str(r['shape']):>22} {r['seg']:>6} {r['impl']:>22} "
                f"ERROR {r.get('error', '')[:60]}"
            )
            continue
        print(
            f"{str(r['shape']):>22} {r['seg']:>6} {r['impl']:>22} {r['fwd_ms']:8.3f} "
            f"{r['fwd_bwd_ms']:8.3f} {r.get('ratio_fwd_vs_mamba', float('nan')):9.2f} "
            f"{r.get('ratio_fwd_bwd_vs_mamba', float('nan')):9.2f} {str(r['compile_s']):>10}"
        )
    print(f"wrote {out}")
    return 0


def _parse_cfg(v):
    """field=value pairs joined by ":" (e.g. state_split=2:window=8): overrides of the
    heuristic's config of each timed shape."""
    return workloads.scan_config_overrides(v.split(":"))


def _resolve(overrides, shape):
    """A variant for one shape: the overrides applied to the heuristic's config there."""
    return None if overrides is None else dataclasses.replace(pick_config(*shape), **overrides)


if __name__ == "__main__":
    sys.exit(main())
