"""Checkpoints: parity with transformers' MambaForCausalLM, both layouts, save/load, bad files.

The reference logits in tests/fixtures/parity were computed by transformers in float32 (see
scripts/make_parity_fixtures.py); these tests need no torch.
"""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jax_packmamba as jp
from jax_packmamba import pretrained

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
# float32 against float32: the reference scans sequentially, we scan in chunks, so only
# rounding differs. Reached: max |diff| ~5e-6 on logits of magnitude up to ~7.
ATOL = RTOL = 1e-5


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    n = len([k for k in ref.files if k.startswith("ids_")])
    return [(ref[f"ids_{i}"], ref[f"logits_{i}"]) for i in range(n)]


def assert_close_to_reference(logits, expected, what):
    diff = np.abs(np.asarray(logits) - expected)
    print(f"{what}: max abs diff {diff.max():.3g}, max diff / max |logit| "
          f"{diff.max() / np.abs(expected).max():.3g}")
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=RTOL, err_msg=what)


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_hf_checkpoint_matches_transformers_logits(name):
    model = jp.from_pretrained(FIXTURES / name)
    assert model.config.tie_embeddings == (name == "tied")
    for i, (ids, expected) in enumerate(reference(name)):
        logits = model(jnp.asarray(ids[None], jnp.int32))[0]
        assert_close_to_reference(logits, expected, f"{name} sequence {i} (length {len(ids)})")


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_packed_batch_matches_each_sequence_alone_in_transformers(name):
    model = jp.from_pretrained(FIXTURES / name)
    pairs = reference(name)
    batch = jp.pack_sequences([ids for ids, _ in pairs], length=128)
    assert batch.num_rows == 1 and batch.efficiency < 1  # all in one row, padding at the end
    logits = model(jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids))
    for i, (got, (_, expected)) in enumerate(zip(jp.unpack(batch, logits), pairs)):
        assert_close_to_reference(got, expected, f"{name} packed sequence {i}")


def test_state_spaces_layout_matches_transformers_logits(tmp_path):
    # The original names (backbone.embedding, lm_head.weight stored although tied) and config
    # (d_model, ssm_cfg, pad_vocab_size_multiple), read from a safetensors file: no torch.
    directory = tmp_path / "ss"
    directory.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "state_spaces" / f, directory)
    model = jp.from_pretrained(directory)
    assert model.config.d_state == 8 and model.config.pad_vocab_size_multiple == 8
    for i, (ids, expected) in enumerate(reference("tied")):
        logits = model(jnp.asarray(ids[None], jnp.int32))[0]
        assert_close_to_reference(logits, expected, f"state-spaces sequence {i}")


def bin_only_copy(tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    for f in ("config.json", "pytorch_model.bin"):
        shutil.copy(FIXTURES / "state_spaces" / f, directory)
    return directory


def test_state_spaces_pytorch_bin_with_torch(tmp_path):
    pytest.importorskip("torch")
    model = jp.from_pretrained(bin_only_copy(tmp_path))
    ids, expected = reference("tied")[2]
    assert_close_to_reference(model(jnp.asarray(ids[None], jnp.int32))[0], expected, "from .bin")


def test_pytorch_bin_without_torch_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match="needs torch"):
        jp.from_pretrained(bin_only_copy(tmp_path))


def test_save_pretrained_round_trip(tmp_path):
    config = jp.MambaConfig.preset("tiny", d_model=24, vocab_size=61, tie_embeddings=False,
                                   proj_bias=True, d_conv=3, dt_rank=5)
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    jp.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf["model_type"], hf["vocab_size"], hf["hidden_size"], hf["tie_word_embeddings"]) == (
        "mamba", 64, 24, False)
    names = load_file(tmp_path / "out" / "model.safetensors")
    assert set(names) == set(pretrained.tensor_names(config))
    assert names["backbone.layers.0.mixer.conv1d.weight"].shape == (48, 1, 3)
    loaded = jp.from_pretrained(tmp_path / "out")
    assert loaded.config == config
    for (path, a), b in zip(jax.tree.leaves_with_path(nnx.state(model, nnx.Param)),
                            jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    ids = jnp.asarray([[1, 5, 60, 7, 2]], jnp.int32)
    np.testing.assert_array_equal(model(ids), loaded(ids))
    bf16 = jp.from_pretrained(tmp_path / "out", dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16" and bf16(ids).dtype == jnp.bfloat16


def test_sharded_and_bfloat16_safetensors(tmp_path):
    tensors = load_file(FIXTURES / "tied" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    shutil.copy(FIXTURES / "tied" / "config.json", tmp_path)
    for shard, shard_names in shards.items():
        # bfloat16 on disk, as many released checkpoints are; we load float32.
        save_file({n: tensors[n].astype(jnp.bfloat16) for n in shard_names}, tmp_path / shard,
                  metadata={"format": "pt"})
    index = {"weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = jp.from_pretrained(tmp_path)
    emb = model.embedding.embedding[...]
    assert emb.dtype == jnp.float32
    expected = tensors["backbone.embeddings.weight"].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(emb, expected)
    ids, ref_logits = reference("tied")[3]
    np.testing.assert_allclose(model(jnp.asarray(ids[None]))[0], ref_logits, atol=0.3)  # bf16 weights

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors, which is missing"):
        jp.from_pretrained(tmp_path)


def hf_copy(tmp_path, name="tied"):
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    return directory


def edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    d = hf_copy(tmp_path)
    edit_tensors(d, lambda t: t.pop("backbone.layers.1.mixer.A_log"))
    with pytest.raises(ValueError, match=r"missing tensors \[backbone\.layers\.1\.mixer\.A_log\]"):
        jp.from_pretrained(d)
    d = hf_copy(tmp_path / "b")
    edit_tensors(d, lambda t: t.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \[backbone\.layers\.0\.mixer\.extra\]"):
        jp.from_pretrained(d)
    # A config with fewer layers than the file.
    d = hf_copy(tmp_path / "c")
    edit_config(d, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors \[backbone\.layers\.1\.mixer\.A_log"):
        jp.from_pretrained(d)


def test_shape_and_config_mismatches_are_named(tmp_path):
    d = hf_copy(tmp_path)
    edit_config(d, state_size=16)
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.A_log: expected torch shape \(64, 16\), got \(64, 8\)"):
        jp.from_pretrained(d)
    edit_config(d, state_size=8, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        jp.from_pretrained(d)
    edit_config(d, hidden_act="silu", intermediate_size=100)
    with pytest.raises(ValueError, match="intermediate_size=100 must equal expand"):
        jp.from_pretrained(d)
    edit_config(d, intermediate_size=64)
    with pytest.raises(ValueError, match=r"only override .*\['d_model'\]"):
        jp.from_pretrained(d, d_model=64)
    jp.from_pretrained(d)  # the edits were undone: loads again


def test_bad_state_spaces_configs_and_tied_head(tmp_path):
    d = tmp_path / "ss"
    shutil.copytree(FIXTURES / "state_spaces", d)
    (d / "pytorch_model.bin").unlink()
    edit_config(d, ssm_cfg={"layer": "Mamba2"})
    with pytest.raises(ValueError, match="ssm_cfg.layer='Mamba2' is not supported"):
        jp.from_pretrained(d)
    edit_config(d, ssm_cfg={"d_state": 8, "ngroups": 2})
    with pytest.raises(ValueError, match=r"unsupported ssm_cfg keys \['ngroups'\]"):
        jp.from_pretrained(d)
    edit_config(d, ssm_cfg={"d_state": 8}, d_intermediate=128)
    with pytest.raises(ValueError, match="d_intermediate=128"):
        jp.from_pretrained(d)
    edit_config(d, d_intermediate=0)
    edit_tensors(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from backbone.embedding.weight"):
        jp.from_pretrained(d)


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        jp.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        jp.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 3}))
    with pytest.raises(ValueError, match="neither a Hugging Face Mamba config"):
        jp.from_pretrained(tmp_path)
    shutil.copy(FIXTURES / "tied" / "config.json", tmp_path)
    with pytest.raises(ValueError, match="holds no weights: expected one of model.safetensors"):
        jp.from_pretrained(tmp_path)
