"""What a user watches: throughput and MFU, metrics.jsonl, TensorBoard and W&B, the progress
bar, the loss curve.

tokens/s counts real tokens only (padding excluded), so packed, padded and single modes compare
on useful work. MFU = model FLOPs per token (MambaConfig.flops_per_token: matmuls, conv and the
selective scan, x3 for training) x real tokens/s / (peak FLOP/s per device x devices), against
the dense bf16 peak of the device kind; n/a for device kinds not in PEAK_FLOPS (CPU included).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Per-device peak for jax's device_kind (e.g. 'NVIDIA H200'), None when unknown."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_FLOPS[key]
    return None


def mfu(
    flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int
) -> float | None:
    if peak is None or not tokens_per_s:
        return None
    return flops_per_token * tokens_per_s / (peak * devices)


class Throughput:
    """Real tokens/s between steps, skipping the first `skip` steps (compilation)."""

    def __init__(self, skip: int = 1):
        self.skip = skip
        self.seen = 0
        self.t0 = None
        self.tokens = 0
        self.last_t = None
        self.window: list[tuple[float, int]] = []

    def update(self, real_tokens: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.seen += 1
        if self.seen == self.skip:
            self.t0 = now
        elif self.seen > self.skip:
            self.tokens += real_tokens
            self.window = (self.window + [(now, real_tokens)])[-20:]
        self.last_t = now

    @property
    def overall(self) -> float | None:
        if self.t0 is None or self.last_t is None or self.last_t <= self.t0 or not self.tokens:
            return None
        return self.tokens / (self.last_t - self.t0)

    @property
    def recent(self) -> float | None:
        if len(self.window) < 2:
            return self.overall
        dt = self.window[-1][0] - self.window[0][0]
        return sum(n for _, n in self.window[1:]) / dt if dt > 0 else None


class MetricsWriter:
    """Appends one JSON object per line; on resume, drops lines after the restored step."""

    def __init__(self, path: pathlib.Path, resume_step: int | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        lines = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a hard kill
                if rec.get("step", 0) <= resume_step:
                    lines.append(line)
        path.write_text("".join(line + "\n" for line in lines))
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


class TensorBoardWriter:
    """Scalars and the run's config (as text) in TensorBoard event files, through tensorboardX
    (no TensorFlow). A resumed run sets purge_step, so TensorBoard drops what an interrupted
    run logged after the step it resumed from, as MetricsWriter drops those lines."""

    def __init__(self, directory: pathlib.Path, resume_step: int | None):
        from tensorboardX import SummaryWriter

        # The file name holds the second it was opened: the pid keeps a quick resume's apart.
        self.writer = SummaryWriter(
            str(directory),
            flush_secs=30,
            filename_suffix=f".{os.getpid()}",
            purge_step=None if resume_step is None else resume_step + 1,
        )

    def config(self, config: dict, step: int) -> None:
        # Indented four spaces: TensorBoard renders text as Markdown, and this keeps it verbatim.
        text = json.dumps(config, indent=2).replace("\n", "\n    ")
        self.writer.add_text("config", "    " + text, step)

    def scalars(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """The same scalars and the config in a Weights & Biases run (the optional wandb extra).
    run_id keeps one W&B run across resumes of one run directory."""

    def __init__(self, project: str, mode: str, directory: pathlib.Path, config: dict, run_id: str):
        import wandb

        self.run = wandb.init(
            project=project, mode=mode, dir=str(directory), config=config, id=run_id, resume="allow"
        )

    def config(self, config: dict, step: int) -> None:
        pass  # given to wandb.init

    def scalars(self, step: int, values: dict) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


def read_metrics(path: pathlib.Path) -> list[dict]:
    return [
        json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()
    ]


def plot_loss(records: list[dict], path: pathlib.Path, title: str) -> str | None:
    """Loss curve PNG (train, and eval where logged); returns a reason when none is written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return "no finite losses to plot"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


class Progress:
    """tqdm bar on stderr when enabled, installed and stderr is a terminal (redraws would fill a
    log file), else nothing; log() prints a line."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total,
                    initial=initial,
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    mininterval=0.5,
                )
            except ImportError:
                pass

    def update(self, n: int, postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
