"""Backward Pallas (Triton) kernels of the chunked SSD scan with segment resets.

Same arrays and conventions as kernel.py, plus dy' = dy * silu(z) (b, t, h, p) and dS
(b, c, h, p, n), the gradient reaching each chunk's end state S[c] (from the reverse state
passing). With W_h[l, s] = [s in l's run, s <= l] 2^(cs_l - cs_s) dt'_s (per head) the
intra-chunk output is y_l = sum_s CB[l, s] W_h[l, s] x_s, so

  dx_s   = dt'_s (sum_{l >= s} CB[l, s] 2^(cs_l - cs_s) dy'_l
                 + 2^(cs_end - cs_s) [s last run] dS B_s)
  dCB    = sum_{h in group} W_h[l, s] (dy'_l . x_s)                        (one per group)
  dC_l   = sum_s dCB[l, s] B_s + sum_h 2^(cs_l) [l entered] dy'_l h_in       (p -> n)
  dB_s   = sum_l dCB[l, s] C_l + sum_h dt'_s 2^(cs_end - cs_s) [s last run] x_s dS

The log-decays need no further chunk x chunk pass: with T(l, s) = CB[l, s] W[l, s] (dy'_l . x_s),
d cs_l = sum_s T(l, s) - sum_m T(m, l) + (inter and state terms), and the gradient of the
per-token log-decay a_t is the reverse segmented cumulative sum of d cs (the dot in
`_cumsum_bwd_kernel`). The row and column sums of T come from the dCB kernel's float32 tiles;
they nearly cancel in that cumulative sum, so they are never rounded to the matmul dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.launch import iota, load, store
from pallas_kernels.ssd.kernel import (
    ALL,
    F32,
    Chunk,
    Static,
    causal_run_mask,
    chunk_at,
    div,
    dot,
    load_D,
    load_dt,
    load_rows,
    load_vec,
    masked_exp2,
    rem,
    row_mask,
    seg_hi_at,
    seg_hi_rows,
    seg_lo_at,
    seg_lo_rows,
    store_rows,
)
from pallas_kernels.triton_math import sigmoid


def anticausal_run_mask(pos_s, pos_l, hi_s):
    """(len(pos_s), len(pos_l)): l >= s and l in s's run (the transpose of causal_run_mask)."""
    return (pos_l[None, :] >= pos_s[:, None]) & (pos_l[None, :] <= hi_s[:, None])


# ---------------------------------------------------------------------------------------------
# dx (and what the dt' and log-decay gradients need from the x path).


def _dx_kernel(r, *, st: Static):
    j, h, bc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = chunk_at(bc, st)
    g = div(h, st.per_group)
    bl, bs, L = st.block_l, st.block_s, st.chunk
    mm = jnp.dtype(st.mm_dtype)
    s0 = j * bs
    pos_s = s0 + iota(bs)
    cs_s = load_vec(r["cs"], ch, h, s0, bs)
    dt_s = load_vec(r["dtp"], ch, h, s0, bs)
    hi_s = seg_hi_rows(r, ch, s0, bs, st)
    hi_last = seg_hi_at(r, ch, s0 + bs - 1, st)  # the block's latest run end

    def intra(i, acc):
        l0 = i * bl
        cb_t = load(r["cb"], (ch.b, ch.c, g, pl.ds(l0, bl), pl.ds(s0, bs))).astype(F32).T
        cs_l = load_vec(r["cs"], ch, h, l0, bl)
        mask = anticausal_run_mask(pos_s, l0 + iota(bl), hi_s)
        w = jnp.where(mask, cb_t * masked_exp2(mask, cs_l[None, :] - cs_s[:, None], st), 0.0)
        return acc + dot(w.astype(mm), load_rows(r["dy"], ch, l0, bl, (h,), st, mm))

    acc = jax.lax.fori_loop(
        div(s0, bl), div(hi_last, bl) + 1, intra, jnp.zeros((bs, st.headdim), F32)
    )
    # The chunk-state path: S = sum_s w_s x_s^T B_s over the last run.
    cs_end = r["cs"][ch.b, h, ch.c0 + L - 1]
    w_end = masked_exp2(hi_s == L - 1, cs_end - cs_s, st)
    b_rows = load_rows(r["B"], ch, s0, bs, (g,), st, mm)
    d_state = load(r["dS"], (ch.b, ch.c, h, ALL, ALL)).astype(mm)
    acc_state = dot(b_rows, d_state, trans_b=True) * w_end[:, None]
    x = load_rows(r["x"], ch, s0, bs, (h,), st, F32)
    total = acc + acc_state
    dx = dt_s[:, None] * total
    if "D" in r:
        dy = load_rows(r["dy"], ch, s0, bs, (h,), st, F32)
        dx = dx + load_D(r, h, st) * dy
        store(r["dD"], (bc, j, h, ALL), jnp.sum(dy * x, axis=0))
    store_rows(r["dx"], ch, s0, dx, (h,), st)
    # dL/d dt'_s through dt'_s x_s, and the state path's share of d cs (see vjp.py).
    store(r["ddt_x"], (ch.b, h, pl.ds(ch.c0 + s0, bs)), jnp.sum(total * x, axis=1))
    store(r["dcs_state"], (ch.b, h, pl.ds(ch.c0 + s0, bs)), dt_s * jnp.sum(acc_state * x, axis=1))


def bwd_dx(inputs: dict, *, st: Static, x_dtype, num_warps: int, num_stages: int, interpret: bool):
    """dx (b, t, h, p); ddt_x, dcs_state (b, h, T_pad) float32; dD partials
    (b * c, L / block_s, h, p) float32 (or None)."""
    nb = st.chunk // st.block_s
    vec = jax.ShapeDtypeStruct((st.batch, st.heads, st.padded), F32)
    outs = dict(
        dx=jax.ShapeDtypeStruct((st.batch, st.length, st.heads, st.headdim), x_dtype),
        ddt_x=vec,
        dcs_state=vec,
    )
    if inputs.get("D") is not None:
        outs["dD"] = jax.ShapeDtypeStruct((st.batch * st.n_chunks, nb, st.heads, st.headdim), F32)
    res = launch.call(
        _dx_kernel,
        inputs,
        outs,
        grid=(nb, st.heads, st.batch * st.n_chunks),
        name="ssd_bwd_dx",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        st=st,
    )
    res = dict(zip(outs, res))
    return res["dx"], res["ddt_x"], res["dcs_state"], res.get("dD")


# ---------------------------------------------------------------------------------------------
# dCB, summed over the heads of a group, with the row and column sums of T per head.


def _dcb_kernel(r, *, st: Static, splits: int):
    ij, bc, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = chunk_at(bc, st)
    g, split = div(gs, splits), rem(gs, splits)
    heads_per_split = st.per_group // splits
    h0 = g * st.per_group + split * heads_per_split
    bl, bs = st.block_l, st.block_s
    nbs = st.chunk // bs
    i, j = div(ij, nbs), rem(ij, nbs)
    l0, s0 = i * bl, j * bs
    mm = jnp.dtype(st.mm_dtype)
    pos_l = l0 + iota(bl)
    lo_l = seg_lo_rows(r, ch, l0, bl, st)
    mask = causal_run_mask(pos_l, s0 + iota(bs), lo_l)
    # A tile holds a nonzero iff its first column is not past its last row and its last column
    # reaches the run of its first row.
    live = (s0 <= l0 + bl - 1) & (s0 + bs - 1 >= jnp.maximum(seg_lo_at(r, ch, l0, st), 0))
    row_idx = (ch.b, j, pl.ds(ch.c0 + l0, bl))
    col_idx = (ch.b, i, pl.ds(ch.c0 + s0, bs))

    def heads(acc):
        cb = load(r["cb"], (ch.b, ch.c, g, pl.ds(l0, bl), pl.ds(s0, bs))).astype(F32)

        def head(e, acc):
            h = h0 + e
            cs_l = load_vec(r["cs"], ch, h, l0, bl)
            cs_s = load_vec(r["cs"], ch, h, s0, bs)
            dt_s = load_vec(r["dtp"], ch, h, s0, bs)
            dy = load_rows(r["dy"], ch, l0, bl, (h,), st, mm)
            x = load_rows(r["x"], ch, s0, bs, (h,), st, mm)
            gram = dot(dy, x, trans_b=True)  # dy'_l . x_s
            e_ls = jnp.where(
                mask,
                gram * masked_exp2(mask, cs_l[:, None] - cs_s[None, :], st) * dt_s[None, :],
                0.0,
            )
            t_ls = jnp.where(mask, e_ls * cb, 0.0)
            store(r["rowsum"], (row_idx[0], h, *row_idx[1:]), jnp.sum(t_ls, axis=1))
            store(r["colsum"], (col_idx[0], h, *col_idx[1:]), jnp.sum(t_ls, axis=0))
            return acc + e_ls

        return jax.lax.fori_loop(0, heads_per_split, head, acc)

    def dead(acc):
        def head(e, carry):
            h = h0 + e
            store(r["rowsum"], (row_idx[0], h, *row_idx[1:]), jnp.zeros((bl,), F32))
            store(r["colsum"], (col_idx[0], h, *col_idx[1:]), jnp.zeros((bs,), F32))
            return carry

        return jax.lax.fori_loop(0, heads_per_split, head, acc)

    acc = jax.lax.cond(live, heads, dead, jnp.zeros((bl, bs), F32))
    store(r["dcb"], (ch.b, ch.c, gs, pl.ds(l0, bl), pl.ds(s0, bs)), acc)


def bwd_dcb(
    inputs: dict, *, st: Static, splits: int, num_warps: int, num_stages: int, interpret: bool
):
    """dcb partials (b, c, g * splits, L, L) float32 (every tile written, zeros where dead);
    rowsum (b, h, L / block_s, T_pad) and colsum (b, h, L / block_l, T_pad) float32 partials
    of T (sum over their third axis)."""
    nbl, nbs = st.chunk // st.block_l, st.chunk // st.block_s
    outs = dict(
        dcb=jax.ShapeDtypeStruct(
            (st.batch, st.n_chunks, st.groups * splits, st.chunk, st.chunk), F32
        ),
        rowsum=jax.ShapeDtypeStruct((st.batch, st.heads, nbs, st.padded), F32),
        colsum=jax.ShapeDtypeStruct((st.batch, st.heads, nbl, st.padded), F32),
    )
    return launch.call(
        _dcb_kernel,
        inputs,
        outs,
        grid=(nbl * nbs, st.batch * st.n_chunks, st.groups * splits),
        name="ssd_bwd_dcb",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        st=st,
        splits=splits,
    )


# ---------------------------------------------------------------------------------------------
# dB and dC: the dCB product once per group, the state terms per head.


def _dbc_kernel(r, *, st: Static, splits: int, mode: str):
    """mode "dC": rows l, dC_l = sum_s dCB[l, s] B_s + sum_h 2^(cs_l)[l entered] dy'_l h_in, and
    per head the inter term of d cs_l, a_inter = 2^(cs_l)[entered] C_l . (dy'_l h_in).
    mode "dB": rows s, dB_s = sum_l dCB[l, s] C_l + sum_h dt'_s 2^(cs_end - cs_s)[last] x_s dS."""
    i, bc, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = chunk_at(bc, st)
    g, split = div(gs, splits), rem(gs, splits)
    heads_per_split = st.per_group // splits
    h0 = g * st.per_group + split * heads_per_split
    bl, bs, L = st.block_l, st.block_s, st.chunk
    mm = jnp.dtype(st.mm_dtype)
    r0 = i * bl  # this program's rows (l for dC, s for dB), block_l of them
    pos = r0 + iota(bl)
    acc = jnp.zeros((bl, st.d_state), F32)

    if mode == "dC":
        lo = seg_lo_rows(r, ch, r0, bl, st)
        lo_first = seg_lo_at(r, ch, r0, st)

        def intra(j, acc):
            s0 = j * bs
            mask = causal_run_mask(pos, s0 + iota(bs), lo)
            dcb = load(r["dcb"], (ch.b, ch.c, g, pl.ds(r0, bl), pl.ds(s0, bs)))
            b_rows = load_rows(r["B"], ch, s0, bs, (g,), st, mm)
            return acc + dot(jnp.where(mask, dcb, 0.0).astype(mm), b_rows)

        start, stop = div(jnp.maximum(lo_first, 0), bs), div(r0 + bl, bs)
        entered_any = lo_first < 0
    else:
        hi = seg_hi_rows(r, ch, r0, bl, st)
        hi_last = seg_hi_at(r, ch, r0 + bl - 1, st)

        def intra(j, acc):
            l0 = j * bs
            mask = anticausal_run_mask(pos, l0 + iota(bs), hi)
            dcb_t = load(r["dcb"], (ch.b, ch.c, g, pl.ds(l0, bs), pl.ds(r0, bl))).T
            c_rows = load_rows(r["C"], ch, l0, bs, (g,), st, mm)
            return acc + dot(jnp.where(mask, dcb_t, 0.0).astype(mm), c_rows)

        start, stop = div(r0, bs), div(hi_last, bs) + 1
        last_any = hi_last == L - 1

    # One split adds the group's dCB product; every split adds its heads' state terms.
    acc = jax.lax.cond(
        split == 0, lambda a: jax.lax.fori_loop(start, stop, intra, a), lambda a: a, acc
    )

    if mode == "dC":
        c_rows = load_rows(r["C"], ch, r0, bl, (g,), st, F32)

        def head(e, acc):
            h = h0 + e
            w = masked_exp2(lo < 0, load_vec(r["cs"], ch, h, r0, bl), st)
            dy = load_rows(r["dy"], ch, r0, bl, (h,), st, mm)
            h_in = load(r["h_in"], (ch.b, ch.c, h, ALL, ALL)).astype(mm)
            q = dot(dy, h_in) * w[:, None]
            store(r["a_inter"], (ch.b, h, pl.ds(ch.c0 + r0, bl)), jnp.sum(q * c_rows, axis=1))
            return acc + q

        def no_head(e, acc):
            store(r["a_inter"], (ch.b, h0 + e, pl.ds(ch.c0 + r0, bl)), jnp.zeros((bl,), F32))
            return acc

        acc = jax.lax.cond(
            entered_any,
            lambda a: jax.lax.fori_loop(0, heads_per_split, head, a),
            lambda a: jax.lax.fori_loop(0, heads_per_split, no_head, a),
            acc,
        )
        out_ref = r["dC"]
    else:

        def head(e, acc):
            h = h0 + e
            cs_end = r["cs"][ch.b, h, ch.c0 + L - 1]
            cs_s = load_vec(r["cs"], ch, h, r0, bl)
            w = load_vec(r["dtp"], ch, h, r0, bl) * masked_exp2(hi == L - 1, cs_end - cs_s, st)
            xw = (load_rows(r["x"], ch, r0, bl, (h,), st, F32) * w[:, None]).astype(mm)
            d_state = load(r["dS"], (ch.b, ch.c, h, ALL, ALL)).astype(mm)
            return acc + dot(xw, d_state)

        acc = jax.lax.cond(
            last_any, lambda a: jax.lax.fori_loop(0, heads_per_split, head, a), lambda a: a, acc
        )
        out_ref = r["dB"]
    if splits == 1:
        store_rows(out_ref, ch, r0, acc, (g,), st)
    else:
        valid = ch.c0 + pos < st.length
        store(out_ref, (ch.b, split, pl.ds(ch.c0 + r0, bl), g, ALL), acc, mask=valid[:, None])


def bwd_dbc(
    inputs: dict,
    *,
    mode: str,
    st: Static,
    splits: int,
    out_dtype,
    num_warps: int,
    num_stages: int,
    interpret: bool,
):
    """mode "dC": (dC, a_inter (b, h, T_pad) float32); mode "dB": dB. dB/dC are
    (b, t, g, n) in out_dtype with one split, else float32 partials (b, splits, t, g, n)."""
    rows = (st.batch, st.length, st.groups, st.d_state)
    if splits == 1:
        grad = jax.ShapeDtypeStruct(rows, out_dtype)
    else:
        grad = jax.ShapeDtypeStruct((st.batch, splits, *rows[1:]), F32)
    outs = {mode: grad}
    if mode == "dC":
        outs["a_inter"] = jax.ShapeDtypeStruct((st.batch, st.heads, st.padded), F32)
    res = launch.call(
        _dbc_kernel,
        inputs,
        outs,
        grid=(st.chunk // st.block_l, st.batch * st.n_chunks, st.groups * splits),
        name="ssd_bwd_dc" if mode == "dC" else "ssd_bwd_db",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        st=st,
        splits=splits,
        mode=mode,
    )
    return tuple(res) if mode == "dC" else res[0]


# ---------------------------------------------------------------------------------------------
# The log-decay gradient: reverse segmented cumulative sum, then dt, A and dt_bias.


def _cumsum_bwd_kernel(r, *, st: Static):
    """d a_s = sum_{l >= s in s's run} d cs_l (M^T d cs, the transpose of the forward's dot);
    d dt'_s = ddt_x_s + d a_s A; dt = softplus'(dt + bias) d dt'; dA, d bias per chunk.
    With per-token inputs (kernel.py's `_cumsum_kernel`): d log_decay = d a, d scale = ddt_x."""
    c, hb, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = Chunk(b, c, c * st.chunk)
    h0 = hb * st.block_heads
    heads = h0 + iota(st.block_heads)
    head_ok = heads < st.heads
    bq = st.block_s
    if "d_log_decay" in r:
        _per_token_cumsum_bwd(r, ch, h0, head_ok, st)
        return
    a = load(r["A"], (pl.ds(h0, st.block_heads),), mask=head_ok)

    def by_rows(name, pos0):  # (b, h, T_pad) -> (bq, block_heads)
        idx = (b, pl.ds(h0, st.block_heads), pl.ds(ch.c0 + pos0, bq))
        return load(r[name], idx, mask=head_ok[:, None]).T

    def block(i, sums):
        d_a_sum, d_bias_sum = sums
        d_a = _reverse_run_cumsum(r, ch, h0, head_ok, i, st)
        dtp, raw, valid = load_dt(r, ch, h0, i * bq, bq, st)
        d_dtp = by_rows("ddt_x", i * bq) + d_a * a[None, :]
        d_raw = d_dtp * sigmoid(raw, fast=st.fast) if st.dt_softplus else d_dtp
        d_raw = jnp.where(valid, d_raw, 0.0)
        store(
            r["ddt"], (b, pl.ds(ch.c0 + i * bq, bq), pl.ds(h0, st.block_heads)), d_raw, mask=valid
        )
        return d_a_sum + jnp.sum(d_a * dtp, axis=0), d_bias_sum + jnp.sum(d_raw, axis=0)

    zeros = jnp.zeros((st.block_heads,), F32)
    d_a_sum, d_bias_sum = jax.lax.fori_loop(0, st.chunk // bq, block, (zeros, zeros))
    store(r["dA"], (b, c, pl.ds(h0, st.block_heads)), d_a_sum, mask=head_ok)
    if "bias" in r:
        store(r["dbias"], (b, c, pl.ds(h0, st.block_heads)), d_bias_sum, mask=head_ok)


def _reverse_run_cumsum(r, ch: Chunk, h0, head_ok, i, st: Static):
    """(block_s, block_heads): sum over l >= s in s's run inside the chunk of d cs_l, for the
    rows s of block i (M^T d cs as mask dots)."""
    b, bq = ch.b, st.block_s
    pos_s = i * bq + iota(bq)
    hi_s = seg_hi_rows(r, ch, i * bq, bq, st)

    def add(j, d_a):
        m = anticausal_run_mask(pos_s, j * bq + iota(bq), hi_s).astype(F32)
        idx = (b, pl.ds(h0, st.block_heads), pl.ds(ch.c0 + j * bq, bq))
        return d_a + dot(m, load(r["dcs"], idx, mask=head_ok[:, None]).T)

    # Blocks past the run of the block's last row add nothing.
    j1 = div(seg_hi_at(r, ch, i * bq + bq - 1, st), bq) + 1
    return jax.lax.fori_loop(i, j1, add, jnp.zeros((bq, st.block_heads), F32))


def _per_token_cumsum_bwd(r, ch: Chunk, h0, head_ok, st: Static):
    bq = st.block_s

    def block(i, carry):
        d_a = _reverse_run_cumsum(r, ch, h0, head_ok, i, st)
        heads = h0 + iota(st.block_heads)
        valid = row_mask(ch, i * bq + iota(bq), st)[:, None] & (heads < st.heads)[None, :]
        idx = (ch.b, pl.ds(ch.c0 + i * bq, bq), pl.ds(h0, st.block_heads))
        store(r["d_log_decay"], idx, jnp.where(valid, d_a, 0.0), mask=valid)
        rows = (ch.b, pl.ds(h0, st.block_heads), pl.ds(ch.c0 + i * bq, bq))
        d_scale = load(r["ddt_x"], rows, mask=head_ok[:, None]).T
        store(r["d_scale"], idx, jnp.where(valid, d_scale, 0.0), mask=valid)
        return carry

    jax.lax.fori_loop(0, st.chunk // bq, block, 0)


def cumsum_bwd_per_token(inputs: dict, *, st: Static, out_dtype, num_warps: int, interpret: bool):
    """(d log_decay, d scale), each (b, t, h) in out_dtype, of the per-token cumulative sum
    (inputs dcs, ddt_x and the segment bounds)."""
    rows = jax.ShapeDtypeStruct((st.batch, st.length, st.heads), out_dtype)
    res = launch.call(
        _cumsum_bwd_kernel,
        inputs,
        dict(d_log_decay=rows, d_scale=rows),
        grid=(st.n_chunks, -(-st.heads // st.block_heads), st.batch),
        name="ssd_bwd_chunk_cumsum",
        num_warps=num_warps,
        num_stages=1,
        interpret=interpret,
        st=st,
    )
    return tuple(res)


def cumsum_bwd(inputs: dict, *, st: Static, dt_dtype, num_warps: int, interpret: bool):
    """ddt (b, t, h) in dt_dtype; dA and d dt_bias partials (b, c, h) float32 (sum over b, c)."""
    part = jax.ShapeDtypeStruct((st.batch, st.n_chunks, st.heads), F32)
    outs = dict(ddt=jax.ShapeDtypeStruct((st.batch, st.length, st.heads), dt_dtype), dA=part)
    if inputs.get("bias") is not None:
        outs["dbias"] = part
    res = launch.call(
        _cumsum_bwd_kernel,
        inputs,
        outs,
        grid=(st.n_chunks, -(-st.heads // st.block_heads), st.batch),
        name="ssd_bwd_chunk_cumsum",
        num_warps=num_warps,
        num_stages=1,
        interpret=interpret,
        st=st,
    )
    res = dict(zip(outs, res))
    return res["ddt"], res["dA"], res.get("dbias")
