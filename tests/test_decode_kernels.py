"""The decode-step kernels (pallas_kernels/decode) against the unfused step, and one block's
decode step with each decode_impl against its XLA decode step.

Parametrized over "pallas_interpret" (the Triton kernels through the Pallas interpreter, on CPU)
and "pallas" (the same kernels on a GPU; skipped without one). Shapes are ragged against the
blocks: batches of 3 and 20 (16-row blocks), 200 channels (64- and 32-channel blocks), a dt_rank
of 12 (padded to 16). Plus a test that lowers the kernels for CUDA on this CPU machine.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.model import MixerState, mixer_core_xla
from pallas_kernels.decode import DecodeConfig, mixer_core_pallas
from tests.gpu import lower_for_cuda, on_gpu

IMPLS = ["pallas_interpret", on_gpu("pallas")]


def core_args(batch, d_inner, d_state, dt_rank, d_conv, dtype, *, conv_bias=True, D=True, seed=0):
    k = jax.random.split(jax.random.key(seed), 10)
    c = dtype
    normal = lambda key, shape, scale=1.0: (scale * jax.random.normal(key, shape)).astype(c)  # noqa: E731
    xz = normal(k[0], (batch, 2 * d_inner))
    conv_state = normal(k[1], (batch, d_conv - 1, d_inner))
    ssm_state = jax.random.normal(k[2], (batch, d_inner, d_state), jnp.float32)
    conv_weight = normal(k[3], (d_inner, d_conv), 0.5)
    bias = normal(k[4], (d_inner,), 0.5) if conv_bias else None
    x_proj = normal(k[5], (d_inner, dt_rank + 2 * d_state), d_inner**-0.5)
    dt_proj = normal(k[6], (dt_rank, d_inner), dt_rank**-0.5)
    dt_bias = jax.random.uniform(k[7], (d_inner,), jnp.float32, -4.0, -1.0)
    A_log = jnp.log(
        jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
    )
    A_log = A_log + 0.1 * jax.random.normal(k[8], A_log.shape)
    d = jax.random.normal(k[9], (d_inner,), jnp.float32) if D else None
    return xz, conv_state, ssm_state, conv_weight, bias, x_proj, dt_proj, dt_bias, A_log, d


def run(impl, args, config=None):
    fn = jax.jit(
        lambda *a: mixer_core_pallas(*a, config=config, interpret=impl == "pallas_interpret")
    )
    return fn(*args)


CASES = {
    # name: (batch, d_inner, d_state, dt_rank, d_conv, extra)
    "ragged": (3, 200, 16, 12, 4, {}),
    "two_row_blocks": (20, 200, 8, 12, 4, {}),
    "no_biases": (3, 96, 16, 8, 4, dict(conv_bias=False, D=False)),
    "width2_walk": (5, 200, 16, 12, 2, dict(config=DecodeConfig(conv_blocks_per_program=2))),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_match_the_unfused_step(impl, dtype, tol, case):
    batch, e, n, r, w, extra = CASES[case]
    extra = dict(extra)
    config = extra.pop("config", None)
    args = core_args(batch, e, n, r, w, dtype, **extra)
    # The unfused step at IEEE float32, as the kernels' float32 dots are: XLA's GPU default is
    # TF32 (~3e-4 off here), which would measure the comparison side rather than the kernels.
    with jax.default_matmul_precision("highest"):
        want = jax.jit(mixer_core_xla)(*args)
    got = run(impl, args, config)
    for name, a, b in zip(("y", "conv_state", "ssm_state"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b)))
        print(f"{case} {dtype.__name__} {name}: max rel err {err:.2e}")
        assert err < tol, (name, err)
    # The conv state is a shift: exact in any dtype.
    np.testing.assert_array_equal(np.asarray(got[1][:, :-1]), np.asarray(args[1][:, 1:]))
    np.testing.assert_array_equal(np.asarray(got[1][:, -1]), np.asarray(args[0][:, :e]))


@pytest.mark.parametrize("impl", IMPLS)
def test_block_decode_step_matches_its_xla_decode_step(impl):
    config = jp.MambaConfig(d_model=48, n_layer=1, vocab_size=64, d_state=16, dt_rank=12)
    block = jp.MambaBlock(config, rngs=nnx.Rngs(3))
    k = jax.random.split(jax.random.key(4), 3)
    residual = jax.random.normal(k[0], (3, config.d_model))
    conv = jax.random.normal(k[1], (3, config.d_conv - 1, config.d_inner))
    ssm = jax.random.normal(k[2], (3, config.d_inner, config.d_state))
    # Both sides' XLA matmuls (projections; the whole step with "xla") at IEEE float32, as the
    # kernels' float32 dots are: XLA's GPU default is TF32.
    with jax.default_matmul_precision("highest"):
        want, got = (
            nnx.jit(lambda b, r, c, s, i=i: b(r, cache=MixerState(c, s), decode_impl=i))(
                block, residual, conv, ssm
            )
            for i in ("xla", impl)
        )
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1].conv, want[1].conv, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1].ssm, want[1].ssm, rtol=2e-5, atol=2e-5)


def test_kernels_lower_for_cuda_with_named_kernels_and_in_place_states():
    sds = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    b, e, n, r, w = 2, 5120, 16, 160, 4
    args = (
        sds((b, 2 * e), bf),
        sds((b, w - 1, e), bf),
        sds((b, e, n), f32),
        sds((e, w), bf),
        sds((e,), bf),
        sds((e, r + 2 * n), bf),
        sds((r, e), bf),
        sds((e,), f32),
        sds((e, n), f32),
        sds((e,), f32),
    )
    text = lower_for_cuda(lambda *a: mixer_core_pallas(*a), *args)
    names = re.findall(r'name = "(decode_[a-z_]+)"', text)
    assert sorted(names) == ["decode_conv_x_proj", "decode_ssm_update"], names
    assert text.count("__gpu$xla.gpu.triton") == 2
    # Both states are outputs aliased to their inputs (in place).
    aliases = re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)
    assert len(aliases) == 2, aliases


def test_bad_shapes_name_the_argument():
    args = list(core_args(2, 32, 16, 4, 4, jnp.float32))
    args[2] = jnp.zeros((2, 32, 8))
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        mixer_core_pallas(*args, interpret=True)
    args = list(core_args(2, 32, 12, 4, 4, jnp.float32))
    with pytest.raises(ValueError, match="power of two"):
        mixer_core_pallas(*args, interpret=True)
