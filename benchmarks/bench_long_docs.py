"""Held-out loss on long documents after training with --data.long_docs=cut and =link.

    PYTHONPATH=. python3 benchmarks/bench_long_docs.py [--preset 130m] [--steps 400]
        [--seq-len 2048] [--rows 8] [--out DIR] [--smoke]

Trains the same model twice through the trainer (train/__main__.py) on the stdlib corpus, the
same seed, steps and so the same number of token slots (every row of both modes is full: cut
packs pieces by first-fit-decreasing, link streams whole documents), and evaluates both on the
held-out split's documents longer than a row (train.data.split_documents, as the trainer holds
them out). Each model reads the held-out documents two ways: "whole" (pack_stream with the
links: each document as one sequence) and "cut" (the same rows without the links: every row
from a zero state). The per-token loss is averaged by position in the document (log2 buckets
of seq_len), written to --out/long_docs_<slug>.json, and plotted to long_docs_<slug>.png.
--smoke: the tiny preset, 64-token rows, a few steps on CPU.
"""

from __future__ import annotations

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness


def position_losses(model, docs, seq_len, link: bool):
    """Per document, the loss of each token's next-token prediction (len - 1 values)."""
    from jax_packmamba.packing import pack_stream, unpack

    batch = pack_stream(docs, seq_len)
    links = dict(continues=jnp.asarray(batch.continues)) if link else {}

    @jax.jit
    def token_losses(tokens, seg, targets, **links):
        logits = model(tokens, seg, **links).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    ce = token_losses(
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.segment_ids),
        jnp.asarray(batch.targets),
        **links,
    )
    return [x[:-1] for x in unpack(batch, np.asarray(ce))]  # a document's last token: no target


def bucketed(losses, seq_len):
    """{"[lo, hi)": mean loss} over positions in the document, buckets seq_len x 1, 2, 4, ..."""
    pos = np.concatenate([np.arange(len(x)) for x in losses])
    val = np.concatenate(losses)
    edges = [0, seq_len]
    while edges[-1] <= pos.max():
        edges.append(2 * edges[-1])
    return {
        f"[{lo}, {hi})": float(val[(pos >= lo) & (pos < hi)].mean())
        for lo, hi in zip(edges[:-1], edges[1:])
        if ((pos >= lo) & (pos < hi)).any()
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--preset", default=None, help="model preset (default 130m; smoke tiny)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    p.add_argument("--seq-len", type=int, default=None, help="row length (default 2048)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-eval-docs", type=int, default=64)
    args = p.parse_args(argv)
    new = harness.new_result(
        "long_docs",
        script=__file__,
        argv=argv,
        out_dir=args.out,
        smoke=args.smoke,
        companions=[".png"],
    )
    preset = args.preset or ("tiny" if args.smoke else "130m")
    steps = args.steps or (3 if args.smoke else 400)
    seq_len = args.seq_len or (64 if args.smoke else 2048)
    from jax_packmamba import from_pretrained
    from train import data as data_lib
    from train.__main__ import main as train_main
    from train.config import parse_args

    common = [
        f"--model.preset={preset}",
        f"--data.seq_len={seq_len}",
        f"--data.batch_size={args.rows}",
        f"--run.steps={steps}",
        "--run.eval_every=0",
        "--run.checkpoint_every=0",
        "--run.progress=false",
        "--run.plot=false",
    ]
    if args.smoke:
        common += ["--model.n_layer=1", "--model.d_model=32", "--data.max_documents=40"]
    data = dict(
        **new.header, preset=preset, steps=steps, seq_len=seq_len, rows=args.rows, results={}
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_args(common + [f"--run.out_dir={tmp}/x"])
        corpus = data_lib.load_corpus(config.data)
        _, held = data_lib.split_documents(
            corpus.documents, config.data.eval_fraction, config.data.seed
        )
        long_docs = [d for d in held if len(d) > seq_len][: args.max_eval_docs]
        data.update(eval_documents=len(long_docs), eval_tokens=int(sum(map(len, long_docs))))
        print(f"held-out documents longer than {seq_len}: {len(long_docs)}", flush=True)
        for trained in ("cut", "link"):
            out = f"{tmp}/{trained}"
            if train_main(common + [f"--data.long_docs={trained}", f"--run.out_dir={out}"]):
                raise RuntimeError(f"training with long_docs={trained} failed")
            model = from_pretrained(out, dtype="float32")
            for read in ("whole", "cut"):
                losses = position_losses(model, long_docs, seq_len, link=read == "whole")
                row = dict(
                    mean=float(np.concatenate(losses).mean()), by_position=bucketed(losses, seq_len)
                )
                data["results"][f"trained {trained}, read {read}"] = row
                print(trained, read, row, flush=True)
                harness.write_json(new.path, data)
    plot(data, new.companions[0])
    return 0


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in data["results"].items():
        labels = list(row["by_position"])
        ax.plot(
            range(len(labels)),
            list(row["by_position"].values()),
            marker="o",
            linestyle="-" if "read whole" in name else "--",
            label=name,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(
        f"{data['preset']}, {data['steps']} steps of {data['rows']} x "
        f"{data['seq_len']}: documents longer than a row"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=60 if "smoke" in str(path) else 120)


if __name__ == "__main__":
    sys.exit(main())
