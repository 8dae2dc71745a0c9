"""jnp pieces that both the kernels' wrappers and the library's reference ops need.

They live on the kernels' side so that dependencies point one way (train -> jax_packmamba ->
pallas_kernels); `jax_packmamba.ops` re-exports them.

Axis letters: b batch (rows), t time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """(b, t) bool: True where a segment begins (t = 0 or the id changes)."""
    first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([first, changed], axis=1)


def segment_ends(segment_ids: jax.Array) -> jax.Array:
    """(b, t) bool: True at the last token of each segment (where the next one starts)."""
    starts = segment_starts(segment_ids)
    return jnp.concatenate([starts[:, 1:], jnp.ones_like(starts[:, :1])], axis=1)


def combine_affine(left, right):
    """Composition of affine maps h -> a h + b, `left` applied first: the associative
    operator of the linear recurrence, for `lax.associative_scan`."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def conv_prefix(x, prefix, linked=None):
    """(b, w - 1, c) float32: the inputs a causal conv reads before t = 0, `prefix`, except
    where linked (b, w - 1) bool: there row b reads row b - 1's last inputs x[b - 1, t - w + 1:]
    (row 0's link is to be False). x (b, t, c) with t >= w - 1 where linked is given."""
    prefix = prefix.astype(jnp.float32)
    if linked is None:
        return prefix
    k = prefix.shape[1]
    tail = jnp.roll(x[:, x.shape[1] - k :], 1, axis=0).astype(jnp.float32)
    return jnp.where(linked[..., None], tail, prefix)


def split_prefix_grad(d_prefix, linked=None):
    """(cotangent of the given prefix, cotangent of x's last w - 1 rows or None) from d_prefix,
    the cotangent of conv_prefix's result: linked positions send theirs to the row before."""
    if linked is None:
        return d_prefix, None
    zero = jnp.zeros((), d_prefix.dtype)
    sent = jnp.roll(jnp.where(linked[..., None], d_prefix, zero), -1, axis=0)
    return jnp.where(linked[..., None], zero, d_prefix), sent
