"""Command line: `python -m jax_packmamba.generate --checkpoint DIR --prompt "..."`.

Samples continuations of prompts from a model directory (Hugging Face or state-spaces layout);
the engine is jax_packmamba.generation. The tokenizer and the end-of-sequence id default to
those the directory records (jax_packmamba.tokenizer.tokenizer_for_model_dir), else UTF-8
bytes with no end-of-sequence id; --tokenizer and --eos-id override them.

Sampling: --temperature (0: greedy), --top-k, --top-p, --min-p, --repetition-penalty, --seed,
as Hugging Face defines them (jax_packmamba.sampling). A single prompt's continuation is
printed as it is generated, every --stream-block decode steps (jitted blocks of the same
compiled loop); several prompts are printed when all are done. The last line (stderr) gives
tokens/s and the time to the first token.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from jax_packmamba.decode_step import DECODE_IMPLS
from jax_packmamba.generation import generate, prefill_batch, prepare, sampling_config, stream
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
    parser.add_argument("--min-p", type=float,
                        help="keep tokens at least this fraction as likely as the most likely one")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide a seen token's logit by this if positive, multiply if "
                             "negative (prompt and generated tokens; 1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-id", type=int, action="append",
                        help="stop a sequence after this id; repeat for several (default: the "
                             "checkpoint's eos_token_id, if it records one)")
    parser.add_argument("--decode-impl", default="auto", choices=DECODE_IMPLS,
                        help="decode step: the Pallas kernels (auto on a GPU) or XLA ops")
    parser.add_argument("--stream-block", type=int, default=8,
                        help="decode steps between prints of a single prompt's text (0: print "
                             "at the end)")
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
    eos_ids = args.eos_id or (
        [recorded.eod_id] if recorded is not None and recorded.eod_id is not None else [])
    prompts = [tokenizer.encode(p) for p in args.prompt]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    seed=args.seed, eos_ids=tuple(eos_ids))
    prepared = prepare(model)
    del model
    if args.warmup:
        generate(prepared, prompts, args.max_new_tokens, decode_impl=args.decode_impl, **sampling)
    start = time.perf_counter()
    prefilled = prefill_batch(prepared, prompts)
    jax.block_until_ready(prefilled.logits)
    prefill_end = time.perf_counter()
    live = len(prompts) == 1 and args.stream_block > 0
    printer = _StreamPrinter(tokenizer, prompts[0], args.prompt[0]) if live else None
    first_token = None
    tokens = np.zeros((len(prompts), 0), np.int32)
    count = np.zeros((len(prompts),), np.int32)
    block = args.stream_block if args.stream_block > 0 else max(1, args.max_new_tokens)
    for tokens, count in stream(prepared, prefilled, args.max_new_tokens,
                                sampling_config(**sampling), block=block,
                                decode_impl=args.decode_impl):
        first_token = first_token or time.perf_counter()
        if printer:
            printer.show(tokens[0, :count[0]])
    end = time.perf_counter()
    if printer:
        printer.finish(tokens[0, :count[0]])
    else:
        for text, ids, row, n in zip(args.prompt, prompts, tokens, count):
            print(f"--- {text!r}")
            print(tokenizer.decode([*ids, *row[:n]]))
    total = int(count.sum())
    note = "" if args.warmup else " (includes compilation; --warmup excludes it)"
    ttft = "" if first_token is None else f"; time to first token {first_token - start:.3f} s"
    print(f"{total} tokens in {end - start:.3f} s: {total / (end - start):.1f} tokens/s{ttft}; "
          f"prefill {sum(map(len, prompts))} tokens in {prefill_end - start:.3f} s, decode "
          f"{end - prefill_end:.3f} s{note}", file=sys.stderr)
    return 0


class _StreamPrinter:
    """Prints one prompt's text, then its continuation as it grows. A tokenizer's text of a
    partial sequence can end in a replacement character (half a UTF-8 character): that tail is
    held back until the next tokens complete it."""

    def __init__(self, tokenizer, ids, text):
        self._tokenizer, self._ids = tokenizer, list(ids)
        print(f"--- {text!r}")
        self._printed = tokenizer.decode(self._ids)
        sys.stdout.write(self._printed)
        sys.stdout.flush()

    def show(self, generated, *, final=False):
        text = self._tokenizer.decode([*self._ids, *generated])
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self._printed) and len(text) > len(self._printed):
            sys.stdout.write(text[len(self._printed):])
            sys.stdout.flush()
            self._printed = text

    def finish(self, generated):
        self.show(generated, final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
