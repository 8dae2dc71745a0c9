"""Segment ids and PackMamba position indices, and the checks every segmented op shares.

Axis letters: b batch (rows), t time.

A packed row holds several sequences one after another. We describe them by `segment_ids`
(b, t) int32: a new segment begins at t = 0 and wherever the id changes from t - 1 to t. Our
packer numbers the sequences of a row 1, 2, ... and gives padding the id 0. PackMamba describes
the same thing by position indices: the position restarts at 0 where a new sequence begins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import segment_ends, segment_starts

__all__ = [
    "check_segment_ids",
    "positions_from_segment_ids",
    "segment_ends",
    "segment_ids_from_positions",
    "segment_starts",
]


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """(b, t) int32 position of each token within its segment (0 where a segment begins)."""
    length = segment_ids.shape[1]
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    start_of_current = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)
    return t - start_of_current


def segment_ids_from_positions(positions: jax.Array) -> jax.Array:
    """(b, t) int32 segment ids 1, 2, ... numbering the runs that start where position == 0.

    A row whose first position is not 0 still starts a segment at t = 0 (id 1).
    """
    starts = (jnp.asarray(positions) == 0).at[:, 0].set(True)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def check_segment_ids(segment_ids, batch: int, length: int, *, name: str = "segment_ids"):
    """Raises ValueError unless `segment_ids` is an integer (batch, length) array."""
    if segment_ids is None:
        return
    shape = tuple(np.shape(segment_ids))
    if shape != (batch, length):
        raise ValueError(f"{name} must have shape (batch, length) = {(batch, length)}, got {shape}")
    dtype = jnp.result_type(segment_ids)  # reads the dtype without copying to the device
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {dtype}")
