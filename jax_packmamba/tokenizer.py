"""Tokenizers shared by training and generation, and how a model directory records its own.

Two kinds, with one interface (`encode`, `encode_batch`, `decode`, `vocab_size`, `eod_id`):

    ByteTokenizer  UTF-8 bytes are ids 0..255; the end-of-document id is 256, so the vocabulary
                   is 257 (a model pads it to a multiple of 8). Needs nothing installed.
    HFTokenizer    a local tokenizer.json read by the `tokenizers` package (no download); its
                   end-of-document id is found among the usual token names or given.

`load_tokenizer(spec)` makes one from "bytes" or the path of a tokenizer.json.

A model directory (see `jax_packmamba.save_pretrained(..., tokenizer=)`) records its tokenizer
as Hugging Face does: config.json's "eos_token_id" is the end-of-document id, and either a
tokenizer.json sits beside config.json or config.json's "jax_packmamba" entry says
{"tokenizer": "bytes"}. `tokenizer_for_model_dir(path)` reads that back.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from jax_packmamba import run_layout

BYTES = "bytes"
BYTE_VOCAB = 257
BYTE_EOD = 256
# End-of-document token names of common tokenizers, tried in order.
EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
# config.json's entry for our own fields (jax_packmamba.pretrained reads and writes the rest).
EXTRA_KEY = "jax_packmamba"
EOS_KEY = "eos_token_id"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and an end-of-document id (256 unless given, never a byte)."""

    name = BYTES

    def __init__(self, eod_id: int | None = None):
        eod_id = BYTE_EOD if eod_id is None else eod_id
        if not isinstance(eod_id, (int, np.integer)) or isinstance(eod_id, bool) or eod_id < 256:
            raise ValueError(f"eod_id={eod_id!r} must be an int >= 256: ids 0..255 are the bytes")
        self._eod_id = int(eod_id)

    @property
    def eod_id(self) -> int:
        return self._eod_id

    @property
    def vocab_size(self) -> int:
        return max(BYTE_VOCAB, self._eod_id + 1)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """The text of the byte ids; ids >= 256 (the end of document) are dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local tokenizer.json through the `tokenizers` package.

    eod_id: the end-of-document id; None looks for one of EOD_NAMES in the vocabulary and is
    None when there is none (training needs one; generation can do without).
    """

    def __init__(self, path, eod_id: int | None = None):
        path = pathlib.Path(path)
        try:
            import tokenizers
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"reading the tokenizer {path} needs the `tokenizers` package "
                f"(pip install tokenizers)"
            ) from None
        if not path.is_file():
            raise ValueError(
                f"tokenizer path {path}: no such file (expected {BYTES!r} or a {TOKENIZER_FILE})"
            )
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise ValueError(f"tokenizer path {path}: cannot load: {e}") from None
        self.path = path
        self.name = str(path)
        if eod_id is None:
            found = (self._tokenizer.token_to_id(name) for name in EOD_NAMES)
            eod_id = next((i for i in found if i is not None), None)
        elif not isinstance(eod_id, (int, np.integer)) or isinstance(eod_id, bool) or eod_id < 0:
            raise ValueError(f"eod_id={eod_id!r} must be None or an int >= 0")
        self._eod_id = None if eod_id is None else int(eod_id)

    @property
    def eod_id(self) -> int | None:
        return self._eod_id

    @property
    def vocab_size(self) -> int:
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        return size if self._eod_id is None else max(size, self._eod_id + 1)

    def encode(self, text: str | bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts) -> list[np.ndarray]:
        strings = [
            t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts
        ]
        encodings = self._tokenizer.encode_batch(strings, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def load_tokenizer(spec, eod_id: int | None = None):
    """ByteTokenizer for spec "bytes", else HFTokenizer of the tokenizer.json at path `spec`."""
    if spec == BYTES:
        return ByteTokenizer(eod_id)
    if not isinstance(spec, (str, pathlib.Path)):
        raise ValueError(f"tokenizer spec must be {BYTES!r} or a path, got {spec!r}")
    return HFTokenizer(spec, eod_id)


def tokenizer_model_config(tokenizer) -> dict:
    """The config.json entries that record `tokenizer` in a model directory: "eos_token_id"
    and, for bytes, {"jax_packmamba": {"tokenizer": "bytes"}} (merged into that entry)."""
    entries = {EOS_KEY: tokenizer.eod_id}
    if isinstance(tokenizer, ByteTokenizer):
        entries[EXTRA_KEY] = {"tokenizer": BYTES}
    elif not isinstance(tokenizer, HFTokenizer):
        raise ValueError(
            f"tokenizer must be a ByteTokenizer or HFTokenizer, got {type(tokenizer).__name__}"
        )
    return entries


def save_tokenizer_files(tokenizer, path) -> None:
    """Copies an HFTokenizer's tokenizer.json into the model directory `path` (bytes need no
    file: config.json records them)."""
    if isinstance(tokenizer, HFTokenizer):
        target = pathlib.Path(path) / TOKENIZER_FILE
        if target.resolve() != tokenizer.path.resolve():
            shutil.copyfile(tokenizer.path, target)


def tokenizer_for_model_dir(path):
    """The tokenizer a model directory records (see the module docstring), None if none.

    The end-of-document id is config.json's "eos_token_id" when present. `path` may also be a
    training run or one of its checkpoints (jax_packmamba.run_layout.resolve_model_dir).
    """
    path = run_layout.resolve_model_dir(path)
    config_file = path / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: cannot read: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    eos = config.get(EOS_KEY)
    if isinstance(eos, list):  # transformers allows several; the first is the end of document
        eos = eos[0] if eos else None
    if (path / TOKENIZER_FILE).is_file():
        return HFTokenizer(path / TOKENIZER_FILE, eos)
    extra = config.get(EXTRA_KEY)
    if isinstance(extra, dict) and extra.get("tokenizer") == BYTES:
        return ByteTokenizer(eos)
    return None
