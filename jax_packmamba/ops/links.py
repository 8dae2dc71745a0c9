"""Rows linked across a packed batch: a document longer than a row, carried over exactly.

Axis letters: b batch (rows), t time.

A link is `continues` (b,) bool: row b's first run (the one at t = 0) continues row b - 1's
last run. It is the simplest form packing can always produce: a packer that fills rows in
order puts the rest of a document that overflows row b - 1 at the start of row b, so a chain
of pieces is a run of consecutive rows, and no index has to name which row is continued.
continues[0] must be False (no row precedes row 0; a state carried from an earlier batch enters
as row 0's initial state instead): refused when concrete, read as False under jit.

The state at the end of a row's last run is affine in the state its first run starts from:
when the row is a single run, end = decay * start + end0 (decay: the run's total decay, end0:
its end from the given start); otherwise the last run began inside the row and end = end0.
`chain_row_states` walks the rows (b steps on (b, ...) states: nothing next to the scans), and
the scan runs from the chained starts. end0 costs no scan of its own where the op can read it
directly: the SSD (scalar decay per head) sums the last run's tokens in one contraction over
time (ssd_scan._last_run_end_states); the Mamba1 kernel carries the link in its own chunk-state
pass; only the Mamba1 reference runs its scan twice. Everything is differentiable, so gradients
flow back along the chain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import segment_starts


def check_continues(continues, batch: int):
    """Raises ValueError unless `continues` is None or a (batch,) bool array, False at row 0
    (checked when concrete)."""
    if continues is None:
        return
    shape = tuple(np.shape(continues))
    if shape != (batch,):
        raise ValueError(f"continues must have shape (batch,) = ({batch},), got {shape}")
    dtype = jnp.result_type(continues)
    if dtype != jnp.bool_:
        raise ValueError(f"continues must be a bool array, got dtype {dtype}")
    if not isinstance(continues, jax.core.Tracer) and bool(np.asarray(continues)[0]):
        raise ValueError(
            "continues[0] must be False: no row precedes row 0 (pass a carried "
            "state as row 0's initial state)"
        )


def single_run_rows(segment_ids):
    """(b,) bool: the row is one run (no run begins after t = 0)."""
    return ~jnp.any(segment_starts(segment_ids)[:, 1:], axis=1)


def compact_ids(segment_ids, special: str):
    """(b, t) ids with the same run boundaries in three slots: the row's `special` run ("first"
    or "last") gets slot 0, the others 1 and 2 alternately (so neighbours still differ). Lets a
    scan read one run's final state, or give one run a start, whatever the ids' range."""
    run = jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)  # 1, 2, ...
    target = 1 if special == "first" else run[:, -1:]
    return jnp.where(run == target, 0, 1 + run % 2)


def row_ends_by_slot(scan, *args, segment_ids, length_like, **kwargs):
    """(y, each row's end state (b, ...)) from a reference scan's final states, the row's last
    run in slot 0 of three (compact_ids): how the references answer return_row_end_states,
    which the kernels read from their passes between chunks. length_like: any (b, t, ...)
    input, for the ids when segment_ids is None."""
    ids = jnp.zeros(length_like.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    y, final = scan(
        *args,
        segment_ids=compact_ids(ids.astype(jnp.int32), "last"),
        return_final_states=True,
        num_segments=3,
        **kwargs,
    )
    return y, final[:, 0]


def chain_row_states(end, decay, single_run, continues, given):
    """(b, ...) state each row's first run starts from, following the links.

    end: each row's last-run end state when its first run starts from `given` (b, ...);
    decay: that run's total decay (broadcastable to end), read only for single-run rows;
    single_run (b,), continues (b,) bool; given (b, ...): the start of rows that do not continue.
    """
    decay = jnp.broadcast_to(decay, end.shape)
    continues = continues & (jnp.arange(continues.shape[0]) > 0)  # nothing precedes row 0

    def row(prev_end, xs):
        end_r, decay_r, single_r, cont_r, given_r = xs
        start = jnp.where(cont_r, prev_end, given_r)
        # A single-run row's end moves with its start; `where`, not a product, so a row that
        # neither continues nor is continued stays bit-identical whatever its neighbours hold.
        moved = end_r + decay_r * (start - given_r)
        return jnp.where(single_r, moved, end_r), start

    _, starts = jax.lax.scan(
        row, jnp.zeros_like(end[0]), (end, decay, single_run, continues, given)
    )
    return starts


def previous_row_tail(x, segment_ids, continues, width: int, first_inputs=None):
    """For a prefill's conv cache (layers.segment_caches; the conv itself reads a prefix,
    conv_prefix_links): (x_ext (b, width - 1 + t, c), ids_ext (b, width - 1 + t)): each row
    preceded by the last width - 1 inputs of the row before it, with ids that make the taps of
    a continuing first run read them (exactly those in the previous row's last run) and every
    other tap read zeros. first_inputs (b, width - 1, c), optional: what a row's first run reads
    before t = 0 where the row does not continue (a state carried from an earlier batch; zeros
    for a run that begins there). continues None: no row continues. Needs t >= width - 1: a
    continued run shorter than the conv window would reach two rows back."""
    k = width - 1
    batch, length, _ = x.shape
    if length < k:
        raise ValueError(f"continues needs rows of at least width - 1 = {k} steps, got {length}")
    seg = segment_ids.astype(jnp.int32)
    if continues is None:
        continues = jnp.zeros((batch,), bool)
    tail = jnp.roll(x[:, length - k :], 1, axis=0)  # row b - 1's tail in row b
    in_last = jnp.roll(_in_last_run(seg[:, length - k :], seg[:, -1:]), 1, axis=0)
    link = continues[:, None] & in_last & (jnp.arange(batch) > 0)[:, None]  # row 0: no link
    if first_inputs is not None:  # where a row does not continue, it reads first_inputs
        tail = jnp.where(link[..., None], tail, first_inputs.astype(x.dtype))
        link = link | ~(continues[:, None] & (jnp.arange(batch) > 0)[:, None])
    # Positions that are not linked get an id unlike the first run's, so it restarts after them.
    tail_ids = jnp.where(link, seg[:, :1], seg[:, :1] - 1)
    x_ext = jnp.concatenate([jnp.where(link[..., None], tail, jnp.zeros((), x.dtype)), x], axis=1)
    return x_ext, jnp.concatenate([tail_ids, seg], axis=1)


def conv_prefix_links(x, segment_ids, continues, width: int, first_inputs=None):
    """For the causal conv with a prefix (the inputs each row reads before t = 0):
    (prefix (b, width - 1, c) in x's dtype, linked (b, width - 1) bool, reads (b,) bool).
    linked: the position is row b - 1's input x[b - 1, t - width + 1 + p] (row b continues and
    it lies in row b - 1's last run), which the conv reads in place of prefix there (see
    pallas_kernels.common.conv_prefix); prefix: first_inputs where the row does not continue,
    zeros elsewhere. reads: the row's first run reads the prefix (it continues, or first_inputs
    is given), so its positions start at width - 1. Needs t >= width - 1 (as
    previous_row_tail)."""
    k = width - 1
    batch, length, channels = x.shape
    if length < k:
        raise ValueError(f"continues needs rows of at least width - 1 = {k} steps, got {length}")
    seg = segment_ids.astype(jnp.int32)
    if continues is None:
        continues = jnp.zeros((batch,), bool)
    continues = continues & (jnp.arange(batch) > 0)  # row 0: no link
    in_last = jnp.roll(_in_last_run(seg[:, length - k :], seg[:, -1:]), 1, axis=0)
    linked = continues[:, None] & in_last
    if first_inputs is None:
        return jnp.zeros((batch, k, channels), x.dtype), linked, continues
    prefix = jnp.where(
        continues[:, None, None], jnp.zeros((), x.dtype), first_inputs.astype(x.dtype)
    )
    return prefix, linked, jnp.ones((batch,), bool)


def _in_last_run(tail_seg, last_id):
    """(b, k) bool: the tail position belongs to the row's last run (it and every later one
    have the last id)."""
    return jnp.flip(jnp.cumprod(jnp.flip(tail_seg == last_id, 1), axis=1), 1).astype(bool)


def last_run_inputs(x, segment_ids, width: int):
    """(b, width - 1, c): each row's last width - 1 inputs that belong to its last run, zeros
    before that run's start: the conv state that run's next token reads (the next row's
    `first_inputs` when the run goes on there). Needs t >= width - 1 (as the links do)."""
    k = width - 1
    length = x.shape[1]
    if length < k:
        raise ValueError(f"rows need at least width - 1 = {k} steps, got {length}")
    seg = segment_ids.astype(jnp.int32)
    in_last = _in_last_run(seg[:, length - k :], seg[:, -1:])
    return jnp.where(in_last[..., None], x[:, length - k :], jnp.zeros((), x.dtype))
