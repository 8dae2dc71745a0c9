"""Selective scan on GPU: check the Pallas kernels against the reference, then time them.

    PYTHONPATH=. python3 benchmarks/bench_scan.py [--out DIR] [--shapes 0,1] [--segs seg64]
        [--variants chunk:block_d:bwd_block_d:window:ckpt:reduce[:unroll[:prefetch]],...]
        [--profile CONFIGS] [--no-check] [--no-ref] [--anchor DIR] [--smoke]

1. Correctness: forward and gradients (random cotangent) of the Pallas kernels against the
   float64 reference on odd shapes (ragged length, d_inner not a multiple of the block,
   segments of length 1, final states), bf16 and f32. Prints BAD, but timing still runs.
2. Timing: forward and forward+backward on the four anchor shapes (bf16 u/delta/z/B/C, f32
   A/D/delta_bias, softplus, z and D on), without segments and with 64 random-length segments
   a row; plus the XLA reference. harness.time_calls: median of 7 groups of 5 back-to-back calls
   after warm-up, the inputs rotated between sets (harness.rotation_count: at least two, and
   together at least twice the L2, so no call finds its inputs in the L2).
3. --profile: each kernel and XLA piece of forward+backward timed alone.
4. Prints a table last; writes --out/scan_<slug>.json (default benchmarks/results/) after every
   timing, so a run cut off at its time limit keeps what it measured.
5. --anchor DIR: runs DIR/scan_torch.py (the mamba_ssm side, its own fixed shapes;
   harness.run_anchor: DIR/scan_torch.py FILE, with --anchor-pythonpath as its PYTHONPATH) in the
   same call, its JSON under "anchor".
On CPU the kernels run through the Pallas interpreter; --smoke: one tiny shape without segments
(the check has some), a kernel config with nothing unrolled, one check, one call per timing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, workloads
from jax_packmamba.ops.selective_scan import selective_scan_reference
from pallas_kernels.selective_scan import ScanConfig, pick_config, selective_scan_pallas

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


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(shape, dtype, seg_mode, key, config=None, *, run: Run):
    batch, length, d_inner, d_state = shape
    nseg = {"none": None, "random": 5, "ones": length}[seg_mode]
    args, seg = workloads.scan_inputs(key, batch, length, d_inner, d_state, dtype, nseg)
    if seg_mode == "ones":
        seg = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    kw = dict(delta_softplus=True, segment_ids=seg, return_final_states=True,
              num_segments=nseg or 1)
    names = list(args)

    def pallas(*a):
        return selective_scan_pallas(*a, config=config, interpret=run.interpret, **kw)

    out, vjp = jax.vjp(jax.jit(pallas), *args.values())
    cts = jax.tree.map(
        lambda x: jax.random.normal(jax.random.fold_in(key, 7), x.shape).astype(x.dtype),
        out)
    grads = jax.jit(vjp)(cts)
    with jax.enable_x64(True):
        a64 = [np.asarray(x, np.float64) for x in args.values()]
        out_r, vjp_r = jax.vjp(lambda *a: selective_scan_reference(*a, **kw), *a64)
        grads_r = vjp_r(jax.tree.map(lambda c, o: np.asarray(c, o.dtype), cts, out_r))
        out_r = jax.tree.map(np.asarray, out_r)
        grads_r = jax.tree.map(np.asarray, grads_r)
    errs = {"y": rel(out[0], out_r[0]), "final": rel(out[1], out_r[1])}
    for n, g, gr in zip(names, grads, grads_r):
        errs["d" + n] = rel(g, gr)
    # bf16 inputs are rounded before both runs; what is left is bf16 rounding of outputs and
    # gradients, and longer rows accumulate more of it.
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    ok = all(np.isfinite(v) and v < tol for v in errs.values())
    return ok, errs


def bench(fn, arg_sets, run: Run, *, warmup=1):
    """(median, min, max) ms per call (harness.time_calls, rotating over arg_sets)."""
    t = harness.time_calls(fn, arg_sets, warmup=warmup, groups=run.groups,
                           per_group=run.per_group)
    return 1e3 * t.median_s, 1e3 * t.min_s, 1e3 * t.max_s


def scan_fn(impl, kw, config=None, *, interpret=False):
    def f(*a):
        if impl == "pallas":
            return selective_scan_pallas(*a, config=config, interpret=interpret, **kw)
        return selective_scan_reference(*a, **kw)
    return f


def time_case(shape, seg_mode, impl, config=None, key=None, *, run: Run):
    batch, length, d_inner, d_state = shape
    nseg = NUM_SEGMENTS if seg_mode == "seg64" else None

    def input_set(i):
        args, seg = workloads.scan_inputs(jax.random.fold_in(key, i), *shape, jnp.bfloat16, nseg)
        ct = jax.random.normal(jax.random.fold_in(key, 10 + i), (batch, length, d_inner),
                               jnp.float32).astype(jnp.bfloat16)
        return tuple(args.values()), seg, ct

    first = input_set(0)
    n_sets = harness.rotation_count(harness.tree_bytes(first), backend=run.backend)
    sets = [first] + [input_set(i) for i in range(1, n_sets)]
    kw = dict(delta_softplus=True)

    def fwd(args, seg):
        return scan_fn(impl, dict(kw, segment_ids=seg), config, interpret=run.interpret)(*args)

    def fwd_bwd(args, seg, ct):
        y, vjp = jax.vjp(lambda *a: scan_fn(impl, dict(kw, segment_ids=seg), config,
                                            interpret=run.interpret)(*a), *args)
        return vjp(ct)

    f1 = jax.jit(fwd)
    f2 = jax.jit(fwd_bwd)
    t0 = time.perf_counter()
    jax.block_until_ready(f1(*sets[0][:2]))
    c1 = time.perf_counter() - t0
    # Warm-up: each set once (the compile call above ran the first).
    fwd_ms = bench(f1, [s[:2] for s in sets], run, warmup=len(sets))
    t0 = time.perf_counter()
    jax.block_until_ready(f2(*sets[0]))
    c2 = time.perf_counter() - t0
    fb_ms = bench(f2, sets, run, warmup=len(sets))
    return dict(fwd_ms=fwd_ms[0], fwd_range=fwd_ms[1:], fwd_bwd_ms=fb_ms[0],
                fwd_bwd_range=fb_ms[1:], compile_s=[round(c1, 2), round(c2, 2)],
                input_sets=len(sets))


def profile(shape, cfg, key, *, run: Run):
    """Median ms of each piece of forward+backward (64 segments a row), run one at a time on
    one input set (not rotated)."""
    from pallas_kernels.selective_scan import kernel as K, kernel_bwd as KB, vjp as V

    args, seg = workloads.scan_inputs(key, *shape, jnp.bfloat16, NUM_SEGMENTS)
    u, delta, A, B, C, D, z, bias = args.values()
    plan, rst, _ = V.prepare(u, A, z, D, bias, interpret=run.interpret, delta_softplus=True,
                             segment_ids=seg, return_final_states=False, num_segments=None,
                             config=cfg)
    st, cfg = plan.st, plan.cfg
    stb = dataclasses.replace(st, block_d=cfg.bwd_block_d)
    launch = dict(batch=shape[0], num_warps=cfg.num_warps, interpret=run.interpret)
    a2 = V._a2(A)
    dy = jax.random.normal(key, u.shape, jnp.float32).astype(u.dtype)
    res = {}

    def states(u, delta, a2, bias, B, rst):
        return K.chunk_states(V._inputs(u=u, delta=delta, a2=a2, bias=bias, B=B, rst=rst), st=st,
                              **launch)

    def outputs(u, delta, a2, bias, D, B, C, z, rst, h_in):
        return K.chunk_outputs(V._inputs(u=u, delta=delta, a2=a2, bias=bias, D=D, B=B, C=C, z=z,
                                         rst=rst, h_in=h_in), st=st, y_dtype=u.dtype, **launch)

    def dstates(delta, a2, bias, C, z, dy, rst):
        return KB.chunk_dstates(V._inputs(delta=delta, a2=a2, bias=bias, C=C, z=z, dy=dy, rst=rst),
                                st=stb, **launch)

    reduce = V._reduce_mode(cfg, stb)

    def grads(u, delta, a2, bias, D, B, C, z, dy, rst, h_in, dh_out):
        g = KB.chunk_grads(V._inputs(u=u, delta=delta, a2=a2, bias=bias, D=D, B=B, C=C, z=z, dy=dy,
                                     rst=rst, h_in=h_in, dh_out=dh_out),
                           st=stb, dtypes=dict(u=u.dtype, delta=delta.dtype, z=z.dtype),
                           ckpt=cfg.ckpt, window=cfg.window, reduce=reduce,
                           parts=V._state_split(cfg, stb, reduce), maxnreg=cfg.grads_maxnreg,
                           **launch)
        return g["du"], g["ddelta"], g["dz"], g["dBC"].sum(1), g["dA"].sum((0, 1))

    def timed(name, fn, *a):
        f = jax.jit(fn)
        out = f(*a)
        res[name] = bench(f, [a], run)[0]
        return out

    h_loc, decay = timed("fwd_chunk_states", states, u, delta, a2, bias, B, rst)
    h_in = timed("fwd_combine_xla", V._chunk_initial_states, h_loc, decay)
    timed("fwd_chunk_outputs", outputs, u, delta, a2, bias, D, B, C, z, rst, h_in)
    dh_loc = timed("bwd_chunk_dstates", dstates, delta, a2, bias, C, z, dy, rst)
    dh_out = timed("bwd_combine_xla", V._chunk_final_dstates, dh_loc, decay)
    timed("bwd_chunk_grads+sums", grads, u, delta, a2, bias, D, B, C, z, dy, rst, h_in, dh_out)
    return res


def parse_args(argv):
    p = harness.argument_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="one shape, no reference timing")
    p.add_argument("--variants", default="",
                   help="extra configs: chunk:block_d:bwd_block_d:window:ckpt:reduce[:unroll"
                        "[:prefetch]] or field=value:field=value, comma-separated")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-ref", action="store_true")
    p.add_argument("--no-default", action="store_true", help="time only --variants")
    p.add_argument("--segs", default=None, help="default noseg,seg64 (smoke: noseg)")
    p.add_argument("--new-checks", action="store_true", help="check only the non-default configs")
    p.add_argument("--profile", default="", help="configs to profile piece by piece, as --variants")
    p.add_argument("--shapes", default="",
                   help="indices into ANCHORS to time, or b:l:d:n shapes, e.g. 0,8:2048:4096:16")
    harness.add_anchor_args(p)
    args = p.parse_args(argv)
    if args.anchor is not None and not (args.anchor / ANCHOR_SCRIPT).is_file():
        p.error(f"--anchor {args.anchor}: no {ANCHOR_SCRIPT} there")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    new = harness.new_result("scan", script=__file__, argv=argv, out_dir=args.out,
                             smoke=args.smoke)
    info, out = new.info, new.path
    run = Run(interpret=info.backend == "cpu", groups=1 if args.smoke else 7,
              per_group=1 if args.smoke else 5, backend=info.backend)
    anchors = {SMOKE_SHAPE: (1.0, 1.0)} if args.smoke else ANCHORS
    print(f"device={info.kind} backend={info.backend} jax={jax.__version__}", flush=True)
    result = dict(**new.header, anchors_ms={str(k): v for k, v in anchors.items()}, checks=[],
                  timings=[])
    key = jax.random.PRNGKey(0)

    if not args.no_check:
        smoke_cfg = dataclasses.replace(pick_config(1, 24, 32, 4), **SMOKE_OVERRIDES)
        cases = [((1, 24, 32, 4), jnp.float32, "random", smoke_cfg)] if args.smoke else [
            ((2, 1000, 80, 16), jnp.float32, "random", None),
            ((2, 1000, 80, 16), jnp.bfloat16, "random", None),
            ((1, 777, 64, 16), jnp.float32, "ones", None),
            ((1, 1, 48, 16), jnp.float32, "none", None),
            ((2, 300, 96, 8), jnp.float32, "random", ScanConfig(chunk=32, ckpt=16, window=4)),
        ]
        new = [
            ((2, 1000, 80, 16), jnp.float32, "random", ScanConfig(chunk=64, state_split=2)),
            ((2, 1000, 80, 16), jnp.bfloat16, "random",
             ScanConfig(chunk=64, state_split=2, grads_maxnreg=128)),
            ((1, 777, 64, 16), jnp.float32, "ones", ScanConfig(chunk=64, state_split=4)),
            ((2, 1000, 96, 16), jnp.float32, "random",
             ScanConfig(chunk=64, state_split=2, window=8, ckpt=16)),
            ((2, 1000, 80, 16), jnp.float32, "random", ScanConfig(chunk=64, reduce="shfl")),
        ]
        cases = new if args.new_checks else cases
        for i, (shape, dtype, seg_mode, cfg) in enumerate(cases):
            try:
                ok, errs = check(shape, dtype, seg_mode, jax.random.fold_in(key, i), cfg, run=run)
            except Exception as e:  # keep going: the timing part is still worth its device time
                traceback.print_exc()
                ok, errs = False, {"error": repr(e)[:300]}
            worst = max(errs.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9)
            print(f"CHECK {'OK ' if ok else 'BAD'} {shape} {jnp.dtype(dtype).name} seg={seg_mode} "
                  f"worst {worst}", flush=True)
            result["checks"].append(dict(shape=shape, dtype=jnp.dtype(dtype).name, seg=seg_mode,
                                         ok=ok, errs=errs))

    shapes = list(anchors)[:1] if args.quick else list(anchors)
    if args.shapes:
        shapes = [list(anchors)[int(i)] if ":" not in i else workloads.parse_shape(i)
                  for i in args.shapes.split(",")]
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
    variants = [] if args.no_default else [SMOKE_OVERRIDES if args.smoke else None]
    variants += [_parse_cfg(v) for v in filter(None, args.variants.split(","))]
    for shape in shapes:
        for seg_mode in segs:
            for variant in variants:
                cfg = _resolve(variant, shape)
                name = "pallas" if cfg is None else "pallas[" + _cfg_str(cfg) + "]"
                used = cfg or pick_config(*shape)
                try:
                    r = time_case(shape, seg_mode, "pallas", cfg, jax.random.fold_in(key, 100),
                                  run=run)
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
            if not args.no_ref and not args.quick and seg_mode == "noseg":
                try:
                    r = time_case(shape, seg_mode, "reference", None, jax.random.fold_in(key, 100),
                                  run=run)
                except Exception as e:
                    r = dict(error=repr(e)[:300])
                r.update(shape=shape, seg=seg_mode, impl="xla_reference")
                print("TIME", json.dumps(r), flush=True)
                result["timings"].append(r)

    if args.anchor is not None:
        result["anchor"] = harness.run_anchor(
            args.anchor / ANCHOR_SCRIPT, pythonpath=args.anchor_pythonpath)
        print(f"anchor: {result['anchor']['status']}", flush=True)
    harness.write_json(out, result)

    print(f"\n{info.kind}, jax {jax.__version__}, {result['date']}")
    print(f"{'shape (b,l,d,n)':>22} {'seg':>6} {'impl':>22} {'fwd ms':>8} {'f+b ms':>8} "
          f"{'fwd/mamba':>9} {'f+b/mamba':>9} {'compile s':>10}")
    for r in result["timings"]:
        if "fwd_ms" not in r:
            print(f"{str(r['shape']):>22} {r['seg']:>6} {r['impl']:>22} "
                  f"ERROR {r.get('error', '')[:60]}")
            continue
        print(f"{str(r['shape']):>22} {r['seg']:>6} {r['impl']:>22} {r['fwd_ms']:8.3f} "
              f"{r['fwd_bwd_ms']:8.3f} {r.get('ratio_fwd_vs_mamba', float('nan')):9.2f} "
              f"{r.get('ratio_fwd_bwd_vs_mamba', float('nan')):9.2f} {str(r['compile_s']):>10}")
    for c in result["checks"]:
        print("check", "ok " if c["ok"] else "BAD", c["shape"], c["dtype"], c["seg"])
    print(f"wrote {out}")
    return 0


def _parse_cfg(v):
    """chunk:block_d:bwd_block_d:window:ckpt:reduce[:unroll[:prefetch]], or field=value pairs
    joined by ":" (e.g. state_split=2:window=8), which override the heuristic's config of each
    timed shape and come back as a dict."""
    if "=" in v:
        return workloads.scan_config_overrides(v.split(":"))
    f = v.split(":")
    kw = dict(chunk=int(f[0]), block_d=int(f[1]), bwd_block_d=int(f[2]), window=int(f[3]),
              ckpt=int(f[4]), reduce=f[5])
    if len(f) > 6:
        kw["unroll"] = int(f[6])
    if len(f) > 7:
        kw["prefetch"] = bool(int(f[7]))
    return ScanConfig(**kw)


def _resolve(cfg, shape):
    """A variant for one shape: overrides (dict) apply to the heuristic's config there."""
    if isinstance(cfg, dict):
        return dataclasses.replace(pick_config(*shape), **cfg)
    return cfg


def _cfg_str(c):
    return (f"{c.chunk}:{c.block_d}:{c.bwd_block_d}:{c.window}:{c.ckpt}:{c.reduce}:{c.unroll}:"
            f"{int(c.prefetch)}" + (f":split{c.state_split}" if c.state_split > 1 else "")
            + (f":maxnreg{c.grads_maxnreg}" if c.grads_maxnreg else ""))


if __name__ == "__main__":
    sys.exit(main())
