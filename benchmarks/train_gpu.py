"""Train the 130m preset on the embedded default data and record what it did, on 1 or more GPUs.

    PYTHONPATH=. python3 benchmarks/train_gpu.py --out DIR            # every visible GPU
    PYTHONPATH=. python3 benchmarks/train_gpu.py --out DIR --tiny     # seconds on CPU: a check
    PYTHONPATH=. python3 benchmarks/train_gpu.py --out DIR -- --model.scan_impl=reference

The run: preset 130m with the released vocabulary size (50277, so the FLOPs match the mamba_ssm
anchors; byte ids use the first 257), bf16 compute with float32 params, packed mode, rows of 2048
tokens, 8 rows per GPU (data parallel over all visible GPUs: the global batch grows with the GPU
count, so tokens/s per GPU compares directly with one GPU), up to 300 steps, stopped early at
--time-limit seconds of training loop (compile included) so the whole script stays under five
minutes on one H200. Arguments after `--` are passed to the trainer (python -m train flags) and
override these.

Writes to --out: train_<kind>_<n>dev.json (the trainer's summary: loss first/last, eval loss,
tokens/s total and per device, MFU, packing efficiency, device, jax version, date, command),
the same run's metrics.jsonl and loss.png. Checkpoints go to a scratch directory, not --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jax

from train.config import parse_args
from train.trainer import run


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the summary JSON, metrics, plot")
    ap.add_argument("--tiny", action="store_true", help="tiny model, few steps: a CPU check")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds of training loop before stopping early (default 170; tiny: none)")
    ap.add_argument("--rows-per-device", type=int, default=None)
    args = ap.parse_args(argv)

    n = jax.device_count()
    kind = jax.devices()[0].device_kind
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="packmamba_train_gpu_"))
    if args.tiny:
        rows = args.rows_per_device or 2
        flags = ["--model.preset=tiny", "--data.max_documents=60", "--data.seq_len=256",
                 f"--run.steps={args.steps or 12}", "--optim.warmup_steps=2"]
        limit = args.time_limit or 0
    else:
        rows = args.rows_per_device or 8
        flags = ["--model.preset=130m", "--model.vocab_size=50277", "--data.seq_len=2048",
                 f"--run.steps={args.steps or 300}", "--optim.lr=1e-3", "--optim.warmup_steps=30"]
        limit = 170.0 if args.time_limit is None else args.time_limit
    flags += [f"--data.batch_size={rows * n}", "--data.mode=packed", "--data.eval_batches=2",
              "--run.eval_every=0", "--run.checkpoint_every=0", "--run.keep_checkpoints=1",
              "--run.log_every=25", "--run.progress=false", f"--run.time_limit_s={limit}",
              "--run.resume=false", f"--run.out_dir={scratch}"]
    flags += extra
    config = parse_args(flags)
    print(f"train_gpu: {n} x {kind}; flags: {' '.join(flags)}", flush=True)
    summary = run(config)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    stem = f"train_{slug}_{n}dev" + ("_tiny" if args.tiny else "")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    summary.update(command="PYTHONPATH=. python3 benchmarks/train_gpu.py " + " ".join(sys.argv[1:]),
                   trainer_flags=flags, git_commit=commit, rows_per_device=rows)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in ("metrics.jsonl", "loss.png"):
        if (scratch / name).exists():
            shutil.copy(scratch / name, out / f"{stem}_{name}")
    shutil.rmtree(scratch, ignore_errors=True)  # checkpoints: GBs for 130m
    print(f"train_gpu: wrote {out / (stem + '.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
