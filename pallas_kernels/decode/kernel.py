"""Pallas (Triton) kernels of one Mamba1 decode step, everything between in_proj and out_proj,
and the conv step of Mamba2's.

Axis letters: b batch, e channels (d_inner), n state (d_state), w conv taps (d_conv), r dt_rank,
R = r + 2n (x_proj's width), p x_proj partials.

Two kernels, because x_proj sums over all channels and dt_proj needs that sum in every channel:

    decode_conv_x_proj  per (row block, channel group): the conv step (window = the conv
                        state's w - 1 inputs and this token's x), its silu output xc, the
                        conv state shifted by one (in place), and xc @ x_proj over the group's
                        channels: one float32 partial (rows, R) per channel group.
    decode_in_proj_conv the same with in_proj in front, for one row block: per block of xz's
                        columns, hidden @ in_proj (the weight's column block walked down
                        d_model), then on x's blocks the conv step and x_proj's partial from
                        the registers. At decode's batch sizes in_proj is a read of its weight,
                        and the conv step's latency hides behind the other programs' reads.
                        Mamba2's too (no x_proj; the conv's columns are xBC's, after z).
                        Optionally with the block's residual add and RMSNorm in front
                        (decode_add_norm_in_proj_conv: the norm's one scale a row applied
                        after the product).
    decode_conv         the conv step alone: Mamba2's over xBC (its state update is
                        ssd_update.py's), or Mamba1's with x_proj left to XLA's product.
    decode_ssm_update   per (row block, channel block; or one row, state_one_row), after the
                        partials are summed: dt_proj
                        of the summed dt part, softplus(dt + bias), the state update
                        h = exp(dt A) h + dt x B (in place: the float32 state is read once and
                        written once), y = C.h + D x, y * silu(z).

Rounding follows the unfused step (jax_packmamba.model.mixer_core_xla) in the compute dtype c:
xc, x_proj's output and dt_proj's output are rounded to c where the unfused step stores them in c;
everything else is float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch
from pallas_kernels.triton_math import LOG2E, exp2, sigmoid, softplus

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    """What the kernel bodies are specialised on (all static)."""

    batch: int
    d_inner: int
    d_state: int
    dt_rank: int
    width: int  # d_conv: taps of the conv, the state holds width - 1 inputs
    block_rows: int
    block_conv: int
    conv_blocks_per_program: int
    block_state: int
    dtype: str  # compute dtype c
    fast: bool  # GPU: PTX approximations (triton_math); the interpreter cannot run PTX.
    d_model: int = 0  # in_proj's input width (in_proj_conv only)
    block_k: int = 128  # in_proj's contraction tile (in_proj_conv only)
    x_col: int = 0  # the column of the conv's first input channel in xz (Mamba2: after z)
    xz_width: int = 0  # in_proj's output columns (in_proj_conv only; Mamba1 2 d_inner)
    norm_eps: float | None = None  # in_proj_conv with the residual add + RMSNorm in front

    @property
    def x_width(self) -> int:
        return self.dt_rank + 2 * self.d_state

    @property
    def x_width_pad(self) -> int:
        return _pow2(self.x_width)

    @property
    def rank_pad(self) -> int:
        return _pow2(self.dt_rank)

    @property
    def conv_programs(self) -> int:
        blocks = -(-self.d_inner // self.block_conv)
        return -(-blocks // self.conv_blocks_per_program)

    @property
    def row_blocks(self) -> int:
        return -(-self.batch // self.block_rows)

    @property
    def precision(self):
        # float32 operands: IEEE products (Triton's default would be TF32), so that float32
        # runs match the unfused step; bfloat16 operands have one precision.
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


def _pow2(x: int) -> int:
    """Next power of two, at least 16 (Triton's dot needs 16 in every dimension)."""
    return max(16, 1 << (x - 1).bit_length())


def _iota(n):
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _rows(st: Static):
    """(first row, (block_rows,) mask of rows inside the batch) of this program."""
    b0 = pl.program_id(1) * st.block_rows
    return b0, (b0 + _iota(st.block_rows)) < st.batch


def _silu(x, st: Static):
    return x * sigmoid(x, fast=st.fast)


def _conv_block(r, st: Static, b0, rmask, e0, x, acc=None):
    """One block of channels [e0, e0 + block_conv) of the conv step for the rows from b0, given
    this token's x (rows, block_conv) in the compute dtype: stores xc = silu(conv) and the conv
    state shifted by one (in place); returns acc + xc @ x_proj[block] (None without acc)."""
    conv_ref, w_ref = r["conv_state"], r["conv_weight"]
    conv_out_ref, xc_ref = r["conv_out"], r["xc"]
    c = jnp.dtype(st.dtype)
    cmask = (e0 + _iota(st.block_conv)) < st.d_inner  # all False past the last block
    m = rmask[:, None] & cmask[None, :]
    rows, cols = pl.ds(b0, st.block_rows), pl.ds(e0, st.block_conv)
    window = [
        plgpu.load(conv_ref.at[rows, jnp.int32(k), cols], mask=m, other=0)
        for k in range(st.width - 1)
    ]
    taps = [
        plgpu.load(w_ref.at[cols, jnp.int32(k)], mask=cmask, other=0).astype(F32)
        for k in range(st.width)
    ]
    pre = jnp.zeros((st.block_rows, st.block_conv), F32)
    if "conv_bias" in r:
        pre = pre + plgpu.load(r["conv_bias"].at[cols], mask=cmask, other=0).astype(F32)[None, :]
    for k, inp in enumerate((*window, x)):
        pre = pre + inp.astype(F32) * taps[k][None, :]
    xc = _silu(pre, st).astype(c)
    plgpu.store(xc_ref.at[rows, cols], xc, mask=m)
    # Each element is loaded and stored by the same thread (same tile, same layout), so
    # shifting the window in place never overwrites an input before it is read.
    for k, inp in enumerate((*window, x)[1:]):
        plgpu.store(
            conv_out_ref.at[rows, jnp.int32(k), cols], inp.astype(conv_out_ref.dtype), mask=m
        )
    if acc is None:
        return None
    xmask = _iota(st.x_width_pad) < st.x_width
    xw = plgpu.load(
        r["x_proj"].at[cols, pl.ds(0, st.x_width_pad)],
        mask=cmask[:, None] & xmask[None, :],
        other=0,
    )
    return acc + jnp.dot(xc, xw.astype(c), preferred_element_type=F32, precision=st.precision)


def _store_part(r, st: Static, group, b0, rmask, acc):
    xmask = _iota(st.x_width_pad) < st.x_width
    plgpu.store(
        r["parts"].at[group, pl.ds(b0, st.block_rows), pl.ds(0, st.x_width_pad)],
        acc,
        mask=rmask[:, None] & xmask[None, :],
    )


def _conv_input(r, st: Static, b0, rmask, e0):
    """This token's conv inputs (rows, block_conv) of channels [e0, e0 + block_conv)."""
    cmask = (e0 + _iota(st.block_conv)) < st.d_inner
    return plgpu.load(
        r["xz"].at[pl.ds(b0, st.block_rows), pl.ds(st.x_col + e0, st.block_conv)],
        mask=rmask[:, None] & cmask[None, :],
        other=0,
    )


def _conv_x_proj_kernel(r, *, st: Static):
    b0, rmask = _rows(st)
    group = pl.program_id(0)

    def block(j, acc):
        e0 = (group * st.conv_blocks_per_program + j) * st.block_conv
        return _conv_block(r, st, b0, rmask, e0, _conv_input(r, st, b0, rmask, e0), acc)

    acc = jnp.zeros((st.block_rows, st.x_width_pad), F32)
    acc = jax.lax.fori_loop(0, st.conv_blocks_per_program, block, acc)
    _store_part(r, st, group, b0, rmask, acc)


def _conv_kernel(r, *, st: Static):
    """The conv step alone (Mamba2's, over xBC): one block of channels a program."""
    b0, rmask = _rows(st)
    e0 = pl.program_id(0) * st.block_conv
    _conv_block(r, st, b0, rmask, e0, _conv_input(r, st, b0, rmask, e0))


def _in_proj_conv_kernel(r, *, st: Static):
    """in_proj for block_conv of xz's columns (the rows' hidden times the weight's column
    block, walked down d_model), then, where the block is one of the conv's inputs, the conv
    step (and x_proj's partial, given x_proj) on it (_conv_block) straight from the registers:
    one launch where in_proj and the conv kernel were two, and no pass of x through memory
    between them.

    With norm_eps (launched as decode_add_norm_in_proj_conv), "hidden" is the previous block's
    output and the kernel starts with the residual add and RMSNorm: x = residual + hidden in
    float32, walked down d_model beside the weight. The norm's scale rsqrt(mean(x^2) + eps) is
    one number a row, so it multiplies the product after the walk: (x * weight) @ in_proj *
    scale. After the walk program j stores x's j-th block_k chunk (residual'): a store inside
    the walk (program 0's, under a condition) made the kernel 2.8x slower on one H100 (round 7
    of DESIGN.md: the walk's loads no longer overlapped, by the hypothesis)."""
    b0, rmask = _rows(st)
    j = pl.program_id(0)
    n0 = j * st.block_conv
    c = jnp.dtype(st.dtype)
    rows = pl.ds(b0, st.block_rows)
    # Columns past xz's last (Mamba2's dt block) are masked; Mamba1's xz tiles evenly.
    ragged = st.xz_width % st.block_conv != 0
    cols_ok = (n0 + _iota(st.block_conv)) < st.xz_width
    add_norm = st.norm_eps is not None

    def step(i, carry):
        acc, sumsq = carry
        k0 = i * st.block_k
        ks = pl.ds(k0, st.block_k)
        h = plgpu.load(r["hidden"].at[rows, ks], mask=rmask[:, None], other=0)
        if add_norm:
            x = _residual_add(r, rows, rmask, ks, h)
            sumsq = sumsq + jnp.sum(x * x, axis=1)
            h = (x * plgpu.load(r["norm_weight"].at[ks]).astype(F32)[None, :]).astype(c)
        tile = r["in_proj"].at[ks, pl.ds(n0, st.block_conv)]
        w = plgpu.load(tile, mask=cols_ok[None, :], other=0) if ragged else plgpu.load(tile)
        return acc + jnp.dot(h, w, preferred_element_type=F32, precision=st.precision), sumsq

    carry = (jnp.zeros((st.block_rows, st.block_conv), F32), jnp.zeros((st.block_rows,), F32))
    acc, sumsq = jax.lax.fori_loop(0, st.d_model // st.block_k, step, carry)
    if add_norm:
        acc = acc * jax.lax.rsqrt(sumsq / st.d_model + st.norm_eps)[:, None]

        @pl.when(j < st.d_model // st.block_k)
        def _():
            ks = pl.ds(j * st.block_k, st.block_k)
            h = plgpu.load(r["hidden"].at[rows, ks], mask=rmask[:, None], other=0)
            plgpu.store(
                r["residual_out"].at[rows, ks],
                _residual_add(r, rows, rmask, ks, h),
                mask=rmask[:, None],
            )

    xz = acc.astype(c)
    store_mask = rmask[:, None] & cols_ok[None, :] if ragged else rmask[:, None]
    plgpu.store(r["xz"].at[rows, pl.ds(n0, st.block_conv)], xz, mask=store_mask)

    @pl.when((n0 >= st.x_col) & (n0 < st.x_col + st.d_inner))
    def _():
        e0 = n0 - st.x_col
        if "x_proj" not in r:
            _conv_block(r, st, b0, rmask, e0, xz)
            return
        acc = jnp.zeros((st.block_rows, st.x_width_pad), F32)
        _store_part(r, st, j, b0, rmask, _conv_block(r, st, b0, rmask, e0, xz, acc))


def _residual_add(r, rows, rmask, ks, hidden_chunk):
    """residual + hidden for the rows' block_k chunk ks, in float32 (residual' and the norm's x)."""
    residual = plgpu.load(r["residual"].at[rows, ks], mask=rmask[:, None], other=0)
    return residual + hidden_chunk.astype(F32)


# Partials each step of the state kernel's sum over x_proj's partials adds (state_sums_parts).
PARTS_CHUNK = 16


def _dbc_cols(refs, rows, rmask, col0, width, cmask, num_parts):
    """(rows, width) float32 of x_proj's output at columns col0 + [0, width) (cmask: the
    columns that exist): from the summed "dbc" (b, R), or with num_parts > 0 summed here over
    the "parts" (num_parts, b, R) in chunks of PARTS_CHUNK partials."""
    cols = pl.ds(col0, width)
    if not num_parts:
        m = rmask[:, None] & cmask[None, :]
        return plgpu.load(refs["dbc"].at[rows, cols], mask=m, other=0)
    m = rmask[None, :, None] & cmask[None, None, :]

    def chunk(i, acc):
        p0 = i * PARTS_CHUNK
        pmask = (p0 + _iota(PARTS_CHUNK)) < num_parts
        tile = refs["parts"].at[pl.ds(p0, PARTS_CHUNK), rows, cols]
        return acc + jnp.sum(plgpu.load(tile, mask=pmask[:, None, None] & m, other=0), axis=0)

    acc = jnp.zeros((rmask.shape[0], width), F32)
    return jax.lax.fori_loop(0, -(-num_parts // PARTS_CHUNK), chunk, acc)


def _ssm_update_kernel(refs, *, st: Static, num_parts: int = 0):
    dtw_ref, dtb_ref = refs["dt_proj"], refs["dt_bias"]
    alog_ref, xc_ref, xz_ref = refs["A_log"], refs["xc"], refs["xz"]
    h_ref, h_out_ref, y_ref = refs["h"], refs["h_out"], refs["y"]
    b0, rmask = _rows(st)
    e0 = pl.program_id(0) * st.block_state
    c = jnp.dtype(st.dtype)
    n, r = st.d_state, st.dt_rank
    cmask = (e0 + _iota(st.block_state)) < st.d_inner
    m = rmask[:, None] & cmask[None, :]
    rows, cols = pl.ds(b0, st.block_rows), pl.ds(e0, st.block_state)

    # x_proj's output, summed over channels, rounded to c as the unfused step stores it.
    rank_mask = _iota(st.rank_pad) < r
    all_n = _iota(n) < n
    dt_low = _dbc_cols(refs, rows, rmask, 0, st.rank_pad, rank_mask, num_parts).astype(c)
    B = _dbc_cols(refs, rows, rmask, r, n, all_n, num_parts)
    C = _dbc_cols(refs, rows, rmask, r + n, n, all_n, num_parts)
    B, C = B.astype(c).astype(F32), C.astype(c).astype(F32)
    dtw = plgpu.load(
        dtw_ref.at[pl.ds(0, st.rank_pad), cols], mask=rank_mask[:, None] & cmask[None, :], other=0
    ).astype(c)
    if st.block_rows == 1:
        # One row a program (DecodeConfig.state_one_row): dt_proj as a product summed over the
        # rank, where a dot would pad the row to 16 (Triton's smallest).
        dt = jnp.sum(dt_low.astype(F32)[:, :, None] * dtw.astype(F32)[None, :, :], axis=1)
    else:
        dt = jnp.dot(dt_low, dtw, preferred_element_type=F32, precision=st.precision)
    dt = dt.astype(c).astype(F32)
    bias = plgpu.load(dtb_ref.at[cols], mask=cmask, other=0).astype(F32)
    delta = softplus(dt + bias[None, :], fast=st.fast)  # (rows, e)

    a_log = plgpu.load(alog_ref.at[cols, pl.ds(0, n)], mask=cmask[:, None], other=0).astype(F32)
    a2 = -exp2(a_log * LOG2E, fast=st.fast) * LOG2E  # A log2(e), A = -exp(A_log)
    u = plgpu.load(xc_ref.at[rows, cols], mask=m, other=0).astype(F32)
    z = plgpu.load(xz_ref.at[rows, pl.ds(st.d_inner + e0, st.block_state)], mask=m, other=0).astype(
        F32
    )

    m3 = jnp.broadcast_to(m[:, :, None], (st.block_rows, st.block_state, n))
    h_index = (rows, cols, pl.ds(0, n))
    h = plgpu.load(h_ref.at[h_index], mask=m3, other=0).astype(F32)
    decay = exp2(delta[:, :, None] * a2[None, :, :], fast=st.fast)
    h = decay * h + (delta * u)[:, :, None] * B[:, None, :]
    # Stored in the state's dtype (float32, or bfloat16: half the bytes); y reads the float32 h.
    plgpu.store(h_out_ref.at[h_index], h.astype(h_out_ref.dtype), mask=m3)

    y = jnp.sum(h * C[:, None, :], axis=2)
    if "D" in refs:
        y = y + plgpu.load(refs["D"].at[cols], mask=cmask, other=0).astype(F32)[None, :] * u
    y = y * _silu(z, st)
    plgpu.store(y_ref.at[rows, cols], y.astype(y_ref.dtype), mask=m)


def conv_x_proj(
    xz,
    conv_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    *,
    st: Static,
    num_warps: int,
    interpret: bool,
):
    """(conv_state', xc (b, e) c, parts (p, b, R) float32); conv_state is updated in place."""
    b, e = st.batch, st.d_inner
    outputs = dict(
        conv_out=jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        xc=jax.ShapeDtypeStruct((b, e), jnp.dtype(st.dtype)),
        parts=jax.ShapeDtypeStruct((st.conv_programs, b, st.x_width), F32),
    )
    return launch.call(
        _conv_x_proj_kernel,
        dict(
            xz=xz,
            conv_state=conv_state,
            conv_weight=conv_weight,
            conv_bias=conv_bias,
            x_proj=x_proj_weight,
        ),
        outputs,
        grid=(st.conv_programs, st.row_blocks),
        name="decode_conv_x_proj",
        num_warps=num_warps,
        interpret=interpret,
        aliases=dict(conv_out="conv_state"),
        st=st,
    )


def conv_step(xz, conv_state, conv_weight, conv_bias, *, st: Static, num_warps: int, interpret):
    """(conv_state', xc (b, d_inner) c): the conv step over xz's columns [x_col, x_col +
    d_inner) (d_inner here is the conv's channel count); conv_state is updated in place."""
    outputs = dict(
        conv_out=jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        xc=jax.ShapeDtypeStruct((st.batch, st.d_inner), jnp.dtype(st.dtype)),
    )
    return launch.call(
        _conv_kernel,
        dict(xz=xz, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias),
        outputs,
        grid=(-(-st.d_inner // st.block_conv), st.row_blocks),
        name="decode_conv",
        num_warps=num_warps,
        interpret=interpret,
        aliases=dict(conv_out="conv_state"),
        st=st,
    )


def in_proj_conv(
    hidden,
    in_proj_weight,
    conv_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    *,
    st: Static,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    residual=None,
    norm_weight=None,
):
    """(xz (b, xz_width) c, conv_state', xc (b, d_inner) c[, parts (d_inner / block_conv, b, R)
    float32 given x_proj_weight]) from hidden (b, d): in_proj and the conv kernel in one
    kernel, one row block (b <= block_rows, d a multiple of block_k, x_col and d_inner of
    block_conv); conv_state is updated in place.

    With st.norm_eps, residual (b, d) float32 and norm_weight (d,): hidden is the previous
    block's output, in_proj's input RMSNorm(residual + hidden) (the kernel's docstring says
    how), and residual + hidden (b, d) float32 comes first in the results."""
    b = st.batch
    outputs = dict(
        xz=jax.ShapeDtypeStruct((b, st.xz_width), jnp.dtype(st.dtype)),
        conv_out=jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        xc=jax.ShapeDtypeStruct((b, st.d_inner), jnp.dtype(st.dtype)),
    )
    if st.norm_eps is not None:
        # One program a block_k chunk of residual' (the kernel's tail).
        if -(-st.xz_width // st.block_conv) < st.d_model // st.block_k:
            raise ValueError(
                f"the add + norm needs xz_width / block_conv programs ({st.xz_width} / "
                f"{st.block_conv}) >= d_model / block_k ({st.d_model} / {st.block_k})"
            )
        outputs = dict(residual_out=jax.ShapeDtypeStruct((b, st.d_model), F32), **outputs)
    if x_proj_weight is not None:
        outputs["parts"] = jax.ShapeDtypeStruct((st.d_inner // st.block_conv, b, st.x_width), F32)
    return launch.call(
        _in_proj_conv_kernel,
        dict(
            hidden=hidden,
            residual=residual,
            norm_weight=norm_weight,
            in_proj=in_proj_weight,
            conv_state=conv_state,
            conv_weight=conv_weight,
            conv_bias=conv_bias,
            x_proj=x_proj_weight,
        ),
        outputs,
        grid=(-(-st.xz_width // st.block_conv), 1),
        name="decode_add_norm_in_proj_conv" if st.norm_eps is not None else "decode_in_proj_conv",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        aliases=dict(conv_out="conv_state"),
        st=st,
    )


def ssm_update(
    x_proj_out,
    dt_proj_weight,
    dt_bias,
    A_log,
    D,
    xc,
    xz,
    ssm_state,
    *,
    st: Static,
    num_warps: int,
    interpret: bool,
):
    """(ssm_state', y (b, e) c); ssm_state (float32 or bfloat16) is updated in place, in its
    dtype. x_proj_out: x_proj's output summed over channels (b, R) float32, or its partials
    (p, b, R) float32, which each program then sums itself (meant for one row a program:
    a program loads p x rows x R of them)."""
    b, e = st.batch, st.d_inner
    partials = x_proj_out.ndim == 3
    return launch.call(
        _ssm_update_kernel,
        dict(
            **{"parts" if partials else "dbc": x_proj_out},
            dt_proj=dt_proj_weight,
            dt_bias=dt_bias,
            A_log=A_log,
            D=D,
            xc=xc,
            xz=xz,
            h=ssm_state,
        ),
        dict(
            h_out=jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype),
            y=jax.ShapeDtypeStruct((b, e), jnp.dtype(st.dtype)),
        ),
        grid=(-(-e // st.block_state), st.row_blocks),
        name="decode_ssm_update",
        num_warps=num_warps,
        interpret=interpret,
        aliases=dict(h_out="h"),
        st=st,
        num_parts=x_proj_out.shape[0] if partials else 0,
    )
