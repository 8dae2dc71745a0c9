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
    "check_pallas_platform",
    "check_segment_ids",
    "check_chunk_and_slots",
    "check_segment_slots",
    "positions_from_segment_ids",
    "segment_ends",
    "segment_ids_from_positions",
    "segment_starts",
]


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """(b, t) int32 position of each token within its segment (0 where a segment begins).

    segment_ids: (b, t) integers (a float id has no exact "changes here"; it is refused).
    """
    _check_integer_rows(segment_ids, "segment_ids")
    length = segment_ids.shape[1]
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    start_of_current = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)
    return t - start_of_current


def segment_ids_from_positions(positions: jax.Array) -> jax.Array:
    """(b, t) int32 segment ids 1, 2, ... numbering the runs that start where position == 0.

    A row whose first position is not 0 still starts a segment at t = 0 (id 1). positions:
    (b, t) integers (float positions are refused, as float ids are).
    """
    _check_integer_rows(positions, "positions")
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


def check_segment_slots(segment_ids, num_segments: int, *, used_by: str | None = None):
    """Raises ValueError unless concrete segment_ids lie in [0, num_segments), naming the
    num_segments they need: the state of an id outside the slots would be silently dropped.

    Traced ids (under jit) cannot be read here; the ops' docstrings state the contract.
    used_by: the argument whose slots these are (for the message), e.g. "return_final_states".
    """
    if segment_ids is None or isinstance(segment_ids, jax.core.Tracer):
        return
    ids = np.asarray(segment_ids)
    low, high = int(ids.min()), int(ids.max())
    what = f"segment_ids must lie in [0, num_segments={num_segments})"
    if used_by:
        what += f" (the slots of {used_by})"
    if low < 0:
        raise ValueError(f"{what}, got a negative id {low}")
    if high >= num_segments:
        raise ValueError(f"{what}, got ids up to {high}: pass num_segments={high + 1} or more")


def check_chunk_and_slots(
    segment_ids,
    chunk_size,
    num_segments,
    *,
    return_final_states: bool,
    initial_states_given: bool,
) -> int | None:
    """The chunked scans' shared checks: chunk_size a positive int; num_segments (None: 1 slot
    when states are asked for or given without segment_ids) a positive int whose slots hold
    every id. Returns the resolved num_segments."""
    if (
        not isinstance(chunk_size, (int, np.integer))
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if num_segments is None and (return_final_states or initial_states_given):
        if segment_ids is not None:
            raise ValueError(
                "return_final_states with segment_ids needs num_segments (ids must "
                "lie in [0, num_segments))"
            )
        num_segments = 1
    if num_segments is not None:
        if (
            not isinstance(num_segments, (int, np.integer))
            or isinstance(num_segments, bool)
            or num_segments < 1
        ):
            raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
        used_by = (
            "return_final_states"
            if return_final_states
            else "initial_states"
            if initial_states_given
            else None
        )
        check_segment_slots(segment_ids, num_segments, used_by=used_by)
    return num_segments


GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def check_pallas_platform(
    impl: str, *, fallback: str, name: str = "impl", gpu_impls: tuple[str, ...] = ("pallas",)
):
    """Raises ValueError for impl="pallas" (or another of `gpu_impls`) when the code is not
    being built for a GPU.

    The target is the current abstract mesh's device when one is set (how a CPU machine lowers
    for CUDA: tests/gpu.py), else the default backend, as Pallas itself decides. Without this,
    Pallas fails deep in lowering with a message that does not name `impl`. `fallback` names
    the op's non-kernel implementation ("reference" or "xla"); `name` the argument.
    """
    if impl not in gpu_impls:
        return
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    if platform not in GPU_PLATFORMS:
        raise ValueError(
            f'{name}="{impl}" runs Triton kernels, which need a GPU, but this runs on '
            f'{platform!r}; use {name}="pallas_interpret" (the same kernels through the Pallas '
            f'interpreter, any backend), "{fallback}" or "auto"'
        )


def _check_integer_rows(a, name: str):
    shape = tuple(np.shape(a))
    if len(shape) != 2:
        raise ValueError(f"{name} must be a (batch, length) array, got shape {shape}")
    dtype = jnp.result_type(a)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {dtype}")
