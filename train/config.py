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

Each field's `option(help=...)` is its one description (`help_text`, `python -m train --help`)
and says what resuming with another value does: FIXED fields (the model's shape, the optimizer)
are refused, DATA fields (what the data stream is and how it is batched) are refused unless
--data.allow_change=true, FREE ones are taken (`resume_conflicts`, `check_resume`).

A config file (.json or .toml) has one table per part: {"model": {"preset": "130m"}, ...}.
`--model.X` for X not a ModelConfig field is an override of MambaConfig field X (typed from
MambaConfig). Every value is checked by `TrainConfig.validate()` before any data is read or
anything compiles; problems raise ConfigError naming the flag; an unknown flag names the
closest valid one (difflib).

Not tyro (evaluated for issue 27): it cannot type --model.<field> by the preset's family without
subcommands, prints errors as multi-line panels, wants True/False and None where these flags take
true/false and none, reads no config files and has no place for the resume rules in --help; the
glue to keep them would be about as long as the parser it replaces.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import tomllib
import types
import typing
from typing import Any

from jax_packmamba.config import (
    MODEL_PRESETS,
    REMAT,
    HybridConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    config_class,
    preset_config,
)
from jax_packmamba.ops.causal_conv1d import CONV_IMPLS
from jax_packmamba.ops.selective_scan import IMPLS as SCAN_IMPLS


class ConfigError(ValueError):
    """A bad configuration value or flag; the message names it."""


MODES = ("packed", "padded", "single")
PACK_POLICIES = ("first_fit_decreasing", "greedy")
LONG_DOCS = ("cut", "link", "link_across_steps")
# --data.long_docs=auto's choice where the model and batching can carry state (and its stream
# groups): no document cut, at 0-1% of cut's step time and no worse held-out loss on long
# documents (docs/long_documents.md, "The default").
AUTO_LONG_DOCS = "link_across_steps"
AUTO_STREAM_GROUPS = 8
# Model families whose layers cannot carry state over rows yet, and why.
CANNOT_LINK = {
    HybridConfig: "hybrid presets cannot link rows yet: attention would need the previous "
    "row's keys",
    Mamba3Config: "Mamba-3 presets cannot link rows yet: its scan takes no start state",
}
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "text", "jsonl", "tokens", "parquet", "arrow")
WANDB_MODES = ("online", "offline")
BIN_DTYPES = ("uint8", "uint16", "int32", "uint32", "int64")


# What happens to a field when a run resumes with another value (see `resume_conflicts`):
FIXED = "fixed"  # refused: the checkpoints hold a state that only fits the old value
DATA = "data"  # refused unless --data.allow_change=true: the data stream would change
FREE = "free"  # taken: how the run computes, reports or how long it goes on
RESUME_RULES = {
    FIXED: "fixed on resume",
    DATA: "fixed on resume unless --data.allow_change=true",
    FREE: "may change on resume",
}


def option(
    default=dataclasses.MISSING,
    *,
    help: str,
    choices=None,
    resume: str = FREE,
    default_factory=dataclasses.MISSING,
):
    """A config field with its --help text (the one description of the option), its allowed
    values and what resuming with another value does (FIXED, DATA or FREE)."""
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={"help": help, "choices": choices, "resume": resume},
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: a MambaConfig preset by name plus overrides of any of its fields.

    Presets "mamba2-130m" ... "mamba2-2.7b" and "mamba2-tiny" are Mamba2 models (Mamba2Config,
    whose fields the overrides then are); the others are Mamba1. On resume the model's shape
    (preset and overrides, compared as the config they give) is fixed; the runtime fields
    dtype, scan_impl, conv_impl, remat and scan_layers may change.
    """

    preset: str = option(
        "tiny",
        choices=tuple(MODEL_PRESETS),
        resume=FIXED,
        help="the model's shape by name: 130m ... 2.8b are the released state-spaces/mamba "
        "models (n_layer x d_model: 130m 24x768, 370m 48x1024, 790m 48x1536, 1.4b "
        "48x2048, 2.8b 64x2560), tiny is 2x64 with d_state 8 for a CPU; mamba2-130m ... "
        "mamba2-2.7b are state-spaces/mamba2's shapes (Mamba2: d_state 128, headdim 64) "
        "and mamba2-tiny its CPU one; mamba3-1.5b (24x2048 with MLPs) and mamba3-tiny are "
        "Mamba-3 (SISO); "
        "--model.<MambaConfig field>=VALUE overrides any value of it",
    )
    dtype: str = option(
        "auto",
        choices=MODEL_DTYPES,
        help="compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU (parameters and "
        "optimizer state stay float32)",
    )
    scan_impl: str = option(
        "auto",
        choices=SCAN_IMPLS,
        help="selective scan: auto is the Pallas kernel on a GPU and the reference (lax "
        "associative scan) elsewhere; pallas_interpret runs the kernel on CPU (slow, tests)",
    )
    conv_impl: str = option(
        "auto",
        choices=CONV_IMPLS,
        help="causal conv1d: auto is the Pallas kernel on a GPU and XLA elsewhere; "
        "pallas_walk / pallas_tile pick one of the two Pallas kernel designs (pallas: the "
        "default one); pallas_interpret runs the kernel on CPU (slow, tests)",
    )
    remat: str = option(
        "auto",
        choices=("auto",) + REMAT + ("false", "true"),
        help="what each layer recomputes in the backward pass: auto (the preset's: "
        "save_projections_and_scan for the billion-parameter presets but mamba2-1.3b's "
        "save_projections_scan_and_states, "
        "save_kernel_outputs for mamba3-1.5b, none for the others); none; full (the whole block: "
        "least memory, about a third more compute); save_matmul_outputs (all but the "
        "matmuls); save_kernel_outputs (only elementwise work: norms, gates, casts); "
        "save_projections_and_scan (keeps the projections' and the scan's outputs, and Mamba1's "
        "scan chunk states; recomputes the conv, the gated norm and out_proj's input, and "
        "Mamba2's SSD its chunk states: mamba_ssm's memory-efficient trade); "
        "save_projections_scan_and_states (the same, but Mamba2's SSD keeps its chunk states: "
        "more memory, less recompute); the old false / true are none / full",
    )
    scan_layers: bool = option(
        False,
        help="run the layers under one lax.scan: compile time stops growing with depth, but "
        "on a GPU the training step is slower (about a fifth at 1.4b, with remat) and "
        "without remat needs far more memory; the parameters are stacked either way",
    )
    overrides: dict = option(
        default_factory=dict,
        resume=FIXED,
        help="MambaConfig values that replace the preset's, given as --model.<field>=VALUE "
        "(listed below) or a [model] table in --config; vocab_size defaults to the "
        "tokenizer's vocabulary and may only be larger",
    )

    def mamba_config(self, *, vocab_size: int, backend: str) -> MambaConfig | Mamba2Config:
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if backend == "cpu" else "bfloat16"
        overrides = dict(self.overrides)
        own = sorted(set(overrides) & set(MODEL_RUNTIME_FIELDS))
        if own:
            raise ConfigError(f"model: set {own} as --model.<name>, not as overrides")
        vocab = overrides.pop("vocab_size", None)
        if vocab is not None and vocab < vocab_size:
            raise ConfigError(
                f"--model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
                f"({vocab_size} ids); leave it unset or make it >= {vocab_size}"
            )
        try:
            return preset_config(
                self.preset,
                **overrides,
                vocab_size=vocab or vocab_size,
                dtype=dtype,
                scan_impl=self.scan_impl,
                conv_impl=self.conv_impl,
                **self._remat(),
                scan_layers=self.scan_layers,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None

    def _remat(self) -> dict:
        if self.remat == "auto":  # the preset's own
            return {}
        return dict(remat={"false": "none", "true": "full"}.get(self.remat, self.remat))


# MambaConfig fields that change how the model computes, not its parameters or its function.
MODEL_RUNTIME_FIELDS = ("dtype", "scan_impl", "conv_impl", "remat", "scan_layers")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data: where documents come from, how they are tokenized, cut and batched.

    All three modes consume the same pieces (documents cut to seq_len) in the same seeded
    order, so a checkpoint's data position is one count of pieces.
    """

    source: str = option(
        "stdlib",
        resume=DATA,
        help="'stdlib' (the embedded corpus: the Python standard library's .py files, no "
        "download) or comma-separated paths of files and directories (walked recursively, "
        "hidden files skipped): a text file is one document; a .jsonl file has one "
        "document per line (its text_field); a .parquet or .arrow file, or a directory "
        "written by Hugging Face datasets' save_to_disk, one document per row (its "
        "text_field column; read in record batches; needs the data extra); .npy/.bin "
        "files are token ids, documents separated by eod_id",
    )
    format: str = option(
        "auto",
        choices=DATA_FORMATS,
        resume=DATA,
        help="how to read every source file; auto: by suffix (.jsonl jsonl, .parquet parquet, "
        ".arrow arrow, .npy/.bin tokens, anything else text); save_to_disk directories "
        "are recognised whatever this is",
    )
    text_field: str = option(
        "text",
        resume=DATA,
        help="the field of a .jsonl record, or the column of a Parquet / Arrow / datasets "
        "table, that holds each document's text (a bad row is named by file and row, "
        "rows counted from 0 as datasets and pandas index them)",
    )
    tokenizer: str = option(
        "bytes",
        resume=DATA,
        help="'bytes' (UTF-8 bytes are ids 0..255, end of document 256, vocabulary 257) or "
        "the path of a local tokenizer.json (Hugging Face `tokenizers`, no download)",
    )
    eod_id: int | None = option(
        None,
        resume=DATA,
        help="end-of-document id, appended to every text document and splitting token files; "
        "none: 256 for bytes, the tokenizer's end-of-text token (<|endoftext|>, </s>, "
        "...) for a tokenizer.json",
    )
    bin_dtype: str = option(
        "uint16",
        choices=BIN_DTYPES,
        resume=DATA,
        help="integer type of the token ids in .bin files (.npy files record their own)",
    )
    max_documents: int | None = option(
        None, resume=DATA, help="read at most this many documents (in file order); none: all"
    )
    mode: str = option(
        "packed",
        choices=MODES,
        resume=DATA,
        help="packed: many documents per row, the state reset at each boundary (PackMamba); "
        "padded: one document piece per row, padded to seq_len; single: one piece per "
        "step, padded to a multiple of single_bucket",
    )
    pack_policy: str = option(
        "first_fit_decreasing",
        choices=PACK_POLICIES,
        resume=DATA,
        help="packed mode: first_fit_decreasing fills rows from a look-ahead window of "
        "pieces (fuller rows); greedy takes the longest prefix of the stream that fits",
    )
    seq_len: int = option(
        512,
        resume=DATA,
        help="tokens per row (>= 2); longer documents are cut into pieces of seq_len tokens",
    )
    long_docs: str = option(
        "auto",
        choices=("auto", *LONG_DOCS),
        resume=DATA,
        help="documents longer than a row, packed mode: cut: into pieces of seq_len tokens, "
        "each starting from a zero state; link: documents laid end to end, a row's first "
        "piece linked to the previous row's last, every layer's state carried over the "
        "link, so no document is cut inside a micro-batch (few documents a step when they "
        "are long); link_across_steps: every row a stream of whole documents of its own, "
        "its last one going on in the same row of the next micro-batch and step from the "
        "state the row ended in (truncated backprop, saved in checkpoints), so no document "
        "is cut and a step holds at least batch_size documents; auto: link_across_steps "
        f"with {AUTO_STREAM_GROUPS} stream groups where it can run (packed mode, a Mamba or "
        "Mamba2 preset), cut elsewhere, and a resumed run's own "
        "choice (docs/long_documents.md)",
    )
    stream_groups: int = option(
        0,
        resume=FIXED,
        help="link_across_steps only: G groups of batch_size row streams each; micro-batch m "
        "(counted over steps and grad_accum) serves group m mod G, so a document goes on G "
        "micro-batches later and the G - 1 between hold other documents (consecutive "
        f"gradients less alike); the carried state is G times larger; 0: {AUTO_STREAM_GROUPS} "
        "with link_across_steps (a resumed run's own number), else 1",
    )

    batch_size: int = option(
        8, resume=DATA, help="rows per micro-batch in packed and padded mode (single uses 1)"
    )
    single_bucket: int = option(
        64,
        resume=DATA,
        help="single mode pads each piece to a multiple of this, bounding how many shapes compile",
    )
    eval_fraction: float = option(
        0.01,
        resume=DATA,
        help="share of documents held out for the eval loss, in [0, 1) (at least one "
        "document when > 0)",
    )
    eval_batches: int = option(4, help="batches of held-out pieces in each eval")
    seed: int = option(
        0, resume=DATA, help="seed of the held-out split and of each epoch's piece order"
    )
    allow_change: bool = option(
        False,
        help="resume although the data fields above differ from the checkpoint's (say so "
        "when you mean to continue a run on other data or batching): the run goes on "
        "from the checkpoint's data position, a count of pieces, in the new stream (the "
        "pieces packed mode held back for its next batch are skipped if the mode changes)",
    )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer: AdamW, linear warm-up then cosine decay to lr * min_lr_ratio at the last
    step (--run.steps).

    No weight decay on norms, biases, A_log and D. Every field is fixed on resume: the
    checkpoint's optimizer state belongs to them.
    """

    lr: float = option(3e-3, resume=FIXED, help="peak learning rate (> 0)")
    warmup_steps: int = option(30, resume=FIXED, help="steps of linear warm-up from 0 to lr (>= 0)")
    min_lr_ratio: float = option(
        0.1, resume=FIXED, help="final learning rate as a fraction of lr, in [0, 1]"
    )
    weight_decay: float = option(
        0.1, resume=FIXED, help="AdamW decoupled weight decay of the matrices (>= 0)"
    )
    b1: float = option(0.9, resume=FIXED, help="AdamW first-moment decay, in [0, 1)")
    b2: float = option(0.95, resume=FIXED, help="AdamW second-moment decay, in [0, 1)")
    eps: float = option(1e-8, resume=FIXED, help="AdamW epsilon (> 0)")
    clip_norm: float = option(
        1.0, resume=FIXED, help="clip the gradient to this global norm (0: no clipping)"
    )
    grad_accum: int = option(
        1,
        resume=FIXED,
        help="micro-batches per optimizer step; the loss is the mean over all their real "
        "targets, so it equals one batch grad_accum times larger",
    )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: data x fsdp over all devices (may change on resume).

    Parameters and optimizer state are sharded on fsdp; the batch rows on data x fsdp (FSDP is
    data parallelism with sharded parameters).
    """

    data: int = option(-1, help="devices on the data axis; -1: the devices fsdp leaves")
    fsdp: int = option(
        1, help="devices on the fsdp axis (parameters sharded); -1: the devices data leaves"
    )
    distributed: bool = option(
        False,
        help="call jax.distributed.initialize() first (multi-host); the three fields "
        "below are passed when set, else detected from the cluster environment",
    )
    coordinator_address: str | None = option(None, help="host:port of process 0 (multi-host)")
    num_processes: int | None = option(None, help="number of processes (multi-host)")
    process_id: int | None = option(None, help="this process's index (multi-host)")
    grad_reduce: str = option(
        "auto",
        choices=("auto", "float32", "bfloat16"),  # the keys of sharding.GRAD_REDUCE
        help="gradient reduction across devices: auto leaves it to XLA's SPMD partitioner "
        "(float32); float32 or bfloat16 reduce explicitly (psum_scatter over fsdp, psum "
        "over data) in that dtype",
    )
    overlap_collectives: bool = option(
        False,
        help="set XLA's GPU latency-hiding scheduler flags (sharding.OVERLAP_XLA_FLAGS) "
        "so collectives overlap compute; unused on CPU",
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run: length, seeds, outputs, cadence and compilation (all may change on resume).

    The run directory (--run.out_dir) holds config.json, metrics.jsonl, summary.json,
    loss.png, checkpoints/<step>/ (orbax) and models/<step>/ (see jax_packmamba.run_layout).
    """

    steps: int = option(
        300,
        help="optimizer steps in total, counting those of earlier runs resumed; the "
        "learning-rate schedule ends at this step (raise it to train a finished run "
        "on)",
    )
    seed: int = option(0, help="seed of the initial parameters (a resumed run restores them)")
    out_dir: str = option("runs/train", help="the run directory")
    log_every: int = option(25, help="steps between progress lines (0: none)")
    eval_every: int = option(100, help="steps between held-out evaluations (0: at the end only)")
    checkpoint_every: int = option(
        100, help="steps between checkpoints (0: only at the end and at the time limit)"
    )
    keep_checkpoints: int = option(
        3,
        help="newest checkpoints kept (older ones are deleted as new ones are written), and "
        "as many model exports",
    )
    resume: bool = option(
        True,
        help="continue from the newest readable checkpoint in out_dir, if there is one "
        "(unreadable newer ones are reported and moved to out_dir/unreadable/)",
    )
    overwrite: bool = option(
        False,
        help="delete out_dir's checkpoints, model exports and metrics first (needs "
        "--run.resume=false)",
    )
    time_limit_s: float = option(
        0.0,
        help="stop with a checkpoint after the first step that ends this many seconds "
        "into the training loop (first compile included); 0: no limit",
    )
    progress: bool = option(
        True,
        help="show a tqdm progress bar when stderr is a terminal (else the log lines "
        "alone, every --run.log_every steps)",
    )
    tensorboard: bool = option(
        True,
        help="write TensorBoard event files to out_dir/tensorboard/ (`tensorboard "
        "--logdir OUT_DIR`): loss, eval loss, learning rate, grad norm, tokens/s, "
        "MFU, packing efficiency, step time, and the config as text",
    )
    wandb_project: str = option(
        "",
        help="also log the metrics and the config to this Weights & Biases project (needs "
        "the wandb extra: pip install -e '.[wandb]'); empty: no W&B",
    )
    wandb_mode: str = option(
        "online",
        choices=WANDB_MODES,
        help="W&B mode: online, or offline (no network; `wandb sync` uploads the run later)",
    )
    plot: bool = option(True, help="write loss.png at the end")
    export_models: bool = option(
        True,
        help="with every checkpoint, also write out_dir/models/<step>/: a Hugging "
        "Face-layout model directory (config.json with the tokenizer's eos_token_id, "
        "model.safetensors, tokenizer.json unless bytes) that jax_packmamba."
        "from_pretrained and `python -m jax_packmamba.generate --checkpoint` read; "
        "they also accept out_dir itself (the newest export) or "
        "out_dir/checkpoints/<step>",
    )
    compilation_cache: bool = option(
        True,
        help="keep compiled programs in a persistent XLA cache, so a rerun with the same "
        "shapes starts without compiling (false: leave jax's cache settings alone)",
    )
    compilation_cache_dir: str = option(
        "",
        help="the cache folder; empty: $JAX_PACKMAMBA_CACHE_DIR, else ~/.cache/jax_packmamba/xla",
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def validate(self) -> TrainConfig:
        """Raises ConfigError for the first bad value; returns self."""
        m, d, o, me, r = self.model, self.data, self.optim, self.mesh, self.run
        _choice("model.preset", m.preset, MODEL_PRESETS)
        _choice("model.dtype", m.dtype, MODEL_DTYPES)
        _choice("model.scan_impl", m.scan_impl, SCAN_IMPLS)
        _choice("model.conv_impl", m.conv_impl, CONV_IMPLS)
        mamba_fields = {f.name for f in dataclasses.fields(config_class(m.preset))}
        for key in m.overrides:
            if key not in mamba_fields:
                raise ConfigError(
                    f"--model.{key}: not a field of the "
                    f"{config_class(m.preset).__name__} of preset {m.preset!r}; "
                    f"choose from "
                    f"{sorted(mamba_fields | {f.name for f in dataclasses.fields(ModelConfig)} - {'overrides'})}"
                )
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
        _choice("data.long_docs", d.long_docs, ("auto", *LONG_DOCS))
        linking = d.long_docs not in ("cut", "auto")  # auto chooses where it can link
        if linking and d.mode != "packed":
            raise ConfigError(
                f"--data.long_docs={d.long_docs} needs --data.mode=packed, got {d.mode}"
            )
        if linking and config_class(m.preset) in CANNOT_LINK:
            raise ConfigError(
                f"--data.long_docs={d.long_docs}: {CANNOT_LINK[config_class(m.preset)]}; use "
                f"--data.long_docs=cut"
            )
        _positive("data.stream_groups", d.stream_groups, minimum=0)
        if d.stream_groups > 1 and d.long_docs not in ("link_across_steps", "auto"):
            raise ConfigError(
                f"--data.stream_groups={d.stream_groups} needs --data.long_docs="
                f"link_across_steps (got {d.long_docs}): only its row streams come in groups"
            )
        _choice("data.bin_dtype", d.bin_dtype, BIN_DTYPES)
        if not d.text_field:
            raise ConfigError("--data.text_field is empty")
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
        _choice("run.wandb_mode", r.wandb_mode, WANDB_MODES)
        if not r.out_dir.strip():
            raise ConfigError("--run.out_dir is empty")
        if r.resume and r.overwrite:
            raise ConfigError(
                "--run.resume and --run.overwrite contradict; set --run.resume=false "
                "to start over with --run.overwrite=true"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_record(model_config) -> dict:
    """The resolved model config as JSON-ready data (saved with every checkpoint)."""
    return _jsonable({"class": type(model_config).__name__, **dataclasses.asdict(model_config)})


def _jsonable(value):
    return json.loads(json.dumps(value))


def resolve_long_docs(config: TrainConfig, recorded: dict | None = None) -> tuple[TrainConfig, str]:
    """`config` with --data.long_docs=auto and --data.stream_groups=0 made concrete, and a
    note saying why auto chose what it did ("auto: ...", "" when long_docs was not auto);
    ConfigError when the choice does not fit the other flags.

    recorded: the data part of the recorded config of the run this one resumes ({} for a run
    from before these options, which cut), None for a new run: a resumed run keeps its own
    choice, so that its carried state and data stream go on as they were."""
    d = config.data
    if d.long_docs != "auto" and d.stream_groups != 0:
        return config, ""
    long_docs, why = d.long_docs, ""
    if long_docs == "auto":
        if recorded is not None:
            long_docs, why = recorded.get("long_docs", "cut"), "the resumed run's choice"
        elif d.mode != "packed":
            long_docs, why = "cut", f"--data.mode={d.mode} has no rows to link"
        elif config_class(config.model.preset) in CANNOT_LINK:
            long_docs, why = "cut", CANNOT_LINK[config_class(config.model.preset)]
        else:
            long_docs, why = AUTO_LONG_DOCS, "no document is cut"
    groups = d.stream_groups
    if groups == 0:
        if long_docs != "link_across_steps":
            groups = 1
        elif recorded is not None:
            groups = recorded.get("stream_groups", 1)
        else:
            groups = AUTO_STREAM_GROUPS
    resolved = dataclasses.replace(
        config, data=dataclasses.replace(d, long_docs=long_docs, stream_groups=groups)
    )
    try:
        resolved.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (--data.long_docs=auto chose {long_docs}: {why})") from None
    return resolved, f"auto: {why}" if d.long_docs == "auto" else ""


def resume_conflicts(
    old: dict, new: TrainConfig, *, old_model: dict | None, new_model: dict
) -> tuple[list[str], list[str]]:
    """The differences that stop a resume: (fixed, data), each a list of "part.field old ->
    new".

    old: the checkpoint's TrainConfig.to_dict(); old_model / new_model: model_record of the
    model each gives. The model's shape is compared as the resolved model config (so the same
    shape spelled by another preset or overrides is no change), except MODEL_RUNTIME_FIELDS;
    other parts (and the model's, without old_model) field by field by each field's rule
    (FIXED, DATA; FREE is not compared). Fields that one side lacks (a config from another
    version) are not compared.
    """
    fixed, data = [], []
    if old_model is not None:
        for name in sorted(set(old_model) | set(new_model)):
            if name in MODEL_RUNTIME_FIELDS:
                continue
            a, b = old_model.get(name, "<absent>"), new_model.get(name, "<absent>")
            if a != b:
                fixed.append(f"model.{name} {a!r} -> {b!r}")
    current = _jsonable(new.to_dict())
    for part, cls in _PART_CLASSES.items():
        if part == "model" and old_model is not None:
            continue  # compared above, as the model each config gives
        for f in dataclasses.fields(cls):
            rule = f.metadata.get("resume", FREE)
            if rule == FREE or f.name not in old.get(part, {}):
                continue
            a, b = old[part][f.name], current[part][f.name]
            if a != b:
                (fixed if rule == FIXED else data).append(f"{part}.{f.name} {a!r} -> {b!r}")
    return fixed, data


def check_resume(
    old: dict, new: TrainConfig, *, old_model: dict | None, new_model: dict, checkpoint: str
) -> None:
    """ConfigError (one line naming every changed field, old -> new) when `new` cannot resume
    the checkpoint written with `old` (see resume_conflicts)."""
    fixed, data = resume_conflicts(old, new, old_model=old_model, new_model=new_model)
    old_docs = (old.get("data") or {}).get("long_docs", "cut")
    if (old_docs == "link_across_steps") != (new.data.long_docs == "link_across_steps"):
        raise ConfigError(
            f"cannot resume {checkpoint} with --data.long_docs={new.data.long_docs}: it was "
            f"written with {old_docs}, and only link_across_steps' train state holds the "
            f"carried state. Use the old value, or another --run.out_dir"
        )
    old_groups = (old.get("data") or {}).get("stream_groups", 1)
    if new.data.long_docs == "link_across_steps" and old_groups != new.data.stream_groups:
        raise ConfigError(
            f"cannot resume {checkpoint} with --data.stream_groups={new.data.stream_groups}: it "
            f"was written with {old_groups}, and its train state carries that many groups of "
            f"row streams. Use the old value, or another --run.out_dir"
        )
    if new.data.allow_change:
        data = []
    if not fixed and not data:
        return
    parts = []
    if fixed:
        parts.append(
            f"{', '.join(fixed)} (fixed for a run: its checkpoints hold that model "
            f"and optimizer state)"
        )
    if data:
        parts.append(
            f"{', '.join(data)} (set --data.allow_change=true to continue this run "
            f"on the new data stream)"
        )
    raise ConfigError(
        f"cannot resume {checkpoint} with this config: {'; '.join(parts)}. Use the old values, "
        f"another --run.out_dir, or --run.resume=false --run.overwrite=true to delete the "
        f"checkpoints"
    )


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
_PART_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "run": RunConfig,
}
_MAMBA_TYPES = {
    **typing.get_type_hints(Mamba3Config),
    **typing.get_type_hints(HybridConfig),
    **typing.get_type_hints(Mamba2Config),
    **typing.get_type_hints(MambaConfig),
}


def _field_type(part: str, name: str):
    cls = _PART_CLASSES[part]
    hints = typing.get_type_hints(cls)
    if name in hints and name != "overrides":
        return hints[name]
    if part == "model" and name in _MAMBA_TYPES:
        return _MAMBA_TYPES[name]
    known = sorted(set(hints) - {"overrides"} | (set(_MAMBA_TYPES) if part == "model" else set()))
    raise ConfigError(
        f"unknown option --{part}.{name}{_did_you_mean(f'{part}.{name}')}; {part} options: {known}"
    )


def _all_flags() -> list[str]:
    """Every flag name without its dashes: config, part.field, model.<MambaConfig field>."""
    flags = ["config"]
    for part, cls in _PART_CLASSES.items():
        flags += [f"{part}.{f.name}" for f in dataclasses.fields(cls) if f.name != "overrides"]
    return flags + [f"model.{name}" for name in sorted(_MAMBA_TYPES)]


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, _all_flags(), n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


def _convert(flag: str, text_or_value: Any, tp):
    """Converts a CLI string (or a value from a file) to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text_or_value is None or (
            isinstance(text_or_value, str) and text_or_value.lower() in ("none", "null")
        ):
            return None
        return _convert(flag, text_or_value, args[0])
    v = text_or_value
    if origin is tuple and typing.get_args(tp) == (str, Ellipsis):  # HybridConfig.layers
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise ConfigError(f"--{flag}: expected comma-separated strings, got {v!r}")
        return tuple(x.strip() for x in items)
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
            if isinstance(v, bool):  # a flag that was a bool (--model.remat) in a config file
                return str(v).lower()
            if not isinstance(v, str):
                raise ValueError
            return v
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"--{flag}: expected {getattr(tp, '__name__', tp)}, got {v!r}") from None
    raise ConfigError(f"--{flag}: unsupported type {tp}")


def _apply(values: dict[str, dict[str, Any]], part: str, name: str, raw: Any) -> None:
    if part not in _PART_CLASSES:
        raise ConfigError(
            f"unknown config part {part!r} in --{part}.{name}"
            f"{_did_you_mean(f'{part}.{name}')}; parts: {list(_PART_CLASSES)}"
        )
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
            raise ConfigError(
                f"--{key}: flags look like --part.field=value{_did_you_mean(key)} "
                f"(parts: {list(_PART_CLASSES)})"
            )
        _apply(values, part, name, val)
    return build(values, base).validate()


def build(values: dict[str, dict[str, Any]], base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    parts = {}
    for part, _cls in _PART_CLASSES.items():
        current = getattr(base, part)
        given = dict(values.get(part, {}))
        if part == "model":
            own = {f.name for f in dataclasses.fields(ModelConfig)} - {"overrides"}
            overrides = dict(current.overrides)
            overrides.update({k: given.pop(k) for k in list(given) if k not in own})
            given["overrides"] = overrides
        parts[part] = dataclasses.replace(current, **given)
    return TrainConfig(**parts)


def help_text(width: int = 100) -> str:
    """--help: every option with its meaning, allowed values, default and resume rule, from the
    fields' `option(help=...)` (the one place they are described)."""
    import textwrap

    def para(text, indent=""):
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )

    lines = [
        "usage: python -m train [--config FILE.json|.toml] [--part.field=value ...]",
        "",
        para(
            "Trains a Mamba language model on documents packed into rows. Flags are "
            "--part.field=value or --part.field value, applied after the --config file (one "
            'table per part, e.g. [model] preset = "130m"). Booleans are true/false; '
            "optional values take none. Run again with the same --run.out_dir to resume."
        ),
        "",
        para(
            "On resume each field follows its rule, given in brackets: "
            + "; ".join(f"[{v}]" for v in RESUME_RULES.values())
            + ". A refused change names each field with its old and new value."
        ),
    ]
    for part, cls in _PART_CLASSES.items():
        lines += ["", para(f"{part}: " + (cls.__doc__ or "").strip().split("\n\n")[0])]
        default = cls()
        for f in dataclasses.fields(cls):
            meta = f.metadata
            rule = RESUME_RULES[meta.get("resume", FREE)]
            if f.name == "overrides":
                lines.append("  --model.<MambaConfig field>=VALUE")
                lines.append(para(f"{meta['help']} [{rule}]", "      "))
                presets = {
                    MambaConfig: "Mamba1 presets",
                    Mamba2Config: "mamba2-* presets",
                    Mamba3Config: "mamba3-* presets (SISO)",
                    HybridConfig: "hybrid-* presets; layers: comma-separated strings "
                    "of M (Mamba2), * (attention), - (MLP)",
                }
                for family, which in presets.items():
                    hints = typing.get_type_hints(family)
                    fields = [
                        f"{g.name} ({_type_name(hints[g.name])})"
                        for g in dataclasses.fields(family)
                        if g.name not in MODEL_RUNTIME_FIELDS
                    ]
                    lines.append(
                        para(f"{family.__name__} fields ({which}): " + ", ".join(fields), "      ")
                    )
                continue
            value = getattr(default, f.name)
            shown = (
                "none"
                if value is None
                else (str(value).lower() if isinstance(value, bool) else value)
            )
            head = f"  --{part}.{f.name}={shown}"
            if meta.get("choices"):
                head += f"   {{{' | '.join(meta['choices'])}}}"
            else:
                head += f"   ({_type_name(f.type)})"
            lines.append(head)
            lines.append(para(f"{meta['help']} [{rule}]", "      "))
    return "\n".join(lines)


def _type_name(tp) -> str:
    if isinstance(tp, str):  # postponed annotations of this module's dataclasses
        return tp.replace("None", "none")
    if typing.get_origin(tp) is tuple:  # tuple[float, float]; HybridConfig.layers
        args = typing.get_args(tp)
        return (
            "comma-separated " + args[0].__name__
            if args[-1] is Ellipsis
            else f"{len(args)} x {args[0].__name__}"
        )
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " | ".join(a.__name__ for a in args) + " | none"
    return getattr(tp, "__name__", str(tp))
