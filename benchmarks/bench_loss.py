"""The LM head + cross-entropy alone: full logits against the chunked loss, time and memory.

    PYTHONPATH=. python3 benchmarks/bench_loss.py [--out DIR] [--smoke]

At the training shape of the 1.4b / mamba2-1.3b benchmarks (8 x 2048 tokens, d_model 2048, the
50,280-row tied embedding; bfloat16 hidden, float32 weight cast to bfloat16 in the products),
the loss sum and its gradients with respect to the hidden state and the weight (what a training
step asks of the head):
  full          masked_cross_entropy(hidden @ weight.T): logits for every token, float32 in
                the loss (the training step before the chunked loss)
  chunked_N     loss.chunked_cross_entropy with chunk_tokens N (N = loss.CHUNK_TOKENS is what
                training uses)
Each is timed as the median of 7 groups of 5 calls (harness.time_calls), forward only and with
gradients; its memory is the compiled program's temporaries (memory_analysis: what the loss
adds on top of its inputs and outputs, as it adds to a step's peak). Writes
--out/loss_<slug>.json. --smoke: tiny shapes on CPU.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from jax_packmamba.loss import CHUNK_TOKENS, chunked_cross_entropy, masked_cross_entropy

# name -> (rows, length, d_model, vocab)
SHAPES = {"1.4b": (8, 2048, 2048, 50280)}
SMOKE = {"tiny": (2, 64, 32, 100)}
CHUNKS = sorted({1024, 2048, 4096, 8192, CHUNK_TOKENS})
SMOKE_CHUNKS = (16, 64)


def inputs(shape):
    rows, length, d, v = shape
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (rows, length, d), jnp.bfloat16)
    weight = 0.02 * jax.random.normal(k[1], (v, d), jnp.float32)
    targets = jax.random.randint(k[2], (rows, length), 0, v)
    mask = jax.random.bernoulli(k[3], 0.95, (rows, length))
    return hidden, weight, targets, mask


def full(hidden, weight, targets, mask):
    logits = hidden @ weight.astype(hidden.dtype).T
    return masked_cross_entropy(logits, targets, mask)[0]


def chunked(hidden, weight, targets, mask, *, chunk_tokens):
    return chunked_cross_entropy(hidden, weight, targets, mask, chunk_tokens=chunk_tokens)[0]


def measure(loss, args, smoke):
    row = {}
    for mode, fn in (("fwd", loss), ("grad", jax.value_and_grad(loss, argnums=(0, 1)))):
        compiled = jax.jit(fn).lower(*args).compile()
        memory = compiled.memory_analysis()
        t = harness.time_calls(
            compiled, [args], groups=1 if smoke else 7, per_group=1 if smoke else 5
        )
        row[f"{mode}_ms"] = 1e3 * t.median_s
        row[f"{mode}_temp_bytes"] = None if memory is None else int(memory.temp_size_in_bytes)
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = harness.argument_parser(__doc__).parse_args(argv)
    new = harness.new_result("loss", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke)
    data = dict(**new.header, training_chunk_tokens=CHUNK_TOKENS, results=[])
    chunks = SMOKE_CHUNKS if args.smoke else CHUNKS
    for name, shape in (SMOKE if args.smoke else SHAPES).items():
        xs = inputs(shape)
        variants = {"full": full} | {
            f"chunked_{c}": functools.partial(chunked, chunk_tokens=c) for c in chunks
        }
        for variant, loss in variants.items():
            row = dict(shape=name, rows_length_d_vocab=list(shape), variant=variant)
            row.update(measure(loss, xs, args.smoke))
            print(
                {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()}, flush=True
            )
            data["results"].append(row)
            harness.write_json(new.path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
