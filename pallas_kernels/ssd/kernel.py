"""Forward Pallas (Triton) kernels of the chunked SSD scan with segment resets.

Axis letters: b batch, t time, h heads, p headdim, g groups, n d_state, c chunk, l and s
positions inside a chunk (L = its length), T_pad = number of chunks x L.

Arrays the kernels share (built by vjp.py):
  x, z, y (b, t, h, p); dt (b, t, h); B, C (b, t, g, n): the op's own layouts, loaded as
    (rows, p) or (rows, n) tiles with the rows past the sequence masked.
  dtp, cs (b, h, T_pad) float32: dt' = softplus(dt + bias) (0 past the sequence) and the
    cumulative log2-decay cs_l = log2(e) sum_{s in run(l), s <= l} dt'_s A inside the chunk. The
    sum restarts at each chunk start and at each run start, so a token's decays are computed
    from its own run's inputs alone (bitwise isolation of segments).
  seg_lo, seg_hi (b, T_pad) int32, only with segment ids: for each position, where (inside its
    chunk) its run's stretch in that chunk begins and ends; seg_lo = -1 when the run began in an
    earlier chunk (the token reads the incoming state). Positions l, s of one chunk are in the
    same run iff max(seg_lo[l], 0) <= s <= l for s <= l, and a run reaches the chunk end iff
    seg_hi = L - 1. Without segment ids every chunk but the first has entered rows only.
  cb (b, c, g, L, L): C_l . B_s, only its causal tiles written (readers mask the rest).
  h_in (b, c, h, p, n) float32: the state entering each chunk.

Every decay is exp2 of a masked exponent (where(mask, cs_l - cs_s, -inf)), so masked entries are
exact zeros whatever the other segments hold, and no exponent of a masked pair can overflow.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch
from pallas_kernels.launch import iota, load, store
from pallas_kernels.triton_math import LOG2E, exp2, sigmoid, softplus

F32 = jnp.float32
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    """What a kernel body is specialised on (all static)."""

    batch: int
    length: int
    heads: int
    headdim: int
    d_state: int
    groups: int
    chunk: int
    block_l: int
    block_s: int
    block_k: int
    block_state: int
    block_heads: int
    dt_softplus: bool
    d_per_p: bool  # D is (h, p), not (h,)
    mm_dtype: str  # operand dtype of the matmuls (x's dtype); float32 runs them at IEEE
    cb_dtype: str
    fast: bool  # GPU: inline-PTX exp2/softplus/sigmoid; the interpreter cannot run PTX.

    @property
    def n_chunks(self) -> int:
        return -(-self.length // self.chunk)

    @property
    def padded(self) -> int:
        return self.n_chunks * self.chunk

    @property
    def per_group(self) -> int:
        return self.heads // self.groups


def div(a, b: int):
    """a // b for traced a >= 0: truncating division, without the sign fix-up of jnp's floor
    division (which Pallas Triton mis-lowers for some scalar operands)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def rem(a, b: int):
    return jax.lax.rem(jnp.asarray(a, jnp.int32), jnp.int32(b))


ALL = slice(None)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """2-D matmul with float32 accumulation; float32 operands at IEEE precision (Triton's
    default for them would be TF32)."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32
    )


def masked_exp2(mask, exponent, st: Static):
    """exp2(exponent) where mask, exactly 0 elsewhere."""
    return exp2(jnp.where(mask, exponent, NEG_INF), fast=st.fast)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Where a program is: batch row b, chunk c (first position c0 in T_pad)."""

    b: jax.Array
    c: jax.Array
    c0: jax.Array


def chunk_at(bc, st: Static) -> Chunk:
    b, c = div(bc, st.n_chunks), rem(bc, st.n_chunks)
    return Chunk(b, c, c * st.chunk)


def row_mask(ch: Chunk, pos, st: Static):
    """(rows,) positions inside the chunk -> rows inside the sequence."""
    return ch.c0 + pos < st.length


def load_rows(ref, ch: Chunk, pos0, n_rows: int, lead, st: Static, dtype=None):
    """(n_rows, last axis) tile of a (b, t, ..., last) input at chunk positions pos0..., with
    `lead` indexing the axes between t and the last; zero past the sequence."""
    valid = row_mask(ch, pos0 + iota(n_rows), st)
    tile = load(ref, (ch.b, pl.ds(ch.c0 + pos0, n_rows), *lead, ALL), mask=valid[:, None])
    return tile if dtype is None else tile.astype(dtype)


def store_rows(ref, ch: Chunk, pos0, value, lead, st: Static):
    valid = row_mask(ch, pos0 + iota(value.shape[0]), st)
    store(ref, (ch.b, pl.ds(ch.c0 + pos0, value.shape[0]), *lead, ALL), value, mask=valid[:, None])


def load_vec(ref, ch: Chunk, h, pos0, n: int):
    """(n,) slice of a (b, h, T_pad) array."""
    return load(ref, (ch.b, h, pl.ds(ch.c0 + pos0, n)))


def seg_lo_rows(r, ch: Chunk, pos0, n: int, st: Static):
    """(n,) seg_lo of chunk positions pos0...; without segment ids, 0 in the first chunk (the
    sequence starts there) and -1 (entered) elsewhere."""
    if "seg_lo" in r:
        return load(r["seg_lo"], (ch.b, pl.ds(ch.c0 + pos0, n)))
    return jnp.full((n,), _lo_without_segments(ch), jnp.int32)


def seg_hi_rows(r, ch: Chunk, pos0, n: int, st: Static):
    if "seg_lo" in r:
        return load(r["seg_hi"], (ch.b, pl.ds(ch.c0 + pos0, n)))
    return jnp.full((n,), st.chunk - 1, jnp.int32)


def seg_lo_at(r, ch: Chunk, pos, st: Static):
    """Scalar seg_lo at one chunk position."""
    if "seg_lo" in r:
        return r["seg_lo"][ch.b, ch.c0 + pos]
    return _lo_without_segments(ch)


def _lo_without_segments(ch: Chunk):
    # 0 in the first chunk, -1 after it. (Not jnp.where(c == 0, 0, -1): Pallas Triton lowers that
    # scalar select to an i1 value.)
    return -jnp.minimum(ch.c, 1)


def seg_hi_at(r, ch: Chunk, pos, st: Static):
    if "seg_lo" in r:
        return r["seg_hi"][ch.b, ch.c0 + pos]
    return jnp.int32(st.chunk - 1)


def causal_run_mask(pos_l, pos_s, lo_l):
    """(len(pos_l), len(pos_s)): s <= l and s in l's run."""
    return (pos_s[None, :] <= pos_l[:, None]) & (pos_s[None, :] >= jnp.maximum(lo_l, 0)[:, None])


# ---------------------------------------------------------------------------------------------
# Chunk cumulative decay.


def load_dt(r, ch: Chunk, h0, pos0, n: int, st: Static):
    """dt' (n, block_heads) at chunk positions pos0... and heads h0...: softplus(dt + bias) in
    float32, 0 past the sequence and past the last head; also the pre-softplus value."""
    heads = h0 + iota(st.block_heads)
    valid = row_mask(ch, pos0 + iota(n), st)[:, None] & (heads < st.heads)[None, :]
    raw = load(
        r["dt"], (ch.b, pl.ds(ch.c0 + pos0, n), pl.ds(h0, st.block_heads)), mask=valid
    ).astype(F32)
    if "bias" in r:
        raw = raw + load(r["bias"], (pl.ds(h0, st.block_heads),), mask=heads < st.heads)[None, :]
    dtp = softplus(raw, fast=st.fast) if st.dt_softplus else raw
    return jnp.where(valid, dtp, 0.0), raw, valid


def load_per_token(r, name: str, ch: Chunk, h0, pos0, n: int, st: Static):
    """(n, block_heads) float32 of a (b, t, h) input at chunk positions pos0... and heads
    h0...; 0 past the sequence and past the last head; also the validity mask."""
    heads = h0 + iota(st.block_heads)
    valid = row_mask(ch, pos0 + iota(n), st)[:, None] & (heads < st.heads)[None, :]
    idx = (ch.b, pl.ds(ch.c0 + pos0, n), pl.ds(h0, st.block_heads))
    return load(r[name], idx, mask=valid).astype(F32), valid


def _cumsum_kernel(r, *, st: Static):
    """cs = M a per (b, chunk, head block), a = dt' A log2(e), M[l, s] = [s in l's run, s <= l]:
    a segmented cumulative sum written as a dot, since Triton has no segmented scan; each output
    is a fixed-order sum of its own run's terms only.

    With per-token inputs ("log_decay" and "scale", (b, t, h): Mamba-3's decay and input
    scale) a = log_decay log2(e) and dt' = scale, as given."""
    c, hb, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = Chunk(b, c, c * st.chunk)
    h0 = hb * st.block_heads
    heads = h0 + iota(st.block_heads)
    head_ok = heads < st.heads
    per_token = "log_decay" in r
    if not per_token:
        a2 = load(r["A"], (pl.ds(h0, st.block_heads),), mask=head_ok) * LOG2E
    bq = st.block_s

    def block(i, carry):
        pos_l = i * bq + iota(bq)
        lo_l = seg_lo_rows(r, ch, i * bq, bq, st)

        def add(j, acc):
            if per_token:
                a = load_per_token(r, "log_decay", ch, h0, j * bq, bq, st)[0]
                m = causal_run_mask(pos_l, j * bq + iota(bq), lo_l).astype(F32)
                return acc + dot(m, a * LOG2E)
            dtp, _, _ = load_dt(r, ch, h0, j * bq, bq, st)
            m = causal_run_mask(pos_l, j * bq + iota(bq), lo_l).astype(F32)
            return acc + dot(m, dtp * a2[None, :])

        # Blocks before the run of the block's first row add nothing.
        j0 = div(jnp.maximum(seg_lo_at(r, ch, i * bq, st), 0), bq)
        acc = jax.lax.fori_loop(j0, i + 1, add, jnp.zeros((bq, st.block_heads), F32))
        # (b, h, T_pad) rows are contiguous per head: store transposed.
        idx = (b, pl.ds(h0, st.block_heads), pl.ds(ch.c0 + i * bq, bq))
        store(r["cs"], idx, acc.T, mask=head_ok[:, None])
        if per_token:
            dtp = load_per_token(r, "scale", ch, h0, i * bq, bq, st)[0]
        else:
            dtp = load_dt(r, ch, h0, i * bq, bq, st)[0]
        store(r["dtp"], idx, dtp.T, mask=head_ok[:, None])
        return carry

    jax.lax.fori_loop(0, st.chunk // bq, block, 0)


def chunk_cumsum(inputs: dict, *, st: Static, num_warps: int, interpret: bool):
    """(cs, dtp), each (b, h, T_pad) float32."""
    shape = jax.ShapeDtypeStruct((st.batch, st.heads, st.padded), F32)
    return launch.call(
        _cumsum_kernel,
        inputs,
        dict(cs=shape, dtp=shape),
        grid=(st.n_chunks, -(-st.heads // st.block_heads), st.batch),
        name="ssd_chunk_cumsum",
        num_warps=num_warps,
        num_stages=1,
        interpret=interpret,
        st=st,
    )


# ---------------------------------------------------------------------------------------------
# C B^T per chunk and group.


def _bmm_kernel(r, *, st: Static):
    ij, bc, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = chunk_at(bc, st)
    bt = st.block_s
    nb = st.chunk // bt
    i, j = div(ij, nb), rem(ij, nb)

    @pl.when(j <= i)
    def _():
        mm = jnp.dtype(st.mm_dtype)
        c_rows = load_rows(r["C"], ch, i * bt, bt, (g,), st, mm)
        b_rows = load_rows(r["B"], ch, j * bt, bt, (g,), st, mm)
        cb = dot(c_rows, b_rows, trans_b=True)
        store(r["cb"], (ch.b, ch.c, g, pl.ds(i * bt, bt), pl.ds(j * bt, bt)), cb)


def chunk_cb(inputs: dict, *, st: Static, num_warps: int, num_stages: int, interpret: bool):
    """cb (b, c, g, L, L): C_l . B_s on the tiles with s-block <= l-block (the rest unwritten)."""
    nb = st.chunk // st.block_s
    dtype = jnp.dtype(st.mm_dtype) if st.cb_dtype == "input" else F32
    out = jax.ShapeDtypeStruct((st.batch, st.n_chunks, st.groups, st.chunk, st.chunk), dtype)
    return launch.call(
        _bmm_kernel,
        inputs,
        dict(cb=out),
        grid=(nb * nb, st.batch * st.n_chunks, st.groups),
        name="ssd_chunk_cb",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        st=st,
    )[0]


# ---------------------------------------------------------------------------------------------
# Chunk states: sum over a chunk's tokens of w_t q_t^T v_t, (p, n) per (b, chunk, head).


def _chunk_state_kernel(r, *, st: Static, mode: str):
    """mode "fwd": S = sum_s dt'_s 2^(cs_end - cs_s) x_s^T B_s over the chunk's last run (the
    state the chunk hands on, from a zero start).
    mode "bwd": dH = sum_l 2^(cs_l) dy'_l^T C_l over the rows that read the incoming state (the
    gradient reaching h_in from the chunk's own outputs)."""
    c, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = Chunk(b, c, c * st.chunk)
    g = div(h, st.per_group)
    bk, L = st.block_k, st.chunk
    mm = jnp.dtype(st.mm_dtype)
    if mode == "fwd":
        q_ref, v_ref = r["x"], r["B"]
        cs_end = r["cs"][b, h, ch.c0 + L - 1]
        first = jnp.maximum(seg_lo_at(r, ch, L - 1, st), 0)  # where the last run's stretch begins
        j0, j1 = div(first, bk), L // bk
    else:
        q_ref, v_ref = r["dy"], r["C"]
        # Rows that entered: the chunk's first stretch, when its run began earlier.
        n_entered = jnp.where(seg_lo_at(r, ch, 0, st) < 0, seg_hi_at(r, ch, 0, st) + 1, 0)
        j0, j1 = 0, div(n_entered + bk - 1, bk)

    def body(j, acc):
        pos = j * bk + iota(bk)
        cs_s = load_vec(r["cs"], ch, h, j * bk, bk)
        if mode == "fwd":
            w = load_vec(r["dtp"], ch, h, j * bk, bk) * masked_exp2(pos >= first, cs_end - cs_s, st)
        else:
            w = masked_exp2(pos < n_entered, cs_s, st)
        q = load_rows(q_ref, ch, j * bk, bk, (h,), st, F32) * w[:, None]
        v = load_rows(v_ref, ch, j * bk, bk, (g,), st, mm)
        return acc + dot(q.astype(mm), v, trans_a=True)

    acc = jax.lax.fori_loop(j0, j1, body, jnp.zeros((st.headdim, st.d_state), F32))
    r["out"][...] = acc


def chunk_states(
    inputs: dict, *, mode: str, st: Static, num_warps: int, num_stages: int, interpret: bool
):
    """(b, c, h, p, n) float32 (see _chunk_state_kernel for the two modes)."""
    out = jax.ShapeDtypeStruct((st.batch, st.n_chunks, st.heads, st.headdim, st.d_state), F32)
    name = "ssd_chunk_states" if mode == "fwd" else "ssd_bwd_chunk_dstates"
    # Each program writes one whole (p, n) state: a fixed tile.
    tile = pl.BlockSpec((None, None, None, st.headdim, st.d_state), lambda c, h, b: (b, c, h, 0, 0))
    return launch.call(
        _chunk_state_kernel,
        inputs,
        dict(out=out),
        grid=(st.n_chunks, st.heads, st.batch),
        name=name,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        out_specs=dict(out=tile),
        st=st,
        mode=mode,
    )[0]


# ---------------------------------------------------------------------------------------------
# State passing across chunks (sequential over chunks, parallel over b x h x state elements).


def _state_passing_kernel(
    r, *, st: Static, reverse: bool, row_chunks: int, with_start: bool, with_end: bool
):
    """Forward: h_in[0] = 0, h_in[c + 1] = scale[c] (decay[c] h_in[c] + S[c] (+ S_add[c])).
    Reverse: G = 0; for c from the last: G = scale[c] G, dS[c] = G, ddecay[c] = <G, h_in[c]>
    (this block's share), G = dH[c] + decay[c] G, the gradient reaching h_in[c].

    The batch's rows may run as one sequence of chunks (linked rows: a row every row_chunks
    chunks). scale (b, c), 1 where absent, cuts a row's end from the next row where that one
    does not continue. With a start (rows, h, p*n), a row's first chunk enters with it added
    (h_in there += start[row]) and the reverse gives dstart[row], the gradient reaching that
    h_in. With an end, the forward stores each row's end state, end[row] = decay h_in + S of
    its last chunk (before the scale), and the reverse adds d_end[row] to the gradient
    arriving there. All applied here, in the one sequential pass: no pass over S in XLA."""
    blk, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(blk * st.block_state, st.block_state)
    nc = st.n_chunks
    src = "dh" if reverse else "S"

    def chunk_of(k):
        return nc - 1 - k if reverse else k

    def row_of(c):
        return b * (nc // row_chunks) + div(c, row_chunks)

    def row_start(c):
        return rem(c, row_chunks) == 0

    def row_end(c):
        return rem(c, row_chunks) == row_chunks - 1

    def plus_row(flag, name, c, state):
        return jax.lax.cond(
            flag, lambda s: s + load(r[name], (row_of(c), h, cols)), lambda s: s, state
        )

    def fetch(k):
        c = chunk_of(jnp.minimum(k, nc - 1))
        rows = [load(r[src], (b, c, h, cols))]
        if reverse:
            rows.append(load(r["h_in"], (b, c, h, cols)))
        elif "s_add" in r:
            rows.append(load(r["s_add"], (b, c, h, cols)))
        return rows

    def body(k, carry):
        # The next chunk's rows are loaded while this one is combined: their addresses do not
        # depend on the carry, and the loop is otherwise one DRAM round trip per chunk.
        state, rows = carry
        nxt = fetch(k + 1)
        c = chunk_of(k)
        decay = r["decay"][b, h, c]
        if reverse:
            if "scale" in r:
                state = r["scale"][b, c] * state
            if with_end:
                state = plus_row(row_end(c), "d_end", c, state)
            store(r["dS"], (b, c, h, cols), state)
            r["ddecay"][b, h, c, blk] = jnp.sum(state * rows[1])
            new = decay * state + rows[0]
            if with_start:

                @pl.when(row_start(c))
                def _():
                    store(r["dstart"], (row_of(c), h, cols), new)

            return new, nxt
        if with_start:
            state = plus_row(row_start(c), "start", c, state)
        store(r["h_in"], (b, c, h, cols), state)
        new = decay * state + (rows[0] + rows[1] if "s_add" in r else rows[0])
        if with_end:

            @pl.when(row_end(c))
            def _():
                store(r["end"], (row_of(c), h, cols), new)

        if "scale" in r:
            new = r["scale"][b, c] * new
        return new, nxt

    jax.lax.fori_loop(0, nc, body, (jnp.zeros((st.block_state,), F32), fetch(0)))


def state_passing(
    inputs: dict,
    *,
    reverse: bool,
    st: Static,
    interpret: bool,
    row_chunks: int | None = None,
    with_start: bool = False,
    with_end: bool = False,
):
    """Forward: h_in (b, c, h, p*n), and end (rows, h, p*n) with with_end; inputs["start"]
    (rows, h, p*n) with with_start. Reverse: (dS (b, c, h, p*n), ddecay (b, h, c, blocks)),
    and dstart (rows, h, p*n) with with_start; inputs["d_end"] (rows, h, p*n) with with_end.
    row_chunks: the chunks of a row (the rows of a linked batch run as one sequence)."""
    size = st.headdim * st.d_state
    nblk = size // st.block_state
    row_chunks = row_chunks or st.n_chunks
    per_row = jax.ShapeDtypeStruct((st.batch * st.n_chunks // row_chunks, st.heads, size), F32)
    states = jax.ShapeDtypeStruct((st.batch, st.n_chunks, st.heads, size), F32)
    if reverse:
        outs = dict(
            dS=states, ddecay=jax.ShapeDtypeStruct((st.batch, st.heads, st.n_chunks, nblk), F32)
        )
        if with_start:
            outs["dstart"] = per_row
    else:
        outs = dict(h_in=states)
        if with_end:
            outs["end"] = per_row
    res = launch.call(
        _state_passing_kernel,
        inputs,
        outs,
        grid=(nblk, st.heads, st.batch),
        name="ssd_bwd_state_passing" if reverse else "ssd_state_passing",
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        st=st,
        reverse=reverse,
        row_chunks=row_chunks,
        with_start=with_start,
        with_end=with_end,
    )
    return tuple(res)


# ---------------------------------------------------------------------------------------------
# Chunk scan: the outputs.


def load_D(r, h, st: Static):
    """D for head h: a scalar, or (1, p) with a per-channel D."""
    if st.d_per_p:
        return load(r["D"], (h, ALL))[None, :]
    return r["D"][h]


def _chunk_scan_kernel(r, *, st: Static):
    """y_l = 2^(cs_l) [l entered] C_l h_in^T + sum_{s in l's run, s <= l} CB[l,s] 2^(cs_l - cs_s)
    dt'_s x_s + D x_l (+ y_add_l), then * silu(z_l); also the pre-gate value with z."""
    i, h, bc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ch = chunk_at(bc, st)
    g = div(h, st.per_group)
    bl, bs = st.block_l, st.block_s
    mm = jnp.dtype(st.mm_dtype)
    l0 = i * bl
    pos_l = l0 + iota(bl)
    cs_l = load_vec(r["cs"], ch, h, l0, bl)
    lo_l = seg_lo_rows(r, ch, l0, bl, st)
    lo_first = seg_lo_at(r, ch, l0, st)  # runs only grow along the chunk: the block's earliest

    def inter(acc):
        c_rows = load_rows(r["C"], ch, l0, bl, (g,), st, mm)
        h_in = load(r["h_in"], (ch.b, ch.c, h, ALL, ALL)).astype(mm)
        return acc + dot(c_rows, h_in, trans_b=True) * masked_exp2(lo_l < 0, cs_l, st)[:, None]

    acc = jnp.zeros((bl, st.headdim), F32)
    acc = jax.lax.cond(lo_first < 0, inter, lambda a: a, acc)

    def intra(j, acc):
        s0 = j * bs
        cb = load(r["cb"], (ch.b, ch.c, g, pl.ds(l0, bl), pl.ds(s0, bs))).astype(F32)
        cs_s = load_vec(r["cs"], ch, h, s0, bs)
        dt_s = load_vec(r["dtp"], ch, h, s0, bs)
        mask = causal_run_mask(pos_l, s0 + iota(bs), lo_l)
        decay = masked_exp2(mask, cs_l[:, None] - cs_s[None, :], st)
        w = jnp.where(mask, cb * decay * dt_s[None, :], 0.0)
        return acc + dot(w.astype(mm), load_rows(r["x"], ch, s0, bs, (h,), st, mm))

    acc = jax.lax.fori_loop(div(jnp.maximum(lo_first, 0), bs), div(l0 + bl, bs), intra, acc)
    y = acc
    if "D" in r:
        y = y + load_D(r, h, st) * load_rows(r["x"], ch, l0, bl, (h,), st, F32)
    if "y_add" in r:
        y = y + load_rows(r["y_add"], ch, l0, bl, (h,), st, F32)
    if "z" in r:
        store_rows(r["y_pre"], ch, l0, y, (h,), st)
        z = load_rows(r["z"], ch, l0, bl, (h,), st, F32)
        y = y * (z * sigmoid(z, fast=st.fast))
    store_rows(r["y"], ch, l0, y, (h,), st)


def chunk_scan(
    inputs: dict, *, st: Static, y_dtype, num_warps: int, num_stages: int, interpret: bool
):
    """y (b, t, h, p) and, with z, the pre-gate y_pre (same layout and dtype)."""
    rows = jax.ShapeDtypeStruct((st.batch, st.length, st.heads, st.headdim), y_dtype)
    gated = inputs.get("z") is not None
    outs = dict(y=rows, y_pre=rows) if gated else dict(y=rows)
    res = launch.call(
        _chunk_scan_kernel,
        inputs,
        outs,
        grid=(st.chunk // st.block_l, st.heads, st.batch * st.n_chunks),
        name="ssd_chunk_scan",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        st=st,
    )
    return tuple(res) if gated else (res[0], None)
