"""The training run: check everything, load data, build the sharded step, loop, report.

Order matters for users: the config and the data are checked (and the data loaded) before the
model is built or anything compiles, so bad input fails in seconds with a clear message.
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
    c, d, r = config, config.data, config.run
    is_main = jax.process_index() == 0
    out = pathlib.Path(r.out_dir)
    ckpt_dir = out / "checkpoints"
    if r.overwrite and is_main:
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
    efficiency = data_lib.estimate_efficiency(p.train_pieces, d)
    for line in describe(p, efficiency):
        log(line)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")

    compiled = step_lib.build(p.model_config, c.optim, r.steps, p.mesh)
    ckpt = Checkpointer(ckpt_dir, r.keep_checkpoints)
    batcher = data_lib.Batcher(
        p.train_pieces, mode=d.mode, seq_len=d.seq_len, batch_size=d.batch_size,
        grad_accum=c.optim.grad_accum, seed=d.seed, pack_policy=d.pack_policy,
        single_bucket=d.single_bucket)
    latest = ckpt.latest_step() if r.resume else None
    if latest is not None:
        state, meta = ckpt.restore(latest, compiled.abstract_state, compiled.state_shardings)
        batcher.restore(meta["data"])
        log(f"resume  from {ckpt_dir}/{latest} (step {latest}, data position "
            f"{batcher.consumed} pieces = epoch {batcher.epoch:.3f})")
    else:
        state = compiled.init(r.seed)
    start = int(jax.device_get(state.step))
    if start >= r.steps:
        ckpt.close()
        log(f"already complete: {ckpt_dir} is at step {start} >= --run.steps={r.steps}. Raise "
            f"--run.steps to train on, or start over with --run.resume=false --run.overwrite=true.")
        previous = out / "summary.json"
        return json.loads(previous.read_text()) if previous.exists() else {"steps": start}
    log(f"out     {out}  (checkpoints " + (f"every {r.checkpoint_every} steps + " if r.checkpoint_every else "") + f"at the end, "
        f"keep {r.keep_checkpoints}; metrics.jsonl; loss.png)")

    batch_sh = sharding.batch_sharding(p.mesh)
    eval_set = [sharding.put_batch(b["arrays"], batch_sh) for b in data_lib.eval_batches(p.eval_pieces, d)]

    def evaluate(params) -> float | None:
        if not eval_set:
            return None
        ce = n = 0.0
        for b in eval_set:
            res = jax.device_get(compiled.eval_step(params, b))
            ce += float(res["ce_sum"])
            n += int(res["targets"])
        return ce / max(n, 1)

    writer = metrics_lib.MetricsWriter(out / "metrics.jsonl", start if latest is not None else None,
                                       enabled=is_main)
    devices = p.mesh.devices.size
    kind = p.mesh.devices.flatten()[0].device_kind
    peak = metrics_lib.peak_flops(kind) if jax.default_backend() != "cpu" else None
    flops = p.model_config.flops_per_token()
    meter = metrics_lib.Throughput(skip=1)
    totals = dict(real=0, slots=0, first_step_s=None)
    progress = metrics_lib.Progress(r.steps, start, r.progress and is_main)
    t_start = time.perf_counter()
    first_loss = last_loss = None
    last_eval = None
    last_saved = latest
    recent_losses: list[float] = []

    def handle(item):
        nonlocal first_loss, last_loss
        s, m, stats = item
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise NonFiniteLoss(
                f"non-finite {'loss' if not math.isfinite(m['loss']) else 'gradient'} at step {s} "
                f"(loss {m['loss']}, grad norm {m['grad_norm']}); stopped without saving this state. "
                f"Last good checkpoint: "
                f"{f'{ckpt_dir}/{last_saved}' if last_saved is not None else 'none'}. "
                f"Try a lower --optim.lr (now {c.optim.lr}) or longer --optim.warmup_steps.")
        if totals["first_step_s"] is None:
            totals["first_step_s"] = now - t_start
        meter.update(stats["real_tokens"], now)
        totals["real"] += stats["real_tokens"]
        totals["slots"] += stats["slots"]
        first_loss = m["loss"] if first_loss is None else first_loss
        last_loss = m["loss"]
        recent_losses[:] = (recent_losses + [m["loss"]])[-20:]
        tps = meter.recent
        util = metrics_lib.mfu(flops, tps, peak, devices)
        record = dict(step=s, loss=m["loss"], grad_norm=m["grad_norm"], lr=m.get("lr"),
                      targets=int(m["targets"]), real_tokens=stats["real_tokens"],
                      slots=stats["slots"], sequences=stats["sequences"],
                      tokens_per_s=tps, mfu=util, time_s=now - t_start)
        writer.write(record)
        eff = stats["real_tokens"] / stats["slots"]
        progress.update(1, f"loss {m['loss']:.3f} | {metrics_lib.fmt_rate(tps)} tok/s | "
                           f"MFU {metrics_lib.fmt_pct(util)} | pack {100 * eff:.0f}%")
        if r.log_every and (s % r.log_every == 0 or s == start + 1):
            progress.log(f"step {s:>6}/{r.steps}  loss {m['loss']:.4f}  grad_norm "
                         f"{m['grad_norm']:.3f}  lr {m.get('lr', float('nan')):.2e}  "
                         f"{metrics_lib.fmt_rate(tps)} tok/s  MFU {metrics_lib.fmt_pct(util)}  "
                         f"packing {100 * eff:.1f}%")

    pending = None
    end_step = r.steps
    stopped: NonFiniteLoss | None = None
    try:
        for s in range(start + 1, r.steps + 1):
            batch = next(batcher)
            arrays = sharding.put_batch(batch["arrays"], batch_sh)
            state, m = compiled.train_step(state, arrays)
            if pending is not None:
                handle(pending)
            pending = (s, m, batch["stats"])
            out_of_time = bool(r.time_limit_s) and time.perf_counter() - t_start > r.time_limit_s
            do_eval = bool(r.eval_every) and s % r.eval_every == 0
            do_ckpt = ((bool(r.checkpoint_every) and s % r.checkpoint_every == 0) or s == r.steps
                       or out_of_time)
            if do_eval or do_ckpt:
                handle(pending)
                pending = None
            if do_eval:
                last_eval = evaluate(state.params)
                writer.write(dict(step=s, eval_loss=last_eval))
                progress.log(f"step {s:>6}/{r.steps}  eval loss {last_eval:.4f} (held out)"
                             if last_eval is not None else f"step {s}: no held-out data")
            if do_ckpt:
                ckpt.save(s, state, {"data": batcher.state(), "step": s})
                last_saved = s
                progress.log(f"checkpoint step {s} -> {ckpt_dir}/{s}")
            if out_of_time and s < r.steps:
                progress.log(f"time limit: stopping after step {s} (--run.time_limit_s="
                             f"{r.time_limit_s:g}); run again to resume")
                end_step = s
                break
        if pending is not None:
            handle(pending)
    except NonFiniteLoss as e:
        stopped = e
    finally:
        progress.close()
        ckpt.close()  # waits for in-flight saves: they hold finite states
        writer.close()
    if stopped is not None:
        raise stopped

    wall = time.perf_counter() - t_start
    if not (r.eval_every and end_step % r.eval_every == 0):
        last_eval = evaluate(state.params)
    records = metrics_lib.read_metrics(out / "metrics.jsonl") if is_main else []
    train_records = [x for x in records if "loss" in x]
    tps = meter.overall
    summary = dict(
        steps=end_step, planned_steps=r.steps, start_step=start,
        loss_first=train_records[0]["loss"] if train_records else first_loss,
        loss_last=last_loss,
        loss_last20_mean=float(np.mean(recent_losses)) if recent_losses else None,
        eval_loss=last_eval,
        tokens_per_s=tps, tokens_per_s_per_device=tps / devices if tps else None,
        mfu=metrics_lib.mfu(flops, tps, peak, devices),
        packing_efficiency=totals["real"] / totals["slots"] if totals["slots"] else None,
        real_tokens=totals["real"], wall_s=wall, first_step_s=totals["first_step_s"],
        mode=d.mode, seq_len=d.seq_len, batch_rows=1 if d.mode == "single" else d.batch_size,
        grad_accum=c.optim.grad_accum, preset=c.model.preset, num_params=p.model_config.num_params(),
        flops_per_token=flops, compute_dtype=p.model_config.dtype, scan_impl=p.model_config.scan_impl,
        device_kind=kind, num_devices=devices, backend=jax.default_backend(),
        peak_flops_per_device=peak, jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv), out_dir=str(out),
    )
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if r.plot:
            why = metrics_lib.plot_loss(records, out / "loss.png",
                                        f"{c.model.preset} {d.mode} seq {d.seq_len} — {p.corpus.description}")
            if why:
                log(f"no loss.png: {why}")
    log(summary_line(summary))
    return summary


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
