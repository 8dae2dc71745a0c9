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
from pallas_kernels.decode import DecodeConfig, mixer_core_pallas, mixer_pallas, pick_config
from tests.compiled import compiled
from tests.gpu import lower_for_cuda, on_gpu

IMPLS = ["pallas_interpret", on_gpu("pallas")]


def host_random(seed):
    """normal(shape, scale, dtype) and uniform(shape, low, high) as host arrays: no device
    compile per shape and dtype (eager jax.random costs seconds a test here)."""
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0, dtype=np.float32):
        return np.asarray(scale * rng.standard_normal(shape), np.float32).astype(dtype)

    def uniform(shape, low, high):
        return rng.uniform(low, high, shape).astype(np.float32)

    return normal, uniform


def on_device(tree):
    return jax.tree.map(jnp.asarray, tree)


def core_args(batch, d_inner, d_state, dt_rank, d_conv, dtype, *, conv_bias=True, D=True, seed=0):
    normal, uniform = host_random(seed)
    c = dtype
    xz = normal((batch, 2 * d_inner), dtype=c)
    conv_state = normal((batch, d_conv - 1, d_inner), dtype=c)
    ssm_state = normal((batch, d_inner, d_state))
    conv_weight = normal((d_inner, d_conv), 0.5, c)
    bias = normal((d_inner,), 0.5, c) if conv_bias else None
    x_proj = normal((d_inner, dt_rank + 2 * d_state), d_inner**-0.5, c)
    dt_proj = normal((dt_rank, d_inner), dt_rank**-0.5, c)
    dt_bias = uniform((d_inner,), -4.0, -1.0)
    A_log = np.log(np.broadcast_to(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, d_state)))
    A_log = A_log + normal(A_log.shape, 0.1)
    d = normal((d_inner,)) if D else None
    args = xz, conv_state, ssm_state, conv_weight, bias, x_proj, dt_proj, dt_bias, A_log, d
    return tuple(None if a is None else jnp.asarray(a) for a in args)


def assert_step_close(got, want, tol, label):
    """(y, conv_state, ssm_state) against the same from another path: shapes and dtypes equal,
    each within tol of the other's max |value|."""
    for name, a, b in zip(("y", "conv_state", "ssm_state"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b)))
        print(f"{label} {name}: max rel err {err:.2e}")
        assert err < tol, (name, err)


def run(impl, args, config=None):
    def fn(*a):
        return mixer_core_pallas(*a, config=config, interpret=impl == "pallas_interpret")

    return compiled(("mixer_core", impl, config), fn, *args)(*args)


CASES = {
    # name: (batch, d_inner, d_state, dt_rank, d_conv, extra)
    "ragged": (3, 200, 16, 12, 4, {}),
    "two_row_blocks": (20, 200, 8, 12, 4, {}),
    "no_biases": (3, 96, 16, 8, 4, dict(conv_bias=False, D=False)),
    "width2_walk": (5, 200, 16, 12, 2, dict(config=DecodeConfig(conv_blocks_per_program=2))),
    # The conv step alone (decode_conv) and x_proj as XLA's product.
    "xla_x_proj": (20, 200, 8, 12, 4, dict(config=DecodeConfig(x_proj_in_conv=False))),
    # The state kernel one row a program, dt_proj summed without a dot (ragged channels).
    "state_one_row": (3, 200, 16, 12, 4, dict(config=DecodeConfig(state_one_row=True))),
    # ... summing x_proj's 19 partials itself (16-channel conv blocks): two chunks of 16, the
    # second ragged.
    "state_sums_parts": (
        2,
        296,
        16,
        12,
        4,
        dict(config=DecodeConfig(block_conv=16, state_one_row=True, state_sums_parts=True)),
    ),
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
        want = compiled("mixer_core_xla_highest", mixer_core_xla, *args)(*args)
    got = run(impl, args, config)
    assert_step_close(got, want, tol, f"{case} {dtype.__name__}")
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


FUSED_CASES = {
    # name: (batch, d_model, d_inner, d_state, dt_rank, config fields, core_args extras)
    "ragged": (3, 96, 192, 16, 12, dict(block_conv=32, block_k=32), {}),
    "one_row_one_block": (1, 64, 64, 8, 4, dict(block_conv=64, block_k=64), {}),
    "full_row_block": (16, 128, 96, 16, 8, dict(block_conv=32, block_k=128), {}),
    # The fused kernel's one block of 32 rows, the state kernel's two of 16.
    "one_block_of_32_rows": (20, 64, 64, 16, 8, dict(block_conv=32, block_k=64), {}),
    "no_biases": (
        2,
        32,
        64,
        16,
        8,
        dict(block_conv=16, block_k=16),
        dict(conv_bias=False, D=False),
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_in_proj_fused_kernel_matches_in_proj_then_the_unfused_step(impl, dtype, tol, case):
    batch, d, e, n, r, fields, extra = FUSED_CASES[case]
    args = core_args(batch, e, n, r, 4, dtype, **extra)
    normal, _ = host_random(d)
    hidden = jnp.asarray(normal((batch, d), dtype=dtype))
    in_proj = jnp.asarray(normal((d, 2 * e), d**-0.5, dtype))
    config = DecodeConfig(fuse_in_proj=True, **fields)

    def unfused(hidden, in_proj, *core):
        return mixer_core_xla(jnp.dot(hidden, in_proj), *core)

    with jax.default_matmul_precision("highest"):
        want = compiled("in_proj_unfused_highest", unfused, hidden, in_proj, *args[1:])(
            hidden, in_proj, *args[1:]
        )

    def fused(*a):
        return mixer_pallas(*a, config=config, interpret=impl == "pallas_interpret")

    fused_args = (hidden, in_proj, *args[1:])
    got = compiled(("mixer_fused", impl, case), fused, *fused_args)(*fused_args)
    assert_step_close(got, want, tol, f"{case} {dtype.__name__}")
    # The conv state is shifted by one; its new last input is in_proj's x for this token.
    np.testing.assert_array_equal(np.asarray(got[1][:, :-1]), np.asarray(args[1][:, 1:]))
    x64 = np.asarray(hidden, np.float64) @ np.asarray(in_proj, np.float64)[:, :e]
    np.testing.assert_allclose(np.asarray(got[1][:, -1], np.float64), x64, rtol=tol, atol=tol)


ADD_NORM_CASES = {
    # name: (batch, d_model, d_inner, config fields)
    "one_row": (1, 96, 64, dict(block_conv=32, block_k=32)),
    "one_block_of_32_rows": (20, 64, 64, dict(block_conv=32, block_k=32)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(ADD_NORM_CASES))
def test_add_norm_in_the_fused_kernel_matches_the_add_the_norm_and_the_unfused_step(
    impl, dtype, tol, case
):
    # mixer_pallas(add_norm=...): the block's residual add and RMSNorm inside the fused in_proj
    # kernel (its scale applied after the product), and the same through the add + norm kernel
    # in front; both against float64's add and norm, then in_proj and the unfused step.
    from pallas_kernels.decode import ResidualNorm

    batch, d, e, fields = ADD_NORM_CASES[case]
    n, r, eps = 8, 4, 1e-5
    args = core_args(batch, e, n, r, 4, dtype, seed=3)
    normal, _ = host_random(4)
    out = jnp.asarray(normal((batch, d), dtype=dtype))
    residual = jnp.asarray(normal((batch, d), 2.0))
    norm_weight = jnp.asarray(1.0 + normal((d,), 0.1))
    in_proj = jnp.asarray(normal((d, 2 * e), d**-0.5, dtype))
    x64 = np.asarray(residual, np.float64) + np.asarray(out, np.float64)
    hidden64 = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + eps) * np.asarray(norm_weight)

    def unfused(hidden, in_proj, *core):
        return mixer_core_xla(jnp.dot(hidden, in_proj), *core)

    with jax.default_matmul_precision("highest"):
        hidden = jnp.asarray(hidden64, jnp.float32).astype(dtype)
        want = compiled("in_proj_unfused_highest", unfused, hidden, in_proj, *args[1:])(
            hidden, in_proj, *args[1:]
        )
    want_residual = np.asarray(residual) + np.asarray(out, np.float32)  # the float32 add
    for fused_norm in (True, False):
        config = DecodeConfig(fuse_in_proj=True, add_norm_in_proj=fused_norm, **fields)

        def step(out, residual, norm_weight, in_proj, *core, config=config):
            add_norm = ResidualNorm(residual, norm_weight, eps)
            return mixer_pallas(
                out,
                in_proj,
                *core,
                add_norm=add_norm,
                config=config,
                interpret=impl == "pallas_interpret",
            )

        step_args = (out, residual, norm_weight, in_proj, *args[1:])
        got = compiled(("mixer_add_norm", impl, case, fused_norm), step, *step_args)(*step_args)
        label = f"{case} {dtype.__name__} fused_norm={fused_norm}"
        assert_step_close(got[:3], want, tol, label)
        np.testing.assert_array_equal(np.asarray(got[3]), want_residual)


def test_pick_config_fuses_in_proj_at_small_batches_that_tile_evenly(monkeypatch):
    assert pick_config(1, 5120, 16, 2560).fuse_in_proj  # mamba-2.8b's widths
    assert pick_config(16, 5120, 16, 2560).fuse_in_proj
    assert not pick_config(1, 5120, 16).fuse_in_proj  # mixer_core_pallas: no in_proj
    assert not pick_config(1, 5120, 16, 2560 + 64).fuse_in_proj  # d_model off block_k
    assert not pick_config(1, 5120 + 32, 16, 2560).fuse_in_proj  # d_inner off block_conv
    # Fused at 17-32 rows by default (the fused kernel then takes one block of 32 rows,
    # mixer_pallas); the state kernel keeps 16-row blocks on 4 warps.
    cfg = pick_config(20, 5120, 16, 2560)
    assert cfg.fuse_in_proj and cfg.block_rows == 16 and cfg.num_warps_state == 4
    assert not pick_config(33, 5120, 16, 2560).fuse_in_proj
    monkeypatch.setattr("pallas_kernels.decode.config.FUSE_IN_PROJ_ROWS", 64)
    assert not pick_config(33, 5120, 16, 2560).fuse_in_proj  # one row block at most
    monkeypatch.setattr("pallas_kernels.decode.config.FUSE_IN_PROJ_ROWS", 16)
    assert not pick_config(20, 5120, 16, 2560).fuse_in_proj
    # x_proj's partials in the conv kernel up to 16 rows, XLA's product past them.
    assert pick_config(16, 5120, 16).x_proj_in_conv
    assert not pick_config(17, 5120, 16).x_proj_in_conv
    assert not pick_config(128, 5120, 16, 2560).x_proj_in_conv
    # The add + norm in the fused kernel: off until timed (ADD_NORM_IN_PROJ_ROWS 0).
    assert not pick_config(1, 5120, 16, 2560).add_norm_in_proj
    monkeypatch.setattr("pallas_kernels.decode.config.ADD_NORM_IN_PROJ_ROWS", 16)
    assert pick_config(16, 5120, 16, 2560).add_norm_in_proj
    assert not pick_config(1, 5120, 16).add_norm_in_proj  # nothing fused
    # The state kernel one row a program at batch 1 only.
    assert pick_config(1, 5120, 16, 2560).state_one_row and pick_config(1, 5120, 16).state_one_row
    assert not pick_config(2, 5120, 16, 2560).state_one_row
    # The partials summed in the state kernel: off until timed, and only one row a program.
    assert not pick_config(1, 5120, 16, 2560).state_sums_parts
    monkeypatch.setattr("pallas_kernels.decode.config.STATE_SUMS_PARTS_ROWS", 8)
    assert pick_config(1, 5120, 16, 2560).state_sums_parts
    assert not pick_config(2, 5120, 16, 2560).state_sums_parts
    monkeypatch.setattr("pallas_kernels.decode.config.FUSE_IN_PROJ_ROWS", 0)
    assert not pick_config(1, 5120, 16, 2560).fuse_in_proj
    args = core_args(2, 64, 16, 4, 4, jnp.float32)
    hidden, in_proj = jnp.zeros((2, 48)), jnp.zeros((48, 128))
    with pytest.raises(ValueError, match="fuse_in_proj needs"):
        mixer_pallas(hidden, in_proj, *args[1:], config=DecodeConfig(fuse_in_proj=True))
    with pytest.raises(ValueError, match="in_proj_weight must be"):
        mixer_pallas(hidden, jnp.zeros((32, 128)), *args[1:], interpret=True)


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
    # mixer_pallas at batch 2 (mamba-2.8b's d_model): in_proj in the conv kernel.
    fused_args = (sds((b, 2560), bf), sds((2560, 2 * e), bf), *args[1:])
    fuse = DecodeConfig(fuse_in_proj=True)
    text = lower_for_cuda(lambda *a: mixer_pallas(*a, config=fuse), *fused_args)
    names = re.findall(r'name = "(decode_[a-z_]+)"', text)
    assert sorted(names) == ["decode_in_proj_conv", "decode_ssm_update"], names
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
    # With the block's add + norm: inside the fused kernel, or its own kernel in front.
    from pallas_kernels.decode import ResidualNorm

    for in_kernel, want in (
        (True, ["decode_add_norm_in_proj_conv", "decode_ssm_update"]),
        (False, ["decode_add_rms_norm", "decode_in_proj_conv", "decode_ssm_update"]),
    ):
        config = DecodeConfig(fuse_in_proj=True, add_norm_in_proj=in_kernel)

        def step(residual, norm_weight, *a, config=config):
            add_norm = ResidualNorm(residual, norm_weight, 1e-5)
            return mixer_pallas(*a, add_norm=add_norm, config=config)

        text = lower_for_cuda(step, sds((b, 2560), f32), sds((2560,), f32), *fused_args)
        assert sorted(re.findall(r'name = "(decode_[a-z_]+)"', text)) == want
    # x_proj out of the conv kernel: the conv step alone, then XLA's product.
    split = DecodeConfig(x_proj_in_conv=False)
    text = lower_for_cuda(lambda *a: mixer_core_pallas(*a, config=split), *args)
    names = re.findall(r'name = "(decode_[a-z_]+)"', text)
    assert sorted(names) == ["decode_conv", "decode_ssm_update"], names
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
    # The state kernel one row a program (its dt_proj without a dot) lowers too, and summing
    # x_proj's partials itself it leaves no reduction to XLA.
    one_row = DecodeConfig(state_one_row=True)
    text = lower_for_cuda(lambda *a: mixer_core_pallas(*a, config=one_row), *args)
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
    assert "stablehlo.reduce" in text
    sums = DecodeConfig(state_one_row=True, state_sums_parts=True)
    text = lower_for_cuda(lambda *a: mixer_core_pallas(*a, config=sums), *args)
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
    assert "stablehlo.reduce" not in text


def test_bad_shapes_name_the_argument():
    args = list(core_args(2, 32, 16, 4, 4, jnp.float32))
    args[2] = jnp.zeros((2, 32, 8))
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        mixer_core_pallas(*args, interpret=True)
    args = list(core_args(2, 32, 12, 4, 4, jnp.float32))
    with pytest.raises(ValueError, match="power of two"):
        mixer_core_pallas(*args, interpret=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("d_model,add", [(48, True), (200, True), (48, False)])
def test_add_rms_norm_matches_the_add_and_the_norm(impl, dtype, tol, d_model, add):
    from jax_packmamba.layers import RMSNorm, decode_add_norm

    normal, _ = host_random(d_model)
    residual = jnp.asarray(normal((3, d_model), 3.0))
    out = jnp.asarray(normal((3, d_model), dtype=dtype)) if add else None
    norm = RMSNorm(d_model, eps=1e-5, dtype=dtype)
    norm.weight[...] = jnp.asarray(normal((d_model,)))

    def step(impl):
        # The norm (weights from d_model's key, dtype) is part of the program.
        fn = lambda r, o: decode_add_norm(r, o, norm, impl)  # noqa: E731
        key = ("add_norm", impl, d_model, jnp.dtype(dtype).name)
        return compiled(key, fn, residual, out)(residual, out)

    got, want = step(impl), step("xla")
    # float64: the add, then x / sqrt(mean(x^2) + eps) * weight.
    r64 = np.asarray(residual, np.float64)
    if add:
        r64 = r64 + np.asarray(out.astype(jnp.float32), np.float64)
    h64 = r64 / np.sqrt(np.mean(r64**2, -1, keepdims=True) + 1e-5) * np.asarray(norm.weight[...])
    assert got[1].dtype == want[1].dtype == dtype
    # The add is exact in float32 either way.
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[0]), r64, rtol=1e-6, atol=1e-6)
    for h in (got[1], want[1]):
        np.testing.assert_allclose(np.asarray(h, np.float64), h64, rtol=tol, atol=tol)


def test_add_rms_norm_bad_shapes_name_the_argument():
    from pallas_kernels.decode import add_rms_norm

    r, w = jnp.zeros((2, 8)), jnp.ones((8,))
    for kw, match in [
        (dict(residual=r.astype(jnp.bfloat16), out=None, weight=w), "residual must be"),
        (dict(residual=r, out=jnp.zeros((2, 4)), weight=w), "out must have"),
        (dict(residual=r, out=None, weight=jnp.ones((4,))), "weight must have"),
    ]:
        with pytest.raises(ValueError, match=match):
            add_rms_norm(**kw, eps=1e-5, dtype=jnp.float32, interpret=True)


def ssd_step_args(batch, heads, headdim, groups, d_state, dtype, *, D_shape="heads", seed=0):
    normal, uniform = host_random(seed)
    args = dict(
        state=normal((batch, heads, headdim, d_state)),
        x=normal((batch, heads, headdim), dtype=dtype),
        dt=normal((batch, heads), dtype=dtype),
        A=-np.exp(normal((heads,), 0.5)),
        B=normal((batch, groups, d_state), dtype=dtype),
        C=normal((batch, groups, d_state), dtype=dtype),
        D=None if D_shape is None else normal((heads,) if D_shape == "heads" else (heads, headdim)),
        z=normal((batch, heads, headdim), dtype=dtype),
        dt_bias=uniform((heads,), -3.0, 0.0),
    )
    return on_device(args)


SSD_CASES = {
    # name: (batch, heads, headdim, groups, d_state, D_shape, gated, block_p)
    "ragged": (3, 4, 24, 2, 20, "heads", True, None),  # headdim and d_state off the blocks
    "d_per_channel": (2, 4, 64, 1, 32, "heads_headdim", False, 16),  # 4 headdim blocks
    "no_D": (1, 2, 16, 2, 16, None, True, None),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case,dtype,tol",
    [
        ("ragged", jnp.float32, 1e-5),
        ("ragged", jnp.bfloat16, 1e-2),
        ("d_per_channel", jnp.float32, 1e-5),
        ("no_D", jnp.bfloat16, 1e-2),
    ],
)
def test_ssd_update_kernel_matches_the_xla_step_and_a_float64_loop(impl, case, dtype, tol):
    from jax_packmamba.ops import ssd_state_update
    from pallas_kernels.decode import ssd_update_pallas
    from tests.loops import ssd_scan_loop

    batch, heads, headdim, groups, d_state, D_shape, gated, block_p = SSD_CASES[case]
    steps = [
        ssd_step_args(batch, heads, headdim, groups, d_state, dtype, D_shape=D_shape, seed=s)
        for s in range(3)
    ]
    for s in steps:
        s["z"] = s["z"] if gated else None

    def kernel(state, a):
        fn = lambda state, a: ssd_update_pallas(  # noqa: E731
            state, **a, block_p=block_p, interpret=impl == "pallas_interpret"
        )
        return compiled(("ssd_update", impl, block_p), fn, state, a)(state, a)

    def xla(state, a):
        fn = lambda state, a: ssd_state_update(state, **a)  # noqa: E731
        return compiled("ssd_state_update", fn, state, a)(state, a)

    state = got_state = steps[0].pop("state")
    for s in steps[1:]:
        s.pop("state")
        s.update(A=steps[0]["A"], D=steps[0]["D"], dt_bias=steps[0]["dt_bias"])
    ys = []
    for a in steps:  # three steps, each from the kernel's own previous state
        want_state, want_y = xla(got_state, a)
        got_state, got_y = kernel(got_state, a)
        assert got_y.dtype == dtype and got_state.dtype == jnp.float32
        np.testing.assert_allclose(got_state, want_state, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(got_y, np.float32), np.asarray(want_y, np.float32), rtol=tol, atol=tol
        )
        ys.append(np.asarray(got_y, np.float64))
    with jax.enable_x64(True):
        f64 = lambda v: None if v is None else jnp.asarray(np.asarray(v, np.float32), jnp.float64)  # noqa: E731
        seq = lambda k: jnp.stack([f64(a[k]) for a in steps], axis=1)  # noqa: E731
        y64, states64 = ssd_scan_loop(
            seq("x"),
            seq("dt"),
            f64(steps[0]["A"]),
            seq("B"),
            seq("C"),
            f64(steps[0]["D"]),
            seq("z") if gated else None,
            f64(steps[0]["dt_bias"]),
            dt_softplus=True,
            initial_states=f64(state)[:, None],
        )
        y64, states64 = np.asarray(y64), np.asarray(states64)
    np.testing.assert_allclose(np.asarray(got_state), states64[:, -1], rtol=1e-4, atol=1e-4)
    for t, y in enumerate(ys):
        np.testing.assert_allclose(y, y64[:, t], rtol=2 * tol, atol=2 * tol)


def test_ssd_update_kernel_lowers_for_cuda_in_place():
    from pallas_kernels.decode import ssd_update_pallas

    sds = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    b, h, p, g, n = 2, 80, 64, 1, 128  # mamba2-2.7b
    args = (
        sds((b, h, p, n), f32),
        sds((b, h, p), bf),
        sds((b, h), bf),
        sds((h,), f32),
        sds((b, g, n), bf),
        sds((b, g, n), bf),
        sds((h,), f32),
        None,
        sds((h,), f32),
    )
    text = lower_for_cuda(lambda *a: ssd_update_pallas(*a[:7], None, a[7]), *args[:7], args[8])
    assert re.findall(r'name = "(decode_[a-z_]+)"', text) == ["decode_ssd_update"]
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 1


def test_ssd_update_kernel_bad_shapes_name_the_argument():
    from pallas_kernels.decode import ssd_update_pallas

    a = ssd_step_args(2, 4, 16, 2, 16, jnp.float32)
    for change, match in [
        (dict(state=a["state"][..., :8]), "B must be"),
        (dict(dt=a["dt"][:, :2]), "dt must have shape"),
        (dict(D=jnp.ones((3,))), "D must have shape"),
        (dict(state=a["state"].astype(jnp.float16)), "state must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            ssd_update_pallas(**{**a, **change}, interpret=True)


MAMBA2_CASES = {
    # name: (batch, heads, headdim, groups, d_state, d_conv, conv_bias, D_shape)
    # 176 conv channels (64-channel blocks ragged), headdim 24 and d_state 20 off the blocks:
    "ragged": (3, 4, 24, 2, 20, 4, True, "heads"),
    "two_row_blocks": (20, 2, 32, 1, 16, 4, False, "heads_headdim"),
    "width2_no_D": (1, 2, 16, 2, 16, 2, True, None),
}


def mamba2_core_args(batch, heads, headdim, groups, d_state, d_conv, dtype, *, conv_bias, D_shape):
    """mamba2_core_pallas's arguments, with three steps' zxbcdt (3, b, e + x + h)."""
    normal, uniform = host_random(0)
    e = heads * headdim
    x = e + 2 * groups * d_state
    args = dict(
        zxbcdt=normal((3, batch, e + x + heads), dtype=dtype),
        conv_state=normal((batch, d_conv - 1, x), dtype=dtype),
        ssm_state=normal((batch, heads, headdim, d_state)),
        conv_weight=normal((x, d_conv), 0.5, dtype),
        conv_bias=normal((x,), 0.5, dtype) if conv_bias else None,
        dt_bias=uniform((heads,), -3.0, 0.0),
        A_log=normal((heads,), 0.5),
        D=None if D_shape is None else normal((heads,) if D_shape == "heads" else (heads, headdim)),
    )
    return on_device(args)


def mamba2_step_xla(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D):
    """The unfused step (Mamba2Mixer's XLA decode path) with mamba2_core_pallas's contract."""
    from jax_packmamba.ops import causal_conv1d_step, ssd_state_update

    b, h, p, n = ssm_state.shape
    e, x = h * p, conv_state.shape[2]
    g = (x - e) // (2 * n)
    z, xBC, dt = zxbcdt[:, :e], zxbcdt[:, e : e + x], zxbcdt[:, e + x :]
    window = jnp.concatenate([conv_state, xBC[:, None]], axis=1)
    xbc = causal_conv1d_step(window, conv_weight, conv_bias)
    xs, B, C = jnp.split(xbc, [e, e + g * n], axis=-1)
    state, y = ssd_state_update(
        ssm_state, xs.reshape(b, h, p), dt, -jnp.exp(A_log), B.reshape(b, g, n),
        C.reshape(b, g, n), D, None, dt_bias, dt_softplus=True,
    )  # fmt: skip
    v = y.reshape(b, e).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    return v, window[:, 1:], state


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(MAMBA2_CASES))
def test_mamba2_core_matches_the_unfused_step_and_a_float64_loop(impl, case, dtype, tol):
    from pallas_kernels.decode import mamba2_core_pallas
    from tests.loops import causal_conv1d_loop, ssd_scan_loop

    batch, heads, headdim, groups, d_state, d_conv, conv_bias, D_shape = MAMBA2_CASES[case]
    a = mamba2_core_args(
        batch, heads, headdim, groups, d_state, d_conv, dtype, conv_bias=conv_bias, D_shape=D_shape
    )
    params = (a["conv_weight"], a["conv_bias"], a["dt_bias"], a["A_log"], a["D"])

    def kernel(zxbcdt, conv, ssm):
        fn = lambda *s: mamba2_core_pallas(*s, interpret=impl == "pallas_interpret")  # noqa: E731
        return compiled(("mamba2_core", impl), fn, zxbcdt, conv, ssm, *params)(
            zxbcdt, conv, ssm, *params
        )

    conv, ssm, vs = a["conv_state"], a["ssm_state"], []
    for zxbcdt in a["zxbcdt"]:  # three steps, each from the kernels' own previous states
        want = compiled("mamba2_step_xla", mamba2_step_xla, zxbcdt, conv, ssm, *params)(
            zxbcdt, conv, ssm, *params
        )
        got = kernel(zxbcdt, conv, ssm)
        assert_step_close(got, want, tol, f"{case} {dtype.__name__}")
        # The conv state is a shift: exact in any dtype.
        np.testing.assert_array_equal(np.asarray(got[1][:, :-1]), np.asarray(conv[:, 1:]))
        e = heads * headdim
        np.testing.assert_array_equal(
            np.asarray(got[1][:, -1]), np.asarray(zxbcdt[:, e : e + conv.shape[2]])
        )
        # Rows are separate sequences: changing one row's inputs changes no other row's bits.
        moved = kernel(zxbcdt.at[0].add(1.0), conv.at[0].add(1.0), ssm.at[0].add(1.0))
        for m, g in zip(moved, got):
            np.testing.assert_array_equal(np.asarray(m[1:]), np.asarray(g[1:]))
        _, conv, ssm = got
        vs.append(np.asarray(got[0], np.float64))

    with jax.enable_x64(True):
        f64 = lambda v: None if v is None else jnp.asarray(np.asarray(v, np.float32), jnp.float64)  # noqa: E731
        e, x = heads * headdim, a["conv_state"].shape[2]
        zxbcdt = jnp.swapaxes(f64(a["zxbcdt"]), 0, 1)  # (b, 3, ...)
        inputs = jnp.concatenate([f64(a["conv_state"]), zxbcdt[:, :, e : e + x]], axis=1)
        weight, bias = f64(a["conv_weight"]), f64(a["conv_bias"])
        xbc = causal_conv1d_loop(inputs, weight, bias, activation="silu")[:, d_conv - 1 :]
        gn = groups * d_state
        y64, states64 = ssd_scan_loop(
            xbc[..., :e].reshape(batch, 3, heads, headdim),
            zxbcdt[..., e + x :],
            -jnp.exp(f64(a["A_log"])),
            xbc[..., e : e + gn].reshape(batch, 3, groups, d_state),
            xbc[..., e + gn :].reshape(batch, 3, groups, d_state),
            f64(a["D"]),
            zxbcdt[..., :e].reshape(batch, 3, heads, headdim),
            f64(a["dt_bias"]),
            dt_softplus=True,
            initial_states=f64(a["ssm_state"])[:, None],
        )
        y64, states64 = np.asarray(y64), np.asarray(states64)
    # Against the float64 loop, which rounds nothing (the kernels round x, B and C to c), as
    # a share of each output's largest value.
    rel = lambda got, want: np.max(np.abs(got - want)) / np.max(np.abs(want))  # noqa: E731
    assert rel(np.asarray(ssm, np.float64), states64[:, -1]) < 2 * tol
    for t, v in enumerate(vs):
        assert rel(v, y64[:, t].reshape(batch, e)) < 2 * tol, t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["ragged", "two_row_blocks"])
def test_mamba2_core_hands_back_v_times_the_norm_weight_and_its_sums_of_squares(impl, dtype, case):
    # norm_weight (Mamba2Mixer's defer_norm): the gated norm over all e channels is left to
    # the caller, who needs v * weight (in the compute dtype) and sum(v^2) a row; the states
    # are what the step without it writes.
    from pallas_kernels.decode import mamba2_core_pallas, norm_parts

    batch, heads, headdim, groups, d_state, d_conv, conv_bias, D_shape = MAMBA2_CASES[case]
    a = mamba2_core_args(
        batch, heads, headdim, groups, d_state, d_conv, dtype, conv_bias=conv_bias, D_shape=D_shape
    )
    normal, _ = host_random(11)
    weight = jnp.asarray(1.0 + 0.2 * normal((heads * headdim,)))
    args = (a["zxbcdt"][1], a["conv_state"], a["ssm_state"], a["conv_weight"], a["conv_bias"])
    args += (a["dt_bias"], a["A_log"], a["D"])
    interpret = impl == "pallas_interpret"

    def run(*args, norm_weight=None):
        return mamba2_core_pallas(*args, norm_weight=norm_weight, interpret=interpret)

    v, conv, ssm = compiled(("mamba2_core", impl), run, *args)(*args)
    fn = lambda w, *args: run(*args, norm_weight=w)  # noqa: E731
    vw, conv_n, ssm_n, sumsq = compiled(("mamba2_core_norm", impl), fn, weight, *args)(
        weight, *args
    )
    assert vw.dtype == dtype and sumsq.shape == (batch, norm_parts(heads, headdim))
    np.testing.assert_array_equal(np.asarray(conv_n), np.asarray(conv))
    np.testing.assert_array_equal(np.asarray(ssm_n), np.asarray(ssm))
    v64 = np.asarray(v, np.float64)
    want = (v * weight).astype(dtype)  # one rounding of the same float32 product
    np.testing.assert_allclose(
        np.asarray(vw, np.float64), np.asarray(want, np.float64), rtol=2**-7, atol=1e-6
    )
    assert np.mean(np.asarray(vw) == np.asarray(want)) > 0.95
    np.testing.assert_allclose(
        np.asarray(sumsq, np.float64).sum(1), (v64**2).sum(1), rtol=1e-5, atol=1e-6
    )
    # Rows stay apart: another row's inputs change none of row 0's sums.
    moved = (args[0].at[1:].add(1.0), args[1].at[1:].add(1.0), args[2].at[1:].add(1.0))
    if batch > 1:
        other = compiled(("mamba2_core_norm", impl), fn, weight, *args)(weight, *moved, *args[3:])
        np.testing.assert_array_equal(np.asarray(other[3][0]), np.asarray(sumsq[0]))
        np.testing.assert_array_equal(np.asarray(other[0][0]), np.asarray(vw[0]))


@pytest.mark.parametrize("impl", IMPLS)
def test_add_rms_norm_applies_a_deferred_norm_scale(impl):
    # A ScaledOut (a Mamba2 block's decode output, its gated norm's scale not yet applied):
    # residual + out * rsqrt(sum(sumsq) / count + eps), then the block norm, against float64.
    from jax_packmamba.layers import RMSNorm, ScaledOut, decode_add_norm

    normal, _ = host_random(5)
    d, parts, count, eps = 200, 40, 640, 1e-5
    residual = jnp.asarray(normal((3, d), 3.0))
    out = jnp.asarray(normal((3, d), dtype=jnp.bfloat16))
    sumsq = jnp.asarray(np.abs(normal((3, parts), 2.0)))
    norm = RMSNorm(d, eps=1e-5, dtype=jnp.bfloat16)
    norm.weight[...] = jnp.asarray(normal((d,)))

    def step(residual, out, sumsq):
        return decode_add_norm(residual, ScaledOut(out, sumsq, count, eps), norm, impl)

    got = compiled(("add_norm_scaled", impl), step, residual, out, sumsq)(residual, out, sumsq)
    scale = 1 / np.sqrt(np.asarray(sumsq, np.float64).sum(1, keepdims=True) / count + eps)
    r64 = np.asarray(residual, np.float64) + np.asarray(out, np.float64) * scale
    h64 = r64 / np.sqrt(np.mean(r64**2, -1, keepdims=True) + 1e-5) * np.asarray(norm.weight[...])
    np.testing.assert_allclose(np.asarray(got[0], np.float64), r64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1], np.float64), h64, rtol=1e-2, atol=1e-2)
    # The XLA step (ScaledOut.value) within float32 rounding of the kernel's add.
    xla = compiled(("add_norm_scaled", "xla"), lambda *a: decode_add_norm(
        a[0], ScaledOut(a[1], a[2], count, eps), norm, "xla"), residual, out, sumsq
    )(residual, out, sumsq)  # fmt: skip
    np.testing.assert_allclose(np.asarray(xla[0]), np.asarray(got[0]), rtol=1e-6, atol=1e-6)
    from pallas_kernels.decode import add_rms_norm

    with pytest.raises(ValueError, match="out_sumsq must be"):
        add_rms_norm(residual, out, norm.weight[...], eps=eps, dtype=jnp.bfloat16,
                     out_sumsq=sumsq[:2], out_count=count, interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="out_count must be"):
        add_rms_norm(residual, out, norm.weight[...], eps=eps, dtype=jnp.bfloat16,
                     out_sumsq=sumsq, interpret=True)  # fmt: skip


def test_mamba2_core_lowers_for_cuda_in_place_and_checks_its_arguments():
    from pallas_kernels.decode import mamba2_core_pallas

    sds = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    b, h, p, g, n, w = 2, 80, 64, 1, 128, 4  # mamba2-2.7b
    e, x = h * p, h * p + 2 * g * n
    args = (sds((b, e + x + h), bf), sds((b, w - 1, x), bf), sds((b, h, p, n), bf))
    args += (sds((x, w), bf), sds((x,), bf), sds((h,), f32), sds((h,), f32), sds((h,), f32))
    out = jax.eval_shape(mamba2_core_pallas, *args)
    assert [(o.shape, o.dtype) for o in out] == [
        ((b, e), f32),
        ((b, w - 1, x), bf),
        ((b, h, p, n), bf),
    ]
    text = lower_for_cuda(lambda *a: mamba2_core_pallas(*a), *args)
    assert re.findall(r'name = "(decode_[a-z_]+)"', text) == ["decode_conv", "decode_ssd_update"]
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
    # With the norm's weight: the same two kernels, v * weight in bf16 and 160 sums a row.
    norm = lambda w, *a: mamba2_core_pallas(*a, norm_weight=w)  # noqa: E731
    out = jax.eval_shape(norm, sds((e,), f32), *args)
    assert (out[0].shape, out[0].dtype, out[3].shape) == ((b, e), bf, (b, 160))
    text = lower_for_cuda(norm, sds((e,), f32), *args)
    assert re.findall(r'name = "(decode_[a-z_]+)"', text) == ["decode_conv", "decode_ssd_update"]

    a = mamba2_core_args(2, 4, 16, 2, 16, 4, jnp.float32, conv_bias=True, D_shape="heads")
    a["zxbcdt"] = a["zxbcdt"][0]
    for change, match in [
        (dict(ssm_state=a["ssm_state"][0]), "ssm_state must be"),
        (dict(conv_state=a["conv_state"][..., :70]), "conv_state's conv_dim=70"),
        (dict(zxbcdt=a["zxbcdt"][:, :-1]), "zxbcdt must have shape"),
        (dict(conv_weight=a["conv_weight"][:, :3]), "conv_weight must have shape"),
        (dict(D=jnp.ones((3,))), "D must have shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            mamba2_core_pallas(**{**a, **change}, interpret=True)


MAMBA2_FUSED_CASES = {
    # name: (batch, heads, headdim, groups, d_state, conv_bias, D_shape); d_model 128, the
    # default tiles (block_k 128, block_conv 64): in_proj's 196 or 194 columns end in a ragged
    # block (dt's), xBC's 128 columns start after z's 64.
    "one_row_ragged": (1, 2, 32, 1, 32, True, "heads"),
    "full_row_block": (16, 4, 16, 2, 16, False, None),
    "one_block_of_32_rows": (20, 4, 16, 1, 32, True, "heads"),  # 17-32 rows: block_rows 32
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(MAMBA2_FUSED_CASES))
def test_mamba2_fused_in_proj_matches_in_proj_then_the_core(impl, case, dtype, tol):
    from pallas_kernels.decode import mamba2_core_pallas, mamba2_pallas

    batch, heads, headdim, groups, d_state, conv_bias, D_shape = MAMBA2_FUSED_CASES[case]
    a = mamba2_core_args(
        batch, heads, headdim, groups, d_state, 4, dtype, conv_bias=conv_bias, D_shape=D_shape
    )
    normal, _ = host_random(1)
    d, width = 128, a["zxbcdt"].shape[-1]
    hidden = jnp.asarray(normal((batch, d), dtype=dtype))
    in_proj = jnp.asarray(normal((d, width), d**-0.5, dtype))
    state = (a["conv_state"], a["ssm_state"], a["conv_weight"], a["conv_bias"])
    state += (a["dt_bias"], a["A_log"], a["D"])
    interpret = impl == "pallas_interpret"

    def unfused(h, w, *s):
        with jax.default_matmul_precision("highest"):
            zxbcdt = jnp.dot(h, w, preferred_element_type=jnp.float32).astype(h.dtype)
        return mamba2_core_pallas(zxbcdt, *s, interpret=interpret)

    def fused(*args):
        return mamba2_pallas(*args, fuse=True, interpret=interpret)

    args = (hidden, in_proj, *state)
    want = compiled(("mamba2_unfused", impl), unfused, *args)(*args)
    got = compiled(("mamba2_fused", impl, case), fused, *args)(*args)
    assert_step_close(got, want, tol, f"{case} {dtype.__name__}")
    # The conv state is shifted by one; its new last input is in_proj's xBC for this token.
    np.testing.assert_array_equal(np.asarray(got[1][:, :-1]), np.asarray(state[0][:, 1:]))
    e = heads * headdim
    x64 = np.asarray(hidden, np.float64) @ np.asarray(in_proj, np.float64)
    np.testing.assert_allclose(
        np.asarray(got[1][:, -1], np.float64), x64[:, e : e + state[0].shape[2]], rtol=tol, atol=tol
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", ["one_row_ragged", "one_block_of_32_rows"])
def test_mamba2_add_norm_in_the_fused_kernel_matches_the_add_the_norm_and_the_core(
    impl, case, dtype, tol, monkeypatch
):
    # mamba2_pallas(add_norm=...): the block's residual add and RMSNorm inside the fused in_proj
    # kernel (rule on) or the add + norm kernel in front (rule off), against float64's add and
    # norm, then in_proj and the unfused core.
    from pallas_kernels.decode import ResidualNorm, mamba2_core_pallas, mamba2_pallas

    batch, heads, headdim, groups, d_state, conv_bias, D_shape = MAMBA2_FUSED_CASES[case]
    a = mamba2_core_args(
        batch, heads, headdim, groups, d_state, 4, dtype, conv_bias=conv_bias, D_shape=D_shape
    )
    normal, _ = host_random(2)
    d, width, eps = 128, a["zxbcdt"].shape[-1], 1e-5
    out = jnp.asarray(normal((batch, d), dtype=dtype))
    residual = jnp.asarray(normal((batch, d), 2.0))
    norm_weight = jnp.asarray(1.0 + normal((d,), 0.1))
    in_proj = jnp.asarray(normal((d, width), d**-0.5, dtype))
    state = (a["conv_state"], a["ssm_state"], a["conv_weight"], a["conv_bias"])
    state += (a["dt_bias"], a["A_log"], a["D"])
    interpret = impl == "pallas_interpret"
    x64 = np.asarray(residual, np.float64) + np.asarray(out, np.float64)
    hidden64 = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + eps) * np.asarray(norm_weight)
    hidden = jnp.asarray(hidden64, jnp.float32).astype(dtype)

    def unfused(h, w, *s):
        with jax.default_matmul_precision("highest"):
            zxbcdt = jnp.dot(h, w, preferred_element_type=jnp.float32).astype(h.dtype)
        return mamba2_core_pallas(zxbcdt, *s, interpret=interpret)

    want = compiled(("mamba2_unfused", impl), unfused, hidden, in_proj, *state)(
        hidden, in_proj, *state
    )
    want_residual = np.asarray(residual) + np.asarray(out, np.float32)
    for rows in (32, 0):  # the add + norm in the fused kernel, then in front of it
        monkeypatch.setattr("pallas_kernels.decode.config.ADD_NORM_IN_PROJ_ROWS", rows)

        def fused(out, residual, norm_weight, *args):
            add_norm = ResidualNorm(residual, norm_weight, eps)
            return mamba2_pallas(out, *args, fuse=True, add_norm=add_norm, interpret=interpret)

        args = (out, residual, norm_weight, in_proj, *state)
        got = compiled(("mamba2_add_norm", impl, case, rows), fused, *args)(*args)
        assert_step_close(got[:3], want, tol, f"{case} {dtype.__name__} rows={rows}")
        np.testing.assert_array_equal(np.asarray(got[3]), want_residual)


def test_mamba2_fuses_in_proj_where_the_rule_and_the_tiles_allow(monkeypatch):
    from pallas_kernels.decode import mamba2_pallas

    sds = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    b, h, p, g, n, w, d = 2, 80, 64, 1, 128, 4, 2560  # mamba2-2.7b
    e, x = h * p, h * p + 2 * g * n
    args = (sds((b, d), bf), sds((d, e + x + h), bf), sds((b, w - 1, x), bf))
    args += (sds((b, h, p, n), bf), sds((x, w), bf), sds((x,), bf), sds((h,), f32))
    args += (sds((h,), f32), sds((h,), f32))

    def kernels(**kw):
        text = lower_for_cuda(lambda *a: mamba2_pallas(*a, **kw), *args)
        assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
        return re.findall(r'name = "(decode_[a-z_]+)"', text)

    assert kernels() == ["decode_in_proj_conv", "decode_ssd_update"]  # up to 32 rows
    assert kernels(fuse=False) == ["decode_conv", "decode_ssd_update"]
    monkeypatch.setattr("pallas_kernels.decode.config.MAMBA2_FUSE_IN_PROJ_ROWS", 0)
    assert kernels() == ["decode_conv", "decode_ssd_update"]
    a = mamba2_core_args(2, 2, 24, 1, 16, 4, jnp.float32, conv_bias=True, D_shape="heads")
    core = (a["conv_state"], a["ssm_state"], a["conv_weight"], a["conv_bias"])
    core += (a["dt_bias"], a["A_log"], a["D"])
    hidden, in_proj = jnp.zeros((2, 128)), jnp.zeros((128, a["zxbcdt"].shape[-1]))
    with pytest.raises(ValueError, match="fuse needs"):  # d_inner 48: off the 64-blocks
        mamba2_pallas(hidden, in_proj, *core, fuse=True, interpret=True)
    with pytest.raises(ValueError, match="in_proj_weight must be"):
        mamba2_pallas(hidden, in_proj[:64], *core, interpret=True)


def assert_rounded_from(got_state, want_f32):
    """got_state (bfloat16) is want_f32 rounded to bfloat16, to within one rounding."""
    assert got_state.dtype == jnp.bfloat16
    got, want = np.asarray(got_state, np.float32), np.asarray(want_f32, np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-6)
    assert np.mean(got == np.asarray(want_f32.astype(jnp.bfloat16), np.float32)) > 0.99


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_store_a_bfloat16_state_in_bfloat16(impl):
    # generation's state_dtype="bfloat16" (a bfloat16 model's default): the kernels read the
    # bfloat16 state, update it in float32 (y from the float32 update) and store it rounded,
    # in place and in its dtype.
    from jax_packmamba.ops import ssd_state_update
    from pallas_kernels.decode import ssd_update_pallas

    args = list(core_args(3, 200, 16, 12, 4, jnp.bfloat16))
    args[2] = args[2].astype(jnp.bfloat16)
    widened = list(args)
    widened[2] = args[2].astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = compiled("mixer_core_xla_highest", mixer_core_xla, *widened)(*widened)
    got = run(impl, tuple(args))
    # Bit for bit the same kernels' step from the same state held in float32, its state
    # rounded: the storage dtype changes nothing else.
    own = run(impl, tuple(widened))
    for a, b in zip(got[:2], own[:2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(own[2].astype(jnp.bfloat16)))
    # Against the XLA step (which rounds dt, B and C in its own order): within bfloat16's
    # error; through the interpreter the same float32 state to within one rounding.
    assert_step_close(got, want[:2] + (want[2].astype(jnp.bfloat16),), 2e-2, "bf16 state")
    if impl == "pallas_interpret":
        assert_rounded_from(got[2], want[2])

    a = ssd_step_args(3, 4, 24, 2, 20, jnp.bfloat16)
    state = a.pop("state").astype(jnp.bfloat16)
    want_state, want_y = ssd_state_update(state.astype(jnp.float32), **a)
    got_state, got_y = ssd_update_pallas(state, **a, interpret=impl == "pallas_interpret")
    own_state, own_y = ssd_update_pallas(
        state.astype(jnp.float32), **a, interpret=impl == "pallas_interpret"
    )
    np.testing.assert_array_equal(np.asarray(got_y), np.asarray(own_y))
    np.testing.assert_array_equal(np.asarray(got_state), np.asarray(own_state.astype(jnp.bfloat16)))
    np.testing.assert_allclose(
        np.asarray(got_y, np.float32), np.asarray(want_y, np.float32), rtol=1e-2, atol=1e-2
    )
    assert_rounded_from(got_state, want_state)
    # The XLA step stores a bfloat16 cache back in bfloat16 too (the mixers cast to its dtype).
    assert mixer_core_xla(*args)[2].dtype == jnp.bfloat16


def test_kernels_lower_for_cuda_with_a_bfloat16_state_in_place():
    from pallas_kernels.decode import ssd_update_pallas

    sds = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    b, h, p, g, n = 2, 80, 64, 1, 128  # mamba2-2.7b
    args = (sds((b, h, p, n), bf), sds((b, h, p), bf), sds((b, h), bf), sds((h,), f32))
    args += (sds((b, g, n), bf), sds((b, g, n), bf), sds((h,), f32), sds((h,), f32))
    fn = lambda *a: ssd_update_pallas(*a[:7], None, a[7])  # noqa: E731
    assert jax.eval_shape(fn, *args)[0].dtype == bf
    text = lower_for_cuda(fn, *args)
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 1
    b, e, n, r, w = 2, 5120, 16, 160, 4  # mamba-2.8b
    core = (sds((b, 2 * e), bf), sds((b, w - 1, e), bf), sds((b, e, n), bf), sds((e, w), bf))
    core += (sds((e,), bf), sds((e, r + 2 * n), bf), sds((r, e), bf), sds((e,), f32))
    core += (sds((e, n), f32), sds((e,), f32))
    assert jax.eval_shape(mixer_core_pallas, *core)[2].dtype == bf
    text = lower_for_cuda(lambda *a: mixer_core_pallas(*a), *core)
    assert len(re.findall(r"stablehlo.output_operand_alias<[^>]*>", text)) == 2
