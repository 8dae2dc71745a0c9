"""mamba_ssm's Mamba-3 SISO kernel (mamba3_siso_combined), the torch side of bench_mamba3.py.

    PYTHONPATH=/tmp/site:. python3 benchmarks/mamba3_torch.py OUT.json [--length 16384]
        [--segments 64] [--chunk 64] [--batch8]

Runs on the GPU machine (torch, triton >= 3.5 and mamba_ssm on PYTHONPATH: none of them are
this project's dependencies, so nothing is imported before the arguments are parsed, and a
missing one is one line and exit code 2). At mamba3-1.5b's head shapes (64 heads of 64, d_state
128, 32 rotary angles, one group; bench_mamba3.HEADS), inputs as mamba_ssm's Mamba3 module feeds
the kernel (x, z, B, C bf16; DT, ADT (b, h, l) float32; trap logits; angles float32 per head;
D, biases float32), forward and forward + backward (torch.autograd.grad of every input, a fixed
bf16 cotangent) for:

  - packed64: one row of --length tokens with cu_seqlens of --segments random-length
    documents (bench_mamba3's (1, 16384) shape);
  - packed512: the same total tokens with cu_seqlens of 8 rows' worth of --segments documents
    each (bench_mamba3's (8, 2048) rows laid end to end: varlen needs batch 1);
  - with --batch8: 8 rows of length / 8 without cu_seqlens (unpacked), for reference (its
    kernels autotune again: another minute or two on a fresh machine).

Per case: the first call (Triton autotuning happens there: mamba_ssm's Mamba-3 kernels try
up to 27 launch configurations each, a minute or two on a fresh machine) apart; wall time
(median of 5 groups of 5 calls, synchronised per group) and GPU kernel time (torch.profiler:
the sum of CUDA kernel durations over 5 calls / 5, as .anchor/ssd_torch_gpu.py does).
OUT.json after every case.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

HEADS, HEADDIM, D_STATE, N_ANGLES = 64, 64, 128, 32  # bench_mamba3.HEADS (mamba3-1.5b)
ROWS_8 = 8


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=pathlib.Path, help="JSON result file")
    p.add_argument("--length", type=int, default=16384, help="total tokens (default 16384)")
    p.add_argument("--segments", type=int, default=64, help="documents a row (default 64)")
    p.add_argument("--chunk", type=int, default=64, help="the kernel's chunk_size (default 64)")
    p.add_argument("--batch8", action="store_true", help="also 8 unpacked rows (no cu_seqlens)")
    args = p.parse_args(argv)
    if args.length % ROWS_8 or args.length < ROWS_8 * args.segments or args.segments < 1:
        p.error(
            f"--length must be a multiple of {ROWS_8} with at least --segments tokens a row, got "
            f"--length {args.length} --segments {args.segments}"
        )
    return args


def cu_seqlens(torch, rng_gen, rows, row_len, segments):
    """int32 (rows * segments + 1,): each row cut at segments - 1 random points."""
    edges = [0]
    for r in range(rows):
        cuts = torch.randperm(row_len - 1, generator=rng_gen)[: segments - 1] + 1
        edges += [r * row_len + int(c) for c in torch.sort(cuts).values] + [(r + 1) * row_len]
    return torch.tensor(edges, dtype=torch.int32, device="cuda")


def run(args, res, save):
    try:
        import torch
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        print(f"mamba3_torch: needs torch and mamba_ssm on PYTHONPATH: {e}", file=sys.stderr)
        return 2
    res["device"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    gen = torch.Generator().manual_seed(0)
    total = args.length
    cases = [
        ("packed64", 1, total, cu_seqlens(torch, gen, 1, total, args.segments)),
        (
            "packed512",
            1,
            total,
            cu_seqlens(torch, gen, ROWS_8, total // ROWS_8, args.segments),
        ),
    ]
    if args.batch8:
        cases.append(("batch8", ROWS_8, total // ROWS_8, None))
    bf, f32 = torch.bfloat16, torch.float32
    for name, b, length, cu in cases:

        def leaf(*shape, dtype=bf, scale=1.0):
            t = torch.randn(*shape, device="cuda", dtype=f32) * scale
            return t.to(dtype).requires_grad_(True)

        x = leaf(b, length, HEADS, HEADDIM)
        z = leaf(b, length, HEADS, HEADDIM)
        B = leaf(b, length, 1, D_STATE)
        C = leaf(b, length, 1, D_STATE)
        dt = (torch.rand(b, HEADS, length, device="cuda") * 0.099 + 0.001).requires_grad_(True)
        A = -torch.nn.functional.softplus(torch.randn(b, HEADS, length, device="cuda"))
        adt = (torch.clamp(A, max=-1e-4) * dt.detach()).requires_grad_(True)
        trap = leaf(b, HEADS, length)
        angles = leaf(b, length, HEADS, N_ANGLES, dtype=f32)
        D = leaf(HEADS, dtype=f32)
        q_bias = torch.ones(HEADS, D_STATE, device="cuda", requires_grad=True)
        k_bias = torch.ones(HEADS, D_STATE, device="cuda", requires_grad=True)
        dy = torch.randn(b, length, HEADS, HEADDIM, device="cuda", dtype=bf)
        inputs = [C, B, x, adt, dt, trap, q_bias, k_bias, angles, D, z]

        def fwd():
            return mamba3_siso_combined(
                Q=C,
                K=B,
                V=x,
                ADT=adt,
                DT=dt,
                Trap=trap,
                Q_bias=q_bias,
                K_bias=k_bias,
                Angles=angles,
                D=D,
                Z=z,
                chunk_size=args.chunk,
                cu_seqlens=cu,
            )

        def fwdbwd():
            return torch.autograd.grad(fwd(), inputs, dy)

        row = dict(case=name, batch=b, length=length, sequences=(b if cu is None else len(cu) - 1))
        for label, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            row[f"first_call_s_{label}"] = time.perf_counter() - t0
            if label == "fwd":
                row["finite"] = bool(torch.isfinite(out).all())
            fn()
            torch.cuda.synchronize()
            walls = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - t0) / 5 * 1e3)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            kernel_us = sum(
                e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA"
            )
            row[f"{label}_wall_ms"] = statistics.median(walls)
            row[f"{label}_gpu_kernel_ms"] = kernel_us / 5 / 1e3
        res["rows"].append(row)
        print(row, flush=True)
        save()
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    res = dict(
        script="benchmarks/mamba3_torch.py",
        command=" ".join(sys.argv),
        date=time.strftime("%Y-%m-%dT%H:%M:%S"),
        heads=HEADS,
        headdim=HEADDIM,
        d_state=D_STATE,
        n_angles=N_ANGLES,
        chunk=args.chunk,
        segments_per_row=args.segments,
        rows=[],
    )

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")

    rc = run(args, res, save)
    save()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
