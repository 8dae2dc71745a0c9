"""The decode SSM state's storage dtype (generation's state_dtype): the default (the model's
compute dtype, as mamba_ssm: bfloat16 for a bfloat16 model, float32 for a float32 one and for
Mamba-3), bfloat16 state across prefill and decode steps for both families, both decode impls,
packing, bad values, the command line's --state-dtype. The other generation tests' models are
float32 (a float32 state by default); those comparing a bfloat16 model's decode with its full
forward ask for a float32 state."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_packmamba as jp
from jax_packmamba.generation import (
    DecodeState,
    generate,
    prefill,
    prefill_batch,
    prepare,
    resolve_state_dtype,
    step,
)
from tests.test_generation_mamba2 import CONFIG as MAMBA2_CONFIG
from tests.test_generation_mamba2 import random_model, with_dtype

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
BF16 = jnp.bfloat16


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def prepared(request):
    if request.param == "mamba1":
        # The "tied" parity checkpoint: perturbed random weights, logits far from uniform.
        return prepare(jp.from_pretrained(FIXTURES / "tied"))
    return prepare(random_model(MAMBA2_CONFIG, 0))


def prompts_of(config, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in lengths]


def teacher_forced(prepared, prompts, forced, state_dtype, impl="xla"):
    """Logits (steps + 1, p, v) of the prefill and of stepping the given tokens (steps, p),
    and the states after each step (checked to keep the storage dtype)."""
    logits, state = prefill(prepared, prompts, state_dtype=state_dtype)
    out, states = [np.asarray(logits)], [state]
    for tokens in forced:
        logits, state = step(prepared, jnp.asarray(tokens), state, decode_impl=impl)
        out.append(np.asarray(logits))
        states.append(state)
    return np.stack(out), states


def test_bfloat16_state_stays_bfloat16_and_tracks_the_float32_state(prepared):
    config = prepared.config
    prompts = prompts_of(config, (1, 5, 13))
    forced = np.random.default_rng(1).integers(0, config.vocab_size, (4, len(prompts)))
    want, want_states = teacher_forced(prepared, prompts, forced, "float32")
    got, got_states = teacher_forced(prepared, prompts, forced, "bfloat16")
    for state, f32 in zip(got_states, want_states):
        assert all(s.dtype == BF16 for s in state.ssm)
        assert all(s.dtype == jnp.float32 for s in f32.ssm)
        for c, c32 in zip(state.conv, f32.conv):  # the conv state keeps its dtype
            assert c.dtype == c32.dtype
    # The prefill hands over the float32 state rounded: the same prefill, then one cast.
    for s, s32 in zip(got_states[0].ssm, want_states[0].ssm):
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s32.astype(BF16)))
    # A step updates in float32 and rounds once: stepping the bfloat16 state gives the
    # rounding of stepping the same values held in float32.
    widened = DecodeState(
        got_states[0].conv, tuple(s.astype(jnp.float32) for s in got_states[0].ssm)
    )
    logits32, next32 = step(prepared, jnp.asarray(forced[0]), widened, decode_impl="xla")
    np.testing.assert_allclose(got[1], logits32, rtol=1e-5, atol=1e-5)
    for s, s32 in zip(got_states[1].ssm, next32.ssm):
        np.testing.assert_allclose(
            np.asarray(s, np.float32), np.asarray(s32.astype(BF16), np.float32), rtol=1e-2
        )
        # No more than one bfloat16 rounding apart (an XLA fusion may round differently).
        assert np.mean(np.asarray(s) == np.asarray(s32.astype(BF16))) > 0.99
    # Logits within a bfloat16 state's error of the float32-state run (relative to their
    # spread), and not equal to them: the state really was rounded.
    scale = np.max(np.abs(want), axis=-1, keepdims=True)
    err = np.max(np.abs(got - want) / scale)
    print(f"{type(config).__name__}: max |bf16 - f32 state logits| / max |logits| = {err:.2e}")
    assert err < 2e-2
    assert np.any(got[1:] != want[1:])


def test_pallas_kernels_store_the_bfloat16_state_as_the_xla_step_does(prepared):
    config = prepared.config
    prompts = prompts_of(config, (3, 8))
    forced = np.random.default_rng(2).integers(0, config.vocab_size, (2, len(prompts)))
    want, want_states = teacher_forced(prepared, prompts, forced, "bfloat16")
    got, got_states = teacher_forced(prepared, prompts, forced, "bfloat16", "pallas_interpret")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for state, xla in zip(got_states, want_states):
        for s, s_xla in zip(state.ssm, xla.ssm):
            assert s.dtype == BF16
            np.testing.assert_allclose(
                np.asarray(s, np.float32), np.asarray(s_xla, np.float32), rtol=1e-2, atol=1e-5
            )


def test_packed_prompts_generate_what_each_generates_alone(prepared):
    # The decode loop carries the bfloat16 state (its carry's dtype is fixed: a step that
    # widened it would not trace), and packing changes nothing a prompt gets.
    config = prepared.config
    # Alone, each prompt gets a row of the next power of two of its length (at least 2), a
    # prefill compile each: 1 and 2 share one.
    prompts = prompts_of(config, (1, 7, 20, 2), seed=3)
    packed = generate(prepared, prompts, 6, temperature=0, state_dtype="bfloat16")
    for p, out in zip(prompts, packed):
        alone = generate(prepared, [p], 6, temperature=0, state_dtype=jnp.bfloat16)[0]
        np.testing.assert_array_equal(out, alone)
    kernels = generate(
        prepared, prompts, 6, temperature=0, state_dtype="bfloat16", decode_impl="pallas_interpret"
    )
    for a, b in zip(packed, kernels):
        np.testing.assert_array_equal(a, b)


def test_a_float32_model_stores_a_float32_state_by_default(prepared):
    assert prepared.config.dtype == "float32"
    prompts = prompts_of(prepared.config, (4, 9))
    default = prefill_batch(prepared, prompts)
    named = prefill_batch(prepared, prompts, state_dtype="float32")
    for a, b in zip(jax.tree.leaves(default.state), jax.tree.leaves(named.state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(s.dtype == jnp.float32 for s in default.state.ssm)


@pytest.mark.parametrize("bad", ["float16", "bf16", jnp.float16, 3, object()])
def test_bad_state_dtype_is_refused_naming_the_argument(bad):
    model = prepare(jp.from_pretrained(FIXTURES / "tied"))
    with pytest.raises(ValueError, match="state_dtype"):
        generate(model, [[1, 2]], 2, state_dtype=bad)
    with pytest.raises(ValueError, match="state_dtype"):
        prefill_batch(model, [[1, 2]], state_dtype=bad)


def test_mamba3_refuses_a_bfloat16_state():
    config = jp.Mamba3Config.preset("tiny")
    with pytest.raises(ValueError, match="state_dtype"):
        resolve_state_dtype("bfloat16", config)
    assert resolve_state_dtype(None, config) == jnp.float32
    assert resolve_state_dtype("float32", config) == jnp.float32


def test_the_default_state_dtype_is_the_compute_dtype():
    # As mamba_ssm's allocate_inference_cache (the weights' dtype) for Mamba1, Mamba2 and a
    # hybrid's Mamba2 layers; Mamba-3's state stays float32, as does a float16 model's (no
    # float16 state here) and one resolved without a model.
    from tests.test_hybrid import CONFIG as HYBRID_CONFIG

    bf16_mamba1 = jp.MambaConfig.preset("tiny", dtype="bfloat16")
    f32_mamba2 = jp.Mamba2Config.preset("tiny")
    for config, want in (
        (bf16_mamba1, BF16),
        (jp.Mamba2Config.preset("tiny", dtype="bfloat16"), BF16),
        (dataclasses.replace(HYBRID_CONFIG, dtype="bfloat16"), BF16),
        (jp.MambaConfig.preset("tiny"), jnp.float32),
        (f32_mamba2, jnp.float32),
        (HYBRID_CONFIG, jnp.float32),
        (jp.MambaConfig.preset("tiny", dtype="float16"), jnp.float32),
        (jp.Mamba3Config.preset("tiny"), jnp.float32),
        (jp.Mamba3Config.preset("tiny", dtype="bfloat16"), jnp.float32),
        (None, jnp.float32),
    ):
        assert resolve_state_dtype(None, config) == want, config
    # Either dtype can still be asked for.
    assert resolve_state_dtype("float32", bf16_mamba1) == jnp.float32
    assert resolve_state_dtype(jnp.float32, bf16_mamba1) == jnp.float32
    assert resolve_state_dtype("bfloat16", f32_mamba2) == BF16


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def bf16_prepared(request):
    if request.param == "mamba1":
        return prepare(jp.from_pretrained(FIXTURES / "tied", dtype="bfloat16"))
    return prepare(with_dtype(random_model(MAMBA2_CONFIG, 0), "bfloat16"))


def test_a_bfloat16_model_stores_a_bfloat16_state_by_default(bf16_prepared, monkeypatch):
    from jax_packmamba import generation

    prepared = bf16_prepared
    assert prepared.config.dtype == "bfloat16"
    prompts = prompts_of(prepared.config, (4, 9), seed=5)
    # Each layer hands back its state already rounded: no layer's float32 state outlives its
    # layer (all layers' together were the peak of a large batch's prefill).
    layer_dtypes, prefill_layer = [], generation._prefill_layer

    def spy(*args, **kwargs):
        out = prefill_layer(*args, **kwargs)
        layer_dtypes.append(out[2].dtype)
        return out

    monkeypatch.setattr(generation, "_prefill_layer", spy)
    default = prefill_batch(prepared, prompts)
    assert layer_dtypes == [BF16] * prepared.config.n_layer
    named = prefill_batch(prepared, prompts, state_dtype="bfloat16")
    f32 = prefill_batch(prepared, prompts, state_dtype="float32")
    assert all(s.dtype == BF16 for s in default.state.ssm)
    assert all(s.dtype == jnp.float32 for s in f32.state.ssm)
    for a, b in zip(jax.tree.leaves(default.state), jax.tree.leaves(named.state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for s, s32 in zip(default.state.ssm, f32.state.ssm):  # the same prefill, rounded
        np.testing.assert_array_equal(np.asarray(s), np.asarray(s32.astype(BF16)))
    # The default's decode is the explicit bfloat16 state's, token for token (greedy).
    tokens = generate(prepared, prompts, 6, temperature=0)
    for a, b in zip(tokens, generate(prepared, prompts, 6, temperature=0, state_dtype="bfloat16")):
        assert a.shape == (6,)
        np.testing.assert_array_equal(a, b)


def test_hybrid_mamba2_layers_store_the_bfloat16_state():
    # The hybrid's Mamba2 blocks share Mamba2's decode path: their MixerState.ssm is stored in
    # bfloat16 by the prefill and by a decode step, KV caches and conv states as they were.
    # (Packed equals alone: test_hybrid's generation with the hybrid's own state, and the
    # Mamba2 families' bfloat16-state generation above.)
    from flax import nnx

    from jax_packmamba.model import LM, MixerState
    from tests.test_hybrid import CONFIG as HYBRID_CONFIG

    prepared = prepare(LM(HYBRID_CONFIG, rngs=nnx.Rngs(8)))
    prompts = prompts_of(HYBRID_CONFIG, (1, 9, 2), seed=4)  # 1 and 2 share a row length alone
    f32, bf16 = (
        prefill_batch(prepared, prompts, state_dtype=d).state for d in ("float32", "bfloat16")
    )
    is_mixer = lambda c: isinstance(c, MixerState)  # noqa: E731
    mixers = [c for c in jax.tree.leaves(bf16, is_leaf=is_mixer) if is_mixer(c)]
    assert mixers and all(c.ssm.dtype == BF16 for c in mixers)
    others = lambda t: [  # noqa: E731
        x for c in jax.tree.leaves(t, is_leaf=is_mixer) for x in ([c.conv] if is_mixer(c) else [c])
    ]
    for a, b in zip(others(bf16), others(f32)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = mixers[0].conv.shape[0]  # the prefill's batch bucket
    _, stepped = step(prepared, jnp.arange(3, 3 + rows), bf16)
    assert jax.tree.structure(stepped) == jax.tree.structure(bf16)
    assert [a.dtype for a in jax.tree.leaves(stepped)] == [a.dtype for a in jax.tree.leaves(bf16)]


@pytest.mark.parametrize(
    "dtype,flag,asked,stored",
    [
        # auto (the default): generation's None, the compute dtype.
        ("bfloat16", "auto", None, BF16),
        ("float32", None, None, jnp.float32),
        ("bfloat16", "float32", "float32", jnp.float32),
        ("float32", "bfloat16", "bfloat16", BF16),
    ],
)
def test_command_line_passes_state_dtype_to_the_prefill(
    tmp_path, capsys, monkeypatch, dtype, flag, asked, stored
):
    from flax import nnx

    import jax_packmamba.generate as cli
    from jax_packmamba.tokenizer import ByteTokenizer

    config = jp.MambaConfig.preset("tiny", d_model=32)  # vocab 256: bytes
    model = jp.MambaLM(config, rngs=nnx.Rngs(0))
    jp.save_pretrained(model, tmp_path)
    seen = []
    real = cli.prefill_batch

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append((k["state_dtype"], out.state.ssm[0].dtype))
        return out

    monkeypatch.setattr(cli, "prefill_batch", spy)
    flags = ["--checkpoint", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "5"]
    flags += ["--temperature", "0", "--no-compilation-cache", "--dtype", dtype]
    flags += [] if flag is None else ["--state-dtype", flag]
    assert cli.main(flags) == 0
    assert seen == [(asked, stored)]
    want_model = jp.from_pretrained(tmp_path, dtype=dtype)
    want = generate(prepare(want_model), [list(b"Hello")], 5, temperature=0, state_dtype=stored)
    text = ByteTokenizer().decode([*b"Hello", *want[0].tolist()])
    assert capsys.readouterr().out == f"--- 'Hello'\n{text}\n"
