"""Backward Pallas (Triton) kernels of the selective scan with segment resets.

Same layout as kernel.py (whole channels per thread, the state as d_state (block_d,) vectors).

The state gradient runs backwards in time, dh_t = C_t g_t + exp(dt_{t+1} A) dh_{t+1}, and needs
no h, so it is made parallel over time like the forward: `chunk_dstates` runs every chunk
backwards from a zero gradient, an associative scan over chunks (vjp.py) gives each chunk the
gradient arriving from its right, and `chunk_grads` walks each chunk backwards once more to
produce every gradient.

`chunk_grads` needs h_t while walking backwards, and h only runs forwards. It starts from the
chunk's initial state saved by the forward pass, walks forwards once writing a state every
`ckpt` steps into a transient buffer (1/ckpt of a (b, t, d, n) tensor), then, for each ckpt
block from the last, for each `window` of it from the last: re-advances the block's
checkpoint to the window start, advances `window` steps keeping every state in registers, and
walks those steps backwards. About 1 + (ckpt/window - 1)/2 + 2 exp2 per (t, d, n).

dB_t and dC_t are sums over channels: each program reduces its block_d channels and writes
one partial row per channel block; XLA adds the rows up. With one 32-lane warp the 2 * d_state
sums of a step go through one transposing shuffle butterfly in PTX (`transpose_sum`): separate
`jnp.sum`s cost a 5-level shuffle tree each and were a fifth of the backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.selective_scan.kernel import (
    F32,
    LN2,
    Static,
    _call,
    advance,
    coords,
    exp2,
    load_cols,
    load_params,
    load_scalars,
    load_step,
    fetch_rows,
    pipelined_fori,
    sigmoid,
    store_cols,
    zeros_state,
)


def _out_grad(rows, st: Static):
    """g = dL/d(scan output) = dy * silu(z), plus what dz needs."""
    dy = rows["dy"]
    if not st.has_z:
        return dy, dy, None, None
    z = rows["z"]
    sig = sigmoid(z, fast=st.fast)
    return dy * (z * sig), dy, z, sig


def _inject_final(dh, r, x, st: Static, cc):
    # Cotangent of a returned final state enters the state gradient at that slot's last step.
    slot = jnp.where(x.valid, r["fin_slot"][cc.b, x.tc], -1)
    hit = slot >= 0
    slot = jnp.maximum(slot, 0)
    return tuple(
        dh[n] + load_cols(r["dfinal"], (cc.b, slot, n), st, cc, cc.cmask & hit)
        for n in range(st.d_state)
    )


def _chunk_dstate_kernel(*refs, names, st: Static):
    r = dict(zip(names, refs))
    cc = coords(st)
    a2, bias, _ = load_params(r, st, cc)
    t_last = cc.c * st.chunk + st.chunk - 1

    names = ("delta", "dy", "z") if st.has_z else ("delta", "dy")

    def fetch(j):
        return [fetch_rows(r, t_last - (j * st.unroll + k), st, cc, names)
                for k in range(st.unroll)]

    def body(j, rows, dh):
        for k in range(st.unroll):
            x = load_step(r, t_last - (j * st.unroll + k), st, cc, bias, rows=rows[k])
            g = _out_grad(rows[k], st)[0]
            cs = load_scalars(r["C"], cc, x.tc, st)
            dh = tuple(dh[n] + cs[n] * g for n in range(st.d_state))
            if st.has_final:
                dh = _inject_final(dh, r, x, st, cc)
            dh = tuple(
                exp2(x.dt * a2[n] + x.rst, fast=st.fast) * dh[n] for n in range(st.d_state)
            )
        return dh

    dh = pipelined_fori(st.chunk // st.unroll, fetch, body, zeros_state(st), prefetch=st.prefetch)
    for n in range(st.d_state):
        store_cols(r["dh_loc"], (cc.b, cc.c, n), dh[n], st, cc)


def _transpose_sum_ptx(n: int) -> str:
    """PTX: 32 per-lane inputs v_0..v_31 -> one output whose value at lane j is sum over the warp
    of v_j. Recursive halving: at each level a lane keeps the half of its values whose index
    bit matches its own lane bit, sends the other half to its partner and adds what it gets.
    31 shuffles in all, against 5 per value for 32 separate shuffle trees."""
    assert n == 32
    lines = ["{", ".reg .pred p;", ".reg .b32 lane, bit;", ".reg .f32 s, k, r;",
             f".reg .f32 a<{n}>;", "mov.u32 lane, %laneid;"]
    lines += [f"mov.b32 a{i}, ${i + 1};" for i in range(n)]
    width = n
    while width > 1:
        half = width // 2
        lines += [f"and.b32 bit, lane, {half};", "setp.ne.u32 p, bit, 0;"]
        for i in range(half):
            lines += [
                f"selp.f32 s, a{i}, a{i + half}, p;",
                f"selp.f32 k, a{i + half}, a{i}, p;",
                f"shfl.sync.bfly.b32 r, s, {half}, 31, -1;",
                f"add.f32 a{i}, k, r;",
            ]
        width = half
    lines += ["mov.b32 $0, a0;", "}"]
    return "\n".join(lines)


def transpose_sum(values, *, fast: bool):
    """32 (32,) vectors of a one-warp program -> (32,) vector s with s[j] = sum(values[j])."""
    if fast:
        [out] = plgpu.elementwise_inline_asm(
            _transpose_sum_ptx(len(values)), args=list(values),
            constraints="=r," + ",".join(["r"] * len(values)), pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(values[0].shape, F32)])
        return out
    return jnp.stack([jnp.sum(v) for v in values])


def _chunk_grad_kernel(*refs, names, st: Static, ckpt: int, window: int, reduce: str):
    r = dict(zip(names, refs))
    cc = coords(st)
    a2, bias, dskip = load_params(r, st, cc)
    t0 = cc.c * st.chunk
    n_ckpt = st.chunk // ckpt
    n_win = ckpt // window
    unroll = math.gcd(st.unroll, window)

    def fwd_steps(h, t_start, n_steps):
        def fetch(j):
            return [fetch_rows(r, t_start + j * unroll + k, st, cc, ("delta", "u"))
                    for k in range(unroll)]

        def body(j, rows, h):
            for k in range(unroll):
                x = load_step(r, t_start + j * unroll + k, st, cc, bias, rows=rows[k])
                h = advance(h, x, load_scalars(r["B"], cc, x.tc, st), a2, st)
            return h

        return pipelined_fori(n_steps // unroll, fetch, body, h, prefetch=st.prefetch)

    # Pass 1: checkpoints of h at the start of every ckpt block.
    h_in = tuple(load_cols(r["h_in"], (cc.b, cc.c, n), st, cc) for n in range(st.d_state))

    def save(k, h):
        for n in range(st.d_state):
            store_cols(r["ckpt"], (cc.b, cc.c, k, n), h[n], st, cc)
        return fwd_steps(h, t0 + k * ckpt, ckpt)

    jax.lax.fori_loop(0, n_ckpt, save, h_in)

    def reverse_step(t, h_prev, h_t, out_rows, carry):
        dh, dA_acc, dD_acc, dbias_acc = carry
        x = load_step(r, t, st, cc, bias)
        g, dy, z, sig = _out_grad(out_rows, st)
        bs = load_scalars(r["B"], cc, x.tc, st)
        cs = load_scalars(r["C"], cc, x.tc, st)
        dh = tuple(dh[n] + cs[n] * g for n in range(st.d_state))
        if st.has_final:
            dh = _inject_final(dh, r, x, st, cc)
        du_ = x.dt * x.u
        s_db = jnp.zeros_like(g)  # sum_n dh_n B_n
        s_aq = jnp.zeros_like(g)  # sum_n A_n/ln2 * dh_n * dA_n h_{t-1, n}
        decay = []
        new_acc = []
        for n in range(st.d_state):
            dA = exp2(x.dt * a2[n] + x.rst, fast=st.fast)
            decay.append(dA)
            q = dh[n] * (dA * h_prev[n])
            new_acc.append(dA_acc[n] + x.dt * q)
            s_aq = s_aq + a2[n] * q
            s_db = s_db + dh[n] * bs[n]
        # Channel sums of this step: dC_t[n] at n, dB_t[n] at d_state + n of the dBC row.
        prods = [g * h_t[n] for n in range(st.d_state)] + [dh[n] * du_ for n in range(st.d_state)]
        if reduce == "shfl":
            prods += [jnp.zeros_like(g)] * (32 - len(prods))
            sums = transpose_sum(prods, fast=st.fast)
            lane = jax.lax.broadcasted_iota(jnp.int32, (32,), 0)
            plgpu.store(r["dBC"].at[cc.b, cc.d_block, x.tc, pl.ds(0, 32)], sums,
                        mask=(lane < 2 * st.d_state) & x.valid)
        else:
            for i, v in enumerate(prods):
                plgpu.store(r["dBC"].at[cc.b, cc.d_block, x.tc, jnp.int32(i)], jnp.sum(v),
                            mask=x.valid)
        ddt = LN2 * s_aq + x.u * s_db
        du = x.dt * s_db
        if st.has_D:
            du = du + dskip * g
            dD_acc = dD_acc + g * x.u
        if st.has_z:
            y = h_t[0] * cs[0]
            for n in range(1, st.d_state):
                y = y + h_t[n] * cs[n]
            if st.has_D:
                y = y + dskip * x.u
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            store_cols(r["dz"], (cc.b, x.tc), dz, st, cc, x.mask)
        if st.delta_softplus:
            ddt = ddt * sigmoid(x.dt_raw, fast=st.fast)
        ddt = jnp.where(x.mask, ddt, 0.0)
        if st.has_bias:
            dbias_acc = dbias_acc + ddt
        store_cols(r["du"], (cc.b, x.tc), du, st, cc, x.mask)
        store_cols(r["ddelta"], (cc.b, x.tc), ddt, st, cc, x.mask)
        dh = tuple(decay[n] * dh[n] for n in range(st.d_state))
        return dh, tuple(new_acc), dD_acc, dbias_acc

    def block(kk, carry):
        k = n_ckpt - 1 - kk
        h_k = tuple(load_cols(r["ckpt"], (cc.b, cc.c, k, n), st, cc) for n in range(st.d_state))
        t_k = t0 + k * ckpt

        def win(ww, carry):
            w = n_win - 1 - ww
            t_w = t_k + w * window
            # Issued before the re-advance so that it hides their latency.
            out_rows = [fetch_rows(r, t_w + i, st, cc, ("dy", "z") if st.has_z else ("dy",))
                        for i in range(window)]
            hs = [fwd_steps(h_k, t_k, w * window)]
            for i in range(window):
                x = load_step(r, t_w + i, st, cc, bias)
                hs.append(advance(hs[-1], x, load_scalars(r["B"], cc, x.tc, st), a2, st))
            for i in reversed(range(window)):
                carry = reverse_step(t_w + i, hs[i], hs[i + 1], out_rows[i], carry)
            return carry

        return jax.lax.fori_loop(0, n_win, win, carry)

    vec0 = jnp.zeros((st.block_d,), F32)
    dh_out = tuple(load_cols(r["dh_out"], (cc.b, cc.c, n), st, cc) for n in range(st.d_state))
    init = (dh_out, zeros_state(st), vec0, vec0)
    _, dA_acc, dD_acc, dbias_acc = jax.lax.fori_loop(0, n_ckpt, block, init)
    for n in range(st.d_state):
        store_cols(r["dA"], (cc.b, cc.c, n), dA_acc[n], st, cc)
    if st.has_D:
        store_cols(r["dD"], (cc.b, cc.c), dD_acc, st, cc)
    if st.has_bias:
        store_cols(r["dbias"], (cc.b, cc.c), dbias_acc, st, cc)


def chunk_dstates(inputs: dict, *, st: Static, batch: int, num_warps: int, interpret: bool):
    """dh_loc (b, c, n, d) float32: the gradient reaching the state just before chunk c from
    chunk c's own outputs."""
    nc = -(-st.length // st.chunk)
    shape = jax.ShapeDtypeStruct((batch, nc, st.d_state, st.d_inner), F32)
    return _call(
        _chunk_dstate_kernel,
        inputs,
        dict(dh_loc=shape),
        st=st,
        grid=(batch, -(-st.d_inner // st.block_d), nc),
        num_warps=num_warps,
        interpret=interpret,
        name="selective_scan_bwd_chunk_dstates",
    )[0]


def chunk_grads(inputs: dict, *, st: Static, batch: int, dtypes: dict, ckpt: int, window: int,
                reduce: str, num_warps: int, interpret: bool):
    """Gradients: du, ddelta (, dz) rows; dC, dB partials (b, d_blocks, t, 2n); dA partials
    (b, c, n, d); dD, dbias partials (b, c, d); and the transient checkpoint buffer."""
    nc = -(-st.length // st.chunk)
    nd = -(-st.d_inner // st.block_d)
    rows = (batch, st.length, st.d_inner)
    out = dict(
        du=jax.ShapeDtypeStruct(rows, dtypes["u"]),
        ddelta=jax.ShapeDtypeStruct(rows, dtypes["delta"]),
        dBC=jax.ShapeDtypeStruct((batch, nd, st.length, 2 * st.d_state), F32),
        dA=jax.ShapeDtypeStruct((batch, nc, st.d_state, st.d_inner), F32),
        ckpt=jax.ShapeDtypeStruct((batch, nc, st.chunk // ckpt, st.d_state, st.d_inner), F32),
    )
    if st.has_z:
        out["dz"] = jax.ShapeDtypeStruct(rows, dtypes["z"])
    if st.has_D:
        out["dD"] = jax.ShapeDtypeStruct((batch, nc, st.d_inner), F32)
    if st.has_bias:
        out["dbias"] = jax.ShapeDtypeStruct((batch, nc, st.d_inner), F32)
    results = _call(
        functools.partial(_chunk_grad_kernel, ckpt=ckpt, window=window, reduce=reduce),
        inputs,
        out,
        st=st,
        grid=(batch, nd, nc),
        num_warps=num_warps,
        interpret=interpret,
        name="selective_scan_bwd_chunk_grads",
    )
    return dict(zip(out, results))
