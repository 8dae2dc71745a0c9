"""custom_vjp wiring of the Pallas causal conv: argument layout, the choice between the walking
(kernel.py) and tile-parallel (kernel_tile.py) kernels, and the partial-sum reductions."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from pallas_kernels.causal_conv1d import kernel, kernel_tile
from pallas_kernels.causal_conv1d.config import TILE, TileConfig
from pallas_kernels.common import conv_prefix, split_prefix_grad

F32 = jnp.float32
BLOCK_E = 128  # channels a program of the walking kernels: one per thread on 4 warps
NUM_WARPS = 4
CHUNK = 256  # time steps a walking program (each also re-reads w - 1 rows of halo)
# Time steps the walking backward loads at once (kernel.Static.bwd_unroll; DESIGN.md, "Loads
# ahead"; 1: one step a loop iteration). The walk is latency-bound (DESIGN.md), so 4 rows'
# loads are put in flight together; the gradients are bit-identical for every value.
BWD_UNROLL = 4
# Whether the walking backward software-pipelines its blocks (kernel.Static.bwd_pipeline: the
# loop carries the next block's loads, issued before this block's arithmetic; DESIGN.md, "Loads
# ahead"): one H100, 2026-12-07, U = 4's backward kernel 276.3 -> 256.9 us at 8 x 2048 x 4096
# (Mamba1-1.4b's conv), 334.9 -> 333.8 us at mamba2-1.3b's three groups. The gradients are
# bit-identical either way.
BWD_PIPELINE = True
# "tile_walk": the tile forward (twice the walking one's speed at mamba2-1.3b's shape, and no
# split copies) with the walking backward (the faster backward): DESIGN.md, "Selecting".
KERNELS = ("walk", "tile", "tile_walk")
# The kernels impl="pallas" runs (fastest forward + backward on one H100, bench_conv); the
# others stay selectable by name (DESIGN.md compares them).
KERNEL = "tile_walk"


def causal_conv1d_pallas(
    x,
    weight,
    bias,
    positions,
    *,
    activation,
    prefix=None,
    linked=None,
    interpret: bool = False,
    kernel_name: str | None = None,
    chunk: int = CHUNK,
    tile: TileConfig = TILE,
    groups: tuple[int, ...] | None = None,
    bwd_unroll: int | None = None,
    bwd_pipeline: bool | None = None,
):
    """Same contract as jax_packmamba.ops.causal_conv1d (arguments already validated there),
    with positions (b, t) int32 = positions_from_segment_ids(segment_ids).

    prefix: optional (b, w - 1, e), any float dtype (read as float32): x at t = -(w-1) .. -1,
    read by tap k at t where t - lag < 0 and positions[t] >= lag (a run that began before t = 0
    has positions offset accordingly); its gradient comes back in prefix's dtype. linked:
    optional (b, w - 1) bool, with prefix: where True, row b's prefix is row b - 1's last w - 1
    inputs instead (conv_prefix; False in row 0; needs t >= w - 1), their gradient going into
    dx (the backward kernel adds it to those rows), none to `prefix` there.

    kernel_name: "walk", "tile" or "tile_walk" (tile forward, walking backward; None: KERNEL). `chunk` (time steps a walking program, a power
    of two) is for tests that need chunk edges in short rows; `tile` the tile kernels' blocks.
    groups: channel counts summing to x's channels: returns a tuple of the output's channel
    groups, as jnp.split would. The tile kernels write them as separate arrays (no copy) when
    every boundary is a multiple of both channel blocks; otherwise they are split after. The
    walking backward (tile_walk) reads the groups' cotangents as they come where every boundary
    is also a multiple of BLOCK_E, and joins them first otherwise.
    bwd_unroll: time steps the walking backward loads at once, a power of two (None:
    BWD_UNROLL); the results are bit-identical for every value. bwd_pipeline: whether the
    walking backward loads the next block of steps while computing this one (None:
    BWD_PIPELINE); bit-identical either way."""
    kernel_name = KERNEL if kernel_name is None else kernel_name
    if kernel_name not in KERNELS:
        raise ValueError(f"kernel_name must be one of {KERNELS}, got {kernel_name!r}")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    bwd_unroll = BWD_UNROLL if bwd_unroll is None else bwd_unroll
    if not isinstance(bwd_unroll, int) or bwd_unroll < 1 or bwd_unroll & (bwd_unroll - 1):
        raise ValueError(f"bwd_unroll must be a positive power of two, got {bwd_unroll!r}")
    bwd_pipeline = BWD_PIPELINE if bwd_pipeline is None else bwd_pipeline
    if not isinstance(bwd_pipeline, bool):
        raise ValueError(f"bwd_pipeline must be a bool, got {bwd_pipeline!r}")
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
    walk = kernel.Static(
        length=length,
        channels=channels,
        width=width,
        block_e=BLOCK_E,
        chunk=min(chunk, cap),
        silu=silu,
        bwd_unroll=bwd_unroll,
        bwd_pipeline=bwd_pipeline,
    )
    if kernel_name == "walk":
        plan = (walk, walk)
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
        tile_fwd = kernel_tile.Static(
            block_t=fwd_t,
            block_e=tile.fwd_block_c,
            chunk=fwd_t,
            num_warps=tile.fwd_warps,
            **common,
        )
        tile_bwd = kernel_tile.Static(
            block_t=min(tile.bwd_block_t, bwd_chunk),
            block_e=tile.bwd_block_c,
            chunk=bwd_chunk,
            num_warps=tile.bwd_warps,
            **common,
        )
        plan = (tile_fwd, walk if kernel_name == "tile_walk" else tile_bwd)
    want = (x.shape[0], width - 1, channels)
    if prefix is not None and tuple(prefix.shape) != want:
        raise ValueError(
            f"prefix must be (batch, width - 1, channels) = {want}, got {prefix.shape}"
        )
    if linked is not None and tuple(linked.shape) != want[:2]:
        raise ValueError(f"linked must be (batch, width - 1) = {want[:2]}, got {linked.shape}")
    if prefix is not None and width == 1:  # no tap reaches back
        prefix = linked = None
    if linked is not None and (prefix is None or length < width - 1):
        raise ValueError(f"linked needs a prefix and rows of at least {width - 1} steps")
    outs = _conv_jit(plan, interpret, x, weight, bias, positions.astype(jnp.int32), prefix, linked)
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


def _backward(st, interpret, x, w_t, bias, positions, gs, prefix, dx_tail):
    if isinstance(st, kernel_tile.Static):
        return kernel_tile.conv_bwd(
            x, w_t, bias, positions, gs, prefix, dx_tail, st=st, interpret=interpret
        )
    # The walking backward reads the groups' cotangents (tile_walk) where a program's BLOCK_E
    # channels lie in one group: every boundary a multiple of BLOCK_E (Mamba2's x, B and C at
    # d_inner and d_state multiples of 128). Otherwise (the tile forward's blocks can be
    # smaller) they are joined first: one full-size XLA copy.
    if any(first % st.block_e for first in itertools.accumulate(g.shape[-1] for g in gs[:-1])):
        gs = (jnp.concatenate(gs, axis=-1),)
    return kernel.conv_bwd(
        x,
        w_t,
        bias,
        positions,
        gs,
        prefix,
        dx_tail,
        st=st,
        num_warps=NUM_WARPS,
        interpret=interpret,
    )


def prefix_grad(x, w_t, bias, positions, prefix, gs, silu: bool):
    """(b, w - 1, e) float32: the gradient of the prefix (float32, conv_prefix's) from the
    cotangents gs of the outputs' channel groups. Only outputs t < w - 1 read the prefix, so
    this is XLA work on the rows' first w - 1 steps, computed before the backward kernel, which
    adds a linked prefix's share into the previous row's dx."""
    width, length = w_t.shape[0], x.shape[1]
    k, n = width - 1, min(width - 1, length)

    def head(a, fill=0):  # a's first k steps, padded past the row's end
        return jnp.pad(
            a[:, :n], [(0, 0), (0, k - n)] + [(0, 0)] * (a.ndim - 2), constant_values=fill
        )

    g = head(jnp.concatenate([g[:, :n] for g in gs], axis=-1) if len(gs) > 1 else gs[0])
    g, position = g.astype(F32), head(positions, fill=-1)
    ext = jnp.concatenate([prefix, head(x).astype(F32)], axis=1)  # ext[:, i] = x[i - k]
    reads = [(position >= k - j)[..., None] for j in range(width)]  # tap j at t reads ext[t + j]
    if silu:
        pre = 0.0 if bias is None else bias
        for j in range(width):
            pre = pre + jnp.where(reads[j], ext[:, j : j + k], 0.0) * w_t[j]
        sig = jax.nn.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    d_prefix = jnp.zeros_like(prefix)
    for j in range(width):  # ext[t + j] is the prefix's row t + j where t < k - j
        sent = jnp.where(reads[j], g, 0.0)[:, : k - j] * w_t[j]
        d_prefix = d_prefix + jnp.pad(sent, [(0, 0), (j, 0), (0, 0)])
    return d_prefix


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv(plan, interpret, x, weight, bias, positions, prefix, linked):
    prefix = None if prefix is None else conv_prefix(x, prefix, linked)
    return _forward(plan[0], interpret, x, *_kernel_params(weight, bias), positions, prefix)


def _conv_fwd(plan, interpret, x, weight, bias, positions, prefix, linked):
    out = _conv(plan, interpret, x, weight, bias, positions, prefix, linked)
    return out, (x, weight, bias, positions, prefix, linked)


def _conv_bwd(plan, interpret, res, gs):
    x, weight, bias, positions, given, linked = res
    w_t, bias_f = _kernel_params(weight, bias)
    prefix = d_given = dx_tail = None
    if given is not None:
        prefix = conv_prefix(x, given, linked)
        d_prefix = prefix_grad(x, w_t, bias_f, positions, prefix, gs, plan[1].silu)
        d_given, dx_tail = split_prefix_grad(d_prefix, linked)
        d_given = d_given.astype(given.dtype)
    dx, dw, dbias = _backward(plan[1], interpret, x, w_t, bias_f, positions, gs, prefix, dx_tail)
    dweight = dw.sum((0, 1)).T.astype(weight.dtype)
    dbias = None if bias is None else dbias.sum((0, 1)).astype(bias.dtype)
    return dx, dweight, dbias, None, d_given, None


_conv.defvjp(_conv_fwd, _conv_bwd)
# Eager callers (tests) would otherwise re-trace the kernels on every call.
_conv_jit = jax.jit(_conv, static_argnums=(0, 1))
