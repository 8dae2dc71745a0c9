"""Command line: `python -m jax_packmamba.generate --checkpoint DIR --prompt "..."`.

Samples continuations of prompts from a model directory (Hugging Face or state-spaces layout);
the engine is jax_packmamba.generation. The tokenizer and the end-of-sequence id default to
those the directory records (jax_packmamba.tokenizer.tokenizer_for_model_dir), else UTF-8
bytes with no end-of-sequence id; --tokenizer and --eos-id override them.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from jax_packmamba.generation import decode, generate, prefill, prepare
from jax_packmamba.pretrained import from_pretrained
from jax_packmamba.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_for_model_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_packmamba.generate",
        description="Sample continuations of prompts from a Mamba checkpoint (HF or state-spaces layout).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch (prefilled together in one packed pass)")
    parser.add_argument("--tokenizer",
                        help="'bytes' or a tokenizer.json (default: the one the checkpoint "
                             "directory records, else UTF-8 bytes)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-id", type=int,
                        help="stop a sequence after this id (default: the checkpoint's "
                             "eos_token_id, if it records one)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float16)")
    parser.add_argument("--scan-impl", default="auto", help="selective scan implementation")
    parser.add_argument("--warmup", action="store_true",
                        help="generate once before timing, so tokens/s excludes compilation")
    args = parser.parse_args(argv)

    model = from_pretrained(args.checkpoint, dtype=args.dtype, scan_impl=args.scan_impl)
    recorded = tokenizer_for_model_dir(args.checkpoint)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = recorded or ByteTokenizer()
    eos_id = args.eos_id if args.eos_id is not None else (
        recorded.eod_id if recorded is not None else None)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, eos_id=eos_id)
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
