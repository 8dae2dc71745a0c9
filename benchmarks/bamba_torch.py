"""transformers' BambaForCausalLM training step, the PyTorch side of the packed hybrid comparison.

    PYTHONPATH=/tmp/site:. python3 benchmarks/bamba_torch.py OUT.json [--attn sdpa]
        [--rows 8] [--seq-len 2048] [--segments 64] [--budget-s 140]

Runs on the GPU machine (torch, transformers 5.x, and mamba_ssm + causal_conv1d on PYTHONPATH:
none of them are this project's dependencies, so nothing is imported before the arguments are
parsed, and a missing one is one line and exit code 2). What it times, at our hybrid-1b
preset's exact shape (HYBRID_1B below mirrors config.HYBRID_PRESETS["1b"]; a test keeps the two
equal and checks the parameter count against HybridConfig.num_params):

  - BambaForCausalLM built from a BambaConfig of the same model: 24 layers, attention at 5, 11,
    17, 23 (GQA 16 on 4 heads of 128, RoPE on half the head dims), Mamba2 (64 heads of 64,
    d_state 128, one group, chunk 256, conv 4) and gated MLPs (2560), untied, the vocabulary
    padded to 16 as ours (50288 rows); random weights (transformers' init);
  - fp32 parameters, bf16 autocast, fused AdamW, as mamba_ssm's anchors (.anchor/train_torch.py);
  - rows x seq-len tokens a step (8 x 2048), each row packed with --segments documents of random
    lengths (63 random cut points; every token real), padding-free through transformers' own
    path: DataCollatorWithFlattening(return_seq_idx=True) per row gives input_ids, labels (-100
    at each document's first token), position_ids restarting per document and seq_idx, which
    mamba_ssm's fused mamba_split_conv1d_scan_combined takes as seq_idx;
  - attention --attn sdpa (default): transformers builds the block-diagonal causal mask from the
    restarting position_ids (masking_utils.find_packed_sequence_indices) and runs torch's SDPA
    with it, 8 rows of 2048; --attn flash_attention_2 (needs the flash_attn package): one
    flattened row of rows x seq-len with cu_seq_lens, flash attention's varlen path.

Before timing, an isolation check: the logits of row 0 with its first document's tokens
changed must equal (to 1e-2, bf16) those unchanged for every later document: it fails loudly if
seq_idx or the packed mask did not reach the kernels. Timing: the first step (mamba_ssm's Triton
kernels autotune in it, a minute or more; TRITON_CACHE_AUTOTUNING=1 keeps the result in the
Triton cache for a later run) is recorded apart; then --warmup steps; then groups of --per-group
steps, torch.cuda.synchronize() after each group, until --groups groups or --budget-s; the
median group time / per-group is the step time. Peak memory is torch.cuda.max_memory_allocated.
OUT.json is written after every phase (status "running" until the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

# config.HYBRID_PRESETS["1b"] with HybridConfig's defaults filled in (tests/test_benchmarks.py
# checks every field against HybridConfig.preset("1b", vocab_size=50277)).
HYBRID_1B = dict(
    layers=(("M-",) * 5 + ("*-",)) * 4,
    d_model=2048,
    vocab_size=50277,
    pad_vocab_size_multiple=16,
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    ngroups=1,
    chunk_size=256,
    conv_bias=True,
    proj_bias=False,
    num_heads=16,
    num_kv_heads=4,
    head_dim=None,
    rotary_dim=64,
    rope_theta=10000.0,
    attention_bias=False,
    d_ff=2560,
    mlp_activation="silu_gated",
    mlp_bias=False,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
)
ATTN_IMPLS = ("sdpa", "flash_attention_2")


def bamba_fields(h: dict) -> dict:
    """BambaConfig keyword arguments of the hybrid `h` (HybridConfig's fields)."""
    layers = h["layers"]
    if any(layer not in ("M-", "*-") for layer in layers):
        raise ValueError(f"a Bamba layer is 'M-' or '*-', got {layers}")
    if h["mlp_activation"] != "silu_gated":
        raise ValueError(f"Bamba's MLP is gated silu, got {h['mlp_activation']!r}")
    head_dim = h["head_dim"] or h["d_model"] // h["num_heads"]
    if h["head_dim"] not in (None, h["d_model"] // h["num_heads"]):
        raise ValueError("Bamba's attention head dim is d_model // num_heads")
    if 2 * h["rotary_dim"] != head_dim:
        raise ValueError(f"Bamba ropes half the head dims ({head_dim // 2}), not {h['rotary_dim']}")
    m = h["pad_vocab_size_multiple"]
    inner = h["expand"] * h["d_model"]
    return dict(
        vocab_size=-(-h["vocab_size"] // m) * m,  # our embedding and head's rows
        hidden_size=h["d_model"],
        intermediate_size=h["d_ff"],
        num_hidden_layers=len(layers),
        attn_layer_indices=[i for i, layer in enumerate(layers) if layer == "*-"],
        num_attention_heads=h["num_heads"],
        num_key_value_heads=h["num_kv_heads"],
        hidden_act="silu",
        mamba_n_heads=inner // h["headdim"],
        mamba_d_head=h["headdim"],
        mamba_n_groups=h["ngroups"],
        mamba_d_state=h["d_state"],
        mamba_d_conv=h["d_conv"],
        mamba_expand=h["expand"],
        mamba_chunk_size=h["chunk_size"],
        mamba_conv_bias=h["conv_bias"],
        mamba_proj_bias=h["proj_bias"],
        attention_bias=h["attention_bias"],
        mlp_bias=h["mlp_bias"],
        rms_norm_eps=h["rms_norm_eps"],
        tie_word_embeddings=h["tie_embeddings"],
        rope_parameters=dict(rope_type="default", rope_theta=h["rope_theta"]),
        use_cache=False,
    )


def bamba_num_params(f: dict) -> int:
    """BambaForCausalLM's parameter count from its BambaConfig fields `f` (to check the model
    built matches ours: HybridConfig.num_params of the same model)."""
    d, v, ff = f["hidden_size"], f["vocab_size"], f["intermediate_size"]
    heads, kv = f["num_attention_heads"], f["num_key_value_heads"]
    hd = d // heads
    inner = f["mamba_expand"] * d
    mh, gn = f["mamba_n_heads"], f["mamba_n_groups"] * f["mamba_d_state"]
    conv_dim = inner + 2 * gn
    mamba = d * (inner + conv_dim + mh) + conv_dim * f["mamba_d_conv"] + 3 * mh + inner + inner * d
    if f["mamba_conv_bias"]:
        mamba += conv_dim
    if f["mamba_proj_bias"]:
        mamba += inner + conv_dim + mh + d
    attention = d * (heads + 2 * kv) * hd + heads * hd * d
    if f["attention_bias"]:
        attention += (heads + 2 * kv) * hd + d
    mlp = 3 * d * ff + (2 * ff + d if f["mlp_bias"] else 0)
    n = f["num_hidden_layers"]
    n_attn = len(f["attn_layer_indices"])
    layers = n_attn * attention + (n - n_attn) * mamba + n * (mlp + 2 * d)
    return layers + d + v * d * (1 if f["tie_word_embeddings"] else 2)


def document_lengths(rows: int, seq_len: int, segments: int, seed: int = 0) -> list[list[int]]:
    """Each row's document lengths: `segments` of them, random, each >= 1, summing to seq_len
    (bench_attention.py's packed rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), segments - 1, replace=False))
        out.append(np.diff(np.r_[0, cuts, seq_len]).astype(int).tolist())
    return out


class Missing(Exception):
    """A dependency or capability the run needs is absent: one line, exit code 2."""


def _kernel_behind(fn):
    """The function transformers' use_kernel_func_from_hub_with_fallback wrapper calls, or None
    when it cannot be told (another wrapper)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure:
        return None
    cells = dict(zip(code.co_freevars, closure))
    return cells["implementation"].cell_contents if "implementation" in cells else None


def import_stack(attn: str):
    """(torch, transformers, modeling_bamba), or Missing naming what is not there."""
    # mamba_ssm's kernels autotune on their first call (a minute or more); this keeps the
    # result in the Triton cache, so a rerun on the same machine skips it.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise Missing(f"needs torch and transformers ({e})") from None
    if not torch.cuda.is_available():
        raise Missing("needs a CUDA GPU (torch.cuda.is_available() is False)")
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise Missing(f"needs transformers 5.x, found {transformers.__version__}")
    try:
        import causal_conv1d  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined  # noqa: F401
    except ImportError as e:
        raise Missing(
            f"needs mamba_ssm and causal_conv1d importable (PYTHONPATH=/tmp/site): {e}"
        ) from None
    if attn == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise Missing("--attn flash_attention_2 needs the flash_attn package; use --attn sdpa")
    try:
        from transformers.models.bamba import modeling_bamba
    except ImportError as e:
        raise Missing(f"transformers {transformers.__version__} has no Bamba: {e}") from None
    fused = getattr(modeling_bamba, "mamba2_split_conv1d_scan_combined", None)
    behind = _kernel_behind(fused) if fused is not None else None
    if behind is not None and not behind.__module__.startswith("mamba_ssm"):
        raise Missing(
            "transformers' Bamba would run its PyTorch reference scan, not mamba_ssm's fused "
            f"kernel (it resolved {behind.__module__}.{behind.__name__})"
        )
    return torch, transformers, modeling_bamba


def make_batch(torch, lengths, vocab: int, attn: str, seed: int = 0):
    """Model kwargs of the packed batch through DataCollatorWithFlattening, on the GPU: one row
    per packed row (sdpa), or all rows flattened into one with flash attention's cu_seq_lens."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(0, vocab, (n,), generator=g).tolist() for n in row] for row in lengths]
    if attn == "flash_attention_2":
        collate = DataCollatorWithFlattening(
            return_seq_idx=True, return_flash_attn_kwargs=True, return_tensors="pt"
        )
        batch = collate([{"input_ids": d} for row in docs for d in row])
    else:
        collate = DataCollatorWithFlattening(return_seq_idx=True, return_tensors="pt")
        per_row = [collate([{"input_ids": d} for d in row]) for row in docs]
        batch = {k: torch.cat([b[k] for b in per_row]) for k in per_row[0]}
    want = ("input_ids", "labels", "position_ids", "seq_idx")
    if any(k not in batch for k in want):
        raise Missing(f"DataCollatorWithFlattening gave {sorted(batch)}, not {list(want)}")
    return {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k != "attention_mask"
    }


def check_isolation(torch, model, batch, lengths, vocab: int) -> dict:
    """How much row 0's logits move when its first document's tokens change: in that document
    (must be > 0) and in the row's later documents (must be 0, up to 1e-3 of the former);
    leaks: whether the later ones moved (recorded; the step is timed either way)."""
    first, row = lengths[0][0], sum(lengths[0])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ids = inputs["input_ids"].clone()
    ids[0, :first] = (ids[0, :first] + 1) % vocab
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = model(**inputs).logits[0, :row].float()
        b = model(**{**inputs, "input_ids": ids}).logits[0, :row].float()
    change = (a - b).abs()
    own, later = change[:first].max().item(), change[first:].max().item()
    if not own > 0:
        raise AssertionError("changing row 0's first document did not move its own logits")
    leaks = not later <= 1e-3 * own
    if leaks:  # recorded and timed anyway: the work per step is the same
        print(
            f"bamba_torch: packing leaks: changing row 0's first document moved its own logits "
            f"by {own:.3g} and the row's later documents' by {later:.3g} (must be 0)",
            flush=True,
        )
    return dict(own_document=own, later_documents=later, leaks=leaks)


class _Fallbacks(logging.Handler):
    """Collects transformers' warnings that a kernel fell back to its PyTorch reference."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "falling back to its reference PyTorch implementation" in message:
            self.messages.append(message)


def run(args, res: dict, save) -> None:
    fallbacks = _Fallbacks()
    logging.getLogger("transformers").addHandler(fallbacks)
    torch, transformers, modeling_bamba = import_stack(args.attn)
    import mamba_ssm

    res.update(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        mamba_ssm=getattr(mamba_ssm, "__version__", "?"),
    )
    fields = bamba_fields(HYBRID_1B)
    res["bamba_config"] = fields
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(**fields, attn_implementation=args.attn)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = BambaForCausalLM(config)
    model.train()
    res["init_s"] = time.perf_counter() - t0
    got = model.config._attn_implementation
    if got != args.attn:
        raise Missing(f"transformers chose attention {got!r}, not {args.attn!r}")
    params = sum(p.numel() for p in model.parameters())
    expected = bamba_num_params(fields)
    res.update(params=params, params_expected=expected)
    if params != expected:
        raise AssertionError(f"BambaForCausalLM has {params} parameters, the hybrid-1b {expected}")
    lengths = document_lengths(args.rows, args.seq_len, args.segments, args.seed)
    batch = make_batch(torch, lengths, fields["vocab_size"], args.attn, args.seed)
    res["input_shape"] = list(batch["input_ids"].shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()  # mamba_ssm's kernels autotune here
    torch.cuda.synchronize()
    res.update(first_step_s=time.perf_counter() - t0, first_loss=float(loss))
    if fallbacks.messages:
        raise Missing(
            f"transformers ran a PyTorch reference, not mamba_ssm: {fallbacks.messages[0]}"
        )
    if not math.isfinite(res["first_loss"]):
        raise AssertionError(f"first loss {res['first_loss']} is not finite")
    save()
    res["isolation_logit_change"] = check_isolation(
        torch, model, batch, lengths, fields["vocab_size"]
    )
    save()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    groups = []
    while len(groups) < args.groups:
        if groups and time.perf_counter() - args.start + groups[-1] * args.per_group / 1e3 > (
            args.budget_s
        ):
            break
        t0 = time.perf_counter()
        for _ in range(args.per_group):
            loss = step()
        torch.cuda.synchronize()
        groups.append((time.perf_counter() - t0) / args.per_group * 1e3)
        res["groups_ms"] = groups
        save()
    ms = statistics.median(groups)
    tokens = args.rows * args.seq_len
    res.update(
        ms=ms,
        tokens_per_step=tokens,
        tokens_per_s=tokens / ms * 1e3,
        last_loss=float(loss),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        status="ok",
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=pathlib.Path, help="the JSON result file")
    ap.add_argument("--attn", default="sdpa", choices=ATTN_IMPLS)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--segments", type=int, default=64, help="documents a row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    ap.add_argument("--groups", type=int, default=5, help="timed groups (the median is over them)")
    ap.add_argument("--per-group", type=int, default=2, help="steps a timed group")
    ap.add_argument(
        "--budget-s", type=float, default=140.0, help="start no timed group after this many s"
    )
    args = ap.parse_args(argv)
    for name in ("rows", "seq_len", "segments", "groups", "per_group"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.segments > args.seq_len:
        ap.error(f"--segments {args.segments} exceeds --seq-len {args.seq_len}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.start = time.perf_counter()
    res = dict(
        script="benchmarks/bamba_torch.py",
        command=" ".join(sys.argv),
        date=time.strftime("%Y-%m-%dT%H:%M:%S"),
        status="running",
        attn=args.attn,
        rows=args.rows,
        seq_len=args.seq_len,
        segments_per_row=args.segments,
        hybrid_preset="hybrid-1b",
    )

    def save():
        res["wall_s"] = time.perf_counter() - args.start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")

    save()
    try:
        run(args, res, save)
    except Missing as e:
        res.update(status="missing", error=str(e))
        save()
        print(f"bamba_torch: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line here, the traceback in OUT.json
        res.update(
            status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
        )
        save()
        print(f"bamba_torch: {type(e).__name__}: {e} (traceback in {args.out})", file=sys.stderr)
        return 1
    save()
    print(
        f"bamba_torch: BambaForCausalLM hybrid-1b {args.rows}x{args.seq_len}, {args.segments} "
        f"documents a row, {args.attn}: {res['ms']:.1f} ms/step, {res['tokens_per_s']:,.0f} "
        f"tok/s, first step {res['first_step_s']:.0f} s, peak {res['peak_gib']:.1f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
