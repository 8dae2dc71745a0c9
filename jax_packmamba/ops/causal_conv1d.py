"""Depthwise causal 1-D convolution whose taps never reach across a segment boundary.

Axis letters: b batch, t time, c channels, w filter width.

    out[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - (w - 1) + k, c]

as mamba's `causal_conv1d_fn` (weight (channels, width), the last tap on the current step),
where x at a step before the start of t's segment reads as zero: each segment sees the zeros a
sequence run alone would see.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.links import check_continues, conv_prefix_links
from jax_packmamba.ops.segments import (
    check_pallas_platform,
    check_segment_ids,
    positions_from_segment_ids,
)
from pallas_kernels.common import conv_prefix, split_prefix_grad

ACTIVATIONS = (None, "silu")
# "auto" is "pallas" on a GPU when a launch has at least this many programs, else "xla". The
# kernels walk time serially inside a program, so they need many programs: on an H200 the 1.4b
# packed step (8 x 2048 tokens, 2048 programs) took 528.2 ms with them against 538.1 ms with
# XLA, but a 1.4b step on one 256-token sequence (32 programs) 49.3 ms against 42.7 ms
# (pallas_kernels/causal_conv1d/DESIGN.md). The threshold: this many programs per SM (528 on an
# H200's 132).
PALLAS_MIN_PROGRAMS_PER_SM = 4
# "pallas" runs pallas_kernels.causal_conv1d.KERNEL; "pallas_walk" and "pallas_tile" name one.
PALLAS_KERNEL_IMPLS = {
    "pallas_walk": "walk",
    "pallas_tile": "tile",
    "pallas_tile_walk": "tile_walk",
}
CONV_IMPLS = ("auto", "xla", "pallas", *PALLAS_KERNEL_IMPLS, "pallas_interpret")


def causal_conv1d(
    x,
    weight,
    bias=None,
    *,
    segment_ids=None,
    activation=None,
    impl="auto",
    continues=None,
    first_inputs=None,
    groups=None,
):
    """Segment-aware depthwise causal conv; x (batch, length, channels), weight (channels, width).

    groups: optional channel counts summing to channels: the output comes back as a tuple of its
    channel groups (jnp.split at their boundaries), such as Mamba2's x, B and C out of xBC. The
    tile kernels write the groups as separate arrays, sparing the copies a split makes after a
    kernel (where each boundary is a multiple of their channel blocks).

    continues: optional (batch,) bool: row b's first run continues row b - 1's last run (see
    jax_packmamba/ops/links.py); its first width - 1 outputs read that run's last inputs, as
    the document run as one sequence would. Needs length >= width - 1.

    first_inputs: optional (batch, width - 1, channels): the inputs each row's first run reads
    before t = 0 where it does not continue the row before (zeros without it): a document's
    conv state carried from an earlier batch (links.last_run_inputs gives it). Needs length
    >= width - 1.

    Accumulates in float32 and returns x's dtype. activation: None or "silu". Same values as
    `causal_conv1d_reference`. impl:
      "xla": XLA ops with the gradient written out (custom_vjp), so the backward saves only
          x and recomputes the pre-activation ("auto" without a GPU, or for small inputs);
      "pallas": Triton kernels (pallas_kernels/causal_conv1d; GPU only, ValueError
          elsewhere), forward and backward
          ("auto" on a GPU when the launch has PALLAS_MIN_PROGRAMS_PER_SM programs an SM or
          more);
      "pallas_walk", "pallas_tile", "pallas_tile_walk": "pallas" with the kernels that walk
          time inside a program, with the tile-parallel ones, or with the tile forward and the
          walking backward ("pallas" runs one of them: the package's KERNEL);
      "pallas_interpret": the same kernels through the Pallas interpreter (any backend; tests).
    """
    check_causal_conv1d_args(x, weight, bias, segment_ids, activation)
    check_continues(continues, np.shape(x)[0])
    width = np.shape(weight)[1]
    if first_inputs is not None:
        want = (np.shape(x)[0], width - 1, np.shape(x)[2])
        if tuple(np.shape(first_inputs)) != want:
            raise ValueError(
                f"first_inputs must be (batch, width - 1, channels) = {want}, got shape "
                f"{tuple(np.shape(first_inputs))}"
            )
    if impl not in CONV_IMPLS:
        raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}")
    if groups is not None:
        groups = tuple(groups)
        if (
            not groups
            or any(not isinstance(g, (int, np.integer)) or g < 1 for g in groups)
            or sum(groups) != np.shape(x)[2]
        ):
            raise ValueError(
                f"groups must be positive ints summing to channels={np.shape(x)[2]}, got {groups}"
            )
    if impl == "auto":
        impl = _auto_impl(x)
    check_pallas_platform(impl, fallback="xla", gpu_impls=("pallas", *PALLAS_KERNEL_IMPLS))
    positions = _positions(x, segment_ids)
    prefix = linked = None
    if (continues is not None or first_inputs is not None) and width > 1:
        # Only a row's first width - 1 outputs can read before t = 0. A row that does reads a
        # prefix: the previous row's last inputs where linked (the conv slices them out of x and
        # its backward kernel adds their gradient into dx), first_inputs or zeros elsewhere; its
        # first run "began" width - 1 steps before t = 0, so its taps reach into the prefix.
        # One conv call; nothing of the size of x besides it.
        ids = jnp.zeros(np.shape(x)[:2], jnp.int32) if segment_ids is None else segment_ids
        prefix, linked, reads = conv_prefix_links(x, ids, continues, width, first_inputs)
        first_run = positions == jnp.arange(np.shape(x)[1], dtype=jnp.int32)
        positions = positions + jnp.where(reads[:, None] & first_run, width - 1, 0)
    if impl.startswith("pallas"):
        from pallas_kernels.causal_conv1d import causal_conv1d_pallas

        return causal_conv1d_pallas(
            x,
            weight,
            bias,
            positions,
            activation=activation,
            prefix=prefix,
            linked=linked,
            interpret=impl == "pallas_interpret",
            kernel_name=PALLAS_KERNEL_IMPLS.get(impl),
            groups=groups,
        )
    out = _causal_conv1d_jit(x, weight, bias, positions, prefix, linked, activation)
    return _split(out, groups)


def _split(out, groups):
    if groups is None:
        return out
    return tuple(jnp.split(out, list(itertools.accumulate(groups[:-1])), axis=-1))


def _auto_impl(x) -> str:
    if jax.default_backend() != "gpu":
        return "xla"
    from pallas_kernels.causal_conv1d import num_programs
    from pallas_kernels.launch import core_count

    enough = PALLAS_MIN_PROGRAMS_PER_SM * core_count()
    return "pallas" if num_programs(*np.shape(x)) >= enough else "xla"


def causal_conv1d_reference(x, weight, bias=None, *, segment_ids=None, activation=None):
    """The pure-JAX spec of `causal_conv1d` (same contract), differentiated by autodiff."""
    check_causal_conv1d_args(x, weight, bias, segment_ids, activation)
    return _reference_jit(x, weight, bias, _positions(x, segment_ids), activation)


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
        raise ValueError(
            f"bias must have shape ({channels},) to match x {np.shape(x)}, got {np.shape(bias)}"
        )
    for name, a in dict(x=x, weight=weight, bias=bias).items():
        if a is not None and not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(
                f"{name} must be a real floating array, got dtype {jnp.result_type(a)}"
            )
    check_segment_ids(segment_ids, batch, length)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _positions(x, segment_ids):
    batch, length, _ = np.shape(x)
    if segment_ids is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return positions_from_segment_ids(segment_ids)


def _taps(x, position, width, prefix=None):
    """[(k, x shifted by lag = width - 1 - k, float32, zero before each segment's start)];
    prefix (b, width - 1, c) float32 or None: x before t = 0 (zeros without it)."""
    length = x.shape[1]
    xf = x.astype(jnp.float32)
    if prefix is not None:
        xf = jnp.concatenate([prefix, xf], axis=1)
    taps = []
    for k in range(width):
        lag = width - 1 - k
        if prefix is None:
            shifted = jnp.pad(xf, [(0, 0), (lag, 0), (0, 0)])[:, :length]
        else:
            shifted = xf[:, k : k + length]
        # x[t - lag] belongs to t's segment iff t is at least `lag` steps into it.
        taps.append((k, jnp.where((position >= lag)[..., None], shifted, 0.0)))
    return taps


def _pre_activation(x, weight, bias, position, prefix=None):
    w = weight.astype(jnp.float32)
    out = (
        jnp.zeros(x.shape, jnp.float32)
        if bias is None
        else jnp.broadcast_to(bias.astype(jnp.float32), x.shape)
    )
    for k, tap in _taps(x, position, weight.shape[1], prefix):
        out = out + tap * w[:, k]
    return out


def _reference(x, weight, bias, position, activation, prefix=None):
    out = _pre_activation(x, weight, bias, position, prefix)
    if activation == "silu":
        out = jax.nn.silu(out)
    return out.astype(x.dtype)


_reference_jit = jax.jit(_reference, static_argnames=("activation",))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _causal_conv1d(x, weight, bias, position, prefix, linked, activation):
    """prefix, linked: as causal_conv1d_pallas's (x before t = 0; row b - 1's tail where
    linked), or None."""
    prefix = None if prefix is None else conv_prefix(x, prefix, linked)
    return _reference(x, weight, bias, position, activation, prefix)


def _causal_conv1d_fwd(x, weight, bias, position, prefix, linked, activation):
    out = _causal_conv1d(x, weight, bias, position, prefix, linked, activation)
    return out, (x, weight, bias, position, prefix, linked)


def _causal_conv1d_bwd(activation, res, g):
    x, weight, bias, position, given, linked = res
    width, length = weight.shape[1], x.shape[1]
    prefix = None if given is None else conv_prefix(x, given, linked)
    g_pre = g.astype(jnp.float32)
    if activation == "silu":
        pre = _pre_activation(x, weight, bias, position, prefix)
        sig = jax.nn.sigmoid(pre)
        g_pre = g_pre * sig * (1.0 + pre * (1.0 - sig))
    w = weight.astype(jnp.float32)
    dx = jnp.zeros(x.shape, jnp.float32)
    d_prefix = None if prefix is None else jnp.zeros_like(prefix)
    dw = []
    for k, tap in _taps(x, position, width, prefix):
        lag = width - 1 - k
        dw.append(jnp.sum(tap * g_pre, axis=(0, 1)))
        # Output t read x[t - lag] (when t is at least lag into its segment): send its gradient
        # back lag steps.
        sent = jnp.where((position >= lag)[..., None], g_pre, 0.0)
        dx = dx + jnp.pad(sent, [(0, 0), (0, lag), (0, 0)])[:, lag : lag + length] * w[:, k]
        if prefix is not None:  # outputs t < lag read the prefix's row t + k
            head = sent[:, :lag] * w[:, k]
            d_prefix = d_prefix + jnp.pad(head, [(0, 0), (k, lag - head.shape[1]), (0, 0)])
    dweight = jnp.stack(dw, axis=1).astype(weight.dtype)
    dbias = None if bias is None else jnp.sum(g_pre, axis=(0, 1)).astype(bias.dtype)
    d_given = None
    if prefix is not None:
        d_given, d_tail = split_prefix_grad(d_prefix, linked)
        d_given = d_given.astype(given.dtype)
        if d_tail is not None:  # linked: row b's prefix was row b - 1's last inputs
            cut = length - (width - 1)
            dx = jnp.concatenate([dx[:, :cut], dx[:, cut:] + d_tail], axis=1)
    return dx.astype(x.dtype), dweight, dbias, None, d_given, None


_causal_conv1d.defvjp(_causal_conv1d_fwd, _causal_conv1d_bwd)
_causal_conv1d_jit = jax.jit(_causal_conv1d, static_argnums=(6,))


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
    position = jnp.take_along_axis(
        positions_from_segment_ids(segment_ids), jnp.maximum(last, 0), axis=1
    )
    lag = jnp.arange(width - 1, -1, -1)  # oldest first
    index = last[..., None] - lag  # (b, s, w)
    valid = (last >= 0)[..., None] & (lag <= position[..., None])
    flat = jnp.clip(index, 0, length - 1).reshape(batch, num_segments * width)
    window = jnp.take_along_axis(x, flat[..., None], axis=1).reshape(
        batch, num_segments, width, channels
    )
    return jnp.where(valid[..., None], window, jnp.zeros((), x.dtype))
