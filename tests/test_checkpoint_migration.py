"""Checkpoints hold the train state by name; those written in leaf order (e5a3f65 and before,
tests/fixtures/legacy_checkpoints) are read into the right names."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from jax_packmamba.config import Mamba2Config, MambaConfig
from train import step as step_lib
from train.checkpoint import Checkpointer, CheckpointError, leaf_names, legacy_tree
from train.config import OptimConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "legacy_checkpoints"
LAYER = re.compile(r"/layers/(\d+)/")


def abstract_state(meta, **model_changes):
    record = dict(meta["model_config"])
    cls = {"MambaConfig": MambaConfig, "Mamba2Config": Mamba2Config}[record.pop("class")]
    if "A_init_range" in record:
        record["A_init_range"] = tuple(record["A_init_range"])
    config = cls(**{**record, **model_changes})
    tx = step_lib.make_optimizer(OptimConfig(**meta["config"]["optim"]), 2)
    abstract = jax.eval_shape(lambda: step_lib.init_state(config, tx, 0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return abstract, jax.tree.map(lambda _: one, abstract)


def by_name(state) -> dict:
    return dict(zip(leaf_names(state), jax.tree.leaves(state)))


def recorded_value(named: dict, legacy_name: str):
    """The restored value that the legacy checkpoint's `legacy_name` ("params/layers/1/...")
    names: the same name, or layer 1 of the stacked "params/layers/..."."""
    if legacy_name in named:
        return np.asarray(named[legacy_name])
    match = LAYER.search(legacy_name)
    assert match, legacy_name
    stacked = legacy_name[: match.start()] + "/layers/" + legacy_name[match.end() :]
    return np.asarray(named[stacked])[int(match.group(1))]


@pytest.fixture(params=["tiny", "mamba2-tiny"])
def legacy(request, tmp_path):
    shutil.copytree(FIXTURES / request.param / "checkpoints", tmp_path / "checkpoints")
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    yield ckpt, np.load(FIXTURES / request.param / "state.npz")
    ckpt.close()


def test_legacy_checkpoint_restores_every_leaf_to_its_name(legacy, tmp_path):
    ckpt, recorded = legacy
    abstract, shardings = abstract_state(ckpt.read_meta(2))
    state, meta = ckpt.restore(2, abstract, shardings)
    assert meta["step"] == 2
    named = by_name(state)
    assert len(named) == len(jax.tree.leaves(abstract))
    layers = {int(m.group(1)) for k in recorded.files if (m := LAYER.search(k))}
    assert layers == {0, 1}
    for name in recorded.files:
        np.testing.assert_array_equal(recorded_value(named, name), recorded[name], err_msg=name)
    # Written again, it is written by name and reads back the same.
    ckpt.save(3, state, meta)
    ckpt.wait()
    again, _ = ckpt.restore(3, abstract, shardings)
    for name, value in by_name(again).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(named[name]), err_msg=name)


@pytest.mark.parametrize(
    "name,config",
    [
        ("tiny", MambaConfig.preset("tiny", n_layer=12, d_model=8, d_state=2)),
        ("mamba2-tiny", Mamba2Config.preset("tiny", n_layer=12, d_model=16, d_state=4, headdim=8)),
    ],
)
def test_legacy_leaf_order_is_the_order_e5a3f65_wrote_at_12_layers(name, config):
    """Layer 10 after layer 9, not after 1: the leaf order legacy_tree derives from a config
    is the one the old trainer wrote (leaf_order.py, run at e5a3f65)."""
    recorded = json.loads((FIXTURES / "leaf_order_12_layers.json").read_text())[name]
    tx = step_lib.make_optimizer(OptimConfig(), 2)
    tree = legacy_tree(jax.eval_shape(lambda: step_lib.init_state(config, tx, 0)))
    got = [[n, list(x.shape)] for n, x in zip(leaf_names(tree), jax.tree.leaves(tree))]
    assert got == recorded


def test_checkpoint_of_another_model_is_a_one_line_error_naming_the_parameter(legacy):
    ckpt, _ = legacy
    meta = ckpt.read_meta(2)
    abstract, shardings = abstract_state(meta, d_state=8)
    with pytest.raises(
        CheckpointError, match=r"params/layers/0?/?mixer/\w+ has shape \(.*\), this model.s is \("
    ) as err:
        ckpt.restore(2, abstract, shardings)
    assert "\n" not in str(err.value)
    # By name too: a named checkpoint restored into a model whose state differs.
    state, meta = ckpt.restore(2, *abstract_state(meta))
    ckpt.save(3, state, meta)
    ckpt.wait()
    with pytest.raises(
        CheckpointError, match=r"params/layers/0?/?mixer/\w+ has shape \(.*\), this model.s is \("
    ) as err:
        ckpt.restore(3, abstract, shardings)
    assert "\n" not in str(err.value)


def test_training_resumes_a_legacy_checkpoint(tmp_path, capsys):
    """The training program resumes the Mamba1 fixture's run (its command, README.md) from step
    2 and trains a third step from the restored state."""
    from train.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "tiny" / "checkpoints", run / "checkpoints")
    args = [
        "--model.preset=tiny",
        "--model.n_layer=2",
        "--model.d_model=16",
        "--model.d_state=4",
        "--data.max_documents=24",
        "--data.seq_len=32",
        "--data.batch_size=4",
        "--data.eval_batches=1",
        "--optim.warmup_steps=1",
        "--run.steps=3",
        "--run.checkpoint_every=1",
        "--run.keep_checkpoints=1",
        "--run.export_models=false",
        "--run.progress=false",
        "--run.plot=false",
        "--run.log_every=1",
        "--run.compilation_cache=false",
        "--run.resume=true",
        f"--run.out_dir={run}",
    ]
    code = main(args)
    log = "".join(capsys.readouterr())
    assert code == 0, log
    assert "resume  from" in log and "(step 2" in log, log
    ckpt = Checkpointer(run / "checkpoints", keep=1)
    abstract, shardings = abstract_state(ckpt.read_meta(3))
    state, _ = ckpt.restore(3, abstract, shardings)
    ckpt.close()
    assert int(state.step) == 3
    recorded = np.load(FIXTURES / "tiny" / "state.npz")
    named = by_name(state)
    # One AdamW step on from the fixture: moved, but from there (not from a fresh init).
    for name in ("params/layers/1/mixer/in_proj/kernel", "opt_state/1/0/nu/layers/0/mixer/A_log"):
        before, after = recorded[name], recorded_value(named, name)
        assert not np.array_equal(before, after), name
        np.testing.assert_allclose(after, before, atol=0.05, err_msg=name)
