"""Training configuration: frozen dataclasses composed of parts, set from a file and the CLI.

    TrainConfig
      model: ModelConfig   preset name + MambaConfig overrides (any MambaConfig field)
      data:  DataConfig    source, tokenizer, batching mode and shape, held-out split
      optim: OptimConfig   AdamW, warm-up + cosine schedule, clipping, gradient accumulation
      mesh:  MeshConfig    device mesh (data x fsdp axes), multi-host initialisation
      run:   RunConfig     steps, seed, output directory, logging/eval/checkpoint cadence

Command line (one mechanism, nested names):

    python -m train --model.preset=130m --model.n_layer=12 --optim.lr=3e-4 --data.mode=padded
    python -m train --config run.toml --run.steps=500      # file first, then CLI overrides

A config file (.json or .toml) has one table per part: {"model": {"preset": "130m"}, ...}.
`--model.X` for X not a ModelConfig field is an override of MambaConfig field X (typed from
MambaConfig). Every value is checked by `TrainConfig.validate()` before any data is read or
anything compiles; problems raise ConfigError naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tomllib
import types
import typing
from typing import Any

from jax_packmamba.config import (MODEL_PRESETS, Mamba2Config, MambaConfig, config_class,
                                  preset_config)
from jax_packmamba.ops.causal_conv1d import CONV_IMPLS
from jax_packmamba.ops.selective_scan import IMPLS as SCAN_IMPLS


class ConfigError(ValueError):
    """A bad configuration value or flag; the message names it."""


MODES = ("packed", "padded", "single")
PACK_POLICIES = ("first_fit_decreasing", "greedy")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "text", "jsonl", "tokens")
BIN_DTYPES = ("uint8", "uint16", "int32", "uint32", "int64")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A MambaConfig preset by name plus overrides of any of its fields.

    preset "mamba2-130m" ... "mamba2-2.7b" or "mamba2-tiny" is a Mamba2 model (Mamba2Config,
    whose fields the overrides then are); the others are Mamba1.

    dtype "auto" computes in bfloat16 on GPU/TPU and float32 on CPU (parameters stay float32).
    vocab_size (an override) defaults to the tokenizer's vocabulary; it may be larger.
    """

    preset: str = "tiny"
    dtype: str = "auto"
    scan_impl: str = "auto"
    conv_impl: str = "auto"
    remat: bool = False
    overrides: dict = dataclasses.field(default_factory=dict)

    def mamba_config(self, *, vocab_size: int, backend: str) -> MambaConfig:
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if backend == "cpu" else "bfloat16"
        overrides = dict(self.overrides)
        own = sorted(set(overrides) & {"dtype", "scan_impl", "conv_impl", "remat"})
        if own:
            raise ConfigError(f"model: set {own} as --model.<name>, not as overrides")
        vocab = overrides.pop("vocab_size", None)
        if vocab is not None and vocab < vocab_size:
            raise ConfigError(
                f"--model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
                f"({vocab_size} ids); leave it unset or make it >= {vocab_size}")
        try:
            return preset_config(
                self.preset, **overrides, vocab_size=vocab or vocab_size, dtype=dtype,
                scan_impl=self.scan_impl, conv_impl=self.conv_impl, remat=self.remat)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they are batched.

    source: "stdlib" (the embedded default: the Python standard library's .py files, no
      download) or comma-separated paths of files/directories: text files (one document each),
      .jsonl (one document per line, its "text" field), .npy/.bin pre-tokenized token streams
      (documents separated by eod_id). Directories are walked recursively (hidden files skipped).
    tokenizer: "bytes" (UTF-8 bytes are ids 0..255, end-of-document 256, vocabulary 257) or the
      path of a local tokenizer.json (HuggingFace `tokenizers`).
    eod_id: end-of-document id appended to every text document and splitting token files;
      None: 256 for bytes, the tokenizer's end-of-text token for tokenizer.json.
    mode: "packed" (many documents per row, state reset at boundaries), "padded" (one document
      piece per row, padded to seq_len) or "single" (one piece per step, padded to a multiple of
      single_bucket to bound recompiles). All three consume the same pieces in the same order.
    seq_len: row length; documents longer than it are cut into pieces of seq_len tokens.
    batch_size: rows per micro-batch (packed/padded); single mode uses 1.
    eval_fraction: share of documents held out for the eval loss (at least one when > 0).
    """

    source: str = "stdlib"
    format: str = "auto"
    tokenizer: str = "bytes"
    eod_id: int | None = None
    bin_dtype: str = "uint16"
    max_documents: int | None = None
    mode: str = "packed"
    pack_policy: str = "first_fit_decreasing"
    seq_len: int = 512
    batch_size: int = 8
    single_bucket: int = 64
    eval_fraction: float = 0.01
    eval_batches: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to lr * min_lr_ratio at the last step.

    No weight decay on norms, biases, A_log and D. grad_accum micro-batches make one step; the
    loss is the mean over all their real targets.
    """

    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: data x fsdp over all devices; -1 fills with the remaining devices.

    Parameters and optimizer state are sharded on fsdp; the batch rows on data x fsdp (FSDP is
    data parallelism with sharded parameters). distributed=True calls
    jax.distributed.initialize() first (multi-host; coordinator/num_processes/process_id are
    passed when set, else auto-detected from the cluster environment).
    """

    data: int = -1
    fsdp: int = 1
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, seeds, outputs and cadence (0 disables eval / periodic checkpoints / log lines).

    resume: continue from the latest checkpoint in out_dir if there is one. overwrite: delete
    out_dir's previous checkpoints and metrics first. progress: show a tqdm progress bar.
    time_limit_s: stop (with a checkpoint) at the first step that ends after this many seconds
    of training loop (first compile included); 0: no limit. The schedule keeps run.steps.
    """

    steps: int = 300
    seed: int = 0
    out_dir: str = "runs/train"
    log_every: int = 25
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = True
    overwrite: bool = False
    time_limit_s: float = 0.0
    progress: bool = True
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def validate(self) -> "TrainConfig":
        """Raises ConfigError for the first bad value; returns self."""
        m, d, o, me, r = self.model, self.data, self.optim, self.mesh, self.run
        _choice("model.preset", m.preset, MODEL_PRESETS)
        _choice("model.dtype", m.dtype, MODEL_DTYPES)
        _choice("model.scan_impl", m.scan_impl, SCAN_IMPLS)
        _choice("model.conv_impl", m.conv_impl, CONV_IMPLS)
        mamba_fields = {f.name for f in dataclasses.fields(config_class(m.preset))}
        for key in m.overrides:
            if key not in mamba_fields:
                raise ConfigError(f"--model.{key}: not a field of the "
                                  f"{config_class(m.preset).__name__} of preset {m.preset!r}; "
                                  f"choose from "
                                  f"{sorted(mamba_fields | {f.name for f in dataclasses.fields(ModelConfig)} - {'overrides'})}")
        try:  # MambaConfig checks its own values (vocab is resolved from the data later).
            preset_config(m.preset, **{k: v for k, v in m.overrides.items() if k != "vocab_size"})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
        if "vocab_size" in m.overrides:
            _positive("model.vocab_size", m.overrides["vocab_size"])

        if not d.source.strip():
            raise ConfigError("--data.source is empty; use 'stdlib' or paths of files/directories")
        _choice("data.format", d.format, DATA_FORMATS)
        _choice("data.mode", d.mode, MODES)
        _choice("data.pack_policy", d.pack_policy, PACK_POLICIES)
        _choice("data.bin_dtype", d.bin_dtype, BIN_DTYPES)
        _positive("data.seq_len", d.seq_len, minimum=2)
        _positive("data.batch_size", d.batch_size)
        _positive("data.single_bucket", d.single_bucket)
        _positive("data.eval_batches", d.eval_batches)
        if d.max_documents is not None:
            _positive("data.max_documents", d.max_documents)
        if d.eod_id is not None and (not isinstance(d.eod_id, int) or d.eod_id < 0):
            raise ConfigError(f"--data.eod_id must be a non-negative int, got {d.eod_id!r}")
        if not 0.0 <= d.eval_fraction < 1.0:
            raise ConfigError(f"--data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
        _int("data.seed", d.seed)

        if not (o.lr > 0 and o.lr < float("inf")):
            raise ConfigError(f"--optim.lr must be positive and finite, got {o.lr}")
        _positive("optim.warmup_steps", o.warmup_steps, minimum=0)
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"--optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if o.weight_decay < 0:
            raise ConfigError(f"--optim.weight_decay must be >= 0, got {o.weight_decay}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(o, name) < 1.0:
                raise ConfigError(f"--optim.{name} must be in [0, 1), got {getattr(o, name)}")
        if o.eps <= 0:
            raise ConfigError(f"--optim.eps must be > 0, got {o.eps}")
        if o.clip_norm < 0:
            raise ConfigError(f"--optim.clip_norm must be >= 0 (0 disables), got {o.clip_norm}")
        _positive("optim.grad_accum", o.grad_accum)

        for name in ("data", "fsdp"):
            v = getattr(me, name)
            if not isinstance(v, int) or isinstance(v, bool) or not (v == -1 or v >= 1):
                raise ConfigError(f"--mesh.{name} must be a positive int or -1 (fill), got {v!r}")
        if me.data == -1 and me.fsdp == -1:
            raise ConfigError("at most one of --mesh.data and --mesh.fsdp may be -1")

        _positive("run.steps", r.steps)
        _int("run.seed", r.seed)
        for name in ("log_every", "eval_every", "checkpoint_every"):
            _positive(f"run.{name}", getattr(r, name), minimum=0)
        _positive("run.keep_checkpoints", r.keep_checkpoints)
        if not (0 <= r.time_limit_s < float("inf")):
            raise ConfigError(f"--run.time_limit_s must be >= 0 (0: none), got {r.time_limit_s}")
        if not r.out_dir.strip():
            raise ConfigError("--run.out_dir is empty")
        if r.resume and r.overwrite:
            raise ConfigError("--run.resume and --run.overwrite contradict; set --run.resume=false "
                              "to start over with --run.overwrite=true")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is not one of {list(choices)}")


def _int(name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"--{name} must be an int, got {value!r}")


def _positive(name, value, minimum=1):
    _int(name, value)
    if value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------------------
# Parsing: a file, then --part.field=value overrides.

PARTS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_PART_CLASSES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                 "mesh": MeshConfig, "run": RunConfig}
_MAMBA_TYPES = {**typing.get_type_hints(Mamba2Config), **typing.get_type_hints(MambaConfig)}


def _field_type(part: str, name: str):
    cls = _PART_CLASSES[part]
    hints = typing.get_type_hints(cls)
    if name in hints and name != "overrides":
        return hints[name]
    if part == "model" and name in _MAMBA_TYPES:
        return _MAMBA_TYPES[name]
    known = sorted(set(hints) - {"overrides"} | (set(_MAMBA_TYPES) if part == "model" else set()))
    raise ConfigError(f"unknown option --{part}.{name}; {part} options: {known}")


def _convert(flag: str, text_or_value: Any, tp):
    """Converts a CLI string (or a value from a file) to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text_or_value is None or (isinstance(text_or_value, str)
                                     and text_or_value.lower() in ("none", "null")):
            return None
        return _convert(flag, text_or_value, args[0])
    v = text_or_value
    try:
        if tp is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(v, str) and v.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(v, bool):
                raise ValueError
            if isinstance(v, str):
                f = float(v)  # accept 1e3
                if f != int(f):
                    raise ValueError
                return int(f)
            if isinstance(v, float) and v != int(v):
                raise ValueError
            return int(v)
        if tp is float:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if tp is str:
            if not isinstance(v, str):
                raise ValueError
            return v
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"--{flag}: expected {getattr(tp, '__name__', tp)}, got {v!r}") from None
    raise ConfigError(f"--{flag}: unsupported type {tp}")


def _apply(values: dict[str, dict[str, Any]], part: str, name: str, raw: Any) -> None:
    if part not in _PART_CLASSES:
        raise ConfigError(f"unknown config part {part!r} in --{part}.{name}; parts: {list(_PART_CLASSES)}")
    tp = _field_type(part, name)
    values.setdefault(part, {})[name] = _convert(f"{part}.{name}", raw, tp)


def load_file(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ConfigError(f"--config {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of parts, got {type(data).__name__}")
    return data


def parse_args(argv: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Builds a TrainConfig from `--config FILE` and `--part.field=value` flags (validated)."""
    argv = list(argv or [])
    values: dict[str, dict[str, Any]] = {}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(help_text())
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --part.field=value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            val = argv[i + 1]
            i += 1
        pairs.append((key, val))
        i += 1
    for key, val in pairs:
        if key == "config":
            for part, table in load_file(val).items():
                if not isinstance(table, dict):
                    raise ConfigError(f"--config {val}: [{part}] must be a table")
                for name, raw in table.items():
                    if part == "model" and name == "overrides" and isinstance(raw, dict):
                        for k, v in raw.items():
                            _apply(values, "model", k, v)
                    else:
                        _apply(values, part, name, raw)
    for key, val in pairs:
        if key == "config":
            continue
        part, dot, name = key.partition(".")
        if not dot or not name:
            raise ConfigError(f"--{key}: flags look like --part.field=value (parts: {list(_PART_CLASSES)})")
        _apply(values, part, name, val)
    return build(values, base).validate()


def build(values: dict[str, dict[str, Any]], base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    parts = {}
    for part, cls in _PART_CLASSES.items():
        current = getattr(base, part)
        given = dict(values.get(part, {}))
        if part == "model":
            own = {f.name for f in dataclasses.fields(ModelConfig)} - {"overrides"}
            overrides = dict(current.overrides)
            overrides.update({k: given.pop(k) for k in list(given) if k not in own})
            given["overrides"] = overrides
        parts[part] = dataclasses.replace(current, **given)
    return TrainConfig(**parts)


def help_text() -> str:
    lines = ["usage: python -m train [--config FILE.json|.toml] [--part.field=value ...]", ""]
    for part, cls in _PART_CLASSES.items():
        lines.append(f"{part}:  ({(cls.__doc__ or '').strip().splitlines()[0]})")
        default = cls()
        for f in dataclasses.fields(cls):
            if f.name == "overrides":
                lines.append(f"  --model.<MambaConfig field>=...   e.g. --model.n_layer=4 --model.d_model=256")
                continue
            lines.append(f"  --{part}.{f.name}={getattr(default, f.name)!r}")
    return "\n".join(lines)
