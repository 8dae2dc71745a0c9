"""Pallas (Triton) kernels of the segment-aware depthwise causal conv, forward and backward.

Axis letters: b batch, t time, e channels, w filter width (taps k = 0..w-1, lag = w-1-k).

One program = `block_e` channels x `chunk` time steps of one row, walking time one step at a
time with coalesced (block_e,) row loads; the last w-1 inputs stay in registers as a sliding
window, so every input row is read once (plus w-1 rows of halo per chunk). A tap reaches
x[t - lag] only if t is at least lag steps into its segment (positions[t] >= lag), which is
what a sequence run alone sees. With a `prefix` (x at t = -(w-1) .. -1; DESIGN.md, "Inputs
before t = 0") a run whose positions start at w - 1 reads it before t = 0.

Backward, walking forwards: at step t the kernel recomputes the pre-activation from the window,
g_pre[t] = g[t] * silu'(pre[t]), and sends w_k * g_pre[t] to dx[t - lag] (if positions[t] >=
lag) into a window of w-1 pending dx rows; the oldest is complete once t moves on and is
stored. A chunk's last w-1 dx rows also receive the next chunk's first w-1 steps, so each
program walks w-1 extra steps that only feed those rows. dweight and dbias are sums over
(b, t): one partial row per program, added up by XLA. The prefix's own gradient is computed by
XLA before (vjp.prefix_grad); where it is the previous row's tail, it comes in as `dx_tail` and
is added to the row's last w-1 dx rows when they are stored. The backward walks in blocks of
bwd_unroll steps and issues a block's loads before its arithmetic, so that they are in flight
together (one step's loads alone leave the walk waiting on memory latency); with bwd_pipeline
the loop carries the next block's loaded rows and issues them before this block's arithmetic.

Channel groups: the backward can read the cotangent as several arrays, channels [0, g0),
[g0, g0 + g1), ... (the tile forward's separate outputs, Mamba2's x, B and C), so that XLA need
not join them first. Every group boundary is then a multiple of block_e, so a program's channels
lie in one group; each step loads a row from every group's array under a mask that is all False
but for the owning group's (a predicated load moves no memory) and keeps the owner's.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.launch import iota, load, store
from pallas_kernels.triton_math import sigmoid

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    length: int
    channels: int
    width: int
    block_e: int
    chunk: int
    silu: bool
    # Time steps the backward loads at once (a power of two; DESIGN.md, "Loads ahead"): 1 walks
    # one step a loop iteration. The forward ignores it.
    bwd_unroll: int = 1
    # Backward: load the next block of bwd_unroll steps while computing this one (a software
    # pipeline; DESIGN.md, "Loads ahead"). The forward ignores it.
    bwd_pipeline: bool = False


def _cols(st: Static):
    e0 = pl.program_id(2) * st.block_e
    return e0, e0 + iota(st.block_e) < st.channels


def _row(ref, b, t, e0, cmask, st: Static):
    """(block_e,) float32 row ref[b, t, e0:e0 + block_e], zero outside [0, length)."""
    valid = (t >= 0) & (t < st.length)
    tc = jnp.clip(t, 0, st.length - 1)
    return load(ref, (b, tc, pl.ds(e0, st.block_e)), mask=cmask & valid).astype(F32)


def _x_row(r, b, t, e0, cmask, st: Static):
    """x[b, t] as _row, except that with a prefix (the inputs at t = -(w-1) .. -1) a step
    before t = 0 reads it."""
    row = _row(r["x"], b, t, e0, cmask, st)
    if "prefix" not in r:
        return row
    p = t + st.width - 1
    before = (t < 0) & (p >= 0)
    idx = (b, jnp.clip(p, 0, st.width - 2), pl.ds(e0, st.block_e))
    return jnp.where(before, load(r["prefix"], idx, mask=cmask & before).astype(F32), row)


def group_offsets(groups):
    """[(first channel, channels)] of each group."""
    starts = [sum(groups[:i]) for i in range(len(groups))]
    return list(zip(starts, groups))


def _g_row(r, b, t, e0, cmask, groups, st: Static):
    """The cotangent's row g[b, t, e0:e0 + block_e] as _row, read from the group arrays g0,
    g1, ...: only the group that holds this program's channels is read."""
    if len(groups) == 1:
        return _row(r["g0"], b, t, e0, cmask, st)
    row = None
    for i, (first, size) in enumerate(group_offsets(groups)):
        owns = (e0 >= first) & (e0 < first + size)
        # Not the owner: the load points at the array's start and reads nothing.
        part = _row(r[f"g{i}"], b, t, jnp.where(owns, e0 - first, 0), cmask & owns, st)
        row = part if row is None else jnp.where(owns, part, row)
    return row


def _position(pos_ref, b, t, st: Static):
    """positions[b, t] (0 outside [0, length): such steps see only their own tap, of a zero row)."""
    valid = (t >= 0) & (t < st.length)
    return jnp.where(valid, pos_ref[b, jnp.clip(t, 0, st.length - 1)], 0)


def _params(r, e0, cmask, st: Static):
    taps = [
        load(r["w"], (k, pl.ds(e0, st.block_e)), mask=cmask).astype(F32) for k in range(st.width)
    ]
    bias = (
        load(r["bias"], (pl.ds(e0, st.block_e),), mask=cmask).astype(F32)
        if "bias" in r
        else jnp.zeros((st.block_e,), F32)
    )
    return taps, bias


def _pre(window, x_t, position, taps, bias, st: Static):
    """Pre-activation at t from the window (x[t-w+1] .. x[t-1], oldest first) and x[t]."""
    rows = (*window, x_t)
    acc = bias
    for k in range(st.width):
        lag = st.width - 1 - k
        acc = acc + jnp.where(position >= lag, rows[k], 0.0) * taps[k]
    return acc


def _initial_window(r, b, t0, e0, cmask, st: Static):
    return tuple(_x_row(r, b, t0 - (st.width - 1) + i, e0, cmask, st) for i in range(st.width - 1))


def _fwd_kernel(r, *, st: Static):
    b, t0 = pl.program_id(0), pl.program_id(1) * st.chunk
    e0, cmask = _cols(st)
    taps, bias = _params(r, e0, cmask, st)

    def step(i, window):
        t = t0 + i
        x_t = _row(r["x"], b, t, e0, cmask, st)
        out = _pre(window, x_t, _position(r["positions"], b, t, st), taps, bias, st)
        if st.silu:
            out = out * sigmoid(out)
        store(
            r["out"],
            (b, jnp.minimum(t, st.length - 1), pl.ds(e0, st.block_e)),
            out,
            mask=cmask & (t < st.length),
        )
        return (*window, x_t)[1:]

    jax.lax.fori_loop(0, st.chunk, step, _initial_window(r, b, t0, e0, cmask, st))


def _bwd_kernel(r, *, st: Static, groups: tuple[int, ...]):
    b, c = pl.program_id(0), pl.program_id(1)
    t0 = c * st.chunk
    e0, cmask = _cols(st)
    taps, bias = _params(r, e0, cmask, st)
    zero = jnp.zeros((st.block_e,), F32)

    def completed_row(t):
        """(t_done, keep): dx[t - w + 1] has all its terms at step t; rows before the chunk
        belong to the previous program."""
        t_done = t - (st.width - 1)
        return t_done, (t_done >= t0) & (t_done < jnp.minimum(t0 + st.chunk, st.length))

    # The chunk's steps and the w - 1 past it.
    walk = st.chunk + st.width - 1

    def load_step(i, prefetch=False):
        """Everything step i reads from memory: x[t], positions[t], g[t] and, on linked rows,
        the dx_tail row that step's completed dx row receives (else None). prefetch: a step
        past the walk (in the pipeline's last prefetch) reads no row; its values go unused and
        positions[t]'s index is clamped."""
        t = t0 + i
        rows_mask = cmask & (i < walk) if prefetch else cmask
        x_t = _row(r["x"], b, t, e0, rows_mask, st)
        position = _position(r["positions"], b, t, st)
        g_t = _g_row(r, b, t, e0, rows_mask, groups, st)
        tail = None
        if "dx_tail" in r:  # the next row's prefix gradient, for its last w - 1 rows
            t_done, keep = completed_row(t)
            q = t_done - (st.length - (st.width - 1))
            idx = (b, jnp.clip(q, 0, st.width - 2), pl.ds(e0, st.block_e))
            tail = load(r["dx_tail"], idx, mask=rows_mask & keep & (q >= 0)).astype(F32)
        return x_t, position, g_t, tail

    def step(i, loaded, carry):
        window, pending, dw, dbias = carry
        x_t, position, g_pre, tail = loaded
        t = t0 + i
        if st.silu:
            pre = _pre(window, x_t, position, taps, bias, st)
            sig = sigmoid(pre)
            g_pre = g_pre * sig * (1.0 + pre * (1.0 - sig))
        # Steps past the chunk only complete its last dx rows; their weight gradients belong to
        # the next program.
        own = (i < st.chunk).astype(F32)
        rows = (*window, x_t)
        dw = tuple(
            dw[k] + own * jnp.where(position >= st.width - 1 - k, rows[k], 0.0) * g_pre
            for k in range(st.width)
        )
        dbias = dbias + own * g_pre
        # pending holds dx[t-w+1] .. dx[t-1] (oldest first); tap k of step t lands on dx[t-lag].
        rows_dx = (*pending, zero)
        rows_dx = tuple(
            rows_dx[k] + jnp.where(position >= st.width - 1 - k, g_pre, 0.0) * taps[k]
            for k in range(st.width)
        )
        done = rows_dx[0] if tail is None else rows_dx[0] + tail
        t_done, keep = completed_row(t)
        store(
            r["dx"],
            (b, jnp.clip(t_done, 0, st.length - 1), pl.ds(e0, st.block_e)),
            done,
            mask=cmask & keep,
        )
        return (*window, x_t)[1:], rows_dx[1:], dw, dbias

    def load_block(i0, steps, prefetch=False):
        return tuple(load_step(i0 + u, prefetch) for u in range(steps))

    def run_block(i0, loaded, carry):
        # The steps' arithmetic in order, as one step at a time would do it.
        for u, step_inputs in enumerate(loaded):
            carry = step(i0 + u, step_inputs, carry)
        return carry

    def block(i0, steps, carry):
        # Every step's loads first, so that they are in flight together (DESIGN.md, "Loads
        # ahead").
        return run_block(i0, load_block(i0, steps), carry)

    def pipelined_block(j, carry_and_loaded):
        # Block j + 1's loads go out before block j's arithmetic and stores, which they could
        # not pass otherwise (nothing tells the compiler that the dx stores miss them), so
        # their latency overlaps it. The loop's last prefetch is the remainder block's loads.
        carry, loaded = carry_and_loaded
        following = load_block((j + 1) * st.bwd_unroll, st.bwd_unroll, prefetch=True)
        return run_block(j * st.bwd_unroll, loaded, carry), following

    pending = tuple(zero for _ in range(st.width - 1))
    carry = (
        _initial_window(r, b, t0, e0, cmask, st),
        pending,
        tuple(zero for _ in range(st.width)),
        zero,
    )
    # The walk in blocks of bwd_unroll; what is left over (fewer than bwd_unroll steps: the
    # whole walk where the chunk is short) is one last block.
    full, left = divmod(walk, st.bwd_unroll)
    last_loaded = None  # the last block's loads, where the pipeline's last prefetch issued them
    if full and st.bwd_pipeline:
        carry, following = jax.lax.fori_loop(
            0, full, pipelined_block, (carry, load_block(0, st.bwd_unroll))
        )
        last_loaded = following[:left]
    elif full:
        carry = jax.lax.fori_loop(
            0, full, lambda j, c: block(j * st.bwd_unroll, st.bwd_unroll, c), carry
        )
    if left:
        i0 = jnp.int32(walk - left)
        carry = run_block(i0, load_block(i0, left) if last_loaded is None else last_loaded, carry)
    _, _, dw, dbias = carry
    for k in range(st.width):
        store(r["dw"], (b, c, k, pl.ds(e0, st.block_e)), dw[k], mask=cmask)
    store(r["dbias"], (b, c, pl.ds(e0, st.block_e)), dbias, mask=cmask)


def _grid(batch, st: Static):
    return (batch, -(-st.length // st.chunk), -(-st.channels // st.block_e))


def conv_fwd(x, w_t, bias, positions, prefix=None, *, st: Static, num_warps: int, interpret: bool):
    """out (b, t, e) in x's dtype; w_t (w, e) float32, bias (e,) float32 or None, positions
    (b, t) int32, prefix (b, w - 1, e) or None: x at t = -(w-1) .. -1 (read where positions
    reach before t = 0)."""
    return launch.call(
        _fwd_kernel,
        dict(x=x, w=w_t, bias=bias, positions=positions, prefix=prefix),
        dict(out=jax.ShapeDtypeStruct(x.shape, x.dtype)),
        grid=_grid(x.shape[0], st),
        name="causal_conv1d_fwd",
        num_warps=num_warps,
        interpret=interpret,
        st=st,
    )[0]


def conv_bwd(
    x,
    w_t,
    bias,
    positions,
    gs,
    prefix=None,
    dx_tail=None,
    *,
    st: Static,
    num_warps: int,
    interpret: bool,
):
    """(dx (b, t, e) in x's dtype, dweight partials (b, chunks, w, e) and dbias partials
    (b, chunks, e), float32). gs: the output's cotangent as a tuple of its channel groups (one
    array: (g,)), every boundary between them a multiple of st.block_e. prefix: conv_fwd's;
    dx_tail (b, w - 1, e) float32 or None: added to dx's last w - 1 rows (the gradient of a next
    row's prefix that is this row's tail)."""
    groups = tuple(g.shape[-1] for g in gs)
    if sum(groups) != st.channels or any(s % st.block_e for s in itertools.accumulate(groups[:-1])):
        raise ValueError(
            f"gs must split {st.channels} channels at multiples of {st.block_e}, got {groups}"
        )
    batch = x.shape[0]
    nc = -(-st.length // st.chunk)
    return launch.call(
        _bwd_kernel,
        dict(
            x=x,
            w=w_t,
            bias=bias,
            positions=positions,
            prefix=prefix,
            dx_tail=dx_tail,
            **{f"g{i}": g for i, g in enumerate(gs)},
        ),
        dict(
            dx=jax.ShapeDtypeStruct(x.shape, x.dtype),
            dw=jax.ShapeDtypeStruct((batch, nc, st.width, st.channels), F32),
            dbias=jax.ShapeDtypeStruct((batch, nc, st.channels), F32),
        ),
        grid=_grid(batch, st),
        name="causal_conv1d_bwd",
        num_warps=num_warps,
        interpret=interpret,
        st=st,
        groups=groups,
    )
