"""Held-out loss on long documents after training with each --data.long_docs option.

    PYTHONPATH=. python3 benchmarks/bench_long_docs.py [--preset 130m] [--n-layer 12]
        [--steps 300] [--seq-len 2048] [--rows 8] [--modes cut,link,link_across_steps]
        [--stream-groups 1,4] [--out DIR] [--smoke]

Trains the same model once per mode (--modes: any of cut, link, link_across_steps) through
the trainer (train/__main__.py) on the stdlib corpus, the same seed, steps and so the same
number of token slots (every row of every mode is full: cut packs pieces by first-fit-
decreasing, link lays whole documents end to end over the rows, link_across_steps gives every
row a stream of whole documents of its own), and evaluates each on the held-out split's
documents longer than a row (train.data.split_documents, as the trainer holds them out). Each
model reads the held-out documents two ways: "whole" (pack_stream with the links: each
document as one sequence) and "cut" (the same rows without the links: every row from a zero
state). The per-token loss is averaged by position in the document (log2 buckets of seq_len),
written to --out/long_docs_<slug>.json with each mode's training and evaluation seconds, and
plotted to long_docs_<slug>.png, beside each mode's training loss (the mean of its last 20
steps). --stream-groups G1,G2,...: link_across_steps is trained once per value with
--data.stream_groups=G, labelled link_across_steps (G = 1) or link_across_steps_g<G>.

The default model is the 130m preset cut to 12 layers (about 57M parameters with byte tokens):
300 steps of 8 x 2048, compiles included, take about 90 s a mode on one H100 (training and
evaluation). --smoke: the tiny preset, 64-token rows, a few steps on CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness


def position_losses(model, docs, seq_len, link: bool, rows_per_call: int = 128):
    """Per document, the loss of each token's next-token prediction (len - 1 values). The
    documents go through in groups of at most rows_per_call rows (one compiled shape; a
    document longer than that gets a call of its own), so memory stays bounded."""
    from jax_packmamba.packing import pack_stream, unpack

    @jax.jit
    def token_losses(tokens, seg, targets, continues):
        links = dict(continues=continues) if link else {}
        logits = model(tokens, seg, **links).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    out, group, tokens = [], [], 0
    budget = rows_per_call * seq_len
    for i, doc in enumerate(docs):
        group.append(doc)
        tokens += len(doc)
        following = len(docs[i + 1]) if i + 1 < len(docs) else None
        if following is not None and tokens + following <= budget:
            continue
        rows = max(rows_per_call, -(-tokens // seq_len))
        batch = pack_stream(group, seq_len, num_rows=rows)
        ce = token_losses(
            jnp.asarray(batch.tokens),
            jnp.asarray(batch.segment_ids),
            jnp.asarray(batch.targets),
            jnp.asarray(batch.continues),
        )
        out += [x[:-1] for x in unpack(batch, np.asarray(ce))]  # the last token: no target
        group, tokens = [], 0
    return out


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
    p.add_argument(
        "--n-layer", type=int, default=None, help="layers (default 12; smoke 1; 0: the preset's)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    p.add_argument("--seq-len", type=int, default=None, help="row length (default 2048)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-eval-docs", type=int, default=64)
    p.add_argument(
        "--eval-rows", type=int, default=None, help="rows per evaluation call (default 128)"
    )
    p.add_argument(
        "--modes",
        default="cut,link,link_across_steps",
        help="--data.long_docs values to train, comma-separated",
    )
    p.add_argument(
        "--stream-groups",
        default="1",
        help="--data.stream_groups values link_across_steps is trained with, comma-separated "
        "ints >= 1 (default 1)",
    )
    args = p.parse_args(argv)
    from train.config import LONG_DOCS

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in LONG_DOCS]
    if bad or not modes:
        p.error(f"--modes: choose from {', '.join(LONG_DOCS)}, got {args.modes!r}")
    groups = [g.strip() for g in args.stream_groups.split(",") if g.strip()]
    if not groups or not all(g.isdigit() and int(g) >= 1 for g in groups):
        p.error(f"--stream-groups: comma-separated ints >= 1, got {args.stream_groups!r}")
    groups = list(dict.fromkeys(int(g) for g in groups))
    if groups != [1] and "link_across_steps" not in modes:
        p.error("--stream-groups: only link_across_steps has stream groups; add it to --modes")
    # (label, trainer flags) of every run: link_across_steps once per stream group count.
    runs = []
    for mode in modes:
        for g in groups if mode == "link_across_steps" else [1]:
            label = mode if g == 1 else f"{mode}_g{g}"
            flags = [f"--data.long_docs={mode}", f"--data.stream_groups={g}"]
            runs.append((label, flags))
    new = harness.new_result(
        "long_docs",
        script=__file__,
        argv=argv,
        out_dir=args.out,
        smoke=args.smoke,
        companions=[".png"],
    )
    preset = args.preset or ("tiny" if args.smoke else "130m")
    steps = args.steps or (3 if args.smoke else 300)
    n_layer = (1 if args.smoke else 12) if args.n_layer is None else args.n_layer
    eval_rows = args.eval_rows or (8 if args.smoke else 128)
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
        "--run.tensorboard=false",  # the GPU machine has no tensorboardX
    ]
    if n_layer:
        common.append(f"--model.n_layer={n_layer}")
    if args.smoke:
        common += ["--model.d_model=32", "--data.max_documents=40"]
    data = dict(
        **new.header,
        preset=preset,
        n_layer=n_layer or None,
        steps=steps,
        seq_len=seq_len,
        rows=args.rows,
        modes=[label for label, _ in runs],
        stream_groups=groups,
        seconds={},
        train_loss={},
        results={},
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
        for trained, flags in runs:
            out = f"{tmp}/{trained}"
            start = time.perf_counter()
            if train_main(common + flags + [f"--run.out_dir={out}"]):
                raise RuntimeError(f"training with {' '.join(flags)} failed")
            trained_s = time.perf_counter() - start
            with open(f"{out}/summary.json") as f:
                data["train_loss"][trained] = json.load(f)["loss_last20_mean"]
            model = from_pretrained(out, dtype="float32")
            for read in ("whole", "cut"):
                losses = position_losses(
                    model, long_docs, seq_len, link=read == "whole", rows_per_call=eval_rows
                )
                row = dict(
                    mean=float(np.concatenate(losses).mean()), by_position=bucketed(losses, seq_len)
                )
                data["results"][f"trained {trained}, read {read}"] = row
                print(trained, read, row, flush=True)
                harness.write_json(new.path, data)
            data["seconds"][trained] = dict(
                train=trained_s, evaluate=time.perf_counter() - start - trained_s
            )
            print(trained, "seconds", data["seconds"][trained], flush=True)
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
        f"{data['preset']}"
        + (f" ({data['n_layer']} layers)" if data.get("n_layer") else "")
        + f", {data['steps']} steps of {data['rows']} x "
        f"{data['seq_len']}: documents longer than a row"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=60 if "smoke" in str(path) else 120)


if __name__ == "__main__":
    sys.exit(main())
