"""Checkpoints: parity with transformers' MambaForCausalLM and Mamba2ForCausalLM, both layouts,
save/load, bad files.

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
from tests.compiled import compiled

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
# float32 against float32: the Mamba1 reference scans sequentially, we scan in chunks; both
# Mamba2 scans are chunked SSD (chunk 16 or 8 here), with different contraction orders. Only
# rounding differs. Reached: max |diff| 4.2e-6 (Mamba1) and 5.7e-6 (Mamba2) on logits of
# magnitude up to ~7.4.
ATOL = RTOL = 1e-5
HF_FIXTURES = ["tied", "untied", "mamba2_tied", "mamba2_untied"]


def reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    n = len([k for k in ref.files if k.startswith("ids_")])
    return [(ref[f"ids_{i}"], ref[f"logits_{i}"]) for i in range(n)]


def assert_close_to_reference(logits, expected, what):
    diff = np.abs(np.asarray(logits) - expected)
    print(
        f"{what}: max abs diff {diff.max():.3g}, max diff / max |logit| "
        f"{diff.max() / np.abs(expected).max():.3g}"
    )
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=RTOL, err_msg=what)


def logits_of(model, ids, segment_ids=None):
    """model(ids, segment_ids), compiled once per model structure and shape at CPU's fast
    compile (tests/compiled.py) rather than run op by op."""
    graphdef, params = nnx.split(model)
    args = (params, jnp.asarray(ids, jnp.int32), segment_ids)

    def forward(params, ids, segment_ids):
        return nnx.merge(graphdef, params)(ids, segment_ids)

    return compiled(("logits_of", graphdef), forward, *args)(*args)


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_hf_checkpoint_matches_transformers_logits(name):
    model = jp.from_pretrained(FIXTURES / name)
    assert type(model) is (jp.Mamba2LM if name.startswith("mamba2") else jp.MambaLM)
    assert model.config.tie_embeddings == (not name.endswith("untied"))
    if name.startswith("mamba2"):  # several heads in two groups
        assert model.config.ngroups == 2 and model.config.nheads in (4, 6)
    for i, (ids, expected) in enumerate(reference(name)):
        logits = logits_of(model, ids[None])[0]
        assert_close_to_reference(logits, expected, f"{name} sequence {i} (length {len(ids)})")


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_packed_batch_matches_each_sequence_alone_in_transformers(name):
    model = jp.from_pretrained(FIXTURES / name)
    pairs = reference(name)
    batch = jp.pack_sequences([ids for ids, _ in pairs], length=128)
    assert batch.num_rows == 1 and batch.efficiency < 1  # all in one row, padding at the end
    logits = logits_of(model, batch.tokens, jnp.asarray(batch.segment_ids))
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
        logits = logits_of(model, ids[None])[0]
        assert_close_to_reference(logits, expected, f"state-spaces sequence {i}")


def test_state_spaces_mamba2_layout_matches_transformers_logits(tmp_path):
    # mamba2-* names and config: ssm_cfg {"layer": "Mamba2", ...} with mamba_ssm's defaults for
    # the rest (d_conv 4, expand 2), vocab_size 53 padded to a multiple of 16 = 64 rows, and
    # lm_head.weight stored although tied.
    model = jp.from_pretrained(FIXTURES / "mamba2_state_spaces")
    assert isinstance(model, jp.Mamba2LM)
    config = model.config
    assert (config.vocab_size, config.pad_vocab_size_multiple, config.padded_vocab_size) == (
        53,
        16,
        64,
    )
    assert (config.nheads, config.headdim, config.ngroups, config.d_state, config.chunk_size) == (
        4,
        16,
        2,
        8,
        16,
    )
    for i, (ids, expected) in enumerate(reference("mamba2_tied")):
        logits = logits_of(model, ids[None])[0]
        assert_close_to_reference(logits, expected, f"mamba2 state-spaces sequence {i}")


def test_state_spaces_mamba2_D_per_channel(tmp_path):
    # mamba_ssm's D_has_hdim: D is (d_inner,), one per channel. The per-head D repeated over each
    # head's channels computes the same function.
    d = tmp_path / "ss2"
    shutil.copytree(FIXTURES / "mamba2_state_spaces", d)
    edit_config(
        d, ssm_cfg={**json.loads((d / "config.json").read_text())["ssm_cfg"], "D_has_hdim": True}
    )
    edit_tensors(
        d, lambda t: t.update({n: np.repeat(v, 16) for n, v in t.items() if n.endswith("mixer.D")})
    )
    model = jp.from_pretrained(d)
    assert model.config.D_has_hdim and model.layer(0).mixer.D[...].shape == (64,)
    ids, expected = reference("mamba2_tied")[3]
    assert_close_to_reference(logits_of(model, ids[None])[0], expected, "D per channel")


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
    assert_close_to_reference(logits_of(model, ids[None])[0], expected, "from .bin")


def test_pytorch_bin_without_torch_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match="needs torch"):
        jp.from_pretrained(bin_only_copy(tmp_path))


def test_save_pretrained_round_trip(tmp_path):
    config = jp.MambaConfig.preset(
        "tiny", d_model=24, vocab_size=61, tie_embeddings=False, proj_bias=True, d_conv=3, dt_rank=5
    )
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    jp.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf["model_type"], hf["vocab_size"], hf["hidden_size"], hf["tie_word_embeddings"]) == (
        "mamba",
        64,
        24,
        False,
    )
    names = load_file(tmp_path / "out" / "model.safetensors")
    assert set(names) == set(pretrained.tensor_names(config))
    assert names["backbone.layers.0.mixer.conv1d.weight"].shape == (48, 1, 3)
    loaded = jp.from_pretrained(tmp_path / "out")
    assert loaded.config == config
    for (path, a), b in zip(
        jax.tree.leaves_with_path(nnx.state(model, nnx.Param)),
        jax.tree.leaves(nnx.state(loaded, nnx.Param)),
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    ids = jnp.asarray([[1, 5, 60, 7, 2]], jnp.int32)
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(loaded, ids))
    bf16 = jp.from_pretrained(tmp_path / "out", dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16" and logits_of(bf16, ids).dtype == jnp.bfloat16


def test_save_pretrained_round_trip_mamba2(tmp_path):
    config = jp.Mamba2Config.preset(
        "tiny",
        d_model=32,
        headdim=8,
        ngroups=2,
        d_state=4,
        d_conv=3,
        vocab_size=61,
        tie_embeddings=False,
        proj_bias=True,
        chunk_size=8,
        A_init_range=(2.0, 8.0),
    )
    model = jp.Mamba2LM(config, rngs=nnx.Rngs(0))
    jp.save_pretrained(model, tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        hf["architectures"],
        hf["model_type"],
        hf["vocab_size"],
        hf["num_heads"],
        hf["head_dim"],
        hf["n_groups"],
        hf["chunk_size"],
        hf["tie_word_embeddings"],
    ) == (["Mamba2ForCausalLM"], "mamba2", 64, 8, 8, 2, 8, False)  # 61 padded to a multiple of 16
    names = load_file(tmp_path / "out" / "model.safetensors")
    assert set(names) == set(pretrained.tensor_names(config))
    assert names["backbone.layers.0.mixer.conv1d.weight"].shape == (64 + 2 * 2 * 4, 1, 3)
    assert names["backbone.layers.1.mixer.in_proj.weight"].shape == (64 + 80 + 8, 32)
    loaded = jp.from_pretrained(tmp_path / "out")
    assert isinstance(loaded, jp.Mamba2LM) and loaded.config == config
    for (path, a), b in zip(
        jax.tree.leaves_with_path(nnx.state(model, nnx.Param)),
        jax.tree.leaves(nnx.state(loaded, nnx.Param)),
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    ids = jnp.asarray([[1, 5, 60, 7, 2, 9, 9, 3, 4, 8, 1]], jnp.int32)
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(loaded, ids))
    runtime = jp.from_pretrained(
        tmp_path / "out",
        dtype="bfloat16",
        scan_impl="reference",
        conv_impl="xla",
        remat=True,
        scan_layers=True,
    )
    assert (
        runtime.config.dtype,
        runtime.config.scan_impl,
        runtime.config.conv_impl,
        runtime.config.remat,
        runtime.config.scan_layers,
    ) == ("bfloat16", "reference", "xla", "full", True)  # True: "full"
    with pytest.raises(ValueError, match=r"scan_layers must be one of \(False, True\), got 1"):
        jp.from_pretrained(tmp_path / "out", scan_layers=1)
    assert logits_of(runtime, ids).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"scan_impl must be one of .*'reference'.*, got 'ssd'"):
        jp.from_pretrained(tmp_path / "out", scan_impl="ssd")
    with pytest.raises(
        ValueError,
        match=r"remat must be one of \('none', 'full', 'save_matmul_outputs', 'save_kernel_outputs', 'save_projections_and_scan', 'save_projections_scan_and_states', False, True\), got 'yes'",
    ):
        jp.from_pretrained(tmp_path / "out", remat="yes")
    with pytest.raises(ValueError, match=r"only override .*\['headdim'\]"):
        jp.from_pretrained(tmp_path / "out", headdim=16)


@pytest.mark.parametrize(
    "config",
    [
        jp.MambaConfig.preset("tiny", n_layer=3, d_model=16, d_state=4),
        jp.Mamba2Config.preset("tiny", n_layer=3, d_model=16, d_state=4, headdim=8),
    ],
)
@pytest.mark.parametrize("layout", pretrained.LAYOUTS)
def test_per_layer_tensors_are_the_stacked_parameters_layer_by_layer(config, layout):
    """The model holds its blocks stacked on a layer axis; checkpoints hold them one by one:
    layer i's tensors are block i's parameters, and reading them back restacks them."""
    model = jp.MambaLM(config, rngs=nnx.Rngs(3))
    tensors = pretrained.tensors_from_model(model, layout)
    for i in range(config.n_layer):
        block = model.layer(i)
        prefix = f"backbone.layers.{i}."
        np.testing.assert_array_equal(tensors[prefix + "mixer.A_log"], block.mixer.A_log[...])
        np.testing.assert_array_equal(tensors[prefix + "norm.weight"], block.norm.weight[...])
        np.testing.assert_array_equal(
            tensors[prefix + "mixer.out_proj.weight"],
            np.asarray(block.mixer.out_proj.kernel[...]).T,
        )
    loaded = pretrained.model_from_tensors(config, tensors, layout=layout)
    for (path, a), b in zip(
        jax.tree.leaves_with_path(nnx.state(model, nnx.Param)),
        jax.tree.leaves(nnx.state(loaded, nnx.Param)),
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_save_pretrained_refuses_what_transformers_cannot_load(tmp_path):
    model = nnx.eval_shape(
        lambda: jp.Mamba2LM(jp.Mamba2Config.preset("tiny", D_has_hdim=True), rngs=nnx.Rngs(0))
    )
    with pytest.raises(
        ValueError, match="D_has_hdim=True .* has no Hugging Face Mamba2 equivalent"
    ):
        jp.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_and_bfloat16_safetensors(tmp_path):
    tensors = load_file(FIXTURES / "tied" / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    shutil.copy(FIXTURES / "tied" / "config.json", tmp_path)
    for shard, shard_names in shards.items():
        # bfloat16 on disk, as many released checkpoints are; we load float32.
        save_file(
            {n: tensors[n].astype(jnp.bfloat16) for n in shard_names},
            tmp_path / shard,
            metadata={"format": "pt"},
        )
    index = {"weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = jp.from_pretrained(tmp_path)
    emb = model.embedding.embedding[...]
    assert emb.dtype == jnp.float32
    expected = tensors["backbone.embeddings.weight"].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(emb, expected)
    ids, ref_logits = reference("tied")[3]
    np.testing.assert_allclose(logits_of(model, ids[None])[0], ref_logits, atol=0.3)  # bf16 weights

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
    with pytest.raises(
        ValueError, match=r"unexpected tensors \[backbone\.layers\.0\.mixer\.extra\]"
    ):
        jp.from_pretrained(d)
    # A config with fewer layers than the file.
    d = hf_copy(tmp_path / "c")
    edit_config(d, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors \[backbone\.layers\.1\.mixer\.A_log"):
        jp.from_pretrained(d)


def test_shape_and_config_mismatches_are_named(tmp_path):
    d = hf_copy(tmp_path)
    edit_config(d, state_size=16)
    with pytest.raises(
        ValueError,
        match=r"backbone\.layers\.0\.mixer\.A_log: expected torch shape \(64, 16\), got \(64, 8\)",
    ):
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
    edit_config(d, ssm_cfg={"layer": "Mamba4"})
    with pytest.raises(
        ValueError,
        match="ssm_cfg.layer='Mamba4' is not supported; only 'Mamba1', 'Mamba2' and 'Mamba3'",
    ):
        jp.from_pretrained(d)
    edit_config(d, ssm_cfg={"layer": "Mamba3"})  # a Mamba1 checkpoint's tensors
    with pytest.raises(ValueError, match="does not match the state-spaces layout of this Mamba3"):
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
    with pytest.raises(ValueError, match="neither a Hugging Face Mamba or Mamba2 config"):
        jp.from_pretrained(tmp_path)
    shutil.copy(FIXTURES / "tied" / "config.json", tmp_path)
    with pytest.raises(ValueError, match="holds no weights: expected one of model.safetensors"):
        jp.from_pretrained(tmp_path)


# Issue 17 finding 6: each bad config.json or weights file is one ValueError that names the file,
# the field, the value and what was expected, raised before anything is built from it.


@pytest.mark.parametrize("name", ["tied", "mamba2_tied"])
def test_wrong_json_type_names_field_value_and_type(tmp_path, name):
    d = hf_copy(tmp_path, name)
    original = (d / "config.json").read_text()
    for field, value, expected in [
        ("hidden_size", "64", 'a positive integer, got "64" (a string)'),
        ("num_hidden_layers", 2.0, "a positive integer, got 2.0 (a number)"),
        ("state_size", True, "a positive integer, got true (a boolean)"),
        ("use_bias", "false", 'true or false, got "false" (a string)'),
        ("layer_norm_epsilon", "1e-5", 'a positive number, got "1e-5" (a string)'),
        ("time_step_rank", "two", 'a positive integer or "auto", got "two" (a string)'),
    ]:
        edit_config(d, **{field: value})
        with pytest.raises(ValueError) as e:
            jp.from_pretrained(d)
        assert str(e.value) == f"{d / 'config.json'}: {field} must be {expected}"
        (d / "config.json").write_text(original)
    jp.from_pretrained(d)  # restored


def test_wrong_json_type_in_state_spaces_config(tmp_path):
    d = tmp_path / "ss"
    shutil.copytree(FIXTURES / "mamba2_state_spaces", d)
    ssm_cfg = json.loads((d / "config.json").read_text())["ssm_cfg"]
    edit_config(d, d_model="32")
    with pytest.raises(
        ValueError,
        match=r'config\.json: d_model must be a positive integer, got "32" \(a string\)$',
    ):
        jp.from_pretrained(d)
    edit_config(d, d_model=32, ssm_cfg={**ssm_cfg, "ngroups": "2"})
    with pytest.raises(
        ValueError, match=r'ssm_cfg\.ngroups must be a positive integer, got "2" \(a string\)$'
    ):
        jp.from_pretrained(d)
    edit_config(d, ssm_cfg={**ssm_cfg, "A_init_range": [1, "16"]})
    with pytest.raises(
        ValueError, match=r'ssm_cfg\.A_init_range must be a list of two numbers, got \[1, "16"\]'
    ):
        jp.from_pretrained(d)
    edit_config(d, ssm_cfg="Mamba2")
    with pytest.raises(
        ValueError, match=r'ssm_cfg must be a JSON object, got "Mamba2" \(a string\)'
    ):
        jp.from_pretrained(d)


@pytest.mark.parametrize(
    "name, field",
    [
        ("tied", "state_size"),
        ("tied", "conv_kernel"),
        ("mamba2_tied", "state_size"),
        ("mamba2_tied", "n_groups"),
        ("mamba2_tied", "head_dim"),
    ],
)
def test_missing_shape_field_is_named_not_defaulted(tmp_path, name, field):
    # transformers would use its default (state_size 16 for Mamba1, n_groups 8 for Mamba2),
    # which the weights contradict; we never guess a field that fixes tensor shapes.
    d = hf_copy(tmp_path, name)
    config = json.loads((d / "config.json").read_text())
    del config[field]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"config\.json: required field {field} missing \(it fixes tensor shapes"
    ):
        jp.from_pretrained(d)


def test_state_spaces_defaults_that_disagree_with_the_weights_are_named(tmp_path):
    # A mamba2-* config leaves ssm_cfg fields to mamba_ssm's defaults, as released ones do;
    # here d_state 8 is left out, so 128 applies and the tensors contradict it.
    d = tmp_path / "ss"
    shutil.copytree(FIXTURES / "mamba2_state_spaces", d)
    ssm_cfg = json.loads((d / "config.json").read_text())["ssm_cfg"]
    del ssm_cfg["d_state"]
    edit_config(d, ssm_cfg=ssm_cfg)
    with pytest.raises(
        ValueError,
        match=r"in_proj\.weight: expected torch shape \(644, 32\), got \(164, 32\).*"
        r"does not set these shape fields, so defaults were used: .*ssm_cfg\.d_state=128 \(mamba_ssm's default\)",
    ):
        jp.from_pretrained(d)


def test_mamba2_hf_config_without_tie_word_embeddings_uses_transformers_default_and_says_so(
    tmp_path,
):
    d = hf_copy(tmp_path, "mamba2_tied")  # tied, so no lm_head.weight in the file
    config = json.loads((d / "config.json").read_text())
    del config["tie_word_embeddings"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"missing tensors \[lm_head\.weight\].*tie_word_embeddings=false "
        r"\(transformers' default\)",
    ):
        jp.from_pretrained(d)


@pytest.mark.parametrize("name", ["tied", "mamba2_tied"])
@pytest.mark.parametrize("keep", [0.5, 0.001])  # within the data; within the header
def test_truncated_safetensors_names_the_file(tmp_path, name, keep):
    d = hf_copy(tmp_path, name)
    file = d / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError) as e:
        jp.from_pretrained(d)
    assert str(e.value).startswith(
        f"{file} cannot be read as safetensors, it may be truncated or damaged: "
    ), e.value


def test_truncated_shard_index_names_the_file(tmp_path):
    d = hf_copy(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        jp.from_pretrained(d)


def test_bad_mamba2_configs(tmp_path):
    d = hf_copy(tmp_path, "mamba2_tied")
    edit_config(d, num_heads=8)
    with pytest.raises(
        ValueError,
        match=r"num_heads \* head_dim = 8 \* 16 must equal expand \* hidden_size = 2 \* 32",
    ):
        jp.from_pretrained(d)
    edit_config(d, num_heads=4, time_step_limit=[0.0, 0.5])
    with pytest.raises(
        ValueError, match=r"time_step_limit=\[0.0, 0.5\] \(a clamp on dt\) is not supported"
    ):
        jp.from_pretrained(d)
    edit_config(d, time_step_limit=[0.0, {"__float__": "Infinity"}], model_type="mamba3")
    with pytest.raises(
        ValueError, match="model_type must be 'mamba' .* or 'mamba2' .*, got 'mamba3'"
    ):
        jp.from_pretrained(d)
    edit_config(d, model_type="mamba2", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        jp.from_pretrained(d)
    edit_config(d, hidden_act="silu")
    jp.from_pretrained(d)  # undone, with transformers' spelling of infinity

    s = tmp_path / "ss"
    shutil.copytree(FIXTURES / "mamba2_state_spaces", s)
    ssm_cfg = json.loads((s / "config.json").read_text())["ssm_cfg"]
    for key, value, message in [
        ("norm_before_gate", True, "ssm_cfg.norm_before_gate=true is not supported"),
        ("d_ssm", 32, "ssm_cfg.d_ssm=32 is not supported"),
        ("dt_limit", [0.0, 1.0], r"ssm_cfg.dt_limit=\[0.0, 1.0\] is not supported"),
        ("x_proj", 1, r"unsupported ssm_cfg keys \['x_proj'\] for layer 'Mamba2'"),
    ]:
        edit_config(s, ssm_cfg={**ssm_cfg, key: value})
        with pytest.raises(ValueError, match=message):
            jp.from_pretrained(s)
    edit_config(s, ssm_cfg={**ssm_cfg, "d_ssm": 64, "rmsnorm": True, "use_mem_eff_path": False})
    jp.from_pretrained(s)  # the values that mean what we compute are accepted
