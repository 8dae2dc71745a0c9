"""Training program: config, data, the loss, the step, and tiny end-to-end runs.

The multi-process tests (8 host devices, SIGKILL + resume) run `python -m train` in
subprocesses with a tiny model, so they exercise the real command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_packmamba import MambaConfig, MambaLM
from tests.compiled import compiled, cpu_xla_flags
from train import data as data_lib
from train import step as step_lib
from train.__main__ import main
from train.config import ConfigError, DataConfig, ModelConfig, OptimConfig, parse_args
from train.data import DataError
from train.metrics import Progress, peak_flops, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

# A model and data small enough that a run compiles and trains in seconds on one CPU core.
# Without the trainer's compilation cache: tests leave jax's cache settings alone (the subprocess
# runs share one through JAX_COMPILATION_CACHE_DIR, see subprocess_env).
TINY = [
    "--model.preset=tiny",
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.d_state=4",
    "--data.max_documents=24",
    "--data.seq_len=64",
    "--data.batch_size=8",
    "--data.eval_batches=1",
    "--optim.warmup_steps=2",
    "--run.progress=false",
    "--run.plot=false",
    "--run.log_every=1",
    "--run.compilation_cache=false",
]


def subprocess_env(devices=1, cache=None):
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=cpu_xla_flags(f"--xla_force_host_platform_device_count={devices}"),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    if cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def run_cli(args, *, devices=1, cache=None):
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=subprocess_env(devices, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def tensorboard_events(directory):
    """Every Event in directory's TensorBoard event files, read with TFRecord framing (length,
    its CRC, the record, its CRC) and the Event proto that tensorboardX ships."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack_from("<Q", data, i)
            yield Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in directory's event files."""
    scalars = {}
    for event in tensorboard_events(directory):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def losses(out_dir) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r in read_metrics(pathlib.Path(out_dir) / "metrics.jsonl")
        if "loss" in r
    }


# ------------------------------------------------------------------------------------------------
# Config.


def test_cli_nested_overrides_and_config_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\npreset = "130m"\nn_layer = 4\n[optim]\nlr = 1e-4\n[data]\nmode = "padded"\n'
    )
    c = parse_args(
        [
            "--config",
            str(toml),
            "--optim.lr=3e-4",
            "--data.seq_len",
            "128",
            "--model.d_state=8",
            "--run.resume=false",
            "--data.eod_id=none",
        ]
    )
    assert c.model.preset == "130m" and c.model.overrides == {"n_layer": 4, "d_state": 8}
    assert c.optim.lr == 3e-4 and c.data.mode == "padded" and c.data.seq_len == 128
    assert c.run.resume is False and c.data.eod_id is None
    mc = c.model.mamba_config(vocab_size=257, backend="cpu")
    assert (mc.n_layer, mc.d_model, mc.d_state, mc.vocab_size, mc.dtype) == (
        4,
        768,
        8,
        257,
        "float32",
    )
    assert c.model.mamba_config(vocab_size=257, backend="gpu").dtype == "bfloat16"
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"run": {"steps": 7}, "model": {"overrides": {"d_model": 96}}}))
    c = parse_args(["--config", str(js)])
    assert c.run.steps == 7 and c.model.overrides == {"d_model": 96}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lr=-1"], "optim.lr"),
        (["--optim.lr=fast"], "optim.lr: expected float"),
        (["--run.steps=0"], "run.steps must be >= 1"),
        (["--run.steps=2.5"], "run.steps: expected int"),
        (["--data.mode=bucketed"], "data.mode='bucketed' is not one of"),
        (["--model.preset=7b"], "model.preset='7b'"),
        (["--model.d_modle=3"], "unknown option --model.d_modle (did you mean --model.d_model?)"),
        (["--model.presett=tiny"], "did you mean --model.preset?"),
        (["--model.d_model=0"], "d_model must be a positive int"),
        (
            ["--optimizer.lr=1"],
            "unknown config part 'optimizer' in --optimizer.lr (did you mean --optim.lr?)",
        ),
        (["--data.eval_fraction=1"], "eval_fraction"),
        (["--mesh.data=0"], "mesh.data"),
        (["positional"], "unexpected argument"),
        (["--config", "/nonexistent.toml"], "no such file"),
    ],
)
def test_bad_config_values_fail_clearly(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(args)


def test_model_fields_cannot_hide_in_overrides():
    from train.config import ModelConfig

    config = ModelConfig(preset="tiny", overrides={"conv_impl": "pallas", "d_model": 64})
    with pytest.raises(ConfigError, match=r"set \['conv_impl'\] as --model.<name>"):
        config.mamba_config(vocab_size=257, backend="cpu")


@pytest.mark.parametrize(
    "args, remat",
    [
        (["--model.preset=mamba3-1.5b"], "save_kernel_outputs"),  # auto: the preset's
        (["--model.preset=mamba2-1.3b"], "save_projections_scan_and_states"),
        (["--model.preset=mamba2-2.7b"], "save_projections_and_scan"),
        (["--model.preset=mamba2-130m"], "none"),
        (["--model.preset=mamba3-1.5b", "--model.remat=none"], "none"),
        (["--model.preset=mamba2-1.3b", "--model.remat=true"], "full"),
    ],
)
def test_remat_auto_is_the_presets_choice(args, remat):
    c = parse_args(args)
    assert c.model.mamba_config(vocab_size=257, backend="gpu").remat == remat


def test_scan_layers_is_a_runtime_option_free_on_resume():
    from train.config import help_text, model_record, resume_conflicts

    c = parse_args(["--model.scan_layers=true"])
    assert c.model.scan_layers is True and c.model.overrides == {}
    assert c.model.mamba_config(vocab_size=257, backend="cpu").scan_layers is True
    assert parse_args([]).model.mamba_config(vocab_size=257, backend="cpu").scan_layers is False
    assert "--model.scan_layers" in help_text()
    old = parse_args([])
    fixed, data = resume_conflicts(
        old.to_dict(),
        c,
        old_model=model_record(old.model.mamba_config(vocab_size=257, backend="cpu")),
        new_model=model_record(c.model.mamba_config(vocab_size=257, backend="cpu")),
    )
    assert (fixed, data) == ([], [])
    with pytest.raises(ConfigError, match=r"set \['scan_layers'\] as --model.<name>"):
        ModelConfig(preset="tiny", overrides={"scan_layers": True}).mamba_config(
            vocab_size=257, backend="cpu"
        )


def test_vocab_override_must_cover_tokenizer():
    c = parse_args(["--model.vocab_size=100"])
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        c.model.mamba_config(vocab_size=257, backend="cpu")


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda d: str(d / "missing.txt"), "does not exist"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "has no files"),
        (
            lambda d: (d / "e.txt").write_text("") and None or str(d / "e.txt"),
            "no non-empty documents",
        ),
        (
            lambda d: (d / "bad.jsonl").write_text('{"txt": 1}\n') and None or str(d / "bad.jsonl"),
            'bad.jsonl:1: expected an object with a string "text"',
        ),
        (
            lambda d: write_parquet(d / "t.parquet", {"body": ["a"]}),
            "t.parquet: no column 'text' (columns: ['body']); set --data.text_field",
        ),
        (
            lambda d: write_parquet(d / "t.parquet", {"text": ["a", "b", None]}),
            "t.parquet: row 2: 'text' is null, expected a string",
        ),
    ],
)
def test_bad_data_fails_before_compiling(tmp_path, monkeypatch, capsys, make_source, message):
    def no_compile(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(step_lib, "build", no_compile)
    source = make_source(tmp_path)
    code = main([f"--data.source={source}", f"--run.out_dir={tmp_path / 'run'}"])
    assert code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Data.


def write_parquet(path, columns: dict, **options) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, **options)
    return str(path)


def stdlib_texts(n: int) -> list[str]:
    """The first n documents of the embedded corpus as text: what TINY trains on."""
    from jax_packmamba.corpus import stdlib_documents

    return [d.tobytes().decode("utf-8") for d in stdlib_documents(n)]


def test_table_sources(tmp_path, monkeypatch):
    """Parquet (several row groups), Arrow IPC and save_to_disk directories, in a directory
    walk and by name: one document per row of --data.text_field, in order."""
    import datasets
    import pyarrow as pa

    texts = ["ab", "", "c", "dé", "e"]
    (tmp_path / "d").mkdir()
    write_parquet(
        tmp_path / "d" / "a.parquet", {"body": texts, "n": [1, 2, 3, 4, 5]}, row_group_size=2
    )
    with pa.ipc.new_file(tmp_path / "d" / "b.arrow", pa.schema([("body", pa.string())])) as w:
        w.write_table(pa.table({"body": ["f", "g"]}))
    datasets.Dataset.from_dict({"body": ["h", "i"]}).save_to_disk(tmp_path / "d" / "saved")
    corpus = data_lib.load_corpus(DataConfig(source=str(tmp_path / "d"), text_field="body"))
    expected = [t.encode() for t in texts + ["f", "g", "h", "i"] if t]
    assert [d.tolist() for d in corpus.documents] == [list(t) + [256] for t in expected]
    saved = data_lib.load_corpus(
        DataConfig(source=str(tmp_path / "d" / "saved"), text_field="body", max_documents=1)
    )
    assert [d.tolist() for d in saved.documents] == [[104, 256]]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["j"]})}).save_to_disk(
        tmp_path / "dict"
    )
    with pytest.raises(DataError, match=r"dict holds the splits \['train'\]: name one split's"):
        data_lib.load_corpus(DataConfig(source=str(tmp_path / "dict")))
    with pytest.raises(DataError, match=r"a.parquet: column 'n' holds int64, not text"):
        data_lib.load_corpus(DataConfig(source=str(tmp_path / "d" / "a.parquet"), text_field="n"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: the extra is named
    with pytest.raises(
        DataError,
        match=r"saved: reading save_to_disk datasets needs datasets: "
        r"pip install -e '.\[data\]'",
    ):
        data_lib.load_corpus(DataConfig(source=str(tmp_path / "d" / "saved")))


def test_sources_and_tokenizers(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "b.jsonl").write_text('{"text": "ab"}\n\n{"text": "c", "id": 3}\n')
    np.save(tmp_path / "t.npy", np.array([5, 6, 256, 7, 256, 256, 8], np.int32))
    np.array([9, 256, 10], np.uint16).tofile(tmp_path / "u.bin")
    corpus = data_lib.load_corpus(DataConfig(source=str(tmp_path)))
    docs = [d.tolist() for d in corpus.documents]
    assert docs == [
        list("héllo".encode()) + [256],
        [97, 98, 256],
        [99, 256],
        [5, 6, 256],
        [7, 256],
        [8],
        [9, 256],
        [10],
    ]
    assert corpus.vocab_size == 257 and corpus.eod_id == 256
    one = data_lib.load_corpus(DataConfig(source=str(tmp_path / "b.jsonl"), max_documents=1))
    assert len(one.documents) == 1

    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.txt").write_text("hello world zzz")
    c = data_lib.load_corpus(
        DataConfig(source=str(tmp_path / "w"), tokenizer=str(tmp_path / "tokenizer.json"))
    )
    assert [d.tolist() for d in c.documents] == [[2, 3, 0, 1]] and c.eod_id == 1


def test_modes_consume_the_same_pieces_deterministically_and_resume():
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 256, n), 256) for n in rng.integers(1, 150, 60)]
    pieces = data_lib.cut_pieces(docs, 64)
    assert max(map(len, pieces)) <= 64 and sum(map(len, pieces)) == sum(map(len, docs))

    def stream(mode, steps, **kw):
        b = data_lib.Batcher(pieces, mode=mode, seq_len=64, batch_size=4, seed=3, **kw)
        seen = []
        for _ in range(steps):
            arr = next(b)["arrays"]
            for toks, seg in zip(
                arr["tokens"].reshape(-1, arr["tokens"].shape[-1]),
                arr["segment_ids"].reshape(-1, arr["tokens"].shape[-1]),
            ):
                for s in range(1, seg.max() + 1):
                    seen.append(tuple(toks[seg == s]))
        return b, seen

    packed, seen_packed = stream("packed", 10)
    n = packed.consumed
    assert 40 < n < len(pieces) and packed.carry
    _, seen_padded = stream("padded", -(-n // 4))
    _, seen_single = stream("single", n)
    order = np.random.default_rng([3, 0]).permutation(len(pieces))
    expected = [tuple(pieces[i]) for i in order[:n]]
    # Packed mode places pieces out of order and carries some to the next batch: every piece
    # pulled from the stream is either placed exactly once or still carried.
    carried = [tuple(pieces[order[g]]) for g, _ in packed.carry]
    assert sorted(seen_packed + carried) == sorted(expected)
    assert seen_padded[:n] == expected and seen_single == expected
    # ... and fills its rows better than padding does (the same pieces).
    greedy, _ = stream("packed", 10, pack_policy="greedy")
    eff = {
        m: data_lib.estimate_efficiency(
            pieces,
            DataConfig(
                seq_len=64, batch_size=4, seed=3, pack_policy=m, long_docs="cut", stream_groups=1
            ),
            steps=10,
        )
        for m in ("first_fit_decreasing", "greedy")
    }
    print(eff)
    assert eff["first_fit_decreasing"]["packed"] > 0.97 > eff["first_fit_decreasing"]["padded"]
    assert eff["greedy"]["packed"] > eff["greedy"]["padded"]

    # Resuming from a saved position continues the same stream (across an epoch boundary too).
    a = data_lib.Batcher(pieces, mode="packed", seq_len=64, batch_size=4, seed=3, grad_accum=2)
    for _ in range(30):
        next(a)
    b = data_lib.Batcher(pieces, mode="packed", seq_len=64, batch_size=4, seed=3, grad_accum=2)
    b.restore(json.loads(json.dumps(a.state())))
    for _ in range(5):
        x, y = next(a)["arrays"], next(b)["arrays"]
        assert all(np.array_equal(x[k], y[k]) for k in data_lib.BATCH_KEYS)
    assert a.epoch > 1


@pytest.mark.parametrize(
    "mode, steps, options, digest",
    [
        ("packed", 60, {}, "d02525d2b12f6632"),
        ("packed", 60, {"pack_policy": "greedy"}, "1dd94ec56e5c5844"),
        ("packed", 25, {"grad_accum": 3}, "0c76a616ddbd252b"),
        ("padded", 20, {}, "4d2e85ef21cf3d6a"),
        ("single", 40, {}, "4bc450977d14d796"),
        ("packed", 30, {"shuffle": False, "wrap": False}, "e0efea3bf16f379a"),
    ],
)
def test_batches_are_those_of_the_batcher_before_packing_moved(mode, steps, options, digest):
    """Digests of the batches (and the final stream position) that train/data.py's Batcher
    made at commit 86d9189, before its packing decisions moved to jax_packmamba.packing."""
    rng = np.random.default_rng(7)
    docs = [np.append(rng.integers(0, 256, n), 256) for n in rng.integers(1, 300, 150)]
    pieces = data_lib.cut_pieces(docs, 96)
    b = data_lib.Batcher(pieces, mode=mode, seq_len=96, batch_size=5, seed=11, **options)
    h = hashlib.sha256()
    for _ in range(steps):
        batch = next(b)
        for k in data_lib.BATCH_KEYS:
            h.update(np.ascontiguousarray(batch["arrays"][k]).tobytes())
        h.update(repr(sorted(batch["stats"].items())).encode())
    h.update(repr(b.state()).encode())
    assert h.hexdigest()[:16] == digest


@pytest.mark.parametrize(
    "policy, count, digest",
    [("first_fit_decreasing", 20, "c7b64be65f7bb0fd"), ("greedy", 23, "d46a6217eb6ab79d")],
)
def test_eval_batches_are_those_before_packing_moved(policy, count, digest):
    rng = np.random.default_rng(7)
    docs = [np.append(rng.integers(0, 256, n), 256) for n in rng.integers(1, 300, 150)]
    pieces = data_lib.cut_pieces(docs, 96)[:120]
    config = DataConfig(
        seq_len=96,
        batch_size=5,
        seed=11,
        pack_policy=policy,
        eval_batches=50,
        long_docs="cut",
        stream_groups=1,
    )
    batches = data_lib.eval_batches(pieces, config)
    h = hashlib.sha256()
    for batch in batches:
        for k in data_lib.BATCH_KEYS:
            h.update(np.ascontiguousarray(batch["arrays"][k]).tobytes())
    assert (len(batches), h.hexdigest()[:16]) == (count, digest)


def test_loss_mask_no_target_across_boundaries_or_on_padding():
    pieces = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 22), np.array([30])]
    b = data_lib.Batcher(pieces, mode="packed", seq_len=8, batch_size=2, shuffle=False, wrap=False)
    arr = {k: v[0] for k, v in next(b)["arrays"].items()}
    seg, mask, tok, tgt = arr["segment_ids"], arr["loss_mask"], arr["tokens"], arr["targets"]
    assert b.consumed == 4
    assert not mask[seg == 0].any()  # padding
    rows, cols = np.nonzero(mask)
    # Every target is the next token of the same segment.
    assert (seg[rows, cols + 1] == seg[rows, cols]).all() and (
        tgt[rows, cols] == tok[rows, cols + 1]
    ).all()
    # Each piece's last token has no target: 11 targets for 11 tokens in 4 pieces.
    assert mask.sum() == (5 - 1) + (3 - 1) + (2 - 1) + 0


def test_packed_loss_equals_each_sequence_alone():
    config = MambaConfig.preset("tiny", n_layer=2, d_model=32, d_state=4, vocab_size=257)
    graphdef, params = nnx.split(nnx.jit(lambda: MambaLM(config, rngs=nnx.Rngs(0)))())
    rng = np.random.default_rng(1)
    pieces = [rng.integers(0, 257, n) for n in (9, 5, 14, 3, 7)]
    b = data_lib.Batcher(pieces, mode="packed", seq_len=16, batch_size=3, shuffle=False, wrap=False)
    arr = next(b)["arrays"]
    assert b.consumed == 5
    # One program each, XLA's backend optimisations off on CPU (tests/compiled.py).
    xs = (params, *(arr[k][0] for k in data_lib.BATCH_KEYS))
    token_losses = lambda p, *a: step_lib.token_losses(graphdef, p, *a)  # noqa: E731
    ce, n = compiled(("packed_token_losses",), token_losses, *xs)(*xs)
    # Each piece alone in its own row, at column 0, without segment_ids (causal: the padding
    # after it cannot change its logits).
    alone = np.zeros((len(pieces), 16), np.int32)
    for i, p in enumerate(pieces):
        alone[i, : len(p)] = p
    forward = lambda params, x: nnx.merge(graphdef, params)(x)  # noqa: E731
    logits = compiled(("alone_logits",), forward, params, alone)(params, alone)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    expected = -sum(logp[i, np.arange(len(p) - 1), p[1:]].sum() for i, p in enumerate(pieces))
    print("packed", float(ce), "alone", expected)
    assert int(n) == sum(len(p) - 1 for p in pieces)
    np.testing.assert_allclose(float(ce), expected, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# Optimizer and step.


def test_weight_decay_mask():
    config = MambaConfig.preset("tiny", n_layer=1, d_model=16, d_state=2, proj_bias=True)
    _, params = step_lib.model_graphdef(config)
    mask = step_lib.decay_mask(params)
    got = {"/".join(step_lib._names(p)): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, m in got.items() if m)
    # "layers": the blocks stacked on a leading layer axis (each mixer matrix is 3-D there).
    assert decayed == [
        "embedding/embedding",
        "layers/mixer/conv_weight",
        "layers/mixer/dt_proj/kernel",
        "layers/mixer/in_proj/kernel",
        "layers/mixer/out_proj/kernel",
        "layers/mixer/x_proj/kernel",
    ]
    for name in (
        "layers/mixer/A_log",
        "layers/mixer/D",
        "layers/norm/weight",
        "norm_f/weight",
        "layers/mixer/dt_proj/bias",
        "layers/mixer/in_proj/bias",
        "layers/mixer/conv_bias",
    ):
        assert got[name] is False, name


def test_grad_accumulation_equals_one_big_batch_and_schedule():
    config = MambaConfig.preset("tiny", n_layer=1, d_model=16, d_state=2, vocab_size=257)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1)
    tx = step_lib.make_optimizer(optim, total_steps=10)
    graphdef, _ = step_lib.model_graphdef(config)
    rng = np.random.default_rng(2)
    pieces = [rng.integers(0, 257, n) for n in rng.integers(2, 30, 40)]
    b = data_lib.Batcher(pieces, mode="packed", seq_len=32, batch_size=2, grad_accum=2, seed=0)
    batch = next(b)["arrays"]
    big = {k: v.reshape(1, 4, 32) for k, v in batch.items()}  # the two micro-batches as one
    state = compiled(("grad_accum_init",), lambda: step_lib.init_state(config, tx, 0))()

    def step(state, x):  # one program per batch shape, XLA's backend optimisations off on CPU
        fn = lambda s, x: step_lib.train_step(s, x, graphdef=graphdef, tx=tx)  # noqa: E731
        return compiled(("grad_accum_step",), fn, state, x)(state, x)

    s1, m1 = step(state, batch)
    s2, m2 = step(state, big)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    assert int(m1["targets"]) == int(batch["loss_mask"].sum())
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    sched = step_lib.learning_rate_schedule(optim, 10)
    np.testing.assert_allclose([sched(0), sched(2), sched(10)], [0.0, 1e-2, 1e-3], rtol=1e-6)


def test_no_progress_bar_redraws_into_a_file(capsys):
    """Under pytest stderr is captured, not a terminal: progress is the log lines alone."""
    progress = Progress(total=10, initial=0, enabled=True)
    progress.update(1, "loss 1.0")
    progress.log("step 1")
    progress.close()
    assert progress.bar is None and capsys.readouterr() == ("step 1\n", "")


def test_peak_flops_table():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None


# ------------------------------------------------------------------------------------------------
# End to end.


def test_smoke_run_end_to_end(tmp_path):
    """TINY's documents from a Parquet file; the metrics also go to TensorBoard."""
    out = tmp_path / "run"
    source = write_parquet(tmp_path / "docs.parquet", {"text": stdlib_texts(24)}, row_group_size=5)
    args = TINY + [
        "--run.steps=8",
        "--run.checkpoint_every=3",
        "--run.keep_checkpoints=2",
        "--run.eval_every=4",
        "--run.plot=true",
        "--optim.lr=1e-2",
        f"--run.out_dir={out}",
        f"--data.source={source}",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["loss_last"] < summary["loss_first"] - 0.2
    assert summary["eval_loss"] is not None and summary["tokens_per_s"] > 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
        6,
        8,
    ]
    assert sorted(losses(out)) == list(range(1, 9)) and (out / "loss.png").stat().st_size > 1000
    evals = {
        r["step"]: r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r
    }
    events = tensorboard_scalars(out / "tensorboard")
    assert sorted(evals) == [4, 8] and events["eval/loss"] == pytest.approx(evals, rel=1e-6)
    # Running it again finds the finished checkpoint and does nothing.
    assert main(args) == 0
    assert sorted(losses(out)) == list(range(1, 9))
    # Starting over without saying so is refused.
    assert main(args + ["--run.resume=false"]) == 2


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    run = [
        "--run.steps=30",
        "--run.checkpoint_every=1",
        "--optim.lr=1e12",
        "--optim.warmup_steps=0",
        "--optim.clip_norm=0",
        "--data.long_docs=cut",  # the train state restored below holds no carry
    ]
    code = main(TINY + run + [f"--run.out_dir={out}", "--run.export_models=false"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err, err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert all(np.isfinite(v) for v in losses(out).values())  # reported, not logged
    assert (
        steps
        and steps[-1] < 30
        and f"Last good checkpoint: {out / 'checkpoints'}/{steps[-1]}" in err
    )
    from train.checkpoint import Checkpointer

    ck = Checkpointer(out / "checkpoints", keep=3)
    config = parse_args(TINY + run)  # the optimizer the run used (no clipping)
    mc = config.model.mamba_config(vocab_size=257, backend="cpu")
    tx = step_lib.make_optimizer(config.optim, 30)
    abstract = jax.eval_shape(lambda: step_lib.init_state(mc, tx, 0))
    state, meta = ck.restore(
        steps[-1],
        abstract,
        jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract),
    )
    ck.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert meta["step"] == steps[-1] == int(state.step)


# The same tiny run four ways: plain (the reference), on 8 host devices, killed and resumed.
RESUMABLE = TINY + [
    "--run.steps=9",
    "--run.checkpoint_every=2",
    "--run.eval_every=0",
    "--optim.lr=1e-2",
]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted single-device run; its compiled programs go to a persistent compilation
    cache that the later subprocess runs of the same programs reuse (seconds instead of tens)."""
    root = tmp_path_factory.mktemp("train_runs")
    cache = root / "jax_cache"
    out = finish(run_cli(RESUMABLE + [f"--run.out_dir={root / 'ref'}"], cache=cache))
    assert "1 x cpu" in out
    return root / "ref", cache


def test_sharded_8_devices_matches_single_device(tmp_path, reference_run):
    ref, cache = reference_run
    out = finish(
        run_cli(
            RESUMABLE + ["--mesh.data=4", "--mesh.fsdp=2", f"--run.out_dir={tmp_path}"],
            devices=8,
            cache=cache,
        )
    )
    assert "8 x cpu" in out and "mesh data=4 fsdp=2" in out
    a, b = losses(tmp_path), losses(ref)
    print("8 devices", a, "\n1 device ", b)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    np.testing.assert_allclose([a[k] for k in b], [b[k] for k in b], rtol=2e-5)


def test_killed_run_resumes_with_the_same_losses(tmp_path, reference_run):
    ref, cache = reference_run
    victim = run_cli(RESUMABLE + [f"--run.out_dir={tmp_path}"], cache=cache)
    lines = []
    for line in victim.stdout:  # blocks until the trainer prints; no sleeping
        lines.append(line)
        if line.startswith("checkpoint step 4"):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(lines)
    assert max(losses(tmp_path)) < 9
    resumed = finish(run_cli(RESUMABLE + [f"--run.out_dir={tmp_path}"], cache=cache))
    assert "resume  from" in resumed, resumed
    restored = int(resumed.split("(step ")[1].split(",")[0])
    assert 2 <= restored <= 4  # the save of step 4 may not have finished before the kill
    a, b = losses(tmp_path), losses(ref)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    np.testing.assert_allclose([a[k] for k in b], [b[k] for k in b], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The trainer's step as the benchmarks measure it.


@pytest.mark.parametrize("long_docs, groups", [("cut", 1), ("link_across_steps", 2)])
def test_trainer_builds_the_step_program_bench_train_measures(long_docs, groups):
    # bench_train's peaks stand for `python -m train` only if both compile the same program:
    # same model config (preset -> MambaConfig), same build arguments, the state donated. Its
    # link_across_steps mode: the carried step (the carry donated with the rest), and the
    # trainer's batches (workloads.carried_batches: the same row streams of the same documents).
    from benchmarks import workloads
    from train import sharding, trainer

    optim = workloads.optim_config()
    rows = 8
    args = [
        "--model.preset=mamba2-tiny",
        "--data.max_documents=24",
        "--data.seq_len=64",
        f"--data.batch_size={rows}",
        f"--data.long_docs={long_docs}",
        f"--data.stream_groups={groups}",
        f"--run.steps={workloads.SCHEDULE_STEPS}",
        *(f"--optim.{f.name}={getattr(optim, f.name)}" for f in dataclasses.fields(optim)),
    ]
    p = trainer.prepare(parse_args(args))
    ours = trainer.build_step(p)
    bench_config = workloads.model_config("mamba2-tiny", backend=jax.default_backend())
    assert p.model_config == bench_config
    carried = long_docs == "link_across_steps"
    bench = workloads.train_setup(
        bench_config,
        jax.devices()[0],
        carry_rows=rows if carried else None,
        stream_groups=groups,
    ).compiled
    assert (bench.abstract_state.carry is not None) == carried
    batcher = trainer.make_batcher(p)
    host = [next(batcher)["arrays"] for _ in range(3 if carried else 1)]
    if carried:
        mine = workloads.carried_batches(
            p.train_pieces, seq_len=64, rows=rows, seed=p.config.data.seed, groups=groups, steps=3
        )
        for theirs, b in zip(host, mine, strict=True):
            assert sorted(b["arrays"]) == sorted(theirs)
            for k in theirs:
                np.testing.assert_array_equal(b["arrays"][k], theirs[k])
        assert sum(b["continuing"] for b in mine) == sum(h["continues"].sum() for h in host) > 0
    batch = sharding.put_batch(host[0], sharding.batch_sharding(p.mesh))
    texts = [c.train_step.lower(c.abstract_state, batch).as_text() for c in (ours, bench)]
    assert texts[0] == texts[1]
    donated = texts[0].count("tf.aliasing_output")
    assert donated == len(jax.tree.leaves(ours.abstract_state)) > 0


def test_trainer_sets_the_gpu_memory_fraction_before_jax_starts(monkeypatch):
    # Under jax's default (0.75 of the device) mamba2-1.3b at 8 x 2048 ran out of memory on an
    # 80 GB H100 that bench_train's children (0.95) trained it on.
    from train import sharding

    var = sharding.MEM_FRACTION_VAR
    code = (
        "import os, sys; from train import config, trainer; "
        "trainer.prepare(config.parse_args(sys.argv[1:])); import jax; "
        f"assert jax.devices(); print(os.environ.get({var!r}))"
    )
    env = {k: v for k, v in subprocess_env().items() if k != var}
    out = subprocess.run(
        [sys.executable, "-c", code, *TINY], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == sharding.MEM_FRACTION
    # A value already set wins; once the backend has started nothing is set.
    assert sharding.default_memory_fraction({var: "0.5"}) == "0.5"
    child = {}
    assert sharding.default_memory_fraction(child) == sharding.MEM_FRACTION == child[var]
    monkeypatch.delenv(var, raising=False)
    jax.devices()
    assert sharding.default_memory_fraction() is None and var not in os.environ
