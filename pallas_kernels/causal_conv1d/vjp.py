"""custom_vjp wiring of the Pallas causal conv: argument layout, the choice between the walking
(kernel.py) and tile-parallel (kernel_tile.py) kernels, and the partial-sum reductions."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from pallas_kernels.causal_conv1d import kernel, kernel_tile
from pallas_kernels.causal_conv1d.config import TILE, TileConfig

F32 = jnp.float32
BLOCK_E = 128  # channels a program of the walking kernels: one per thread on 4 warps
NUM_WARPS = 4
CHUNK = 256  # time steps a walking program (each also re-reads w - 1 rows of halo)
KERNELS = ("walk", "tile")
# The kernels impl="pallas" runs; the other stays selectable by name (DESIGN.md compares them).
KERNEL = "walk"


def causal_conv1d_pallas(
    x,
    weight,
    bias,
    positions,
    *,
    activation,
    interpret: bool = False,
    kernel_name: str | None = None,
    chunk: int = CHUNK,
    tile: TileConfig = TILE,
    groups: tuple[int, ...] | None = None,
):
    """Same contract as jax_packmamba.ops.causal_conv1d (arguments already validated there),
    with positions (b, t) int32 = positions_from_segment_ids(segment_ids).

    kernel_name: "walk" or "tile" (None: KERNEL). `chunk` (time steps a walking program, a power
    of two) is for tests that need chunk edges in short rows; `tile` the tile kernels' blocks.
    groups: channel counts summing to x's channels: returns a tuple of the output's channel
    groups, as jnp.split would. The tile kernels write them as separate arrays (no copy) when
    every boundary is a multiple of both channel blocks; otherwise they are split after."""
    kernel_name = KERNEL if kernel_name is None else kernel_name
    if kernel_name not in KERNELS:
        raise ValueError(f"kernel_name must be one of {KERNELS}, got {kernel_name!r}")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    _, length, channels = x.shape
    width, silu = weight.shape[1], activation == "silu"
    if groups is not None:
        groups = tuple(int(g) for g in groups)
        if sum(groups) != channels or min(groups) < 1:
            raise ValueError(f"groups must be positive and sum to {channels}, got {groups}")
    split_after = groups is not None and (
        kernel_name == "walk"
        or any(
            first % block
            for first in itertools.accumulate(groups[:-1])
            for block in (tile.fwd_block_c, tile.bwd_block_c)
        )
    )
    kernel_groups = (channels,) if groups is None or split_after else groups
    cap = 1 << max(0, (length - 1).bit_length())  # the row length rounded up to a power of two
    if kernel_name == "walk":
        st = kernel.Static(
            length=length,
            channels=channels,
            width=width,
            block_e=BLOCK_E,
            chunk=min(chunk, cap),
            silu=silu,
        )
        plan = (st, st)
    else:
        common = dict(
            length=length,
            channels=channels,
            width=width,
            silu=silu,
            fast=not interpret,
            groups=kernel_groups,
        )
        fwd_t = min(tile.fwd_block_t, cap)
        bwd_chunk = min(tile.bwd_chunk, cap)
        plan = (
            kernel_tile.Static(
                block_t=fwd_t,
                block_e=tile.fwd_block_c,
                chunk=fwd_t,
                num_warps=tile.fwd_warps,
                **common,
            ),
            kernel_tile.Static(
                block_t=min(tile.bwd_block_t, bwd_chunk),
                block_e=tile.bwd_block_c,
                chunk=bwd_chunk,
                num_warps=tile.bwd_warps,
                **common,
            ),
        )
    outs = _conv_jit(plan, interpret, x, weight, bias, positions.astype(jnp.int32))
    if groups is None:
        return outs[0]
    if split_after:
        return tuple(jnp.split(outs[0], list(itertools.accumulate(groups[:-1])), axis=-1))
    return outs


def num_programs(batch: int, length: int, channels: int, chunk: int = CHUNK) -> int:
    """Programs one launch of the walking kernels runs for x (batch, length, channels)."""
    return batch * -(-length // chunk) * -(-channels // BLOCK_E)


def _kernel_params(weight, bias):
    w_t = weight.astype(F32).T  # (w, e): each tap is a coalesced row
    return w_t, None if bias is None else bias.astype(F32)


def _forward(st, interpret, *args):
    """Tuple of the output arrays (one per channel group of the tile kernels; else one)."""
    if isinstance(st, kernel_tile.Static):
        return kernel_tile.conv_fwd(*args, st=st, interpret=interpret)
    return (kernel.conv_fwd(*args, st=st, num_warps=NUM_WARPS, interpret=interpret),)


def _backward(st, interpret, x, w_t, bias, positions, gs):
    if isinstance(st, kernel_tile.Static):
        return kernel_tile.conv_bwd(x, w_t, bias, positions, gs, st=st, interpret=interpret)
    (g,) = gs
    return kernel.conv_bwd(
        x, w_t, bias, positions, g, st=st, num_warps=NUM_WARPS, interpret=interpret
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv(plan, interpret, x, weight, bias, positions):
    return _forward(plan[0], interpret, x, *_kernel_params(weight, bias), positions)


def _conv_fwd(plan, interpret, x, weight, bias, positions):
    return _conv(plan, interpret, x, weight, bias, positions), (x, weight, bias, positions)


def _conv_bwd(plan, interpret, res, gs):
    x, weight, bias, positions = res
    dx, dw, dbias = _backward(plan[1], interpret, x, *_kernel_params(weight, bias), positions, gs)
    dweight = dw.sum((0, 1)).T.astype(weight.dtype)
    dbias = None if bias is None else dbias.sum((0, 1)).astype(bias.dtype)
    return dx, dweight, dbias, None


_conv.defvjp(_conv_fwd, _conv_bwd)
# Eager callers (tests) would otherwise re-trace the kernels on every call.
_conv_jit = jax.jit(_conv, static_argnums=(0, 1))
