"""Depthwise causal 1-D convolution whose taps never reach across a segment boundary.

Axis letters: b batch, t time, c channels, w filter width.

    out[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - (w - 1) + k, c]

as mamba's `causal_conv1d_fn` (weight (channels, width), the last tap on the current step),
where x at a step before the start of t's segment reads as zero: each segment sees the zeros a
sequence run alone would see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.segments import check_segment_ids, positions_from_segment_ids

ACTIVATIONS = (None, "silu")


def causal_conv1d(x, weight, bias=None, *, segment_ids=None, activation=None):
    """Segment-aware depthwise causal conv; x (batch, length, channels), weight (channels, width).

    Accumulates in float32 and returns x's dtype. activation: None or "silu".
    """
    check_causal_conv1d_args(x, weight, bias, segment_ids, activation)
    return _causal_conv1d(x, weight, bias, segment_ids, activation)


def check_causal_conv1d_args(x, weight, bias, segment_ids, activation):
    if len(np.shape(x)) != 3:
        raise ValueError(f"x must be (batch, length, channels), got shape {np.shape(x)}")
    batch, length, channels = np.shape(x)
    if length == 0:
        raise ValueError(f"length must be at least 1, got x with shape {np.shape(x)}")
    if len(np.shape(weight)) != 2 or np.shape(weight)[0] != channels:
        raise ValueError(
            f"weight must be (channels, width) with channels={channels} to match x "
            f"{np.shape(x)}, got shape {np.shape(weight)}"
        )
    if bias is not None and np.shape(bias) != (channels,):
        raise ValueError(f"bias must have shape ({channels},) to match x {np.shape(x)}, got {np.shape(bias)}")
    for name, a in dict(x=x, weight=weight, bias=bias).items():
        if a is not None and not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(f"{name} must be a real floating array, got dtype {jnp.result_type(a)}")
    check_segment_ids(segment_ids, batch, length)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


@jax.jit(static_argnames=("activation",))
def _causal_conv1d(x, weight, bias, segment_ids, activation):
    batch, length, _ = x.shape
    width = weight.shape[1]
    if segment_ids is None:
        position = jnp.broadcast_to(jnp.arange(length), (batch, length))
    else:
        position = positions_from_segment_ids(segment_ids)
    xf = x.astype(jnp.float32)
    w = weight.astype(jnp.float32)
    out = jnp.zeros_like(xf) if bias is None else jnp.broadcast_to(bias.astype(jnp.float32), xf.shape)
    for k in range(width):
        lag = width - 1 - k
        shifted = jnp.pad(xf, [(0, 0), (lag, 0), (0, 0)])[:, :length]
        # x[t - lag] belongs to t's segment iff t is at least `lag` steps into it.
        shifted = jnp.where((position >= lag)[..., None], shifted, 0.0)
        out = out + shifted * w[:, k]
    if activation == "silu":
        out = jax.nn.silu(out)
    return out.astype(x.dtype)


def causal_conv1d_step(window, weight, bias=None):
    """The last output of `causal_conv1d(..., activation="silu")` over a window (b, w, e) of
    its inputs, oldest first; weight (e, w). Accumulates in float32, returns window's dtype."""
    f32 = jnp.float32
    out = jnp.sum(window.astype(f32) * weight.T.astype(f32), axis=1)
    if bias is not None:
        out = out + bias.astype(f32)
    return jax.nn.silu(out).astype(window.dtype)


def segment_conv_windows(x, segment_ids, num_segments: int, width: int):
    """(b, s, width, e): for each slot s, x at the last `width` steps of the last token of id
    s in each row (oldest first), zero where a step lies before that segment's start or the id
    does not occur. This is the conv state a segment hands to recurrent decoding."""
    batch, length, channels = x.shape
    t = jnp.arange(length)
    is_slot = segment_ids[..., None] == jnp.arange(num_segments)  # (b, t, s)
    last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)  # (b, s)
    position = jnp.take_along_axis(positions_from_segment_ids(segment_ids), jnp.maximum(last, 0), axis=1)
    lag = jnp.arange(width - 1, -1, -1)  # oldest first
    index = last[..., None] - lag  # (b, s, w)
    valid = (last >= 0)[..., None] & (lag <= position[..., None])
    flat = jnp.clip(index, 0, length - 1).reshape(batch, num_segments * width)
    window = jnp.take_along_axis(x, flat[..., None], axis=1).reshape(batch, num_segments, width, channels)
    return jnp.where(valid[..., None], window, jnp.zeros((), x.dtype))
