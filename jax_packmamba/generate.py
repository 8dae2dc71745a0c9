"""Text generation with a recurrent cache: one packed prefill, then one jitted decode loop.

Axis letters: l layer, p prompt, r packed row, t time, d d_model, e d_inner, n d_state,
w d_conv - 1, v vocabulary.

    prefill  all prompts, whatever their lengths, are packed into rows (`pack_sequences`) and
             run through the model ONCE; every layer's scan returns each segment's final SSM
             state and the conv state is gathered from each prompt's last w conv inputs (zeros
             where the prompt is shorter), so each prompt leaves with the state it would have
             had run alone: DecodeState(conv (l, p, w, e), ssm (l, p, e, n)).
    decode   a `lax.while_loop` of recurrent steps (sample, then one token through every
             layer): the state has a fixed size, so a token costs the same whatever was
             generated before, and the loop compiles once for a given batch and length.

The layers' parameters are stacked (`prepare`) so both passes `lax.scan` over layers: the
compile time does not grow with the depth. Weights that the model only uses cast to the compute
dtype (projections, conv) are stored cast, which changes no result and halves what each decode
step reads in bfloat16.

Command line: `python -m jax_packmamba.generate --checkpoint DIR --prompt "..."`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba.generation import (  # noqa: F401  (re-exported until the CLI split lands)
    DecodeState, PreparedModel, decode, generate, inference_state, prefill, prepare,
    sample_next_token, step,
)
from jax_packmamba.pretrained import from_pretrained

# ---------------------------------------------------------------------------------------------
# Command line.


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` package."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"reading {path} needs the tokenizers package: pip install tokenizers") from None
        self._tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_packmamba.generate",
        description="Sample continuations of prompts from a Mamba checkpoint (HF or state-spaces layout).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch (prefilled together in one packed pass)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: UTF-8 bytes as ids 0..255)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-id", type=int)
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float16)")
    parser.add_argument("--scan-impl", default="auto", help="selective scan implementation")
    parser.add_argument("--warmup", action="store_true",
                        help="generate once before timing, so tokens/s excludes compilation")
    args = parser.parse_args(argv)

    model = from_pretrained(args.checkpoint, dtype=args.dtype, scan_impl=args.scan_impl)
    tokenizer = JsonTokenizer(args.tokenizer) if args.tokenizer else ByteTokenizer()
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        parser.error(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                     f"{model.config.padded_vocab_size}")
    prompts = [tokenizer.encode(p) for p in args.prompt]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, eos_id=args.eos_id)
    prepared = prepare(model)
    del model
    if args.warmup:
        generate(prepared, prompts, args.max_new_tokens, **sampling)
    start = time.perf_counter()
    logits, state = prefill(prepared, prompts)
    jax.block_until_ready(logits)
    prefilled = time.perf_counter()
    tokens, count = decode(prepared, logits, state, args.max_new_tokens, **sampling)
    tokens, count = np.asarray(tokens), np.asarray(count)
    end = time.perf_counter()
    for text, ids, row, n in zip(args.prompt, prompts, tokens, count):
        print(f"--- {text!r}")
        print(tokenizer.decode([*ids, *row[:n]]))
    total = int(count.sum())
    note = "" if args.warmup else " (includes compilation; --warmup excludes it)"
    print(f"{total} tokens in {end - start:.3f} s: {total / (end - start):.1f} tokens/s; "
          f"prefill {sum(map(len, prompts))} tokens in {prefilled - start:.3f} s, decode "
          f"{end - prefilled:.3f} s{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
