"""Pallas (Triton) kernel of a decode step's residual add and RMSNorm, one row per program.

Axis letters: b batch, d d_model.

    decode_add_rms_norm  residual' = residual + out (the previous block's output, in float32),
                         written in place, and hidden = RMSNorm(residual') in the compute dtype:
                         one kernel where XLA runs three (the add, the sum of squares, the
                         scaling and cast), each a launch of ~1.5 us at batch 1, and a pass over
                         the residual each at batch 128.

The arithmetic is RMSNorm's (jax_packmamba.layers.RMSNorm): x * rsqrt(mean(x^2) + eps), times
the weight, in float32, then cast.

A Mamba2 block's decode output may come with its gated norm's scale still to apply (the norm
over all of a row's channels is one number a row, so it commutes with out_proj): out is then
out_proj(v * weight) and `out_sumsq` the partial sums of v^2, and the kernel adds
out * rsqrt(sum(out_sumsq) / out_count + out_eps), saving the norm's XLA kernels (three at
batch 1) between the state update and out_proj.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    d_model: int
    block: int  # d_model padded to a power of two
    eps: float
    dtype: str  # of hidden
    out_parts: int = 0  # columns of out_sumsq (0: out is added as it is)
    out_count: int = 0  # channels of the norm whose scale out still needs
    out_eps: float = 0.0  # that norm's epsilon


def _add_norm_kernel(refs, *, st: Static):
    row = pl.program_id(0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (st.block,), 0)
    mask = cols < st.d_model
    index = (pl.ds(row, 1), pl.ds(0, st.block))
    x = plgpu.load(refs["residual"].at[index], mask=mask[None, :], other=0).astype(F32)
    if "out" in refs:
        out = plgpu.load(refs["out"].at[index], mask=mask[None, :], other=0).astype(F32)
        if st.out_parts:
            block = max(16, 1 << (st.out_parts - 1).bit_length())
            pmask = jax.lax.broadcasted_iota(jnp.int32, (block,), 0) < st.out_parts
            parts = plgpu.load(
                refs["out_sumsq"].at[pl.ds(row, 1), pl.ds(0, block)], mask=pmask[None, :], other=0
            )
            total = jnp.sum(parts, axis=1, keepdims=True)
            out = out * jax.lax.rsqrt(total / st.out_count + st.out_eps)
        x = x + out
        plgpu.store(refs["residual_out"].at[index], x, mask=mask[None, :])
    mean = jnp.sum(x * x, axis=1, keepdims=True) / st.d_model
    weight = plgpu.load(refs["weight"].at[pl.ds(0, st.block)], mask=mask, other=0).astype(F32)
    hidden = x * jax.lax.rsqrt(mean + st.eps) * weight[None, :]
    plgpu.store(refs["hidden"].at[index], hidden.astype(refs["hidden"].dtype), mask=mask[None, :])


def add_rms_norm(
    residual,
    out,
    weight,
    *,
    eps: float,
    dtype,
    out_sumsq=None,
    out_count: int = 0,
    out_eps: float = 0.0,
    interpret: bool = False,
):
    """(residual + out in float32, RMSNorm of it in `dtype`), in one kernel.

    Args:
      residual: (b, d) float32, the residual stream.
      out: (b, d) any float dtype (the previous block's output), or None (nothing to add: the
        first block).
      weight: (d,) the norm's weight.
      eps: the norm's epsilon.
      dtype: hidden's dtype (the compute dtype).
      out_sumsq: (b, P) float32 or None: out still needs a norm's scale, rsqrt(sum(out_sumsq)
        / out_count + out_eps) a row (the module docstring says when), and gets it before the
        add.
      out_count, out_eps: that norm's channel count and epsilon.
      interpret: run through the Pallas interpreter (any backend).

    Returns:
      (residual' (b, d) float32, hidden (b, d) dtype). residual' is `residual` itself when out
      is None, else written in place where the caller lets XLA donate `residual`.
    """
    shape = tuple(np.shape(residual))
    if len(shape) != 2 or jnp.result_type(residual) != F32:
        raise ValueError(
            f"residual must be (batch, d_model) float32, got shape {shape} dtype "
            f"{jnp.result_type(residual)}"
        )
    if out is not None and tuple(np.shape(out)) != shape:
        raise ValueError(f"out must have residual's shape {shape}, got {tuple(np.shape(out))}")
    if tuple(np.shape(weight)) != shape[1:]:
        raise ValueError(f"weight must have shape {shape[1:]}, got {tuple(np.shape(weight))}")
    parts = 0
    if out_sumsq is not None:
        sumsq_shape = tuple(np.shape(out_sumsq))
        if out is None or len(sumsq_shape) != 2 or sumsq_shape[0] != shape[0]:
            raise ValueError(
                f"out_sumsq must be (batch={shape[0]}, parts) beside an out, got {sumsq_shape}"
            )
        if out_count < 1:
            raise ValueError(f"out_count must be >= 1 with out_sumsq, got {out_count}")
        parts = sumsq_shape[1]
    b, d = shape
    st = Static(
        d_model=d,
        block=max(16, 1 << (d - 1).bit_length()),
        eps=float(eps),
        dtype=jnp.dtype(dtype).name,
        out_parts=parts,
        out_count=int(out_count) if parts else 0,
        out_eps=float(out_eps) if parts else 0.0,
    )
    outputs = dict(hidden=jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    if out is not None:
        outputs = dict(residual_out=jax.ShapeDtypeStruct(shape, F32), **outputs)
    results = launch.call(
        _add_norm_kernel,
        dict(residual=residual, out=out, out_sumsq=out_sumsq, weight=weight),
        outputs,
        grid=(b,),
        name="decode_add_rms_norm",
        num_warps=4 if st.block <= 2048 else 8,
        interpret=interpret,
        aliases=dict(residual_out="residual") if out is not None else None,
        st=st,
    )
    return (residual, results[0]) if out is None else results
