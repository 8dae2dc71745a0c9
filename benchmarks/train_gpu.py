"""Train the 130m preset on the embedded default data and record what it did, on 1 or more GPUs.

    PYTHONPATH=. python3 benchmarks/train_gpu.py                      # every visible GPU
    PYTHONPATH=. python3 benchmarks/train_gpu.py --smoke --out DIR    # seconds on CPU: a check
    PYTHONPATH=. python3 benchmarks/train_gpu.py -- --model.scan_impl=reference

The run: preset 130m with the released vocabulary size (50277, so the FLOPs match the mamba_ssm
anchors; byte ids use the first 257), bf16 compute with float32 params, packed mode, rows of 2048
tokens, 8 rows per GPU (data parallel over all visible GPUs: the global batch grows with the GPU
count, so tokens/s per GPU compares directly with one GPU), up to 300 steps, stopped early at
--time-limit seconds of training loop (compile included) so the whole script stays under five
minutes on one H200. Arguments after `--` are passed to the trainer (python -m train flags) and
override these. --smoke: the tiny preset, 60 documents, rows of 256, 12 steps.

Times differently from the other benchmarks: this is the trainer itself (train.trainer.run),
whose own clock gives tokens/s over the training loop, not harness.time_calls over a few steps.

Writes to --out (default benchmarks/results/) train_gpu_<slug>_<n>dev.json (the trainer's
summary: loss first/last, eval loss, tokens/s total and per device, MFU, packing efficiency,
with the harness header: device, jax version, date, git commit, command), the same run's
metrics (_metrics.jsonl) and loss plot (_loss.png); --smoke adds the variant _smoke. A result
there from another commit moves to history/ first. Checkpoints go to a scratch directory.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

import jax

from benchmarks import harness
from train.config import parse_args
from train.trainer import run

COMPANIONS = ("metrics.jsonl", "loss.png")  # the trainer's files kept beside the summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = list(argv)  # with the trainer flags after "--"
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = harness.argument_parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="default 300 (smoke 12)")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds of training loop before stopping early (default 170; smoke: none)",
    )
    ap.add_argument("--rows-per-device", type=int, default=None, help="default 8 (smoke 2)")
    args = ap.parse_args(argv)

    n = jax.device_count()
    new = harness.new_result(
        "train_gpu",
        script=__file__,
        argv=command,
        out_dir=args.out,
        smoke=args.smoke,
        variant=f"{n}dev",
        companions=[f"_{name}" for name in COMPANIONS],
    )
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="packmamba_train_gpu_"))
    if args.smoke:
        rows = args.rows_per_device or 2
        flags = [
            "--model.preset=tiny",
            "--data.max_documents=60",
            "--data.seq_len=256",
            f"--run.steps={args.steps or 12}",
            "--optim.warmup_steps=2",
        ]
        limit = args.time_limit or 0
    else:
        rows = args.rows_per_device or 8
        flags = [
            "--model.preset=130m",
            "--model.vocab_size=50277",
            "--data.seq_len=2048",
            f"--run.steps={args.steps or 300}",
            "--optim.lr=1e-3",
            "--optim.warmup_steps=30",
        ]
        limit = 170.0 if args.time_limit is None else args.time_limit
    flags += [
        f"--data.batch_size={rows * n}",
        "--data.mode=packed",
        "--data.eval_batches=2",
        "--run.eval_every=0",
        "--run.checkpoint_every=0",
        "--run.keep_checkpoints=1",
        "--run.log_every=25",
        "--run.progress=false",
        f"--run.time_limit_s={limit}",
        "--run.resume=false",
        f"--run.out_dir={scratch}",
    ]
    flags += extra
    config = parse_args(flags)
    print(f"train_gpu: {n} x {new.info.kind}; flags: {' '.join(flags)}", flush=True)
    summary = run(config)

    summary.update(new.header, trainer_flags=flags, rows_per_device=rows)
    harness.write_json(new.path, summary)
    for name, dst in zip(COMPANIONS, new.companions):
        if (scratch / name).exists():
            shutil.copy(scratch / name, dst)
    shutil.rmtree(scratch, ignore_errors=True)  # checkpoints: GBs for 130m
    print(f"train_gpu: wrote {new.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
