"""Loading and saving Mamba checkpoints: Hugging Face `MambaForCausalLM` and state-spaces/mamba.

Two layouts of a local checkpoint directory are read:

  "hf"            Hugging Face MambaForCausalLM: config.json (model_type "mamba": hidden_size,
                  num_hidden_layers, state_size, ...) and model.safetensors, sharded safetensors
                  with model.safetensors.index.json, or pytorch_model.bin; tensors
                  backbone.embeddings.weight, backbone.layers.N.{norm,mixer.*}, backbone.norm_f,
                  lm_head.weight (absent or equal to the embeddings when tied).
  "state-spaces"  the original mamba_ssm MambaLMHeadModel: config.json with d_model, n_layer,
                  vocab_size, ssm_cfg, pad_vocab_size_multiple; pytorch_model.bin (safetensors
                  with the same names is read too); tensors backbone.embedding.weight, otherwise
                  as above.

The mixer tensors (torch shapes, e d_inner, d d_model, n d_state, r dt_rank, w d_conv) are
in_proj.weight (2e, d), conv1d.weight (e, 1, w), conv1d.bias (e,), x_proj.weight (r + 2n, e),
dt_proj.weight (e, r), dt_proj.bias (e,), A_log (e, n), D (e,), out_proj.weight (d, e) and, with
use_bias, in_proj.bias / out_proj.bias. Flax kernels are the transposed torch weights.

safetensors is read through the `safetensors` package; .bin files need torch (optional).
`save_pretrained` writes the Hugging Face layout, which `MambaForCausalLM.from_pretrained`
loads. Every mismatch (unknown or missing tensors, shapes, unsupported config values) raises a
ValueError that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba import tokenizer as tokenizer_lib
from jax_packmamba.config import MambaConfig
from jax_packmamba.model import MambaLM

LAYOUTS = ("hf", "state-spaces")
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Our config fields that the HF config cannot express; kept under this key in config.json
# (transformers keeps unknown keys as attributes, so the file stays loadable there).
EXTRA_KEY = tokenizer_lib.EXTRA_KEY

# Config fields that do not change the function a checkpoint computes (safe to override).
RUNTIME_FIELDS = ("dtype", "scan_impl", "remat")

_MIXER_TENSORS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")


# ---------------------------------------------------------------------------------------------
# Public API.


def from_pretrained(path, **config_overrides) -> MambaLM:
    """MambaLM from a local checkpoint directory in either layout.

    config_overrides: runtime fields of MambaConfig ("dtype", "scan_impl", "remat"); the
    architecture comes from config.json. Parameters are float32 whatever the file's dtype.
    """
    path = Path(path)
    config_dict = read_config_json(path)
    layout = detect_layout(config_dict, path)
    config = config_from_dict(config_dict, layout)
    bad = sorted(set(config_overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(
            f"from_pretrained can only override {RUNTIME_FIELDS}, not {bad}: the architecture "
            f"comes from {path / CONFIG_FILE}")
    config = dataclasses.replace(config, **config_overrides)
    return model_from_tensors(config, read_tensors(path), layout=layout, source=str(path))


def save_pretrained(model, path, *, tokenizer=None) -> None:
    """Writes `model` in the Hugging Face layout: path/config.json and path/model.safetensors.

    tokenizer (a jax_packmamba.tokenizer ByteTokenizer or HFTokenizer): recorded beside the
    model, so that `tokenizer_for_model_dir(path)` and the generate command line find it:
    config.json's "eos_token_id" is its end-of-document id, and its tokenizer.json is copied
    into path (or, for bytes, config.json says {"tokenizer": "bytes"} under EXTRA_KEY).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    config = hf_config_from_config(model.config)
    if tokenizer is not None:
        config.update(_tokenizer_entries(tokenizer, model.config, config[EXTRA_KEY]))
    path.mkdir(parents=True, exist_ok=True)
    tensors = tensors_from_model(model)
    if tokenizer is not None:
        tokenizer_lib.save_tokenizer_files(tokenizer, path)
    with open(path / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # transformers only accepts safetensors whose metadata names the framework.
    save_file(tensors, str(path / SAFETENSORS_FILE), metadata={"format": "pt"})


def _tokenizer_entries(tokenizer, config: MambaConfig, extra: dict) -> dict:
    """config.json entries recording `tokenizer` (see jax_packmamba.tokenizer); ValueError
    when it produces ids the model has no embedding row for."""
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids (end of document "
            f"{tokenizer.eod_id}) but the model only {config.padded_vocab_size} embedding rows")
    entries = tokenizer_lib.tokenizer_model_config(tokenizer)
    entries[EXTRA_KEY] = {**extra, **entries.get(EXTRA_KEY, {})}
    return entries


def detect_layout(config_dict: dict, path="<config>") -> str:
    """'hf' or 'state-spaces' from the keys of config.json."""
    if "hidden_size" in config_dict or config_dict.get("model_type") == "mamba":
        return "hf"
    if "d_model" in config_dict:
        return "state-spaces"
    raise ValueError(
        f"{Path(path) / CONFIG_FILE} is neither a Hugging Face Mamba config (model_type 'mamba', "
        f"hidden_size, ...) nor a state-spaces/mamba config (d_model, n_layer, ssm_cfg, ...); "
        f"its keys are {sorted(config_dict)}")


def config_from_dict(config_dict: dict, layout: str) -> MambaConfig:
    """MambaConfig from the contents of a config.json in `layout`."""
    if layout == "hf":
        return _config_from_hf(config_dict)
    if layout == "state-spaces":
        return _config_from_state_spaces(config_dict)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def hf_config_from_config(config: MambaConfig) -> dict:
    """The Hugging Face MambaConfig dict for `config` (vocab_size is the padded size: the
    number of embedding rows), plus our own fields under EXTRA_KEY."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "time_step_rank": "auto" if config.dt_rank is None else config.dt_rank,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "time_step_scale": config.dt_scale,
        "time_step_init_scheme": "random",
        "use_bias": config.proj_bias,
        "use_conv_bias": config.conv_bias,
        "layer_norm_epsilon": config.rms_norm_eps,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        # An initialisation flag only, but transformers (5.x) applies it to out_proj after
        # loading the weights, which would change the function; ours is kept in EXTRA_KEY.
        "rescale_prenorm_residual": False,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        EXTRA_KEY: {
            "vocab_size": config.vocab_size,
            "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
            "rescale_prenorm_residual": config.rescale_prenorm_residual,
        },
    }


def tensor_names(config: MambaConfig, layout: str = "hf") -> list[str]:
    """The checkpoint tensor names a model with `config` has, in `layout`."""
    return list(_name_map(config, layout))


def model_from_tensors(config: MambaConfig, tensors: dict, *, layout: str = "hf", source="tensors"):
    """MambaLM with `config` whose parameters are the torch-named `tensors` (name -> array).

    This is the whole loader once the files are read; it raises ValueError naming every
    missing, unexpected or mis-shaped tensor.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = _name_map(config, layout)
    tensors = dict(tensors)
    # A tied checkpoint may still carry lm_head.weight (torch.save of a tied model does); it
    # must then be the embedding table.
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head = _to_numpy(tensors.pop("lm_head.weight"))
        embed_name = _embedding_name(layout)
        if embed_name in tensors and not np.array_equal(head, _to_numpy(tensors[embed_name])):
            raise ValueError(
                f"{source}: config ties the embeddings (tie_word_embeddings / tie_embeddings) but "
                f"lm_head.weight differs from {embed_name}; set tie_word_embeddings to false")
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the {layout} layout of this config ({config.n_layer} layers, "
            f"d_model={config.d_model}, tie_embeddings={config.tie_embeddings}, "
            f"proj_bias={config.proj_bias}, conv_bias={config.conv_bias}): "
            f"missing tensors {_short(missing)}; unexpected tensors {_short(unexpected)}")

    abstract = nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    mismatched = []
    for name, (param_path, to_flax) in names.items():
        array = to_flax(_to_numpy(tensors[name]).astype(np.float32))
        expected = flat[param_path].shape
        if array.shape != expected:
            mismatched.append(
                f"{name}: expected torch shape {_torch_shape(to_flax, expected)}, got "
                f"{tuple(np.shape(tensors[name]))}")
            continue
        flat[param_path] = flat[param_path].replace(jnp.asarray(array))
    if mismatched:
        raise ValueError(f"{source}: tensor shapes do not match the config ({_config_summary(config)}): "
                         + "; ".join(mismatched))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tensors_from_model(model, layout: str = "hf") -> dict[str, np.ndarray]:
    """The model's parameters as torch-named float32 numpy arrays in `layout`."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for name, (param_path, to_flax) in _name_map(model.config, layout).items():
        out[name] = np.ascontiguousarray(_inverse(to_flax)(np.asarray(flat[param_path][...], np.float32)))
    return out


def read_config_json(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is not a directory")
    file = path / CONFIG_FILE
    if not file.exists():
        raise ValueError(f"{path} has no {CONFIG_FILE}; a checkpoint directory needs one")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (name -> array).

    Looks for, in order: model.safetensors, model.safetensors.index.json (shards),
    pytorch_model.bin, pytorch_model.bin.index.json (shards).
    """
    path = Path(path)
    if (path / SAFETENSORS_FILE).exists():
        return _read_safetensors(path / SAFETENSORS_FILE)
    if (path / SAFETENSORS_INDEX).exists():
        return _read_sharded(path, SAFETENSORS_INDEX, _read_safetensors)
    if (path / BIN_FILE).exists():
        return _read_bin(path / BIN_FILE)
    if (path / BIN_INDEX).exists():
        return _read_sharded(path, BIN_INDEX, _read_bin)
    raise ValueError(
        f"{path} holds no weights: expected one of {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
        f"{BIN_FILE}, {BIN_INDEX}; found {sorted(os.listdir(path))}")


# ---------------------------------------------------------------------------------------------
# Configs.


def _config_from_hf(d: dict) -> MambaConfig:
    where = "Hugging Face config.json"
    _require(d, ("hidden_size", "num_hidden_layers", "vocab_size"), where)
    if d.get("model_type", "mamba") != "mamba":
        raise ValueError(f"{where}: model_type must be 'mamba' (Mamba1), got {d['model_type']!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported; Mamba uses 'silu'")
    hidden, expand = d["hidden_size"], d.get("expand", 2)
    intermediate = d.get("intermediate_size", expand * hidden)
    if intermediate != expand * hidden:
        raise ValueError(
            f"{where}: intermediate_size={intermediate} must equal expand * hidden_size = "
            f"{expand} * {hidden}")
    rank = d.get("time_step_rank", "auto")
    extra = d.get(EXTRA_KEY, {})
    vocab = d["vocab_size"]
    fields = dict(
        d_model=hidden,
        n_layer=d["num_hidden_layers"],
        vocab_size=extra.get("vocab_size", vocab),
        pad_vocab_size_multiple=extra.get("pad_vocab_size_multiple", 1),
        d_state=d.get("state_size", 16),
        d_conv=d.get("conv_kernel", 4),
        expand=expand,
        dt_rank=None if rank == "auto" else rank,
        dt_min=d.get("time_step_min", 0.001),
        dt_max=d.get("time_step_max", 0.1),
        dt_init_floor=d.get("time_step_floor", 1e-4),
        dt_scale=d.get("time_step_scale", 1.0),
        conv_bias=d.get("use_conv_bias", True),
        proj_bias=d.get("use_bias", False),
        rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=d.get("tie_word_embeddings", True),
        rescale_prenorm_residual=extra.get("rescale_prenorm_residual",
                                           d.get("rescale_prenorm_residual", False)),
        initializer_range=d.get("initializer_range", 0.1),
    )
    config = _make_config(fields, where)
    if config.padded_vocab_size != vocab:
        raise ValueError(
            f"{where}: vocab_size={vocab} (embedding rows) but {EXTRA_KEY} says vocab_size="
            f"{config.vocab_size} padded to a multiple of {config.pad_vocab_size_multiple} = "
            f"{config.padded_vocab_size}")
    return config


_SSM_CFG_FIELDS = dict(d_state="d_state", d_conv="d_conv", expand="expand", dt_rank="dt_rank",
                       dt_min="dt_min", dt_max="dt_max", dt_init_floor="dt_init_floor",
                       dt_scale="dt_scale", conv_bias="conv_bias", bias="proj_bias")
# ssm_cfg keys that only matter at initialisation or for kernel choice.
_SSM_CFG_IGNORED = ("dt_init", "use_fast_path", "layer_idx", "device", "dtype")


def _config_from_state_spaces(d: dict) -> MambaConfig:
    where = "state-spaces config.json"
    _require(d, ("d_model", "n_layer", "vocab_size"), where)
    if not d.get("rms_norm", True):
        raise ValueError(f"{where}: rms_norm=false (LayerNorm) is not supported; only RMSNorm")
    if d.get("d_intermediate", 0):
        raise ValueError(f"{where}: d_intermediate={d['d_intermediate']} (MLP blocks) is not supported")
    if d.get("attn_layer_idx"):
        raise ValueError(f"{where}: attn_layer_idx={d['attn_layer_idx']} (attention layers) is not supported")
    ssm_cfg = dict(d.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(f"{where}: ssm_cfg.layer={layer!r} is not supported; only Mamba1")
    unknown = sorted(set(ssm_cfg) - set(_SSM_CFG_FIELDS) - set(_SSM_CFG_IGNORED))
    if unknown:
        raise ValueError(f"{where}: unsupported ssm_cfg keys {unknown}")
    fields = dict(
        d_model=d["d_model"],
        n_layer=d["n_layer"],
        vocab_size=d["vocab_size"],
        pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
        tie_embeddings=d.get("tie_embeddings", True),
        rms_norm_eps=d.get("norm_epsilon", 1e-5),
    )
    for key, field in _SSM_CFG_FIELDS.items():
        if key in ssm_cfg:
            fields[field] = ssm_cfg[key]
    if fields.get("dt_rank") == "auto":
        fields["dt_rank"] = None
    return _make_config(fields, where)


def _make_config(fields, where) -> MambaConfig:
    try:
        return MambaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _require(d, keys, where):
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{where} lacks {missing}")


def _config_summary(config: MambaConfig) -> str:
    return (f"d_model={config.d_model}, n_layer={config.n_layer}, d_inner={config.d_inner}, "
            f"d_state={config.d_state}, d_conv={config.d_conv}, dt_rank={config.dt_rank_resolved}, "
            f"vocab rows={config.padded_vocab_size}")


# ---------------------------------------------------------------------------------------------
# Names: torch name -> (path in the nnx state, torch-array -> flax-array transform).


def _transpose(a):
    return a.T


def _squeeze_conv(a):  # (e, 1, w) -> (e, w)
    return a.reshape(a.shape[0], a.shape[-1]) if a.ndim == 3 and a.shape[1] == 1 else a


def _identity(a):
    return a


def _inverse(to_flax):
    if to_flax is _squeeze_conv:
        return lambda a: a[:, None, :]
    return to_flax  # identity and transpose are their own inverses


def _torch_shape(to_flax, flax_shape):
    if to_flax is _transpose:
        return tuple(reversed(flax_shape))
    if to_flax is _squeeze_conv:
        return (flax_shape[0], 1, flax_shape[1])
    return tuple(flax_shape)


def _embedding_name(layout):
    return "backbone.embeddings.weight" if layout == "hf" else "backbone.embedding.weight"


def _name_map(config: MambaConfig, layout: str) -> dict:
    names = {_embedding_name(layout): (("embedding", "embedding"), _identity)}
    for i in range(config.n_layer):
        prefix = f"backbone.layers.{i}."
        mixer = ("layers", i, "mixer")
        names[prefix + "norm.weight"] = (("layers", i, "norm", "weight"), _identity)
        names[prefix + "mixer.in_proj.weight"] = (mixer + ("in_proj", "kernel"), _transpose)
        names[prefix + "mixer.conv1d.weight"] = (mixer + ("conv_weight",), _squeeze_conv)
        names[prefix + "mixer.x_proj.weight"] = (mixer + ("x_proj", "kernel"), _transpose)
        names[prefix + "mixer.dt_proj.weight"] = (mixer + ("dt_proj", "kernel"), _transpose)
        names[prefix + "mixer.dt_proj.bias"] = (mixer + ("dt_proj", "bias"), _identity)
        names[prefix + "mixer.A_log"] = (mixer + ("A_log",), _identity)
        names[prefix + "mixer.D"] = (mixer + ("D",), _identity)
        names[prefix + "mixer.out_proj.weight"] = (mixer + ("out_proj", "kernel"), _transpose)
        if config.conv_bias:
            names[prefix + "mixer.conv1d.bias"] = (mixer + ("conv_bias",), _identity)
        if config.proj_bias:
            names[prefix + "mixer.in_proj.bias"] = (mixer + ("in_proj", "bias"), _identity)
            names[prefix + "mixer.out_proj.bias"] = (mixer + ("out_proj", "bias"), _identity)
    names["backbone.norm_f.weight"] = (("norm_f", "weight"), _identity)
    if not config.tie_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), _transpose)
    return names


def _short(names, limit=12):
    if not names:
        return "none"
    head = ", ".join(names[:limit])
    return f"[{head}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


# ---------------------------------------------------------------------------------------------
# Files.


def _read_safetensors(file) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            f"reading {file} needs the safetensors package: pip install safetensors") from None
    out = {}
    # framework "flax" returns jax arrays and so handles bfloat16, which numpy cannot name.
    with safe_open(str(file), framework="flax") as f:
        for name in f.keys():
            out[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    return out


def _read_bin(file) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{file} is a PyTorch pickle, which needs torch to read: pip install torch (the CPU "
            f"wheel is enough), or convert the checkpoint to safetensors") from None
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__})")
    return {name: t.detach().float().numpy() for name, t in state.items()}


def _read_sharded(path: Path, index_file: str, read) -> dict[str, np.ndarray]:
    with open(path / index_file) as f:
        index = json.load(f)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / index_file} has no weight_map")
    out = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).exists():
            raise ValueError(f"{path / index_file} names shard {shard}, which is missing")
        tensors = read(path / shard)
        listed = {n for n, s in weight_map.items() if s == shard}
        if set(tensors) != listed:
            raise ValueError(
                f"shard {shard} holds {_short(sorted(set(tensors) - listed))} not listed in "
                f"{index_file} and lacks {_short(sorted(listed - set(tensors)))}")
        out.update(tensors)
    return out


def _to_numpy(a) -> np.ndarray:
    return np.asarray(a)
