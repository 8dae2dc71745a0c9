"""Writes the parity fixtures under tests/fixtures/parity/ from transformers' MambaForCausalLM.

CI has no torch, so the reference lives in small committed files: random-weight checkpoints in
the Hugging Face layout, the same weights in the original state-spaces layout, and the
reference logits of a few sequences of different lengths, each run alone through the PyTorch
model in float32 (its sequential "slow" path on CPU).

    tests/fixtures/parity/<name>/config.json, model.safetensors      Hugging Face layout
    tests/fixtures/parity/<name>/reference.npz                       ids_<i>, logits_<i>
    tests/fixtures/parity/state_spaces/config.json                   original layout (ssm_cfg),
        pytorch_model.bin, and model.safetensors with the same names  same weights as "tied"

To regenerate (torch must not go into the project venv; use a separate one):

    /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /tmp/venv311
    /tmp/venv311/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/venv311/bin/python scripts/make_parity_fixtures.py

Optionally `--check-saved DIR`: loads a checkpoint written by our `save_pretrained` with
transformers and compares its logits with DIR/reference.npz (that file written by the caller).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import MambaConfig, MambaForCausalLM

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
LENGTHS = (1, 6, 23, 70)  # 70 spans a 64-step scan chunk edge

CONFIGS = {
    # Tied embeddings, d_conv 4, dt_rank "auto" (= 2), vocab a multiple of 8.
    "tied": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4,
                 expand=2, time_step_rank="auto", use_bias=False, use_conv_bias=True,
                 layer_norm_epsilon=1e-5, tie_word_embeddings=True),
    # Untied head, projection biases, d_conv 3, d_state 4, explicit dt_rank, odd vocab.
    "untied": dict(vocab_size=50, hidden_size=24, num_hidden_layers=3, state_size=4, conv_kernel=3,
                   expand=2, time_step_rank=5, use_bias=True, use_conv_bias=True,
                   layer_norm_epsilon=1e-6, tie_word_embeddings=False),
}


def randomize(model: MambaForCausalLM, seed: int):
    """Perturbs every parameter so that nothing sits at its structured init (A_log = log n,
    D = 1, norm weights = 1) and every term of the forward pass shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.add_(0.5 * noise)
            elif name.endswith(".D") or "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("dt_proj.bias"):
                p.add_(0.5 * noise)
            else:
                p.copy_(0.3 * noise)


def reference_logits(model, vocab, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate(LENGTHS):
        ids = rng.integers(0, vocab, n).astype(np.int32)
        with torch.no_grad():
            logits = model(torch.from_numpy(ids[None].astype(np.int64)), use_cache=False).logits
        out[f"ids_{i}"] = ids
        out[f"logits_{i}"] = logits[0].float().numpy()
    return out


def write_state_spaces(model: MambaForCausalLM, hf: dict, out: Path):
    """The same weights under mamba_ssm's MambaLMHeadModel names and config."""
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone().contiguous()
             for k, v in model.state_dict().items()}
    # torch.save of a tied MambaLMHeadModel stores lm_head.weight as well.
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    config = dict(d_model=hf["hidden_size"], d_intermediate=0, n_layer=hf["num_hidden_layers"],
                  vocab_size=hf["vocab_size"], ssm_cfg=dict(d_state=hf["state_size"]),
                  attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True,
                  fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save(state, out / "pytorch_model.bin")
    save_file({k: v for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})


def make():
    if OUT.exists():
        shutil.rmtree(OUT)
    for seed, (name, fields) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        config = MambaConfig(**fields)
        model = MambaForCausalLM(config).float().eval()
        randomize(model, seed)
        model.save_pretrained(OUT / name, safe_serialization=True)
        ref = reference_logits(model, fields["vocab_size"], seed)
        np.savez(OUT / name / "reference.npz", **ref)
        if name == "tied":
            write_state_spaces(model, fields, OUT / "state_spaces")
        print(name, {k: v.shape for k, v in ref.items() if k.startswith("logits")})
    (OUT / "VERSIONS.json").write_text(json.dumps(
        dict(torch=torch.__version__, transformers=transformers.__version__, lengths=LENGTHS), indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


def check_saved(path: Path):
    """transformers loads what our save_pretrained wrote and computes the same logits."""
    model = MambaForCausalLM.from_pretrained(path).float().eval()
    ref = np.load(path / "reference.npz")
    worst = 0.0
    for key in ref.files:
        if not key.startswith("ids_"):
            continue
        ids = torch.from_numpy(ref[key][None].astype(np.int64))
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0].numpy()
        worst = max(worst, float(np.abs(logits - ref[key.replace("ids", "logits")]).max()))
    print(f"transformers on {path}: max abs logit difference {worst:.3g}")
    assert worst < 1e-4, worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-saved", type=Path, help="checkpoint written by save_pretrained")
    args = parser.parse_args()
    if args.check_saved:
        check_saved(args.check_saved)
    else:
        make()
