"""Mamba-3 checkpoints in mamba_ssm's state-spaces layout: save, load, same function; the names
and shapes mamba_ssm's Mamba3 module gives its parameters; config errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.pretrained import tensor_names, tensors_from_model


def test_mamba3_round_trip(tmp_path):
    """Untied, MIMO, with the gated out-norm and the MLP: every optional tensor."""
    config = jp.Mamba3Config.preset(
        "tiny",
        n_layer=2,
        d_model=32,
        d_state=8,
        d_intermediate=64,
        is_outproj_norm=True,
        tie_embeddings=False,
        is_mimo=True,
        mimo_rank=2,
        chunk_size=4,
    )
    model = jp.LM(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert sum(a.size for a in jax.tree.leaves(params)) == config.num_params()
    # Parameters away from their initial values, so that a swapped or dropped tensor shows.
    graph, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.standard_normal(a.shape) * 0.1 + a, a.dtype) for a in leaves]
    model = nnx.merge(graph, jax.tree.unflatten(tree, leaves))
    jp.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ssm_cfg"]["layer"] == "Mamba3" and saved["d_intermediate"] == 64
    loaded = jp.from_pretrained(tmp_path)
    assert loaded.config == config
    ids = jnp.asarray(rng.integers(0, 256, (1, 13)), jnp.int32)
    np.testing.assert_array_equal(model(ids), loaded(ids))

    tensors = tensors_from_model(model, "state-spaces")
    h, n, d = config.nheads, config.d_state, config.d_model
    # mamba_ssm's shapes: in_proj (d_in_proj, d) rows [z, x, B, C, dd_dt, dd_A, trap, angles].
    shapes = {
        "backbone.layers.0.mixer.in_proj.weight": (2 * 64 + 2 * 2 * n + 3 * h + n // 4, d),
        "backbone.layers.0.mixer.B_bias": (h, 2, n),
        "backbone.layers.0.mixer.mimo_o": (h, 2, 16),
        "backbone.layers.0.mixer.C_norm.weight": (n,),
        "backbone.layers.0.mlp.fc1.weight": (2 * 128, d),  # 64 rounded up to 128
        "backbone.layers.1.norm2.weight": (d,),
    }
    for name, shape in shapes.items():
        assert tensors[name].shape == shape, name
    assert set(tensors) == set(tensor_names(config, "state-spaces"))
    assert "backbone.layers.0.mixer.norm.weight" in tensors and "lm_head.weight" in tensors


def test_mamba3_config_errors(tmp_path):
    config = dict(
        d_model=32, n_layer=1, vocab_size=256, ssm_cfg={"layer": "Mamba3", "is_mimo": "yes"}
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is_mimo"):
        jp.from_pretrained(tmp_path)
    config["ssm_cfg"] = {"layer": "Mamba3", "d_conv": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported ssm_cfg keys \['d_conv'\]"):
        jp.from_pretrained(tmp_path)


PARITY = Path(__file__).parent / "fixtures" / "parity"


@pytest.mark.parametrize("name", ["mamba3_siso", "mamba3_mimo"])
def test_mamba3_mixer_matches_mamba_ssm(name):
    """One mixer with mamba_ssm's random weights: our packed output (segment ids) against its
    kernels (Triton; tilelang for MIMO) run on each sequence alone and on the packed row with
    cu_seqlens."""
    from safetensors.numpy import load_file

    fixture = PARITY / name
    if not (fixture / "reference.npz").exists():
        pytest.skip("no fixture: run scripts/make_mamba3_parity_fixtures.py on a GPU machine")
    kwargs = json.loads((fixture / "config.json").read_text())
    config = jp.Mamba3Config(
        is_mimo=kwargs.get("is_mimo", False),
        mimo_rank=kwargs.get("mimo_rank", 4),
        d_model=kwargs["d_model"],
        d_state=kwargs["d_state"],
        expand=kwargs["expand"],
        headdim=kwargs["headdim"],
        ngroups=kwargs["ngroups"],
        chunk_size=kwargs["chunk_size"],
        n_layer=1,
        vocab_size=16,
    )
    mixer = jp.Mamba3Mixer(config, rngs=nnx.Rngs(0))
    weights = load_file(str(fixture / "weights.safetensors"))
    for name, array in weights.items():
        *path, leaf = name.split(".")
        owner = mixer
        for part in path:
            owner = getattr(owner, part)
        value = array.T if leaf == "weight" and path[-1:] in (["in_proj"], ["out_proj"]) else array
        attribute = "kernel" if path[-1:] in (["in_proj"], ["out_proj"]) else leaf
        getattr(owner, attribute)[...] = jnp.asarray(value)
    ref = np.load(fixture / "reference.npz")
    lengths = ref["lengths"]
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
    out, _ = mixer(jnp.asarray(ref["u"]), seg)
    # Their kernels multiply in TF32 / bfloat16; ours in float32.
    from tests.loops import rel_err

    assert rel_err(out, ref["out"]) < 2e-2
    assert rel_err(out, ref["out_packed"]) < 2e-2
