"""The training run: check everything, load data, build the sharded step, loop, report.

Order matters for users: the config and the data are checked (and the data loaded) before the
model is built or anything compiles, so bad input fails in seconds with a clear message.

`run` reads top to bottom in three parts: the run directory and resume (open_run_directory,
find_resume_point, start_state), the loop (train_loop: pure step calls, eval, checkpoint and
model export cadence) and the reporting (Report: metrics.jsonl, progress lines, the summary).
Nothing in the run directory is written before the config is checked against the checkpoint
it resumes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import secrets
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx

from jax_packmamba import compilation_cache
from jax_packmamba.run_layout import CHECKPOINTS_DIR, MODELS_DIR, exported_steps
from train import data as data_lib
from train import metrics as metrics_lib
from train import sharding
from train import step as step_lib
from train.checkpoint import (
    Checkpointer,
    CheckpointError,
    broken_json_files,
    error_reason,
    export_model,
    prune_exports,
)
from train.config import (
    ConfigError,
    TrainConfig,
    check_resume,
    model_record,
    resolve_long_docs,
)

# What each linking --data.long_docs does to a long document (the trainer's split line).
LINKED = {
    "link": "linked over a micro-batch's rows",
    "link_across_steps": "state carried over rows and steps, never cut",
}

# Where unreadable checkpoints (and their model exports) are moved, inside the run directory.
UNREADABLE_DIR = "unreadable"
# Batch statistics of the link modes that go into metrics.jsonl (train.data.Batcher).
LINK_STATS = ("linked_documents", "longest_chain", "continuing_rows", "longest_document_rows")
# TensorBoard event files, and the W&B run id that a resumed run logs to, in the run directory.
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped without saving that state."""


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclasses.dataclass
class Prepared:
    """Everything the run needs that can be checked before compiling."""

    config: TrainConfig
    corpus: data_lib.Corpus
    train_pieces: list
    eval_pieces: list
    num_eval_docs: int
    model_config: object
    mesh: object
    tokenizer: object  # recorded in every model export
    long_docs_note: str = ""  # what --data.long_docs=auto chose, and why


def prepare(config: TrainConfig) -> Prepared:
    """Validates the config, makes its auto choices concrete (train.config.resolve_long_docs;
    Prepared.config is the concrete one), loads the data and lays out the mesh; raises
    ConfigError/DataError."""
    config.validate()
    config, long_docs_note = resolve_long_docs(config, recorded_data_config(config.run))
    # Both before anything starts jax's backend.
    sharding.default_memory_fraction()
    sharding.apply_mesh_options(config.mesh)
    sharding.maybe_initialize_distributed(config.mesh)
    d = config.data
    corpus = data_lib.load_corpus(d)
    train_docs, eval_docs = data_lib.split_documents(corpus.documents, d.eval_fraction, d.seed)
    # link modes: whole documents, laid end to end by the Batcher (packing.pack_stream).
    pieces = (
        (lambda docs: data_lib.cut_pieces(docs, d.seq_len))
        if d.long_docs == "cut"
        else (lambda docs: docs)
    )
    train_pieces, eval_pieces = pieces(train_docs), pieces(eval_docs)
    model_config = config.model.mamba_config(
        vocab_size=corpus.vocab_size, backend=jax.default_backend()
    )
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_rows(1 if d.mode == "single" else d.batch_size, mesh, d.mode)
    return Prepared(
        config,
        corpus,
        train_pieces,
        eval_pieces,
        len(eval_docs),
        model_config,
        mesh,
        data_lib.make_tokenizer(d),
        long_docs_note,
    )


def describe(p: Prepared, efficiency: dict) -> list[str]:
    c, d, mc = p.config, p.config.data, p.model_config
    devices = p.mesh.devices.flatten()
    kind = devices[0].device_kind
    lengths = np.array([len(x) for x in p.corpus.documents])
    rows = 1 if d.mode == "single" else d.batch_size
    tok = "bytes" if d.tokenizer == "bytes" else pathlib.Path(d.tokenizer).name
    return [
        f"model   preset {c.model.preset} ({mc.n_layer} layers, d_model {mc.d_model}, d_state "
        f"{mc.d_state}, vocab {mc.vocab_size}): {_human(mc.num_params())} params, "
        f"{_human(mc.flops_per_token())} FLOPs/token (training); compute {mc.dtype}, params "
        f"float32, scan {mc.scan_impl}"
        + (
            f" ({'pallas' if jax.default_backend() == 'gpu' else 'reference'})"
            if mc.scan_impl == "auto"
            else ""
        ),
        f"data    {p.corpus.description}: {len(lengths)} documents, {_human(lengths.sum())} tokens "
        f"(doc length median {int(np.median(lengths))}, max {lengths.max()}); tokenizer {tok} "
        f"(vocab {p.corpus.vocab_size}, end-of-document id {p.corpus.eod_id})",
        (
            f"split   train {len(p.train_pieces)} pieces of <= {d.seq_len} tokens, held out "
            f"{p.num_eval_docs} documents ({len(p.eval_pieces)} pieces) for eval loss; long "
            f"documents cut"
            if d.long_docs == "cut"
            else f"split   train {len(p.train_pieces)} documents, held out {p.num_eval_docs} "
            f"for eval loss; long documents {d.long_docs}: {LINKED[d.long_docs]}"
        )
        + (f" ({p.long_docs_note})" if p.long_docs_note else ""),
        f"batch   mode {d.mode}: {c.optim.grad_accum} x {rows} rows x {d.seq_len} tokens a step; "
        f"real tokens per slot: packed {metrics_lib.fmt_pct(efficiency['packed'])}, padded "
        f"{metrics_lib.fmt_pct(efficiency['padded'])}, single {metrics_lib.fmt_pct(efficiency['single'])}"
        + (
            f"; {d.stream_groups} groups of {rows} row streams, micro-batch m serves group "
            f"m mod {d.stream_groups}"
            if d.stream_groups > 1
            else ""
        ),
        f"devices {len(devices)} x {kind} ({jax.default_backend()}), mesh data={p.mesh.shape['data']} "
        f"fsdp={p.mesh.shape['fsdp']}; jax {jax.__version__}"
        + (
            f"; XLA allocator takes {memory_fraction()} of each device's memory "
            f"({sharding.MEM_FRACTION_VAR})"
            if jax.default_backend() == "gpu"
            else ""
        ),
    ]


def memory_fraction() -> str:
    """The share of each GPU's memory XLA's allocator takes (sharding.default_memory_fraction)."""
    return os.environ.get(sharding.MEM_FRACTION_VAR, "0.75 (jax's default)")


def build_step(p: Prepared) -> step_lib.Compiled:
    """The run's jitted init, train and eval steps (train.step.build)."""
    c = p.config
    return step_lib.build(
        p.model_config,
        c.optim,
        c.run.steps,
        p.mesh,
        grad_reduce=c.mesh.grad_reduce,
        carry_rows=c.data.batch_size if c.data.long_docs == "link_across_steps" else None,
        stream_groups=c.data.stream_groups,
    )


def run(config: TrainConfig, *, log=print) -> dict:
    """Trains per `config`; returns the summary dict (also written to out_dir/summary.json)."""
    config.validate()
    check_loggers(config.run)
    cache_dir = enable_compilation_cache(config.run)  # before anything compiles
    p = prepare(config)
    config = p.config  # its auto choices made concrete
    r = config.run
    out = open_run_directory(config)
    for line in describe(p, data_lib.estimate_efficiency(p.train_pieces, config.data)):
        log(line)
    log(
        f"cache   XLA compilation cache {cache_dir}"
        if cache_dir
        else "cache   no persistent compilation cache (--run.compilation_cache=false)"
    )

    compiled = build_step(p)
    ckpt = Checkpointer(out / CHECKPOINTS_DIR, r.keep_checkpoints)
    try:
        found = find_resume_point(ckpt, compiled, p, log) if r.resume else None
    except BaseException:
        ckpt.close()
        raise
    # Only now, with the config checked against the checkpoint it resumes, is anything written.
    exporter = Exporter(p, compiled, out)
    state, resumed_from = start_state(found, ckpt, compiled, exporter, out, p, log)
    if is_main_process():
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    batcher = make_batcher(p)
    if found is not None:
        batcher.restore(found.meta["data"])
        log(
            f"resume  from {ckpt.directory}/{found.step} (step {found.step}, data position "
            f"{batcher.consumed} pieces = epoch {batcher.epoch:.3f})"
        )
    start = int(jax.device_get(state.step))
    if start >= r.steps:
        ckpt.close()
        return already_complete(out, start, r, log)
    cadence = f"every {r.checkpoint_every} steps + " if r.checkpoint_every else ""
    exports = f"; {MODELS_DIR}/<step> model exports" if r.export_models else ""
    loggers = (f"; {TENSORBOARD_DIR}/ (tensorboard --logdir {out})" if r.tensorboard else "") + (
        f"; W&B project {r.wandb_project} ({r.wandb_mode})" if r.wandb_project else ""
    )
    log(
        f"out     {out}  (checkpoints {cadence}at the end, keep {r.keep_checkpoints}{exports}; "
        f"metrics.jsonl{loggers}; loss.png)"
    )

    eval_set = [
        sharding.put_batch(b["arrays"], sharding.batch_sharding(p.mesh))
        for b in data_lib.eval_batches(p.eval_pieces, config.data)
    ]
    report = Report(p, out, start, resumed_from, cache_dir)
    try:
        state, end_step, last_eval = train_loop(
            p, compiled, state, batcher, ckpt, exporter, eval_set, report
        )
    finally:
        report.close()
        ckpt.close()  # waits for in-flight saves: they hold finite states
    wall = report.elapsed()
    if not (r.eval_every and end_step % r.eval_every == 0):
        last_eval = evaluate(compiled, state.params, eval_set)
    summary = report.summary(end_step, last_eval, wall)
    if is_main_process():
        write_summary(summary, out, p, log)
    log(summary_line(summary))
    return summary


def enable_compilation_cache(r) -> pathlib.Path | None:
    """Turns on the persistent compilation cache per --run.compilation_cache(_dir); its folder,
    or None when off (jax's own cache settings are then left as they are)."""
    if not r.compilation_cache:
        return None
    try:
        return compilation_cache.enable(r.compilation_cache_dir or None)
    except ValueError as e:
        raise ConfigError(f"--run.compilation_cache_dir: {e}") from None


def check_loggers(r) -> None:
    """ConfigError, before any work, when the package a chosen logger needs is missing."""
    import importlib

    for wanted, module, remedy in (
        (
            r.tensorboard,
            "tensorboardX",
            "pip install -c constraints.txt -e . (or --run.tensorboard=false)",
        ),
        (bool(r.wandb_project), "wandb", "pip install -c constraints.txt -e '.[wandb]'"),
    ):
        if not wanted:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            flag = "--run.tensorboard" if module == "tensorboardX" else "--run.wandb_project"
            raise ConfigError(
                f"{flag} needs the {module} package, which is not installed: {remedy}"
            ) from None


def is_main_process() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# The run directory and resume.


def recorded_data_config(r) -> dict | None:
    """The data part of the config that the run in r.out_dir last started with, when this run
    resumes one there (it has checkpoints): {} where it records none (a run from before
    config.json, or an unreadable one); None for a new run."""
    out = pathlib.Path(r.out_dir)
    if not r.resume or r.overwrite or not has_checkpoints(out):
        return None
    try:
        data = json.loads((out / "config.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def has_checkpoints(out: pathlib.Path) -> bool:
    """Whether the run directory `out` holds a checkpoint (a step folder under checkpoints/)."""
    ckpt_dir = out / CHECKPOINTS_DIR
    return ckpt_dir.is_dir() and any(x.name.isdigit() for x in ckpt_dir.iterdir())


def open_run_directory(config: TrainConfig) -> pathlib.Path:
    """The run's out_dir, cleared first with --run.overwrite; ConfigError when it holds
    checkpoints that this run would neither resume nor clear, or model exports without the
    checkpoints they came from (a new run would replace them)."""
    r = config.run
    out = pathlib.Path(r.out_dir)
    ckpt_dir = out / CHECKPOINTS_DIR
    if r.overwrite and is_main_process():
        for name in (
            CHECKPOINTS_DIR,
            MODELS_DIR,
            "metrics.jsonl",
            "summary.json",
            "loss.png",
            "config.json",
            TENSORBOARD_DIR,
            WANDB_ID_FILE,
        ):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    has_ckpt = has_checkpoints(out)
    if has_ckpt and not r.resume:
        raise ConfigError(
            f"{ckpt_dir} already holds checkpoints; resume with --run.resume=true, "
            f"start over with --run.resume=false --run.overwrite=true, or choose "
            f"another --run.out_dir"
        )
    if not has_ckpt and exported_steps(out):
        raise ConfigError(
            f"{out / MODELS_DIR} holds model exports but {ckpt_dir} no checkpoint "
            f"to resume them from; start over with --run.resume=false "
            f"--run.overwrite=true (deletes them), or choose another --run.out_dir"
        )
    return out


def make_batcher(p: Prepared) -> data_lib.Batcher:
    d = p.config.data
    return data_lib.Batcher(
        p.train_pieces,
        mode=d.mode,
        seq_len=d.seq_len,
        batch_size=d.batch_size,
        grad_accum=p.config.optim.grad_accum,
        seed=d.seed,
        pack_policy=d.pack_policy,
        single_bucket=d.single_bucket,
        long_docs=d.long_docs,
        stream_groups=d.stream_groups,
    )


@dataclasses.dataclass
class ResumePoint:
    """The newest readable checkpoint, and the newer ones that could not be read."""

    step: int
    state: object
    meta: dict
    unreadable: list[int]


def find_resume_point(ckpt: Checkpointer, compiled, p: Prepared, log) -> ResumePoint | None:
    """The newest checkpoint that can be read and that this config may resume; None without
    checkpoints. Writes nothing.

    Each unreadable checkpoint is reported in one line and skipped for the next older one.
    ConfigError when the checkpoint's recorded config differs in a field that must match
    (train.config.check_resume); CheckpointError when no checkpoint can be read.
    """
    steps = sorted(ckpt.all_steps(), reverse=True)
    new_model = model_record(p.model_config)
    failed: list[tuple[int, str]] = []
    for step in steps:
        where = ckpt.directory / str(step)
        try:
            meta = ckpt.read_meta(step)
        except Exception as e:  # orbax raises bare Exceptions; any failure means unreadable
            reason = f"meta: {error_reason(e)}"
        else:
            old, old_model, hint = recorded_config(meta, ckpt.directory.parent, where, log)
            if old is not None:
                check_resume(
                    old, p.config, old_model=old_model, new_model=new_model, checkpoint=str(where)
                )
            try:
                state, meta = ckpt.restore(step, compiled.abstract_state, compiled.state_shardings)
                return ResumePoint(step, state, meta, [s for s, _ in failed])
            except Exception as e:
                reason = f"state: {error_reason(e)}{hint}"
        broken = broken_json_files(where)
        if broken and "JSONDecodeError" in reason:
            reason += f" ({', '.join(broken)} {'is' if len(broken) == 1 else 'are'} not valid JSON)"
        log(f"warning: checkpoint step {step} ({where}) is unreadable, skipped: {reason}")
        failed.append((step, reason))
    if not failed:
        return None
    raise CheckpointError(
        f"none of the {len(failed)} checkpoints in {ckpt.directory} can be read (steps "
        f"{', '.join(str(s) for s, _ in failed)}; newest: {failed[0][1]}); they are left as they "
        f"are. Train from scratch with another --run.out_dir, or with --run.resume=false "
        f"--run.overwrite=true (deletes them)"
    )


def recorded_config(meta, run_dir: pathlib.Path, where: pathlib.Path, log):
    """(config dict or None, model record or None, hint for a failed restore) of a checkpoint.

    Checkpoints written before they held their config fall back to run_dir/config.json (the
    config of the run that last started there), compared field by field."""
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return meta["config"], meta.get("model_config"), ""
    file = run_dir / "config.json"
    try:
        old = json.loads(file.read_text())
    except (OSError, ValueError):
        old = None
    hint = " (this checkpoint records no config: was it written with another model?)"
    if isinstance(old, dict):
        log(
            f"resume  {where} records no config (written before checkpoints held one); "
            f"comparing with {file}"
        )
        return old, None, hint
    log(f"resume  {where} records no config and {file} is missing: configs not compared")
    return None, None, hint


def start_state(
    found: ResumePoint | None,
    ckpt: Checkpointer,
    compiled,
    exporter: Exporter,
    out: pathlib.Path,
    p: Prepared,
    log,
):
    """(state, step resumed from or None). Unreadable checkpoints newer than the one resumed
    are moved to out/unreadable/ (with their model exports), so that the run can write those
    steps again; the resumed step gets its model export if it has none."""
    out.mkdir(parents=True, exist_ok=True)
    if found is None:
        return compiled.init(p.config.run.seed), None
    if is_main_process():
        for step in found.unreadable:
            moved = ckpt.set_aside(step, out / UNREADABLE_DIR / CHECKPOINTS_DIR)
            export = out / MODELS_DIR / str(step)
            if export.is_dir():
                shutil.move(export, out / UNREADABLE_DIR / MODELS_DIR / moved.name)
            log(f"moved   unreadable checkpoint step {step} to {moved}")
    if found.unreadable and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("unreadable checkpoints moved")
        ckpt.manager.reload()
    if not (out / MODELS_DIR / str(found.step)).is_dir():
        exporter.export(found.step, found.state.params)
    return found.state, found.step


def already_complete(out: pathlib.Path, start: int, r, log) -> dict:
    log(
        f"already complete: {out / 'checkpoints'} is at step {start} >= --run.steps={r.steps}. "
        f"Raise --run.steps to train on, or start over with --run.resume=false "
        f"--run.overwrite=true."
    )
    previous = out / "summary.json"
    return json.loads(previous.read_text()) if previous.exists() else {"steps": start}


# ------------------------------------------------------------------------------------------------
# The loop.


class Exporter:
    """Writes RUN/models/<step>/ (jax_packmamba.save_pretrained with the run's tokenizer) for
    each checkpoint with --run.export_models, keeping as many as --run.keep_checkpoints."""

    def __init__(self, p: Prepared, compiled, out: pathlib.Path):
        self.enabled = p.config.run.export_models
        self.keep = p.config.run.keep_checkpoints
        self.graphdef, self.tokenizer = compiled.graphdef, p.tokenizer
        self.models_dir = out / MODELS_DIR

    def export(self, step: int, params) -> None:
        if not self.enabled:
            return
        if jax.process_count() > 1:  # every process holds only its shards
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_get(params)
        if is_main_process():
            export_model(nnx.merge(self.graphdef, params), self.tokenizer, self.models_dir, step)
            prune_exports(self.models_dir, self.keep)


def train_loop(
    p: Prepared, compiled, state, batcher, ckpt, exporter: Exporter, eval_set, report: Report
):
    """Steps from the state's step to --run.steps (or the time limit), with eval and checkpoints
    at their cadence; returns (state, last step, last eval loss or None).

    A step's metrics are read after the next step is dispatched, so the host waits for a
    device result only where it needs one (eval, checkpoint, the end).
    """
    r = p.config.run
    batch_sh = sharding.batch_sharding(p.mesh)
    start = int(jax.device_get(state.step))
    pending = None
    last_eval = None
    for s in range(start + 1, r.steps + 1):
        batch = next(batcher)
        arrays = sharding.put_batch(batch["arrays"], batch_sh)
        if s == start + 1:
            with compilation_cache.compile_stats() as stats:
                t0 = time.perf_counter()
                state, metrics = compiled.train_step(state, arrays)
                report.compiled(time.perf_counter() - t0, stats)
        else:
            state, metrics = compiled.train_step(state, arrays)
        if pending is not None:
            report.step(*pending)
        pending = (s, metrics, batch["stats"])
        out_of_time = bool(r.time_limit_s) and report.elapsed() > r.time_limit_s
        do_eval = bool(r.eval_every) and s % r.eval_every == 0
        do_ckpt = (
            (bool(r.checkpoint_every) and s % r.checkpoint_every == 0)
            or s == r.steps
            or out_of_time
        )
        if do_eval or do_ckpt:
            report.step(*pending)
            pending = None
        if do_eval:
            last_eval = evaluate(compiled, state.params, eval_set)
            report.eval(s, last_eval)
        if do_ckpt:
            ckpt.save(
                s,
                state,
                {
                    "data": batcher.state(),
                    "step": s,
                    "config": p.config.to_dict(),
                    "model_config": model_record(p.model_config),
                },
            )
            exporter.export(s, state.params)
            report.checkpoint(s)
        if out_of_time and s < r.steps:
            report.time_limit(s)
            return state, s, last_eval
    if pending is not None:
        report.step(*pending)
    return state, r.steps, last_eval


def evaluate(compiled, params, eval_set) -> float | None:
    """Mean cross-entropy over the held-out batches (None without held-out data)."""
    if not eval_set:
        return None
    ce = n = 0.0
    for b in eval_set:
        res = jax.device_get(compiled.eval_step(params, b))
        ce += float(res["ce_sum"])
        n += int(res["targets"])
    return ce / max(n, 1)


# ------------------------------------------------------------------------------------------------
# Reporting.


def open_loggers(config: TrainConfig, out: pathlib.Path, resumed_from: int | None) -> list:
    """The writers of --run.tensorboard and --run.wandb_project (main process only), each
    given the config once."""
    r = config.run
    if not is_main_process():
        return []
    loggers = []
    if r.tensorboard:
        loggers.append(metrics_lib.TensorBoardWriter(out / TENSORBOARD_DIR, resumed_from))
    if r.wandb_project:
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
        loggers.append(
            metrics_lib.WandbWriter(r.wandb_project, r.wandb_mode, out, config.to_dict(), run_id)
        )
    for logger in loggers:
        logger.config(config.to_dict(), 0 if resumed_from is None else resumed_from)
    return loggers


class Report:
    """What a run reports while it trains: metrics.jsonl records (and the same scalars to
    TensorBoard / W&B), the progress bar and its lines, and the totals its summary is made of."""

    def __init__(
        self,
        p: Prepared,
        out: pathlib.Path,
        start: int,
        resumed_from: int | None,
        cache_dir: pathlib.Path | None,
    ):
        self.p, self.out, self.run_config, self.start = p, out, p.config.run, start
        self.cache_dir = cache_dir
        self.compile_s = None
        self.compile_cache = None
        self.writer = metrics_lib.MetricsWriter(
            out / "metrics.jsonl", resumed_from, enabled=is_main_process()
        )
        self.loggers = open_loggers(p.config, out, resumed_from)
        self.devices = p.mesh.devices.size
        self.kind = p.mesh.devices.flatten()[0].device_kind
        self.peak = metrics_lib.peak_flops(self.kind) if jax.default_backend() != "cpu" else None
        self.flops = p.model_config.flops_per_token()
        self.meter = metrics_lib.Throughput(skip=1)
        self.real_tokens = self.slots = 0
        self.first_step_s = None
        self.last_step_t = None
        self.first_loss = self.last_loss = None
        self.recent_losses: list[float] = []
        self.last_saved = resumed_from
        self.checkpoint_dir = out / "checkpoints"
        self.progress = metrics_lib.Progress(
            self.run_config.steps, start, self.run_config.progress and is_main_process()
        )
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def step(self, s: int, metrics, stats: dict) -> None:
        """Records step s (metrics: the step's device results); NonFiniteLoss if they are not
        finite."""
        r = self.run_config
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            last_good = (
                f"{self.checkpoint_dir}/{self.last_saved}"
                if self.last_saved is not None
                else "none"
            )
            raise NonFiniteLoss(
                f"non-finite {'loss' if not math.isfinite(m['loss']) else 'gradient'} at step {s} "
                f"(loss {m['loss']}, grad norm {m['grad_norm']}); stopped without saving this state. "
                f"Last good checkpoint: {last_good}. "
                f"Try a lower --optim.lr (now {self.p.config.optim.lr}) or longer --optim.warmup_steps."
            )
        if self.first_step_s is None:
            self.first_step_s = now - self.t_start
        step_time = now - (self.t_start if self.last_step_t is None else self.last_step_t)
        self.last_step_t = now
        self.meter.update(stats["real_tokens"], now)
        self.real_tokens += stats["real_tokens"]
        self.slots += stats["slots"]
        self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = m["loss"]
        self.recent_losses = (self.recent_losses + [m["loss"]])[-20:]
        tps = self.meter.recent
        util = metrics_lib.mfu(self.flops, tps, self.peak, self.devices)
        self.writer.write(
            dict(
                step=s,
                loss=m["loss"],
                grad_norm=m["grad_norm"],
                lr=m.get("lr"),
                targets=int(m["targets"]),
                real_tokens=stats["real_tokens"],
                slots=stats["slots"],
                sequences=stats["sequences"],
                tokens_per_s=tps,
                mfu=util,
                time_s=now - self.t_start,
                step_time_s=step_time,
                # --data.long_docs=link: documents linked across rows, most rows one spans;
                # link_across_steps: rows going on with a document, most micro-batch rows one
                # document has spanned so far.
                **{k: stats[k] for k in LINK_STATS if k in stats},
            )
        )
        eff = stats["real_tokens"] / stats["slots"]
        for logger in self.loggers:
            logger.scalars(
                s,
                {
                    "train/loss": m["loss"],
                    "train/grad_norm": m["grad_norm"],
                    "train/learning_rate": m.get("lr"),
                    "train/packing_efficiency": eff,
                    "perf/tokens_per_s": tps,
                    "perf/mfu": util,
                    "perf/step_time_s": step_time,
                },
            )
        self.progress.update(
            1,
            f"loss {m['loss']:.3f} | {metrics_lib.fmt_rate(tps)} tok/s | "
            f"MFU {metrics_lib.fmt_pct(util)} | pack {100 * eff:.0f}%",
        )
        if r.log_every and (s % r.log_every == 0 or s == self.start + 1):
            self.progress.log(
                f"step {s:>6}/{r.steps}  loss {m['loss']:.4f}  grad_norm "
                f"{m['grad_norm']:.3f}  lr {m.get('lr', float('nan')):.2e}  "
                f"{metrics_lib.fmt_rate(tps)} tok/s  MFU {metrics_lib.fmt_pct(util)}  "
                f"packing {100 * eff:.1f}%"
            )

    def compiled(self, seconds: float, stats: compilation_cache.CompileStats) -> None:
        """The first step's call took `seconds` (tracing, then compiling or loading from the
        cache; the step itself runs asynchronously after)."""
        self.compile_s = seconds
        self.compile_cache = (
            "not used"
            if self.cache_dir is None
            else "miss"
            if stats.compiles
            else "hit"
            if stats.cache_hits
            else "not used"
        )
        self.progress.log(
            f"compile first step {seconds:.1f} s (persistent cache: {self.compile_cache})"
        )

    def eval(self, s: int, loss: float | None) -> None:
        self.writer.write(dict(step=s, eval_loss=loss))
        for logger in self.loggers:
            logger.scalars(s, {"eval/loss": loss})
        self.progress.log(
            f"step {s:>6}/{self.run_config.steps}  eval loss {loss:.4f} (held out)"
            if loss is not None
            else f"step {s}: no held-out data"
        )

    def checkpoint(self, s: int) -> None:
        self.last_saved = s
        self.progress.log(f"checkpoint step {s} -> {self.checkpoint_dir}/{s}")

    def time_limit(self, s: int) -> None:
        self.progress.log(
            f"time limit: stopping after step {s} (--run.time_limit_s="
            f"{self.run_config.time_limit_s:g}); run again to resume"
        )

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        for logger in self.loggers:
            logger.close()

    def summary(self, end_step: int, eval_loss: float | None, wall: float) -> dict:
        p, c, d = self.p, self.p.config, self.p.config.data
        records = metrics_lib.read_metrics(self.writer.path) if is_main_process() else []
        train_records = [x for x in records if "loss" in x]
        tps = self.meter.overall
        return dict(
            steps=end_step,
            planned_steps=c.run.steps,
            start_step=self.start,
            loss_first=train_records[0]["loss"] if train_records else self.first_loss,
            loss_last=self.last_loss,
            loss_last20_mean=float(np.mean(self.recent_losses)) if self.recent_losses else None,
            eval_loss=eval_loss,
            tokens_per_s=tps,
            tokens_per_s_per_device=tps / self.devices if tps else None,
            mfu=metrics_lib.mfu(self.flops, tps, self.peak, self.devices),
            packing_efficiency=self.real_tokens / self.slots if self.slots else None,
            real_tokens=self.real_tokens,
            wall_s=wall,
            first_step_s=self.first_step_s,
            compile_s=self.compile_s,
            compile_cache=self.compile_cache,
            compilation_cache_dir=None if self.cache_dir is None else str(self.cache_dir),
            mode=d.mode,
            seq_len=d.seq_len,
            batch_rows=1 if d.mode == "single" else d.batch_size,
            grad_accum=c.optim.grad_accum,
            preset=c.model.preset,
            num_params=p.model_config.num_params(),
            flops_per_token=self.flops,
            compute_dtype=p.model_config.dtype,
            scan_impl=p.model_config.scan_impl,
            device_kind=self.kind,
            num_devices=self.devices,
            backend=jax.default_backend(),
            peak_flops_per_device=self.peak,
            jax_version=jax.__version__,
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            command=" ".join(sys.argv),
            out_dir=str(self.out),
        )


def write_summary(summary: dict, out: pathlib.Path, p: Prepared, log) -> None:
    """summary.json and, with --run.plot, loss.png from metrics.jsonl."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if p.config.run.plot:
        records = metrics_lib.read_metrics(out / "metrics.jsonl")
        why = metrics_lib.plot_loss(
            records,
            out / "loss.png",
            f"{p.config.model.preset} "
            f"{p.config.data.mode} seq {p.config.data.seq_len} — "
            f"{p.corpus.description}",
        )
        if why:
            log(f"no loss.png: {why}")


def summary_line(s: dict) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    per_dev = (
        f" ({metrics_lib.fmt_rate(s['tokens_per_s_per_device'])}/device)"
        if s["num_devices"] > 1
        else ""
    )
    return (
        f"done: {s['steps']} steps ({s['steps'] - s['start_step']} this run) in "
        f"{_duration(s['wall_s'])} (compile {f(s.get('compile_s'), '.1f')} s) | loss "
        f"{f(s['loss_first'])} -> {f(s['loss_last'])} "
        f"(eval {f(s['eval_loss'])}) | {metrics_lib.fmt_rate(s['tokens_per_s'])} tok/s"
        f"{per_dev} | MFU {metrics_lib.fmt_pct(s['mfu'])} | packing "
        f"{metrics_lib.fmt_pct(s['packing_efficiency'])} | {s['num_devices']}x "
        f"{s['device_kind']} | {s['out_dir']}"
    )
