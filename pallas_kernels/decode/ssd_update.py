"""Pallas (Triton) kernel of one Mamba2 decode step's state update, in place.

Axis letters: b batch, h heads, p headdim, g groups, n d_state.

    decode_ssd_update  per (row and head, block of headdim channels): dt = softplus(dt + bias),
                       the state tile (p block, n) float32 read once, decayed by exp(dt A),
                       updated with dt x B, written back in place, and y = C.h + D x (times
                       silu(z) if given) from the registers: one read and one write of the
                       state, which dominates a Mamba2 step's memory traffic at batch > 1 (a
                       (h, p, n) float32 state per sequence and layer: 2.6 MB for mamba2-2.7b).

The arithmetic is jax_packmamba.ops.ssd_state_update's (float32), exp and softplus in PTX on a
GPU. The operands are flattened to rows (free reshapes of contiguous arrays) so that every load
is a 1-D or 2-D tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch
from pallas_kernels.triton_math import LOG2E, exp2, sigmoid, softplus

F32 = jnp.float32
# Storage dtypes of the state (generation's state_dtype); the arithmetic is float32 either way.
STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True, slots=True)
class Operand:
    """Where a per-row operand lies in a flat array: row b's values start at
    `ref[b * row_stride + col]` (ref: the name of the kernel's input)."""

    ref: str
    row_stride: int
    col: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    heads: int
    groups: int
    headdim: int
    d_state: int
    block_p: int  # headdim channels per program (power of two >= 16)
    block_n: int  # d_state padded to a power of two >= 16
    dt_softplus: bool
    fast: bool  # GPU: PTX approximations (triton_math); the interpreter cannot run PTX.
    # Where x (h * p), B and C (g * n each), z (h * p) and dt (h) are: separate arrays
    # (ssd_update_pallas), or the conv's and in_proj's packed outputs (mamba2_core_pallas).
    x: Operand
    B: Operand
    C: Operand
    z: Operand | None
    dt: Operand
    d_per_head: bool = False  # D (h,) rather than (h * p,)


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())


def _block_p(headdim: int) -> int:
    """The default headdim channels a program: all of them, up to 32."""
    return min(_pow2(headdim), 32)


def _ssd_update_kernel(refs, *, st: Static):
    row = pl.program_id(0)  # batch row * heads + head
    p0 = pl.program_id(1) * st.block_p
    b, head = row // st.heads, row % st.heads
    group = head // (st.heads // st.groups)
    pmask = (p0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_p,), 0)) < st.headdim
    nmask = jax.lax.broadcasted_iota(jnp.int32, (st.block_n,), 0) < st.d_state

    def at(o: Operand, offset, size):
        return refs[o.ref].at[pl.ds(b * o.row_stride + o.col + offset, size)]

    channel = head * st.headdim + p0
    dt = plgpu.load(at(st.dt, head, 1)).astype(F32)  # (1,)
    if "dt_bias" in refs:
        dt = dt + plgpu.load(refs["dt_bias"].at[pl.ds(head, 1)]).astype(F32)
    if st.dt_softplus:
        dt = softplus(dt, fast=st.fast)
    if "A_log" in refs:  # A = -exp(A_log), here rather than in an XLA kernel of its own
        a2 = -exp2(plgpu.load(refs["A_log"].at[pl.ds(head, 1)]).astype(F32) * LOG2E, fast=st.fast)
        decay = exp2(dt * a2 * LOG2E, fast=st.fast)  # (1,)
    else:
        decay = exp2(
            dt * plgpu.load(refs["A"].at[pl.ds(head, 1)]).astype(F32) * LOG2E, fast=st.fast
        )
    x = plgpu.load(at(st.x, channel, st.block_p), mask=pmask, other=0).astype(F32)
    B = plgpu.load(at(st.B, group * st.d_state, st.block_n), mask=nmask, other=0).astype(F32)
    C = plgpu.load(at(st.C, group * st.d_state, st.block_n), mask=nmask, other=0).astype(F32)

    tile = (pl.ds(row * st.headdim + p0, st.block_p), pl.ds(0, st.block_n))
    m2 = pmask[:, None] & nmask[None, :]
    h = plgpu.load(refs["state"].at[tile], mask=m2, other=0).astype(F32)
    h = decay[:, None] * h + (dt * x)[:, None] * B[None, :]
    # Stored in the state's dtype (float32, or bfloat16: half the bytes); y reads the float32 h.
    plgpu.store(refs["state_out"].at[tile], h.astype(refs["state_out"].dtype), mask=m2)

    y = jnp.sum(h * C[None, :], axis=1)
    if "D" in refs and st.d_per_head:
        y = y + x * plgpu.load(refs["D"].at[pl.ds(head, 1)]).astype(F32)
    elif "D" in refs:
        D = plgpu.load(refs["D"].at[pl.ds(head * st.headdim + p0, st.block_p)], mask=pmask, other=0)
        y = y + x * D.astype(F32)
    if st.z is not None:
        z = plgpu.load(at(st.z, channel, st.block_p), mask=pmask, other=0).astype(F32)
        y = y * (z * sigmoid(z, fast=st.fast))
    if "norm_weight" in refs:
        # The gated norm over all of a row's channels, left to the caller: this block's sum of
        # y^2 (y is 0 on masked channels), and y times the norm's weight.
        part = pl.ds(row * pl.num_programs(1) + pl.program_id(1), 1)
        plgpu.store(refs["sumsq"].at[part], jnp.sum(y * y, axis=0, keepdims=True))
        weight = plgpu.load(refs["norm_weight"].at[pl.ds(channel, st.block_p)], mask=pmask, other=0)
        y = y * weight.astype(F32)
    out = pl.ds(row * st.headdim + p0, st.block_p)
    plgpu.store(refs["y"].at[out], y.astype(refs["y"].dtype), mask=pmask)


def ssd_update_pallas(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    *,
    dt_softplus: bool = True,
    block_p: int | None = None,
    interpret: bool = False,
):
    """jax_packmamba.ops.ssd_state_update's step as one kernel: (state', y).

    Args:
      state: (b, h, p, n) float32 or bfloat16 (its storage dtype: read, updated in float32,
        stored back in that dtype), updated in place where the caller lets XLA donate it.
      x: (b, h, p), the dtype of y; z: (b, h, p) or None; dt: (b, h); A, dt_bias: (h,)
        (A = -exp(A_log)); B, C: (b, g, n); D: (h,), (h, p) or None.
      block_p: headdim channels per program (default min(headdim, 32), as a power of two).
      interpret: run through the Pallas interpreter (any backend; no PTX math).

    Returns:
      (state' (b, h, p, n) in state's dtype, y (b, h, p) in x's dtype; y from the float32
      state before rounding).
    """
    shape = lambda a: tuple(np.shape(a))  # noqa: E731
    if len(shape(state)) != 4 or jnp.result_type(state) not in STATE_DTYPES:
        raise ValueError(
            f"state must be (batch, heads, headdim, d_state) float32 or bfloat16, got shape "
            f"{shape(state)} dtype {jnp.result_type(state)}"
        )
    b, h, p, n = shape(state)
    if len(shape(B)) != 3 or shape(B)[0] != b or shape(B)[2] != n or h % shape(B)[1]:
        raise ValueError(
            f"B must be (batch={b}, groups dividing heads={h}, d_state={n}), got {shape(B)}"
        )
    g = shape(B)[1]
    expected = dict(x=(b, h, p), z=(b, h, p), dt=(b, h), A=(h,), dt_bias=(h,), C=(b, g, n))
    given = dict(x=x, z=z, dt=dt, A=A, dt_bias=dt_bias, C=C)
    for name, a in given.items():
        if a is not None and shape(a) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {shape(a)}")
    if D is not None and shape(D) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or {(h, p)}, got {shape(D)}")
    if block_p is None:
        block_p = _block_p(p)
    if block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"block_p={block_p} must be a power of two >= 16")
    st = Static(
        heads=h,
        groups=g,
        headdim=p,
        d_state=n,
        block_p=block_p,
        block_n=_pow2(n),
        dt_softplus=bool(dt_softplus),
        fast=not interpret,
        x=Operand("x", h * p),
        B=Operand("B", g * n),
        C=Operand("C", g * n),
        z=None if z is None else Operand("z", h * p),
        dt=Operand("dt", h),
    )
    flat = lambda a: None if a is None else a.reshape(-1)  # noqa: E731
    inputs = dict(x=flat(x), z=flat(z), dt=flat(dt), A=A, B=flat(B), C=flat(C))
    state_out, y = update(state, inputs, D, dt_bias, st, jnp.result_type(x), interpret)
    return state_out, y.reshape(b, h, p)


def norm_parts(heads: int, headdim: int) -> int:
    """Columns of the kernel's sums of squares (update's norm_weight): one a program of a row."""
    return heads * -(-headdim // _block_p(headdim))


def packed_static(heads, groups, headdim, d_state, conv_dim, *, fast: bool) -> Static:
    """mamba2_core_pallas's layout: x, B and C in the conv's output "xbc" (b, conv_dim), z and
    dt in in_proj's "zxbcdt" (b, e + conv_dim + h), the gate applied."""
    e = heads * headdim
    row = e + conv_dim + heads
    return Static(
        heads=heads,
        groups=groups,
        headdim=headdim,
        d_state=d_state,
        block_p=_block_p(headdim),
        block_n=_pow2(d_state),
        dt_softplus=True,
        fast=fast,
        x=Operand("xbc", conv_dim),
        B=Operand("xbc", conv_dim, e),
        C=Operand("xbc", conv_dim, e + groups * d_state),
        z=Operand("zxbcdt", row),
        dt=Operand("zxbcdt", row, e + conv_dim),
    )


def update(state, inputs, D, dt_bias, st: Static, y_dtype, interpret: bool, norm_weight=None):
    """The kernel's call: (state' (b, h, p, n), y (b, h * p) y_dtype). inputs: the arrays that
    st's operands name (flat), and A (h,) or A_log (h,). With norm_weight (h * p,): y times it,
    and a third output, (b, h * p blocks) float32 sums of y^2 over each block of channels (y
    before the weight)."""
    b, h, p, n = state.shape
    # A per-head D is read as it is: broadcasting it to (h, p) was an XLA kernel every step.
    st = dataclasses.replace(st, d_per_head=D is not None and D.ndim == 1)
    p_blocks = -(-p // st.block_p)
    outputs = dict(
        state_out=jax.ShapeDtypeStruct((b * h * p, n), jnp.result_type(state)),
        y=jax.ShapeDtypeStruct((b * h * p,), y_dtype),
    )
    if norm_weight is not None:
        outputs["sumsq"] = jax.ShapeDtypeStruct((b * h * p_blocks,), F32)
    results = launch.call(
        _ssd_update_kernel,
        dict(
            state=state.reshape(b * h * p, n),
            **inputs,
            dt_bias=dt_bias,
            D=None if D is None else D.reshape(-1),
            norm_weight=norm_weight,
        ),
        outputs,
        grid=(b * h, p_blocks),
        name="decode_ssd_update",
        num_warps=4,
        interpret=interpret,
        aliases=dict(state_out="state"),
        st=st,
    )
    state_out, y = results[0].reshape(b, h, p, n), results[1].reshape(b, h * p)
    if norm_weight is None:
        return state_out, y
    return state_out, y, results[2].reshape(b, h * p_blocks)
