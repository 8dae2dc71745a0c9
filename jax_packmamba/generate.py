"""Command line: `python -m jax_packmamba.generate --checkpoint DIR --prompt "..."`.

Samples continuations of prompts from a model directory (Hugging Face or state-spaces layout);
the engine is jax_packmamba.generation. The tokenizer and the end-of-sequence id default to
those the directory records (jax_packmamba.tokenizer.tokenizer_for_model_dir), else UTF-8
bytes with no end-of-sequence id; --tokenizer and --eos-id override them.

Sampling: --temperature (0: greedy), --top-k, --top-p, --min-p, --repetition-penalty, --seed,
as Hugging Face defines them (jax_packmamba.sampling). A single prompt's continuation is
printed as it is generated, every --stream-block decode steps (jitted blocks of the same
compiled loop); several prompts are printed when all are done. The last line (stderr) gives
tokens/s and the time to the first token; the first (stderr) names the model directory loaded
and, for a training run's export, its step.

Every bad input is one line on stderr ("error: ...", as the training command line prints it)
and exit code 2, no traceback: the flags are checked
before anything is loaded, and a ValueError or OSError the library raises later (a directory
that holds no model, token ids the model does not have) is printed the same way.

The persistent XLA compilation cache (jax_packmamba.compilation_cache) is on by default, so a
rerun loads its compiled programs instead of compiling them again; its folder is printed on
stderr before the summary (--compilation-cache DIR picks it, --no-compilation-cache turns the
cache off).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
import types

import jax
import numpy as np

from jax_packmamba import compilation_cache
from jax_packmamba.config import DTYPES
from jax_packmamba.generation import (
    STATE_DTYPES,
    generate,
    prefill_batch,
    prepare,
    sampling_config,
    stream,
)
from jax_packmamba.model import DECODE_IMPLS
from jax_packmamba.ops.selective_scan import IMPLS as SCAN_IMPLS
from jax_packmamba.pretrained import from_pretrained
from jax_packmamba.run_layout import MODELS_DIR, resolve_model_dir
from jax_packmamba.sampling import MAX_EOS_IDS
from jax_packmamba.tokenizer import (
    BYTES,
    ByteTokenizer,
    load_tokenizer,
    tokenizer_for_model_dir,
)

PROG = "python -m jax_packmamba.generate"


class _UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage and exits; we want one line
        raise _UsageError(message)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {text!r}")
    return value


def _float_in(low: float, high: float, *, low_open: bool = False, rule: str):
    """A finite float in [low, high] ((low, high] if low_open); `rule` is how help says it."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Sample continuations of prompts from a Mamba model directory.",
        epilog="One prompt is printed as it is generated (see --stream-block); several are "
        "printed when all are done. The last line, on stderr, gives tokens/s, the time "
        "to the first token and the prefill and decode times. Every error is one line "
        "on stderr with exit code 2.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a model directory (config.json and the weights: model.safetensors or "
        "pytorch_model.bin, possibly sharded; Hugging Face or state-spaces layout, Mamba "
        "or Mamba2), a training run directory (its newest models/<step>) or a run's "
        "checkpoints/<step>; required",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="prompt text, at least one token once encoded; repeat for a batch (prefilled "
        "together in one packed pass); required",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="SPEC",
        help="'bytes' (UTF-8 bytes are ids 0-255) or the path of a tokenizer.json (default: "
        "the one the model directory records, else bytes)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=_int_at_least(0),
        default=64,
        metavar="N",
        help="tokens to generate per prompt, an int >= 0; a sequence stops earlier at an "
        "end-of-sequence id (default: 64)",
    )
    parser.add_argument(
        "--temperature",
        type=_float_in(0, math.inf, rule="a finite number >= 0"),
        default=1.0,
        metavar="T",
        help="divide the logits by T before sampling, a number >= 0; 0 is greedy (the most "
        "likely token; top-k, top-p and min-p then do nothing) (default: 1.0)",
    )
    parser.add_argument(
        "--top-k",
        type=_int_at_least(1),
        metavar="K",
        help="sample only among the K most likely tokens, an int >= 1 (default: off)",
    )
    parser.add_argument(
        "--top-p",
        type=_float_in(0, 1, low_open=True, rule="in (0, 1]"),
        metavar="P",
        help="sample only among the smallest set of most likely tokens whose probabilities "
        "add up to P, in (0, 1]; 1 keeps all (default: off)",
    )
    parser.add_argument(
        "--min-p",
        type=_float_in(0, 1, rule="in [0, 1]"),
        metavar="P",
        help="sample only among tokens at least P times as likely as the most likely one, in "
        "[0, 1]; 0 keeps all (default: off)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=_float_in(0, math.inf, low_open=True, rule="a finite number > 0"),
        default=1.0,
        metavar="R",
        help="for every token already seen (prompt or generated), divide its logit by R if "
        "positive, multiply if negative, a number > 0; 1 is off, > 1 discourages "
        "repeats (default: 1.0)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="random seed of the sampling, an int in [0, 2**32); the same seed and flags give "
        "the same text (default: 0)",
    )
    parser.add_argument(
        "--eos-id",
        type=_int_at_least(0),
        action="append",
        metavar="ID",
        help=f"stop a sequence after it generates this token id (printed with it), an int >= "
        f"0; repeat for several, at most {MAX_EOS_IDS} (default: the model directory's "
        f"eos_token_id, if it records one, else none)",
    )
    parser.add_argument(
        "--decode-impl",
        default="auto",
        choices=DECODE_IMPLS,
        help="the decode step: 'pallas' (the fused Pallas kernels, GPU only), 'xla' (XLA "
        "ops), 'pallas_interpret' (the kernels through the interpreter, slow; tests) or "
        "'auto' (pallas on a GPU when the kernels take the model's shape, else xla) "
        "(default: auto)",
    )
    parser.add_argument(
        "--stream-block",
        type=_int_at_least(0),
        default=8,
        metavar="N",
        help="with one prompt, print its continuation every N decode steps, an int >= 0; 0 "
        "prints it at the end (default: 8)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="compute dtype of the model (parameters stay float32) (default: float32)",
    )
    parser.add_argument(
        "--state-dtype",
        default="auto",
        choices=("auto", *STATE_DTYPES),
        help="storage dtype of the SSM state between decode steps: 'auto' is the model's "
        "compute dtype (--dtype; float32 for Mamba-3 and float16), as mamba_ssm stores its "
        "decode state in the weights' dtype; 'float32' keeps a bfloat16 model's state in "
        "float32 for the extra accuracy, 'bfloat16' halves a float32 state's memory traffic "
        "(the update itself stays float32) (default: auto)",
    )
    parser.add_argument(
        "--scan-impl",
        default="auto",
        choices=SCAN_IMPLS,
        help="the prefill's scan: 'pallas' (Triton kernel, GPU only), 'reference' (pure "
        "JAX), 'pallas_interpret' (the kernel through the interpreter, slow; tests) or "
        "'auto' (pallas on a GPU, else reference) (default: auto)",
    )
    parser.add_argument(
        "--warmup",
        action="store_true",
        help="generate once before timing, so tokens/s excludes compilation (default: off)",
    )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--compilation-cache",
        metavar="DIR",
        help=f"folder of the persistent XLA compilation cache, created if missing; a rerun "
        f"loads the compiled programs from it instead of compiling again (default: "
        f"{compilation_cache.default_directory()}; ${compilation_cache.ENV_VAR} changes "
        f"it)",
    )
    cache.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not use the persistent compilation cache (default: use it)",
    )
    return parser


def main(argv=None) -> int:
    """Runs the command line; returns the exit code (0, or 2 for bad input)."""
    try:
        return _run(argv)
    except _UsageError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(argv) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help
        return done.code
    _check_args(args)
    try:
        return _generate(args)
    except (ValueError, OSError) as err:  # the library's messages name what is wrong
        raise _UsageError(str(err) or type(err).__name__) from None


def _check_args(args) -> None:
    """Everything that can be checked before loading anything heavy."""
    checkpoint = pathlib.Path(args.checkpoint)
    if not checkpoint.exists():
        raise _UsageError(f"--checkpoint {args.checkpoint}: no such directory")
    if not checkpoint.is_dir():
        raise _UsageError(f"--checkpoint {args.checkpoint}: not a directory")
    if not os.access(checkpoint, os.R_OK | os.X_OK):
        raise _UsageError(f"--checkpoint {args.checkpoint}: cannot be read (permission denied)")
    for i, prompt in enumerate(args.prompt, start=1):
        if not prompt:
            raise _UsageError(f"--prompt #{i} is empty: a prompt needs at least one token")
    if args.tokenizer is not None and args.tokenizer != BYTES:
        path = pathlib.Path(args.tokenizer)
        if not path.is_file():
            raise _UsageError(
                f"--tokenizer {args.tokenizer}: no such file (expected {BYTES!r} "
                f"or the path of a tokenizer.json)"
            )
        if not os.access(path, os.R_OK):
            raise _UsageError(f"--tokenizer {args.tokenizer}: cannot be read (permission denied)")
    if args.eos_id and len(args.eos_id) > MAX_EOS_IDS:
        raise _UsageError(f"--eos-id given {len(args.eos_id)} times; at most {MAX_EOS_IDS}")
    pallas = [
        flag
        for flag, value in (("--decode-impl", args.decode_impl), ("--scan-impl", args.scan_impl))
        if value == "pallas"
    ]
    if pallas:
        if jax.default_backend() != "gpu":
            raise _UsageError(
                f"{pallas[0]} pallas needs a GPU, but jax runs on {jax.default_backend()!r}; use "
                f"auto, or pallas_interpret (the same kernels through the interpreter, slow)"
            )


def _state_dtype(args):
    """--state-dtype as generation's state_dtype: None for auto (the compute dtype)."""
    return None if args.state_dtype == "auto" else args.state_dtype


def _generate(args) -> int:
    recorded = tokenizer_for_model_dir(args.checkpoint)
    if args.tokenizer:
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except ImportError as err:  # `tokenizers` is not installed: its message says so
            raise ValueError(str(err)) from None
    else:
        tokenizer = recorded or ByteTokenizer()
    eos_ids = args.eos_id or (
        [recorded.eod_id] if recorded is not None and recorded.eod_id is not None else []
    )
    prompts = [tokenizer.encode(p) for p in args.prompt]
    for i, (text, ids) in enumerate(zip(args.prompt, prompts), start=1):
        if len(ids) == 0:
            raise ValueError(
                f"--prompt #{i} ({text!r}) encodes to no tokens with the tokenizer "
                f"{tokenizer.name}; a prompt needs at least one"
            )
    sampling = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        eos_ids=tuple(eos_ids),
    )
    config = sampling_config(**sampling)  # the library's own checks, before the model loads
    # On before the model loads; its folder is printed with the summary, so that an error
    # raised on the way stays the only line on stderr.
    cache = None if args.no_compilation_cache else compilation_cache.enable(args.compilation_cache)

    model_dir = resolve_model_dir(args.checkpoint)
    model = from_pretrained(model_dir, dtype=args.dtype, scan_impl=args.scan_impl)
    vocab = model.config.vocab_size
    for i, ids in enumerate(prompts, start=1):
        if int(ids.max()) >= vocab:
            raise ValueError(
                f"--prompt #{i} encodes to token ids up to {int(ids.max())} with the "
                f"tokenizer {tokenizer.name}, but the model has {vocab} (--tokenizer "
                f"picks the model's own)"
            )
    for eos in eos_ids:
        if eos >= vocab:
            source = "--eos-id" if args.eos_id else "the model directory's eos_token_id"
            raise ValueError(
                f"{source} {eos} is outside the model's vocabulary: token ids are in [0, {vocab})"
            )
    # A run's export is RUN/models/<step>: say which step, since a run directory means its newest.
    step = (
        f" (training step {model_dir.name})"
        if model_dir.parent.name == MODELS_DIR and model_dir.name.isdigit()
        else ""
    )
    print(f"model: {model_dir}{step}", file=sys.stderr)
    prepared = prepare(model)
    del model
    if args.warmup:
        generate(
            prepared,
            prompts,
            args.max_new_tokens,
            decode_impl=args.decode_impl,
            state_dtype=_state_dtype(args),
            **sampling,
        )
    start = time.perf_counter()
    prefilled = prefill_batch(prepared, prompts, state_dtype=_state_dtype(args))
    jax.block_until_ready(prefilled.logits)
    prefill_end = time.perf_counter()
    live = len(prompts) == 1 and args.stream_block > 0
    printer = _StreamPrinter(tokenizer, prompts[0], args.prompt[0]) if live else None
    first_token = None
    tokens = np.zeros((len(prompts), 0), np.int32)
    count = np.zeros((len(prompts),), np.int32)
    block = args.stream_block if args.stream_block > 0 else max(1, args.max_new_tokens)
    for tokens, count in stream(
        prepared, prefilled, args.max_new_tokens, config, block=block, decode_impl=args.decode_impl
    ):
        first_token = first_token or time.perf_counter()
        if printer:
            printer.show(tokens[0, : count[0]])
    end = time.perf_counter()
    if printer:
        printer.finish(tokens[0, : count[0]])
    else:
        for text, ids, row, n in zip(args.prompt, prompts, tokens, count):
            print(f"--- {text!r}")
            print(tokenizer.decode([*ids, *row[:n]]))
    total = int(count.sum())
    note = "" if args.warmup else " (includes compilation; --warmup excludes it)"
    ttft = "" if first_token is None else f"; time to first token {first_token - start:.3f} s"
    rate = f"{total / (end - start):.1f}" if end > start else "-"
    if cache is not None:
        print(f"compilation cache: {cache} (--no-compilation-cache turns it off)", file=sys.stderr)
    print(
        f"{total} tokens in {end - start:.3f} s: {rate} tokens/s{ttft}; "
        f"prefill {sum(map(len, prompts))} tokens in {prefill_end - start:.3f} s, decode "
        f"{end - prefill_end:.3f} s{note}",
        file=sys.stderr,
    )
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
            sys.stdout.write(text[len(self._printed) :])
            sys.stdout.flush()
            self._printed = text

    def finish(self, generated):
        self.show(generated, final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()


class _CallableModule(types.ModuleType):
    """Importing this module sets `jax_packmamba.generate` to it, shadowing the library's
    `generate` function of the same name (which users call as `jp.generate`); calling the module
    calls that function, so `jp.generate(...)` works whether or not the CLI was imported."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
