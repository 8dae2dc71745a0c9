"""The run directory: config checks on resume, damaged and half-written checkpoints, the model
exports that from_pretrained and the generate command line read, --help and the compilation
cache flags.

One tiny run (6 steps, checkpoints at 2, 4 and 6, the last 2 kept) is trained once; each test
works on a copy.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba import compilation_cache
from jax_packmamba.generation import generate
from jax_packmamba.run_layout import resolve_model_dir
from jax_packmamba.tokenizer import ByteTokenizer, tokenizer_for_model_dir
from tests.test_train import TINY, losses, tensorboard_events, tensorboard_scalars
from train import step as step_lib
from train import trainer
from train.__main__ import main
from train.checkpoint import Checkpointer
from train.config import (
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    help_text,
    parse_args,
    resolve_long_docs,
)
from train.metrics import read_metrics
from train.sharding import GRAD_REDUCE

# Importing the command line's module makes jp.generate that module (a package attribute named
# like its submodule), so the function is taken from jax_packmamba.generation.
generate_cli = importlib.import_module("jax_packmamba.generate")

BASE = TINY + [
    "--run.steps=6",
    "--run.checkpoint_every=2",
    "--run.keep_checkpoints=2",
    "--run.eval_every=0",
    "--optim.lr=1e-2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(BASE + [f"--run.out_dir={out}"]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def snapshot(directory: pathlib.Path) -> dict:
    """Every path under `directory` with its size and modification time."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


def checkpoint_steps(out: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def restored_params(out: pathlib.Path, step: int):
    # The run's train state: by default (--data.long_docs=auto) with the carried state.
    config, _ = resolve_long_docs(parse_args(BASE))
    d = config.data
    carry_rows = d.batch_size if d.long_docs == "link_across_steps" else None
    mc = config.model.mamba_config(vocab_size=257, backend="cpu")
    tx = step_lib.make_optimizer(config.optim, config.run.steps)
    abstract = jax.eval_shape(
        lambda: step_lib.init_state(mc, tx, 0, carry_rows, carry_groups=d.stream_groups)
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(out / "checkpoints", keep=3)
    try:
        state, meta = ckpt.restore(step, abstract, jax.tree.map(lambda _: device, abstract))
    finally:
        ckpt.close()
    return state.params, meta


# ------------------------------------------------------------------------------------------------
# The config recorded in each checkpoint, and resuming with another one.


def test_checkpoints_record_their_config(trained):
    _, meta = restored_params(trained, 6)
    # The concrete config: --data.long_docs=auto recorded as what it chose.
    config, _ = resolve_long_docs(parse_args(BASE + [f"--run.out_dir={trained}"]))
    assert config.data.long_docs == "link_across_steps" and config.data.stream_groups == 8
    assert meta["config"] == json.loads(json.dumps(config.to_dict()))
    assert meta["model_config"]["n_layer"] == 1 and meta["model_config"]["vocab_size"] == 257
    assert meta["model_config"]["class"] == "MambaConfig" and meta["step"] == 6


def test_changed_model_or_optimizer_is_refused_before_writing(run_copy, capsys):
    before = snapshot(run_copy)
    code = main(
        BASE
        + [
            f"--run.out_dir={run_copy}",
            "--model.n_layer=2",
            "--optim.lr=1e-3",
            "--optim.grad_accum=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for change in (
        "model.n_layer 1 -> 2",
        "optim.lr 0.01 -> 0.001",
        "optim.grad_accum 1 -> 2",
        f"{run_copy}/checkpoints/6",
    ):
        assert change in err, err
    assert snapshot(run_copy) == before  # config.json is the trained one, nothing else touched


def test_changed_data_needs_allow_change(run_copy, capsys):
    before = snapshot(run_copy)
    changed = BASE + [f"--run.out_dir={run_copy}", "--data.max_documents=20", "--data.seq_len=32"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "data.max_documents 24 -> 20" in err and "data.seq_len 64 -> 32" in err, err
    assert "--data.allow_change=true" in err and "model." not in err
    assert snapshot(run_copy) == before
    # Said so: it resumes (and, done at step 6, reports it); the new config is recorded.
    assert main(changed + ["--data.allow_change=true"]) == 0
    assert "resume  from" in capsys.readouterr().out
    assert json.loads((run_copy / "config.json").read_text())["data"]["seq_len"] == 32


def test_fields_free_on_resume_are_taken(run_copy, capsys):
    free = [
        "--run.log_every=2",
        "--run.keep_checkpoints=5",
        "--model.remat=true",
        "--model.scan_layers=true",
        "--model.dtype=float32",
        "--data.eval_batches=2",
        "--run.seed=9",
        "--mesh.data=1",
    ]
    assert main(BASE + [f"--run.out_dir={run_copy}"] + free) == 0
    assert "resume  from" in capsys.readouterr().out


def test_checkpoint_without_recorded_config_is_compared_with_config_json(run_copy, capsys):
    """Checkpoints written before they held their config: the run's config.json stands in."""
    for step in (4, 6):
        file = run_copy / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(file.read_text())
        file.write_text(json.dumps({k: meta[k] for k in ("data", "step")}))
    assert main(BASE + [f"--run.out_dir={run_copy}", "--model.n_layer=2"]) == 2
    err = capsys.readouterr().err
    assert "model.overrides {'n_layer': 1, 'd_model': 32, 'd_state': 4} -> {'n_layer': 2" in err, (
        err
    )


def test_tensorboard_events_hold_the_metrics_and_the_config(trained):
    scalars = tensorboard_scalars(trained / "tensorboard")
    records = [r for r in read_metrics(trained / "metrics.jsonl") if "loss" in r]
    for tag, key in (
        ("train/loss", "loss"),
        ("train/grad_norm", "grad_norm"),
        ("train/learning_rate", "lr"),
        ("perf/step_time_s", "step_time_s"),
    ):
        assert scalars[tag] == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-6), tag
    assert scalars["train/packing_efficiency"] == pytest.approx(
        {r["step"]: r["real_tokens"] / r["slots"] for r in records}, rel=1e-6
    )
    assert sorted(scalars["perf/tokens_per_s"]) == [2, 3, 4, 5, 6]  # not before a step's time
    texts = [
        v.tensor.string_val[0].decode()
        for e in tensorboard_events(trained / "tensorboard")
        for v in e.summary.value
        if v.tag.startswith("config")
    ]
    assert len(texts) == 1 and json.loads(texts[0]) == json.loads(
        (trained / "config.json").read_text()
    )


def test_wandb_logs_through_the_same_writer(tmp_path, monkeypatch):
    """A stand-in wandb module (no network, no package): the run gets the config once, the
    scalars without the missing ones, and the same id when the run directory resumes."""
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = parse_args(
        BASE
        + [
            f"--run.out_dir={tmp_path}",
            "--run.tensorboard=false",
            "--run.wandb_project=p",
            "--run.wandb_mode=offline",
        ]
    )
    trainer.check_loggers(config.run)
    [writer] = trainer.open_loggers(config, tmp_path, None)
    writer.scalars(3, {"train/loss": 2.5, "perf/mfu": None})
    writer.close()
    _, init = calls[0]
    assert (init["project"], init["mode"], init["config"]) == ("p", "offline", config.to_dict())
    assert calls[1:] == [("log", 3, {"train/loss": 2.5}), ("finish",)]
    trainer.open_loggers(config, tmp_path, 3)
    assert calls[3][1]["id"] == init["id"] and init["resume"] == "allow"


def test_missing_logger_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setattr(trainer, "prepare", lambda *a: pytest.fail("data read before the check"))
    assert main(BASE + [f"--run.out_dir={tmp_path}", "--run.wandb_project=p"]) == 2
    assert capsys.readouterr().err == (
        "error: --run.wandb_project needs the wandb package, which is not installed: pip install "
        "-c constraints.txt -e '.[wandb]'\n"
    )


def test_exports_without_checkpoints_are_not_replaced(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    before = snapshot(run_copy)
    assert main(BASE + [f"--run.out_dir={run_copy}"]) == 2
    assert "holds model exports but" in capsys.readouterr().err
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints: reported in one line, skipped for the newest readable one, never deleted.


def damage(step_dir: pathlib.Path, how: str) -> None:
    if how == "array data":
        data = step_dir / "state" / "ocdbt.process_0" / "d"
        target = max(data.iterdir(), key=lambda p: p.stat().st_size)
    else:
        target = (
            step_dir / {"meta/metadata": "meta/metadata", "state/_METADATA": "state/_METADATA"}[how]
        )
    data = target.read_bytes()
    # JSON is cut inside its first key, so that the error does not depend on where half of a
    # file of varying content falls (json's scanner can let a bare StopIteration escape).
    target.write_bytes(data[:2] if how == "meta/metadata" else data[: len(data) // 2])


@pytest.mark.parametrize(
    "how, reason",
    [
        ("array data", "state: ValueError: OUT_OF_RANGE"),
        ("meta/metadata", "meta: JSONDecodeError"),
        ("state/_METADATA", "state/_METADATA is not valid JSON"),
    ],
)
def test_damaged_latest_checkpoint_is_skipped(run_copy, capsys, how, reason):
    damage(run_copy / "checkpoints" / "6", how)
    files = sorted(
        str(p.relative_to(run_copy / "checkpoints" / "6"))
        for p in (run_copy / "checkpoints" / "6").rglob("*")
    )
    # --run.steps=4: step 4 is the end, so the resumed run has nothing left to do.
    assert main(BASE + [f"--run.out_dir={run_copy}", "--run.steps=4"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if "unreadable" in line]
    assert len(warnings) == 2, captured.out  # the report and where it was moved
    assert warnings[0].startswith("warning: checkpoint step 6") and reason in warnings[0], warnings
    assert f"resume  from {run_copy}/checkpoints/4 (step 4" in captured.out
    assert "Traceback" not in captured.out + captured.err and captured.err == ""
    moved = run_copy / "unreadable" / "checkpoints" / "6"
    assert sorted(str(p.relative_to(moved)) for p in moved.rglob("*")) == files
    assert (run_copy / "unreadable" / "models" / "6" / "config.json").is_file()
    assert checkpoint_steps(run_copy) == [4]


def test_run_trains_on_past_a_damaged_checkpoint(run_copy, trained, capsys):
    damage(run_copy / "checkpoints" / "6", "array data")
    assert main(BASE + [f"--run.out_dir={run_copy}"]) == 0
    assert "resume  from" in capsys.readouterr().out
    assert checkpoint_steps(run_copy) == [4, 6]  # step 6 written again
    a, b = losses(run_copy), losses(trained)
    np.testing.assert_allclose([a[5], a[6]], [b[5], b[6]], rtol=1e-6)
    # TensorBoard is told to drop what the first run logged from step 5 on.
    purges = [
        e.step for e in tensorboard_events(run_copy / "tensorboard") if e.HasField("session_log")
    ]
    assert purges == [5]


def test_no_readable_checkpoint_is_one_clear_error(run_copy, capsys):
    for step in (4, 6):
        damage(run_copy / "checkpoints" / str(step), "meta/metadata")
    before = snapshot(run_copy)
    assert main(BASE + [f"--run.out_dir={run_copy}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "none of the 2 checkpoints" in err and "steps 6, 4" in err
    assert "--run.resume=false --run.overwrite=true" in err and "another --run.out_dir" in err
    assert snapshot(run_copy) == before  # not restarted from scratch over them, nothing moved


def test_run_killed_while_writing_a_checkpoint_resumes(run_copy, trained, capsys):
    """A kill during the write of step 6 leaves orbax's temporary folder (no commit marker,
    part of the data) and maybe a half-written model export beside the finished step 4."""
    half = run_copy / "checkpoints" / "6.orbax-checkpoint-tmp-1764000000123456"
    shutil.move(run_copy / "checkpoints" / "6", half)
    for marker in half.rglob("commit_success.txt"):
        marker.unlink()
    damage(half, "array data")
    partial_export = run_copy / "models" / ".tmp-6-12345"
    shutil.move(run_copy / "models" / "6", partial_export)
    (partial_export / "model.safetensors").unlink()
    assert resolve_model_dir(run_copy) == run_copy / "models" / "4"

    assert main(BASE + [f"--run.out_dir={run_copy}"]) == 0
    out = capsys.readouterr().out
    assert f"resume  from {run_copy}/checkpoints/4 (step 4" in out and "unreadable" not in out, out
    assert checkpoint_steps(run_copy) == [4, 6]
    a, b = losses(run_copy), losses(trained)
    np.testing.assert_allclose([a[5], a[6]], [b[5], b[6]], rtol=1e-6)
    assert sorted(p.name for p in (run_copy / "models").iterdir()) == ["4", "6"]


# ------------------------------------------------------------------------------------------------
# The model exports: a run directory or one of its checkpoints is a model.


def test_exports_beside_each_checkpoint_pruned_with_them(trained):
    assert checkpoint_steps(trained) == [4, 6]
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["4", "6"]
    assert sorted(p.name for p in (trained / "models" / "6").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((trained / "models" / "6" / "config.json").read_text())
    assert config["eos_token_id"] == 256 and config["jax_packmamba"]["tokenizer"] == "bytes"
    assert resolve_model_dir(trained) == trained / "models" / "6"
    assert resolve_model_dir(trained / "checkpoints" / "4") == trained / "models" / "4"
    assert resolve_model_dir(trained / "models" / "4") == trained / "models" / "4"


def test_from_pretrained_of_a_run_gives_the_trained_params(trained):
    for path, step in ((trained, 6), (trained / "checkpoints" / "4", 4)):
        model = jp.from_pretrained(path)
        params, _ = restored_params(trained, step)
        got = nnx.to_pure_dict(nnx.split(model)[1])
        assert jax.tree.structure(got) == jax.tree.structure(params)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tokenizer = tokenizer_for_model_dir(trained / "checkpoints" / "4")
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eod_id == 256
    out = generate(model, [tokenizer.encode("def ")], max_new_tokens=3, temperature=0.0)
    assert len(out) == 1


def test_generate_command_line_on_a_run_stops_at_its_eos(trained, monkeypatch, capsys):
    seen = {}
    real = generate_cli.sampling_config

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(generate_cli, "sampling_config", spy)
    code = generate_cli.main(
        [
            "--checkpoint",
            str(trained),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "4",
            "--no-compilation-cache",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert seen["eos_ids"] == (256,)
    out = capsys.readouterr()
    assert out.out.startswith("--- 'def '")
    assert out.err.splitlines()[0] == f"model: {trained}/models/6 (training step 6)", out.err


def test_resolve_model_dir_names_what_it_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"nope is not a directory \(does not exist\)"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"has no config.json: expected a model directory"):
        resolve_model_dir(tmp_path)
    (tmp_path / "run" / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"run has checkpoints/ but no model exports"):
        resolve_model_dir(tmp_path / "run")
    with pytest.raises(
        ValueError,
        match=r"5 is a training checkpoint, but its model export .*"
        r"models/5 is missing \(exported steps: none\)",
    ):
        resolve_model_dir(tmp_path / "run" / "checkpoints" / "5")
    (tmp_path / "run" / "models" / ".tmp-5-1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has no complete model export"):
        resolve_model_dir(tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# --help and the compilation cache.


CONFIG_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "run": RunConfig,
}


def test_help_describes_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text == help_text() + "\n"
    for part, cls in CONFIG_CLASSES.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{part}.{f.name} has no help"
            flag = "--model.<MambaConfig field>" if f.name == "overrides" else f"--{part}.{f.name}="
            assert flag in text, flag
    flat = " ".join(text.split())
    grad_reduce = {f.name: f for f in dataclasses.fields(MeshConfig)}["grad_reduce"]
    assert grad_reduce.metadata["choices"] == tuple(GRAD_REDUCE)  # the help's copy of the list
    fields = (jp.MambaConfig, jp.Mamba2Config, jp.Mamba3Config)
    for f in (f for cls in fields for f in dataclasses.fields(cls)):
        assert f" {f.name} (" in flat or f"--model.{f.name}=" in flat, f.name
    for phrase in (
        "comma-separated paths",
        "(its text_field)",
        "save_to_disk",
        "a text file is one document",
        "{packed | padded | single}",
        "'bytes' (UTF-8 bytes are ids 0..255",
        "tokenizer.json",
        "{1.4b | 130m | 2.8b | 370m | 790m | tiny | mamba2-130m | mamba2-370m | mamba2-780m | "
        "mamba2-1.3b | mamba2-2.7b | mamba2-tiny | mamba3-1.5b | mamba3-tiny | hybrid-tiny | "
        "hybrid-1b}",
        "[fixed on resume unless --data.allow_change=true]",
        "[fixed on resume]",
    ):
        assert phrase in flat, phrase


@pytest.fixture
def jax_cache_settings():
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in before.items():
        jax.config.update(n, v)


def test_compilation_cache_flags(tmp_path, jax_cache_settings):
    jax.config.update("jax_compilation_cache_dir", None)
    assert trainer.enable_compilation_cache(RunConfig(compilation_cache=False)) is None
    assert jax.config.jax_compilation_cache_dir is None
    folder = tmp_path / "xla"
    got = trainer.enable_compilation_cache(RunConfig(compilation_cache_dir=str(folder)))
    assert got == folder and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)


def test_a_second_cache_folder_receives_the_programs(tmp_path, jax_cache_settings):
    # jax opens the cache folder once per process; enable() must make a new folder take effect.
    first, second = tmp_path / "first", tmp_path / "second"
    compilation_cache.enable(first)
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7)).block_until_ready()
    compilation_cache.enable(second)
    jax.jit(lambda x: x * 5.0 - 2.0)(jnp.ones(9)).block_until_ready()
    assert any(first.iterdir()) and any(second.iterdir())


def test_run_reports_cache_folder_and_compile_time(
    trained, run_copy, tmp_path, capsys, jax_cache_settings
):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["compile_s"] > 0 and summary["compile_cache"] in ("hit", "miss", "not used")
    records = read_metrics(trained / "metrics.jsonl")
    assert records and summary["compile_s"] < summary["wall_s"]
    # The folder is printed at the start (the refused resume stops before anything compiles).
    folder = tmp_path / "cache"
    assert (
        main(
            BASE
            + [
                f"--run.out_dir={run_copy}",
                "--run.compilation_cache=true",
                f"--run.compilation_cache_dir={folder}",
                "--model.n_layer=3",
            ]
        )
        == 2
    )
    assert f"cache   XLA compilation cache {folder}" in capsys.readouterr().out
