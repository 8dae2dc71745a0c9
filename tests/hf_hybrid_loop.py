"""A float64 forward pass of a Bamba or Nemotron-H checkpoint, read straight from its Hugging
Face config.json and model.safetensors: the exact answer the float32 parity fixtures are
rounded versions of.

Written from the models' definitions (transformers' modelling code: pre-norm residual layers,
Mamba2 with a depthwise causal conv, softplus(dt + dt_bias), the gated RMSNorm over groups of
e / n_groups channels, GQA attention with half-split RoPE on Bamba's first head_dim / 2
channels, gated SiLU or squared-ReLU MLPs), in plain numpy, and independent of our model code:
the SSM runs one step at a time (not chunked), attention is a dense causal softmax. One
sequence at a time, no packing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def linear(p, name, x):
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def mamba2(p, x, *, heads, head_dim, groups, d_state, eps):
    """x (t, d) -> (t, d): in_proj -> conv + silu over xBC -> SSM step by step -> gated norm."""
    length = x.shape[0]
    e = heads * head_dim
    gn = groups * d_state
    proj = linear(p, "in_proj", x)
    z, xbc, dt = proj[:, :e], proj[:, e : 2 * e + 2 * gn], proj[:, 2 * e + 2 * gn :]
    weight = p["conv1d.weight"][:, 0, :]  # (channels, width), oldest input first
    width = weight.shape[1]
    past = np.concatenate([np.zeros((width - 1, xbc.shape[1])), xbc])
    conv = sum(past[j : j + length] * weight[:, j] for j in range(width))
    if "conv1d.bias" in p:
        conv = conv + p["conv1d.bias"]
    conv = silu(conv)
    xs = conv[:, :e].reshape(length, heads, head_dim)
    B = np.repeat(conv[:, e : e + gn].reshape(length, groups, d_state), heads // groups, axis=1)
    C = np.repeat(conv[:, e + gn :].reshape(length, groups, d_state), heads // groups, axis=1)
    dt = np.logaddexp(dt + p["dt_bias"], 0.0)  # softplus
    A = -np.exp(p["A_log"])
    state = np.zeros((heads, head_dim, d_state))
    ys = []
    for t in range(length):
        decay = np.exp(dt[t] * A)[:, None, None]
        state = decay * state + (dt[t][:, None] * xs[t])[:, :, None] * B[t][:, None, :]
        ys.append(np.einsum("hpn,hn->hp", state, C[t]) + p["D"][:, None] * xs[t])
    y = np.stack(ys).reshape(length, e) * silu(z)
    y = y.reshape(length, groups, e // groups)
    y = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps)
    return linear(p, "out_proj", y.reshape(length, e) * p["norm.weight"])


def attention(p, x, *, heads, kv_heads, head_dim, rotary_dim, theta):
    """x (t, d) -> (t, d): causal GQA softmax attention, RoPE on the first rotary_dim channels."""
    length = x.shape[0]
    q = linear(p, "q_proj", x).reshape(length, heads, head_dim)
    k = linear(p, "k_proj", x).reshape(length, kv_heads, head_dim)
    v = linear(p, "v_proj", x).reshape(length, kv_heads, head_dim)
    if rotary_dim:
        half = rotary_dim // 2
        angle = np.arange(length)[:, None] * theta ** (-np.arange(half) * 2.0 / rotary_dim)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

        def rope(a):
            a1, a2 = a[..., :half], a[..., half:rotary_dim]
            return np.concatenate(
                [a1 * cos - a2 * sin, a2 * cos + a1 * sin, a[..., rotary_dim:]], -1
            )

        q, k = rope(q), rope(k)
    k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
    scores = np.einsum("thc,shc->hts", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return linear(p, "o_proj", np.einsum("hts,shc->thc", probs, v).reshape(length, -1))


def mlp(p, x, gated: bool):
    if gated:
        return linear(p, "down_proj", silu(linear(p, "gate_proj", x)) * linear(p, "up_proj", x))
    return linear(p, "down_proj", np.square(np.maximum(linear(p, "up_proj", x), 0.0)))


def _under(tensors, prefix):
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def forward(checkpoint: str | Path, ids) -> np.ndarray:
    """ids (t,) -> logits (t, vocab) float64 of the BambaForCausalLM or NemotronHForCausalLM
    checkpoint in the directory `checkpoint`."""
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = {
        k: v.astype(np.float64) for k, v in load_file(checkpoint / "model.safetensors").items()
    }
    hidden = config["hidden_size"]
    ids = np.asarray(ids)
    if config["model_type"] == "bamba":
        eps = config["rms_norm_eps"]
        ssm = dict(
            heads=config["mamba_n_heads"],
            head_dim=config["mamba_expand"] * hidden // config["mamba_n_heads"],
            groups=config["mamba_n_groups"],
            d_state=config["mamba_d_state"],
            eps=eps,
        )
        head_dim = hidden // config["num_attention_heads"]
        rope = config["rope_parameters"]
        attn = dict(
            heads=config["num_attention_heads"],
            kv_heads=config["num_key_value_heads"],
            head_dim=head_dim,
            rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 0.5)),
            theta=rope["rope_theta"],
        )
        x = tensors["model.embed_tokens.weight"][ids]
        for i in range(config["num_hidden_layers"]):
            p = _under(tensors, f"model.layers.{i}.")
            normed = rms_norm(x, p["input_layernorm.weight"], eps)
            if i in config["attn_layer_indices"]:
                x = x + attention(_under(p, "self_attn."), normed, **attn)
            else:
                x = x + mamba2(_under(p, "mamba."), normed, **ssm)
            normed = rms_norm(x, p["pre_ff_layernorm.weight"], eps)
            x = x + mlp(_under(p, "feed_forward."), normed, gated=True)
        x = rms_norm(x, tensors["model.final_layernorm.weight"], eps)
        tied = config["tie_word_embeddings"]
        head = tensors["model.embed_tokens.weight" if tied else "lm_head.weight"]
        return x @ head.T
    if config["model_type"] != "nemotron_h":
        raise ValueError(f"{checkpoint}: model_type {config['model_type']!r} is not a hybrid")
    eps = config["layer_norm_epsilon"]
    ssm = dict(
        heads=config["mamba_num_heads"],
        head_dim=config["mamba_head_dim"],
        groups=config["n_groups"],
        d_state=config["ssm_state_size"],
        eps=eps,
    )
    attn = dict(
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        rotary_dim=0,
        theta=None,
    )
    x = tensors["backbone.embeddings.weight"][ids]
    for i, kind in enumerate(config["layers_block_type"]):
        p = _under(tensors, f"backbone.layers.{i}.")
        normed = rms_norm(x, p["norm.weight"], eps)
        mixer = _under(p, "mixer.")
        if kind == "linear_attention":
            x = x + mamba2(mixer, normed, **ssm)
        elif kind == "full_attention":
            x = x + attention(mixer, normed, **attn)
        else:
            x = x + mlp(mixer, normed, gated=False)
    return rms_norm(x, tensors["backbone.norm_f.weight"], eps) @ tensors["lm_head.weight"].T
