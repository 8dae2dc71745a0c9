"""Mamba-3 SISO and MIMO scans on GPU: the SSD core in the Pallas kernels against the pure-JAX
references.

    PYTHONPATH=. python3 benchmarks/bench_mamba3.py [--out DIR] [--shapes 0,1] [--chunks 64]
        [--no-ref] [--mimo-rank R [--impls pallas,reference_fused,reference]] [--profile]
        [--smoke]

Forward and forward+backward (jax.vjp, a fixed cotangent) of mamba3_scan at mamba3-1.5b's head
shapes (64 heads, headdim 64, d_state 128, 32 rotary angles, one group; Mamba3Config.preset):
inputs as the mixer feeds the op (x, z, B, C bf16; dt, A per token, trap, angles float32; D,
B_bias, C_bias float32), 64 random-length segments a row, for impl="pallas" at each --chunks
(the kernels' chunk; Mamba-3's default is 64) and the reference at chunk 64. Compile time is
reported apart; harness.time_calls: median of 7 groups of 5 back-to-back calls after a warm-up,
rotating between input sets that together hold twice the L2. Each kernel row also records
max |y - y_ref| / max |y_ref| against the reference on the first input set.
--mimo-rank R: mamba3_mimo_scan at rank R instead (no MIMO preset exists: the same heads, B and
C per rank, x_proj / z_proj / out_proj (h, R, p) float32, out_proj on), at MIMO_SHAPES; its
chunks count time steps (default 64 / R, mamba_ssm's advice: the fused axis's chunk is 64
tokens). --impls picks among "pallas" (the fused (L R)-long axis on the kernels),
"reference_fused" (the same form through the pure-JAX chunked SSD) and "reference" (R^2 SSD
heads, the independent form: R times the work; it runs out of memory at 16384 tokens on an
H100, hence MIMO_SHAPES' first, shorter shape). A case that fails (out of memory) is recorded
with its error and the run goes on. Results: mamba3_<device>_mimo<R>.json.
--profile: the GPU time of pallas fwd+bwd at the first chunk split by kernel ("ssd_*" kernels;
"xla" is the Mamba-3 glue and everything else), and the "xla" group by the source line of
each kernel's HLO instruction (xla_by_source).
Writes --out/mamba3_<device>.json after every measurement. mamba_ssm's own kernel
(mamba3_siso_combined, torch) is timed by benchmarks/mamba3_torch.py. Correctness lives in
tests/test_mamba3_pallas.py. --smoke: one tiny shape through the Pallas interpreter on CPU.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.bench_ssd import compile_fn, random_segments
from jax_packmamba.config import Mamba3Config
from jax_packmamba.ops.mamba3 import (
    mamba3_mimo_scan_pallas,
    mamba3_mimo_scan_reference,
    mamba3_scan_pallas,
    mamba3_scan_reference,
)

_PRESET = Mamba3Config.preset("1.5b")
HEADS = dict(
    heads=_PRESET.nheads,
    headdim=_PRESET.headdim,
    d_state=_PRESET.d_state,
    n_angles=_PRESET.num_rope_angles,
)
SHAPES = [(1, 16384), (8, 2048)]  # (batch, length)
MIMO_SHAPES = [(1, 4096), (1, 16384), (8, 2048)]
MIMO_IMPLS = ("pallas", "reference_fused", "reference")
NUM_SEGMENTS = 64
REF_CHUNK = 64  # mamba_ssm's Mamba-3 chunk_size
SMOKE = dict(shape=(1, 80), heads=2, headdim=16, d_state=16, n_angles=4, segments=4, chunk=32)
PROFILE_CALLS = 5


def input_set(i, batch, length, *, heads, headdim, d_state, n_angles, segments, rank=0):
    """(x, dt, A, trap, B, C, angles, D, z, B_bias, C_bias, segment_ids, cotangent); rank > 0:
    (x, dt, A, trap, B, C, angles, x_proj, D, z, z_proj, out_proj, B_bias, C_bias,
    segment_ids, cotangent), mamba3_mimo_scan's arguments."""
    rng = np.random.default_rng(300 + i)

    def normal(shape, scale=1.0, dtype=jnp.bfloat16):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32)).astype(dtype)

    f32 = jnp.float32
    rows, per_token = (batch, length, heads, headdim), (batch, length, heads)
    bc = (batch, length, 1, d_state) if not rank else (batch, length, rank, 1, d_state)
    dt = jnp.asarray(rng.uniform(0.001, 0.1, per_token), f32)  # softplus(dd_dt + dt_bias)
    A = -jax.nn.softplus(normal(per_token, 1.0, f32))  # -max(softplus(dd_A), A_floor)
    if rank:
        proj = (heads, rank, headdim)
        return (
            normal(rows),
            dt,
            jnp.minimum(A, -1e-4),
            normal(per_token, 1.0, f32),
            normal(bc),
            normal(bc),
            normal((batch, length, heads, n_angles), 1.0, f32),
            jnp.full(proj, 1.0 / rank, f32),  # mamba_ssm's initial mimo_x
            normal((heads,), 1.0, f32),
            normal(rows),
            jnp.ones(proj, f32),
            jnp.full(proj, 1.0 / rank, f32),
            jnp.ones((heads, rank, d_state), f32),
            jnp.ones((heads, rank, d_state), f32),
            random_segments(rng, batch, length, segments),
            normal(rows),
        )
    return (
        normal(rows),
        dt,
        jnp.minimum(A, -1e-4),
        normal(per_token, 1.0, f32),
        normal(bc),
        normal(bc),
        normal((batch, length, heads, n_angles), 1.0, f32),
        normal((heads,), 1.0, f32),
        normal(rows),
        jnp.ones((heads, d_state), f32),
        jnp.ones((heads, d_state), f32),
        random_segments(rng, batch, length, segments),
        normal(rows),
    )


def op_fns(impl, chunk, interpret, mimo=False):
    def f(*a):
        *xs, seg = a
        kw = dict(segment_ids=seg, chunk_size=chunk)
        if mimo and impl == "pallas":
            return mamba3_mimo_scan_pallas(*xs, interpret=interpret, **kw)
        if mimo:
            return mamba3_mimo_scan_reference(*xs, fused=impl == "reference_fused", **kw)
        if impl == "reference":
            return mamba3_scan_reference(*xs, **kw)
        return mamba3_scan_pallas(*xs, interpret=interpret, **kw)

    def fwd(*a):
        return f(*a[:-1])

    def fwdbwd(*a):
        # The output is returned too: a backward alone lets XLA drop a forward kernel whose
        # output nothing reads (docs/log.md).
        *xs, seg, ct = a
        y, vjp = jax.vjp(lambda *d: f(*d, seg), *xs)
        return y, vjp(ct)

    return fwd, fwdbwd


def time_case(fns, sets, *, interpret, smoke):
    rec, y = {}, None
    for label, fn in zip(("fwd", "fwdbwd"), fns):
        t0 = time.perf_counter()
        compiled = compile_fn(fn, interpret, *sets[0])
        rec[f"compile_s_{label}"] = time.perf_counter() - t0
        if label == "fwd":
            y = np.asarray(compiled(*sets[0]), np.float32)
        t = harness.time_calls(
            compiled, sets, groups=1 if smoke else 7, per_group=1 if smoke else 5
        )
        rec[f"{label}_ms"] = dict(
            median_ms=1e3 * t.median_s, min_ms=1e3 * t.min_s, max_ms=1e3 * t.max_s
        )
    return rec, y


def profile_case(fwdbwd, sets, *, interpret):
    from benchmarks.breakdown import hlo_sources

    compiled = compile_fn(fwdbwd, interpret, *sets[0])
    with tempfile.TemporaryDirectory(prefix="mamba3_trace_") as tmp:
        harness.trace(compiled, sets, PROFILE_CALLS, tmp)
        events, lines = harness.device_events(tmp)
    if not events:
        return dict(error="no GPU kernels in the trace", lines=lines)
    times = harness.kernel_times(events, PROFILE_CALLS, prefixes=("ssd_",))
    sources = hlo_sources(compiled.as_text())
    return dict(times, xla_by_source=xla_by_source(events, sources, PROFILE_CALLS))


def xla_by_source(events, sources: dict[str, str], calls: int, top: int = 30) -> dict:
    """{source line: {us_per_call, kernels}} of the kernels that are not the SSD kernels (the
    Mamba-3 glue: XLA's fusions, named by their HLO instruction), largest first, the `top`
    largest: where profile_case's "xla" group goes."""
    groups: dict[str, list] = {}
    for name, _, dur in events:
        if name.startswith("ssd_"):
            continue
        src = sources.get(name.replace(".", "_")) or f"? {name}"
        g = groups.setdefault(src, [0.0, set()])
        g[0] += dur
        g[1].add(name)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        src: dict(us_per_call=t / 1e3 / calls, kernels=sorted(names)) for src, (t, names) in ranked
    }


def mimo_impls(spec, no_ref):
    """--impls (comma-separated, None: all, or pallas alone with --no-ref) as a tuple."""
    if spec is None:
        return ("pallas",) if no_ref else MIMO_IMPLS
    impls = tuple(spec.split(","))
    unknown = [i for i in impls if i not in MIMO_IMPLS]
    if unknown or not impls:
        raise ValueError(f"--impls takes {','.join(MIMO_IMPLS)}, got {spec!r}")
    return impls


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0 (default all)")
    p.add_argument(
        "--chunks",
        default=None,
        help="the kernels' chunks, e.g. 64,256 (default 64; MIMO: time steps, default 64 / R)",
    )
    p.add_argument("--no-ref", action="store_true", help="skip the XLA reference")
    p.add_argument(
        "--mimo-rank", type=int, default=0, help="time mamba3_mimo_scan at this rank (0: SISO)"
    )
    p.add_argument(
        "--impls",
        default=None,
        help=f"MIMO only: among {','.join(MIMO_IMPLS)} (default all; --no-ref: pallas)",
    )
    p.add_argument("--profile", action="store_true", help="split pallas fwd+bwd by kernel")
    args = p.parse_args(argv)
    rank = args.mimo_rank
    shapes = MIMO_SHAPES if rank else SHAPES
    try:
        if rank < 0:
            raise ValueError(f"--mimo-rank must be >= 0, got {rank}")
        chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else None
        picked = shapes if args.shapes is None else [shapes[int(i)] for i in args.shapes.split(",")]
        impls = mimo_impls(args.impls, args.no_ref) if rank else None
        if args.impls is not None and not rank:
            raise ValueError("--impls needs --mimo-rank")
    except (ValueError, IndexError) as e:
        print(f"bench_mamba3: bad --chunks, --shapes, --impls or --mimo-rank: {e}", file=sys.stderr)
        return 2
    new = harness.new_result(
        "mamba3",
        script=__file__,
        argv=argv,
        out_dir=args.out,
        smoke=args.smoke,
        variant=f"mimo{rank}" if rank else None,
    )
    interpret = new.info.backend != "gpu"
    dims = dict(HEADS, segments=NUM_SEGMENTS)
    ref_chunk = max(1, REF_CHUNK // rank) if rank else REF_CHUNK  # MIMO: time steps
    chunks = chunks or [ref_chunk]
    if args.smoke:
        dims = {k: v for k, v in SMOKE.items() if k not in ("shape", "chunk")}
        ref_chunk = max(1, SMOKE["chunk"] // rank) if rank else SMOKE["chunk"]
        picked, chunks = [SMOKE["shape"]], [ref_chunk]
    if rank:
        cases = [("pallas", c) for c in chunks if "pallas" in impls]
        cases += [(impl, ref_chunk) for impl in impls if impl != "pallas"]
    else:
        cases = [("pallas", c) for c in chunks] + (
            [] if args.no_ref else [("reference", ref_chunk)]
        )
    data = dict(new.header, **dims, mimo_rank=rank, dtype="bfloat16", timings=[], profiles=[])
    for batch, length in picked:
        first = input_set(0, batch, length, **dims, rank=rank)
        n_sets = harness.rotation_count(harness.tree_bytes(first), backend=new.info.backend)
        sets = [first] + [input_set(i, batch, length, **dims, rank=rank) for i in range(1, n_sets)]
        outputs = {}
        for impl, chunk in cases:
            row = dict(shape=[batch, length], impl=impl, chunk=chunk)
            fns = op_fns(impl, chunk, interpret, mimo=bool(rank))
            try:
                rec, y = time_case(fns, sets, interpret=interpret, smoke=args.smoke)
            except Exception as e:  # out of memory: record it, time the other cases
                if not rank:
                    raise
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                data["timings"].append(row)
                print(f"({batch}, {length}) {impl:15s} chunk {chunk:4d}: {row['error'][:200]}")
                harness.write_json(new.path, data)
                continue
            outputs[(impl, chunk)] = y
            row.update(rec)
            data["timings"].append(row)
            print(
                f"({batch}, {length}) {impl:15s} chunk {chunk:4d}: fwd "
                f"{rec['fwd_ms']['median_ms']:.3f} ms, fwd+bwd {rec['fwdbwd_ms']['median_ms']:.3f}"
                f" ms (compile {rec['compile_s_fwd'] + rec['compile_s_fwdbwd']:.1f} s)",
                flush=True,
            )
            harness.write_json(new.path, data)
        # Against the independent reference where it ran (MIMO: the R^2 heads), else the fused.
        ref = outputs.get(("reference", ref_chunk), outputs.get(("reference_fused", ref_chunk)))
        if ref is not None:
            scale = float(np.abs(ref).max())
            for row in data["timings"][-len(cases) :]:
                y = outputs.get((row["impl"], row["chunk"]))
                if y is not None:
                    row["max_diff_over_max_ref"] = float(np.abs(y - ref).max()) / scale
        if args.profile and not interpret and ("pallas", chunks[0]) in outputs:
            fwdbwd = op_fns("pallas", chunks[0], interpret, mimo=bool(rank))[1]
            prof = profile_case(fwdbwd, sets, interpret=False)
            data["profiles"].append(dict(shape=[batch, length], chunk=chunks[0], **prof))
        harness.write_json(new.path, data)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
