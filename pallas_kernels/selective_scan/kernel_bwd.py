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
sums of a step go through a transposing shuffle butterfly: separate `jnp.sum`s cost a 5-level
shuffle tree each and were a fifth of the backward. In the default "xor" state order (`Lanes`)
the butterfly needs no selects (`xor_transpose_sums`): half the instructions of the PTX one
(`transpose_sum`, used by the state-split layouts).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch
from pallas_kernels.register_cap import capped_name
from pallas_kernels.selective_scan.kernel import (
    F32,
    Coords,
    Static,
    advance,
    coords,
    decay,
    dot_states,
    fetch_rows,
    load_cols,
    load_params,
    load_scalars,
    load_step,
    pipelined_fori,
    store_cols,
    zeros_state,
)
from pallas_kernels.triton_math import LN2, fma, ptx, sigmoid


def _out_grad(rows, st: Static):
    """g = dL/d(scan output) = dy * silu(z), plus what dz needs."""
    dy = rows["dy"]
    if "z" not in rows:
        return dy, dy, None, None
    z = rows["z"]
    sig = sigmoid(z, fast=st.fast)
    return dy * (z * sig), dy, z, sig


def _inject_final(dh, r, x, st: Static, cc, states=None):
    # Cotangent of a returned final state enters the state gradient at that slot's last step.
    states = range(st.d_state) if states is None else states
    slot = jnp.where(x.valid, r["fin_slot"][cc.b, x.tc], -1)
    hit = slot >= 0
    slot = jnp.maximum(slot, 0)
    return tuple(
        dh[k] + load_cols(r["dfinal"], (cc.b, slot, n), st, cc, cc.cmask & hit)
        for k, n in enumerate(states)
    )


@dataclasses.dataclass(frozen=True)
class Lanes:
    """Which states of which channel each lane of a one-warp gradient program holds.

    parts = 1: lane i holds channel d0 + i with all d_state states (the forward's layout).
    parts = P > 1: a program has group = 32 / P channels, and lane i holds channel
    d0 + i % group with states part * ns ... part * ns + ns - 1 (part = i // group,
    ns = d_state / P): each thread carries 1/P of the states, h, dh and dA accumulators, so
    the kernel fits in fewer registers and more warps are resident. Sums over n then need
    log2(P) shuffles (`part_sum`).
    xor (parts = 1, d_state a power of two <= 16): lane i's k-th state is
    n = k ^ (i % d_state) instead of k. The channel sums' butterfly then pairs equal states
    without selects (`xor_transpose_sums`), and B_t or C_t arrive as one per-lane load
    (lane i reads n = i % d_state) and d_state - 1 xor shuffles (`_load_state_scalars`).
    """

    parts: int
    group: int
    part: jax.Array | int
    states: tuple  # the state index n of each of a lane's ns states: ints, or (32,) vectors
    xor: bool = False


def split_lanes(st: Static, parts: int, xor: bool = False) -> tuple[Coords, Lanes]:
    if parts == 1 and xor:
        lane = jax.lax.broadcasted_iota(jnp.int32, (st.block_d,), 0)
        first = lane & (st.d_state - 1)
        return coords(st), Lanes(
            1, st.block_d, 0, tuple(first ^ k for k in range(st.d_state)), xor=True
        )
    if parts == 1:
        return coords(st), Lanes(1, st.block_d, 0, tuple(range(st.d_state)))
    group = st.block_d // parts
    ns = st.d_state // parts
    d_block = pl.program_id(1)
    lane = jax.lax.broadcasted_iota(jnp.int32, (st.block_d,), 0)
    part = jax.lax.shift_right_logical(lane, group.bit_length() - 1)
    cols = d_block * group + (lane & (group - 1))
    cc = Coords(
        pl.program_id(0), d_block, pl.program_id(2), d_block * group, cols < st.d_inner, cols
    )
    return cc, Lanes(parts, group, part, tuple(part * ns + k for k in range(ns)))


def _shfl_xor(x, offset: int, *, fast: bool):
    if fast:
        return ptx(f"shfl.sync.bfly.b32 $0, $1, {offset}, 31, -1;", x)
    return x[jnp.arange(x.shape[0]) ^ offset]


def part_sum(x, lanes: Lanes, *, fast: bool):
    """Sum over the parts of each channel (x at lane i + lanes i +- group, ...), on every lane."""
    offset = lanes.group
    while offset < x.shape[0]:
        x = x + _shfl_xor(x, offset, fast=fast)
        offset *= 2
    return x


def _load_state_scalars(ref, cc, tc, st: Static, lanes: Lanes):
    """B_t or C_t at each lane's states: uniform scalars with one part, one per-lane load and
    shuffles in the xor order, else (32,) gathers."""
    if lanes.xor:
        # Lane i ^ k loaded n = (i ^ k) % d_state, the state lane i keeps k-th. One load and
        # d_state - 1 shuffles, where uniform loads take a load and a bf16 conversion a value.
        row = plgpu.load(ref.at[cc.b, tc, lanes.states[0]]).astype(F32)
        return [row] + [_shfl_xor(row, k, fast=st.fast) for k in range(1, len(lanes.states))]
    if lanes.parts == 1:
        return load_scalars(ref, cc, tc, st)
    return [plgpu.load(ref.at[cc.b, tc, n]).astype(F32) for n in lanes.states]


def _chunk_dstate_kernel(r, *, st: Static):
    cc = coords(st)
    a2, bias, _ = load_params(r, st, cc)
    t_last = cc.c * st.chunk + st.chunk - 1

    names = ("delta", "dy", "z") if "z" in r else ("delta", "dy")

    def fetch(j):
        return [
            fetch_rows(r, t_last - (j * st.unroll + k), st, cc, names) for k in range(st.unroll)
        ]

    def body(j, rows, dh):
        for k in range(st.unroll):
            x = load_step(r, t_last - (j * st.unroll + k), st, cc, bias, rows=rows[k])
            g = _out_grad(rows[k], st)[0]
            cs = load_scalars(r["C"], cc, x.tc, st)
            dh = tuple(fma(cs[n], g, dh[n], fast=st.fast) for n in range(st.d_state))
            if "fin_slot" in r:
                dh = _inject_final(dh, r, x, st, cc)
            dh = tuple(decay(x, a2[n], st) * dh[n] for n in range(st.d_state))
        return dh

    dh = pipelined_fori(st.chunk // st.unroll, fetch, body, zeros_state(st), prefetch=st.prefetch)
    for n in range(st.d_state):
        store_cols(r["dh_loc"], (cc.b, cc.c, n), dh[n], st, cc)


def _transpose_sum_ptx(n: int) -> str:
    """PTX: n per-lane inputs v_0..v_{n-1} -> one output whose value at lane j is the sum of
    v_{j % n} over the n lanes of j's group (lanes n * (j // n) ...). Recursive halving: at each
    level a lane keeps the half of its values whose index bit matches its own lane bit, sends
    the other half to its partner and adds what it gets. n - 1 shuffles in all, against
    log2(n) per value for n separate shuffle trees."""
    assert n & (n - 1) == 0 and 2 <= n <= 32, n
    lines = [
        "{",
        ".reg .pred p;",
        ".reg .b32 lane, bit;",
        ".reg .f32 s, k, r;",
        f".reg .f32 a<{n}>;",
        "mov.u32 lane, %laneid;",
    ]
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


def xor_transpose_sums(dc, db, *, fast: bool):
    """Channel sums of a one-warp program in the xor state order (Lanes.xor): dc[k], db[k]
    (32,) hold lane i's terms of dC_t, dB_t at state k ^ (i % ns), ns = len(dc). Returns a
    (32,) s with s[i] = dC_t[i % ns] summed over all 32 lanes for i < 16, dB_t[i % ns] for
    i >= 16.

    At the level of half h, lane i's slot k < h holds state k ^ (i % ns), and its partner
    lane i ^ h holds the same state in slot k + h, since (k + h) ^ ((i ^ h) % ns) =
    k ^ (i % ns): a pair costs one shuffle and one add. The plain butterfly (`transpose_sum`)
    also selects what to keep and what to send on every pair: 4 instructions against 2."""
    ns = len(dc)
    h = ns // 2
    while h >= 1:
        dc = [dc[k] + _shfl_xor(dc[k + h], h, fast=fast) for k in range(h)]
        db = [db[k] + _shfl_xor(db[k + h], h, fast=fast) for k in range(h)]
        h //= 2
    dc, db = dc[0], db[0]
    offset = ns
    while offset < 16:  # the other groups of ns lanes in each half warp
        dc = dc + _shfl_xor(dc, offset, fast=fast)
        db = db + _shfl_xor(db, offset, fast=fast)
        offset *= 2
    upper = jax.lax.broadcasted_iota(jnp.int32, dc.shape, 0) >= 16
    keep = jnp.where(upper, db, dc)
    return keep + _shfl_xor(jnp.where(upper, dc, db), 16, fast=fast)


def transpose_sum(values, *, fast: bool):
    """n (32,) vectors of a one-warp program, n dividing 32 -> (32,) vector s with
    s[j] = sum of values[j % n] over the lanes of j's group of n (the whole warp for n = 32)."""
    group = len(values)
    if fast:
        return ptx(_transpose_sum_ptx(group), *values)
    lanes = values[0].shape[0]
    sums = jnp.stack(values).reshape(group, lanes // group, group).sum(-1)  # (value, group)
    return sums.T.reshape(lanes)


def _chunk_grad_kernel(
    r, *, st: Static, ckpt: int, window: int, reduce: str, parts: int, window_rows: bool
):
    cc, lanes = split_lanes(st, parts, xor=reduce == "xor")
    states = lanes.states
    a2, bias, dskip = load_params(r, st, cc, states)
    t0 = cc.c * st.chunk
    n_ckpt = st.chunk // ckpt
    n_win = ckpt // window
    unroll = math.gcd(st.unroll, window)

    def state_scalars(ref, tc):
        return _load_state_scalars(ref, cc, tc, st, lanes)

    def fwd_steps(h, t_start, n_steps):
        def fetch(j):
            return [
                fetch_rows(r, t_start + j * unroll + k, st, cc, ("delta", "u"))
                for k in range(unroll)
            ]

        def body(j, rows, h):
            for k in range(unroll):
                x = load_step(r, t_start + j * unroll + k, st, cc, bias, rows=rows[k])
                h = advance(h, x, state_scalars(r["B"], x.tc), a2, st)
            return h

        return pipelined_fori(n_steps // unroll, fetch, body, h, prefetch=st.prefetch)

    # Pass 1: checkpoints of h at the start of every ckpt block. The buffer is private to this
    # kernel: in the xor order slot k goes to row k (a coalesced row, not a gather); the parts
    # of a split channel share its column, so there each state keeps its own row.
    h_in = tuple(load_cols(r["h_in"], (cc.b, cc.c, n), st, cc) for n in states)
    ckpt_rows = tuple(range(len(states))) if lanes.xor else states

    def save(k, h):
        for row, h_n in zip(ckpt_rows, h):
            store_cols(r["ckpt"], (cc.b, cc.c, k, row), h_n, st, cc)
        return fwd_steps(h, t0 + k * ckpt, ckpt)

    jax.lax.fori_loop(0, n_ckpt, save, h_in)

    lane = jax.lax.broadcasted_iota(jnp.int32, (st.block_d,), 0)
    if reduce == "xor":
        # xor_transpose_sums leaves dC_t[i % n] on lanes i < 16, dB_t[i % n] on the others.
        # With n < 16 several lanes hold one sum, bitwise equal (their adds differ only in
        # operand order), and all of them store it: a masked-off lane would not be harmless in
        # the interpreter, whose masked scatter writes the old value back.
        dbc_col = (lane & (st.d_state - 1)) + jnp.where(lane >= 16, st.d_state, 0)
    elif reduce == "shfl":
        # Where each lane's channel sum of the dBC row goes: its group's value j is dC at
        # n = part * ns + j for j < ns, dB at n = part * ns + j - ns for ns <= j < 2 ns.
        ns = len(states)
        j = lane & (lanes.group - 1)
        first = lanes.part * ns
        dbc_col = (
            pl.ds(0, st.block_d)
            if parts == 1
            else jnp.where(j < ns, first + j, st.d_state + first + j - ns)
        )
        dbc_used = j < 2 * ns

    def reverse_step(x, h_prev, h_t, out_rows, carry):
        dh, dA_acc, dD_acc, dbias_acc = carry
        g, dy, z, sig = _out_grad(out_rows, st)
        bs = state_scalars(r["B"], x.tc)
        cs = state_scalars(r["C"], x.tc)
        dh = tuple(fma(c_n, g, dh_n, fast=st.fast) for dh_n, c_n in zip(dh, cs))
        if "fin_slot" in r:
            dh = _inject_final(dh, r, x, st, cc, states)
        du_ = x.dt * x.u
        s_db = jnp.zeros_like(g)  # sum_n dh_n B_n
        s_aq = jnp.zeros_like(g)  # sum_n A_n/ln2 * dh_n * dA_n h_{t-1, n}
        decays = []
        new_acc = []
        for k in range(len(states)):
            dA = decay(x, a2[k], st)
            decays.append(dA)
            q = dh[k] * (dA * h_prev[k])
            new_acc.append(fma(x.dt, q, dA_acc[k], fast=st.fast))
            s_aq = fma(a2[k], q, s_aq, fast=st.fast)
            s_db = fma(dh[k], bs[k], s_db, fast=st.fast)
        s_db = part_sum(s_db, lanes, fast=st.fast)
        s_aq = part_sum(s_aq, lanes, fast=st.fast)
        # Channel sums of this step: dC_t[n] at n, dB_t[n] at d_state + n of the dBC row.
        prods = [g * h_n for h_n in h_t] + [dh_n * du_ for dh_n in dh]
        if reduce == "xor":
            sums = xor_transpose_sums(prods[: len(states)], prods[len(states) :], fast=st.fast)
            plgpu.store(r["dBC"].at[cc.b, cc.d_block, x.tc, dbc_col], sums, mask=x.valid)
        elif reduce == "shfl":
            prods += [jnp.zeros_like(g)] * (lanes.group - len(prods))
            sums = transpose_sum(prods, fast=st.fast)
            plgpu.store(r["dBC"].at[cc.b, cc.d_block, x.tc, dbc_col], sums, mask=dbc_used & x.valid)
        else:
            for i, v in enumerate(prods):
                plgpu.store(
                    r["dBC"].at[cc.b, cc.d_block, x.tc, jnp.int32(i)], jnp.sum(v), mask=x.valid
                )
        ddt = fma(x.u, s_db, LN2 * s_aq, fast=st.fast)
        du = x.dt * s_db
        if "D" in r:
            du = fma(dskip, g, du, fast=st.fast)
            dD_acc = fma(g, x.u, dD_acc, fast=st.fast)
        if "z" in r:
            y = part_sum(dot_states(h_t, cs, st), lanes, fast=st.fast)
            if "D" in r:
                y = y + dskip * x.u
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            store_cols(r["dz"], (cc.b, x.tc), dz, st, cc, x.mask)
        if st.delta_softplus:
            ddt = ddt * sigmoid(x.dt_raw, fast=st.fast)
        ddt = jnp.where(x.mask, ddt, 0.0)
        if "bias" in r:
            dbias_acc = dbias_acc + ddt
        # With several parts, every part of a channel holds the same per-channel values (the
        # sums over n are exchanged both ways, and a + b == b + a bitwise), so all of them
        # store: lanes writing one value to one address is well defined on the GPU and in the
        # interpreter.
        store_cols(r["du"], (cc.b, x.tc), du, st, cc, x.mask)
        store_cols(r["ddelta"], (cc.b, x.tc), ddt, st, cc, x.mask)
        dh = tuple(d * dh_n for d, dh_n in zip(decays, dh))
        return dh, tuple(new_acc), dD_acc, dbias_acc

    def block(kk, carry):
        k = n_ckpt - 1 - kk
        h_k = tuple(load_cols(r["ckpt"], (cc.b, cc.c, k, row), st, cc) for row in ckpt_rows)
        t_k = t0 + k * ckpt

        def win(ww, carry):
            w = n_win - 1 - ww
            t_w = t_k + w * window
            # Issued before the re-advance so that it hides their latency.
            row_names = ("dy", "z") if "z" in r else ("dy",)
            if window_rows:
                row_names += ("delta", "u")
            rows = [fetch_rows(r, t_w + i, st, cc, row_names) for i in range(window)]
            hs = [fwd_steps(h_k, t_k, w * window)]
            xs = []
            for i in range(window):
                x = load_step(r, t_w + i, st, cc, bias, rows=rows[i] if window_rows else None)
                xs.append(x)
                hs.append(advance(hs[-1], x, state_scalars(r["B"], x.tc), a2, st))
            for i in reversed(range(window)):
                x = xs[i] if window_rows else load_step(r, t_w + i, st, cc, bias)
                carry = reverse_step(x, hs[i], hs[i + 1], rows[i], carry)
            return carry

        return jax.lax.fori_loop(0, n_win, win, carry)

    vec0 = jnp.zeros((st.block_d,), F32)
    dh_out = tuple(load_cols(r["dh_out"], (cc.b, cc.c, n), st, cc) for n in states)
    init = (dh_out, zeros_state(st, len(states)), vec0, vec0)
    _, dA_acc, dD_acc, dbias_acc = jax.lax.fori_loop(0, n_ckpt, block, init)
    for n, acc in zip(states, dA_acc):
        store_cols(r["dA"], (cc.b, cc.c, n), acc, st, cc)
    if "D" in r:
        store_cols(r["dD"], (cc.b, cc.c), dD_acc, st, cc)
    if "bias" in r:
        store_cols(r["dbias"], (cc.b, cc.c), dbias_acc, st, cc)


def chunk_dstates(inputs: dict, *, st: Static, batch: int, num_warps: int, interpret: bool):
    """dh_loc (b, c, n, d) float32: the gradient reaching the state just before chunk c from
    chunk c's own outputs."""
    nc = -(-st.length // st.chunk)
    shape = jax.ShapeDtypeStruct((batch, nc, st.d_state, st.d_inner), F32)
    return launch.call(
        _chunk_dstate_kernel,
        inputs,
        dict(dh_loc=shape),
        st=st,
        grid=(batch, -(-st.d_inner // st.block_d), nc),
        num_warps=num_warps,
        interpret=interpret,
        name="selective_scan_bwd_chunk_dstates",
    )[0]


def chunk_grads(
    inputs: dict,
    *,
    st: Static,
    batch: int,
    dtypes: dict,
    ckpt: int,
    window: int,
    reduce: str,
    parts: int,
    maxnreg: int | None,
    window_rows: bool,
    num_warps: int,
    interpret: bool,
):
    """Gradients: du, ddelta (, dz) rows; dC, dB partials (b, d_blocks, t, 2n); dA partials
    (b, c, n, d); dD, dbias partials (b, c, d); and the transient checkpoint buffer.
    `parts` > 1 (see Lanes) needs block_d 32 on one warp and reduce "shfl"; reduce "xor" needs
    parts 1, block_d 32 on one warp and d_state a power of two <= 16."""
    nc = -(-st.length // st.chunk)
    nd = -(-st.d_inner // (st.block_d // parts))
    rows = (batch, st.length, st.d_inner)
    out = dict(
        du=jax.ShapeDtypeStruct(rows, dtypes["u"]),
        ddelta=jax.ShapeDtypeStruct(rows, dtypes["delta"]),
        dBC=jax.ShapeDtypeStruct((batch, nd, st.length, 2 * st.d_state), F32),
        dA=jax.ShapeDtypeStruct((batch, nc, st.d_state, st.d_inner), F32),
        ckpt=jax.ShapeDtypeStruct((batch, nc, st.chunk // ckpt, st.d_state, st.d_inner), F32),
    )
    if inputs.get("z") is not None:
        out["dz"] = jax.ShapeDtypeStruct(rows, dtypes["z"])
    if inputs.get("D") is not None:
        out["dD"] = jax.ShapeDtypeStruct((batch, nc, st.d_inner), F32)
    if inputs.get("bias") is not None:
        out["dbias"] = jax.ShapeDtypeStruct((batch, nc, st.d_inner), F32)
    results = launch.call(
        functools.partial(
            _chunk_grad_kernel,
            ckpt=ckpt,
            window=window,
            reduce=reduce,
            parts=parts,
            window_rows=window_rows,
        ),
        inputs,
        out,
        st=st,
        grid=(batch, nd, nc),
        num_warps=num_warps,
        interpret=interpret,
        name=capped_name("selective_scan_bwd_chunk_grads", maxnreg),
    )
    return dict(zip(out, results))
