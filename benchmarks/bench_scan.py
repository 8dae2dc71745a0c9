"""Selective scan on GPU: check the Pallas kernels against the reference, then time them.

    PYTHONPATH=. python3 benchmarks/bench_scan.py [--out DIR] [--shapes 0,1] [--segs seg64]
        [--variants chunk:block_d:bwd_block_d:window:ckpt:reduce[:unroll[:prefetch]],...]
        [--profile CONFIGS] [--no-check] [--no-ref] [--cpu-smoke]

1. Correctness: forward and gradients (random cotangent) of the Pallas kernels against the
   float64 reference on odd shapes (ragged length, d_inner not a multiple of the block,
   segments of length 1, final states), bf16 and f32. Prints BAD, but timing still runs.
2. Timing: forward and forward+backward on the four ANCHORS.md shapes (bf16 u/delta/z/B/C, f32
   A/D/delta_bias, softplus, z and D on), without segments and with 64 random-length segments
   a row; plus the XLA reference. Median of 7 groups of 5 back-to-back calls after warm-up,
   inputs rotated between two sets (each larger than the 50-60 MB L2).
3. --profile: each kernel and XLA piece of forward+backward timed alone.
4. Prints a table last, writes scan_<kind>.json to --out and to benchmarks/results/ after
   every timing (a run cut off at its time limit keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.selective_scan import selective_scan, selective_scan_reference
from pallas_kernels.selective_scan import ScanConfig, pick_config, selective_scan_pallas

# mamba_ssm 2.3.2 on one H200 (ANCHORS.md): (batch, length, d_inner, d_state) -> (fwd, bwd) ms.
ANCHORS = {
    (1, 8192, 4096, 16): (0.736, 2.745),
    (8, 2048, 2048, 16): (0.595, 2.329),
    (1, 2048, 4096, 16): (0.161, 0.697),
    (4, 2048, 1536, 16): (0.236, 0.934),
}
NUM_SEGMENTS = 64
INTERPRET = False  # --cpu-smoke: run this script's code paths on CPU through the interpreter


def make_inputs(key, batch, length, d_inner, d_state, dtype, num_segments=None):
    ks = jax.random.split(key, 9)
    f32 = jnp.float32
    args = dict(
        u=jax.random.normal(ks[0], (batch, length, d_inner), f32).astype(dtype),
        delta=(0.5 * jax.random.normal(ks[1], (batch, length, d_inner), f32) - 2.0).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d_inner, d_state), f32)),
        B=jax.random.normal(ks[3], (batch, length, d_state), f32).astype(dtype),
        C=jax.random.normal(ks[4], (batch, length, d_state), f32).astype(dtype),
        D=jax.random.normal(ks[5], (d_inner,), f32),
        z=jax.random.normal(ks[6], (batch, length, d_inner), f32).astype(dtype),
        delta_bias=0.3 * jax.random.normal(ks[7], (d_inner,), f32),
    )
    seg = None
    if num_segments:
        # num_segments runs of random lengths (at least 1) per row, ids 0..num_segments-1.
        rng = np.random.default_rng(int(jax.random.randint(ks[8], (), 0, 2**30)))
        seg = np.zeros((batch, length), np.int32)
        for b in range(batch):
            cuts = np.sort(rng.choice(np.arange(1, length), num_segments - 1, replace=False))
            seg[b] = np.searchsorted(cuts, np.arange(length), side="right")
        seg = jnp.asarray(seg)
    return args, seg


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(shape, dtype, seg_mode, key, config=None):
    batch, length, d_inner, d_state = shape
    nseg = {"none": None, "random": 5, "ones": length}[seg_mode]
    args, seg = make_inputs(key, batch, length, d_inner, d_state, dtype, nseg)
    if seg_mode == "ones":
        seg = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    kw = dict(delta_softplus=True, segment_ids=seg, return_final_states=True,
              num_segments=nseg or 1)
    names = list(args)

    def pallas(*a):
        return selective_scan_pallas(*a, config=config, interpret=INTERPRET, **kw)

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


def bench(fn, arg_sets, *, groups=7, per_group=5):
    if INTERPRET:
        groups = per_group = 1
    """Median ms per call over `groups` groups of `per_group` back-to-back calls."""
    out = fn(*arg_sets[0])
    jax.block_until_ready(out)
    for a in arg_sets:  # warm both sets
        jax.block_until_ready(fn(*a))
    times = []
    for _ in range(groups):
        t = time.perf_counter()
        for i in range(per_group):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / per_group * 1e3)
    return statistics.median(times), min(times), max(times)


def scan_fn(impl, kw, config=None):
    def f(*a):
        if impl == "pallas":
            return selective_scan_pallas(*a, config=config, interpret=INTERPRET, **kw)
        return selective_scan_reference(*a, **kw)
    return f


def time_case(shape, seg_mode, impl, config=None, key=None):
    batch, length, d_inner, d_state = shape
    sets = []
    cts = []
    for i in range(2):
        args, seg = make_inputs(jax.random.fold_in(key, i), *shape, jnp.bfloat16,
                                NUM_SEGMENTS if seg_mode == "seg64" else None)
        sets.append((tuple(args.values()), seg))
        cts.append(jax.random.normal(jax.random.fold_in(key, 10 + i), (batch, length, d_inner),
                                     jnp.float32).astype(jnp.bfloat16))
    kw = dict(delta_softplus=True)

    def fwd(args, seg):
        return scan_fn(impl, dict(kw, segment_ids=seg), config)(*args)

    def fwd_bwd(args, seg, ct):
        y, vjp = jax.vjp(lambda *a: scan_fn(impl, dict(kw, segment_ids=seg), config)(*a), *args)
        return vjp(ct)

    f1 = jax.jit(fwd)
    f2 = jax.jit(fwd_bwd)
    t0 = time.perf_counter()
    jax.block_until_ready(f1(*sets[0]))
    c1 = time.perf_counter() - t0
    fwd_ms = bench(f1, sets)
    t0 = time.perf_counter()
    jax.block_until_ready(f2(*sets[0], cts[0]))
    c2 = time.perf_counter() - t0
    fb_ms = bench(f2, [(a, s, c) for (a, s), c in zip(sets, cts)])
    return dict(fwd_ms=fwd_ms[0], fwd_range=fwd_ms[1:], fwd_bwd_ms=fb_ms[0],
                fwd_bwd_range=fb_ms[1:], compile_s=[round(c1, 2), round(c2, 2)])


def profile(shape, cfg, key):
    """Median ms of each piece of forward+backward (64 segments a row), run one at a time."""
    import dataclasses as dc
    from pallas_kernels.selective_scan import kernel as K, kernel_bwd as KB, vjp as V

    args, seg = make_inputs(key, *shape, jnp.bfloat16, NUM_SEGMENTS)
    u, delta, A, B, C, D, z, bias = args.values()
    plan, rst, _ = V.prepare(u, A, z, D, bias, interpret=INTERPRET, delta_softplus=True,
                             segment_ids=seg, return_final_states=False, num_segments=None,
                             config=cfg)
    st, cfg = plan.st, plan.cfg
    stb = dc.replace(st, block_d=cfg.bwd_block_d)
    launch = dict(batch=shape[0], num_warps=cfg.num_warps, interpret=INTERPRET)
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
        res[name] = bench(f, [a])[0]
        return out

    h_loc, decay = timed("fwd_chunk_states", states, u, delta, a2, bias, B, rst)
    h_in = timed("fwd_combine_xla", V._chunk_initial_states, h_loc, decay)
    timed("fwd_chunk_outputs", outputs, u, delta, a2, bias, D, B, C, z, rst, h_in)
    dh_loc = timed("bwd_chunk_dstates", dstates, delta, a2, bias, C, z, dy, rst)
    dh_out = timed("bwd_combine_xla", V._chunk_final_dstates, dh_loc, decay)
    timed("bwd_chunk_grads+sums", grads, u, delta, a2, bias, D, B, C, z, dy, rst, h_in, dh_out)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="one shape, no reference timing")
    p.add_argument("--variants", default="", help="extra configs: chunk:block_d:num_warps,...")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-ref", action="store_true")
    p.add_argument("--no-default", action="store_true", help="time only --variants")
    p.add_argument("--segs", default="noseg,seg64")
    p.add_argument("--new-checks", action="store_true", help="check only the non-default configs")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--profile", default="", help="configs to profile piece by piece, as --variants")
    p.add_argument("--shapes", default="",
                   help="indices into ANCHORS to time, or b:l:d:n shapes, e.g. 0,8:2048:4096:16")
    args = p.parse_args()
    global INTERPRET, ANCHORS
    if args.cpu_smoke:
        INTERPRET = True
        ANCHORS = {(1, 100, 40, 4): (1.0, 1.0)}
    dev = jax.devices()[0]
    print(f"device={dev.device_kind} platform={dev.platform} jax={jax.__version__}", flush=True)
    result = dict(
        device=dev.device_kind, jax=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="PYTHONPATH=. python3 benchmarks/bench_scan.py " + " ".join(sys.argv[1:]),
        anchors_ms={str(k): v for k, v in ANCHORS.items()}, checks=[], timings=[],
    )
    key = jax.random.PRNGKey(0)

    if not args.no_check:
        cases = [((1, 50, 40, 4), jnp.float32, "random", None)] if args.cpu_smoke else [
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
                ok, errs = check(shape, dtype, seg_mode, jax.random.fold_in(key, i), cfg)
            except Exception as e:  # keep going: the timing part is still worth its device time
                traceback.print_exc()
                ok, errs = False, {"error": repr(e)[:300]}
            worst = max(errs.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9)
            print(f"CHECK {'OK ' if ok else 'BAD'} {shape} {jnp.dtype(dtype).name} seg={seg_mode} "
                  f"worst {worst}", flush=True)
            result["checks"].append(dict(shape=shape, dtype=jnp.dtype(dtype).name, seg=seg_mode,
                                         ok=ok, errs=errs))

    shapes = list(ANCHORS)[:1] if args.quick else list(ANCHORS)
    if args.shapes:
        shapes = [list(ANCHORS)[int(i)] if ":" not in i else tuple(map(int, i.split(":")))
                  for i in args.shapes.split(",")]
    for v in filter(None, args.profile.split(",")):
        cfg = _resolve(_parse_cfg(v), shapes[0])
        try:
            r = profile(shapes[0], cfg, jax.random.fold_in(key, 200))
        except Exception as e:
            traceback.print_exc()
            r = dict(error=repr(e)[:300])
        print("PROFILE", shapes[0], v, json.dumps(r), flush=True)
        result.setdefault("profiles", []).append(dict(shape=shapes[0], config=v, ms=r))
    variants = [] if args.no_default else [None]
    variants += [_parse_cfg(v) for v in filter(None, args.variants.split(","))]
    for shape in shapes:
        for seg_mode in args.segs.split(","):
            for variant in variants:
                cfg = _resolve(variant, shape)
                name = "pallas" if cfg is None else "pallas[" + _cfg_str(cfg) + "]"
                used = cfg or pick_config(*shape)
                try:
                    r = time_case(shape, seg_mode, "pallas", cfg, jax.random.fold_in(key, 100))
                except Exception as e:
                    traceback.print_exc()
                    r = dict(error=repr(e)[:300])
                r.update(shape=shape, seg=seg_mode, impl=name, config=dataclasses.asdict(used))
                if "fwd_bwd_ms" in r and shape in ANCHORS:
                    f, b = ANCHORS[shape]
                    r["ratio_fwd_vs_mamba"] = r["fwd_ms"] / f
                    r["ratio_fwd_bwd_vs_mamba"] = r["fwd_bwd_ms"] / (f + b)
                print("TIME", json.dumps(r), flush=True)
                result["timings"].append(r)
                _write(result, args.out, dev)
            if not args.no_ref and not args.quick and seg_mode == "noseg":
                try:
                    r = time_case(shape, seg_mode, "reference", None, jax.random.fold_in(key, 100))
                except Exception as e:
                    r = dict(error=repr(e)[:300])
                r.update(shape=shape, seg=seg_mode, impl="xla_reference")
                print("TIME", json.dumps(r), flush=True)
                result["timings"].append(r)

    _write(result, args.out, dev)

    print(f"\n{dev.device_kind}, jax {jax.__version__}, {result['date']}")
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


def _parse_cfg(v):
    """chunk:block_d:bwd_block_d:window:ckpt:reduce[:unroll[:prefetch]], or field=value pairs
    joined by ":" (e.g. state_split=2:window=8), which override the heuristic's config of each
    timed shape and come back as a dict."""
    if "=" in v:
        return {k: _field(k, x) for k, x in (kv.split("=") for kv in v.split(":"))}
    f = v.split(":")
    kw = dict(chunk=int(f[0]), block_d=int(f[1]), bwd_block_d=int(f[2]), window=int(f[3]),
              ckpt=int(f[4]), reduce=f[5])
    if len(f) > 6:
        kw["unroll"] = int(f[6])
    if len(f) > 7:
        kw["prefetch"] = bool(int(f[7]))
    return ScanConfig(**kw)


def _field(name, text):
    default = getattr(ScanConfig(), name)
    if default is None:  # optional ints (grads_maxnreg)
        return None if text == "none" else int(text)
    return bool(int(text)) if isinstance(default, bool) else type(default)(text)


def _resolve(cfg, shape):
    """A variant for one shape: overrides (dict) apply to the heuristic's config there."""
    if isinstance(cfg, dict):
        return dataclasses.replace(pick_config(*shape), **cfg)
    return cfg


def _cfg_str(c):
    return (f"{c.chunk}:{c.block_d}:{c.bwd_block_d}:{c.window}:{c.ckpt}:{c.reduce}:{c.unroll}:"
            f"{int(c.prefetch)}" + (f":split{c.state_split}" if c.state_split > 1 else "")
            + (f":maxnreg{c.grads_maxnreg}" if c.grads_maxnreg else ""))


def _write(result, out_dir, dev):
    # Rewritten after every timing, so a run cut off at its time limit still leaves its numbers.
    text = json.dumps(result, indent=1, default=str)
    for path in (os.path.join(out_dir, f"scan_{_kind(dev)}.json"),
                 os.path.join(os.path.dirname(__file__), "results", f"scan_{_kind(dev)}.json")):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            print("could not write", path, e)


def _kind(dev):
    return "nvidia-h200" if "H200" in dev.device_kind else dev.device_kind.lower().replace(" ", "-")


if __name__ == "__main__":
    main()
