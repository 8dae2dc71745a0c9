"""Hugging Face BambaForCausalLM and NemotronHForCausalLM checkpoints <-> our hybrid LM.

docs/attention.md lists both layouts. Bamba layer i is two blocks, a mixer (`mamba` or
`self_attn`, norm `input_layernorm`) and the gated MLP (`feed_forward`, norm `pre_ff_layernorm`):
our layer "M-" or "*-". Nemotron-H layer j is one block (`norm`, `mixer`); we pair a Mamba2 or
attention block with the MLP after it into one layer ("M-"), so that its long "M-M-M-..."
patterns become a few runs of identical layers (one scan each). Block j of ours is HF layer j
either way. Torch tensors are (out, in); our kernels the transpose. Conv weights (x, 1, w).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba.config import HybridConfig, hybrid_runs

FAMILIES = ("bamba", "nemotron_h")
# layers_block_type values (transformers 5) -> our block letters.
_BLOCK_TYPES = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*",
                "mlp": "-"}
_NEMOTRON_LETTERS = {"M": "M", "*": "*", "-": "-"}


def family_of(config_dict: dict) -> str | None:
    """"bamba" or "nemotron_h" when config.json is one of these hybrids, else None."""
    model_type = config_dict.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch, family in (("BambaForCausalLM", "bamba"), ("NemotronHForCausalLM", "nemotron_h")):
        if arch in (config_dict.get("architectures") or []):
            return family
    return None


def config_from_hf(config_dict: dict, where: str) -> tuple[HybridConfig, str]:
    """(HybridConfig, family) from a Bamba or Nemotron-H config.json; one ValueError naming
    `where` and the field for anything missing, mistyped or unsupported."""
    from jax_packmamba import pretrained as p

    family = family_of(config_dict)
    f = p._Fields(config_dict, where, default_source="transformers' default")
    f.require(("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
               "intermediate_size"), p._HF_WHY)
    hidden = f.get("hidden_size", p._POSITIVE_INT)
    limit = f.get("time_step_limit", p._PAIR, p._NO_LIMIT)
    if limit != p._NO_LIMIT:
        raise ValueError(f"{where}: time_step_limit={list(limit)} (a clamp on dt) is not "
                         f"supported; only [0.0, Infinity], no clamp")
    extra = f.sub(p.EXTRA_KEY)
    rows, vocab, multiple = p._hf_vocab(f, extra)
    common = dict(d_model=hidden, vocab_size=vocab, pad_vocab_size_multiple=multiple,
                  num_heads=f.get("num_attention_heads", p._POSITIVE_INT),
                  num_kv_heads=f.get("num_key_value_heads", p._POSITIVE_INT),
                  d_ff=f.get("intermediate_size", p._POSITIVE_INT),
                  mlp_bias=f.get("mlp_bias", p._BOOL, False, shape=True),
                  A_init_range=extra.get("A_init_range", p._PAIR, (1.0, 16.0)))
    if family == "bamba":
        fields = _bamba_fields(f, hidden)
    else:
        fields = _nemotron_fields(f, hidden)
    config = p._make_config(HybridConfig, {**common, **fields}, where)
    p._check_hf_vocab(config, rows, where)
    return config, family


def _inner(f, heads_key, head_dim_key, hidden, inner):
    from jax_packmamba import pretrained as p

    heads = f.get(heads_key, p._POSITIVE_INT)
    head_dim = f.get(head_dim_key, p._RANK, "auto", shape=True)
    head_dim = inner // heads if head_dim == "auto" else head_dim
    if heads * head_dim != inner or inner % hidden:
        raise ValueError(f"{f.where}: {heads_key} * {head_dim_key} = {heads} * {head_dim} must "
                         f"equal the Mamba2 inner width {inner}, a multiple of hidden_size "
                         f"{hidden}")
    return head_dim


def _bamba_fields(f, hidden: int) -> dict:
    from jax_packmamba import pretrained as p

    f.require(("num_hidden_layers", "mamba_n_heads", "mamba_d_state", "mamba_n_groups"), p._HF_WHY)
    n = f.get("num_hidden_layers", p._POSITIVE_INT)
    if "layers_block_type" in f.keys():
        types = _block_types(f, n)
    else:
        attn = f.get("attn_layer_indices", p._LIST, [])
        if not all(p._is_int(i) and 0 <= i < n for i in attn):
            raise ValueError(f"{f.where}: attn_layer_indices must list layer indices in "
                             f"[0, num_hidden_layers={n}), got {p._json_text(attn)}")
        types = "".join("*" if i in attn else "M" for i in range(n))
    if "-" in types:
        raise ValueError(f"{f.where}: a Bamba layer is a Mamba2 or attention mixer, not 'mlp'")
    act = f.get("hidden_act", p._STRING, "silu")
    if act != "silu":
        raise ValueError(f"{f.where}: hidden_act={act!r} is not supported; Bamba uses 'silu'")
    expand = f.get("mamba_expand", p._POSITIVE_INT, 2, shape=True)
    rope = f.sub("rope_parameters")
    rope_type = rope.get("rope_type", p._STRING, "default")
    if rope_type != "default":
        raise ValueError(f"{f.where}: rope_parameters.rope_type={rope_type!r} is not supported; "
                         f"only 'default'")
    heads = f.get("num_attention_heads", p._POSITIVE_INT)
    head_dim = hidden // heads
    factor = rope.get("partial_rotary_factor", p._POSITIVE_NUMBER, 0.5)
    rotary = int(head_dim * factor)
    return dict(
        layers=tuple(k + "-" for k in types),
        d_state=f.get("mamba_d_state", p._POSITIVE_INT),
        d_conv=f.get("mamba_d_conv", p._POSITIVE_INT, 4, shape=True),
        expand=expand,
        headdim=_inner(f, "mamba_n_heads", "mamba_d_head", hidden, expand * hidden),
        ngroups=f.get("mamba_n_groups", p._POSITIVE_INT),
        chunk_size=f.get("mamba_chunk_size", p._POSITIVE_INT, 256),
        conv_bias=f.get("mamba_conv_bias", p._BOOL, True, shape=True),
        proj_bias=f.get("mamba_proj_bias", p._BOOL, False, shape=True),
        rotary_dim=rotary - rotary % 2,
        rope_theta=rope.get("rope_theta", p._POSITIVE_NUMBER, 10000.0),
        attention_bias=f.get("attention_bias", p._BOOL, False, shape=True),
        mlp_activation="silu_gated",
        rms_norm_eps=f.get("rms_norm_eps", p._POSITIVE_NUMBER, 1e-6),
        tie_embeddings=f.get("tie_word_embeddings", p._BOOL, True, shape=True),
    )


def _block_types(f, n: int | None) -> str:
    from jax_packmamba import pretrained as p

    types = f.get("layers_block_type", p._LIST)
    bad = [t for t in types if t not in _BLOCK_TYPES]
    if bad or not types:
        raise ValueError(f"{f.where}: layers_block_type holds {p._json_text(bad or types)}; "
                         f"supported: {sorted(_BLOCK_TYPES)} (no 'moe')")
    if n is not None and len(types) != n:
        raise ValueError(f"{f.where}: layers_block_type has {len(types)} entries but "
                         f"num_hidden_layers={n}")
    return "".join(_BLOCK_TYPES[t] for t in types)


def _nemotron_fields(f, hidden: int) -> dict:
    from jax_packmamba import pretrained as p

    f.require(("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"), p._HF_WHY)
    n = f.get("num_hidden_layers", p._POSITIVE_INT, None)
    if "layers_block_type" in f.keys():
        blocks = _block_types(f, n)
    elif "hybrid_override_pattern" in f.keys():
        pattern = f.get("hybrid_override_pattern", p._STRING)
        if not pattern or set(pattern) - set(_NEMOTRON_LETTERS):
            raise ValueError(f"{f.where}: hybrid_override_pattern={pattern!r} may only hold "
                             f"'M' (Mamba2), '*' (attention) and '-' (MLP); 'E' (MoE) is not "
                             f"supported")
        if n is not None and len(pattern) != n:
            raise ValueError(f"{f.where}: hybrid_override_pattern has {len(pattern)} layers but "
                             f"num_hidden_layers={n}")
        blocks = pattern
    else:
        raise ValueError(f"{f.where}: required field layers_block_type (or the older "
                         f"hybrid_override_pattern) missing")
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        act = f.get(key, p._STRING, want)
        if act != want:
            raise ValueError(f"{f.where}: {key}={act!r} is not supported; only {want!r}")
    heads = f.get("mamba_num_heads", p._POSITIVE_INT)
    mhd = f.get("mamba_head_dim", p._POSITIVE_INT)
    inner = heads * mhd
    if inner % hidden:
        raise ValueError(f"{f.where}: mamba_num_heads * mamba_head_dim = {inner} must be a "
                         f"multiple of hidden_size={hidden}")
    return dict(
        layers=pair_layers(blocks),
        d_state=f.get("ssm_state_size", p._POSITIVE_INT),
        d_conv=f.get("conv_kernel", p._POSITIVE_INT, 4, shape=True),
        expand=inner // hidden,
        headdim=mhd,
        ngroups=f.get("n_groups", p._POSITIVE_INT),
        chunk_size=f.get("chunk_size", p._POSITIVE_INT, 128),
        conv_bias=f.get("use_conv_bias", p._BOOL, True, shape=True),
        proj_bias=f.get("use_bias", p._BOOL, False, shape=True),
        head_dim=f.get("head_dim", p._POSITIVE_INT, hidden // f.get("num_attention_heads",
                                                                     p._POSITIVE_INT),
                       shape=True),
        rotary_dim=0,  # Nemotron-H attention has no position encoding
        attention_bias=False,  # its attention module ignores attention_bias
        mlp_activation="relu2",
        rms_norm_eps=f.get("layer_norm_epsilon", p._POSITIVE_NUMBER, 1e-5),
        tie_embeddings=False,  # NemotronHForCausalLM ties nothing: lm_head is always its own
    )


def pair_layers(blocks: str) -> tuple[str, ...]:
    """Nemotron-H's one-block layers as ours: a Mamba2 or attention block with the MLP after it
    is one layer, so that "M-M-M-..." is one run of identical layers."""
    layers, i = [], 0
    while i < len(blocks):
        if blocks[i] != "-" and blocks[i + 1:i + 2] == "-":
            layers.append(blocks[i:i + 2])
            i += 2
        else:
            layers.append(blocks[i])
            i += 1
    return tuple(layers)


def family_for(config: HybridConfig) -> str:
    """The HF family a HybridConfig saves as: Bamba for gated-silu MLPs after every mixer,
    Nemotron-H for relu² MLPs without RoPE."""
    if config.mlp_activation == "silu_gated":
        if any(len(k) != 2 or k[1] != "-" or k[0] == "-" for k in config.layers):
            raise ValueError(f"save_pretrained: a gated-silu hybrid saves as Bamba, whose every "
                             f"layer is a mixer then an MLP ('M-' or '*-'); got layers "
                             f"{config.layers}")
        return "bamba"
    if config.rotary_dim or config.attention_bias:
        raise ValueError("save_pretrained: a relu2 hybrid saves as Nemotron-H, whose attention "
                         "has no RoPE and no biases; got rotary_dim="
                         f"{config.rotary_dim}, attention_bias={config.attention_bias}")
    return "nemotron_h"


def hf_config(config: HybridConfig) -> dict:
    """The config.json of `config` in its family's HF layout (vocab_size: the padded rows)."""
    from jax_packmamba import pretrained as p

    family = family_for(config)
    m2 = config.mamba2_config()
    shared = dict(
        hidden_size=config.d_model, vocab_size=config.padded_vocab_size,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        intermediate_size=config.d_ff, mlp_bias=config.mlp_bias,
        attention_bias=config.attention_bias, tie_word_embeddings=config.tie_embeddings,
        time_step_limit=[0.0, {"__float__": "Infinity"}], dtype="float32",
        time_step_min=config.dt_min, time_step_max=config.dt_max,
        time_step_floor=config.dt_init_floor,
    )
    shared[p.EXTRA_KEY] = dict(vocab_size=config.vocab_size,
                               pad_vocab_size_multiple=config.pad_vocab_size_multiple,
                               A_init_range=list(config.A_init_range))
    if family == "bamba":
        types = [k[0] for k in config.layers]
        head_dim = config.attention_head_dim
        if head_dim != config.d_model // config.num_heads:
            raise ValueError(f"save_pretrained: Bamba's head dim is hidden_size / heads = "
                             f"{config.d_model // config.num_heads}, got head_dim={head_dim}")
        return dict(
            shared, architectures=["BambaForCausalLM"], model_type="bamba",
            num_hidden_layers=len(types),
            attn_layer_indices=[i for i, k in enumerate(types) if k == "*"],
            mamba_n_heads=m2.nheads, mamba_d_head=config.headdim, mamba_d_state=config.d_state,
            mamba_n_groups=config.ngroups, mamba_d_conv=config.d_conv,
            mamba_expand=config.expand, mamba_chunk_size=config.chunk_size,
            mamba_conv_bias=config.conv_bias, mamba_proj_bias=config.proj_bias,
            hidden_act="silu", rms_norm_eps=config.rms_norm_eps,
            rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta,
                                 partial_rotary_factor=config.rotary_dim / head_dim),
        )
    if config.tie_embeddings:
        raise ValueError("save_pretrained: Nemotron-H has no tied embeddings (its lm_head is "
                         "always its own); got tie_embeddings=True")
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    return dict(
        shared, architectures=["NemotronHForCausalLM"], model_type="nemotron_h",
        num_hidden_layers=len(config.blocks),
        layers_block_type=[names[k] for k in config.blocks],
        mamba_num_heads=m2.nheads, mamba_head_dim=config.headdim,
        ssm_state_size=config.d_state, n_groups=config.ngroups, conv_kernel=config.d_conv,
        chunk_size=config.chunk_size, use_conv_bias=config.conv_bias, use_bias=config.proj_bias,
        head_dim=config.attention_head_dim, mlp_hidden_act="relu2", mamba_hidden_act="silu",
        layer_norm_epsilon=config.rms_norm_eps,
    )


# ---------------------------------------------------------------------------------------------
# Tensors: our stacked runs <-> HF's per-layer names.


def _block_prefixes(config: HybridConfig, family: str):
    """For each of our blocks in order: (HF prefix of its norm weight, HF prefix of its
    mixer's tensors)."""
    out = []
    if family == "bamba":
        for i, kinds in enumerate(config.layers):
            mixer = "mamba" if kinds[0] == "M" else "self_attn"
            out.append((f"model.layers.{i}.input_layernorm", f"model.layers.{i}.{mixer}"))
            out.append((f"model.layers.{i}.pre_ff_layernorm", f"model.layers.{i}.feed_forward"))
    else:
        for j in range(len(config.blocks)):
            out.append((f"backbone.layers.{j}.norm", f"backbone.layers.{j}.mixer"))
    return out


def _torch_name(prefix: str, path: tuple) -> tuple[str, bool]:
    """(HF name, is a linear kernel (transposed)) of our mixer parameter at `path`."""
    *mods, leaf = [str(k) for k in path]
    if leaf == "conv_weight":
        return f"{prefix}.conv1d.weight", False
    if leaf == "conv_bias":
        return f"{prefix}.conv1d.bias", False
    name = ".".join([prefix, *mods, "weight" if leaf == "kernel" else leaf])
    return name, leaf == "kernel"


def _head_names(family: str) -> tuple[str, str]:
    if family == "bamba":
        return "model.embed_tokens.weight", "model.final_layernorm.weight"
    return "backbone.embeddings.weight", "backbone.norm_f.weight"


def _layer_entries(model, family: str):
    """(run index, index in run, block in layer, path in the block, HF name, transposed) of
    every stacked block parameter."""
    config = model.config
    prefixes = iter(_block_prefixes(config, family))
    entries = []
    for r, (kinds, count) in enumerate(hybrid_runs(config.layers)):
        block_state = nnx.to_pure_dict(nnx.state(model.layers[r], nnx.Param))["blocks"]
        for i in range(count):
            for j in range(len(kinds)):
                norm_prefix, mixer_prefix = next(prefixes)
                for path, _ in jax.tree_util.tree_flatten_with_path(block_state[j])[0]:
                    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
                    if keys[0] == "norm":
                        entries.append((r, i, j, keys, f"{norm_prefix}.weight", False))
                    else:
                        name, t = _torch_name(mixer_prefix, keys[1:])
                        entries.append((r, i, j, keys, name, t))
    return entries


def model_from_hf_tensors(config: HybridConfig, family: str, tensors: dict, *, source: str):
    """Our LM with `tensors` (HF names, torch layout) as its parameters; ValueError listing the
    missing, unexpected and mis-shaped tensors."""
    from jax_packmamba import pretrained as p
    from jax_packmamba.model import LM

    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    expected, problems = set(), []

    def take(name, shape, transpose=False, conv=False):
        expected.add(name)
        if name not in tensors:
            problems.append(f"missing {name}")
            return np.zeros(shape, np.float32)
        a = np.asarray(tensors[name], np.float32)
        a = a.T if transpose else (a.reshape(a.shape[0], -1) if conv and a.ndim == 3 else a)
        if a.shape != tuple(shape):
            problems.append(f"{name}: shape {np.shape(tensors[name])} does not fit {tuple(shape)}")
            return np.zeros(shape, np.float32)
        return a

    embed, norm_f = _head_names(family)
    state["embedding"]["embedding"] = take(embed, state["embedding"]["embedding"].shape)
    state["norm_f"]["weight"] = take(norm_f, state["norm_f"]["weight"].shape)
    if not config.tie_embeddings:
        state["lm_head"]["kernel"] = take("lm_head.weight", state["lm_head"]["kernel"].shape, True)
    stacks = {}
    for r, _, j, keys, name, t in _layer_entries(model, family):
        node = state["layers"][r]["blocks"][j]
        for k in keys[:-1]:
            node = node[k]
        leaf = node[keys[-1]]
        stacks.setdefault((r, j, keys), (node, keys[-1], []))[2].append(
            take(name, leaf.shape[1:], t, conv=keys[-1] == "conv_weight"))
    for node, key, arrays in stacks.values():
        node[key] = np.stack(arrays)
    unexpected = sorted(set(tensors) - expected)
    if config.tie_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a tied head may be stored; it is the embedding
    problems += [f"unexpected {n}" for n in unexpected]
    if problems:
        raise ValueError(f"{source}: the tensors do not fit a {family} model with layers "
                         f"{config.layers}: {p._short(problems)}")
    nnx.update(model, jax.tree.map(jnp.asarray, state))
    return model


def hf_tensors_from_model(model) -> dict[str, np.ndarray]:
    """Our hybrid LM's parameters under its family's HF names, torch layout, float32."""
    family = family_for(model.config)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    embed, norm_f = _head_names(family)
    out = {embed: np.asarray(state["embedding"]["embedding"], np.float32),
           norm_f: np.asarray(state["norm_f"]["weight"], np.float32)}
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(state["lm_head"]["kernel"]).T)
    for r, i, j, keys, name, t in _layer_entries(model, family):
        node = state["layers"][r]["blocks"][j]
        for k in keys:
            node = node[k]
        a = np.asarray(node[i], np.float32)
        if t:
            a = a.T
        elif keys[-1] == "conv_weight":
            a = a[:, None, :]
        out[name] = np.ascontiguousarray(a)
    return out


def from_pretrained(path: Path, config_dict: dict, overrides: dict):
    from jax_packmamba import pretrained as p

    where = str(path / p.CONFIG_FILE)
    config, family = config_from_hf(config_dict, where)
    config = p._with_overrides(config, overrides, where)
    return model_from_hf_tensors(config, family, p.read_tensors(path), source=str(path))

