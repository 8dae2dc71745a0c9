"""Block sizes of the tile-parallel causal-conv kernels (kernel_tile.py; DESIGN.md, "Tile
kernels", has the reasoning behind the defaults)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class TileConfig:
    """Static tiling of the tile kernels. Hashable, so it can be a static argument.

    fwd_block_t, fwd_block_c: the (time, channel) output tile of one forward program.
    bwd_block_t, bwd_block_c: the dx tile the backward computes at a time; it recomputes the
        pre-activation at width shifts of it, so it keeps about 2 * width - 1 input tiles live
        and wants fewer elements a thread than the forward.
    bwd_chunk: time steps one backward program covers, bwd_block_t at a time (a loop): one
        dweight/dbias partial row a chunk, summed by XLA. Larger: fewer partial bytes, fewer
        programs.
    fwd_warps, bwd_warps: Triton num_warps of each kernel.
    Every field is a power of two; bwd_chunk >= bwd_block_t. Tiles are shrunk to the row length
    (rounded up to a power of two) for short rows.
    """

    fwd_block_t: int = 64
    fwd_block_c: int = 128
    fwd_warps: int = 8
    bwd_block_t: int = 32
    bwd_block_c: int = 128
    bwd_warps: int = 8
    bwd_chunk: int = 256

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"{f.name}={v!r} must be a power of two")
        if self.bwd_chunk < self.bwd_block_t:
            raise ValueError(
                f"bwd_chunk={self.bwd_chunk} must be at least bwd_block_t={self.bwd_block_t}"
            )


TILE = TileConfig()
