"""Mamba2LM: presets and initialisation as mamba_ssm, packing isolation through the whole model,
and recurrent decoding (prefill + step) against the full forward pass."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.model import MixerState
from tests.compiled import compiled

# Two groups and D per channel, so that the group plumbing and both D shapes are exercised;
# chunk 16, so that the rows below cross several chunk edges.
CONFIG = jp.Mamba2Config.preset(
    "tiny", n_layer=2, d_model=32, vocab_size=61, d_state=8, headdim=8, ngroups=2, chunk_size=16
)


def params_of(model):
    return nnx.state(model, nnx.Param)


def test_presets_and_param_counts():
    c = jp.Mamba2Config.preset("mamba2-130m")
    assert (c.n_layer, c.d_model, c.d_inner, c.nheads, c.d_state, c.ngroups, c.chunk_size) == (
        24,
        768,
        1536,
        24,
        128,
        1,
        256,
    )
    assert c == jp.Mamba2Config.preset("130m")
    assert c.padded_vocab_size == 50288  # the released checkpoints pad to a multiple of 16
    assert (c.conv_dim, c.d_in_proj) == (1792, 3352)
    # mamba_ssm's Mamba2 layer at d_model 768: in_proj 768 x 3352, conv 1792 x 4 + 1792,
    # dt_bias, A_log and D 24 each, norm 1536, out_proj 1536 x 768, block norm 768; 24 layers,
    # the tied 50288 x 768 embedding and the final norm: 128,989,632 ("mamba2-130m").
    per_layer = 768 * 3352 + 1792 * 5 + 3 * 24 + 1536 + 1536 * 768 + 768
    assert c.num_params() == 24 * per_layer + 50288 * 768 + 768 == 128_989_632
    # The module holds what num_params counts (one layer of the preset, abstractly: the count
    # is linear in n_layer).
    one_layer = dataclasses.replace(c, n_layer=1)
    abstract = nnx.eval_shape(lambda: jp.Mamba2LM(one_layer, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(params_of(abstract))) == one_layer.num_params()
    sizes = {
        name: (jp.Mamba2Config.preset(name).n_layer, jp.Mamba2Config.preset(name).d_model)
        for name in ("370m", "780m", "1.3b", "2.7b")
    }
    assert sizes == {"370m": (48, 1024), "780m": (48, 1536), "1.3b": (48, 2048), "2.7b": (64, 2560)}
    # The released models' names: 368M, 780M, 1.34B, 2.70B.
    millions = [
        round(jp.Mamba2Config.preset(n).num_params() / 1e6)
        for n in ("370m", "780m", "1.3b", "2.7b")
    ]
    assert millions == [368, 780, 1344, 2703]
    model = jp.Mamba2LM(CONFIG, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(params_of(model))) == CONFIG.num_params()
    assert CONFIG.padded_vocab_size == 64
    config = jp.Mamba2Config.preset("tiny", D_has_hdim=True, proj_bias=True, tie_embeddings=False)
    model = jp.Mamba2LM(config, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(params_of(model))) == config.num_params()
    assert jp.Mamba2Config.preset("1.3b").flops_per_token() > 6 * 1.3e9


def test_bad_config():
    with pytest.raises(ValueError, match="unknown Mamba2 preset"):
        jp.Mamba2Config.preset("7b")
    with pytest.raises(ValueError, match="multiple of headdim"):
        jp.Mamba2Config(d_model=100, headdim=64)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        jp.Mamba2Config(d_model=96, headdim=64, ngroups=2)  # 3 heads
    with pytest.raises(ValueError, match="headdim must be a positive int"):
        jp.Mamba2Config(headdim=0)
    with pytest.raises(ValueError, match="A_init_range"):
        jp.Mamba2Config(A_init_range=(0.0, 16.0))
    with pytest.raises(ValueError, match="dtype"):
        jp.Mamba2Config(dtype="int8")


def test_initialisation_follows_mamba_ssm():
    config = jp.Mamba2Config.preset("tiny", d_model=64, n_layer=4, headdim=4)  # 32 heads
    mixer = jp.Mamba2LM(config, rngs=nnx.Rngs(1)).layer(0).mixer
    h = config.nheads
    A = np.exp(np.asarray(mixer.A_log[...]))
    assert A.shape == (h,) and A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 1.0  # U[1, 16]
    np.testing.assert_array_equal(mixer.D[...], np.ones(h))
    dt = jax.nn.softplus(mixer.dt_bias[...])
    assert (
        dt.shape == (h,) and dt.min() >= config.dt_min * 0.999 and dt.max() <= config.dt_max * 1.001
    )
    np.testing.assert_array_equal(mixer.norm.weight[...], np.ones(config.d_inner))
    assert mixer.conv_weight[...].shape == (config.conv_dim, config.d_conv)
    assert abs(mixer.conv_weight[...]).max() <= 1 / np.sqrt(config.d_conv)
    assert abs(mixer.in_proj.kernel[...]).max() <= 1 / np.sqrt(config.d_model)
    bound = 1 / np.sqrt(config.d_inner) / np.sqrt(config.n_layer)
    assert abs(mixer.out_proj.kernel[...]).max() <= bound
    assert abs(mixer.out_proj.kernel[...]).max() > 0.9 * bound


def test_gated_norm_is_per_group_after_the_gate():
    norm = jp.RMSNormGated(8, group_size=4, eps=1e-5, dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)
    z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
    gated = np.asarray(x * jax.nn.silu(z), np.float64).reshape(3, 2, 4)
    want = gated / np.sqrt(np.mean(gated**2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(norm(x, z), want.reshape(3, 8), rtol=1e-5)


def test_compute_dtype_bfloat16_keeps_params_float32():
    config = jp.Mamba2Config.preset("tiny", dtype="bfloat16")
    model = jp.Mamba2LM(config, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_of(model)))
    logits = model(jnp.zeros((1, 5), jnp.int32))
    assert logits.dtype == jnp.bfloat16 and logits.shape == (1, 5, config.padded_vocab_size)
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))


LENGTHS = [1, 9, 38, 1, 35]  # total 84; the 38 spans chunk edges (16) and starts inside a chunk


def packed_row(rng):
    seqs = [rng.integers(0, CONFIG.vocab_size, n) for n in LENGTHS]
    ids = np.concatenate(seqs)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)])[None]
    return seqs, jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, ids, seg):
    """The model's logits, jitted once per shape (an eager nnx call compiles op by op)."""
    return nnx.merge(graphdef, params)(ids, seg)


def logits_and_grads(model, ids, seg, cotangent):
    """Logits and parameter gradients, one program per shape (forward and backward together),
    compiled with XLA's backend optimisations off on CPU (tests/compiled.py)."""
    graphdef, params = nnx.split(model)

    def run(params, ids, seg, cotangent):
        logits, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p)(ids, seg), params)
        return logits, vjp(cotangent)[0]

    xs = (params, ids, seg, cotangent)
    return compiled(("mamba2_logits_and_grads", graphdef), run, *xs)(*xs)


def test_packed_batch_gives_each_sequence_its_alone_logits_and_grads():
    model = jp.Mamba2LM(CONFIG, rngs=nnx.Rngs(2))
    seqs, ids, seg = packed_row(np.random.default_rng(0))
    cot = jax.random.normal(jax.random.key(3), (1, ids.shape[1], CONFIG.padded_vocab_size))
    logits, packed_grads = logits_and_grads(model, ids, seg, cot)
    # Alone: each sequence at the start of its own row without segment_ids, all in one batch
    # (one compile). The model is causal, so the tokens after a sequence (zeros) change none of
    # its logits, and with a zero cotangent there they add nothing to the gradients: the
    # batch's gradient is the sum of the sequences' gradients alone.
    longest = max(LENGTHS)
    alone_ids = np.zeros((len(seqs), longest), np.int32)
    alone_cot = np.zeros((len(seqs), longest, CONFIG.padded_vocab_size), np.float32)
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        alone_ids[i, : len(seq)] = seq
        alone_cot[i, : len(seq)] = cot[0, start : start + len(seq)]
    alone, summed = logits_and_grads(model, jnp.asarray(alone_ids), None, jnp.asarray(alone_cot))
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        np.testing.assert_allclose(
            logits[0, start : start + len(seq)], alone[i, : len(seq)], rtol=1e-5, atol=1e-5
        )
    # atol 5e-5: gradients of size ~50 summed in another order (1.5e-5 seen on the embedding
    # with the layers unrolled).
    for (path, a), b in zip(jax.tree.leaves_with_path(packed_grads), jax.tree.leaves(summed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5, err_msg=jax.tree_util.keystr(path))


def test_perturbing_one_sequence_leaves_others_bit_identical():
    model = jp.Mamba2LM(CONFIG, rngs=nnx.Rngs(4))
    seqs, ids, seg = packed_row(np.random.default_rng(1))
    victim = slice(sum(LENGTHS[:2]), sum(LENGTHS[:3]))
    cot = jax.random.normal(jax.random.key(5), (1, ids.shape[1], CONFIG.padded_vocab_size))
    cot = cot.at[:, victim].set(0.0)  # parameter gradients then come from the other sequences only
    noisy_ids = ids.at[:, victim].set((ids[:, victim] + 7) % CONFIG.vocab_size)
    logits0, grads0 = logits_and_grads(model, ids, seg, cot)
    logits1, grads1 = logits_and_grads(model, noisy_ids, seg, cot)
    assert not np.array_equal(logits0[:, victim], logits1[:, victim])
    keep = np.ones(ids.shape[1], bool)
    keep[victim] = False
    np.testing.assert_array_equal(logits0[:, keep], logits1[:, keep])
    for (path, a), b in zip(jax.tree.leaves_with_path(grads0), jax.tree.leaves(grads1)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@functools.partial(nnx.jit, static_argnums=3)
def prefill_lm(model, ids, seg, num_segments):
    """The packed prefill: -> (logits (b, t, v), [MixerState (b, s, ...)] per layer)."""
    logits, cache = model(ids, seg, num_segments=num_segments)
    return logits, [jax.tree.map(lambda x: x[i], cache) for i in range(model.config.n_layer)]


@nnx.jit
def step_lm(model, tokens, states):
    """One decode step: tokens (b,) -> (logits (b, v), states)."""
    logits, cache = model(tokens, cache=jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    return logits, [jax.tree.map(lambda x: x[i], cache) for i in range(model.config.n_layer)]


def test_prefill_and_step_equal_the_full_forward():
    """Prompts prefilled in one packed row (one shorter than the conv window), then decoded
    token by token from each prompt's slot state: the logits of the full forward pass over
    prompt + continuation, alone."""
    model = jp.Mamba2LM(CONFIG, rngs=nnx.Rngs(6))
    rng = np.random.default_rng(7)
    prompt_lengths, steps = [2, 20, 7], 4
    seqs = [rng.integers(0, CONFIG.vocab_size, n + steps) for n in prompt_lengths]
    ids = np.concatenate([s[:n] for s, n in zip(seqs, prompt_lengths)] + [np.zeros(3, np.int64)])[
        None
    ]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(prompt_lengths)] + [np.zeros(3)])[
        None
    ]
    logits, states = prefill_lm(model, jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32), 4)
    ends = np.cumsum(prompt_lengths) - 1
    assert states[0].conv.shape == (1, 4, CONFIG.d_conv - 1, CONFIG.conv_dim)
    assert states[0].ssm.shape == (1, 4, CONFIG.nheads, CONFIG.headdim, CONFIG.d_state)
    # One decoding row per prompt, from its slot (ids 1, 2, 3).
    states = [MixerState(conv=s.conv[0, 1:], ssm=s.ssm[0, 1:]) for s in states]
    # Full forward passes alone, as rows of one batch (causal: the zeros after a row's
    # sequence change none of its logits).
    rows = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        rows[i, : len(s)] = s
    full = np.asarray(forward(*nnx.split(model), jnp.asarray(rows), None))
    for i, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(logits[0, ends[i]], full[i][n - 1], rtol=1e-5, atol=1e-5)
    for k in range(steps):
        tokens = jnp.asarray([s[n + k] for s, n in zip(seqs, prompt_lengths)], jnp.int32)
        step_logits, states = step_lm(model, tokens, states)
        for i, n in enumerate(prompt_lengths):
            np.testing.assert_allclose(step_logits[i], full[i][n + k], rtol=1e-4, atol=1e-4)


def test_bad_model_input():
    model = jp.Mamba2LM(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids must have the shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="impl must be one of"):
        jp.Mamba2LM(jp.Mamba2Config.preset("tiny", scan_impl="cuda"), rngs=nnx.Rngs(0))(
            jnp.zeros((1, 4), jnp.int32)
        )
