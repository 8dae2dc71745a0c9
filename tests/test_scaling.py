"""Gradient communication across devices (train/sharding.py, train/step.py) on 8 host devices.

The mesh is data=2 x fsdp=4 and the model's width 30: the fsdp axis shards every parameter
with a dimension of 60 or 120 (or the embedding's 264 rows) and leaves the norms' (30,)
weights replicated, so both reductions of explicit_grad_sums run (psum_scatter onto a shard,
psum of a replicated parameter), and the data axis adds the psum over data. Everything multi-device runs in one subprocess (this file
run as a script) that writes a JSON the tests read; the trainer runs there first, before
anything starts jax's backend, as `python -m train` would.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np
import pytest

from tests.compiled import run_on_cpu
from train import sharding
from train.config import ConfigError, MeshConfig, parse_args

MODES = ("auto", "float32", "bfloat16")
STEPS = 8
# bf16-reduced training against float32-reduced: the loss after STEPS steps at lr 1e-2 may
# differ by this much (measured: 3e-5); a wrong reduction (a double sum, a missing one) moves
# the step-1 gradient norm by a factor, far beyond GRAD_NORM_RTOL_BF16.
LOSS_ATOL_BF16 = 1e-3
GRAD_NORM_RTOL_BF16 = 1e-2
TINY_MODEL = dict(n_layer=1, d_model=30, d_state=4)


def fresh_copy(tree):
    """A copy of every array of tree in its own buffers, with the same shardings."""
    import jax

    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def worker(out: pathlib.Path) -> None:
    """Runs in a subprocess with 8 host devices; writes what the tests check to `out`."""
    from train import step as step_lib
    from train import trainer

    # 1. The trainer with both mesh options, before jax's backend starts (as the CLI does).
    built_with = []
    real_build = step_lib.build

    def recording_build(*args, **kwargs):
        built_with.append(kwargs.get("grad_reduce"))
        return real_build(*args, **kwargs)

    step_lib.build = recording_build
    cli = [
        "--model.preset=tiny",
        "--model.n_layer=1",
        "--model.d_model=30",
        "--model.d_state=4",
        "--data.max_documents=24",
        "--data.seq_len=64",
        "--data.batch_size=8",
        "--data.eval_batches=1",
        "--optim.warmup_steps=1",
        "--run.progress=false",
        "--run.plot=false",
        "--run.log_every=1",
        "--run.steps=2",
        "--run.eval_every=0",
        "--run.checkpoint_every=0",
        "--run.resume=false",
        f"--run.out_dir={out.parent / 'run'}",
        "--mesh.data=2",
        "--mesh.fsdp=4",
        "--mesh.grad_reduce=bfloat16",
        "--mesh.overlap_collectives=true",
        "--run.compilation_cache=false",
    ]
    summary = trainer.run(parse_args(cli), log=lambda line: None)
    step_lib.build = real_build
    result = dict(
        trainer=dict(
            built_with=built_with,
            loss_last=summary["loss_last"],
            xla_flags=os.environ.get("XLA_FLAGS", ""),
        )
    )

    # 2. The step in each mode on the same batch, from the same initial state.
    import jax

    from benchmarks import workloads
    from train.config import OptimConfig

    config = workloads.model_config("tiny", backend="cpu", overrides=TINY_MODEL)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    batch = workloads.packed_batch(rows=8, seq_len=64)["arrays"]
    # One initial state for every mode (the state's layout does not depend on grad_reduce), a
    # copy for each (train_step donates it): one init program compiled, not one a mode.
    first = None
    for mode in MODES:
        c = step_lib.build(
            config, OptimConfig(lr=1e-2, warmup_steps=1), 100, mesh, grad_reduce=mode
        )
        first = c.init(0) if first is None else first
        state = fresh_copy(first)
        b = sharding.put_batch(batch, sharding.batch_sharding(mesh))
        lowered = c.train_step.lower(state, b)
        rec = dict(
            collectives_before_spmd=sharding.collective_bytes(
                lowered.compiler_ir(dialect="hlo").as_hlo_text()
            ),
            collectives_compiled=sharding.collective_bytes(lowered.compile().as_text()),
            param_bytes=sum(x.nbytes for x in jax.tree.leaves(state.params)),
            losses=[],
            grad_norms=[],
        )
        if mode == "auto":
            shard = {}
            for name, tree in (
                ("params", state.params),
                ("mu", state.opt_state[1][0].mu),
                ("nu", state.opt_state[1][0].nu),
            ):
                emb = tree["embedding"]["embedding"]
                shard[name] = dict(
                    spec=str(emb.sharding.spec),
                    global_shape=list(emb.shape),
                    shard_shape=list(emb.addressable_shards[0].data.shape),
                )
            rec["embedding_sharding"] = shard
        for _ in range(STEPS):
            state, metrics = c.train_step(state, b)
            rec["losses"].append(float(metrics["loss"]))
            rec["grad_norms"].append(float(metrics["grad_norm"]))
        result[mode] = rec

    # 3. The carried step (--data.long_docs=link_across_steps, 2 stream groups): the explicit
    # reduction passes each device's rows' carry through its shard_map.
    continues = np.zeros((1, 8, 1), bool)
    continues[0, ::2] = True  # even rows go on from the state their stream ended in
    carried = sharding.put_batch(dict(batch, continues=continues), sharding.batch_sharding(mesh))
    first = None
    for mode in ("auto", "float32"):
        c = step_lib.build(
            config,
            OptimConfig(lr=1e-2, warmup_steps=1),
            100,
            mesh,
            grad_reduce=mode,
            carry_rows=8,
            stream_groups=2,
        )
        first = c.init(0) if first is None else first
        state, losses = fresh_copy(first), []
        for _ in range(4):  # both groups twice
            state, metrics = c.train_step(state, carried)
            losses.append(float(metrics["loss"]))
        result[f"carried_{mode}"] = dict(
            losses=losses,
            carry={k: np.asarray(v, np.float64).tolist() for k, v in state.carry.items()},
        )
    out.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's JSON (one subprocess, about 25 s: the tests that read it are marked slow)."""
    out = tmp_path_factory.mktemp("scaling") / "runs.json"
    run_on_cpu(
        __file__, str(out), xla_flags="--xla_force_host_platform_device_count=8", timeout=600
    )
    return json.loads(out.read_text())


@pytest.mark.slow
def test_trainer_takes_grad_reduce_and_sets_the_overlap_flags(runs):
    t = runs["trainer"]
    assert t["built_with"] == ["bfloat16"] and np.isfinite(t["loss_last"])
    for flag in sharding.OVERLAP_XLA_FLAGS:  # set, and harmless on CPU (the run trained)
        assert flag in t["xla_flags"].split()


@pytest.mark.slow
def test_explicit_float32_reduction_matches_spmd(runs):
    auto, f32 = runs["auto"], runs["float32"]
    print("auto   ", auto["losses"], "\nfloat32", f32["losses"])
    np.testing.assert_allclose(f32["grad_norms"][0], auto["grad_norms"][0], rtol=1e-5)
    np.testing.assert_allclose(f32["losses"], auto["losses"], rtol=1e-5)


@pytest.mark.slow
def test_explicit_reduction_carries_each_devices_rows(runs):
    """link_across_steps under --mesh.grad_reduce=float32 on 8 devices (one row each): the same
    losses and carried states as the SPMD step's."""
    auto, f32 = runs["carried_auto"], runs["carried_float32"]
    np.testing.assert_allclose(f32["losses"], auto["losses"], rtol=1e-5)
    assert f32["carry"]["next_group"] == auto["carry"]["next_group"]
    for key in ("conv", "ssm"):
        a, b = np.asarray(auto["carry"][key]), np.asarray(f32["carry"][key])
        assert np.abs(a).max() > 0  # the rows' states were carried
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


@pytest.mark.slow
def test_bfloat16_reduction_keeps_the_loss_curve(runs):
    f32, bf16 = runs["float32"], runs["bfloat16"]
    print("float32 ", f32["losses"], "\nbfloat16", bf16["losses"])
    np.testing.assert_allclose(
        bf16["grad_norms"][0], f32["grad_norms"][0], rtol=GRAD_NORM_RTOL_BF16
    )
    np.testing.assert_allclose(bf16["losses"], f32["losses"], atol=LOSS_ATOL_BF16)
    assert bf16["losses"][-1] < bf16["losses"][0] - 0.5  # it trains


@pytest.mark.slow
def test_bfloat16_mode_reduces_gradients_in_bfloat16(runs):
    """The gradient collectives jax emits carry bf16; float32 ones only the scalar loss sum.
    (On CPU, XLA's float normalization then widens bf16 reductions to f32 in the compiled
    module; NCCL reduces bf16 natively, and bench_scaling records the GPU's compiled bytes.)"""
    bf16, f32 = (
        runs["bfloat16"]["collectives_before_spmd"],
        runs["float32"]["collectives_before_spmd"],
    )
    print("bfloat16", bf16, "\nfloat32 ", f32)
    grads_bf16 = bf16.get("reduce-scatter bf16", 0) + bf16.get("all-reduce bf16", 0)
    grads_f32 = f32.get("reduce-scatter f32", 0) + f32.get("all-reduce f32", 0)
    assert bf16.get("reduce-scatter bf16") and bf16.get("all-reduce bf16")
    assert bf16.get("reduce-scatter f32", 0) == 0 and bf16.get("all-reduce f32", 0) <= 4
    assert grads_f32 == 2 * grads_bf16 + 4  # the same reductions, half the bytes (+ the loss)


@pytest.mark.slow
def test_spmd_default_all_reduces_float32_gradients(runs):
    """The baseline the explicit modes replace: XLA's partitioner reduces the gradients in f32,
    at least the parameters' bytes per step (the embedding's gradient once for each use)."""
    auto = runs["auto"]
    reduced = sum(
        v
        for k, v in auto["collectives_compiled"].items()
        if k.split()[0] in ("all-reduce", "reduce-scatter") and k.endswith("f32")
    )
    assert reduced >= auto["param_bytes"] // 4  # fsdp=4 reduce-scatters onto quarters


@pytest.mark.slow
def test_optimizer_state_is_sharded_like_the_parameters(runs):
    shard = runs["auto"]["embedding_sharding"]
    for name in ("params", "mu", "nu"):
        s = shard[name]
        assert "fsdp" in s["spec"], s
        assert s["shard_shape"][0] * 4 == s["global_shape"][0], s


def test_mesh_options_are_checked_before_anything_runs(monkeypatch):
    with pytest.raises(ConfigError, match="--mesh.grad_reduce='fp8'"):
        sharding.apply_mesh_options(MeshConfig(grad_reduce="fp8"))
    with pytest.raises(ConfigError, match="--mesh.overlap_collectives: expected bool"):
        parse_args(["--mesh.overlap_collectives=maybe"])
    # After jax's backend started, adding a flag to this process is an error, not a silent
    # no-op; a flag already in XLA_FLAGS (the user's value) is kept as it is.
    monkeypatch.setattr(sharding, "_backends_started", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    with pytest.raises(ConfigError, match="highest_priority_async_stream"):
        sharding.add_xla_flags(sharding.OVERLAP_XLA_FLAGS)
    child = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
    assert sharding.add_xla_flags(sharding.OVERLAP_XLA_FLAGS, child) == [  # a child's: fine
        "--xla_gpu_enable_highest_priority_async_stream=true"
    ]
    assert child["XLA_FLAGS"].split() == [
        "--xla_gpu_enable_latency_hiding_scheduler=false",
        "--xla_gpu_enable_highest_priority_async_stream=true",
    ]
    monkeypatch.setattr(sharding, "_backends_started", lambda: False)
    assert len(sharding.add_xla_flags(sharding.OVERLAP_XLA_FLAGS)) == 1
    assert os.environ["XLA_FLAGS"] == child["XLA_FLAGS"]


def test_collective_bytes_reads_sync_async_and_tuple_collectives():
    hlo = """
  %a = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %x), replica_groups={}
  %b = (bf16[16]{0}, f32[2]{0}) all-reduce(%y, %z), replica_groups={}
  %c = bf16[4]{0} reduce-scatter(bf16[8]{0} %w), dimensions={0}
  %d = (f32[2,3]{1,0}, f32[4,3]{1,0}) all-gather-start(f32[2,3]{1,0} %v), dimensions={0}
  %e = f32[4,3]{1,0} all-gather-done(%d)
  %f = f32[10]{0} all-reduce-start(f32[10]{0} %u)
  %g = f32[10]{0} all-reduce-done(%f)
  %h = f32[10]{0} add(%g, %g)
"""
    assert sharding.collective_bytes(hlo) == {
        "all-reduce f32": 128 + 8 + 40,
        "all-reduce bf16": 32,
        "reduce-scatter bf16": 8,
        "all-gather f32": 48,
    }


if __name__ == "__main__":
    worker(pathlib.Path(sys.argv[1]))
