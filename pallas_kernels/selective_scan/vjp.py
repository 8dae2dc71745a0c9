"""custom_vjp wiring of the Pallas selective scan: argument preparation, the chunk combines
between kernel passes, and the reductions of per-block gradient partials.

Chunk-state arrays are (b, c, n, d): d last, so kernels read and write them as coalesced rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import combine_affine, segment_ends, segment_starts
from pallas_kernels.selective_scan import kernel, kernel_bwd
from pallas_kernels.selective_scan.config import ScanConfig, pick_config
from pallas_kernels.triton_math import LOG2E

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    cfg: ScanConfig
    st: kernel.Static
    row_ends: bool = False  # also return each row's end state, from the chunk-state pass


def selective_scan_pallas(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    interpret: bool = False,
    delta_softplus: bool = False,
    segment_ids=None,
    first_run_states=None,
    continues=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    config: ScanConfig | None = None,
    return_row_end_states: bool = False,
):
    """Same contract as jax_packmamba.ops.selective_scan.selective_scan_reference (arguments
    already validated there); `config` overrides the block-size heuristic.

    first_run_states (b, d, n): the state each row's run at t = 0 starts from. It enters as
    chunk 0's incoming state (the reset at t = 0 is dropped), so the chunk-state pass carries
    it on like any inter-chunk state, and its gradient is the one reaching chunk 0's start.

    continues (b,) bool: row b's first run continues row b - 1's last run (ops/links.py). The
    chunk-state pass then runs over the rows' chunks as one sequence, with the link from row
    b - 1's last chunk to row b's first cut where continues[b] is False: the carry costs no
    extra scan. first_run_states is read for rows that do not continue.

    return_row_end_states: also return each row's state after its last token (b, d, n): the
    last chunk's incoming state carried through it, decay * h_in + h_loc, from the chunk-state
    pass (which then always runs); its gradient joins the one reaching that chunk's end. Not
    with return_final_states."""
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    assert delta.shape == u.shape and A.shape == (d_inner, d_state), (u.shape, delta.shape, A.shape)
    assert B.shape == C.shape == (batch, length, d_state), (B.shape, C.shape)
    assert z is None or z.shape == u.shape, z.shape
    assert D is None or D.shape == (d_inner,), D.shape
    assert delta_bias is None or delta_bias.shape == (d_inner,), delta_bias.shape
    assert segment_ids is None or segment_ids.shape == (batch, length), segment_ids.shape
    if return_final_states:
        num_segments = 1 if num_segments is None else num_segments
        assert segment_ids is not None or num_segments == 1, num_segments
    assert not (return_row_end_states and return_final_states)

    plan, rst, fin_slot = prepare(
        u,
        A,
        z,
        D,
        delta_bias,
        interpret=interpret,
        delta_softplus=delta_softplus,
        segment_ids=segment_ids,
        return_final_states=return_final_states,
        num_segments=num_segments,
        config=config,
    )
    plan = dataclasses.replace(plan, row_ends=return_row_end_states)
    first = None
    if continues is not None and first_run_states is None:
        first_run_states = jnp.zeros((batch, d_inner, d_state), F32)
    if first_run_states is not None:
        assert first_run_states.shape == (batch, d_inner, d_state), first_run_states.shape
        first = jnp.swapaxes(first_run_states.astype(F32), 1, 2)  # (b, n, d)
        if rst is not None:
            rst = rst.at[:, 0].set(0.0)
    out = _scan_jit(
        plan,
        interpret,
        num_segments or 1,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        rst,
        fin_slot,
        first,
        continues,
    )
    if not (return_final_states or return_row_end_states):
        return out
    y, final = out
    # (b, s, n, d) -> (b, s, d, n); row ends (b, n, d) -> (b, d, n)
    return y, jnp.swapaxes(final, -2, -1)


def prepare(
    u,
    A,
    z,
    D,
    delta_bias,
    *,
    interpret,
    delta_softplus,
    segment_ids,
    return_final_states,
    num_segments,
    config,
):
    """Static plan, reset exponents (b, t) and final-state slots (b, t) for the kernels."""
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    cfg = config or pick_config(batch, length, d_inner, d_state)
    st = kernel.Static(
        length=length,
        d_inner=d_inner,
        d_state=d_state,
        block_d=cfg.block_d,
        chunk=cfg.chunk,
        unroll=cfg.unroll,
        delta_softplus=bool(delta_softplus),
        prefetch=cfg.prefetch,
        fast=not interpret,
    )
    rst = fin_slot = None
    if segment_ids is not None:
        rst = jnp.where(segment_starts(segment_ids), -jnp.inf, 0.0).astype(F32)
    if return_final_states:
        fin_slot = _final_slots(segment_ids, batch, length, num_segments)
    return _Plan(cfg, st), rst, fin_slot


def _final_slots(segment_ids, batch, length, num_segments):
    """(b, t) int32: slot s at the last token of the last run of id s in the row, else -1."""
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return jnp.where(t == length - 1, 0, -1).astype(jnp.int32)
    seg = segment_ids.astype(jnp.int32)
    ends = segment_ends(seg)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
    last = jnp.full((batch, num_segments), -1, jnp.int32)
    last = last.at[rows, seg].max(jnp.where(ends, t, -1), mode="drop")
    is_last = ends & (jnp.take_along_axis(last, jnp.clip(seg, 0, num_segments - 1), 1) == t)
    return jnp.where(is_last, seg, -1).astype(jnp.int32)


def _chunk_initial_states(h_loc, decay, first=None):
    """State entering each chunk: h_in[0] = first (0 without it),
    h_in[c + 1] = decay[c] h_in[c] + h_loc[c]."""
    h0 = jnp.zeros_like(h_loc[:, :1]) if first is None else first[:, None]
    if first is not None:
        h_loc = h_loc.at[:, 0].add(decay[:, 0] * first)  # fold h_in[0] into the first map
    _, h_end = jax.lax.associative_scan(combine_affine, (decay, h_loc), axis=1)
    return jnp.concatenate([h0, h_end[:, :-1]], axis=1)


def _linked(continues, nc):
    """(b * nc,) bool: chunk i's end state passes on to chunk i + 1 of the flattened rows."""
    batch = continues.shape[0]
    nxt = jnp.concatenate([continues[1:], jnp.zeros((1,), bool)])
    inside = jnp.arange(nc) < nc - 1
    return jnp.where(inside[None, :], True, nxt[:, None]).reshape(batch * nc)


def _linked_initial_states(h_loc, decay, first, continues):
    """_chunk_initial_states over the rows' chunks as one sequence (b, c, n, d): row b's chunk
    0 starts from row b - 1's end where continues[b], else from first[b]. Where, not products,
    cut the unlinked edges, so a row's numbers never depend on an unlinked neighbour's."""
    batch, nc = h_loc.shape[:2]
    flat = lambda a: a.reshape(1, batch * nc, *a.shape[2:])  # noqa: E731
    link = _linked(continues, nc)[None, :, None, None]
    # What chunk i + 1 starts from when the edge is cut: the next row's first state.
    first_next = jnp.concatenate([first[1:], jnp.zeros_like(first[:1])])
    cut_to = jnp.zeros_like(h_loc).at[:, -1].set(first_next)
    a = jnp.where(link, flat(decay), 0.0)
    b = jnp.where(link, flat(h_loc), flat(cut_to))
    b = b.at[:, 0].add(a[:, 0] * first[0])  # fold row 0's start into the first map
    _, h_end = jax.lax.associative_scan(combine_affine, (a, b), axis=1)
    h_in = jnp.concatenate([first[None, :1], h_end[:, :-1]], axis=1)
    return h_in.reshape(h_loc.shape)


def _row_end_cotangent(dh_loc, dend):
    """(b, c, n, d): dend (b, n, d) at each row's last chunk, zeros elsewhere (or None)."""
    if dend is None:
        return None
    return jnp.zeros_like(dh_loc).at[:, -1].set(dend)


def _linked_final_dstates(dh_loc, decay, continues, dend=None):
    """_chunk_final_dstates over the flattened rows: g[i] = dh_loc[i + 1] + decay[i + 1]
    g[i + 1] across linked edges, 0 across cut ones and at the end; plus a row end's
    cotangent dend at that row's last chunk."""
    batch, nc = dh_loc.shape[:2]
    n = batch * nc
    ends = _row_end_cotangent(dh_loc, dend)
    eflat = None if ends is None else ends.reshape(n, *ends.shape[2:])
    if n == 1:
        return jnp.zeros_like(dh_loc) if ends is None else ends
    link = _linked(continues, nc)[:-1, None, None]
    dflat, lflat = decay.reshape(n, *decay.shape[2:]), dh_loc.reshape(n, *dh_loc.shape[2:])
    a = jnp.where(link, dflat[1:], 0.0)[None]
    b = jnp.where(link, lflat[1:], 0.0)[None]
    if eflat is not None:  # each row end's cotangent, and g[last] folded into the last map
        b = (b + eflat[None, :-1]).at[:, -1].add(a[:, -1] * eflat[-1])
    _, g = jax.lax.associative_scan(combine_affine, (a, b), axis=1, reverse=True)
    last = jnp.zeros_like(g[0, :1]) if eflat is None else eflat[-1:]
    return jnp.concatenate([g[0], last]).reshape(dh_loc.shape)


def _chunk_final_dstates(dh_loc, decay, dend=None):
    """Gradient reaching each chunk's last state from later chunks (and from the row's end
    state, cotangent dend (b, n, d), at the last chunk):
    g[last] = dend or 0, g[c] = dh_loc[c + 1] + decay[c + 1] g[c + 1]."""
    last = jnp.zeros_like(dh_loc[:, :1]) if dend is None else dend[:, None]
    if dh_loc.shape[1] == 1:
        return last
    b = dh_loc[:, 1:]
    if dend is not None:  # fold g[last] into the last map
        b = b.at[:, -1].add(decay[:, -1] * dend)
    _, g = jax.lax.associative_scan(combine_affine, (decay[:, 1:], b), axis=1, reverse=True)
    return jnp.concatenate([g, last], axis=1)


def _a2(A):
    return (A.astype(F32) * LOG2E).T  # (n, d): exp(dt A) = exp2(dt a2)


def _bias(delta_bias):
    return None if delta_bias is None else delta_bias.astype(F32)


def _fwd_impl(
    plan,
    interpret,
    num_segments,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    rst,
    fin_slot,
    first,
    continues,
):
    st, cfg = plan.st, plan.cfg
    batch = u.shape[0]
    nc = -(-st.length // st.chunk)
    a2, bias = _a2(A), _bias(delta_bias)
    dskip = None if D is None else D.astype(F32)
    launch = dict(st=st, batch=batch, num_warps=cfg.num_warps, interpret=interpret)
    if continues is not None or nc > 1 or plan.row_ends:
        h_loc, decay = kernel.chunk_states(
            dict(u=u, delta=delta, a2=a2, bias=bias, B=B, rst=rst), **launch
        )
        if continues is not None:
            h_in = _linked_initial_states(h_loc, decay, first, continues)
        else:
            h_in = _chunk_initial_states(h_loc, decay, first)
    else:
        decay = h_in = jnp.zeros((batch, 1, st.d_state, st.d_inner), F32)
        if first is not None:
            h_in = first[:, None]
    final_init = None
    if fin_slot is not None:
        final_init = jnp.zeros((batch, num_segments, st.d_state, st.d_inner), F32)
    outs = kernel.chunk_outputs(
        dict(
            u=u,
            delta=delta,
            a2=a2,
            bias=bias,
            D=dskip,
            B=B,
            C=C,
            z=z,
            rst=rst,
            h_in=h_in,
            fin_slot=fin_slot,
            final_init=final_init,
        ),
        y_dtype=u.dtype,
        **launch,
    )
    out = tuple(outs) if fin_slot is not None else outs[0]
    if plan.row_ends:  # the last chunk's incoming state carried through it
        out = (out, decay[:, -1] * h_in[:, -1] + h_loc[:, -1])
    return out, (h_in, decay)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(
    plan,
    interpret,
    num_segments,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    rst,
    fin_slot,
    first,
    continues,
):
    return _fwd_impl(
        plan,
        interpret,
        num_segments,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        rst,
        fin_slot,
        first,
        continues,
    )[0]


def _scan_fwd(
    plan,
    interpret,
    num_segments,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    rst,
    fin_slot,
    first,
    continues,
):
    out, (h_in, decay) = _fwd_impl(
        plan,
        interpret,
        num_segments,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        rst,
        fin_slot,
        first,
        continues,
    )
    return out, (u, delta, A, B, C, D, z, delta_bias, rst, fin_slot, h_in, decay, first, continues)


def _scan_bwd(plan, interpret, num_segments, res, cts):
    del num_segments
    cfg = plan.cfg
    st = dataclasses.replace(plan.st, block_d=cfg.bwd_block_d)
    u, delta, A, B, C, D, z, delta_bias, rst, fin_slot, h_in, decay, first, continues = res
    dy, dfinal, dend = cts, None, None
    if fin_slot is not None:
        dy, dfinal = cts
    elif plan.row_ends:
        dy, dend = cts
    batch = u.shape[0]
    a2, bias = _a2(A), _bias(delta_bias)
    dskip = None if D is None else D.astype(F32)
    launch = dict(st=st, batch=batch, num_warps=cfg.num_warps, interpret=interpret)
    dh_loc = kernel_bwd.chunk_dstates(
        dict(
            delta=delta,
            a2=a2,
            bias=bias,
            C=C,
            z=z,
            dy=dy,
            rst=rst,
            fin_slot=fin_slot,
            dfinal=dfinal,
        ),
        **launch,
    )
    if continues is None:
        dh_out = _chunk_final_dstates(dh_loc, decay, dend)
    else:
        dh_out = _linked_final_dstates(dh_loc, decay, continues, dend)
    # The gradient reaching chunk 0's incoming state: its own outputs', plus what arrives at
    # its end from later chunks carried back through its decay.
    dfirst = None
    if first is not None:
        dfirst = dh_loc[:, 0] + decay[:, 0] * dh_out[:, 0]
        if continues is not None:  # a continuing row's chunk 0 does not read first
            dfirst = jnp.where(continues[:, None, None], 0.0, dfirst)
    reduce = _reduce_mode(cfg, st)
    g = kernel_bwd.chunk_grads(
        dict(
            u=u,
            delta=delta,
            a2=a2,
            bias=bias,
            D=dskip,
            B=B,
            C=C,
            z=z,
            dy=dy,
            rst=rst,
            h_in=h_in,
            dh_out=dh_out,
            fin_slot=fin_slot,
            dfinal=dfinal,
        ),
        dtypes=dict(u=u.dtype, delta=delta.dtype, z=None if z is None else z.dtype),
        ckpt=cfg.ckpt,
        window=cfg.window,
        reduce=reduce,
        parts=_state_split(cfg, st, reduce),
        maxnreg=cfg.grads_maxnreg,
        window_rows=cfg.window_rows,
        **launch,
    )
    dA = jnp.swapaxes(g["dA"].sum((0, 1)), 0, 1).astype(A.dtype)
    dD = None if D is None else g["dD"].sum((0, 1)).astype(D.dtype)
    dbias = None if delta_bias is None else g["dbias"].sum((0, 1)).astype(delta_bias.dtype)
    # Left to itself XLA fuses this sum into the model's concatenation of d(dt), dB and dC: that
    # fusion took 0.39 ms at the 1.4b layer's (8, 128, 2048, 32), against 0.08 ms for the sum
    # as a reduction of its own (docs/log.md, results/dbc_sum_nvidia-h200.json).
    dBC = jax.lax.optimization_barrier(g["dBC"].sum(1))
    return (
        g["du"],
        g["ddelta"],
        dA,
        dBC[..., st.d_state :].astype(B.dtype),
        dBC[..., : st.d_state].astype(C.dtype),
        dD,
        g.get("dz"),
        dbias,
        None,
        None,
        dfirst,
        None,
    )


def _reduce_mode(cfg: ScanConfig, st: kernel.Static) -> str:
    fits_warp = st.block_d == 32 and cfg.num_warps == 1 and st.d_state <= 16
    pow2 = not st.d_state & (st.d_state - 1)
    if cfg.reduce == "xor" and fits_warp and pow2 and cfg.state_split == 1:
        return "xor"
    if cfg.reduce in ("shfl", "xor") and fits_warp:
        return "shfl"
    return "tree"


def _state_split(cfg: ScanConfig, st: kernel.Static, reduce: str) -> int:
    parts = cfg.state_split
    if parts > 1 and reduce == "shfl" and st.d_state % parts == 0 and st.d_state <= 16:
        return parts
    return 1


_scan.defvjp(_scan_fwd, _scan_bwd)
# Eager callers (tests, the interpreter) would otherwise re-trace and re-compile every kernel on
# every call; under an outer jit this is inlined.
_scan_jit = jax.jit(_scan, static_argnums=(0, 1, 2))
