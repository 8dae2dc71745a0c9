"""Flax NNX Mamba1 language model whose every operator respects segment boundaries.

Axis letters: b batch, t time, d d_model, e d_inner, n d_state, r dt_rank, v vocabulary.

Parameters are float32; activations run in `config.dtype` (bfloat16 on GPU) while the residual
stream, norms and the scan state stay float32. Initialisation follows mamba_ssm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import MambaConfig
from jax_packmamba.ops import causal_conv1d, selective_scan


def torch_linear_init(scale: float = 1.0):
    """PyTorch's nn.Linear default (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)) * scale."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = shape[0]  # flax kernels are (in, out)
        bound = scale / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dt_bias_init(config: MambaConfig):
    """Inverse softplus of dt ~ logUniform(dt_min, dt_max), so softplus(bias) starts there."""

    def init(key, shape, dtype=jnp.float32):
        log_lo, log_hi = math.log(config.dt_min), math.log(config.dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, dtype, log_lo, log_hi))
        dt = jnp.maximum(dt, config.dt_init_floor)
        return dt + jnp.log(-jnp.expm1(-dt))

    return init


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.weight[...]).astype(self.dtype)


class MambaMixer(nnx.Module):
    """in_proj -> segment-aware causal conv -> x_proj/dt_proj -> selective scan -> out_proj."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, e, n, r = config.d_model, config.d_inner, config.d_state, config.dt_rank_resolved
        dtype = config.compute_dtype
        linear = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.in_proj = nnx.Linear(d, 2 * e, use_bias=config.proj_bias,
                                  kernel_init=torch_linear_init(), **linear)
        # Depthwise conv as mamba's Conv1d(groups=e): U(+-1/sqrt(width)) for weight and bias.
        conv_bound = 1.0 / math.sqrt(config.d_conv)
        self.conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (e, config.d_conv), jnp.float32, -conv_bound, conv_bound))
        self.conv_bias = (
            nnx.Param(jax.random.uniform(rngs.params(), (e,), jnp.float32, -conv_bound, conv_bound))
            if config.conv_bias else None
        )
        self.x_proj = nnx.Linear(e, r + 2 * n, use_bias=False, kernel_init=torch_linear_init(), **linear)
        dt_std = r ** -0.5 * config.dt_scale
        self.dt_proj = nnx.Linear(
            r, e, use_bias=True,
            kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -dt_std, dt_std),
            bias_init=dt_bias_init(config), **linear)
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (e, n))))
        self.D = nnx.Param(jnp.ones((e,), jnp.float32))
        # GPT-2-style rescaling of the last projection into the residual stream (one per layer).
        out_scale = 1.0 / math.sqrt(config.n_layer) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(e, d, use_bias=config.proj_bias,
                                   kernel_init=torch_linear_init(out_scale), **linear)

    def __call__(self, hidden, segment_ids=None):
        config = self.config
        dtype = config.compute_dtype
        r, n = config.dt_rank_resolved, config.d_state
        x, z = jnp.split(self.in_proj(hidden), 2, axis=-1)  # (b, t, e) each
        conv_bias = None if self.conv_bias is None else self.conv_bias[...].astype(dtype)
        x = causal_conv1d(x, self.conv_weight[...].astype(dtype), conv_bias,
                          segment_ids=segment_ids, activation="silu")
        dt, B, C = jnp.split(self.x_proj(x), [r, r + n], axis=-1)
        # dt_proj's bias goes into the scan as delta_bias, in float32, as in mamba_ssm.
        dt = dt @ self.dt_proj.kernel[...].astype(dtype)
        A = -jnp.exp(self.A_log[...])
        y = selective_scan(x, dt, A, B, C, self.D[...], z, self.dt_proj.bias[...],
                           delta_softplus=True, segment_ids=segment_ids, impl=config.scan_impl)
        return self.out_proj(y)


class MambaBlock(nnx.Module):
    """Pre-norm residual block: r <- r + mixer(norm(r)), r in float32."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype)
        self.mixer = MambaMixer(config, rngs=rngs)

    def __call__(self, residual, segment_ids=None):
        return residual + self.mixer(self.norm(residual), segment_ids).astype(jnp.float32)


class MambaLM(nnx.Module):
    """Mamba language model: `model(input_ids, segment_ids=None) -> logits`.

    input_ids (b, t) int; segment_ids (b, t) int or None: the state of every layer restarts
    where segment_ids change, so each packed sequence is computed as if it were alone.
    Logits are (b, t, config.padded_vocab_size) in the compute dtype.
    """

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedding = nnx.Embed(
            config.padded_vocab_size, config.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(config.initializer_range), rngs=rngs)
        self.layers = nnx.List([MambaBlock(config, rngs=rngs) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nnx.Linear(config.d_model, config.padded_vocab_size, use_bias=False,
                                      dtype=config.compute_dtype, param_dtype=jnp.float32,
                                      kernel_init=jax.nn.initializers.normal(config.initializer_range),
                                      rngs=rngs)

    def __call__(self, input_ids, segment_ids=None):
        check_model_inputs(input_ids, segment_ids, self.config)
        residual = self.embedding(input_ids)
        for layer in self.layers:
            if self.config.remat:
                residual = nnx.remat(lambda block, r, s: block(r, s))(layer, residual, segment_ids)
            else:
                residual = layer(residual, segment_ids)
        hidden = self.norm_f(residual)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        table = self.embedding.embedding[...].astype(self.config.compute_dtype)
        return hidden @ table.T


def check_model_inputs(input_ids, segment_ids, config: MambaConfig):
    shape = tuple(input_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"input_ids must have length >= 1, got shape {shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if segment_ids is not None and tuple(segment_ids.shape) != shape:
        raise ValueError(
            f"segment_ids must have the shape of input_ids {shape}, got {tuple(segment_ids.shape)}")
