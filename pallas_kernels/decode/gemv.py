"""Pallas (Triton) kernel of a decode step's skinny product: a few rows times a weight matrix.

Axis letters: b batch (rows, at most `block_rows`), k the contraction, n the output columns,
s the K splits.

    decode_gemv  per (column block, K split): the rows' (block_rows, block_k) slice of x times
                 the weight's (block_k, block_n) tile, walked down K in a loop that Triton
                 pipelines `num_stages` deep (the weight tiles are copied asynchronously while
                 the previous ones are multiplied), accumulated in float32. One K split writes
                 its block in x's dtype, rounded once as XLA's product does; several write
                 float32 partials (s, b, n) for the caller to sum.

At decode's batch sizes the product is a read of the weight: 52 MB for mamba-2.8b's in_proj,
against 5 KB of x. So the tiling's job is bytes in flight, enough programs for every SM and
whole 128-byte rows of the weight per load; `jnp.dot` with the rows padded to 16 (Triton's
minimum) costs idle tensor-core lanes and no memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class GemvConfig:
    """Static tiling of decode_gemv. block_rows is the batch padded (power of two, >= 16);
    block_k and block_n powers of two >= 16; split_k divides K into that many ranges of whole
    block_k tiles."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        for name in ("split_k", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class Static:
    batch: int
    k: int
    n: int
    block_rows: int
    block_n: int
    block_k: int
    split_k: int
    dtype: str

    @property
    def precision(self):
        # float32 operands: IEEE products (Triton's default would be TF32).
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None

    @property
    def k_steps(self) -> int:
        return self.k // (self.block_k * self.split_k)


def _gemv_kernel(r, *, st: Static):
    x_ref, w_ref, out_ref = r["x"], r["w"], r["out"]
    n0 = pl.program_id(0) * st.block_n
    split = pl.program_id(1)
    rmask = launch.iota(st.block_rows) < st.batch
    ncols = n0 + launch.iota(st.block_n)
    nmask = ncols < st.n

    def step(i, acc):
        k0 = (split * st.k_steps + i) * st.block_k
        x = launch.load(x_ref, (pl.ds(0, st.block_rows), pl.ds(k0, st.block_k)), rmask[:, None], 0)
        w = launch.load(w_ref, (pl.ds(k0, st.block_k), pl.ds(n0, st.block_n)), nmask[None, :], 0)
        return acc + jnp.dot(x, w, precision=st.precision, preferred_element_type=F32)

    acc = jax.lax.fori_loop(0, st.k_steps, step, jnp.zeros((st.block_rows, st.block_n), F32))
    index = (pl.ds(0, st.block_rows), pl.ds(n0, st.block_n))
    mask = rmask[:, None] & nmask[None, :]
    if st.split_k == 1:
        launch.store(out_ref, index, acc, mask)
    else:
        launch.store(out_ref, (split, *index), acc, mask)


def gemv(x, w, *, config: GemvConfig | None = None, interpret: bool = False):
    """x @ w for a decode step's few rows, accumulated in float32.

    Args:
      x: (b, k), at most 128 rows.
      w: (k, n), x's dtype.
      config: tiling (default GemvConfig()); K must be a multiple of block_k * split_k.
      interpret: run through the Pallas interpreter (any backend).

    Returns:
      (b, n) in x's dtype when split_k is 1 (what `x @ w` gives, up to the order of the float32
      sums); else float32 partials (split_k, b, n) whose sum over the first axis is x @ w.
    """
    cfg = config or GemvConfig()
    if jnp.ndim(x) != 2 or jnp.ndim(w) != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"x (b, k) and w (k, n) must agree, got {x.shape} and {w.shape}")
    if x.dtype != w.dtype:
        raise ValueError(f"w's dtype {w.dtype} must be x's {x.dtype}")
    b, k = x.shape
    n = w.shape[1]
    if b > 128:
        raise ValueError(f"x has {b} rows; decode_gemv takes at most 128")
    if k % (cfg.block_k * cfg.split_k):
        raise ValueError(
            f"k={k} must be a multiple of block_k * split_k = {cfg.block_k * cfg.split_k}"
        )
    st = Static(
        batch=b,
        k=k,
        n=n,
        block_rows=max(16, 1 << (b - 1).bit_length()),
        block_n=cfg.block_n,
        block_k=cfg.block_k,
        split_k=cfg.split_k,
        dtype=jnp.dtype(x.dtype).name,
    )
    shape = (b, n) if cfg.split_k == 1 else (cfg.split_k, b, n)
    (out,) = launch.call(
        _gemv_kernel,
        dict(x=x, w=w),
        dict(out=jax.ShapeDtypeStruct(shape, x.dtype if cfg.split_k == 1 else F32)),
        grid=(-(-n // cfg.block_n), cfg.split_k),
        name="decode_gemv",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        interpret=interpret,
        st=st,
    )
    return out
