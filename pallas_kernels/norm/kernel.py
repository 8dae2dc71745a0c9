"""Pallas (Triton) kernels of the row norms: RMSNorm with an optional residual add before it,
and the gated RMSNorm (x * silu(z), normalised per group), forward and backward.

Axis letters: r rows (tokens), c columns (features), g groups of `group_size` columns.

One tile = `block_rows` rows x one group's columns, the group as one power-of-two block
(`block_c`), masked past `group_size`. Every value is float32 in registers.

Forward, per tile: v = x (+ residual) (* silu(z)); rstd = 1 / sqrt(mean(v^2) + eps) over the
group; out = v * rstd * weight; rstd is stored per (row, group) for the backward, and v itself
when it is the new residual stream (`residual_out`).

Backward, per tile, from v (re-read, or recomputed from the saved x and z) and rstd:
n = v * rstd, dn = g * weight, dv = rstd * (dn - n * mean(dn * n)) (+ the residual stream's own
gradient `g_res`); dweight = sum over rows of g * n, one partial row a program (each program
walks a contiguous run of tiles), added up by XLA. With a gate, dx = dv * silu(z) and
dz = dv * x * silu'(z). Static.prefetch software-pipelines the walk: each tile's inputs are
loaded during the previous tile's compute.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.launch import iota, load, store
from pallas_kernels.triton_math import sigmoid

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    rows: int
    group_size: int
    groups: int
    block_rows: int
    block_c: int
    eps: float
    num_warps: int
    tiles_per_program: int = 1  # backward: tiles a program walks
    prefetch: bool = False  # backward: load the next tile of the walk before computing this one


def _tile(r0, group, st: Static):
    """(rows index, columns index, mask) of the tile at row r0 of a group. (program_id is read
    once, outside any loop: the interpreter cannot lower it inside one.)"""
    c0 = group * st.group_size
    in_group = iota(st.block_c) < st.group_size
    rows = r0 + iota(st.block_rows)
    mask = (rows < st.rows)[:, None] & in_group[None, :]
    return (pl.ds(r0, st.block_rows), pl.ds(c0, st.block_c)), mask


def _weight(r, group, st: Static):
    c0 = group * st.group_size
    return load(r["w"], (pl.ds(c0, st.block_c),), mask=iota(st.block_c) < st.group_size)


def _gate(z):
    sig = sigmoid(z)
    return z * sig, sig


def _rstd(v, st: Static):
    return jax.lax.rsqrt(jnp.sum(v * v, axis=1) / st.group_size + st.eps)


def _store_rstd(r, r0, group, rstd, st: Static):
    rows = r0 + iota(st.block_rows)
    store(r["rstd"], (pl.ds(r0, st.block_rows), group), rstd, mask=rows < st.rows)


def _fwd_kernel(r, *, st: Static):
    r0, group = pl.program_id(0) * st.block_rows, pl.program_id(1)
    idx, mask = _tile(r0, group, st)
    v = load(r["x"], idx, mask=mask).astype(F32)
    if "residual" in r:
        v = v + load(r["residual"], idx, mask=mask).astype(F32)
    if "residual_out" in r:
        store(r["residual_out"], idx, v, mask=mask)
    if "z" in r:
        v = v * _gate(load(r["z"], idx, mask=mask).astype(F32))[0]
    rstd = _rstd(v, st)
    store(r["out"], idx, v * rstd[:, None] * _weight(r, group, st)[None, :], mask=mask)
    _store_rstd(r, r0, group, rstd, st)


def _bwd_fetch(r, tile, group, st: Static, live=None):
    """fetch(name): that backward input's values in the tile, in its stored dtype (cast where
    used: a prefetched bfloat16 tile waits in half the registers of a float32 one). live False:
    nothing read (the prefetch past the end of a program's run)."""
    r0 = tile * st.block_rows
    idx, mask = _tile(r0, group, st)
    rows_idx, rows_mask = (pl.ds(r0, st.block_rows), group), r0 + iota(st.block_rows) < st.rows
    if live is not None:
        mask, rows_mask = mask & live, rows_mask & live

    def fetch(name):
        if name == "rstd":
            return load(r[name], rows_idx, mask=rows_mask)
        return load(r[name], idx, mask=mask)

    return fetch


def _bwd_tile(r, tile, group, w, fetch, st: Static):
    """Stores one tile's input gradients; returns its rows' sum of g * n (dweight's part).
    fetch: _bwd_fetch's, called in the order the values are needed."""
    idx, mask = _tile(tile * st.block_rows, group, st)
    x = fetch("x").astype(F32)
    v = x
    if "z" in r:
        z = fetch("z").astype(F32)
        gate, sig = _gate(z)
        v = x * gate
    rstd = fetch("rstd")
    n = v * rstd[:, None]
    g = fetch("g").astype(F32)
    dn = g * w[None, :]
    mean_dn_n = jnp.sum(dn * n, axis=1) / st.group_size
    dv = rstd[:, None] * (dn - n * mean_dn_n[:, None])
    if "g_res" in r:
        dv = dv + fetch("g_res").astype(F32)
    if "z" in r:
        store(r["dx"], idx, dv * gate, mask=mask)
        store(r["dz"], idx, dv * x * sig * (1.0 + z * (1.0 - sig)), mask=mask)
    else:
        store(r["dx"], idx, dv, mask=mask)
        if "dres" in r:
            store(r["dres"], idx, dv, mask=mask)
    return jnp.sum(g * n, axis=0)


def _bwd_kernel(r, *, st: Static):
    group = pl.program_id(1)
    w = _weight(r, group, st)
    first = pl.program_id(0) * st.tiles_per_program
    dw = jnp.zeros((st.block_c,), F32)
    if st.prefetch:
        # The loop carries the next tile's inputs: its loads are issued before this tile's
        # reduction and stores, which they could not pass (nothing tells the compiler the
        # stores miss the loads' addresses), so their latency overlaps the compute.
        inputs = [k for k in ("x", "z", "rstd", "g", "g_res") if k in r]

        def load_tile(i, live=None):
            fetch = _bwd_fetch(r, first + i, group, st, live)
            return {k: fetch(k) for k in inputs}

        def step(i, carry):
            dw, loaded = carry
            following = load_tile(i + 1, live=i + 1 < st.tiles_per_program)
            return dw + _bwd_tile(r, first + i, group, w, loaded.__getitem__, st), following

        dw, _ = jax.lax.fori_loop(0, st.tiles_per_program, step, (dw, load_tile(0)))
    else:

        def step(i, dw):
            fetch = _bwd_fetch(r, first + i, group, st)
            return dw + _bwd_tile(r, first + i, group, w, fetch, st)

        dw = jax.lax.fori_loop(0, st.tiles_per_program, step, dw)
    c0 = group * st.group_size
    store(
        r["dw"],
        (pl.program_id(0), pl.ds(c0, st.block_c)),
        dw,
        mask=iota(st.block_c) < st.group_size,
    )


def num_tiles(st: Static) -> int:
    return -(-st.rows // st.block_rows)


def norm_fwd(x, residual, z, w, *, out_dtype, residual_out: bool, st, interpret):
    """(out (r, c) out_dtype, rstd (r, g) float32[, residual_out (r, c) float32]).

    x (r, c); residual (r, c) or None, added to x first; z (r, c) or None, the gate; w (c,)
    float32. residual_out: also store x + residual (the residual stream after the add)."""
    rows, cols = x.shape
    outputs = dict(
        out=jax.ShapeDtypeStruct((rows, cols), out_dtype),
        rstd=jax.ShapeDtypeStruct((rows, st.groups), F32),
    )
    if residual_out:
        outputs["residual_out"] = jax.ShapeDtypeStruct((rows, cols), F32)
    return launch.call(
        _fwd_kernel,
        dict(x=x, residual=residual, z=z, w=w),
        outputs,
        grid=(num_tiles(st), st.groups),
        name="rms_norm_fwd" if z is None else "gated_rms_norm_fwd",
        num_warps=st.num_warps,
        interpret=interpret,
        st=st,
    )


def norm_bwd(x, z, w, rstd, g, g_res, *, dx_dtype, dres: bool, programs, st, interpret):
    """(dx (r, c) dx_dtype[, dz (r, c) z's dtype][, dres (r, c) float32], dweight partials
    (programs, c) float32).

    x: the normalised stream before the gate (the forward's residual_out where there was an
    add); g: the output's cotangent; g_res (r, c) or None: the cotangent of the residual stream
    x itself, added to dx. dres: also store dx in float32 (the residual input's gradient)."""
    rows, cols = x.shape
    outputs = dict(dx=jax.ShapeDtypeStruct((rows, cols), dx_dtype))
    if z is not None:
        outputs["dz"] = jax.ShapeDtypeStruct((rows, cols), z.dtype)
    if dres:
        outputs["dres"] = jax.ShapeDtypeStruct((rows, cols), F32)
    outputs["dw"] = jax.ShapeDtypeStruct((programs, cols), F32)
    return launch.call(
        _bwd_kernel,
        dict(x=x, z=z, w=w, rstd=rstd, g=g, g_res=g_res),
        outputs,
        grid=(programs, st.groups),
        name="rms_norm_bwd" if z is None else "gated_rms_norm_bwd",
        num_warps=st.num_warps,
        interpret=interpret,
        st=st,
    )
