"""Forward Pallas (Triton) kernels of the selective scan with segment resets.

Axis letters: b batch, t time, d channels (d_inner), n state (d_state), c time chunk.

Layout inside a program: whole channels per thread (block_d / 32 of them on one warp). The
state of the program is d_state separate (block_d,) vectors, one per n, rather than one
(block_d, d_state) tile: Triton spreads a 2-D tile's n axis over lanes, which turned the
per-step sum over n into shuffles (DESIGN.md); separate vectors keep h[d, :] in
one thread's registers, so y = sum_n C_n h_n is d_state FMAs and B_t, C_t are uniform scalar
loads. Everything (b, t)-indexed is walked one
time step at a time with coalesced (block_d,) row loads.

Two passes make the scan parallel over time: `chunk_states` scans every chunk from a zero state
and returns its end state and total decay; an associative scan over chunks (vjp.py) turns those
into each chunk's true initial state; `chunk_outputs` re-runs each chunk from it and writes y.

A reset is folded into the decay: the exponent gets -inf at a segment start, so exp2 gives 0
and no separate mask multiplies the state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.triton_math import exp2, fma, sigmoid, softplus

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    """What a kernel body is specialised on (all static)."""

    length: int
    d_inner: int
    d_state: int
    block_d: int
    chunk: int
    unroll: int
    delta_softplus: bool
    prefetch: bool
    fast: bool  # GPU: ex2.approx through inline PTX; the interpreter cannot run PTX.


@dataclasses.dataclass(frozen=True)
class Coords:
    b: jax.Array
    d_block: jax.Array
    c: jax.Array
    d0: jax.Array
    cmask: jax.Array  # (block_d,) channels inside d_inner
    # (block_d,) channel of each element when they are not d0 + iota (the backward's split
    # layout, kernel_bwd.py); then loads and stores gather instead of slicing.
    cols: jax.Array | None = None


def coords(st: Static) -> Coords:
    b, d_block, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d0 = d_block * st.block_d
    cols = d0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_d,), 0)
    return Coords(b, d_block, c, d0, cols < st.d_inner)


def load_cols(ref, lead, st: Static, cc: Coords, mask=None):
    """(block_d,) float32 slice ref[*lead, d0:d0 + block_d], zero outside d_inner."""
    mask = cc.cmask if mask is None else mask
    return launch.load(ref, _col_index(lead, st, cc), mask=mask).astype(F32)


def store_cols(ref, lead, value, st: Static, cc: Coords, mask=None):
    mask = cc.cmask if mask is None else mask
    launch.store(ref, _col_index(lead, st, cc), value, mask=mask)


def _col_index(lead, st: Static, cc: Coords):
    cols = cc.cols
    if cols is None and any(jnp.ndim(i) for i in lead):
        # A per-lane index in front (the backward's xor state order) makes this a gather, so
        # the channel index has to be per-lane too.
        cols = cc.d0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_d,), 0)
    if cols is None:
        cols = pl.ds(cc.d0, st.block_d)
    return (*lead, cols)


def load_params(r, st: Static, cc: Coords, states=None):
    """Per-program constants: A * log2(e) per n (of `states`, default all), delta_bias, D."""
    states = range(st.d_state) if states is None else states
    a2 = [load_cols(r["a2"], (n,), st, cc) for n in states]
    bias = load_cols(r["bias"], (), st, cc) if "bias" in r else None
    # Not every pass takes D.
    dskip = load_cols(r["D"], (), st, cc) if "D" in r else None
    return a2, bias, dskip


@dataclasses.dataclass(frozen=True)
class StepIn:
    t: jax.Array
    tc: jax.Array  # t clamped into the row: padded steps past the end read the last step
    valid: jax.Array  # scalar: t < length
    mask: jax.Array  # (block_d,): valid and inside d_inner
    dt: jax.Array  # (block_d,) float32 after bias and softplus; 0 where masked
    dt_raw: jax.Array | None  # pre-softplus value (backward needs its sigmoid)
    u: jax.Array | None
    rst: jax.Array  # scalar: -inf at a segment start, else 0


def fetch_rows(r, t, st: Static, cc: Coords, names):
    """Raw (block_d,) rows of step t from the (b, t, d) inputs `names` (zero past the end and
    outside d_inner). Split from load_step so a loop can issue them one iteration early."""
    tc = jnp.minimum(t, st.length - 1)
    mask = cc.cmask & (t < st.length)
    return {name: load_cols(r[name], (cc.b, tc), st, cc, mask) for name in names}


def load_step(r, t, st: Static, cc: Coords, bias, *, with_u: bool = True, rows=None) -> StepIn:
    """The (b, t)-indexed values every pass needs (rows from fetch_rows if already loaded).
    Padded steps (t >= length) get dt = 0 and u = 0, so they leave the state unchanged and
    write nothing."""
    valid = t < st.length
    tc = jnp.minimum(t, st.length - 1)
    mask = cc.cmask & valid
    if rows is None:
        rows = fetch_rows(r, t, st, cc, ("delta", "u") if with_u else ("delta",))
    dt_raw = rows["delta"]
    if "bias" in r:
        dt_raw = dt_raw + bias
    dt = softplus(dt_raw, fast=st.fast) if st.delta_softplus else dt_raw
    dt = jnp.where(mask, dt, 0.0)
    u = rows.get("u")
    if "rst" in r:
        rst = jnp.where(valid, r["rst"][cc.b, tc], 0.0)
    else:
        rst = jnp.zeros((), F32)
    return StepIn(t, tc, valid, mask, dt, dt_raw, u, rst)


def pipelined_fori(n_iter, fetch, body, carry, *, prefetch: bool = True):
    """fori_loop(0, n_iter) whose iteration j computes on what fetch(j) loaded during iteration
    j - 1: a step's row loads come from DRAM, and without this every iteration waits out their
    latency with little else to issue (the loop was latency-bound, ~3x off its issue bound)."""

    if not prefetch:
        return jax.lax.fori_loop(0, n_iter, lambda j, c: body(j, fetch(j), c), carry)

    def step(j, c):
        carry, cur = c
        nxt = fetch(jnp.minimum(j + 1, n_iter - 1))
        return body(j, cur, carry), nxt

    carry, _ = jax.lax.fori_loop(0, n_iter, step, (carry, fetch(0)))
    return carry


def load_scalars(ref, cc: Coords, tc, st: Static):
    """B_t or C_t as d_state uniform scalars (every thread needs all of them)."""
    return [ref[cc.b, tc, n].astype(F32) for n in range(st.d_state)]


def advance(h, x: StepIn, bs, a2, st: Static):
    """h_t = exp(dt A) h_{t-1} + dt u B_t, with exp(dt A) = 0 at a segment start."""
    du = x.dt * x.u
    return tuple(fma(decay(x, a2[n], st), h[n], du * bs[n], fast=st.fast) for n in range(len(h)))


def decay(x: StepIn, a2_n, st: Static):
    """exp(dt A_n), 0 at a segment start."""
    return exp2(fma(x.dt, a2_n, x.rst, fast=st.fast), fast=st.fast)


def dot_states(h, cs, st: Static):
    """sum_n h_n c_n as a chain of FMAs."""
    y = h[0] * cs[0]
    for h_n, c_n in zip(h[1:], cs[1:]):
        y = fma(h_n, c_n, y, fast=st.fast)
    return y


def zeros_state(st: Static, count: int | None = None):
    """`count` (default d_state) zero (block_d,) vectors."""
    return tuple(jnp.zeros((st.block_d,), F32) for _ in range(count or st.d_state))


def _chunk_state_kernel(r, *, st: Static):
    cc = coords(st)
    a2, bias, _ = load_params(r, st, cc)
    t0 = cc.c * st.chunk

    def fetch(j):
        return [
            fetch_rows(r, t0 + j * st.unroll + k, st, cc, ("delta", "u")) for k in range(st.unroll)
        ]

    def body(j, rows, carry):
        h, lam, alive = carry
        for k in range(st.unroll):
            x = load_step(r, t0 + j * st.unroll + k, st, cc, bias, rows=rows[k])
            lam = lam + x.dt
            alive = jnp.where(x.rst < 0, 0.0, alive)
            h = advance(h, x, load_scalars(r["B"], cc, x.tc, st), a2, st)
        return h, lam, alive

    init = (zeros_state(st), jnp.zeros((st.block_d,), F32), jnp.ones((), F32))
    h, lam, alive = pipelined_fori(st.chunk // st.unroll, fetch, body, init, prefetch=st.prefetch)
    for n in range(st.d_state):
        store_cols(r["h_loc"], (cc.b, cc.c, n), h[n], st, cc)
        # The chunk's total decay; a reset anywhere in it (its first step included) cuts the
        # incoming state off entirely.
        decay = jnp.where(alive > 0, exp2(a2[n] * lam, fast=st.fast), 0.0)
        store_cols(r["decay"], (cc.b, cc.c, n), decay, st, cc)


def _chunk_output_kernel(r, *, st: Static):
    cc = coords(st)
    a2, bias, dskip = load_params(r, st, cc)
    t0 = cc.c * st.chunk
    h0 = tuple(load_cols(r["h_in"], (cc.b, cc.c, n), st, cc) for n in range(st.d_state))

    names = ("delta", "u", "z") if "z" in r else ("delta", "u")

    def fetch(j):
        return [fetch_rows(r, t0 + j * st.unroll + k, st, cc, names) for k in range(st.unroll)]

    def body(j, rows, h):
        for k in range(st.unroll):
            x = load_step(r, t0 + j * st.unroll + k, st, cc, bias, rows=rows[k])
            h = advance(h, x, load_scalars(r["B"], cc, x.tc, st), a2, st)
            cs = load_scalars(r["C"], cc, x.tc, st)
            y = dot_states(h, cs, st)
            if "D" in r:
                y = y + dskip * x.u
            if "z" in r:
                z = rows[k]["z"]
                y = y * (z * sigmoid(z, fast=st.fast))
            store_cols(r["y"], (cc.b, x.tc), y, st, cc, x.mask)
            if "fin_slot" in r:
                slot = jnp.where(x.valid, r["fin_slot"][cc.b, x.tc], -1)

                @pl.when(slot >= 0)
                def _(h=h, slot=slot):
                    for n in range(st.d_state):
                        store_cols(r["final"], (cc.b, slot, n), h[n], st, cc)

        return h

    pipelined_fori(st.chunk // st.unroll, fetch, body, h0, prefetch=st.prefetch)


def chunk_states(inputs: dict, *, st: Static, batch: int, num_warps: int, interpret: bool):
    """(h_loc, decay), each (b, c, n, d) float32: every chunk scanned from a zero state, and the
    product of its decays (0 if a segment starts inside it)."""
    nc = -(-st.length // st.chunk)
    shape = jax.ShapeDtypeStruct((batch, nc, st.d_state, st.d_inner), F32)
    return launch.call(
        _chunk_state_kernel,
        inputs,
        dict(h_loc=shape, decay=shape),
        st=st,
        grid=(batch, -(-st.d_inner // st.block_d), nc),
        num_warps=num_warps,
        interpret=interpret,
        name="selective_scan_fwd_chunk_states",
    )


def chunk_outputs(
    inputs: dict, *, st: Static, batch: int, y_dtype, num_warps: int, interpret: bool
):
    """y (b, t, d), and with inputs["fin_slot"] the final states (b, s, n, d) written in place into
    inputs["final_init"] (zeros) at each slot's last end step."""
    nc = -(-st.length // st.chunk)
    outputs = dict(y=jax.ShapeDtypeStruct((batch, st.length, st.d_inner), y_dtype))
    aliases = None
    if inputs.get("fin_slot") is not None:
        outputs["final"] = jax.ShapeDtypeStruct(inputs["final_init"].shape, F32)
        aliases = dict(final="final_init")
    return launch.call(
        _chunk_output_kernel,
        inputs,
        outputs,
        st=st,
        grid=(batch, -(-st.d_inner // st.block_d), nc),
        num_warps=num_warps,
        interpret=interpret,
        name="selective_scan_fwd_chunk_outputs",
        aliases=aliases,
    )
