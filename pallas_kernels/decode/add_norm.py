"""Pallas (Triton) kernel of a decode step's residual add and RMSNorm, one row per program.

Axis letters: b batch, d d_model.

    decode_add_rms_norm  residual' = residual + out (the previous block's output, in float32),
                         written in place, and hidden = RMSNorm(residual') in the compute dtype:
                         one kernel where XLA runs three (the add, the sum of squares, the
                         scaling and cast), each a launch of ~1.5 us at batch 1, and a pass over
                         the residual each at batch 128.

The arithmetic is RMSNorm's (jax_packmamba.layers.RMSNorm): x * rsqrt(mean(x^2) + eps), times
the weight, in float32, then cast.
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


def _add_norm_kernel(refs, *, st: Static):
    row = pl.program_id(0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (st.block,), 0)
    mask = cols < st.d_model
    index = (pl.ds(row, 1), pl.ds(0, st.block))
    x = plgpu.load(refs["residual"].at[index], mask=mask[None, :], other=0).astype(F32)
    if "out" in refs:
        x = x + plgpu.load(refs["out"].at[index], mask=mask[None, :], other=0).astype(F32)
        plgpu.store(refs["residual_out"].at[index], x, mask=mask[None, :])
    mean = jnp.sum(x * x, axis=1, keepdims=True) / st.d_model
    weight = plgpu.load(refs["weight"].at[pl.ds(0, st.block)], mask=mask, other=0).astype(F32)
    hidden = x * jax.lax.rsqrt(mean + st.eps) * weight[None, :]
    plgpu.store(refs["hidden"].at[index], hidden.astype(refs["hidden"].dtype), mask=mask[None, :])


def add_rms_norm(residual, out, weight, *, eps: float, dtype, interpret: bool = False):
    """(residual + out in float32, RMSNorm of it in `dtype`), in one kernel.

    Args:
      residual: (b, d) float32, the residual stream.
      out: (b, d) any float dtype (the previous block's output), or None (nothing to add: the
        first block).
      weight: (d,) the norm's weight.
      eps: the norm's epsilon.
      dtype: hidden's dtype (the compute dtype).
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
    b, d = shape
    st = Static(
        d_model=d,
        block=max(16, 1 << (d - 1).bit_length()),
        eps=float(eps),
        dtype=jnp.dtype(dtype).name,
    )
    outputs = dict(hidden=jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    if out is not None:
        outputs = dict(residual_out=jax.ShapeDtypeStruct(shape, F32), **outputs)
    results = launch.call(
        _add_norm_kernel,
        dict(residual=residual, out=out, weight=weight),
        outputs,
        grid=(b,),
        name="decode_add_rms_norm",
        num_warps=4 if st.block <= 2048 else 8,
        interpret=interpret,
        aliases=dict(residual_out="residual") if out is not None else None,
        st=st,
    )
    return (residual, results[0]) if out is None else results
