"""custom_vjp wiring of the Pallas row norms: flattening to rows, tiling, and the weight
gradient's partial-sum reduction."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.launch import core_count
from pallas_kernels.norm import kernel

F32 = jnp.float32
# Tiling, not yet measured (benchmarks/bench_kernels.py --norm-sweep times alternatives). A
# program holds TILE_ELEMENTS values of each array (a whole row at least), ELEMENTS_PER_WARP of
# them a warp (16 a thread): at d = 4096 one row on 8 warps, at 2048 two rows on 8.
TILE_ELEMENTS = 4096
ELEMENTS_PER_WARP = 512
# The gated norm on twice the warps (one H100, 2026-12-07, bench_kernels --norm-sweep,
# results/kernels_norm_sweep_nvidia-h100.json: fwd+bwd at 16384 x 4096 0.448 -> 0.420 ms; the
# add and stream norms were 1-2% slower at 256, so they keep 512).
GATED_ELEMENTS_PER_WARP = 256
MAX_WARPS = 16
MAX_BLOCK_ROWS = 16
BWD_PROGRAMS_PER_SM = 2  # backward programs: each walks a contiguous run of tiles
# The backward's walk loads each tile during the one before it (kernel.Static.prefetch;
# DESIGN.md: the gated backward 341 -> 251 us at 16384 x 4096 on one H100). Read per call into
# the jit's static tiling, so flipping it needs no cache clearing.
BWD_PREFETCH = True


def _static(rows, group_size, groups, eps, per_warp=None):
    block_c = 1 << max(0, (group_size - 1).bit_length())
    block_rows = max(1, min(MAX_BLOCK_ROWS, TILE_ELEMENTS // block_c))
    warps = max(1, min(MAX_WARPS, block_rows * block_c // (per_warp or ELEMENTS_PER_WARP)))
    return kernel.Static(
        rows=rows,
        group_size=group_size,
        groups=groups,
        block_rows=block_rows,
        block_c=block_c,
        eps=float(eps),
        num_warps=1 << (warps.bit_length() - 1),
        prefetch=BWD_PREFETCH,
    )


def _bwd_programs(st: kernel.Static) -> tuple[int, kernel.Static]:
    tiles = kernel.num_tiles(st)
    programs = max(1, min(tiles, BWD_PROGRAMS_PER_SM * core_count() // st.groups))
    per = -(-tiles // programs)
    programs = -(-tiles // per)  # no program left without a tile
    return programs, dataclasses.replace(st, tiles_per_program=per)


def add_rms_norm_pallas(hidden, residual, weight, *, eps, out_dtype, interpret: bool = False):
    """jax_packmamba.ops.add_rms_norm's contract (arguments validated there): (residual_out
    float32, normed out_dtype), residual_out = residual + hidden (hidden where residual is
    None), normed = RMSNorm(residual_out) * weight."""
    shape = hidden.shape
    rows, cols = int(jnp.size(hidden)) // shape[-1], shape[-1]
    st = _static(rows, cols, 1, eps)
    flat = None if residual is None else residual.reshape(rows, cols)
    res, normed = _add_norm_jit(
        st, interpret, jnp.dtype(out_dtype), hidden.reshape(rows, cols), flat, weight
    )
    return res.reshape(shape), normed.reshape(shape)


def rms_norm_pallas(x, weight, *, eps, out_dtype, interpret: bool = False):
    """RMSNorm(x) * weight in out_dtype (jax_packmamba.ops.rms_norm)."""
    shape = x.shape
    rows, cols = int(jnp.size(x)) // shape[-1], shape[-1]
    st = _static(rows, cols, 1, eps)
    return _norm_jit(st, interpret, jnp.dtype(out_dtype), x.reshape(rows, cols), weight).reshape(
        shape
    )


def gated_rms_norm_pallas(x, z, weight, *, group_size, eps, out_dtype, interpret: bool = False):
    """jax_packmamba.ops.gated_rms_norm's contract: RMSNorm of x * silu(z) over each group of
    group_size columns, times weight, in out_dtype."""
    shape = x.shape
    rows, cols = int(jnp.size(x)) // shape[-1], shape[-1]
    st = _static(rows, group_size, cols // group_size, eps, GATED_ELEMENTS_PER_WARP)
    out = _gated_jit(
        st, interpret, jnp.dtype(out_dtype), x.reshape(rows, cols), z.reshape(rows, cols), weight
    )
    return out.reshape(shape)


def _fwd(st, interpret, out_dtype, x, residual, z, weight, *, residual_out):
    return kernel.norm_fwd(
        x,
        residual,
        z,
        weight.astype(F32),
        out_dtype=out_dtype,
        residual_out=residual_out,
        st=st,
        interpret=interpret,
    )


def _bwd(st, interpret, x, z, weight, rstd, g, g_res, *, dx_dtype, dres):
    programs, st_bwd = _bwd_programs(st)
    *grads, dw = kernel.norm_bwd(
        x,
        z,
        weight.astype(F32),
        rstd,
        g,
        g_res,
        dx_dtype=dx_dtype,
        dres=dres,
        programs=programs,
        st=st_bwd,
        interpret=interpret,
    )
    return (*grads, dw.sum(0).astype(weight.dtype))


# add_rms_norm: the new residual stream and its norm. Where residual is None and hidden is
# already float32 the stream is hidden itself (nothing stored); the backward adds the stream's
# own cotangent into the norm's input gradient in the same pass.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _add_norm(st, interpret, out_dtype, hidden, residual, weight):
    return _add_norm_fwd(st, interpret, out_dtype, hidden, residual, weight)[0]


def _add_norm_fwd(st, interpret, out_dtype, hidden, residual, weight):
    write = residual is not None or hidden.dtype != F32
    normed, rstd, *stream = _fwd(
        st, interpret, out_dtype, hidden, residual, None, weight, residual_out=write
    )
    stream = stream[0] if write else hidden
    # hidden itself is saved only for its dtype (a zero-size slice, nothing kept alive).
    saved = (stream, rstd, weight, hidden[:0], None if residual is None else residual[:0])
    return (stream, normed), saved


def _add_norm_bwd(st, interpret, out_dtype, saved, cts):
    stream, rstd, weight, hidden_like, residual_like = saved
    g_stream, g = cts
    dx_dtype = hidden_like.dtype
    both = residual_like is not None and dx_dtype != F32
    dx, *rest = _bwd(
        st, interpret, stream, None, weight, rstd, g, g_stream, dx_dtype=dx_dtype, dres=both
    )
    if residual_like is None:
        return dx, None, rest[0]
    dres, dw = (rest[0], rest[1]) if both else (dx, rest[0])
    return dx, dres.astype(residual_like.dtype), dw


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)
_add_norm_jit = jax.jit(_add_norm, static_argnums=(0, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _norm(st, interpret, out_dtype, x, weight):
    return _norm_fwd(st, interpret, out_dtype, x, weight)[0]


def _norm_fwd(st, interpret, out_dtype, x, weight):
    normed, rstd = _fwd(st, interpret, out_dtype, x, None, None, weight, residual_out=False)
    return normed, (x, rstd, weight)


def _norm_bwd(st, interpret, out_dtype, saved, g):
    x, rstd, weight = saved
    return tuple(_bwd(st, interpret, x, None, weight, rstd, g, None, dx_dtype=x.dtype, dres=False))


_norm.defvjp(_norm_fwd, _norm_bwd)
_norm_jit = jax.jit(_norm, static_argnums=(0, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gated(st, interpret, out_dtype, x, z, weight):
    return _gated_fwd(st, interpret, out_dtype, x, z, weight)[0]


def _gated_fwd(st, interpret, out_dtype, x, z, weight):
    out, rstd = _fwd(st, interpret, out_dtype, x, None, z, weight, residual_out=False)
    return out, (x, z, rstd, weight)


def _gated_bwd(st, interpret, out_dtype, saved, g):
    x, z, rstd, weight = saved
    return tuple(_bwd(st, interpret, x, z, weight, rstd, g, None, dx_dtype=x.dtype, dres=False))


_gated.defvjp(_gated_fwd, _gated_bwd)
_gated_jit = jax.jit(_gated, static_argnums=(0, 1, 2))
