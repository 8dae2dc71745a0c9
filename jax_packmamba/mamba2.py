"""Flax NNX Mamba2 language model whose every operator respects segment boundaries.

Axis letters: b batch, t time, d d_model, e d_inner, h heads, p headdim, g groups, n d_state,
x conv channels (conv_dim = e + 2 g n), w d_conv, s segment slot, v vocabulary.

The mixer is mamba_ssm's Mamba2 (its unfused path): in_proj to [z (e), xBC (x), dt (h)]; a
depthwise causal conv with silu over xBC; x, B, C split from it into (h, p), (g, n), (g, n);
the SSD scan with dt_bias, softplus, D per head and A = -exp(A_log); then y * silu(z) normalised
per group of e / g channels (gated RMSNorm with the norm after the gate); out_proj. Parameters
are float32; activations run in `config.dtype` while the residual stream, norms and the scan
state stay float32. Initialisation follows mamba_ssm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import Mamba2Config
from jax_packmamba.model import (
    MixerState,
    RMSNorm,
    check_model_inputs,
    dt_bias_init,
    torch_linear_init,
    vocab_logits,
)
from jax_packmamba.ops import (
    causal_conv1d,
    causal_conv1d_step,
    segment_conv_windows,
    ssd_scan,
    ssd_state_update,
)


class RMSNormGated(nnx.Module):
    """mamba_ssm's gated RMSNorm with norm_before_gate=False: (x * silu(z)) normalised over each
    group of `group_size` channels, times a per-channel weight. Computed in float32; returns
    `dtype`."""

    def __init__(self, dim: int, *, group_size: int, eps: float, dtype):
        if dim % group_size:
            raise ValueError(f"RMSNormGated: dim={dim} must be a multiple of group_size={group_size}")
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.group_size = group_size
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x, z):
        return gated_rms_norm(x, z, self.weight[...], group_size=self.group_size, eps=self.eps,
                              dtype=self.dtype)


def gated_rms_norm(x, z, weight, *, group_size: int, eps: float, dtype):
    """RMSNormGated's computation from its weight (e,): x, z (..., e) -> (..., e) `dtype`
    (shared with the decode step, jax_packmamba/decode_step.py)."""
    x = x.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    groups = groups * jax.lax.rsqrt(jnp.mean(jnp.square(groups), axis=-1, keepdims=True) + eps)
    return (groups.reshape(x.shape) * weight).astype(dtype)


def A_log_init(config: Mamba2Config):
    """log(A) with A ~ U(A_init_range), one per head (A = -exp(A_log) in the scan)."""

    def init(key, shape, dtype=jnp.float32):
        low, high = config.A_init_range
        return jnp.log(jax.random.uniform(key, shape, dtype, low, high))

    return init


class Mamba2Mixer(nnx.Module):
    """in_proj -> segment-aware causal conv over xBC -> SSD scan -> gated RMSNorm -> out_proj."""

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
        self.config = config
        d, e, h = config.d_model, config.d_inner, config.nheads
        dtype = config.compute_dtype
        linear = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.in_proj = nnx.Linear(d, config.d_in_proj, use_bias=config.proj_bias,
                                  kernel_init=torch_linear_init(), **linear)
        # Depthwise conv as torch's Conv1d(groups=channels) default: U(+-1/sqrt(width)) for weight and bias.
        conv_bound = 1.0 / math.sqrt(config.d_conv)
        self.conv_weight = nnx.Param(jax.random.uniform(
            rngs.params(), (config.conv_dim, config.d_conv), jnp.float32, -conv_bound, conv_bound))
        self.conv_bias = (
            nnx.Param(jax.random.uniform(rngs.params(), (config.conv_dim,), jnp.float32, -conv_bound, conv_bound))
            if config.conv_bias else None
        )
        self.dt_bias = nnx.Param(dt_bias_init(config)(rngs.params(), (h,)))
        self.A_log = nnx.Param(A_log_init(config)(rngs.params(), (h,)))
        self.D = nnx.Param(jnp.ones((e,) if config.D_has_hdim else (h,), jnp.float32))
        self.norm = RMSNormGated(e, group_size=e // config.ngroups, eps=config.rms_norm_eps, dtype=dtype)
        # GPT-2-style rescaling of the last projection into the residual stream (one per layer).
        out_scale = 1.0 / math.sqrt(config.n_layer) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(e, d, use_bias=config.proj_bias,
                                   kernel_init=torch_linear_init(out_scale), **linear)

    def __call__(self, hidden, segment_ids=None):
        return self._forward(hidden, segment_ids)[0]

    def prefill(self, hidden, segment_ids=None, *, num_segments: int = 1):
        """The forward pass that also returns each segment's recurrent state.

        hidden (b, t, d); segment_ids (b, t) with ids in [0, num_segments), or None (one
        segment, slot 0). Returns (out (b, t, d), MixerState(conv (b, s, w - 1, x), ssm
        (b, s, h, p, n) float32)): for every slot s, the state after the last token of id s in
        each row (zeros where the id does not occur), ready for `step`. The conv state holds
        the segment's last w - 1 conv inputs (xBC before the conv), oldest first, with zeros
        before its start.
        """
        if segment_ids is None:
            segment_ids = jnp.zeros(hidden.shape[:2], jnp.int32)
        out, xBC, ssm = self._forward(hidden, segment_ids, num_segments=num_segments)
        conv = segment_conv_windows(xBC, segment_ids, num_segments, self.config.d_conv - 1)
        return out, MixerState(conv=conv, ssm=ssm)

    def step(self, hidden, state: MixerState):
        """One recurrent step: hidden (b, d), state MixerState(conv (b, w - 1, x), ssm
        (b, h, p, n)) -> (out (b, d), next state). Computes what `__call__` computes for the
        next token of each sequence whose past the state summarises."""
        config = self.config
        z, xBC, dt = self._in_proj(hidden)  # (b, e), (b, x), (b, h)
        window = jnp.concatenate([state.conv.astype(xBC.dtype), xBC[:, None]], axis=1)  # (b, w, x)
        x, B, C = self._split_xBC(causal_conv1d_step(window, *self._conv_params()))
        ssm, y = ssd_state_update(state.ssm, x, dt, self._A(), B, C, self._D(), None, self.dt_bias[...],
                                  dt_softplus=True)
        y = self.norm(y.reshape(-1, config.d_inner), z)
        return self.out_proj(y), MixerState(conv=window[:, 1:], ssm=ssm)

    # The pieces __call__, prefill and step share.

    def _forward(self, hidden, segment_ids, num_segments=None):
        """-> (out, conv input xBC (b, t, x), final SSM states or None)."""
        config = self.config
        z, xBC, dt = self._in_proj(hidden)
        weight, bias = self._conv_params()
        x, B, C = self._split_xBC(causal_conv1d(xBC, weight, bias, segment_ids=segment_ids,
                                                activation="silu", impl=config.conv_impl))
        # dt_bias goes into the scan in float32 (added before the softplus), as in mamba_ssm.
        result = ssd_scan(x, dt, self._A(), B, C, self._D(), None, self.dt_bias[...], dt_softplus=True,
                          segment_ids=segment_ids, chunk_size=config.chunk_size,
                          return_final_states=num_segments is not None, num_segments=num_segments,
                          impl=config.scan_impl)
        y, final = result if num_segments is not None else (result, None)
        y = self.norm(y.reshape(*y.shape[:2], config.d_inner), z)
        return self.out_proj(y), xBC, final

    def _in_proj(self, hidden):
        """(z, xBC, dt): in_proj(hidden) as three products with the kernel's column blocks.
        Splitting one (..., d_in_proj) product copies each part out of it and its gradient
        concatenates them back, activation-sized work; slicing the kernel is weight-sized."""
        proj, config = self.in_proj, self.config
        bias = None if proj.bias is None else proj.bias[...]
        hidden, kernel, bias = proj.promote_dtype((hidden, proj.kernel[...], bias), dtype=proj.dtype)
        contract = (((hidden.ndim - 1,), (0,)), ((), ()))
        edges = [0, config.d_inner, config.d_inner + config.conv_dim, config.d_in_proj]

        def part(i):
            cols = slice(edges[i], edges[i + 1])
            y = proj.dot_general(hidden, kernel[:, cols], contract, precision=proj.precision)
            return y if bias is None else y + bias[cols]

        return part(0), part(1), part(2)

    def _split_xBC(self, xBC):
        """(..., x) -> x (..., h, p), B and C (..., g, n)."""
        config = self.config
        lead = xBC.shape[:-1]
        gn = config.ngroups * config.d_state
        x, B, C = jnp.split(xBC, [config.d_inner, config.d_inner + gn], axis=-1)
        return (x.reshape(*lead, config.nheads, config.headdim),
                B.reshape(*lead, config.ngroups, config.d_state),
                C.reshape(*lead, config.ngroups, config.d_state))

    def _conv_params(self):
        dtype = self.config.compute_dtype
        bias = None if self.conv_bias is None else self.conv_bias[...].astype(dtype)
        return self.conv_weight[...].astype(dtype), bias

    def _A(self):
        return -jnp.exp(self.A_log[...])

    def _D(self):
        """(h,) or (h, p) when D_has_hdim."""
        D = self.D[...]
        return D.reshape(self.config.nheads, self.config.headdim) if self.config.D_has_hdim else D


class Mamba2Block(nnx.Module):
    """Pre-norm residual block: r <- r + mixer(norm(r)), r in float32."""

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype)
        self.mixer = Mamba2Mixer(config, rngs=rngs)

    def __call__(self, residual, segment_ids=None):
        return residual + self.mixer(self.norm(residual), segment_ids).astype(jnp.float32)

    def prefill(self, residual, segment_ids=None, *, num_segments: int = 1):
        """__call__ plus the mixer's per-segment state (see Mamba2Mixer.prefill)."""
        out, state = self.mixer.prefill(self.norm(residual), segment_ids, num_segments=num_segments)
        return residual + out.astype(jnp.float32), state

    def step(self, residual, state: MixerState):
        """One recurrent step: residual (b, d) float32 (see Mamba2Mixer.step)."""
        out, state = self.mixer.step(self.norm(residual), state)
        return residual + out.astype(jnp.float32), state


class Mamba2LM(nnx.Module):
    """Mamba2 language model: `model(input_ids, segment_ids=None) -> logits`.

    input_ids (b, t) int; segment_ids (b, t) int or None: the state of every layer restarts
    where segment_ids change, so each packed sequence is computed as if it were alone.
    Logits are (b, t, config.padded_vocab_size) in the compute dtype.
    """

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embedding = nnx.Embed(
            config.padded_vocab_size, config.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(config.initializer_range), rngs=rngs)
        self.layers = nnx.List([Mamba2Block(config, rngs=rngs) for _ in range(config.n_layer)])
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
