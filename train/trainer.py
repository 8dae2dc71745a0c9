"""The training run: check everything, load data, build the sharded step, loop, report.

Order matters for users: the config and the data are checked (and the data loaded) before the
model is built or anything compiles, so bad input fails in seconds with a clear message.

`run` reads top to bottom in three parts: the run directory and resume (open_run_directory,
restore_or_init), the loop (train_loop: pure step calls, eval and checkpoint cadence) and the
reporting (Report: metrics.jsonl, progress lines, the summary).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import shutil
import sys
import time

import jax
import numpy as np

from train import data as data_lib
from train import metrics as metrics_lib
from train import sharding, step as step_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, TrainConfig


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


def prepare(config: TrainConfig) -> Prepared:
    """Validates the config, loads the data and lays out the mesh; raises ConfigError/DataError."""
    config.validate()
    sharding.apply_mesh_options(config.mesh)  # before anything starts jax's backend
    sharding.maybe_initialize_distributed(config.mesh)
    d = config.data
    corpus = data_lib.load_corpus(d)
    train_docs, eval_docs = data_lib.split_documents(corpus.documents, d.eval_fraction, d.seed)
    train_pieces = data_lib.cut_pieces(train_docs, d.seq_len)
    eval_pieces = data_lib.cut_pieces(eval_docs, d.seq_len)
    model_config = config.model.mamba_config(vocab_size=corpus.vocab_size,
                                             backend=jax.default_backend())
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_rows(1 if d.mode == "single" else d.batch_size, mesh, d.mode)
    return Prepared(config, corpus, train_pieces, eval_pieces, len(eval_docs), model_config, mesh)


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
        + (f" ({'pallas' if jax.default_backend() == 'gpu' else 'reference'})"
           if mc.scan_impl == "auto" else ""),
        f"data    {p.corpus.description}: {len(lengths)} documents, {_human(lengths.sum())} tokens "
        f"(doc length median {int(np.median(lengths))}, max {lengths.max()}); tokenizer {tok} "
        f"(vocab {p.corpus.vocab_size}, end-of-document id {p.corpus.eod_id})",
        f"split   train {len(p.train_pieces)} pieces of <= {d.seq_len} tokens, held out "
        f"{p.num_eval_docs} documents ({len(p.eval_pieces)} pieces) for eval loss",
        f"batch   mode {d.mode}: {c.optim.grad_accum} x {rows} rows x {d.seq_len} tokens a step; "
        f"real tokens per slot: packed {metrics_lib.fmt_pct(efficiency['packed'])}, padded "
        f"{metrics_lib.fmt_pct(efficiency['padded'])}, single {metrics_lib.fmt_pct(efficiency['single'])}",
        f"devices {len(devices)} x {kind} ({jax.default_backend()}), mesh data={p.mesh.shape['data']} "
        f"fsdp={p.mesh.shape['fsdp']}; jax {jax.__version__}",
    ]


def run(config: TrainConfig, *, log=print) -> dict:
    """Trains per `config`; returns the summary dict (also written to out_dir/summary.json)."""
    p = prepare(config)
    r = config.run
    out = open_run_directory(config)
    for line in describe(p, data_lib.estimate_efficiency(p.train_pieces, config.data)):
        log(line)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    compiled = step_lib.build(p.model_config, config.optim, r.steps, p.mesh,
                              grad_reduce=config.mesh.grad_reduce)
    ckpt = Checkpointer(out / "checkpoints", r.keep_checkpoints)
    batcher = make_batcher(p)
    state, resumed_from = restore_or_init(ckpt, out / "checkpoints", compiled, batcher, r, log)
    start = int(jax.device_get(state.step))
    if start >= r.steps:
        ckpt.close()
        return already_complete(out, start, r, log)
    cadence = f"every {r.checkpoint_every} steps + " if r.checkpoint_every else ""
    log(f"out     {out}  (checkpoints {cadence}at the end, keep {r.keep_checkpoints}; "
        f"metrics.jsonl; loss.png)")

    eval_set = [sharding.put_batch(b["arrays"], sharding.batch_sharding(p.mesh))
                for b in data_lib.eval_batches(p.eval_pieces, config.data)]
    report = Report(p, out, start, resumed_from)
    try:
        state, end_step, last_eval = train_loop(p, compiled, state, batcher, ckpt, eval_set, report)
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


def is_main_process() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# The run directory and resume.


def open_run_directory(config: TrainConfig) -> pathlib.Path:
    """The run's out_dir, cleared first with --run.overwrite; ConfigError when it holds
    checkpoints that this run would neither resume nor clear."""
    r = config.run
    out = pathlib.Path(r.out_dir)
    ckpt_dir = out / "checkpoints"
    if r.overwrite and is_main_process():
        for name in ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "config.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    has_ckpt = ckpt_dir.is_dir() and any(x.name.isdigit() for x in ckpt_dir.iterdir())
    if has_ckpt and not r.resume:
        raise ConfigError(f"{ckpt_dir} already holds checkpoints; resume with --run.resume=true, "
                          f"start over with --run.resume=false --run.overwrite=true, or choose "
                          f"another --run.out_dir")
    return out


def make_batcher(p: Prepared) -> data_lib.Batcher:
    d = p.config.data
    return data_lib.Batcher(
        p.train_pieces, mode=d.mode, seq_len=d.seq_len, batch_size=d.batch_size,
        grad_accum=p.config.optim.grad_accum, seed=d.seed, pack_policy=d.pack_policy,
        single_bucket=d.single_bucket)


def restore_or_init(ckpt: Checkpointer, ckpt_dir: pathlib.Path, compiled,
                    batcher: data_lib.Batcher, r, log):
    """(state, step restored or None): the latest checkpoint's state with the batcher moved to
    its data position when resuming, else a fresh state from --run.seed."""
    latest = ckpt.latest_step() if r.resume else None
    if latest is None:
        return compiled.init(r.seed), None
    state, meta = ckpt.restore(latest, compiled.abstract_state, compiled.state_shardings)
    batcher.restore(meta["data"])
    log(f"resume  from {ckpt_dir}/{latest} (step {latest}, data position "
        f"{batcher.consumed} pieces = epoch {batcher.epoch:.3f})")
    return state, latest


def already_complete(out: pathlib.Path, start: int, r, log) -> dict:
    log(f"already complete: {out / 'checkpoints'} is at step {start} >= --run.steps={r.steps}. "
        f"Raise --run.steps to train on, or start over with --run.resume=false "
        f"--run.overwrite=true.")
    previous = out / "summary.json"
    return json.loads(previous.read_text()) if previous.exists() else {"steps": start}


# ------------------------------------------------------------------------------------------------
# The loop.


def train_loop(p: Prepared, compiled, state, batcher, ckpt, eval_set, report: "Report"):
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
        state, metrics = compiled.train_step(state, sharding.put_batch(batch["arrays"], batch_sh))
        if pending is not None:
            report.step(*pending)
        pending = (s, metrics, batch["stats"])
        out_of_time = bool(r.time_limit_s) and report.elapsed() > r.time_limit_s
        do_eval = bool(r.eval_every) and s % r.eval_every == 0
        do_ckpt = ((bool(r.checkpoint_every) and s % r.checkpoint_every == 0) or s == r.steps
                   or out_of_time)
        if do_eval or do_ckpt:
            report.step(*pending)
            pending = None
        if do_eval:
            last_eval = evaluate(compiled, state.params, eval_set)
            report.eval(s, last_eval)
        if do_ckpt:
            ckpt.save(s, state, {"data": batcher.state(), "step": s})
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


class Report:
    """What a run reports while it trains: metrics.jsonl records, the progress bar and its
    lines, and the totals its summary is made of."""

    def __init__(self, p: Prepared, out: pathlib.Path, start: int, resumed_from: int | None):
        self.p, self.out, self.run_config, self.start = p, out, p.config.run, start
        self.writer = metrics_lib.MetricsWriter(out / "metrics.jsonl", resumed_from,
                                                enabled=is_main_process())
        self.devices = p.mesh.devices.size
        self.kind = p.mesh.devices.flatten()[0].device_kind
        self.peak = metrics_lib.peak_flops(self.kind) if jax.default_backend() != "cpu" else None
        self.flops = p.model_config.flops_per_token()
        self.meter = metrics_lib.Throughput(skip=1)
        self.real_tokens = self.slots = 0
        self.first_step_s = None
        self.first_loss = self.last_loss = None
        self.recent_losses: list[float] = []
        self.last_saved = resumed_from
        self.checkpoint_dir = out / "checkpoints"
        self.progress = metrics_lib.Progress(self.run_config.steps, start,
                                             self.run_config.progress and is_main_process())
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
            last_good = (f"{self.checkpoint_dir}/{self.last_saved}" if self.last_saved is not None
                         else "none")
            raise NonFiniteLoss(
                f"non-finite {'loss' if not math.isfinite(m['loss']) else 'gradient'} at step {s} "
                f"(loss {m['loss']}, grad norm {m['grad_norm']}); stopped without saving this state. "
                f"Last good checkpoint: {last_good}. "
                f"Try a lower --optim.lr (now {self.p.config.optim.lr}) or longer --optim.warmup_steps.")
        if self.first_step_s is None:
            self.first_step_s = now - self.t_start
        self.meter.update(stats["real_tokens"], now)
        self.real_tokens += stats["real_tokens"]
        self.slots += stats["slots"]
        self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = m["loss"]
        self.recent_losses = (self.recent_losses + [m["loss"]])[-20:]
        tps = self.meter.recent
        util = metrics_lib.mfu(self.flops, tps, self.peak, self.devices)
        self.writer.write(dict(
            step=s, loss=m["loss"], grad_norm=m["grad_norm"], lr=m.get("lr"),
            targets=int(m["targets"]), real_tokens=stats["real_tokens"], slots=stats["slots"],
            sequences=stats["sequences"], tokens_per_s=tps, mfu=util, time_s=now - self.t_start))
        eff = stats["real_tokens"] / stats["slots"]
        self.progress.update(1, f"loss {m['loss']:.3f} | {metrics_lib.fmt_rate(tps)} tok/s | "
                                f"MFU {metrics_lib.fmt_pct(util)} | pack {100 * eff:.0f}%")
        if r.log_every and (s % r.log_every == 0 or s == self.start + 1):
            self.progress.log(f"step {s:>6}/{r.steps}  loss {m['loss']:.4f}  grad_norm "
                              f"{m['grad_norm']:.3f}  lr {m.get('lr', float('nan')):.2e}  "
                              f"{metrics_lib.fmt_rate(tps)} tok/s  MFU {metrics_lib.fmt_pct(util)}  "
                              f"packing {100 * eff:.1f}%")

    def eval(self, s: int, loss: float | None) -> None:
        self.writer.write(dict(step=s, eval_loss=loss))
        self.progress.log(f"step {s:>6}/{self.run_config.steps}  eval loss {loss:.4f} (held out)"
                          if loss is not None else f"step {s}: no held-out data")

    def checkpoint(self, s: int) -> None:
        self.last_saved = s
        self.progress.log(f"checkpoint step {s} -> {self.checkpoint_dir}/{s}")

    def time_limit(self, s: int) -> None:
        self.progress.log(f"time limit: stopping after step {s} (--run.time_limit_s="
                          f"{self.run_config.time_limit_s:g}); run again to resume")

    def close(self) -> None:
        self.progress.close()
        self.writer.close()

    def summary(self, end_step: int, eval_loss: float | None, wall: float) -> dict:
        p, c, d = self.p, self.p.config, self.p.config.data
        records = (metrics_lib.read_metrics(self.writer.path) if is_main_process() else [])
        train_records = [x for x in records if "loss" in x]
        tps = self.meter.overall
        return dict(
            steps=end_step, planned_steps=c.run.steps, start_step=self.start,
            loss_first=train_records[0]["loss"] if train_records else self.first_loss,
            loss_last=self.last_loss,
            loss_last20_mean=float(np.mean(self.recent_losses)) if self.recent_losses else None,
            eval_loss=eval_loss,
            tokens_per_s=tps, tokens_per_s_per_device=tps / self.devices if tps else None,
            mfu=metrics_lib.mfu(self.flops, tps, self.peak, self.devices),
            packing_efficiency=self.real_tokens / self.slots if self.slots else None,
            real_tokens=self.real_tokens, wall_s=wall, first_step_s=self.first_step_s,
            mode=d.mode, seq_len=d.seq_len, batch_rows=1 if d.mode == "single" else d.batch_size,
            grad_accum=c.optim.grad_accum, preset=c.model.preset,
            num_params=p.model_config.num_params(), flops_per_token=self.flops,
            compute_dtype=p.model_config.dtype, scan_impl=p.model_config.scan_impl,
            device_kind=self.kind, num_devices=self.devices, backend=jax.default_backend(),
            peak_flops_per_device=self.peak, jax_version=jax.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(sys.argv), out_dir=str(self.out),
        )


def write_summary(summary: dict, out: pathlib.Path, p: Prepared, log) -> None:
    """summary.json and, with --run.plot, loss.png from metrics.jsonl."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if p.config.run.plot:
        records = metrics_lib.read_metrics(out / "metrics.jsonl")
        why = metrics_lib.plot_loss(records, out / "loss.png", f"{p.config.model.preset} "
                                    f"{p.config.data.mode} seq {p.config.data.seq_len} — "
                                    f"{p.corpus.description}")
        if why:
            log(f"no loss.png: {why}")


def summary_line(s: dict) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    per_dev = (f" ({metrics_lib.fmt_rate(s['tokens_per_s_per_device'])}/device)"
               if s["num_devices"] > 1 else "")
    return (f"done: {s['steps']} steps ({s['steps'] - s['start_step']} this run) in "
            f"{_duration(s['wall_s'])} | loss {f(s['loss_first'])} -> {f(s['loss_last'])} "
            f"(eval {f(s['eval_loss'])}) | {metrics_lib.fmt_rate(s['tokens_per_s'])} tok/s"
            f"{per_dev} | MFU {metrics_lib.fmt_pct(s['mfu'])} | packing "
            f"{metrics_lib.fmt_pct(s['packing_efficiency'])} | {s['num_devices']}x "
            f"{s['device_kind']} | {s['out_dir']}")
