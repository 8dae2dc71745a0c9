"""`python -m jax_packmamba.demo`: pack real variable-length documents and run Mamba on them.

Shows what packing buys on the embedded corpus (the standard library's source files), runs one
forward and backward pass of a small MambaLM over a packed batch, and checks on the spot that a
packed sequence gets the logits it gets alone.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_packmamba.config import MambaConfig
from jax_packmamba.corpus import stdlib_documents
from jax_packmamba.loss import masked_cross_entropy
from jax_packmamba.model import MambaLM
from jax_packmamba.packing import SplitSequenceWarning, pack_sequences, pad_sequences


def loss_fn(model, batch):
    """Mean next-token cross-entropy over real targets only."""
    logits = model(batch["tokens"], batch["segment_ids"])
    ce, count = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return ce / jnp.maximum(count, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--documents", type=int, default=None, help="how many stdlib files (default all)"
    )
    parser.add_argument("--length", type=int, default=4096, help="packed row length")
    parser.add_argument("--rows", type=int, default=4, help="rows in the forward/backward batch")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args(argv)

    docs = stdlib_documents(args.documents)
    lengths = np.array([len(d) for d in docs])
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(
        f"corpus: {len(docs)} stdlib source files, {lengths.sum():,} bytes; document length "
        f"min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}"
    )

    print(f"\nbatching the same documents into rows of {args.length} tokens:")
    # The split counts are printed below, so the packer's warning about them would only repeat it.
    warnings.simplefilter("ignore", SplitSequenceWarning)
    packed = pack_sequences(docs, args.length)
    greedy = pack_sequences(docs, args.length, policy="greedy")
    padded = pad_sequences(docs, args.length)
    print(
        f"  packed, first-fit-decreasing: {packed.num_rows:5d} rows, {packed.efficiency:6.1%} real tokens "
        f"({packed.num_split_sequences} documents longer than a row split into pieces, none dropped)"
    )
    print(
        f"  packed, in-order greedy:      {greedy.num_rows:5d} rows, {greedy.efficiency:6.1%} real tokens"
    )
    print(
        f"  padded, one document a row:   {padded.num_rows:5d} rows, {padded.efficiency:6.1%} real tokens"
    )

    config = MambaConfig.preset(args.preset)
    model = MambaLM(config, rngs=nnx.Rngs(0))
    print(
        f"\nmodel: preset {args.preset!r}, {config.num_params():,} parameters, "
        f"{config.n_layer} layers, d_model {config.d_model}, compute {config.dtype}"
    )

    # Show the rows that hold the most sequences: they are where isolation matters most.
    pieces_per_row = np.bincount(packed.placements[:, 2], minlength=packed.num_rows)
    rows = np.sort(np.argsort(-pieces_per_row, kind="stable")[: args.rows])
    batch = {
        k: jnp.asarray(getattr(packed, k)[rows])
        for k in ("tokens", "segment_ids", "targets", "loss_mask")
    }
    n_seq = int(pieces_per_row[rows].sum())
    step = nnx.jit(lambda m, b: nnx.value_and_grad(loss_fn)(m, b))
    t0 = time.perf_counter()
    loss, grads = jax.block_until_ready(step(model, batch))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss, grads = jax.block_until_ready(step(model, batch))
    step_s = time.perf_counter() - t0
    grad_norm = optax.global_norm(nnx.state(grads, nnx.Param))
    real = int(np.asarray(batch["loss_mask"]).sum())
    print(
        f"forward+backward on {args.rows} packed rows x {args.length} ({n_seq} sequences, {real:,} real targets): "
        f"loss {float(loss):.4f} (uniform would be {np.log(config.vocab_size):.4f}), "
        f"grad norm {float(grad_norm):.4f}"
    )
    print(
        f"  first call {compile_s:.1f} s (compile), then {step_s * 1e3:.0f} ms "
        f"= {real / step_s:,.0f} real tokens/s"
    )

    # The packing promise, checked live: a packed sequence's logits equal its logits alone.
    logits = model(batch["tokens"], batch["segment_ids"])
    worst = 0.0
    in_first_row = packed.placements[packed.placements[:, 2] == rows[0]]
    checked = in_first_row[:4]
    for seq_index, start_in_seq, _, column, length in checked:
        alone = model(
            jnp.asarray(docs[seq_index][start_in_seq : start_in_seq + length][None], jnp.int32)
        )
        worst = max(worst, float(jnp.max(jnp.abs(logits[0, column : column + length] - alone[0]))))
    print(
        f"isolation: {len(checked)} of the {len(in_first_row)} sequences in row {rows[0]}, packed vs "
        f"alone: max |logit difference| = {worst:.2e}"
    )


if __name__ == "__main__":
    main()
