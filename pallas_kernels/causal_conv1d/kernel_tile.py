"""Tile-parallel Pallas (Triton) kernels of the segment-aware depthwise causal conv, forward and
backward: the alternative to kernel.py's time walk (DESIGN.md, "Tile kernels").

Axis letters: b batch, t time, e channels, w filter width (taps k = 0..w-1, lag = w-1-k).

Forward: one program = one (block_t, block_e) output tile. Tap k is one (block_t, block_e) load
of x shifted back by its lag, masked where the row is less than lag steps into its segment
(positions[t] >= lag is the whole segment rule), so no row before a segment start is read. The
w loads overlap in all but w-1 rows; the repeats are served by L1/L2, DRAM sees x about once.

Backward: dx[t] = sum_k w_k * g_pre[t + lag_k] * [positions[t + lag_k] >= lag_k], with
g_pre[s] = g[s] * silu'(pre[s]) recomputed at each of the w shifted rows s = t + lag from the
2w - 1 shifted tiles x[t + d], d = -(w-1) .. w-1, each loaded once per tile. dweight and dbias
are sums over (b, t) of the unshifted rows' terms: a program walks `chunk` steps, block_t at a
time, accumulates them in registers and writes one partial row, added up by XLA.

A `prefix` (x at t = -(w-1) .. -1) is read by rows before t = 0, and `dx_tail` added to the
row's last w-1 dx rows, as in kernel.py (DESIGN.md, "Inputs before t = 0").

Channel groups (`Static.groups`): the output can be written as several arrays, channels
[0, g0), [g0, g0 + g1), ... (Mamba2's x, B and C out of its xBC conv), so that XLA does not copy
them out of one array; the backward then reads one cotangent a group. Every group boundary is a
multiple of block_e (the caller checks), so each program's channels lie in one group; it stores
into (and loads from) every group's array with a mask that is all False except for its own.

Shifted rows run before t = 0 or past the row's end; a load takes its rows as an index array
clamped into the row, with a mask, because a slice starting before 0 would be shifted into range
by the interpreter (a GPU load through a masked pointer reads nothing there either way).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.causal_conv1d.kernel import group_offsets
from pallas_kernels.launch import iota, load, store
from pallas_kernels.triton_math import fma, sigmoid

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    length: int
    channels: int
    width: int
    silu: bool
    block_t: int
    block_e: int
    chunk: int  # backward: time steps a program (a multiple of block_t); forward: block_t
    num_warps: int
    fast: bool  # PTX sigmoid and fma (GPU); the interpreter runs the plain jnp forms
    groups: tuple[int, ...]  # channels of each output array (one group: (channels,))


def _cols(st: Static):
    e0 = pl.program_id(2) * st.block_e
    return e0, e0 + iota(st.block_e) < st.channels


def _inside(rows, st: Static):
    return (rows >= 0) & (rows < st.length)


def _tile(ref, b, rows, e0, row_mask, cmask, st: Static):
    """(block_t, block_e) float32 tile ref[b, rows, e0:e0 + block_e], zero where row_mask
    (block_t,) or cmask (block_e,) is False (nothing read there)."""
    idx = (b, jnp.clip(rows, 0, st.length - 1)[:, None], (e0 + iota(st.block_e))[None, :])
    return load(ref, idx, mask=row_mask[:, None] & cmask[None, :]).astype(F32)


def _x_tile(r, b, rows, e0, row_mask, cmask, st: Static):
    """_tile of x, except that with a prefix (the inputs at t = -(w-1) .. -1) rows before
    t = 0 read it."""
    if "prefix" not in r:
        return _tile(r["x"], b, rows, e0, row_mask, cmask, st)
    k = st.width - 1
    before = rows < 0
    from_x = _tile(r["x"], b, rows, e0, row_mask & ~before, cmask, st)
    idx = (b, jnp.clip(rows + k, 0, k - 1)[:, None], (e0 + iota(st.block_e))[None, :])
    mask = (row_mask & before & (rows >= -k))[:, None] & cmask[None, :]
    return jnp.where(before[:, None], load(r["prefix"], idx, mask=mask).astype(F32), from_x)


def _readable(rows, r, st: Static):
    """Rows of x that exist: [0, length), and the prefix's w - 1 rows before 0 if given."""
    if "prefix" not in r:
        return _inside(rows, st)
    return (rows >= -(st.width - 1)) & (rows < st.length)


def _in_group(e0, first, size, cmask, st: Static):
    """(where group (first, size) has this program's columns, e0's column in its array)."""
    cols = e0 + iota(st.block_e)
    # Not this program's group: nothing is read or written, but keep the start in the array.
    return cmask & (cols >= first) & (cols < first + size), jnp.maximum(e0 - first, 0)


def _grouped_tile(r, name, b, rows, e0, row_mask, cmask, st: Static):
    """_tile over the group arrays name0, name1, ...: each column comes from its group's."""
    tiles = []
    for i, (first, size) in enumerate(group_offsets(st.groups)):
        mine, start = _in_group(e0, first, size, cmask, st)
        tiles.append(_tile(r[f"{name}{i}"], b, rows, start, row_mask, mine, st))
    return sum(tiles[1:], tiles[0])


def _positions(pos_ref, b, rows, st: Static):
    """positions[b, rows]; -1 outside [0, length), where no tap (not even lag 0) reads."""
    idx = (b, jnp.clip(rows, 0, st.length - 1))
    return load(pos_ref, idx, mask=_inside(rows, st), other=-1)


def _params(r, e0, cmask, st: Static):
    taps = [
        load(r["w"], (k, pl.ds(e0, st.block_e)), mask=cmask).astype(F32)[None, :]
        for k in range(st.width)
    ]
    bias = (
        load(r["bias"], (pl.ds(e0, st.block_e),), mask=cmask).astype(F32)
        if "bias" in r
        else jnp.zeros((st.block_e,), F32)
    )
    return taps, bias[None, :]


def _lag(k, st: Static):
    return st.width - 1 - k


def _pre(shifted, position, taps, bias, st: Static):
    """Pre-activation at rows s (block_t, block_e) from shifted(lag) = x[s - lag] and
    positions[s]: tap k only where s is at least its lag into its segment. Taps in k order, as
    the reference adds them."""
    acc = jnp.broadcast_to(bias, (st.block_t, st.block_e))
    for k in range(st.width):
        lag = _lag(k, st)
        tap = jnp.where((position >= lag)[:, None], shifted(lag), 0.0)
        acc = fma(tap, taps[k], acc, fast=st.fast)
    return acc


def _store_rows(ref, b, t0, e0, value, cmask, st: Static):
    rows = t0 + iota(st.block_t)
    mask = (rows < st.length)[:, None] & cmask[None, :]
    store(ref, (b, pl.ds(t0, st.block_t), pl.ds(e0, st.block_e)), value, mask=mask)


def _store_grouped(r, name, b, t0, e0, value, cmask, st: Static):
    for i, (first, size) in enumerate(group_offsets(st.groups)):
        mine, start = _in_group(e0, first, size, cmask, st)
        _store_rows(r[f"{name}{i}"], b, t0, start, value, mine, st)


def _fwd_kernel(r, *, st: Static):
    b, t0 = pl.program_id(0), pl.program_id(1) * st.block_t
    e0, cmask = _cols(st)
    taps, bias = _params(r, e0, cmask, st)
    t = t0 + iota(st.block_t)
    position = _positions(r["positions"], b, t, st)

    def shifted(lag):
        # Without a prefix positions[t] >= lag implies t - lag >= 0; with one, t - lag >= -(w-1).
        # Rows past the end have position -1.
        return _x_tile(r, b, t - lag, e0, position >= lag, cmask, st)

    out = _pre(shifted, position, taps, bias, st)
    if st.silu:
        out = out * sigmoid(out, fast=st.fast)
    _store_grouped(r, "out", b, t0, e0, out, cmask, st)


def _bwd_kernel(r, *, st: Static):
    b, c = pl.program_id(0), pl.program_id(1)
    e0, cmask = _cols(st)
    taps, bias = _params(r, e0, cmask, st)
    w = st.width
    chunk0 = c * st.chunk
    # Tiles of this chunk that hold rows of the sequence (the last chunk may end early).
    n_tiles = (jnp.minimum(st.chunk, st.length - chunk0) + st.block_t - 1) // st.block_t

    def tile(i, carry):
        dw, dbias = carry
        t0 = chunk0 + i * st.block_t
        t = t0 + iota(st.block_t)
        # x[t + d]: d <= 0 for the weight gradient; d > 0 only to recompute pre at later rows.
        reach = range(-(w - 1), w if st.silu else 1)
        x_at = {d: _x_tile(r, b, t + d, e0, _readable(t + d, r, st), cmask, st) for d in reach}
        dx = jnp.zeros((st.block_t, st.block_e), F32)
        for k in range(w):
            lag = _lag(k, st)
            s = t + lag  # output rows that read x[t] through tap k ...
            position = _positions(r["positions"], b, s, st)
            reads = position >= lag  # ... where t is in s's segment
            g_pre = _grouped_tile(r, "g", b, s, e0, reads, cmask, st)
            if st.silu:
                pre = _pre(lambda lag2: x_at[lag - lag2], position, taps, bias, st)
                sig = sigmoid(pre, fast=st.fast)
                g_pre = g_pre * sig * (1.0 + pre * (1.0 - sig))
            dx = fma(g_pre, taps[k], dx, fast=st.fast)
            if lag == 0:  # s = t: this tile's own rows' terms of dweight and dbias
                dw = tuple(
                    dw[k2]
                    + jnp.sum(
                        jnp.where((position >= _lag(k2, st))[:, None], x_at[-_lag(k2, st)], 0.0)
                        * g_pre,
                        axis=0,
                    )
                    for k2 in range(w)
                )
                dbias = dbias + jnp.sum(g_pre, axis=0)
        if "dx_tail" in r:  # the next row's prefix gradient, for its last w - 1 rows
            q = t - (st.length - (w - 1))
            at_tail = (q >= 0) & (t < st.length)
            idx = (b, jnp.clip(q, 0, w - 2)[:, None], (e0 + iota(st.block_e))[None, :])
            dx = dx + load(r["dx_tail"], idx, mask=at_tail[:, None] & cmask[None, :])
        _store_rows(r["dx"], b, t0, e0, dx, cmask, st)
        return dw, dbias

    zero = jnp.zeros((st.block_e,), F32)
    dw, dbias = jax.lax.fori_loop(0, n_tiles, tile, (tuple(zero for _ in range(w)), zero))
    for k in range(w):
        store(r["dw"], (b, c, k, pl.ds(e0, st.block_e)), dw[k], mask=cmask)
    store(r["dbias"], (b, c, pl.ds(e0, st.block_e)), dbias, mask=cmask)


def conv_fwd(x, w_t, bias, positions, prefix=None, *, st: Static, interpret: bool):
    """Tuple of the outputs (b, t, group) in x's dtype, one per group; w_t (w, e) float32, bias
    (e,) float32 or None, positions (b, t) int32, prefix (b, w - 1, e) or None: x at
    t = -(w-1) .. -1 (read where positions reach before t = 0)."""
    batch, length, _ = x.shape
    return launch.call(
        _fwd_kernel,
        dict(x=x, w=w_t, bias=bias, positions=positions, prefix=prefix),
        {
            f"out{i}": jax.ShapeDtypeStruct((batch, length, size), x.dtype)
            for i, size in enumerate(st.groups)
        },
        grid=(batch, -(-st.length // st.block_t), -(-st.channels // st.block_e)),
        name="causal_conv1d_tile_fwd",
        num_warps=st.num_warps,
        interpret=interpret,
        st=st,
    )


def conv_bwd(
    x, w_t, bias, positions, gs, prefix=None, dx_tail=None, *, st: Static, interpret: bool
):
    """(dx (b, t, e) in x's dtype, dweight partials (b, chunks, w, e) and dbias partials
    (b, chunks, e), float32): kernel.conv_bwd's contract (prefix, dx_tail included), with gs
    the outputs' cotangents, one per group."""
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
        grid=(batch, nc, -(-st.channels // st.block_e)),
        name="causal_conv1d_tile_bwd",
        num_warps=st.num_warps,
        interpret=interpret,
        st=st,
    )
