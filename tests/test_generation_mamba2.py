"""Generation for Mamba2LM: packed prefill states, the decode step against the full forward,
greedy and sampled decoding, EOS, compiles. The Mamba1 engine's tests are test_generate.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.generation import (
    DecodeState,
    compile_stats,
    decode_batch,
    generate,
    prefill,
    prefill_batch,
    prepare,
    step,
    stream,
)
from jax_packmamba.sampling import SamplingConfig
from tests.gpu import ieee_float32_on_gpu, on_gpu

# Two groups of 4 heads (headdim 16), chunks of 8 so that prompts cross chunk edges, D per
# channel. Prompt lengths: 1 and 2 (shorter than the conv window), multiples of the chunk (24,
# 32) and not (17, 23, 30); packed in rows of 32, 30 + 2 and 24 + 1 share rows, so the second
# prompt of a row starts mid-chunk or on a chunk edge. Most prompt sets below pack into 2 rows
# of 32 for 4 prompts, so that they share their compiled shapes (the tests' time is compiles).
CONFIG = jp.Mamba2Config.preset("tiny", chunk_size=8, ngroups=2, D_has_hdim=True)
PROMPT_LENGTHS = (1, 2, 17, 23, 24, 30, 32)
FORWARD_LENGTH = 64


def perturbed(model):
    """The model with weights far from their initialisation (a larger embedding, norm weights
    and D off one, a stronger out_proj), so that logits are spread and every layer matters."""
    graph, state = nnx.split(model)
    rng = np.random.default_rng(7)  # numpy: jax.random would compile once per shape

    def change(path, x):
        names = [str(getattr(k, "key", "")) for k in path]
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if names[0] == "embedding":
            return jnp.asarray(0.3 * noise)
        if names[-1] == "weight" or names[-1] == "D":
            return x + 0.3 * noise
        if names[-2:] == ["out_proj", "kernel"]:
            return 4.0 * x
        return x

    return nnx.merge(graph, jax.tree_util.tree_map_with_path(change, state))


def random_model(config, seed):
    return perturbed(nnx.jit(lambda: jp.Mamba2LM(config, rngs=nnx.Rngs(seed)))())


def with_dtype(model, dtype):
    """The same weights in a model computing in `dtype`."""
    config = dataclasses.replace(model.config, dtype=dtype)
    graph, _ = nnx.split(nnx.eval_shape(lambda: jp.Mamba2LM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graph, nnx.split(model)[1])


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, 0)


@pytest.fixture(scope="module")
def prepared(model):
    return prepare(model)


@pytest.fixture(scope="module")
def forward(model):
    """Full-forward logits (float32) at the last token of a sequence, on a fixed-length buffer
    (the model is causal, so what follows does not matter) to compile once."""
    run = nnx.jit(lambda m, ids: m(ids))

    def last_logits(seq):
        ids = np.zeros((1, FORWARD_LENGTH), np.int32)
        ids[0, : len(seq)] = seq
        return np.asarray(run(model, jnp.asarray(ids))[0, len(seq) - 1], np.float32)

    return last_logits


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).astype(np.int32) for n in lengths]


def stacked(state):
    return DecodeState(np.stack(state.conv), np.stack(state.ssm))


def test_packed_prefill_states_equal_separate_prefills_and_stepping(prepared, forward):
    # Two XLA programs compared at float32 tolerances: on a GPU both at IEEE float32.
    with ieee_float32_on_gpu():
        _check_packed_prefill_states(prepared, forward)


def _check_packed_prefill_states(prepared, forward):
    prompts = prompts_of(PROMPT_LENGTHS)
    logits, state = prefill(prepared, prompts)
    logits, state = np.asarray(logits), stacked(state)
    c = CONFIG
    assert state.conv.shape == (c.n_layer, len(prompts), c.d_conv - 1, c.conv_dim)
    assert state.ssm.shape == (c.n_layer, len(prompts), c.nheads, c.headdim, c.d_state)
    worst = dict(logits=0.0, conv=0.0, ssm=0.0)
    for i, p in enumerate(prompts):
        alone_logits, alone = prefill(prepared, [p])
        alone = stacked(alone)
        # Tight, not bitwise: packed, a prompt starts at another offset in its chunks (and its
        # row has another length), so the chunked scan sums its terms in another order.
        for name, got, want in (
            ("logits", logits[i], alone_logits[0]),
            ("conv", state.conv[:, i], alone.conv[:, 0]),
            ("ssm", state.ssm[:, i], alone.ssm[:, 0]),
        ):
            worst[name] = max(worst[name], float(np.max(np.abs(got - np.asarray(want)))))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name} {i}")
        # The same state built one token at a time from zeros by the decode step, and the same
        # last logits as the full forward pass.
        stepped = DecodeState(tuple(np.zeros_like(alone.conv)), tuple(np.zeros_like(alone.ssm)))
        for token in p:
            step_logits, stepped = step(prepared, jnp.asarray([token]), stepped)
        stepped = stacked(stepped)
        np.testing.assert_allclose(state.conv[:, i], stepped.conv[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.ssm[:, i], stepped.ssm[:, 0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits[i], step_logits[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[i], forward(p), rtol=1e-5, atol=1e-4)
    print("packed vs alone, max |difference|:", worst)
    # A prompt shorter than the conv window: the window starts with zeros, then its token's xBC.
    assert np.all(state.conv[:, 0, :2] == 0) and np.all(np.any(state.conv[:, 0, 2] != 0, axis=-1))


def test_greedy_decoding_equals_argmax_of_the_full_forward(prepared, forward):
    prompts = prompts_of((1, 8, 13, 30), seed=1)
    new = 10
    outputs = generate(prepared, prompts, new, temperature=0)
    for p, out in zip(prompts, outputs):
        assert out.shape == (new,)
        seq = list(p)
        for _ in range(new):  # teacher-forced: the model's own tokens, recomputed from scratch
            seq.append(int(np.argmax(forward(seq)[: CONFIG.vocab_size])))
        np.testing.assert_array_equal(out, seq[len(p) :])
    assert len({tuple(o) for o in outputs}) == len(outputs)  # the prompts matter


def test_eos_stops_each_sequence_and_a_repeat_call_compiles_nothing(prepared):
    prompts = prompts_of((4, 11, 6, 28), seed=2)
    free = generate(prepared, prompts, 10, temperature=0)
    eos = int(free[1][3])  # sequence 1 stops after its 4th token
    stopped = generate(prepared, prompts, 10, temperature=0, eos_id=eos)
    for f, s in zip(free, stopped):
        hits = np.flatnonzero(f == eos)
        np.testing.assert_array_equal(s, f[: hits[0] + 1] if hits.size else f)
    assert len(stopped[1]) <= 4
    with compile_stats() as stats:  # new prompts and sampling values, the same buckets
        generate(prepared, prompts_of((5, 9, 7, 27), seed=3), 12, temperature=0, eos_id=eos + 1)
    assert stats.compiles == 0


def test_sampling_paths_run_seeded_within_the_vocabulary(prepared):
    prompts = prompts_of((5, 1, 17, 30), seed=4)
    greedy = generate(prepared, prompts, 8, temperature=0)
    top1 = generate(prepared, prompts, 8, temperature=0.7, top_k=1, seed=3)
    for g, t in zip(greedy, top1):
        np.testing.assert_array_equal(g, t)
    for sampling in (
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.2, top_p=0.9),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.3),
    ):
        first = generate(prepared, prompts, 8, seed=11, **sampling)
        again = generate(prepared, prompts, 8, seed=11, **sampling)
        for a, b in zip(first, again):
            assert a.shape == (8,) and a.min() >= 0 and a.max() < CONFIG.vocab_size, sampling
            np.testing.assert_array_equal(a, b)
    other = generate(prepared, prompts, 8, temperature=1.0, seed=12)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(other, generate(prepared, prompts, 8, temperature=1.0, seed=11))
    )


def test_streaming_yields_growing_prefixes_of_the_unstreamed_result(prepared):
    prompts = prompts_of((3, 20, 29, 12), seed=5)
    sampling = SamplingConfig(temperature=0.9, top_k=30, seed=2)
    tokens, count = decode_batch(prepared, prefill_batch(prepared, prompts), 11, sampling)
    seen = [0]
    parts = stream(prepared, prefill_batch(prepared, prompts), 11, sampling, block=4)
    for part, part_count in parts:  # noqa: B007 (the last count is checked below)
        assert part.shape[1] > seen[-1]
        seen.append(part.shape[1])
        np.testing.assert_array_equal(part, tokens[:, : part.shape[1]])
    assert seen[1:] == [1, 5, 9, 11]
    np.testing.assert_array_equal(part_count, count)


def test_bfloat16_prepared_model_matches_the_model_forward(model):
    model = with_dtype(model, "bfloat16")
    prepared = prepare(model, embedding_in_compute_dtype=False)
    mixer = prepared.params["layers"][0]["mixer"]
    for name in ("in_proj", "out_proj"):
        assert mixer[name]["kernel"][...].dtype == jnp.bfloat16
    assert mixer["conv_weight"][...].dtype == jnp.bfloat16
    for name in ("A_log", "D", "dt_bias"):
        assert mixer[name][...].dtype == jnp.float32, name
    assert mixer["norm"]["weight"][...].dtype == jnp.float32
    prompts = prompts_of((5, 12), seed=6)
    # A float32 state (a bfloat16 model's default is bfloat16): the step against the forward.
    logits, state = prefill(prepared, prompts, state_dtype="float32")
    step_logits, _ = step(prepared, jnp.asarray([3, 4]), state)
    # The full forward over each prompt plus that token, both in one padded batch (causal: the
    # padding after a sequence does not change its logits).
    ids = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p) + 1] = np.append(p, 3 + i)
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), np.float32)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(logits[i], full[i, len(p) - 1], rtol=0, atol=0.1)
        np.testing.assert_allclose(step_logits[i], full[i, len(p)], rtol=0, atol=0.1)


def test_pallas_decode_step_generates_what_the_xla_step_does(prepared):
    # The decode kernels (the state update, the residual add + norm) through the interpreter,
    # inside the jitted loop, greedy and sampled; "auto" is "xla" off a GPU.
    prompts = prompts_of((1, 8, 13, 30), seed=1)  # the greedy test's shapes
    for sampling in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=3)):
        xla = generate(prepared, prompts, 4, decode_impl="xla", **sampling)
        kernels = generate(prepared, prompts, 4, decode_impl="pallas_interpret", **sampling)
        for a, b in zip(xla, kernels):
            np.testing.assert_array_equal(a, b)
    auto = generate(prepared, prompts, 4, temperature=0)
    for a, b in zip(generate(prepared, prompts, 4, decode_impl="xla", temperature=0), auto):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_pallas_step_leaves_the_gated_norm_scale_to_the_next_add(impl, monkeypatch):
    # One norm group over all channels (ngroups 1, as the released models): the Pallas step
    # hands each block's output on unscaled with its sums of squares (a ScaledOut) and the
    # next add + norm kernel scales it. One step's logits and states against the XLA step.
    from jax_packmamba.mamba2 import defers_norm

    config = dataclasses.replace(CONFIG, ngroups=1)
    assert not defers_norm(config, impl)  # off until timed on a GPU
    monkeypatch.setattr("pallas_kernels.decode.config.MAMBA2_DEFER_NORM", True)
    assert defers_norm(config, impl) and not defers_norm(CONFIG, impl)
    assert not defers_norm(config, "xla")
    assert_step_matches_the_xla_step(prepare(random_model(config, 1)), impl, seed=4)


def assert_step_matches_the_xla_step(prepared, impl, seed):
    """One decode step after a packed prefill: logits and states against the XLA step's."""
    _, state = prefill(prepared, prompts_of((3, 9), seed=seed))
    tokens = jnp.asarray([5, 7])
    want = step(prepared, tokens, state, decode_impl="xla")
    got = step(prepared, tokens, state, decode_impl=impl)
    tol = 1e-5 if jax.default_backend() == "cpu" else 5e-3  # a GPU's XLA step: TF32 products
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_pallas_step_with_add_norm_in_proj(impl, decode_rule):
    # One step's logits and states against the XLA step with each block's residual add and
    # norm inside its fused in_proj kernel (Mamba2Mixer.decode_after_add; off by default).
    # d_model 128, d_inner 256 and xBC's 320 channels tile the fused kernel.
    decode_rule("ADD_NORM_IN_PROJ_ROWS", 16)
    config = dataclasses.replace(CONFIG, d_model=128, d_state=32)
    assert_step_matches_the_xla_step(prepare(random_model(config, 2)), impl, seed=5)


@pytest.mark.parametrize("defer_norm", [False, True])
def test_decode_loop_lowers_for_cuda_with_three_kernels_a_layer(defer_norm, monkeypatch):
    # The jitted loop as a GPU runs it: each layer's step (one function, lowered once) holds
    # the add + norm kernel, the conv kernel and the state-update kernel, the last two writing
    # the conv state and the SSM state in place. With the norm's scale deferred, the first
    # layer's zero `pending` is a ScaledOut too: still one layer step for all.
    monkeypatch.setattr("pallas_kernels.decode.config.MAMBA2_DEFER_NORM", defer_norm)
    import re

    from jax_packmamba import generation as gen
    from tests.gpu import lower_for_cuda

    config = jp.Mamba2Config.preset("tiny", n_layer=2, dtype="bfloat16")
    prepared_model = prepare(jp.Mamba2LM(config, rngs=nnx.Rngs(0)))
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    sds = jax.ShapeDtypeStruct
    size, vocab = 4, config.padded_vocab_size
    ssm_shape = (size, config.nheads, config.headdim, config.d_state)
    state = DecodeState(
        conv=(sds((size, config.d_conv - 1, config.conv_dim), jnp.bfloat16),) * 2,
        ssm=(sds(ssm_shape, gen.resolve_state_dtype(None, config)),) * 2,  # bfloat16
    )
    run = jax.eval_shape(
        lambda *a: gen._start(*a, mode=sampling.mode, vocab_size=config.vocab_size, columns=16),
        sds((size, vocab), jnp.float32),
        state,
        sds((size, vocab), jnp.bool_),
        jax.random.key(0),
        sampling.params(),
        jnp.int32(3),
    )
    import pallas_kernels.decode  # noqa: F401  (before tracing: its __init__ says why)

    text = lower_for_cuda(
        lambda m, r, p: gen._decode_loop(
            m, r, jnp.int32(16), p, mode=sampling.mode, impl="pallas", vocab_size=config.vocab_size
        ),
        prepared_model,
        run,
        sampling.params(),
        auto_axes=True,
    )
    layer_step = text.split("func.func private @_layer_step(", 1)[1].split("func.func", 1)[0]
    names = re.findall(r'name = "(decode_[a-z_]+)"', layer_step)
    assert sorted(names) == ["decode_add_rms_norm", "decode_conv", "decode_ssd_update"], names
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", layer_step)) == 3
    calls = re.findall(r"call @_layer_step\(([^)]*)\)", text.split("stablehlo.while", 1)[1])
    assert len(calls) == 2 and len(set(calls)) == 2, calls
