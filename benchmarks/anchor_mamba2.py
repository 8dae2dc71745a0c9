"""mamba_ssm's Mamba2, the PyTorch side of our SSD and Mamba2 training comparisons, run on the
device machine in the same call as ours (GPU machines differ from lease to lease).

    PYTHONPATH=/path/to/mamba_ssm python3 benchmarks/anchor_mamba2.py --out DIR \
        [--train 1.3b:8:2048,...] [--ssd seg64,none] [--shapes 0,1,2] [--budget-s 300]

Needs torch, mamba_ssm and causal_conv1d built for the GPU (not this project's dependencies, so
nothing here imports them before the arguments are parsed). What it times:
  --train PRESET:ROWS:LEN  MambaLMHeadModel with the Mamba2 layer (state-spaces/mamba2 shapes:
      d_state 128, headdim 64, chunk 256; vocabulary 50277 padded to 8 as mamba_ssm's anchors
      do), fp32 parameters, bf16 autocast, fused AdamW, random tokens, full unpacked rows:
      median of 5 groups of 2 steps after warm-up; peak memory.
  --ssd MODES  mamba_chunk_scan_combined on bench_ssd.py's shapes (bf16 x/dt/B/C/z, f32
      A/D/dt_bias, softplus, D and z on, chunk 256), with seq_idx of 64 random-length segments
      a row (seg64) and without (none): forward and forward+backward, median of 7 groups of 5.
Its Triton kernels autotune on their first call for each key (head dim, state size, chunk, seq_idx
or not), a minute or more each, outside the timing. Training runs first (its tuning serves the
"none" SSD timings). Parts not begun within --budget-s are skipped and listed in the JSON. Writes
DIR/anchor_mamba2_<device>.json after every measurement.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

# (batch, length, heads, headdim, d_state): benchmarks/bench_ssd.py's SHAPES.
SHAPES = [(8, 2048, 64, 64, 128), (1, 16384, 64, 64, 128), (4, 2048, 80, 64, 128)]
# Mamba2 presets: (d_model, n_layer).
PRESETS = {
    "130m": (768, 24),
    "370m": (1024, 48),
    "780m": (1536, 48),
    "1.3b": (2048, 48),
    "2.7b": (2560, 64),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=pathlib.Path, required=True, help="folder for the JSON")
    ap.add_argument("--train", default="", help="PRESET:ROWS:LEN,... (e.g. 1.3b:8:2048)")
    ap.add_argument("--ssd", default="", help="SSD segment modes to time: seg64, none")
    ap.add_argument("--shapes", default="0,1,2", help="indices into SHAPES")
    ap.add_argument(
        "--budget-s", type=float, default=540.0, help="start no part after this many seconds"
    )
    args = ap.parse_args(argv)
    for item in filter(None, args.train.split(",")):
        preset, _, rest = item.partition(":")
        if preset not in PRESETS or len(rest.split(":")) != 2:
            ap.error(f"--train {item!r}: expected PRESET:ROWS:LEN with PRESET in {list(PRESETS)}")
    for mode in filter(None, args.ssd.split(",")):
        if mode not in ("seg64", "none"):
            ap.error(f"--ssd {mode!r}: expected seg64 or none")
    return args


def timed(torch, fn, groups, per):
    fn()
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / per * 1e3)
    return statistics.median(out), out


def train(torch, preset, rows, length):
    import torch.nn.functional as F
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d, n = PRESETS[preset]
    cfg = MambaConfig(
        d_model=d,
        n_layer=n,
        vocab_size=50277,
        ssm_cfg={"layer": "Mamba2", "d_state": 128, "headdim": 64, "chunk_size": 256},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=8,
        tie_embeddings=True,
    )
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 50277, (rows, length + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        ).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ms, groups = timed(torch, step, groups=5, per=2)
    r = dict(
        model=f"mamba2-{preset}",
        rows=rows,
        len=length,
        ms=ms,
        groups_ms=groups,
        tokens_per_s=rows * length / ms * 1e3,
        first_step_s=first_s,
        params=sum(p.numel() for p in model.parameters()),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    model = opt = None  # frees them before the next preset's model
    torch.cuda.empty_cache()
    return r


def ssd(torch, shape, mode):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    b, t, h, p, n = shape
    bf = torch.bfloat16
    x = torch.randn(b, t, h, p, device="cuda", dtype=bf, requires_grad=True)
    dt = (torch.rand(b, t, h, device="cuda") * 0.1).to(bf).requires_grad_(True)
    A = (-torch.rand(h, device="cuda") * 4).requires_grad_(True)
    B = torch.randn(b, t, 1, n, device="cuda", dtype=bf, requires_grad=True)
    C = torch.randn(b, t, 1, n, device="cuda", dtype=bf, requires_grad=True)
    D = torch.randn(h, device="cuda", requires_grad=True)
    z = torch.randn(b, t, h, p, device="cuda", dtype=bf, requires_grad=True)
    dt_bias = torch.randn(h, device="cuda", requires_grad=True)
    dy = torch.randn(b, t, h, p, device="cuda", dtype=bf)
    seq_idx = None
    if mode == "seg64":
        cuts = torch.sort(torch.randperm(t - 1, device="cuda")[:63] + 1).values
        seq_idx = torch.searchsorted(cuts, torch.arange(t, device="cuda"), right=True)
        seq_idx = seq_idx.to(torch.int32)[None].expand(b, t).contiguous()
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx)

    def fwd():
        with torch.no_grad():
            return mamba_chunk_scan_combined(x, dt, A, B, C, 256, **kw)

    def fwd_bwd():
        y = mamba_chunk_scan_combined(x, dt, A, B, C, 256, **kw)
        return torch.autograd.grad(y, [x, dt, A, B, C, D, z, dt_bias], dy)

    t0 = time.perf_counter()
    fwd_bwd()  # the first call autotunes
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - t0
    f, _ = timed(torch, fwd, groups=7, per=5)
    fb, _ = timed(torch, fwd_bwd, groups=7, per=5)
    return dict(shape=list(shape), seg=mode, fwd_ms=f, fwd_bwd_ms=fb, first_call_s=tune_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    start = time.perf_counter()
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    path = args.out / f"anchor_mamba2_{name}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    res = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        command=" ".join(sys.argv),
        date=time.strftime("%Y-%m-%dT%H:%M:%S"),
        train=[],
        ssd=[],
        skipped=[],
    )
    parts = [("train", item) for item in filter(None, args.train.split(","))]
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    # "none" first: the training's autotuning (no seq_idx) serves it.
    modes = sorted(filter(None, args.ssd.split(",")), key=lambda m: m != "none")
    parts += [("ssd", (shape, mode)) for mode in modes for shape in shapes]
    for kind, what in parts:
        if time.perf_counter() - start > args.budget_s:
            res["skipped"].append([kind, str(what)])
            continue
        try:
            if kind == "train":
                preset, rows, length = what.split(":")
                r = train(torch, preset, int(rows), int(length))
                print(
                    f"mamba_ssm train {r['model']} {rows}x{length}: {r['ms']:.1f} ms, "
                    f"{r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']:.1f} GiB",
                    flush=True,
                )
            else:
                r = ssd(torch, *what)
                print(
                    f"mamba_ssm ssd {r['shape']} {r['seg']}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd "
                    f"{r['fwd_bwd_ms']:.3f} ms (first call {r['first_call_s']:.0f} s)",
                    flush=True,
                )
        except Exception as e:  # one failing part must not lose the others
            r = dict(part=kind, what=str(what), error=f"{type(e).__name__}: {e}"[:1000])
            print(r, flush=True)
        res[kind].append(r)
        path.write_text(json.dumps(res, indent=1) + "\n")
    path.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
