"""Loading and saving Mamba and Mamba2 checkpoints: Hugging Face and state-spaces/mamba layouts.
(Hybrids: HF Bamba and Nemotron-H, in the last section below.)

Two layouts of a local checkpoint directory are read, each for both model families:

  "hf"            Hugging Face MambaForCausalLM (config.json model_type "mamba": hidden_size,
                  num_hidden_layers, state_size, ...) or Mamba2ForCausalLM (model_type
                  "mamba2": also num_heads, head_dim, n_groups, chunk_size); model.safetensors,
                  sharded safetensors with model.safetensors.index.json, or pytorch_model.bin;
                  tensors backbone.embeddings.weight, backbone.layers.N.{norm,mixer.*},
                  backbone.norm_f, lm_head.weight (absent or equal to the embeddings when tied).
  "state-spaces"  the original mamba_ssm MambaLMHeadModel (mamba-* and mamba2-* checkpoints):
                  config.json with d_model, n_layer, vocab_size, ssm_cfg (its "layer" "Mamba1",
                  the default, or "Mamba2"), pad_vocab_size_multiple; pytorch_model.bin
                  (safetensors with the same names is read too); tensors
                  backbone.embedding.weight, otherwise as above.

Mixer tensors in torch shapes (e d_inner, d d_model, n d_state, r dt_rank, w d_conv, h heads,
g groups, x = e + 2 g n conv channels):
  Mamba1  in_proj.weight (2e, d), conv1d.weight (e, 1, w), conv1d.bias (e,), x_proj.weight
          (r + 2n, e), dt_proj.weight (e, r), dt_proj.bias (e,), A_log (e, n), D (e,),
          out_proj.weight (d, e)
  Mamba2  in_proj.weight (e + x + h, d) with rows [z, xBC, dt], conv1d.weight (x, 1, w),
          conv1d.bias (x,), dt_bias (h,), A_log (h,), D (h,) (or (e,) with mamba_ssm's
          D_has_hdim), norm.weight (e,) (the gated RMSNorm), out_proj.weight (d, e)
and, with bias / use_bias, in_proj.bias and out_proj.bias. Flax kernels are the transposed
torch weights.

Config fields are checked before any tensor is read: a value of the wrong JSON type is one
ValueError naming the field, the value and the type expected. Fields that fix tensor shapes are
required in the Hugging Face layout, where transformers always writes them (transformers'
defaults are never guessed; only tie_word_embeddings, which transformers may leave out, takes
its default). In the state-spaces layout mamba_ssm's constructor defaults are part of the
format (released mamba2-* configs give ssm_cfg {"layer": "Mamba2"} alone), so they apply; when
the tensors then disagree, the error lists the defaults that were used.

safetensors is read through the `safetensors` package; .bin files need torch (optional).
`save_pretrained` writes the Hugging Face layout, which `MambaForCausalLM.from_pretrained` or
`Mamba2ForCausalLM.from_pretrained` loads. Every mismatch (unknown or missing tensors, shapes,
unsupported config values, unreadable files) raises a ValueError that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba import run_layout
from jax_packmamba import tokenizer as tokenizer_lib
from jax_packmamba.config import (
    REMAT,
    HybridConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    hybrid_runs,
)
from jax_packmamba.model import LM, mixer_class
from jax_packmamba.ops.causal_conv1d import CONV_IMPLS

LAYOUTS = ("hf", "state-spaces")
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Our config fields that the HF config cannot express; kept under this key in config.json
# (transformers keeps unknown keys as attributes, so the file stays loadable there).
EXTRA_KEY = tokenizer_lib.EXTRA_KEY

# Config fields that do not change the function a checkpoint computes (safe to override);
# the same names in MambaConfig and Mamba2Config (scan_impl is the SSD scan's for Mamba2).
RUNTIME_FIELDS = ("dtype", "scan_impl", "conv_impl", "remat", "scan_layers")

AnyConfig = MambaConfig | Mamba2Config


# ---------------------------------------------------------------------------------------------
# Public API.


def from_pretrained(path, **config_overrides) -> LM:
    """MambaLM or Mamba2LM from a local checkpoint directory in either layout.

    config_overrides: runtime fields ("dtype", "scan_impl", "conv_impl", "remat",
    "scan_layers"); the
    architecture comes from config.json. Parameters are float32 whatever the file's dtype.
    """
    path = run_layout.resolve_model_dir(path)  # also a training run or one of its checkpoints
    config_dict = read_config_json(path)
    if family_of(config_dict) is not None:  # Bamba, Nemotron-H
        return hybrid_from_pretrained(path, config_dict, config_overrides)
    layout = detect_layout(config_dict, path)
    config, defaults_used = _parse_config(config_dict, layout, str(path / CONFIG_FILE))
    config = _with_overrides(config, config_overrides, path / CONFIG_FILE)
    return model_from_tensors(
        config, read_tensors(path), layout=layout, source=str(path), defaults_used=defaults_used
    )


def _with_overrides(config: AnyConfig, overrides: dict, config_file) -> AnyConfig:
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(
            f"from_pretrained can only override {RUNTIME_FIELDS}, not {bad}: the architecture "
            f"comes from {config_file}"
        )
    # The ops check their impl only when first called; say it here, before any tensor is read.
    scan_impls = mixer_class(config).scan_impls
    for name, allowed in (
        ("scan_impl", scan_impls),
        ("conv_impl", CONV_IMPLS),
        ("remat", REMAT + (False, True)),
        ("scan_layers", (False, True)),
    ):
        value = overrides.get(name, allowed[0])
        if not any(type(value) is type(a) and value == a for a in allowed):  # 1 == True: types too
            raise ValueError(f"from_pretrained: {name} must be one of {allowed}, got {value!r}")
    try:
        return dataclasses.replace(config, **overrides)
    except ValueError as e:
        raise ValueError(f"from_pretrained: {e}") from None


def save_pretrained(model, path, *, tokenizer=None) -> None:
    """Writes `model` (MambaLM or Mamba2LM) in the Hugging Face layout: path/config.json and
    path/model.safetensors. A Mamba-3 model is written in mamba_ssm's state-spaces layout
    (config.json with its MambaConfig's fields, tensors named as its MambaLMHeadModel's).

    tokenizer (a jax_packmamba.tokenizer ByteTokenizer or HFTokenizer): recorded beside the
    model, so that `tokenizer_for_model_dir(path)` and the generate command line find it:
    config.json's "eos_token_id" is its end-of-document id, and its tokenizer.json is copied
    into path (or, for bytes, config.json says {"tokenizer": "bytes"} under EXTRA_KEY).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if isinstance(model.config, HybridConfig):  # Bamba or Nemotron-H
        config = hybrid_hf_config(model.config)
        tensors = hf_tensors_from_model(model)
    elif isinstance(model.config, Mamba3Config):  # no HF layout: mamba_ssm's own
        config = mamba3_state_spaces_config(model.config)
        tensors = tensors_from_model(model, "state-spaces")
    else:
        config = hf_config_from_config(model.config)
        tensors = tensors_from_model(model)
    if tokenizer is not None:
        config.update(_tokenizer_entries(tokenizer, model.config, config.get(EXTRA_KEY, {})))
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer_lib.save_tokenizer_files(tokenizer, path)
    with open(path / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # transformers only accepts safetensors whose metadata names the framework.
    save_file(tensors, str(path / SAFETENSORS_FILE), metadata={"format": "pt"})


def _tokenizer_entries(tokenizer, config: AnyConfig, extra: dict) -> dict:
    """config.json entries recording `tokenizer` (see jax_packmamba.tokenizer); ValueError
    when it produces ids the model has no embedding row for."""
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids (end of document "
            f"{tokenizer.eod_id}) but the model only {config.padded_vocab_size} embedding rows"
        )
    entries = tokenizer_lib.tokenizer_model_config(tokenizer)
    entries[EXTRA_KEY] = {**extra, **entries.get(EXTRA_KEY, {})}
    return entries


def detect_layout(config_dict: dict, path="<config>") -> str:
    """'hf' or 'state-spaces' from the keys of config.json."""
    if "hidden_size" in config_dict or config_dict.get("model_type") in ("mamba", "mamba2"):
        return "hf"
    if "d_model" in config_dict:
        return "state-spaces"
    raise ValueError(
        f"{Path(path) / CONFIG_FILE} is neither a Hugging Face Mamba or Mamba2 config "
        f"(model_type 'mamba' or 'mamba2', hidden_size, ...) nor a state-spaces/mamba config "
        f"(d_model, n_layer, ssm_cfg, ...); its keys are {sorted(config_dict)}"
    )


def config_from_dict(config_dict: dict, layout: str, where: str = CONFIG_FILE) -> AnyConfig:
    """MambaConfig or Mamba2Config from the contents of a config.json in `layout`; `where`
    names the file in error messages."""
    return _parse_config(config_dict, layout, where)[0]


def hf_config_from_config(config: AnyConfig) -> dict:
    """The Hugging Face MambaConfig or Mamba2Config dict for `config` (vocab_size is the padded
    size: the number of embedding rows), plus our own fields under EXTRA_KEY."""
    if isinstance(config, Mamba2Config):
        return _hf_mamba2_config(config)
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
        "time_step_scale": config.dt_scale,
        "time_step_init_scheme": "random",
        **_hf_shared_entries(config),
    }


def _hf_shared_entries(config: MambaConfig | Mamba2Config) -> dict:
    """The config.json entries that both families' Hugging Face configs hold alike."""
    return {
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
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


def _hf_mamba2_config(config: Mamba2Config) -> dict:
    if config.D_has_hdim:
        raise ValueError(
            "save_pretrained: Mamba2Config.D_has_hdim=True (D per channel) has no Hugging Face "
            "Mamba2 equivalent (its D is one per head)"
        )
    config_dict = {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "num_heads": config.nheads,
        "head_dim": config.headdim,
        "n_groups": config.ngroups,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "chunk_size": config.chunk_size,
        **_hf_shared_entries(config),
    }
    config_dict[EXTRA_KEY]["A_init_range"] = list(config.A_init_range)
    return config_dict


def tensor_names(config: AnyConfig, layout: str = "hf") -> list[str]:
    """The checkpoint tensor names a model with `config` has, in `layout`."""
    return list(_name_map(config, layout))


def model_from_tensors(
    config: AnyConfig,
    tensors: dict,
    *,
    layout: str = "hf",
    source="tensors",
    defaults_used: dict | None = None,
):
    """MambaLM (MambaConfig) or Mamba2LM (Mamba2Config) whose parameters are the torch-named
    `tensors` (name -> array).

    This is the whole loader once the files are read; it raises ValueError naming every
    missing, unexpected or mis-shaped tensor. defaults_used (config.json key -> (value, whose
    default it is)): the shape-fixing fields config.json did not set, listed in those errors.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = _name_map(config, layout)
    tensors = dict(tensors)
    note = _defaults_note(defaults_used)
    # A tied checkpoint may still carry lm_head.weight (torch.save of a tied model does); it
    # must then be the embedding table.
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head = _to_numpy(tensors.pop("lm_head.weight"))
        embed_name = _embedding_name(layout)
        if embed_name in tensors and not np.array_equal(head, _to_numpy(tensors[embed_name])):
            raise ValueError(
                f"{source}: config ties the embeddings (tie_word_embeddings / tie_embeddings) but "
                f"lm_head.weight differs from {embed_name}; set tie_word_embeddings to false{note}"
            )
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the {layout} layout of this {type(config).__name__} "
            f"({config.n_layer} layers, d_model={config.d_model}, "
            f"tie_embeddings={config.tie_embeddings}, "
            f"proj_bias={getattr(config, 'proj_bias', False)}, "
            f"conv_bias={getattr(config, 'conv_bias', None)}): missing tensors {_short(missing)}; unexpected "
            f"tensors {_short(unexpected)}{note}"
        )

    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    mismatched = []
    layers: dict = {}  # stacked parameter path -> its per-layer arrays
    for name, (param_path, layer, to_flax) in names.items():
        array = to_flax(_to_numpy(tensors[name]).astype(np.float32))
        expected = flat[param_path].shape[0 if layer is None else 1 :]
        if array.shape != expected:
            mismatched.append(
                f"{name}: expected torch shape {_torch_shape(to_flax, expected)}, got "
                f"{tuple(np.shape(tensors[name]))}"
            )
        elif layer is None:
            flat[param_path] = flat[param_path].replace(jnp.asarray(array))
        else:
            layers.setdefault(param_path, {})[layer] = array
    if mismatched:
        raise ValueError(
            f"{source}: tensor shapes do not match the config ({_config_summary(config)}): "
            + "; ".join(mismatched)
            + note
        )
    # The checkpoint's layers one by one -> the model's parameters stacked on the layer axis.
    for param_path, arrays in layers.items():
        stacked = np.stack([arrays[i] for i in range(config.n_layer)])
        flat[param_path] = flat[param_path].replace(jnp.asarray(stacked))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tensors_from_model(model, layout: str = "hf") -> dict[str, np.ndarray]:
    """The model's parameters as torch-named float32 numpy arrays in `layout` (layers one by
    one, as checkpoints hold them)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for name, (param_path, layer, to_flax) in _name_map(model.config, layout).items():
        array = np.asarray(flat[param_path][...], np.float32)
        array = array if layer is None else array[layer]
        out[name] = np.ascontiguousarray(_inverse(to_flax)(array))
    return out


def read_config_json(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is not a directory")
    file = path / CONFIG_FILE
    if not file.exists():
        raise ValueError(f"{path} has no {CONFIG_FILE}; a checkpoint directory needs one")
    return _read_json_object(file)


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
        f"{BIN_FILE}, {BIN_INDEX}; found {sorted(os.listdir(path))}"
    )


# ---------------------------------------------------------------------------------------------
# Typed reads of config.json fields.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_float(v):
    """A number, or transformers' encoding of a non-finite one ({"__float__": "Infinity"});
    None when `v` is neither."""
    if _is_number(v):
        return float(v)
    spelled = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
    if isinstance(v, dict) and set(v) == {"__float__"} and v["__float__"] in spelled:
        return spelled[v["__float__"]]
    return None


# What a _Kind's convert returns for a JSON value not of that kind (None is a value: null).
_BAD = object()


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What a field must hold: `name` completes "must be ...", `convert` returns the value to
    use, or _BAD when the JSON value is not of this kind."""

    name: str
    convert: Callable[[Any], Any]


def _kind(name, accepts, convert=lambda v: v) -> _Kind:
    return _Kind(name, lambda v: convert(v) if accepts(v) else _BAD)


def _pair(v):
    if not isinstance(v, list) or len(v) != 2:
        return _BAD
    pair = tuple(_json_float(x) for x in v)
    return _BAD if None in pair else pair


_POSITIVE_INT = _kind("a positive integer", lambda v: _is_int(v) and v >= 1)
_NONNEGATIVE_INT = _kind("a non-negative integer", lambda v: _is_int(v) and v >= 0)
_POSITIVE_NUMBER = _kind("a positive number", lambda v: _is_number(v) and v > 0, float)
_NUMBER = _kind("a number", _is_number, float)
_BOOL = _kind("true or false", lambda v: isinstance(v, bool))
_STRING = _kind("a string", lambda v: isinstance(v, str))
_OBJECT = _kind("a JSON object", lambda v: isinstance(v, dict))
_LIST = _kind("a list", lambda v: isinstance(v, list))
_RANK = _kind('a positive integer or "auto"', lambda v: v == "auto" or (_is_int(v) and v >= 1))
_PAIR = _Kind("a list of two numbers", _pair)
_OPTIONAL_POSITIVE_INT = _kind(
    "null or a positive integer", lambda v: v is None or (_is_int(v) and v >= 1)
)

_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _json_text(value) -> str:
    """`value` as config.json would spell it (tuples as lists), shortened."""
    try:
        text = json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value) -> str:
    return f"{_json_text(value)} ({_JSON_TYPE_NAMES.get(type(value), type(value).__name__)})"


class _Fields:
    """Typed reads from one JSON object of config.json (or an object inside it, `prefix`):
    each bad value is one ValueError naming the file, the field, the value and the type
    expected. Records the defaults used for fields that fix tensor shapes."""

    REQUIRED = object()

    def __init__(
        self,
        d: dict,
        where: str,
        prefix: str = "",
        defaults_used: dict | None = None,
        default_source: str = "default",
    ):
        self.d, self.where, self.prefix = d, where, prefix
        self.defaults_used = {} if defaults_used is None else defaults_used
        self.default_source = default_source

    def require(self, keys, why: str) -> None:
        missing = [self.prefix + k for k in keys if k not in self.d]
        if missing:
            raise ValueError(
                f"{self.where}: required field{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} missing ({why})"
            )

    def get(self, key: str, kind: _Kind, default=REQUIRED, *, shape: bool = False):
        """The field's value as `kind`; `default` when absent (recorded when `shape`: the field
        fixes a tensor shape or which tensors exist)."""
        if key not in self.d:
            if default is self.REQUIRED:
                raise ValueError(f"{self.where}: required field {self.prefix}{key} missing")
            if shape:
                self.defaults_used[self.prefix + key] = (default, self.default_source)
            return default
        value = self.d[key]
        converted = kind.convert(value)
        if converted is _BAD:
            raise ValueError(
                f"{self.where}: {self.prefix}{key} must be {kind.name}, got {_describe(value)}"
            )
        return converted

    def sub(self, key: str) -> _Fields:
        """The JSON object under `key` (empty when absent) with the same bookkeeping."""
        return _Fields(
            self.get(key, _OBJECT, {}),
            self.where,
            f"{self.prefix}{key}.",
            self.defaults_used,
            self.default_source,
        )

    def keys(self) -> set[str]:
        return set(self.d)


def _defaults_note(defaults_used: dict | None) -> str:
    if not defaults_used:
        return ""
    listed = ", ".join(
        f"{key}={json.dumps(value)} ({source})"
        for key, (value, source) in sorted(defaults_used.items())
    )
    return f"; {CONFIG_FILE} does not set these shape fields, so defaults were used: {listed}"


# ---------------------------------------------------------------------------------------------
# Configs.


def _parse_config(config_dict: dict, layout: str, where: str) -> tuple[AnyConfig, dict]:
    """(config, defaults used for shape fields: key -> (value, source))."""
    if layout == "hf":
        fields = _Fields(config_dict, where, default_source="transformers' default")
        family = _hf_family(fields)
        config = (
            _config_from_hf_mamba2(fields) if family == "mamba2" else _config_from_hf_mamba(fields)
        )
    elif layout == "state-spaces":
        fields = _Fields(config_dict, where, default_source="mamba_ssm's default")
        config = _config_from_state_spaces(fields)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return config, fields.defaults_used


# Keys only a Hugging Face Mamba2 config has (for configs without model_type / architectures).
_HF_MAMBA2_ONLY_KEYS = ("num_heads", "head_dim", "n_groups", "chunk_size")


def _hf_family(f: _Fields) -> str:
    model_type = f.get("model_type", _STRING, None)
    if model_type is not None:
        if model_type not in ("mamba", "mamba2"):
            raise ValueError(
                f"{f.where}: model_type must be 'mamba' (MambaForCausalLM) or 'mamba2' "
                f"(Mamba2ForCausalLM), got {model_type!r}"
            )
        return model_type
    architectures = f.get("architectures", _LIST, [])
    if "Mamba2ForCausalLM" in architectures:
        return "mamba2"
    if "MambaForCausalLM" in architectures:
        return "mamba"
    return "mamba2" if any(k in f.keys() for k in _HF_MAMBA2_ONLY_KEYS) else "mamba"


def _check_activation(f: _Fields) -> None:
    act = f.get("hidden_act", _STRING, "silu")
    if act != "silu":
        raise ValueError(f"{f.where}: hidden_act={act!r} is not supported; Mamba uses 'silu'")


def _hf_vocab(f: _Fields, extra: _Fields) -> tuple[int, int, int]:
    """(embedding rows, vocab_size, pad_vocab_size_multiple): config.json's vocab_size is the
    number of embedding rows; EXTRA_KEY may give the unpadded size and the multiple."""
    rows = f.get("vocab_size", _POSITIVE_INT)
    return (
        rows,
        extra.get("vocab_size", _POSITIVE_INT, rows),
        extra.get("pad_vocab_size_multiple", _POSITIVE_INT, 1),
    )


def _check_hf_vocab(config: AnyConfig, rows: int, where: str) -> None:
    if config.padded_vocab_size != rows:
        raise ValueError(
            f"{where}: vocab_size={rows} (embedding rows) but {EXTRA_KEY} says vocab_size="
            f"{config.vocab_size} padded to a multiple of {config.pad_vocab_size_multiple} = "
            f"{config.padded_vocab_size}"
        )


_HF_MAMBA_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "state_size",
    "conv_kernel",
    "expand",
    "time_step_rank",
    "use_bias",
    "use_conv_bias",
)
_HF_WHY = "it fixes tensor shapes; transformers writes it, and its default is not guessed"


def _config_from_hf_mamba(f: _Fields) -> MambaConfig:
    f.require(_HF_MAMBA_REQUIRED, _HF_WHY)
    _check_activation(f)
    hidden, expand = f.get("hidden_size", _POSITIVE_INT), f.get("expand", _POSITIVE_INT)
    intermediate = f.get("intermediate_size", _POSITIVE_INT, expand * hidden)
    if intermediate != expand * hidden:
        raise ValueError(
            f"{f.where}: intermediate_size={intermediate} must equal expand * hidden_size = "
            f"{expand} * {hidden}"
        )
    rank = f.get("time_step_rank", _RANK)
    extra = f.sub(EXTRA_KEY)
    rows, vocab, multiple = _hf_vocab(f, extra)
    fields = dict(
        d_model=hidden,
        n_layer=f.get("num_hidden_layers", _POSITIVE_INT),
        vocab_size=vocab,
        pad_vocab_size_multiple=multiple,
        d_state=f.get("state_size", _POSITIVE_INT),
        d_conv=f.get("conv_kernel", _POSITIVE_INT),
        expand=expand,
        dt_rank=None if rank == "auto" else rank,
        dt_scale=f.get("time_step_scale", _NUMBER, 1.0),
        **_hf_shared_fields(f, extra, tie_default=True),
    )
    config = _make_config(MambaConfig, fields, f.where)
    _check_hf_vocab(config, rows, f.where)
    return config


def _hf_shared_fields(f: _Fields, extra: _Fields, *, tie_default: bool) -> dict:
    """The config fields both families read alike from a Hugging Face config.json (defaults:
    transformers')."""
    return dict(
        dt_min=f.get("time_step_min", _POSITIVE_NUMBER, 0.001),
        dt_max=f.get("time_step_max", _POSITIVE_NUMBER, 0.1),
        dt_init_floor=f.get("time_step_floor", _POSITIVE_NUMBER, 1e-4),
        conv_bias=f.get("use_conv_bias", _BOOL),
        proj_bias=f.get("use_bias", _BOOL),
        rms_norm_eps=f.get("layer_norm_epsilon", _POSITIVE_NUMBER, 1e-5),
        tie_embeddings=f.get("tie_word_embeddings", _BOOL, tie_default, shape=True),
        rescale_prenorm_residual=extra.get(
            "rescale_prenorm_residual", _BOOL, f.get("rescale_prenorm_residual", _BOOL, False)
        ),
        initializer_range=f.get("initializer_range", _NUMBER, 0.1),
    )


_HF_MAMBA2_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "state_size",
    "num_heads",
    "head_dim",
    "n_groups",
    "conv_kernel",
    "expand",
    "use_bias",
    "use_conv_bias",
)
# dt's clamp (time_step_limit, mamba_ssm's dt_limit) when there is none; the only one we support.
_NO_LIMIT = (0.0, math.inf)


def _config_from_hf_mamba2(f: _Fields) -> Mamba2Config:
    """Keys not read here change nothing computed: initialisation, caching, and flags
    transformers' modelling code ignores (norm_before_gate, rms_norm: it always gates, then
    normalises, as mamba_ssm's default)."""
    f.require(_HF_MAMBA2_REQUIRED, _HF_WHY)
    _check_activation(f)
    hidden, expand = f.get("hidden_size", _POSITIVE_INT), f.get("expand", _POSITIVE_INT)
    heads, headdim = f.get("num_heads", _POSITIVE_INT), f.get("head_dim", _POSITIVE_INT)
    if heads * headdim != expand * hidden:
        raise ValueError(
            f"{f.where}: num_heads * head_dim = {heads} * {headdim} must equal expand * "
            f"hidden_size = {expand} * {hidden}"
        )
    limit = f.get("time_step_limit", _PAIR, _NO_LIMIT)
    if limit != _NO_LIMIT:
        raise ValueError(
            f"{f.where}: time_step_limit={list(limit)} (a clamp on dt) is not "
            f"supported; only [0.0, Infinity], no clamp"
        )
    f.get("time_step_rank", _RANK, "auto")  # unused by Mamba2, but must be well-formed
    extra = f.sub(EXTRA_KEY)
    rows, vocab, multiple = _hf_vocab(f, extra)
    fields = dict(
        d_model=hidden,
        n_layer=f.get("num_hidden_layers", _POSITIVE_INT),
        vocab_size=vocab,
        pad_vocab_size_multiple=multiple,
        d_state=f.get("state_size", _POSITIVE_INT),
        d_conv=f.get("conv_kernel", _POSITIVE_INT),
        expand=expand,
        headdim=headdim,
        ngroups=f.get("n_groups", _POSITIVE_INT),
        chunk_size=f.get("chunk_size", _POSITIVE_INT, 256),
        A_init_range=extra.get("A_init_range", _PAIR, (1.0, 16.0)),
        # transformers' Mamba2Config defaults tie_word_embeddings to False, unlike Mamba1's.
        **_hf_shared_fields(f, extra, tie_default=False),
    )
    f.get("residual_in_fp32", _BOOL, True)  # ours is always float32; equal in float32 runs
    config = _make_config(Mamba2Config, fields, f.where)
    _check_hf_vocab(config, rows, f.where)
    return config


# ssm_cfg key -> (config field, kind, mamba_ssm's constructor default, fixes a shape).
_MAMBA1_SSM_CFG = {
    "d_state": ("d_state", _POSITIVE_INT, 16, True),
    "d_conv": ("d_conv", _POSITIVE_INT, 4, True),
    "expand": ("expand", _POSITIVE_INT, 2, True),
    "dt_rank": ("dt_rank", _RANK, "auto", True),
    "dt_min": ("dt_min", _POSITIVE_NUMBER, 0.001, False),
    "dt_max": ("dt_max", _POSITIVE_NUMBER, 0.1, False),
    "dt_init_floor": ("dt_init_floor", _POSITIVE_NUMBER, 1e-4, False),
    "dt_scale": ("dt_scale", _NUMBER, 1.0, False),
    "conv_bias": ("conv_bias", _BOOL, True, True),
    "bias": ("proj_bias", _BOOL, False, True),
}
_MAMBA2_SSM_CFG = {
    "d_state": ("d_state", _POSITIVE_INT, 128, True),
    "d_conv": ("d_conv", _POSITIVE_INT, 4, True),
    "expand": ("expand", _POSITIVE_INT, 2, True),
    "headdim": ("headdim", _POSITIVE_INT, 64, True),
    "ngroups": ("ngroups", _POSITIVE_INT, 1, True),
    "chunk_size": ("chunk_size", _POSITIVE_INT, 256, False),
    "A_init_range": ("A_init_range", _PAIR, (1.0, 16.0), False),
    "D_has_hdim": ("D_has_hdim", _BOOL, False, True),
    "dt_min": ("dt_min", _POSITIVE_NUMBER, 0.001, False),
    "dt_max": ("dt_max", _POSITIVE_NUMBER, 0.1, False),
    "dt_init_floor": ("dt_init_floor", _POSITIVE_NUMBER, 1e-4, False),
    "conv_bias": ("conv_bias", _BOOL, True, True),
    "bias": ("proj_bias", _BOOL, False, True),
}
# Mamba2 ssm_cfg keys whose only supported value is mamba_ssm's default: (kind, that value, why).
_MAMBA2_SSM_CFG_FIXED = {
    "rmsnorm": (_BOOL, True, "only the gated RMSNorm"),
    "norm_before_gate": (_BOOL, False, "the norm comes after the gate"),
    "dt_limit": (_PAIR, _NO_LIMIT, "no clamp on dt"),
    "d_ssm": (_OPTIONAL_POSITIVE_INT, None, "the SSM spans all of d_inner, no gated MLP beside it"),
}
# ssm_cfg keys that only matter at initialisation or for kernel choice.
_SSM_CFG_IGNORED = (
    "dt_init",
    "use_fast_path",
    "layer_idx",
    "device",
    "dtype",
    "conv_init",
    "use_mem_eff_path",
    "process_group",
    "sequence_parallel",
)


def _config_from_state_spaces(f: _Fields) -> AnyConfig:
    f.require(("d_model", "n_layer", "vocab_size"), "the state-spaces layout has no default for it")
    if not f.get("rms_norm", _BOOL, True):
        raise ValueError(f"{f.where}: rms_norm=false (LayerNorm) is not supported; only RMSNorm")
    if f.sub("ssm_cfg").get("layer", _STRING, "Mamba1") == "Mamba3":
        return _config_from_state_spaces_mamba3(f)
    d_intermediate = f.get("d_intermediate", _NONNEGATIVE_INT, 0)
    if d_intermediate:
        raise ValueError(
            f"{f.where}: d_intermediate={d_intermediate} (MLP blocks) is not supported"
        )
    attn = f.get("attn_layer_idx", _LIST, [])
    if attn:
        raise ValueError(f"{f.where}: attn_layer_idx={attn} (attention layers) is not supported")
    for flag in ("residual_in_fp32", "fused_add_norm"):  # kernel choices; ours is float32
        f.get(flag, _BOOL, True)
    ssm = f.sub("ssm_cfg")
    layer = ssm.get("layer", _STRING, "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(
            f"{f.where}: ssm_cfg.layer={layer!r} is not supported; only 'Mamba1', 'Mamba2' "
            f"and 'Mamba3'"
        )
    known = _MAMBA2_SSM_CFG | _MAMBA2_SSM_CFG_FIXED if layer == "Mamba2" else _MAMBA1_SSM_CFG
    unknown = sorted(ssm.keys() - set(known) - set(_SSM_CFG_IGNORED) - {"layer"})
    if unknown:
        raise ValueError(f"{f.where}: unsupported ssm_cfg keys {unknown} for layer {layer!r}")
    fields = dict(
        d_model=f.get("d_model", _POSITIVE_INT),
        n_layer=f.get("n_layer", _POSITIVE_INT),
        vocab_size=f.get("vocab_size", _POSITIVE_INT),
        pad_vocab_size_multiple=f.get("pad_vocab_size_multiple", _POSITIVE_INT, 8, shape=True),
        tie_embeddings=f.get("tie_embeddings", _BOOL, True, shape=True),
    )
    table = _MAMBA2_SSM_CFG if layer == "Mamba2" else _MAMBA1_SSM_CFG
    for key, (field, kind, default, shape) in table.items():
        fields[field] = ssm.get(key, kind, default, shape=shape)
    if layer == "Mamba1":
        if fields["dt_rank"] == "auto":
            fields["dt_rank"] = None
        fields["rms_norm_eps"] = f.get("norm_epsilon", _POSITIVE_NUMBER, 1e-5)
        return _make_config(MambaConfig, fields, f.where)
    for key, (kind, only, why) in _MAMBA2_SSM_CFG_FIXED.items():
        value = ssm.get(key, kind, only)
        if key == "d_ssm" and value == fields["expand"] * fields["d_model"]:
            continue
        if value != only:
            raise ValueError(
                f"{f.where}: ssm_cfg.{key}={_json_text(value)} is not supported; only "
                f"{_json_text(only)} ({why})"
            )
    # mamba_ssm's mamba2 models use 1e-5 in the block norms and (fixed) in the gated norm;
    # ours is one eps for both.
    eps = f.get("norm_epsilon", _POSITIVE_NUMBER, 1e-5)
    if eps != 1e-5:
        raise ValueError(
            f"{f.where}: norm_epsilon={eps} is not supported for Mamba2: mamba_ssm's "
            f"gated norm always uses 1e-5"
        )
    fields["rms_norm_eps"] = eps
    return _make_config(Mamba2Config, fields, f.where)


def _make_config(cls, fields, where) -> AnyConfig:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


# Mamba-3 ssm_cfg keys: json key -> (Mamba3Config field, kind, mamba_ssm's default, fixes
# tensor shapes).
_MAMBA3_SSM_CFG = {
    "d_state": ("d_state", _POSITIVE_INT, 128, True),
    "expand": ("expand", _POSITIVE_INT, 2, True),
    "headdim": ("headdim", _POSITIVE_INT, 64, True),
    "ngroups": ("ngroups", _POSITIVE_INT, 1, True),
    "rope_fraction": ("rope_fraction", _POSITIVE_NUMBER, 0.5, True),
    "dt_min": ("dt_min", _POSITIVE_NUMBER, 0.001, False),
    "dt_max": ("dt_max", _POSITIVE_NUMBER, 0.1, False),
    "dt_init_floor": ("dt_init_floor", _POSITIVE_NUMBER, 1e-4, False),
    "A_floor": ("A_floor", _POSITIVE_NUMBER, 1e-4, False),
    "is_outproj_norm": ("is_outproj_norm", _BOOL, False, True),
    "is_mimo": ("is_mimo", _BOOL, False, True),
    "mimo_rank": ("mimo_rank", _POSITIVE_INT, 4, True),
    "chunk_size": ("chunk_size", _POSITIVE_INT, 64, False),
}


def _config_from_state_spaces_mamba3(f: _Fields) -> Mamba3Config:
    """mamba_ssm's MambaLMHeadModel with ssm_cfg layer "Mamba3" (SISO or MIMO; d_intermediate
    > 0: a gated MLP after each mixer)."""
    attn = f.get("attn_layer_idx", _LIST, [])
    if attn:
        raise ValueError(f"{f.where}: attn_layer_idx={attn} (attention layers) is not supported")
    for flag in ("residual_in_fp32", "fused_add_norm"):
        f.get(flag, _BOOL, True)
    ssm = f.sub("ssm_cfg")
    unknown = sorted(
        ssm.keys() - set(_MAMBA3_SSM_CFG) - set(_SSM_CFG_IGNORED) - {"layer", "dropout"}
    )
    if unknown:
        raise ValueError(f"{f.where}: unsupported ssm_cfg keys {unknown} for layer 'Mamba3'")
    fields = dict(
        d_model=f.get("d_model", _POSITIVE_INT),
        n_layer=f.get("n_layer", _POSITIVE_INT),
        vocab_size=f.get("vocab_size", _POSITIVE_INT),
        d_intermediate=f.get("d_intermediate", _NONNEGATIVE_INT, 0, shape=True),
        pad_vocab_size_multiple=f.get("pad_vocab_size_multiple", _POSITIVE_INT, 8, shape=True),
        tie_embeddings=f.get("tie_embeddings", _BOOL, True, shape=True),
        rms_norm_eps=f.get("norm_epsilon", _POSITIVE_NUMBER, 1e-5),
    )
    for key, (field, kind, default, shape) in _MAMBA3_SSM_CFG.items():
        fields[field] = ssm.get(key, kind, default, shape=shape)
    return _make_config(Mamba3Config, fields, f.where)


def mamba3_state_spaces_config(config: Mamba3Config) -> dict:
    """mamba_ssm's config.json (its MambaConfig's fields only, as its loader requires) for a
    Mamba3Config."""
    if config.rms_norm_eps != 1e-5:
        raise ValueError(
            f"save_pretrained: rms_norm_eps={config.rms_norm_eps} has no place in mamba_ssm's "
            f"config (its block norms use 1e-5)"
        )
    ssm_cfg = {"layer": "Mamba3"}
    ssm_cfg.update({key: getattr(config, field) for key, (field, *_) in _MAMBA3_SSM_CFG.items()})
    return {
        "d_model": config.d_model,
        "d_intermediate": config.d_intermediate,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }


def _config_summary(config: AnyConfig) -> str:
    if isinstance(config, Mamba3Config):
        return (
            f"d_model={config.d_model}, n_layer={config.n_layer}, d_inner={config.d_inner}, "
            f"heads={config.nheads}, headdim={config.headdim}, ngroups={config.ngroups}, "
            f"d_state={config.d_state}, rotary angles={config.num_rope_angles}, "
            f"d_intermediate={config.d_intermediate}, vocab rows={config.padded_vocab_size}"
        )
    if isinstance(config, Mamba2Config):
        return (
            f"d_model={config.d_model}, n_layer={config.n_layer}, d_inner={config.d_inner}, "
            f"heads={config.nheads}, headdim={config.headdim}, ngroups={config.ngroups}, "
            f"d_state={config.d_state}, d_conv={config.d_conv}, "
            f"vocab rows={config.padded_vocab_size}"
        )
    return (
        f"d_model={config.d_model}, n_layer={config.n_layer}, d_inner={config.d_inner}, "
        f"d_state={config.d_state}, d_conv={config.d_conv}, dt_rank={config.dt_rank_resolved}, "
        f"vocab rows={config.padded_vocab_size}"
    )


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


# Mixer tensors besides the projections and the conv: torch name -> attribute path.
_MAMBA1_MIXER_EXTRA = {
    "x_proj.weight": (("x_proj", "kernel"), _transpose),
    "dt_proj.weight": (("dt_proj", "kernel"), _transpose),
    "dt_proj.bias": (("dt_proj", "bias"), _identity),
    "A_log": (("A_log",), _identity),
    "D": (("D",), _identity),
}
_MAMBA2_MIXER_EXTRA = {
    "dt_bias": (("dt_bias",), _identity),
    "A_log": (("A_log",), _identity),
    "D": (("D",), _identity),
    "norm.weight": (("norm", "weight"), _identity),
}


_MAMBA3_MIXER = {
    "in_proj.weight": (("in_proj", "kernel"), _transpose),
    "dt_bias": (("dt_bias",), _identity),
    "B_bias": (("B_bias",), _identity),
    "C_bias": (("C_bias",), _identity),
    "B_norm.weight": (("B_norm", "weight"), _identity),
    "C_norm.weight": (("C_norm", "weight"), _identity),
    "D": (("D",), _identity),
    "out_proj.weight": (("out_proj", "kernel"), _transpose),
}


def _mamba3_name_map(config: Mamba3Config, layout: str) -> dict:
    """_name_map for mamba_ssm's Mamba-3 LM (state-spaces layout only: transformers has no
    Mamba-3)."""
    if layout != "state-spaces":
        raise ValueError(
            f"Mamba-3 checkpoints have only the state-spaces layout (transformers has no "
            f"Mamba-3), got layout={layout!r}"
        )
    names = {_embedding_name(layout): (("embedding", "embedding"), None, _identity)}
    for i in range(config.n_layer):
        layer = {"norm.weight": (("layers", "norm", "weight"), _identity)}
        mixer = dict(_MAMBA3_MIXER)
        if config.is_outproj_norm:
            mixer["norm.weight"] = (("norm", "weight"), _identity)
        if config.is_mimo:
            for name in ("mimo_x", "mimo_z", "mimo_o"):
                mixer[name] = ((name,), _identity)
        for name, (attribute, to_flax) in mixer.items():
            layer["mixer." + name] = (("layers", "mixer") + attribute, to_flax)
        if config.d_intermediate:
            layer["norm2.weight"] = (("layers", "norm2", "weight"), _identity)
            for fc in ("fc1", "fc2"):
                layer[f"mlp.{fc}.weight"] = (("layers", "mlp", fc, "kernel"), _transpose)
        prefix = f"backbone.layers.{i}."
        names.update({prefix + name: (path, i, to_flax) for name, (path, to_flax) in layer.items()})
    names["backbone.norm_f.weight"] = (("norm_f", "weight"), None, _identity)
    if not config.tie_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), None, _transpose)
    return names


def _name_map(config: AnyConfig, layout: str) -> dict:
    """torch name -> (path in the nnx state, layer index into the stacked layers or None,
    torch-array -> flax-array transform)."""
    if isinstance(config, Mamba3Config):
        return _mamba3_name_map(config, layout)
    mixer_extra = _MAMBA2_MIXER_EXTRA if isinstance(config, Mamba2Config) else _MAMBA1_MIXER_EXTRA
    names = {_embedding_name(layout): (("embedding", "embedding"), None, _identity)}
    mixer = ("layers", "mixer")
    for i in range(config.n_layer):
        layer = {}
        prefix = f"backbone.layers.{i}."
        layer["norm.weight"] = (("layers", "norm", "weight"), _identity)
        layer["mixer.in_proj.weight"] = (mixer + ("in_proj", "kernel"), _transpose)
        layer["mixer.conv1d.weight"] = (mixer + ("conv_weight",), _squeeze_conv)
        for name, (attribute, to_flax) in mixer_extra.items():
            layer["mixer." + name] = (mixer + attribute, to_flax)
        layer["mixer.out_proj.weight"] = (mixer + ("out_proj", "kernel"), _transpose)
        if config.conv_bias:
            layer["mixer.conv1d.bias"] = (mixer + ("conv_bias",), _identity)
        if config.proj_bias:
            layer["mixer.in_proj.bias"] = (mixer + ("in_proj", "bias"), _identity)
            layer["mixer.out_proj.bias"] = (mixer + ("out_proj", "bias"), _identity)
        names.update({prefix + name: (path, i, to_flax) for name, (path, to_flax) in layer.items()})
    names["backbone.norm_f.weight"] = (("norm_f", "weight"), None, _identity)
    if not config.tie_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), None, _transpose)
    return names


def _short(names, limit=12):
    if not names:
        return "none"
    head = ", ".join(names[:limit])
    return f"[{head}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


# ---------------------------------------------------------------------------------------------
# Files.


def _read_json_object(file: Path) -> dict:
    try:
        with open(file) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_safetensors(file) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            f"reading {file} needs the safetensors package: pip install safetensors"
        ) from None
    out = {}
    # A truncated or damaged file fails in safe_open (header) or get_tensor (data) with the
    # package's own error, which does not name the file.
    try:
        # framework "flax" returns jax arrays and so handles bfloat16, which numpy cannot name.
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():
                out[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike
        raise ValueError(
            f"{file} cannot be read as safetensors, it may be truncated or damaged: "
            f"{type(e).__name__}: {e}"
        ) from None
    return out


def _read_bin(file) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{file} is a PyTorch pickle, which needs torch to read: pip install torch (the CPU "
            f"wheel is enough), or convert the checkpoint to safetensors"
        ) from None
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle errors
        raise ValueError(
            f"{file} cannot be read as a PyTorch checkpoint, it may be truncated or "
            f"damaged: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__})")
    return {name: t.detach().float().numpy() for name, t in state.items()}


def _read_sharded(path: Path, index_file: str, read) -> dict[str, np.ndarray]:
    index = _read_json_object(path / index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise ValueError(f"{path / index_file} has no weight_map of tensor names to shard files")
    out = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).exists():
            raise ValueError(f"{path / index_file} names shard {shard}, which is missing")
        tensors = read(path / shard)
        listed = {n for n, s in weight_map.items() if s == shard}
        if set(tensors) != listed:
            raise ValueError(
                f"shard {shard} holds {_short(sorted(set(tensors) - listed))} not listed in "
                f"{index_file} and lacks {_short(sorted(listed - set(tensors)))}"
            )
        out.update(tensors)
    return out


def _to_numpy(a) -> np.ndarray:
    return np.asarray(a)


# ------------------------------------------------------------------------------------------------
# Hybrids. Hugging Face BambaForCausalLM and NemotronHForCausalLM checkpoints <-> our hybrid LM.
#
# docs/attention.md lists both layouts. Bamba layer i is two blocks, a mixer (`mamba` or
# `self_attn`, norm `input_layernorm`) and the gated MLP (`feed_forward`, norm `pre_ff_layernorm`):
# our layer "M-" or "*-". Nemotron-H layer j is one block (`norm`, `mixer`); we pair a Mamba2 or
# attention block with the MLP after it into one layer ("M-"), so that its long "M-M-M-..."
# patterns become a few runs of identical layers (one scan each). Block j of ours is HF layer j
# either way. Torch tensors are (out, in); our kernels the transpose. Conv weights (x, 1, w).

FAMILIES = ("bamba", "nemotron_h")
# layers_block_type values (transformers 5) -> our block letters.
_BLOCK_TYPES = {
    "linear_attention": "M",
    "mamba": "M",
    "full_attention": "*",
    "attention": "*",
    "mlp": "-",
}
_NEMOTRON_LETTERS = {"M": "M", "*": "*", "-": "-"}


def family_of(config_dict: dict) -> str | None:
    """ "bamba" or "nemotron_h" when config.json is one of these hybrids, else None."""
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

    family = family_of(config_dict)
    f = _Fields(config_dict, where, default_source="transformers' default")
    f.require(
        (
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
        ),
        _HF_WHY,
    )
    hidden = f.get("hidden_size", _POSITIVE_INT)
    limit = f.get("time_step_limit", _PAIR, _NO_LIMIT)
    if limit != _NO_LIMIT:
        raise ValueError(
            f"{where}: time_step_limit={list(limit)} (a clamp on dt) is not "
            f"supported; only [0.0, Infinity], no clamp"
        )
    extra = f.sub(EXTRA_KEY)
    rows, vocab, multiple = _hf_vocab(f, extra)
    common = dict(
        d_model=hidden,
        vocab_size=vocab,
        pad_vocab_size_multiple=multiple,
        num_heads=f.get("num_attention_heads", _POSITIVE_INT),
        num_kv_heads=f.get("num_key_value_heads", _POSITIVE_INT),
        d_ff=f.get("intermediate_size", _POSITIVE_INT),
        mlp_bias=f.get("mlp_bias", _BOOL, False, shape=True),
        A_init_range=extra.get("A_init_range", _PAIR, (1.0, 16.0)),
    )
    if family == "bamba":
        fields = _bamba_fields(f, hidden)
    else:
        fields = _nemotron_fields(f, hidden)
    config = _make_config(HybridConfig, {**common, **fields}, where)
    _check_hf_vocab(config, rows, where)
    return config, family


def _inner(f, heads_key, head_dim_key, hidden, inner):

    heads = f.get(heads_key, _POSITIVE_INT)
    head_dim = f.get(head_dim_key, _RANK, "auto", shape=True)
    head_dim = inner // heads if head_dim == "auto" else head_dim
    if heads * head_dim != inner or inner % hidden:
        raise ValueError(
            f"{f.where}: {heads_key} * {head_dim_key} = {heads} * {head_dim} must "
            f"equal the Mamba2 inner width {inner}, a multiple of hidden_size "
            f"{hidden}"
        )
    return head_dim


def _bamba_fields(f, hidden: int) -> dict:

    f.require(("num_hidden_layers", "mamba_n_heads", "mamba_d_state", "mamba_n_groups"), _HF_WHY)
    n = f.get("num_hidden_layers", _POSITIVE_INT)
    if "layers_block_type" in f.keys():
        types = _block_types(f, n)
    else:
        attn = f.get("attn_layer_indices", _LIST, [])
        if not all(_is_int(i) and 0 <= i < n for i in attn):
            raise ValueError(
                f"{f.where}: attn_layer_indices must list layer indices in "
                f"[0, num_hidden_layers={n}), got {_json_text(attn)}"
            )
        types = "".join("*" if i in attn else "M" for i in range(n))
    if "-" in types:
        raise ValueError(f"{f.where}: a Bamba layer is a Mamba2 or attention mixer, not 'mlp'")
    act = f.get("hidden_act", _STRING, "silu")
    if act != "silu":
        raise ValueError(f"{f.where}: hidden_act={act!r} is not supported; Bamba uses 'silu'")
    expand = f.get("mamba_expand", _POSITIVE_INT, 2, shape=True)
    rope = f.sub("rope_parameters")
    rope_type = rope.get("rope_type", _STRING, "default")
    if rope_type != "default":
        raise ValueError(
            f"{f.where}: rope_parameters.rope_type={rope_type!r} is not supported; only 'default'"
        )
    heads = f.get("num_attention_heads", _POSITIVE_INT)
    head_dim = hidden // heads
    factor = rope.get("partial_rotary_factor", _POSITIVE_NUMBER, 0.5)
    rotary = int(head_dim * factor)
    return dict(
        layers=tuple(k + "-" for k in types),
        d_state=f.get("mamba_d_state", _POSITIVE_INT),
        d_conv=f.get("mamba_d_conv", _POSITIVE_INT, 4, shape=True),
        expand=expand,
        headdim=_inner(f, "mamba_n_heads", "mamba_d_head", hidden, expand * hidden),
        ngroups=f.get("mamba_n_groups", _POSITIVE_INT),
        chunk_size=f.get("mamba_chunk_size", _POSITIVE_INT, 256),
        conv_bias=f.get("mamba_conv_bias", _BOOL, True, shape=True),
        proj_bias=f.get("mamba_proj_bias", _BOOL, False, shape=True),
        rotary_dim=rotary - rotary % 2,
        rope_theta=rope.get("rope_theta", _POSITIVE_NUMBER, 10000.0),
        attention_bias=f.get("attention_bias", _BOOL, False, shape=True),
        mlp_activation="silu_gated",
        rms_norm_eps=f.get("rms_norm_eps", _POSITIVE_NUMBER, 1e-6),
        tie_embeddings=f.get("tie_word_embeddings", _BOOL, True, shape=True),
    )


def _block_types(f, n: int | None) -> str:

    types = f.get("layers_block_type", _LIST)
    bad = [t for t in types if t not in _BLOCK_TYPES]
    if bad or not types:
        raise ValueError(
            f"{f.where}: layers_block_type holds {_json_text(bad or types)}; "
            f"supported: {sorted(_BLOCK_TYPES)} (no 'moe')"
        )
    if n is not None and len(types) != n:
        raise ValueError(
            f"{f.where}: layers_block_type has {len(types)} entries but num_hidden_layers={n}"
        )
    return "".join(_BLOCK_TYPES[t] for t in types)


def _nemotron_fields(f, hidden: int) -> dict:

    f.require(("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"), _HF_WHY)
    n = f.get("num_hidden_layers", _POSITIVE_INT, None)
    if "layers_block_type" in f.keys():
        blocks = _block_types(f, n)
    elif "hybrid_override_pattern" in f.keys():
        pattern = f.get("hybrid_override_pattern", _STRING)
        if not pattern or set(pattern) - set(_NEMOTRON_LETTERS):
            raise ValueError(
                f"{f.where}: hybrid_override_pattern={pattern!r} may only hold "
                f"'M' (Mamba2), '*' (attention) and '-' (MLP); 'E' (MoE) is not "
                f"supported"
            )
        if n is not None and len(pattern) != n:
            raise ValueError(
                f"{f.where}: hybrid_override_pattern has {len(pattern)} layers but "
                f"num_hidden_layers={n}"
            )
        blocks = pattern
    else:
        raise ValueError(
            f"{f.where}: required field layers_block_type (or the older "
            f"hybrid_override_pattern) missing"
        )
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        act = f.get(key, _STRING, want)
        if act != want:
            raise ValueError(f"{f.where}: {key}={act!r} is not supported; only {want!r}")
    heads = f.get("mamba_num_heads", _POSITIVE_INT)
    mhd = f.get("mamba_head_dim", _POSITIVE_INT)
    inner = heads * mhd
    if inner % hidden:
        raise ValueError(
            f"{f.where}: mamba_num_heads * mamba_head_dim = {inner} must be a "
            f"multiple of hidden_size={hidden}"
        )
    return dict(
        layers=pair_layers(blocks),
        d_state=f.get("ssm_state_size", _POSITIVE_INT),
        d_conv=f.get("conv_kernel", _POSITIVE_INT, 4, shape=True),
        expand=inner // hidden,
        headdim=mhd,
        ngroups=f.get("n_groups", _POSITIVE_INT),
        chunk_size=f.get("chunk_size", _POSITIVE_INT, 128),
        conv_bias=f.get("use_conv_bias", _BOOL, True, shape=True),
        proj_bias=f.get("use_bias", _BOOL, False, shape=True),
        head_dim=f.get(
            "head_dim",
            _POSITIVE_INT,
            hidden // f.get("num_attention_heads", _POSITIVE_INT),
            shape=True,
        ),
        rotary_dim=0,  # Nemotron-H attention has no position encoding
        attention_bias=False,  # its attention module ignores attention_bias
        mlp_activation="relu2",
        rms_norm_eps=f.get("layer_norm_epsilon", _POSITIVE_NUMBER, 1e-5),
        tie_embeddings=False,  # NemotronHForCausalLM ties nothing: lm_head is always its own
    )


def pair_layers(blocks: str) -> tuple[str, ...]:
    """Nemotron-H's one-block layers as ours: a Mamba2 or attention block with the MLP after it
    is one layer, so that "M-M-M-..." is one run of identical layers."""
    layers, i = [], 0
    while i < len(blocks):
        if blocks[i] != "-" and blocks[i + 1 : i + 2] == "-":
            layers.append(blocks[i : i + 2])
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
            raise ValueError(
                f"save_pretrained: a gated-silu hybrid saves as Bamba, whose every "
                f"layer is a mixer then an MLP ('M-' or '*-'); got layers "
                f"{config.layers}"
            )
        return "bamba"
    if config.rotary_dim or config.attention_bias:
        raise ValueError(
            "save_pretrained: a relu2 hybrid saves as Nemotron-H, whose attention "
            "has no RoPE and no biases; got rotary_dim="
            f"{config.rotary_dim}, attention_bias={config.attention_bias}"
        )
    return "nemotron_h"


def hybrid_hf_config(config: HybridConfig) -> dict:
    """The config.json of `config` in its family's HF layout (vocab_size: the padded rows)."""

    family = family_for(config)
    m2 = config.mamba2_config()
    shared = dict(
        hidden_size=config.d_model,
        vocab_size=config.padded_vocab_size,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        intermediate_size=config.d_ff,
        mlp_bias=config.mlp_bias,
        attention_bias=config.attention_bias,
        tie_word_embeddings=config.tie_embeddings,
        time_step_limit=[0.0, {"__float__": "Infinity"}],
        dtype="float32",
        time_step_min=config.dt_min,
        time_step_max=config.dt_max,
        time_step_floor=config.dt_init_floor,
    )
    shared[EXTRA_KEY] = dict(
        vocab_size=config.vocab_size,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple,
        A_init_range=list(config.A_init_range),
    )
    if family == "bamba":
        types = [k[0] for k in config.layers]
        head_dim = config.attention_head_dim
        if head_dim != config.d_model // config.num_heads:
            raise ValueError(
                f"save_pretrained: Bamba's head dim is hidden_size / heads = "
                f"{config.d_model // config.num_heads}, got head_dim={head_dim}"
            )
        return dict(
            shared,
            architectures=["BambaForCausalLM"],
            model_type="bamba",
            num_hidden_layers=len(types),
            attn_layer_indices=[i for i, k in enumerate(types) if k == "*"],
            mamba_n_heads=m2.nheads,
            mamba_d_head=config.headdim,
            mamba_d_state=config.d_state,
            mamba_n_groups=config.ngroups,
            mamba_d_conv=config.d_conv,
            mamba_expand=config.expand,
            mamba_chunk_size=config.chunk_size,
            mamba_conv_bias=config.conv_bias,
            mamba_proj_bias=config.proj_bias,
            hidden_act="silu",
            rms_norm_eps=config.rms_norm_eps,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=config.rope_theta,
                partial_rotary_factor=config.rotary_dim / head_dim,
            ),
        )
    if config.tie_embeddings:
        raise ValueError(
            "save_pretrained: Nemotron-H has no tied embeddings (its lm_head is "
            "always its own); got tie_embeddings=True"
        )
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    return dict(
        shared,
        architectures=["NemotronHForCausalLM"],
        model_type="nemotron_h",
        num_hidden_layers=len(config.blocks),
        layers_block_type=[names[k] for k in config.blocks],
        mamba_num_heads=m2.nheads,
        mamba_head_dim=config.headdim,
        ssm_state_size=config.d_state,
        n_groups=config.ngroups,
        conv_kernel=config.d_conv,
        chunk_size=config.chunk_size,
        use_conv_bias=config.conv_bias,
        use_bias=config.proj_bias,
        head_dim=config.attention_head_dim,
        mlp_hidden_act="relu2",
        mamba_hidden_act="silu",
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
            take(name, leaf.shape[1:], t, conv=keys[-1] == "conv_weight")
        )
    for node, key, arrays in stacks.values():
        node[key] = np.stack(arrays)
    unexpected = sorted(set(tensors) - expected)
    if config.tie_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a tied head may be stored; it is the embedding
    problems += [f"unexpected {n}" for n in unexpected]
    if problems:
        raise ValueError(
            f"{source}: the tensors do not fit a {family} model with layers "
            f"{config.layers}: {_short(problems)}"
        )
    nnx.update(model, jax.tree.map(jnp.asarray, state))
    return model


def hf_tensors_from_model(model) -> dict[str, np.ndarray]:
    """Our hybrid LM's parameters under its family's HF names, torch layout, float32."""
    family = family_for(model.config)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    embed, norm_f = _head_names(family)
    out = {
        embed: np.asarray(state["embedding"]["embedding"], np.float32),
        norm_f: np.asarray(state["norm_f"]["weight"], np.float32),
    }
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


def hybrid_from_pretrained(path: Path, config_dict: dict, overrides: dict):

    where = str(path / CONFIG_FILE)
    config, family = config_from_hf(config_dict, where)
    config = _with_overrides(config, overrides, where)
    return model_from_hf_tensors(config, family, read_tensors(path), source=str(path))
