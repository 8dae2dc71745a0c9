"""Flax NNX Mamba1 language model whose every operator respects segment boundaries.

Axis letters: b batch, t time, d d_model, e d_inner, n d_state, r dt_rank, v vocabulary.

Parameters are float32; activations run in `config.dtype` (bfloat16 on GPU) while the residual
stream, norms and the scan state stay float32. Initialisation follows mamba_ssm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import MambaConfig
from jax_packmamba.ops import (
    causal_conv1d,
    causal_conv1d_step,
    segment_conv_windows,
    selective_scan,
    selective_state_update,
)


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
        return self._forward(hidden, segment_ids)[0]

    def prefill(self, hidden, segment_ids=None, *, num_segments: int = 1):
        """The forward pass that also returns each segment's recurrent state.

        hidden (b, t, d); segment_ids (b, t) with ids in [0, num_segments), or None (one
        segment, slot 0). Returns (out (b, t, d), MixerState(conv (b, s, d_conv - 1, e),
        ssm (b, s, e, n))): for every slot s, the state after the last token of id s in each
        row (zeros where the id does not occur), ready for `step`. The conv state holds the
        segment's last d_conv - 1 conv inputs, oldest first, with zeros before its start.
        """
        if segment_ids is None:
            segment_ids = jnp.zeros(hidden.shape[:2], jnp.int32)
        out, x, ssm = self._forward(hidden, segment_ids, num_segments=num_segments)
        conv = segment_conv_windows(x, segment_ids, num_segments, self.config.d_conv - 1)
        return out, MixerState(conv=conv, ssm=ssm)

    def step(self, hidden, state: "MixerState"):
        """One recurrent step: hidden (b, d), state MixerState(conv (b, d_conv - 1, e),
        ssm (b, e, n)) -> (out (b, d), next state). Computes what `__call__` computes for the
        next token of each sequence whose past the state summarises."""
        x, z = self._in_proj(hidden)  # (b, e) each
        window = jnp.concatenate([state.conv.astype(x.dtype), x[:, None]], axis=1)  # (b, w, e)
        x_conv = causal_conv1d_step(window, *self._conv_params())
        dt, B, C = self._dt_B_C(x_conv)
        ssm, y = selective_state_update(state.ssm, x_conv, dt, self._A(), B, C, self.D[...], z,
                                        self.dt_proj.bias[...])
        return self.out_proj(y), MixerState(conv=window[:, 1:], ssm=ssm)

    # The pieces __call__, prefill and step share.

    def _forward(self, hidden, segment_ids, num_segments=None):
        """-> (out, conv input x (b, t, e), final SSM states or None)."""
        config = self.config
        x, z = self._in_proj(hidden)  # (b, t, e) each
        weight, bias = self._conv_params()
        x_conv = causal_conv1d(x, weight, bias, segment_ids=segment_ids, activation="silu",
                               impl=config.conv_impl)
        dt, B, C = self._dt_B_C(x_conv)
        # dt_proj's bias goes into the scan as delta_bias, in float32, as in mamba_ssm.
        result = selective_scan(x_conv, dt, self._A(), B, C, self.D[...], z, self.dt_proj.bias[...],
                                delta_softplus=True, segment_ids=segment_ids,
                                return_final_states=num_segments is not None,
                                num_segments=num_segments, impl=config.scan_impl)
        y, final = result if num_segments is not None else (result, None)
        return self.out_proj(y), x, final

    def _in_proj(self, hidden):
        """(x, z): in_proj(hidden) split in two, computed as two products with the kernel's
        halves. Splitting one (..., 2e) product copies both halves out of it and its gradient
        concatenates them back, activation-sized work; slicing and concatenating the kernel is
        weight-sized."""
        proj, e = self.in_proj, self.config.d_inner
        bias = None if proj.bias is None else proj.bias[...]
        hidden, kernel, bias = proj.promote_dtype((hidden, proj.kernel[...], bias),
                                                  dtype=proj.dtype)
        contract = (((hidden.ndim - 1,), (0,)), ((), ()))

        def half(i):
            cols = slice(i * e, (i + 1) * e)
            y = proj.dot_general(hidden, kernel[:, cols], contract, precision=proj.precision)
            return y if bias is None else y + bias[cols]

        return half(0), half(1)

    def _conv_params(self):
        dtype = self.config.compute_dtype
        bias = None if self.conv_bias is None else self.conv_bias[...].astype(dtype)
        return self.conv_weight[...].astype(dtype), bias

    def _dt_B_C(self, x):
        """x_proj and dt_proj (without its bias, which the scan adds in float32)."""
        r, n = self.config.dt_rank_resolved, self.config.d_state
        dt, B, C = jnp.split(self.x_proj(x), [r, r + n], axis=-1)
        return dt @ self.dt_proj.kernel[...].astype(self.config.compute_dtype), B, C

    def _A(self):
        return -jnp.exp(self.A_log[...])


class MixerState(NamedTuple):
    """Recurrent state of one mixer: conv (..., d_conv - 1, e) in the compute dtype, the last
    conv inputs oldest first; ssm (..., e, n) float32."""

    conv: jax.Array
    ssm: jax.Array


class MambaBlock(nnx.Module):
    """Pre-norm residual block: r <- r + mixer(norm(r)), r in float32."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype)
        self.mixer = MambaMixer(config, rngs=rngs)

    def __call__(self, residual, segment_ids=None):
        return residual + self.mixer(self.norm(residual), segment_ids).astype(jnp.float32)

    def prefill(self, residual, segment_ids=None, *, num_segments: int = 1):
        """__call__ plus the mixer's per-segment state (see MambaMixer.prefill)."""
        out, state = self.mixer.prefill(self.norm(residual), segment_ids, num_segments=num_segments)
        return residual + out.astype(jnp.float32), state

    def step(self, residual, state: MixerState):
        """One recurrent step: residual (b, d) float32 (see MambaMixer.step)."""
        out, state = self.mixer.step(self.norm(residual), state)
        return residual + out.astype(jnp.float32), state


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
        self.lm_head = nnx.data(None)  # data either way, so an untied head can be assigned
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
        return self.head(residual)

    def head(self, residual):
        """Final norm and vocabulary projection: residual (..., d) -> logits (..., v)."""
        return vocab_logits(residual, self.norm_f, self.embedding, self.lm_head, self.config.compute_dtype)


def vocab_logits(residual, norm_f: RMSNorm, embedding: nnx.Embed, lm_head, dtype):
    """norm_f, then lm_head, or the embedding table when tied (lm_head None)."""
    hidden = norm_f(residual)
    if lm_head is not None:
        return lm_head(hidden)
    return hidden @ embedding.embedding[...].astype(dtype).T


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
