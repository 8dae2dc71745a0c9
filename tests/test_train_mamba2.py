"""Training Mamba2 through the training program: the presets, the step, a run with resume.
The Mamba1 training tests are test_train.py."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jax_packmamba import Mamba2Config, MambaConfig
from jax_packmamba.config import MAMBA2_PRESETS
from tests.test_train import stdlib_texts
from train import data as data_lib
from train import sharding
from train import step as step_lib
from train.__main__ import main
from train.config import ConfigError, MeshConfig, OptimConfig, TrainConfig, parse_args
from train.metrics import read_metrics

# As test_train.TINY, on mamba2-tiny: 1 layer, d_model 32 (4 heads of 16), d_state 4.
TINY2 = [
    "--model.preset=mamba2-tiny",
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.d_state=4",
    "--data.max_documents=24",
    "--data.seq_len=64",
    "--data.batch_size=4",
    "--data.eval_batches=1",
    "--optim.warmup_steps=2",
    "--run.progress=false",
    "--run.plot=false",
    "--run.log_every=1",
    "--run.eval_every=0",
    "--optim.lr=1e-2",
]


@pytest.mark.parametrize("name", ["130m", "370m", "780m", "1.3b", "2.7b", "tiny"])
def test_mamba2_presets_give_mamba2_configs(name):
    config = parse_args([f"--model.preset=mamba2-{name}"])
    mc = config.model.mamba_config(vocab_size=257, backend="gpu")
    assert isinstance(mc, Mamba2Config) and mc.vocab_size == 257 and mc.dtype == "bfloat16"
    assert (mc.n_layer, mc.d_model) == (
        MAMBA2_PRESETS[name]["n_layer"],
        MAMBA2_PRESETS[name]["d_model"],
    )
    if name != "tiny":
        assert (mc.d_state, mc.headdim, mc.expand, mc.ngroups, mc.d_conv, mc.chunk_size) == (
            128,
            64,
            2,
            1,
            4,
            256,
        )
    _, params = step_lib.model_graphdef(mc)  # the training model's mixer: Mamba2's
    assert "dt_bias" in params["layers"]["mixer"] and "x_proj" not in params["layers"]["mixer"]


def test_the_default_model_stays_mamba1_and_fields_belong_to_the_preset_family():
    mc = TrainConfig().model.mamba_config(vocab_size=257, backend="cpu")
    assert type(mc) is MambaConfig and TrainConfig().model.preset == "tiny"
    # Mamba2 fields are options of a Mamba2 preset, typed from Mamba2Config.
    c = parse_args(
        [
            "--model.preset=mamba2-tiny",
            "--model.headdim=8",
            "--model.ngroups=2",
            "--model.chunk_size=16",
            "--model.D_has_hdim=true",
        ]
    )
    mc = c.model.mamba_config(vocab_size=257, backend="cpu")
    assert (mc.headdim, mc.ngroups, mc.chunk_size, mc.D_has_hdim) == (8, 2, 16, True)
    with pytest.raises(
        ConfigError,
        match=r"--model.headdim: not a field of the MambaConfig of "
        r"preset 'tiny'",
    ):
        parse_args(["--model.headdim=8"])
    with pytest.raises(
        ConfigError,
        match=r"--model.dt_rank: not a field of the Mamba2Config of "
        r"preset 'mamba2-tiny'",
    ):
        parse_args(["--model.preset=mamba2-tiny", "--model.dt_rank=4"])
    with pytest.raises(ConfigError, match="must be a multiple of headdim"):
        parse_args(["--model.preset=mamba2-tiny", "--model.headdim=48"])
    with pytest.raises(ConfigError, match=r"model.preset='mamba2-7b' is not one of"):
        parse_args(["--model.preset=mamba2-7b"])


def test_mamba2_tiny_step_learns_a_repeated_batch():
    config = parse_args(TINY2)
    mc = config.model.mamba_config(vocab_size=257, backend="cpu")
    mesh = sharding.make_mesh(MeshConfig())
    compiled = step_lib.build(mc, OptimConfig(lr=1e-2, warmup_steps=0), 10, mesh)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 257, n) for n in (50, 9, 33, 64, 20, 17, 40)]
    batch = next(data_lib.Batcher(pieces, mode="packed", seq_len=64, batch_size=4, seed=0))
    assert batch["stats"]["sequences"] > 4  # packed: several documents share rows
    arrays = sharding.put_batch(batch["arrays"], sharding.batch_sharding(mesh))
    state = compiled.init(0)
    # Weight decay as for Mamba1: matrices only (not A_log, D, dt_bias, norms, biases).
    mask = step_lib.decay_mask(state.params)
    decayed = sorted(
        "/".join(step_lib._names(p)) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m
    )
    assert decayed == [
        "embedding/embedding",
        "layers/mixer/conv_weight",
        "layers/mixer/in_proj/kernel",
        "layers/mixer/out_proj/kernel",
    ]
    losses = []
    for _ in range(8):
        state, metrics = compiled.train_step(state, arrays)
        losses.append(float(metrics["loss"]))
    print("losses", losses)
    assert all(np.isfinite(losses)) and int(state.step) == 8
    assert losses[-1] < losses[0] - 1.0  # reached: 5.63 -> 4.07


def test_mamba2_run_end_to_end_checkpoints_and_resumes(tmp_path):
    """TINY2's documents from a Hugging Face datasets save_to_disk directory."""
    import datasets

    datasets.Dataset.from_dict({"text": stdlib_texts(24)}).save_to_disk(tmp_path / "docs")
    out = tmp_path / "run"
    args = TINY2 + [
        "--run.checkpoint_every=2",
        f"--run.out_dir={out}",
        f"--data.source={tmp_path / 'docs'}",
    ]
    assert main(args + ["--run.steps=3"]) == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
        2,
        3,
    ]
    assert main(args + ["--run.steps=5"]) == 0  # resumes from step 3
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "mamba2-tiny" and summary["start_step"] == 3
    assert (
        summary["num_params"]
        == Mamba2Config.preset(
            "tiny", n_layer=1, d_model=32, d_state=4, vocab_size=257
        ).num_params()
    )
