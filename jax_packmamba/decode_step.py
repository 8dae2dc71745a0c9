"""One token through one block, from the block's inference parameters, by implementation.

Axis letters: b batch, d d_model, e d_inner, n d_state, w d_conv - 1; for Mamba2 also h heads,
p headdim, g groups, x conv channels (e + 2 g n).

This is `MambaBlock.step` (model.py) written for decoding, with the same values:

- in_proj is ONE product with the whole (d, 2e) kernel and its output is split, where
  MambaMixer._in_proj multiplies by each half of the kernel (right for training, where the
  activations are large): slicing a weight in front of a product makes XLA copy it every step.
- the middle of the mixer (conv step, x_proj, dt_proj, state update, gate) is either the
  unfused jnp ops ("xla") or the two Pallas kernels of pallas_kernels/decode ("pallas",
  "pallas_interpret"), which read and write each state once, in place.

`params` is one block's nnx state as `generation.prepare` stores it (projection and conv
weights already in the compute dtype).

`mamba2_block_step` is `Mamba2Block.step` (mamba2.py) written the same way: one in_proj
product split into z, xBC and dt, then the unfused XLA ops (conv step, `ssd_state_update`, the
gated norm). There is no Pallas decode kernel for Mamba2: its decode_impl is always "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import Mamba2Config, MambaConfig
from jax_packmamba.mamba2 import gated_rms_norm
from jax_packmamba.ops import causal_conv1d_step, selective_state_update, ssd_state_update
from jax_packmamba.ops.segments import check_pallas_platform

DECODE_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


def resolve_decode_impl(impl: str, config: MambaConfig | Mamba2Config) -> str:
    """"auto" is "pallas" on a GPU (where the kernels take the shape), else "xla"; a Mamba2
    config has only "xla". Call it before tracing: it imports the kernels' package."""
    if impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {impl!r}")
    if isinstance(config, Mamba2Config):
        if impl not in ("auto", "xla"):
            raise ValueError(f"decode_impl={impl!r}: there is no Pallas decode kernel for Mamba2 "
                             f"models; use 'auto' or 'xla'")
        return "xla"
    if impl == "auto":
        impl = "xla"
        if jax.default_backend() == "gpu":
            from pallas_kernels.decode import supported

            impl = "pallas" if supported(config.d_state) else "xla"
    check_pallas_platform(impl, fallback="xla", name="decode_impl")
    if impl != "xla":
        # Before anything is traced (pallas_kernels/decode/__init__.py says why).
        import pallas_kernels.decode  # noqa: F401
    return impl


def mixer_core_xla(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight,
                   dt_proj_weight, dt_bias, A_log, D):
    """The unfused middle of MambaMixer.step (same arguments and results as
    pallas_kernels.decode.mixer_core_pallas): (y (b, e), conv_state', ssm_state')."""
    c = xz.dtype
    e = xz.shape[-1] // 2
    n = A_log.shape[-1]
    r = dt_proj_weight.shape[0]
    x, z = xz[:, :e], xz[:, e:]
    window = jnp.concatenate([conv_state.astype(c), x[:, None]], axis=1)  # (b, w + 1, e)
    x_conv = causal_conv1d_step(window, conv_weight.astype(c),
                                None if conv_bias is None else conv_bias.astype(c))
    dbc = x_conv @ x_proj_weight.astype(c)
    dt, B, C = dbc[:, :r], dbc[:, r:r + n], dbc[:, r + n:]
    dt = dt @ dt_proj_weight.astype(c)
    ssm, y = selective_state_update(ssm_state, x_conv, dt, -jnp.exp(A_log), B, C, D, z, dt_bias)
    return y, window[:, 1:], ssm


def mixer_core(impl: str, *args, config=None):
    """mixer_core_xla or the Pallas kernels, by `impl` ("xla", "pallas", "pallas_interpret")."""
    if impl == "xla":
        return mixer_core_xla(*args)
    from pallas_kernels.decode import mixer_core_pallas

    return mixer_core_pallas(*args, config=config, interpret=impl == "pallas_interpret")


def block_step(params, residual, conv_state, ssm_state, *, config: MambaConfig, impl: str,
               kernel_config=None):
    """One token through one block: residual (b, d) float32 -> (residual', conv', ssm').

    params: the block's nnx state ({"norm": ..., "mixer": ...}); impl: "xla", "pallas" or
    "pallas_interpret" (resolve "auto" with resolve_decode_impl first).
    """
    c = config.compute_dtype
    mixer = params["mixer"]
    value = lambda *path: _leaf(mixer, path)  # noqa: E731
    x = residual.astype(jnp.float32)
    hidden = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + config.rms_norm_eps)
    hidden = (hidden * _leaf(params, ("norm", "weight"))).astype(c)
    xz = _linear(hidden, value("in_proj", "kernel"), value("in_proj", "bias"), c)
    y, conv_state, ssm_state = mixer_core(
        impl, xz, conv_state, ssm_state, value("conv_weight"), value("conv_bias"),
        value("x_proj", "kernel"), value("dt_proj", "kernel"), value("dt_proj", "bias"),
        value("A_log"), value("D"), config=kernel_config)
    out = _linear(y, value("out_proj", "kernel"), value("out_proj", "bias"), c)
    return residual + out.astype(jnp.float32), conv_state, ssm_state


def mamba2_block_step(params, residual, conv_state, ssm_state, *, config: Mamba2Config):
    """One token through one Mamba2 block: residual (b, d) float32, conv_state (b, w, x) in
    the compute dtype, ssm_state (b, h, p, n) float32 -> (residual', conv', ssm').

    params: the block's nnx state ({"norm": ..., "mixer": ...}).
    """
    c = config.compute_dtype
    e, x, h, p = config.d_inner, config.conv_dim, config.nheads, config.headdim
    gn = config.ngroups * config.d_state
    mixer = params["mixer"]
    value = lambda *path: _leaf(mixer, path)  # noqa: E731
    hidden = _rms_norm(residual, _leaf(params, ("norm", "weight")), config.rms_norm_eps).astype(c)
    zxbcdt = _linear(hidden, value("in_proj", "kernel"), value("in_proj", "bias"), c)
    z, xBC, dt = zxbcdt[:, :e], zxbcdt[:, e:e + x], zxbcdt[:, e + x:]
    window = jnp.concatenate([conv_state.astype(c), xBC[:, None]], axis=1)  # (b, w + 1, x)
    conv_bias = value("conv_bias")
    xBC = causal_conv1d_step(window, value("conv_weight").astype(c),
                             None if conv_bias is None else conv_bias.astype(c))
    batch = xBC.shape[0]
    xs = xBC[:, :e].reshape(batch, h, p)
    B = xBC[:, e:e + gn].reshape(batch, config.ngroups, config.d_state)
    C = xBC[:, e + gn:].reshape(batch, config.ngroups, config.d_state)
    D = value("D")
    if config.D_has_hdim:
        D = D.reshape(h, p)
    ssm_state, y = ssd_state_update(ssm_state, xs, dt, -jnp.exp(value("A_log")), B, C, D, None,
                                    value("dt_bias"), dt_softplus=True)
    y = gated_rms_norm(y.reshape(batch, e), z, value("norm", "weight"),
                       group_size=e // config.ngroups, eps=config.rms_norm_eps, dtype=c)
    out = _linear(y, value("out_proj", "kernel"), value("out_proj", "bias"), c)
    return residual + out.astype(jnp.float32), window[:, 1:], ssm_state


def _rms_norm(residual, weight, eps):
    x = residual.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight


def _linear(x, kernel, bias, dtype):
    y = jnp.dot(x, kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


def _leaf(state, path):
    """state[path] as an array, None where the path is absent (an optional bias)."""
    node = state
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError):
            return None
    return node[...] if isinstance(node, nnx.Variable) else node
