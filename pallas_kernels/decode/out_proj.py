"""Pallas (Triton) kernel of a decode step's out_proj at large batch: K-split partial products.

Axis letters: b batch, e the product's input width (d_inner), d its output width (d_model),
s K splits.

    decode_out_proj_parts  per (block of d's columns, K split, row block): the rows' y times
                           the weight's (e / s, block_n) slice, walked down e in block_k tiles:
                           one float32 partial (s, b, d) a split, summed after (XLA, one small
                           reduction) and rounded to the compute dtype, as a bf16 product's
                           output is.

Why: at decode's large batches (64-128 rows) out_proj is a read of its weight (26 MB at
mamba-2.8b and mamba2-2.7b, 5120 x 2560 bf16), but the GEMM libraries tile it for arithmetic:
on one H100 at batch 128 mamba2-2.7b's ran as cuBLAS kernels of 17.2-17.5 us (plus a 3.2 us
split-K reduction in one of two runs) against 7.8 us at the weight's bytes
(results/generate_profile_round6_nvidia-h100.txt). Here every program holds all rows of its row
block, so y (1.3 MB at 128 rows) is read from L2 once a column block and split, the weight from
DRAM once, and 40 column blocks times 4 splits make 160 programs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import launch

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    batch: int
    k: int  # the product's input width (e)
    n: int  # its output width (d)
    splits: int
    block_rows: int
    block_n: int
    block_k: int
    dtype: str

    @property
    def precision(self):
        # float32 operands: IEEE products, as the other decode kernels' (Triton's default is TF32).
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


def _out_proj_parts_kernel(r, *, st: Static):
    j, s, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b0 = i * st.block_rows
    rows = pl.ds(b0, st.block_rows)
    rmask = (b0 + jax.lax.broadcasted_iota(jnp.int32, (st.block_rows,), 0)) < st.batch
    cols = pl.ds(j * st.block_n, st.block_n)
    k_split = st.k // st.splits
    k_first = s * k_split

    def step(t, acc):
        ks = pl.ds(k_first + t * st.block_k, st.block_k)
        y = plgpu.load(r["y"].at[rows, ks], mask=rmask[:, None], other=0)
        w = plgpu.load(r["weight"].at[ks, cols])
        return acc + jnp.dot(y, w, preferred_element_type=F32, precision=st.precision)

    acc = jnp.zeros((st.block_rows, st.block_n), F32)
    acc = jax.lax.fori_loop(0, k_split // st.block_k, step, acc)
    plgpu.store(r["parts"].at[s, rows, cols], acc, mask=rmask[:, None])


def out_proj_parts(y, weight, *, st: Static, num_warps: int, num_stages: int, interpret: bool):
    """(splits, b, n) float32 partial products of y (b, k) and weight (k, n); k a multiple of
    splits * block_k, n of block_n."""
    return launch.call(
        _out_proj_parts_kernel,
        dict(y=y, weight=weight),
        dict(parts=jax.ShapeDtypeStruct((st.splits, st.batch, st.n), F32)),
        grid=(st.n // st.block_n, st.splits, -(-st.batch // st.block_rows)),
        name="decode_out_proj_parts",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        st=st,
    )[0]
