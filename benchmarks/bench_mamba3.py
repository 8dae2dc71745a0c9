"""Mamba-3 SISO scan on GPU: its SSD core in the Pallas kernels against the pure-JAX reference.

    PYTHONPATH=. python3 benchmarks/bench_mamba3.py [--out DIR] [--shapes 0,1] [--chunks 64]
        [--no-ref] [--profile] [--smoke]

Forward and forward+backward (jax.vjp, a fixed cotangent) of mamba3_scan at mamba3-1.5b's head
shapes (64 heads, headdim 64, d_state 128, 32 rotary angles, one group; Mamba3Config.preset):
inputs as the mixer feeds the op (x, z, B, C bf16; dt, A per token, trap, angles float32; D,
B_bias, C_bias float32), 64 random-length segments a row, for impl="pallas" at each --chunks
(the kernels' chunk; Mamba-3's default is 64) and the reference at chunk 64. Compile time is
reported apart; harness.time_calls: median of 7 groups of 5 back-to-back calls after a warm-up,
rotating between input sets that together hold twice the L2. Each kernel row also records
max |y - y_ref| / max |y_ref| against the reference on the first input set.
--profile: the GPU time of pallas fwd+bwd at the first chunk split by kernel ("ssd_*" kernels;
"xla" is the Mamba-3 glue and everything else).
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
from jax_packmamba.ops.mamba3 import mamba3_scan_pallas, mamba3_scan_reference

_PRESET = Mamba3Config.preset("1.5b")
HEADS = dict(
    heads=_PRESET.nheads,
    headdim=_PRESET.headdim,
    d_state=_PRESET.d_state,
    n_angles=_PRESET.num_rope_angles,
)
SHAPES = [(1, 16384), (8, 2048)]  # (batch, length)
NUM_SEGMENTS = 64
REF_CHUNK = 64  # mamba_ssm's Mamba-3 chunk_size
SMOKE = dict(shape=(1, 80), heads=2, headdim=16, d_state=16, n_angles=4, segments=4, chunk=32)
PROFILE_CALLS = 5


def input_set(i, batch, length, *, heads, headdim, d_state, n_angles, segments):
    """(x, dt, A, trap, B, C, angles, D, z, B_bias, C_bias, segment_ids, cotangent)."""
    rng = np.random.default_rng(300 + i)

    def normal(shape, scale=1.0, dtype=jnp.bfloat16):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32)).astype(dtype)

    f32 = jnp.float32
    rows, per_token = (batch, length, heads, headdim), (batch, length, heads)
    bc = (batch, length, 1, d_state)
    dt = jnp.asarray(rng.uniform(0.001, 0.1, per_token), f32)  # softplus(dd_dt + dt_bias)
    A = -jax.nn.softplus(normal(per_token, 1.0, f32))  # -max(softplus(dd_A), A_floor)
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


def op_fns(impl, chunk, interpret):
    def f(*a):
        *xs, seg = a
        kw = dict(segment_ids=seg, chunk_size=chunk)
        if impl == "reference":
            return mamba3_scan_reference(*xs, **kw)
        return mamba3_scan_pallas(*xs, interpret=interpret, **kw)

    def fwd(*a):
        return f(*a[:12])

    def fwdbwd(*a):
        *xs, seg, ct = a
        return jax.vjp(lambda *d: f(*d, seg), *xs)[1](ct)

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
    compiled = compile_fn(fwdbwd, interpret, *sets[0])
    with tempfile.TemporaryDirectory(prefix="mamba3_trace_") as tmp:
        harness.trace(compiled, sets, PROFILE_CALLS, tmp)
        events, lines = harness.device_events(tmp)
    if not events:
        return dict(error="no GPU kernels in the trace", lines=lines)
    return harness.kernel_times(events, PROFILE_CALLS, prefixes=("ssd_",))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0 (default all)")
    p.add_argument(
        "--chunks", default=str(REF_CHUNK), help="the kernels' chunks, e.g. 64,256 (default 64)"
    )
    p.add_argument("--no-ref", action="store_true", help="skip the XLA reference")
    p.add_argument("--profile", action="store_true", help="split pallas fwd+bwd by kernel")
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
        picked = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    except (ValueError, IndexError) as e:
        print(f"bench_mamba3: bad --chunks or --shapes: {e}", file=sys.stderr)
        return 2
    new = harness.new_result(
        "mamba3", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke
    )
    interpret = new.info.backend != "gpu"
    dims = dict(HEADS, segments=NUM_SEGMENTS)
    ref_chunk = REF_CHUNK
    if args.smoke:
        dims = {k: v for k, v in SMOKE.items() if k not in ("shape", "chunk")}
        picked, chunks, ref_chunk = [SMOKE["shape"]], [SMOKE["chunk"]], SMOKE["chunk"]
    data = dict(new.header, **dims, dtype="bfloat16", timings=[], profiles=[])
    for batch, length in picked:
        first = input_set(0, batch, length, **dims)
        n_sets = harness.rotation_count(harness.tree_bytes(first), backend=new.info.backend)
        sets = [first] + [input_set(i, batch, length, **dims) for i in range(1, n_sets)]
        cases = [("pallas", c) for c in chunks]
        if not args.no_ref:
            cases.append(("reference", ref_chunk))
        outputs = {}
        for impl, chunk in cases:
            rec, y = time_case(
                op_fns(impl, chunk, interpret), sets, interpret=interpret, smoke=args.smoke
            )
            outputs[(impl, chunk)] = y
            row = dict(shape=[batch, length], impl=impl, chunk=chunk, **rec)
            data["timings"].append(row)
            print(
                f"({batch}, {length}) {impl:9s} chunk {chunk:4d}: fwd "
                f"{rec['fwd_ms']['median_ms']:.3f} ms, fwd+bwd {rec['fwdbwd_ms']['median_ms']:.3f}"
                f" ms (compile {rec['compile_s_fwd'] + rec['compile_s_fwdbwd']:.1f} s)",
                flush=True,
            )
            harness.write_json(new.path, data)
        ref = outputs.get(("reference", ref_chunk))
        if ref is not None:
            scale = float(np.abs(ref).max())
            for row in data["timings"][-len(cases) :]:
                y = outputs[(row["impl"], row["chunk"])]
                row["max_diff_over_max_ref"] = float(np.abs(y - ref).max()) / scale
        if args.profile and not interpret:
            prof = profile_case(op_fns("pallas", chunks[0], interpret)[1], sets, interpret=False)
            data["profiles"].append(dict(shape=[batch, length], chunk=chunks[0], **prof))
        harness.write_json(new.path, data)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
