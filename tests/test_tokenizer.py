"""Tokenizers: bytes and tokenizer.json, and the record a model directory keeps of its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.generation import generate
from jax_packmamba.pretrained import save_pretrained
from jax_packmamba.tokenizer import (
    BYTE_EOD,
    BYTE_VOCAB,
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    tokenizer_for_model_dir,
)

tokenizers = pytest.importorskip("tokenizers")


def word_tokenizer(path, words):
    """A tokenizer.json of whitespace-separated words, id = position in `words`."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_byte_tokenizer_round_trip_and_end_of_document():
    tok = ByteTokenizer()
    assert (tok.eod_id, tok.vocab_size) == (BYTE_EOD, BYTE_VOCAB) == (256, 257)
    ids = tok.encode("héllo")
    assert ids.dtype == np.int32 and ids.tolist() == list("héllo".encode())
    assert tok.decode([*ids, 256, 300]) == "héllo"  # ids >= 256 are dropped
    assert [x.tolist() for x in tok.encode_batch([b"ab", "c"])] == [[97, 98], [99]]
    assert ByteTokenizer(eod_id=300).vocab_size == 301
    with pytest.raises(ValueError, match=r"eod_id=5 must be an int >= 256"):
        ByteTokenizer(eod_id=5)


def test_hf_tokenizer_finds_or_takes_the_end_of_document_id(tmp_path):
    path = word_tokenizer(tmp_path / "tokenizer.json", ["[UNK]", "</s>", "hello", "world"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.eod_id == 1 and tok.vocab_size == 4
    assert tok.encode("hello world zzz").tolist() == [2, 3, 0]
    assert tok.decode([2, 3]) == "hello world"
    assert load_tokenizer(path, eod_id=9).vocab_size == 10
    no_eod = word_tokenizer(tmp_path / "plain.json", ["[UNK]", "a"])
    assert load_tokenizer(no_eod).eod_id is None
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: cannot load"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="tokenizer spec must be 'bytes' or a path, got 3"):
        load_tokenizer(3)


def test_model_directory_records_its_tokenizer(tmp_path):
    model = jp.MambaLM(jp.MambaConfig.preset("tiny", d_model=16, vocab_size=257), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "plain")
    assert tokenizer_for_model_dir(tmp_path / "plain") is None

    save_pretrained(model, tmp_path / "bytes", tokenizer=ByteTokenizer())
    config = json.loads((tmp_path / "bytes" / "config.json").read_text())
    assert config["eos_token_id"] == 256 and config["jax_packmamba"]["tokenizer"] == "bytes"
    assert config["jax_packmamba"]["vocab_size"] == 257  # the model's own entries are kept
    tok = tokenizer_for_model_dir(tmp_path / "bytes")
    assert isinstance(tok, ByteTokenizer) and tok.eod_id == 256
    np.testing.assert_array_equal(  # still loads as the same model
        nnx.state(jp.from_pretrained(tmp_path / "bytes"))["norm_f"]["weight"][...],
        nnx.state(model)["norm_f"]["weight"][...],
    )

    words = word_tokenizer(tmp_path / "words.json", ["[UNK]", "a", "<|endoftext|>"])
    save_pretrained(model, tmp_path / "hf", tokenizer=load_tokenizer(words))
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == words.read_bytes()
    tok = tokenizer_for_model_dir(tmp_path / "hf")
    assert isinstance(tok, HFTokenizer) and tok.eod_id == 2
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 2

    small = jp.MambaLM(jp.MambaConfig.preset("tiny", d_model=16), rngs=nnx.Rngs(0))  # 256 ids
    with pytest.raises(ValueError, match="has 257 ids .* but the model only 256 embedding rows"):
        save_pretrained(small, tmp_path / "small", tokenizer=ByteTokenizer())
    assert not (tmp_path / "small").exists()


def test_generate_command_line_uses_the_recorded_tokenizer_and_eos(tmp_path, capsys):
    from jax_packmamba.generate import main

    config = jp.MambaConfig.preset("tiny", d_model=32, vocab_size=64, pad_vocab_size_multiple=1)
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    words = [f"w{i}" for i in range(64)]
    prompt = "w5 w9 w3"
    # Sampled (a random model's greedy output repeats one token), seeded like the CLI below.
    free = generate(model, [[5, 9, 3]], 8, temperature=1.0, seed=1)[0]
    assert len(set(free.tolist())) == 8 and not {5, 9, 3} & set(free.tolist())
    eos = int(free[2])
    first = 2
    words[eos] = "</s>"
    save_pretrained(
        model, tmp_path, tokenizer=load_tokenizer(word_tokenizer(tmp_path / "t.json", words))
    )
    args = [
        "--checkpoint",
        str(tmp_path),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
        "--temperature",
        "1",
        "--seed",
        "1",
        "--no-compilation-cache",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    expected = " ".join([prompt, *(words[i] for i in free[: first + 1])])
    assert out.out.splitlines() == [f"--- {prompt!r}", expected]
    assert out.err.splitlines()[-1].startswith(f"{first + 1} tokens in")
    # --eos-id overrides the recorded one (an id never generated: all 8 tokens).
    assert main(args + ["--eos-id", str(next(i for i in range(64) if i not in free))]) == 0
    assert capsys.readouterr().err.splitlines()[-1].startswith("8 tokens in")
