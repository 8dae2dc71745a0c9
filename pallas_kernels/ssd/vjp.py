"""custom_vjp wiring of the Pallas SSD scan: argument preparation, the XLA glue between kernel
passes (chunk decays, the log-decay gradient's assembly, sums of per-program partials) and the
entry point with initial and final states (states.py).

Saved between forward and backward: the inputs, the state entering each chunk h_in
(b, c, h, p, n) float32 and, with z, the pre-gate output (b, t, h, p) in x's dtype. Everything
else (dt', the cumulative decays, C B^T, the chunk states) is recomputed by the backward; with
save_chunk_states=False h_in is too (the chunk-state kernel and the state passing once more:
Plan.save_states), and the kernels' additive state input s_add is kept instead where there is
one (initial or first-run states).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import segment_ends, segment_starts
from pallas_kernels.ssd import chunk_scan_mgpu, kernel, kernel_bwd, states
from pallas_kernels.ssd.config import SSDConfig, effective_chunk, fit_blocks, pick_config

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    st: kernel.Static
    cfg: SSDConfig
    return_states: bool  # the core also returns h_in (for final states)
    has_init: bool  # initial states: the kernels add y_add and s_add
    has_start: bool = False  # first-run states: each row's h_in[:, 0] adds them (_entry)
    # The core also returns each row's end state (b, h, p * n), from the state passing (not
    # with return_states).
    return_ends: bool = False
    y_dtype: str | None = None  # the output's dtype; None: x's
    # False: the backward recomputes h_in (chunk states and state passing, as the forward)
    # rather than keeping it: (b, c, h, p, n) float32 less between forward and backward.
    save_states: bool = True


def supported(headdim: int, d_state: int) -> bool:
    """Shapes the kernels take: their tiles are powers of two of at least 16 (Triton's dot)."""
    return all(v >= 16 and not v & (v - 1) for v in (headdim, d_state))


def _check_supported(headdim: int, d_state: int):
    if not supported(headdim, d_state):
        raise ValueError(
            f"the Pallas SSD kernels need headdim and d_state powers of two >= 16, "
            f"got headdim={headdim} (x's axis 3), d_state={d_state} (B's axis 3)"
        )


def ssd_scan_pallas(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    *,
    dt_softplus: bool = False,
    segment_ids=None,
    chunk_size: int = 256,
    initial_states=None,
    first_run_states=None,
    continues=None,
    return_final_states: bool = False,
    return_row_end_states: bool = False,
    num_segments: int | None = None,
    interpret: bool = False,
    config: SSDConfig | None = None,
    save_chunk_states: bool = True,
):
    """Same contract as jax_packmamba.ops.ssd_scan.ssd_scan (arguments validated there),
    except that first_run_states (b, h, p, n), the state each row's run at t = 0 starts from,
    is taken here only without initial_states (it enters as the state before chunk 0, which
    the state passing adds: no pass over the tokens), and continues (b,) bool only without
    initial_states: row b's first run starts from row b - 1's end state (continues[0] is not
    read), which the state passing hands across the rows as across chunks (`_linked_rows`);
    first_run_states must be zero on continuing rows. return_row_end_states (not with
    return_final_states): (y, each row's end state (b, h, p, n) float32, the state after its
    last token: its last run's), read from the state passing where a row's end passes on.
    `config` overrides the tiling heuristic (its chunk and blocks are still fitted to the
    sequence). save_chunk_states=False: the backward recomputes the states entering each chunk
    instead of keeping them from the forward (Plan.save_states)."""
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    assert dt.shape == (batch, length, heads) and A.shape == (heads,), (dt.shape, A.shape)
    assert B.shape == C.shape == (batch, length, groups, d_state), (B.shape, C.shape)
    assert not (return_final_states and return_row_end_states)
    _check_supported(headdim, d_state)
    if num_segments is None:
        num_segments = 1 if initial_states is None else initial_states.shape[1]
    plan = make_plan(
        x,
        B,
        D,
        dt_softplus=dt_softplus,
        chunk_size=chunk_size,
        has_init=initial_states is not None,
        has_start=first_run_states is not None,
        return_ends=bool(return_row_end_states),
        return_states=bool(return_final_states),
        interpret=interpret,
        config=config,
        save_states=save_chunk_states,
    )
    if first_run_states is not None:
        assert initial_states is None
        initial_states = first_run_states[:, None]  # (b, 1, h, p, n): _entry reads it so
    if continues is not None:
        assert initial_states is None or first_run_states is not None
        continues = continues & (jnp.arange(batch) > 0)  # nothing precedes row 0
        if segment_ids is None:  # the links are read through the runs' bounds
            segment_ids = jnp.zeros((batch, length), jnp.int32)
    decay = dict(dt=dt, A=A, bias=dt_bias)
    return _entry_jit(
        plan,
        interpret,
        num_segments,
        first_run_states is not None,
        x,
        decay,
        B,
        C,
        D,
        z,
        segment_ids,
        initial_states,
        continues,
    )


def ssd_chunked_pallas(
    x,
    weight,
    log_decay,
    B,
    C,
    D=None,
    *,
    segment_ids=None,
    chunk_size: int = 256,
    initial_states=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    interpret: bool = False,
    config: SSDConfig | None = None,
):
    """The kernels with the decay and the input weight given apart, per token: the contract of
    jax_packmamba.ops.ssd_scan.ssd_chunked (h_t = exp(log_decay_t) h_{t-1} + weight_t x_t B_t^T,
    y_t = h_t C_t + D x_t; weight and log_decay (b, t, h)), for Mamba-3. Returns (y (b, t, h, p)
    float32, final states (b, s, h, p, n) float32 or None); gradients reach weight and
    log_decay. Arguments unchecked beyond the kernels' shapes (the caller validates)."""
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    per_token = (batch, length, heads)
    assert weight.shape == log_decay.shape == per_token, (weight.shape, log_decay.shape)
    assert B.shape == C.shape == (batch, length, groups, d_state), (B.shape, C.shape)
    _check_supported(headdim, d_state)
    if num_segments is None:
        num_segments = 1 if initial_states is None else initial_states.shape[1]
    plan = make_plan(
        x,
        B,
        D,
        dt_softplus=False,
        chunk_size=chunk_size,
        has_init=initial_states is not None,
        return_states=bool(return_final_states),
        interpret=interpret,
        config=config,
        y_dtype="float32",
    )
    decay = dict(log_decay=log_decay, scale=weight)
    out = _entry_jit(
        plan, interpret, num_segments, False, x, decay, B, C, D, None, segment_ids, initial_states
    )
    return out if return_final_states else (out, None)


def _entry(
    plan: Plan,
    interpret: bool,
    num_segments: int,
    first_run_only: bool,
    x,
    decay: dict,
    B,
    C,
    D,
    z,
    segment_ids,
    initial_states,
    continues=None,
):
    """decay: dict(dt, A, bias) (Mamba2: dt' = softplus(dt + bias) if st.dt_softplus, log-decay
    dt' A) or dict(log_decay, scale) (per token, as given). continues (b,) bool, False at row 0,
    with segment_ids."""
    st = plan.st
    seg_lo = seg_hi = into_next = start = None
    if first_run_only and segment_ids is None:  # the first run is found through the runs' bounds
        segment_ids = jnp.zeros((st.batch, st.length), jnp.int32)
    if segment_ids is not None:
        seg_lo, seg_hi = segment_bounds(segment_ids, st.chunk, st.padded)
    if continues is not None or first_run_only:
        # A continuing row's first run enters chunk 0 from the row before, and a given start as
        # the state before chunk 0, as a run enters a chunk from the one before: the kernels then
        # read its start from h_in[:, 0], and the final states' glue too.
        t = jnp.arange(st.padded)
        first_in_chunk0 = (t < st.chunk) & (seg_lo == 0)
        if not first_run_only:
            first_in_chunk0 = continues[:, None] & first_in_chunk0
        seg_lo = jnp.where(first_in_chunk0, -1, seg_lo)
    if continues is not None:
        # Row b's end state passes into row b + 1 where that row continues.
        into_next = jnp.concatenate([continues[1:], jnp.zeros((1,), bool)]).astype(F32)
    if first_run_only:  # initial_states[:, 0] is each row's first-run start: h_in[:, 0] adds it
        start = initial_states[:, 0].astype(F32).reshape(st.batch, st.heads, -1)
        initial_states = None
    glue = y_add = s_add = None
    if initial_states is not None or plan.return_states:
        glue = states.Glue.build(
            decay, st.dt_softplus, segment_ids, seg_lo, num_segments, st.chunk, st.padded
        )
    if initial_states is not None:
        y_add = states.initial_state_outputs(glue, C, initial_states)
        s_add = states.initial_state_chunk_ends(glue, initial_states)
    out = _ssd(
        plan, interpret, x, decay, B, C, D, z, seg_lo, seg_hi, y_add, s_add, into_next, start
    )
    if plan.return_ends:
        y, end = out
        return y, end.reshape(st.batch, st.heads, st.headdim, st.d_state)
    if not plan.return_states:
        return out
    y, h_in = out
    h_in = h_in.reshape(st.batch, st.n_chunks, st.heads, st.headdim, st.d_state)
    return y, states.final_states(glue, x, B, h_in, initial_states)


# Eager callers (tests, the interpreter) would otherwise re-trace every kernel on every call;
# under an outer jit this is inlined.
_entry_jit = jax.jit(_entry, static_argnums=(0, 1, 2, 3))


def make_plan(
    x,
    B,
    D,
    *,
    dt_softplus,
    chunk_size,
    has_init,
    return_states,
    interpret,
    config,
    y_dtype: str | None = None,
    save_states: bool = True,
    has_start: bool = False,
    return_ends: bool = False,
) -> Plan:
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    if config is None:
        cfg = pick_config(batch, length, heads, groups, chunk_size)
    else:
        cfg = fit_blocks(config, effective_chunk(config, chunk_size, length))
    if cfg.chunk_scan_backend == "mosaic" and cfg.chunk < chunk_scan_mgpu.BLOCK:
        # A short sequence's chunk shrinks to it; wgmma needs 64 rows (the rest is padding).
        cfg = fit_blocks(cfg, chunk_scan_mgpu.BLOCK)
    per_group = heads // groups
    # Head splits must divide the heads of a group.
    cfg = dataclasses.replace(
        cfg,
        dcb_head_splits=_divisor(cfg.dcb_head_splits, per_group),
        dbc_head_splits=_divisor(cfg.dbc_head_splits, per_group),
        block_state=min(cfg.block_state, headdim * d_state),
    )
    st = kernel.Static(
        batch=batch,
        length=length,
        heads=heads,
        headdim=headdim,
        d_state=d_state,
        groups=groups,
        chunk=cfg.chunk,
        block_l=cfg.block_l,
        block_s=cfg.block_s,
        block_k=cfg.block_k,
        block_state=cfg.block_state,
        block_heads=cfg.block_heads,
        dt_softplus=bool(dt_softplus),
        d_per_p=D is not None and D.ndim == 2,
        mm_dtype=jnp.dtype(x.dtype).name,
        cb_dtype=cfg.cb_dtype,
        fast=not interpret,
    )
    if cfg.chunk_scan_backend == "mosaic":
        chunk_scan_mgpu.check_supported(st)
    return Plan(
        st, cfg, return_states, has_init, has_start, return_ends, y_dtype, bool(save_states)
    )


def _divisor(split: int, n: int) -> int:
    split = max(1, min(split, n))
    while n % split:
        split -= 1
    return split


def segment_bounds(segment_ids, chunk: int, padded: int):
    """(seg_lo, seg_hi), each (b, T_pad) int32: for every position, the first and last position
    inside its chunk of its run's stretch there; seg_lo = -1 when the run began in an earlier
    chunk. Padding continues the last run (its dt' is 0: the last chunk ends in the state of
    the last token)."""
    batch, length = segment_ids.shape
    ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)), mode="edge")
    t = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), ids.shape)
    chunk0 = (t // chunk) * chunk
    run_start = jax.lax.cummax(jnp.where(segment_starts(ids), t, 0), axis=1)
    run_end = jax.lax.cummin(jnp.where(segment_ends(ids), t, padded - 1), axis=1, reverse=True)
    seg_lo = jnp.where(run_start < chunk0, -1, run_start - chunk0)
    seg_hi = jnp.minimum(run_end, chunk0 + chunk - 1) - chunk0
    return seg_lo.astype(jnp.int32), seg_hi.astype(jnp.int32)


def _f32(a):
    return None if a is None else a.astype(F32)


def _launch(plan: Plan, interpret: bool):
    return dict(num_warps=plan.cfg.num_warps, num_stages=plan.cfg.num_stages, interpret=interpret)


def _cumsum(plan, interpret, decay, seg_lo):
    if "log_decay" in decay:
        inputs = dict(log_decay=decay["log_decay"], scale=decay["scale"], seg_lo=seg_lo)
    else:
        dt, A, bias = decay["dt"], decay["A"].astype(F32), _f32(decay["bias"])
        inputs = dict(dt=dt, A=A, bias=bias, seg_lo=seg_lo)
    return kernel.chunk_cumsum(
        inputs,
        st=plan.st,
        num_warps=4,
        interpret=interpret,
    )


def chunk_decay(cs, seg_lo, *, st: kernel.Static):
    """(b, h, c): 2^(cs at the chunk end) if the chunk's last run entered it, else 0 (a reset
    inside the chunk cuts the incoming state)."""
    cs_end = cs.reshape(st.batch, st.heads, st.n_chunks, st.chunk)[..., -1]
    if seg_lo is None:
        entered = jnp.arange(st.n_chunks) > 0
        entered = jnp.broadcast_to(entered, (st.batch, st.n_chunks))
    else:
        entered = seg_lo.reshape(st.batch, st.n_chunks, st.chunk)[..., -1] < 0
    return jnp.where(entered[:, None, :], jnp.exp2(cs_end), 0.0)


def _linked_rows(plan: Plan, into_next, decay):
    """The rows as one sequence of b * c chunks, for the state passing: (the plan of one row
    of them, decay (1, h, b * c), scale (1, b * c)): row b's last chunk hands its end on to row
    b + 1's first times into_next[b] (1 where row b + 1 continues, else 0), so that nothing
    else passes."""
    st = plan.st
    flat = dataclasses.replace(
        plan, st=dataclasses.replace(st, batch=1, length=st.batch * st.padded)
    )
    ones = jnp.ones((st.batch, st.n_chunks - 1), F32)
    scale = jnp.concatenate([ones, into_next.astype(F32)[:, None]], axis=1)
    flat_decay = jnp.swapaxes(decay, 0, 1).reshape(1, st.heads, st.batch * st.n_chunks)
    return flat, flat_decay, scale.reshape(1, -1)


def _as_one_row(a):
    return a.reshape(1, a.shape[0] * a.shape[1], *a.shape[2:])


def _pass_states(
    plan,
    interpret,
    S,
    decay,
    s_add,
    into_next=None,
    start=None,
    with_end=False,
    *,
    scale=None,
    row_chunks=None,
):
    """(h_in (b, c, h, p * n), end (b, h, p * n) or None) from the chunk-end states S (b, c, h,
    p * n): with into_next (b,), across the rows too (_linked_rows); start (b, h, p * n) or
    None is added to each row's h_in[:, 0] (each row's first run enters chunk 0 with it:
    _entry); with_end, each row's end state (its last run's: the state after its last chunk)."""
    st = plan.st
    if into_next is not None:
        flat, flat_decay, scale = _linked_rows(plan, into_next, decay)
        s_add = None if s_add is None else _as_one_row(s_add)
        h_in, end = _pass_states(
            flat,
            interpret,
            _as_one_row(S),
            flat_decay,
            s_add,
            start=start,
            with_end=with_end,
            scale=scale,
            row_chunks=st.n_chunks,
        )
        return h_in.reshape(st.batch, st.n_chunks, *h_in.shape[2:]), end
    if plan.cfg.state_passing == "pallas":
        inputs = dict(S=S, decay=decay, s_add=s_add, scale=scale, start=start)
        h_in, *end = kernel.state_passing(
            inputs,
            reverse=False,
            st=st,
            interpret=interpret,
            row_chunks=row_chunks,
            with_start=start is not None,
            with_end=with_end,
        )
        return h_in, (end[0] if with_end else None)
    # XLA: the kernel's loop as a scan over the chunks, every row (program) at once.
    batch, n_chunks = S.shape[:2]
    row_chunks = row_chunks or n_chunks
    drive = S if s_add is None else S + s_add
    starts = None if start is None else jnp.asarray(start).reshape(batch, -1, *S.shape[2:])

    def step(h, c):
        if starts is not None:
            h = h + jnp.where(c % row_chunks == 0, starts[:, c // row_chunks], 0.0)
        new = decay[:, :, c, None] * h + drive[:, c]
        out = scale[:, c, None, None] * new if scale is not None else new
        return out, (h, new)

    _, (h_in, new) = jax.lax.scan(step, jnp.zeros_like(S[:, 0]), jnp.arange(n_chunks))
    end = None
    if with_end:  # (c, b, ...) at each row's last chunk -> (b * rows, ...)
        end = jnp.swapaxes(new[row_chunks - 1 :: row_chunks], 0, 1).reshape(-1, *S.shape[2:])
    return jnp.swapaxes(h_in, 0, 1), end


def _pass_states_bwd(
    plan,
    interpret,
    dh,
    h_in,
    decay,
    into_next=None,
    with_start=False,
    d_end=None,
    *,
    scale=None,
    row_chunks=None,
):
    """(dS, ddecay (b, h, c), dstart): going back from the last chunk with G = 0, G = scale[c]
    G (+ d_end[row] at a row's last chunk), dS[c] = G, ddecay[c] = <G, h_in[c]>, G = dh[c] +
    decay[c] G (the gradient reaching h_in[c]); dstart (b, h, p * n), that G at each row's
    chunk 0, with with_start, else None. With into_next, across the rows too."""
    st = plan.st
    if into_next is not None:
        flat, flat_decay, scale = _linked_rows(plan, into_next, decay)
        dS, ddecay, dstart = _pass_states_bwd(
            flat,
            interpret,
            _as_one_row(dh),
            _as_one_row(h_in),
            flat_decay,
            with_start=with_start,
            d_end=d_end,
            scale=scale,
            row_chunks=st.n_chunks,
        )
        ddecay = jnp.swapaxes(ddecay.reshape(st.heads, st.batch, st.n_chunks), 0, 1)
        return dS.reshape(dh.shape), ddecay, dstart
    if plan.cfg.state_passing == "pallas":
        inputs = dict(dh=dh, h_in=h_in, decay=decay, scale=scale, d_end=d_end)
        dS, ddecay, *dstart = kernel.state_passing(
            inputs,
            reverse=True,
            st=st,
            interpret=interpret,
            row_chunks=row_chunks,
            with_start=with_start,
            with_end=d_end is not None,
        )
        return dS, ddecay.sum(-1), (dstart[0] if with_start else None)
    batch, n_chunks = dh.shape[:2]
    row_chunks = row_chunks or n_chunks
    d_ends = None if d_end is None else jnp.asarray(d_end).reshape(batch, -1, *dh.shape[2:])

    def step(G, c):
        if scale is not None:
            G = scale[:, c, None, None] * G
        if d_ends is not None:
            G = G + jnp.where(c % row_chunks == row_chunks - 1, d_ends[:, c // row_chunks], 0.0)
        ddecay = jnp.sum(G * h_in[:, c], axis=-1)
        new = dh[:, c] + decay[:, :, c, None] * G
        return new, (G, ddecay, new)

    chunks = jnp.arange(n_chunks)
    _, (dS, ddecay, G) = jax.lax.scan(step, jnp.zeros_like(dh[:, 0]), chunks, reverse=True)
    dstart = None
    if with_start:
        dstart = jnp.swapaxes(G[::row_chunks], 0, 1).reshape(-1, *dh.shape[2:])
    return jnp.swapaxes(dS, 0, 1), jnp.moveaxis(ddecay, 0, 2), dstart


def _chunk_entry_states(
    plan: Plan,
    interpret,
    x,
    B,
    cs,
    dtp,
    seg_lo,
    chunk_decays,
    s_add,
    into_next,
    start,
    with_end=False,
):
    """(h_in (b, c, h, p, n) float32, each row's end (b, h, p * n) with with_end, else None):
    each chunk's own end state (the chunk-state kernel), passed across chunks. The forward's,
    and the backward's where the plan does not save it."""
    st = plan.st
    S = kernel.chunk_states(
        dict(x=x, B=B, cs=cs, dtp=dtp, seg_lo=seg_lo),
        mode="fwd",
        st=st,
        **_launch(plan, interpret),
    )
    S = S.reshape(st.batch, st.n_chunks, st.heads, st.headdim * st.d_state)
    if s_add is not None:
        s_add = s_add.astype(F32).reshape(S.shape)
    h_in, end = _pass_states(plan, interpret, S, chunk_decays, s_add, into_next, start, with_end)
    return h_in.reshape(st.batch, st.n_chunks, st.heads, st.headdim, st.d_state), end


def _fwd_impl(
    plan: Plan, interpret, x, decay, B, C, D, z, seg_lo, seg_hi, y_add, s_add, into_next, start
):
    del seg_hi
    st = plan.st
    launch = _launch(plan, interpret)
    size = st.headdim * st.d_state
    y_dtype = x.dtype if plan.y_dtype is None else jnp.dtype(plan.y_dtype)
    cs, dtp = _cumsum(plan, interpret, decay, seg_lo)
    cb = kernel.chunk_cb(dict(C=C, B=B), st=st, **launch)
    chunk_decays = chunk_decay(cs, seg_lo, st=st)
    h_in, end = _chunk_entry_states(
        plan,
        interpret,
        x,
        B,
        cs,
        dtp,
        seg_lo,
        chunk_decays,
        s_add,
        into_next,
        start,
        plan.return_ends,
    )
    inputs = dict(
        x=x, z=z, C=C, cb=cb, cs=cs, dtp=dtp, h_in=h_in, D=_f32(D), y_add=_f32(y_add), seg_lo=seg_lo
    )
    if plan.cfg.chunk_scan_backend == "mosaic":
        y, y_pre = chunk_scan_mgpu.chunk_scan(inputs, st=st, y_dtype=y_dtype, interpret=interpret)
    else:
        y, y_pre = kernel.chunk_scan(inputs, st=st, y_dtype=y_dtype, **launch)
    if plan.return_states:
        out = (y, h_in.reshape(st.batch, st.n_chunks, st.heads, size))
    elif plan.return_ends:
        out = (y, end)
    else:
        out = y
    return out, (h_in, y_pre)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd(plan, interpret, x, decay, B, C, D, z, seg_lo, seg_hi, y_add, s_add, into_next, start):
    """into_next (b,) float32 or None: row b's end state passes into row b + 1 by that factor
    (_entry; no gradient). start (b, h, p * n) float32 or None: each row's first run enters
    chunk 0 with it (_entry)."""
    return _fwd_impl(
        plan, interpret, x, decay, B, C, D, z, seg_lo, seg_hi, y_add, s_add, into_next, start
    )[0]


def _ssd_fwd(plan, interpret, x, decay, B, C, D, z, seg_lo, seg_hi, y_add, s_add, into_next, start):
    out, (h_in, y_pre) = _fwd_impl(
        plan, interpret, x, decay, B, C, D, z, seg_lo, seg_hi, y_add, s_add, into_next, start
    )
    # Without saved states the backward reruns their passing, which adds s_add and start: kept
    # (inputs, made in XLA from the initial states; under a remat policy that does not save
    # them, jax.checkpoint makes them again from those rather than keeping them).
    kept = (h_in, None, None) if plan.save_states else (None, s_add, start)
    return out, (x, decay, B, C, D, z, seg_lo, seg_hi, *kept, y_pre, into_next)


def _gate_bwd(dy, z, y_pre, *, dtype):
    """dy' = dy silu(z) and dz = dy y_pre silu'(z), in float32 then rounded."""
    z_dtype = z.dtype
    dy, z, y_pre = dy.astype(F32), z.astype(F32), y_pre.astype(F32)
    sig = jax.nn.sigmoid(z)
    dz = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
    return (dy * z * sig).astype(dtype), dz.astype(z_dtype)


def _ssd_bwd(plan, interpret, res, cts):
    x, decay, B, C, D, z, seg_lo, seg_hi, h_in, s_add, start, y_pre, into_next = res
    st, cfg = plan.st, plan.cfg
    launch = _launch(plan, interpret)
    dy, dh_ct = cts if plan.return_states else (cts, None)
    dy, d_end = cts if plan.return_ends else (dy, None)
    size = st.headdim * st.d_state
    if z is not None:
        dyp, dz = _gate_bwd(dy, z, y_pre, dtype=x.dtype)
    else:
        dyp, dz = dy.astype(x.dtype), None
    cs, dtp = _cumsum(plan, interpret, decay, seg_lo)
    cb = kernel.chunk_cb(dict(C=C, B=B), st=st, **launch)
    # The gradient reaching each chunk's incoming state, then across chunks.
    dh = kernel.chunk_states(
        dict(dy=dyp, C=C, cs=cs, seg_lo=seg_lo, seg_hi=seg_hi), mode="bwd", st=st, **launch
    )
    dh = dh.reshape(st.batch, st.n_chunks, st.heads, size)
    if dh_ct is not None:
        dh = dh + dh_ct.astype(F32)
    chunk_decays = chunk_decay(cs, seg_lo, st=st)
    if h_in is None:
        h_in, _ = _chunk_entry_states(
            plan, interpret, x, B, cs, dtp, seg_lo, chunk_decays, s_add, into_next, start
        )
    d_end = None if d_end is None else d_end.astype(F32)
    dS, ddecay, dstart = _pass_states_bwd(
        plan,
        interpret,
        dh,
        h_in.reshape(dh.shape),
        chunk_decays,
        into_next,
        plan.has_start,
        d_end,
    )
    dS = dS.reshape(h_in.shape)
    seg = dict(seg_lo=seg_lo, seg_hi=seg_hi)
    dx, ddt_x, dcs_state, dD_part = kernel_bwd.bwd_dx(
        dict(x=x, dy=dyp, B=B, cb=cb, cs=cs, dtp=dtp, dS=dS, D=_f32(D), **seg),
        st=st,
        x_dtype=x.dtype,
        **launch,
    )
    splits = cfg.dcb_head_splits
    dcb, rowsum, colsum = kernel_bwd.bwd_dcb(
        dict(x=x, dy=dyp, cb=cb, cs=cs, dtp=dtp, **seg), st=st, splits=splits, **launch
    )
    if splits > 1:
        dcb = _sum_splits(dcb, st)
    dsplits = cfg.dbc_head_splits
    dC, a_inter = kernel_bwd.bwd_dbc(
        dict(dy=dyp, B=B, C=C, dcb=dcb, cs=cs, h_in=h_in, **seg),
        mode="dC",
        st=st,
        splits=dsplits,
        out_dtype=C.dtype,
        **launch,
    )
    dB = kernel_bwd.bwd_dbc(
        dict(x=x, C=C, dcb=dcb, cs=cs, dtp=dtp, dS=dS, **seg),
        mode="dB",
        st=st,
        splits=dsplits,
        out_dtype=B.dtype,
        **launch,
    )
    if dsplits > 1:
        # Left to itself XLA may fuse these sums into a consumer's concatenation (the Mamba1
        # scan measured that 5x slower than a reduction of its own).
        dC, dB = jax.lax.optimization_barrier(
            (dC.sum(1).astype(C.dtype), dB.sum(1).astype(B.dtype))
        )
    dcs = _assemble_dcs(st, rowsum, colsum, a_inter, dcs_state, chunk_decays, ddecay)
    d_decay = _cumsum_bwd(plan, interpret, decay, dcs, ddt_x, seg)
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1))
        dD = (dD if D.ndim == 2 else dD.sum(-1)).astype(D.dtype)
    # The gradients of the kernels' additive inputs (states.py makes them from initial states).
    d_y_add = dyp.astype(F32) if plan.has_init else None
    d_s_add = dS if plan.has_init else None
    return dx, d_decay, dB, dC, dD, dz, None, None, d_y_add, d_s_add, None, dstart


def _cumsum_bwd(plan, interpret, decay, dcs, ddt_x, seg):
    """The gradients of `decay`'s entries from d cs (natural-log units) and ddt_x (through the
    input scale dt' x)."""
    if "log_decay" in decay:
        d_log, d_scale = kernel_bwd.cumsum_bwd_per_token(
            dict(dcs=dcs, ddt_x=ddt_x, **seg),
            st=plan.st,
            out_dtype=F32,
            num_warps=4,
            interpret=interpret,
        )
        return dict(
            log_decay=d_log.astype(decay["log_decay"].dtype),
            scale=d_scale.astype(decay["scale"].dtype),
        )
    dt, A, dt_bias = decay["dt"], decay["A"], decay["bias"]
    ddt, dA_part, dbias_part = kernel_bwd.cumsum_bwd(
        dict(dt=dt, A=A.astype(F32), bias=_f32(dt_bias), dcs=dcs, ddt_x=ddt_x, **seg),
        st=plan.st,
        dt_dtype=dt.dtype,
        num_warps=4,
        interpret=interpret,
    )
    dA = dA_part.sum((0, 1)).astype(A.dtype)
    dbias = None if dt_bias is None else dbias_part.sum((0, 1)).astype(dt_bias.dtype)
    return dict(dt=ddt, A=dA, bias=dbias)


def _sum_splits(dcb, st):
    return dcb.reshape(st.batch, st.n_chunks, st.groups, -1, st.chunk, st.chunk).sum(3)


def _assemble_dcs(st, rowsum, colsum, a_inter, dcs_state, decay, ddecay):
    """d cs (b, h, T_pad) in natural-log units: the intra-chunk terms (row minus column sums of
    T), the inter term, the chunk-state terms (each token's -dt' x . (dS B) share, and their sum
    plus decay * ddecay at the chunk's last position)."""
    dcs = rowsum.sum(2) - colsum.sum(2) + a_inter - dcs_state
    shape = (st.batch, st.heads, st.n_chunks, st.chunk)
    end = dcs_state.reshape(shape).sum(-1) + decay * ddecay
    dcs = dcs.reshape(shape)
    # A concatenation, not .at[..., -1].add: that is a scatter-add, and XLA's GPU scatter adds
    # with atomics (tests/test_ssd_impls.py fails on any scatter-add in this path).
    dcs = jnp.concatenate([dcs[..., :-1], dcs[..., -1:] + end[..., None]], axis=-1)
    return dcs.reshape(st.batch, st.heads, st.padded)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)
