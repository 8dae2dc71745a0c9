"""The Mamba-3 model: config checks, packed equals alone, generation's packed prefill and decode
steps equal the full forward, and the tiny preset learning through the training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba import generation
from jax_packmamba.config import preset_config
from tests.compiled import compiled
from train import data as data_lib
from train import sharding
from train import step as step_lib
from train.config import MeshConfig, OptimConfig, parse_args

# 1 layer with its MLP, d_model 32 (4 heads of 16), d_state 8 (2 angles), chunks of 8.
SMALL = dict(n_layer=1, d_model=32, d_state=8, d_intermediate=64)


def small_model(seed=0, **overrides):
    config = jp.Mamba3Config.preset("tiny", **{**SMALL, **overrides})
    return jp.LM(config, rngs=nnx.Rngs(seed))


def logits_of(model, ids, seg=None):
    """model(ids, seg), compiled once per model structure and shapes at CPU's fast compile."""
    graphdef, params = nnx.split(model)

    def forward(params, ids, seg):
        return nnx.merge(graphdef, params)(ids, seg)

    return compiled(("mamba3_logits", graphdef), forward, params, ids, seg)(params, ids, seg)


def test_mamba3_config_checks():
    with pytest.raises(ValueError, match="multiple of headdim"):
        jp.Mamba3Config(d_model=20, headdim=16)
    with pytest.raises(ValueError, match="mimo_rank"):
        jp.Mamba3Config(is_mimo=True, mimo_rank=0)
    with pytest.raises(ValueError, match="rope_fraction"):
        jp.Mamba3Config(rope_fraction=0.25)
    with pytest.raises(ValueError, match="d_intermediate"):
        jp.Mamba3Config(d_intermediate=-1)
    with pytest.raises(ValueError, match="scan_impl"):
        jp.Mamba3Config(scan_impl="triton")
    config = preset_config("mamba3-1.5b")
    assert isinstance(config, jp.Mamba3Config) and config.mlp_hidden == 5504
    assert 1.4e9 < config.num_params() < 1.6e9
    model = small_model()
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == model.config.num_params()


def test_mamba3_packed_equals_alone_and_decode_continues_prefill():
    model = small_model()
    rng = np.random.default_rng(0)
    lengths = (1, 8, 11)  # a length of 1, one chunk, one not a chunk multiple
    docs = [rng.integers(0, 256, n) for n in lengths]
    ids = jnp.asarray(np.concatenate(docs)[None], jnp.int32)
    seg = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None])
    packed = logits_of(model, ids, seg)
    # Each document alone: its full forward, which the decode steps below also match.
    full = [logits_of(model, jnp.asarray(d[None], jnp.int32))[0] for d in docs]
    start = 0
    for doc, alone in zip(docs, full):
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
        start += len(doc)

    # jp.generate's engine: every document's first tokens prefilled in one packed pass, then
    # the rest decoded one token at a time: the logits of the full forward.
    split = 5
    prepared = generation.prepare(model)
    logits, state = generation.prefill(prepared, [d[:split] for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_allclose(logits[i], full[i][min(split, len(d)) - 1], rtol=1e-4, atol=1e-4)
    for t in range(split, max(lengths)):
        tokens = jnp.asarray([d[t] if t < len(d) else 0 for d in docs], jnp.int32)
        logits, state = generation.step(prepared, tokens, state, decode_impl="xla")
        for i, d in enumerate(docs):
            if t < len(d):
                np.testing.assert_allclose(logits[i], full[i][t], rtol=1e-4, atol=1e-4)


def test_mamba3_mimo_mixer_decode_continues_packed_prefill():
    """The MIMO mixer (rank 2, chunks of 4, the gated out-norm per rank): decode steps
    (one-token scans from the cache) continue a packed prefill's per-slot caches as the packed
    full sequences do (packed equals alone: tests/test_mamba3_mimo.py)."""
    config = jp.Mamba3Config.preset(
        "tiny", **SMALL, is_mimo=True, mimo_rank=2, chunk_size=4, is_outproj_norm=True
    )
    mixer = jp.Mamba3Mixer(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    lengths, split = (1, 4, 7), 3
    hidden = jnp.asarray(rng.standard_normal((1, sum(lengths), config.d_model)), jnp.float32)
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
    starts = np.cumsum((0,) + lengths)
    packed, _ = mixer(hidden, seg)
    # Prefill each sequence's first tokens in one packed row, then decode the rest.
    heads = [hidden[:, a : a + min(split, b - a)] for a, b in zip(starts[:-1], starts[1:])]
    pseg = np.repeat(np.arange(len(lengths)), [h.shape[1] for h in heads])[None]
    _, cache = mixer(jnp.concatenate(heads, 1), jnp.asarray(pseg), num_segments=len(lengths))
    cache = jax.tree.map(lambda a: a[0], cache)  # (slots, ...): one row per sequence
    step = jax.jit(lambda m, h, c: m(h, cache=c))
    for t in range(split, max(lengths)):
        rows = jnp.stack([hidden[0, min(a + t, b - 1)] for a, b in zip(starts[:-1], starts[1:])])
        out, cache = step(mixer, rows, cache)
        for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            if a + t < b:
                np.testing.assert_allclose(out[i], packed[0, a + t], rtol=1e-4, atol=1e-5)


def test_mamba3_tiny_step_learns_a_repeated_batch():
    config = parse_args(
        [
            "--model.preset=mamba3-tiny",
            "--model.n_layer=1",
            "--model.d_model=32",
            "--model.d_state=8",
            "--model.d_intermediate=64",
        ]
    )
    mc = config.model.mamba_config(vocab_size=257, backend="cpu")
    assert isinstance(mc, jp.Mamba3Config)
    mesh = sharding.make_mesh(MeshConfig())
    built = step_lib.build(mc, OptimConfig(lr=1e-2, warmup_steps=0), 10, mesh)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 257, n) for n in (50, 9, 33, 64, 20, 17, 40)]
    batch = next(data_lib.Batcher(pieces, mode="packed", seq_len=64, batch_size=4, seed=0))
    assert batch["stats"]["sequences"] > 4  # packed: several documents share rows
    arrays = sharding.put_batch(batch["arrays"], sharding.batch_sharding(mesh))
    state = built.init(0)
    mask = step_lib.decay_mask(state.params)
    decayed = sorted(
        "/".join(step_lib._names(p)) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m
    )
    assert decayed == [
        "embedding/embedding",
        "layers/mixer/in_proj/kernel",
        "layers/mixer/out_proj/kernel",
        "layers/mlp/fc1/kernel",
        "layers/mlp/fc2/kernel",
    ]
    losses = []
    for _ in range(6):
        state, metrics = built.train_step(state, arrays)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5
