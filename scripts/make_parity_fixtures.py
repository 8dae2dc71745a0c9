"""Writes the parity fixtures under tests/fixtures/parity/ from transformers' MambaForCausalLM,
Mamba2ForCausalLM and the hybrids BambaForCausalLM and NemotronHForCausalLM.

CI has no torch, so the reference lives in small committed files: random-weight checkpoints in
the Hugging Face layout, the same weights in the original state-spaces layout, and the
reference logits of a few sequences of different lengths, each run alone through the PyTorch
model in float32 (on CPU: Mamba1's sequential "slow" path, Mamba2's torch_forward, the chunked
SSD written in torch).

    tests/fixtures/parity/<name>/config.json, model.safetensors      Hugging Face layout
    tests/fixtures/parity/<name>/reference.npz                       ids_<i>, logits_<i>
    tests/fixtures/parity/bamba*/rope.npz                            q, k before and after
        transformers' Bamba rotary embedding, at per-segment positions
    tests/fixtures/parity/state_spaces/config.json                   original layout (ssm_cfg),
        pytorch_model.bin, and model.safetensors with the same names  same weights as "tied"
    tests/fixtures/parity/mamba2_state_spaces/config.json            mamba2-* layout (ssm_cfg
        layer "Mamba2", vocabulary padded to 16), model.safetensors  same weights as "mamba2_tied"

Mamba1 is <name> "tied" and "untied", Mamba2 "mamba2_tied" and "mamba2_untied", Bamba "bamba"
and "bamba_tied", Nemotron-H "nemotron_h" and "nemotron_h_small" (the hybrids have no
state-spaces copy; their attention runs transformers' "eager" path); VERSIONS.json records the
torch and transformers versions each family was made with.

To regenerate (torch must not go into the project venv; use a separate one):

    /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /tmp/venv311
    /tmp/venv311/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/venv311/bin/python scripts/make_parity_fixtures.py [--family mamba|mamba2|bamba|nemotron_h]

Optionally `--check-saved DIR`: loads a checkpoint written by our `save_pretrained` with
transformers (MambaForCausalLM or Mamba2ForCausalLM, from its config.json) and compares its
logits with DIR/reference.npz (that file written by the caller).
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
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
LENGTHS = (1, 6, 23, 70)  # 70 spans a 64-step scan chunk edge; Mamba2's chunks are shorter still

CONFIGS = {
    # Tied embeddings, d_conv 4, dt_rank "auto" (= 2), vocab a multiple of 8.
    "tied": dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        conv_kernel=4,
        expand=2,
        time_step_rank="auto",
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    ),
    # Untied head, projection biases, d_conv 3, d_state 4, explicit dt_rank, odd vocab.
    "untied": dict(
        vocab_size=50,
        hidden_size=24,
        num_hidden_layers=3,
        state_size=4,
        conv_kernel=3,
        expand=2,
        time_step_rank=5,
        use_bias=True,
        use_conv_bias=True,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    ),
}


MAMBA2_CONFIGS = {
    # Four heads in two groups, tied embeddings, d_conv 4; chunks of 16 so that every sequence
    # but the shortest crosses chunk edges in both the reference and our scan.
    "mamba2_tied": dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        num_heads=4,
        head_dim=16,
        n_groups=2,
        expand=2,
        conv_kernel=4,
        chunk_size=16,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    ),
    # Six heads in two groups, untied head, projection biases, d_conv 3, d_state 4, odd vocab.
    "mamba2_untied": dict(
        vocab_size=50,
        hidden_size=24,
        num_hidden_layers=3,
        state_size=4,
        num_heads=6,
        head_dim=8,
        n_groups=2,
        expand=2,
        conv_kernel=3,
        chunk_size=8,
        use_bias=True,
        use_conv_bias=True,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    ),
}
# Hybrids: Mamba2 mixers with GQA attention (4 query heads on 2 key/value heads, head dim 8) and
# MLPs. Bamba: every layer is a mixer (Mamba2 or attention) then a gated SiLU MLP, attention with
# half-split RoPE on half the head dim (partial_rotary_factor 0.5, fixed by BambaConfig).
BAMBA_CONFIGS = {
    # Attention at layers 1 and 3 of 4; untied head; Mamba2 4 heads of 16 in 2 groups.
    "bamba": dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        attn_layer_indices=[1, 3],
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        mamba_n_heads=4,
        mamba_d_head="auto",
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10_000.0),
        attn_implementation="eager",
    ),
    # Tied, attention first, d_conv 3, theta 500, eps 1e-6, odd vocab, projection biases.
    "bamba_tied": dict(
        vocab_size=50,
        hidden_size=24,
        num_hidden_layers=3,
        attn_layer_indices=[0],
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=40,
        mamba_n_heads=6,
        mamba_d_head="auto",
        mamba_n_groups=2,
        mamba_d_state=4,
        mamba_d_conv=3,
        mamba_expand=2,
        mamba_chunk_size=8,
        mamba_conv_bias=True,
        mamba_proj_bias=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=500.0),
        attn_implementation="eager",
    ),
}
# Nemotron-H: each layer is ONE of Mamba2 mixer ("M"), attention without any position encoding
# ("*") or a squared-ReLU MLP without a gate ("-"), each with its own pre-norm and residual.
NEMOTRON_H_CONFIGS = {
    "nemotron_h": dict(
        vocab_size=64,
        hidden_size=32,
        hybrid_override_pattern="M*M-M-",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mlp_hidden_act="relu2",
        ssm_state_size=8,
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        use_conv_bias=True,
        use_bias=False,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        attn_implementation="eager",
    ),
    # Attention first, MQA (one key/value head), head_dim 12 (not hidden / heads), d_conv 3,
    # projection biases. Untied: NemotronHForCausalLM (transformers 5.25) declares no tied
    # weights, so tie_word_embeddings=True would still give lm_head its own weights.
    "nemotron_h_small": dict(
        vocab_size=50,
        hidden_size=24,
        hybrid_override_pattern="*M-M",
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=12,
        intermediate_size=40,
        mlp_hidden_act="relu2",
        ssm_state_size=4,
        mamba_num_heads=6,
        mamba_head_dim=8,
        n_groups=2,
        conv_kernel=3,
        chunk_size=8,
        use_conv_bias=True,
        use_bias=True,
        mlp_bias=True,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        attn_implementation="eager",
    ),
}
# The state-spaces copy of "mamba2_tied" declares the unpadded vocabulary the released
# mamba2-* configs declare (50277, padded to 50288 rows): here 53, padded to 64 rows.
MAMBA2_STATE_SPACES_VOCAB = 53


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


def randomize_mamba2(model: Mamba2ForCausalLM, seed: int):
    """Perturbs every parameter away from its structured init (A_log = log(1..heads), D = 1,
    norms = 1, dt_bias from the dt range), keeping the decays moderate (A about -0.4, dt' about
    softplus(dt - 2)) so that state carried across chunk edges still shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(-1.0 + 0.5 * noise)
            elif name.endswith("dt_bias"):
                p.copy_(-2.0 + 0.5 * noise)
            elif name.endswith(".D") or "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
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
    state = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    # torch.save of a tied MambaLMHeadModel stores lm_head.weight as well.
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    config = dict(
        d_model=hf["hidden_size"],
        d_intermediate=0,
        n_layer=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        ssm_cfg=dict(d_state=hf["state_size"]),
        attn_layer_idx=[],
        attn_cfg={},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=8,
        tie_embeddings=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save(state, out / "pytorch_model.bin")
    save_file(
        {k: v for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )


def write_mamba2_state_spaces(model: Mamba2ForCausalLM, hf: dict, out: Path):
    """The same weights under mamba_ssm's MambaLMHeadModel names and a mamba2-* config (ssm_cfg
    gives what differs from mamba_ssm's Mamba2 defaults; d_conv 4 and expand 2 are defaults)."""
    state = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    multiple = 16
    assert -(-MAMBA2_STATE_SPACES_VOCAB // multiple) * multiple == hf["vocab_size"]
    ssm_cfg = dict(
        layer="Mamba2",
        d_state=hf["state_size"],
        headdim=hf["head_dim"],
        ngroups=hf["n_groups"],
        chunk_size=hf["chunk_size"],
    )
    assert hf["conv_kernel"] == 4 and hf["expand"] == 2 and not hf["use_bias"]
    config = dict(
        d_model=hf["hidden_size"],
        d_intermediate=0,
        n_layer=hf["num_hidden_layers"],
        vocab_size=MAMBA2_STATE_SPACES_VOCAB,
        ssm_cfg=ssm_cfg,
        attn_layer_idx=[],
        attn_cfg={},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=multiple,
        tie_embeddings=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_bamba_rope(model: BambaForCausalLM, out: Path, seed: int):
    """rope.npz: q and k before and after transformers' Bamba rotary embedding (its rotary_emb
    module and apply_rotary_pos_emb), at per-segment positions of a packed row (restarting at
    0, as our packer gives them), with the rotary_dim and theta it used."""
    from transformers.models.bamba.modeling_bamba import apply_rotary_pos_emb

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    positions = np.concatenate([np.arange(n) for n in (5, 1, 17, 9)])[None].astype(np.int64)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, positions.shape[1], head_dim, generator=g)
    k = torch.randn(1, kv_heads, positions.shape[1], head_dim, generator=g)
    cos, sin = model.model.rotary_emb(q, torch.from_numpy(positions))
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    to_bthd = lambda a: a.transpose(1, 2).numpy()  # noqa: E731 - ours is (b, t, heads, d)
    np.savez(
        out / "rope.npz",
        q=to_bthd(q),
        k=to_bthd(k),
        q_rot=to_bthd(q_rot),
        k_rot=to_bthd(k_rot),
        positions=positions.astype(np.int32),
        rotary_dim=cos.shape[-1],
        theta=config.rope_parameters["rope_theta"],
    )


# family -> (configs, transformers classes, randomize, state-spaces copy: (of which, writer, dir)
# or None)
FAMILIES = {
    "mamba": (
        CONFIGS,
        MambaConfig,
        MambaForCausalLM,
        randomize,
        ("tied", write_state_spaces, "state_spaces"),
    ),
    "mamba2": (
        MAMBA2_CONFIGS,
        Mamba2Config,
        Mamba2ForCausalLM,
        randomize_mamba2,
        ("mamba2_tied", write_mamba2_state_spaces, "mamba2_state_spaces"),
    ),
    "bamba": (BAMBA_CONFIGS, BambaConfig, BambaForCausalLM, randomize_mamba2, None),
    "nemotron_h": (
        NEMOTRON_H_CONFIGS,
        NemotronHConfig,
        NemotronHForCausalLM,
        randomize_mamba2,
        None,
    ),
}
ARCHITECTURES = {
    "MambaForCausalLM": MambaForCausalLM,
    "Mamba2ForCausalLM": Mamba2ForCausalLM,
    "BambaForCausalLM": BambaForCausalLM,
    "NemotronHForCausalLM": NemotronHForCausalLM,
}


def make(families):
    OUT.mkdir(parents=True, exist_ok=True)
    versions_file = OUT / "VERSIONS.json"
    versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}
    if "torch" in versions:  # the single-family record from before Mamba2 fixtures existed
        versions = {"mamba": versions}
    for family in families:
        configs, config_cls, model_cls, perturb, copy = FAMILIES[family]
        copied, write_copy, copy_dir = copy or (None, None, None)
        for name in (*configs, *([copy_dir] if copy else [])):  # only this family's are replaced
            if (OUT / name).exists():
                shutil.rmtree(OUT / name)
        for seed, (name, fields) in enumerate(configs.items()):
            torch.manual_seed(seed)
            fields = dict(fields)
            attn_implementation = fields.pop("attn_implementation", None)
            config = config_cls(**fields)
            if attn_implementation:
                config._attn_implementation = attn_implementation
            model = model_cls(config).float().eval()
            perturb(model, seed)
            model.save_pretrained(OUT / name, safe_serialization=True)
            # Mamba2's ids stay below the state-spaces copy's declared vocabulary.
            vocab = fields["vocab_size"]
            if name == copied and family == "mamba2":
                vocab = MAMBA2_STATE_SPACES_VOCAB
            ref = reference_logits(model, vocab, seed)
            np.savez(OUT / name / "reference.npz", **ref)
            if family == "bamba":
                write_bamba_rope(model, OUT / name, seed)
            if name == copied:
                write_copy(model, fields, OUT / copy_dir)
            print(name, {k: v.shape for k, v in ref.items() if k.startswith("logits")})
        versions[family] = dict(
            torch=torch.__version__, transformers=transformers.__version__, lengths=LENGTHS
        )
    versions_file.write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    for path in sorted(OUT.rglob("*")):
        if path.is_file() and path.stat().st_size > 300_000:
            raise SystemExit(f"{path} is {path.stat().st_size} bytes; fixtures must stay small")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


def check_saved(path: Path):
    """transformers loads what our save_pretrained wrote and computes the same logits."""
    architectures = json.loads((path / "config.json").read_text()).get("architectures", [])
    model_cls = ARCHITECTURES.get(architectures[0] if architectures else "", MambaForCausalLM)
    model = model_cls.from_pretrained(path, attn_implementation="eager").float().eval()
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check-saved", type=Path, help="checkpoint written by save_pretrained")
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        action="append",
        help="regenerate only this family's fixtures (repeatable; default all)",
    )
    args = parser.parse_args()
    if args.check_saved:
        check_saved(args.check_saved)
    else:
        make(args.family or sorted(FAMILIES))
