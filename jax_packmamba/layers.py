"""The pieces both mixers share: initialisers, RMSNorm and the recurrent cache.

Axis letters: b batch, t time, s segment slot, w d_conv, x conv channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jax_packmamba.config import MambaConfig
from jax_packmamba.ops import add_rms_norm, rms_norm, segment_conv_windows
from jax_packmamba.ops.links import last_run_inputs, previous_row_tail

# Names (jax.ad_checkpoint.checkpoint_name) of the values a layer keeps for its backward pass
# under remat "save_kernel_outputs" (model.REMAT_POLICIES): the mixer's input (the block's norm
# output), the projections' outputs, the conv's output, the scan's (or attention's) output, and
# the out projection's input. Everything else in the layer is elementwise or a row reduction
# (norms, gates, casts, splits) and is recomputed from them.
MIXER_INPUT = "mixer_input"
PROJECTION = "projection"
CONV = "conv"
MIXER_CORE = "mixer_core"
OUT_PROJ_INPUT = "out_proj_input"
SAVED_NAMES = (MIXER_INPUT, PROJECTION, CONV, MIXER_CORE, OUT_PROJ_INPUT)


def saved(name: str, *xs):
    """xs tagged as `name` for the remat policy (the identity otherwise): one array for one."""
    out = tuple(checkpoint_name(x, name) for x in xs)
    return out[0] if len(out) == 1 else out


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
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32; returns `dtype`.
    impl: jax_packmamba.ops.rms_norm's ("auto": the Triton kernels on a GPU, else jnp ops)."""

    def __init__(self, dim: int, *, eps: float, dtype, impl: str = "auto"):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x):
        return rms_norm(x, self.weight[...], eps=self.eps, out_dtype=self.dtype, impl=self.impl)

    def add(self, hidden, residual):
        """(stream, normed): stream = residual + hidden in float32 (hidden where residual is
        None), normed its norm (jax_packmamba.ops.add_rms_norm): with the stream returned, the
        backward adds the stream's gradient to the norm's in the same pass."""
        return add_rms_norm(
            hidden, residual, self.weight[...], eps=self.eps, out_dtype=self.dtype, impl=self.impl
        )


class MixerState(NamedTuple):
    """Recurrent cache of one mixer: conv (..., d_conv - 1, channels) in the compute dtype, the
    last conv inputs oldest first; ssm (..., e, n) (Mamba2: (..., h, p, n)) float32."""

    conv: jax.Array
    ssm: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["out", "sumsq"], meta_fields=["count", "eps"]
)
@dataclasses.dataclass(frozen=True)
class ScaledOut:
    """A decode step's block output whose norm scale is still to apply (Mamba2Mixer's
    `defer_norm`): the block's output is `out * rsqrt(sum(sumsq) / count + eps)`, one scale a
    row, applied by the next residual add (decode_add_norm). out (b, d) in the compute
    dtype; sumsq (b, P) float32 partial sums of squares; count (the norm's channels) and eps
    (its epsilon) are static."""

    out: jax.Array
    sumsq: jax.Array
    count: int
    eps: float

    def value(self):
        """The block's output, float32 (b, d)."""
        total = jnp.sum(self.sumsq, axis=-1, keepdims=True)
        return self.out.astype(jnp.float32) * jax.lax.rsqrt(total / self.count + self.eps)


def decode_add_norm(residual, out, norm: RMSNorm, impl: str):
    """A decode step's residual add and the next norm: (residual + out in float32,
    norm(residual + out)); out None adds nothing (the first block), a ScaledOut adds its value
    (its scale applied in the add). impl: a decode_impl ("xla", or the Pallas kernel,
    pallas_kernels.decode.add_rms_norm, through "pallas" or "pallas_interpret").
    Block(..., cache=...) computes the same values, the add at its end."""
    if impl == "xla":
        if isinstance(out, ScaledOut):
            residual = residual + out.value()
        elif out is not None:
            residual = residual + out.astype(jnp.float32)
        return residual, norm(residual)
    from pallas_kernels.decode import add_rms_norm

    scaled = {}
    if isinstance(out, ScaledOut):
        scaled = dict(out_sumsq=out.sumsq, out_count=out.count, out_eps=out.eps)
        out = out.out
    return add_rms_norm(
        residual,
        out,
        norm.weight[...],
        eps=norm.eps,
        dtype=norm.dtype,
        **scaled,
        interpret=impl == "pallas_interpret",
    )


def segment_caches(
    conv_inputs, segment_ids, num_segments: int, final_ssm, width: int, continues=None
):
    """A prefill's cache: for every slot s, the state after the last token of id s in each row
    (zeros where the id does not occur), conv (b, s, w - 1, x) and ssm (b, s, ...). With
    `continues` (rows linked), a row's first run's window reaches into the previous row's last
    inputs, so a prompt's last piece shorter than the window still gets its whole window."""
    if continues is not None:
        conv_inputs, segment_ids = previous_row_tail(conv_inputs, segment_ids, continues, width)
    conv = segment_conv_windows(conv_inputs, segment_ids, num_segments, width - 1)
    return MixerState(conv=conv, ssm=final_ssm)


def conv_window(cache: MixerState, x):
    """The decode step's conv window (b, w, x): the cached inputs, then this token's x (b, x)."""
    return jnp.concatenate([cache.conv.astype(x.dtype), x[:, None]], axis=1)


def check_end_state_call(num_segments, return_end_state):
    if return_end_state and num_segments is not None:
        raise ValueError("return_end_state is for a training call; a prefill takes num_segments")


def row_end_state(conv_inputs, segment_ids, end_ssm, width: int) -> MixerState:
    """Each row's last run's end state (b, ...): its last conv inputs and the scan's state
    after the row (end_ssm: the scan's row end states)."""
    ids = jnp.zeros(conv_inputs.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    return MixerState(conv=last_run_inputs(conv_inputs, ids, width), ssm=end_ssm)
