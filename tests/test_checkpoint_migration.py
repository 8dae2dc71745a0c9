"""Checkpoints hold the train state by name; those written in leaf order (e5a3f65 and before,
tests/fixtures/legacy_checkpoints) are read into the right names."""

from __future__ import annotations

import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from jax_packmamba.config import Mamba2Config, MambaConfig
from train import step as step_lib
from train.checkpoint import Checkpointer, CheckpointError, leaf_names
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
    stacked = legacy_name[:match.start()] + "/layers/" + legacy_name[match.end():]
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


def test_checkpoint_of_another_model_is_a_one_line_error_naming_the_parameter(legacy):
    ckpt, _ = legacy
    meta = ckpt.read_meta(2)
    abstract, shardings = abstract_state(meta, d_state=8)
    with pytest.raises(CheckpointError, match=r"params/layers/0?/?mixer/\w+ has shape \(.*\), this model.s is \(") as err:
        ckpt.restore(2, abstract, shardings)
    assert "\n" not in str(err.value)
    # By name too: a named checkpoint restored into a model whose state differs.
    state, meta = ckpt.restore(2, *abstract_state(meta))
    ckpt.save(3, state, meta)
    ckpt.wait()
    with pytest.raises(CheckpointError, match=r"params/layers/0?/?mixer/\w+ has shape \(.*\), this model.s is \(") as err:
        ckpt.restore(3, abstract, shardings)
    assert "\n" not in str(err.value)
