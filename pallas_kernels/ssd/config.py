"""Tiling of the Pallas SSD kernels and the heuristic that picks it.

Work split (DESIGN.md has the why): every matmul kernel owns one (batch row, chunk) pair and
either one head (chunk scan, dx, chunk states) or one group and a share of its heads (dCB, dB,
dC: the sums over the heads of a group stay inside a program). Chunks are independent; the only
sequential work is the state passing across chunks, parallel over batch x heads x state elements.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.launch import core_count

# Programs wanted per kernel and SM: ~4 resident 4-warp programs, so that the tail of the last
# wave is short. Only the head splits are free once the tiles are fixed.
_PROGRAMS_PER_SM = 4

CB_DTYPES = ("input", "float32")
STATE_PASSINGS = ("pallas", "xla")
CHUNK_SCAN_BACKENDS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True, slots=True)
class SSDConfig:
    """Static tiling of the SSD kernels. Hashable, so it can be a static argument.

    chunk: tokens per chunk (a power of two >= 16); None takes the op's chunk_size. The result
        does not depend on it beyond rounding; it sets the balance between the intra-chunk
        (chunk^2 per token) and the state (d_state x headdim per chunk) work.
    block_l: rows of the output tile of the chunk scan, dx, dC and dCB kernels (a power of two
        <= chunk, >= 16: Triton's dot needs every side >= 16).
    block_s: rows of the tiles those kernels loop over (the other side of each chunk x chunk
        tile); block_l must be a multiple of it.
    block_k: tokens per step of the chunk-state kernels ((headdim, block_k) @ (block_k, d_state)).
    block_state: state elements (of headdim * d_state) per state-passing program.
    block_heads: heads per program of the two cumulative-sum kernels (>= 16: they are dots).
    dcb_head_splits: programs that share the heads of one group in the dCB kernel; each writes a
        partial dCB, summed by XLA (more programs, more partial traffic).
    dbc_head_splits: the same for the dB and dC kernels' per-head state terms.
    num_warps, num_stages: Triton launch parameters of the matmul kernels.
    cb_dtype: "input" stores C B^T in x's dtype (the dot that reads it rounds to that dtype
        anyway), "float32" keeps it exact.
    state_passing: "pallas" (one sequential kernel over chunks, forward and reverse) or "xla"
        (the same loop as a lax.scan over chunks, every row at once).
    chunk_scan_backend: the forward chunk-scan kernel: "triton" (kernel.py) or "mosaic"
        (chunk_scan_mgpu.py: Pallas on Mosaic GPU, wgmma and TMA; bfloat16/float16 inputs,
        headdim, d_state and chunk multiples of 64; its row blocks are 64, whatever block_l).
    """

    chunk: int | None = None
    block_l: int = 64
    block_s: int = 64
    block_k: int = 64
    block_state: int = 1024
    block_heads: int = 16
    dcb_head_splits: int = 1
    dbc_head_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    cb_dtype: str = "input"
    state_passing: str = "pallas"
    chunk_scan_backend: str = "triton"

    def __post_init__(self):
        for name in ("block_l", "block_s", "block_k", "block_state", "block_heads"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.chunk is not None and (self.chunk < 16 or self.chunk & (self.chunk - 1)):
            raise ValueError(f"chunk={self.chunk} must be a power of two >= 16")
        if self.block_l % self.block_s:
            raise ValueError(f"block_l={self.block_l} must be a multiple of block_s={self.block_s}")
        for name in ("dcb_head_splits", "dbc_head_splits", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.cb_dtype not in CB_DTYPES:
            raise ValueError(f"cb_dtype must be one of {CB_DTYPES}, got {self.cb_dtype!r}")
        if self.state_passing not in STATE_PASSINGS:
            raise ValueError(
                f"state_passing must be one of {STATE_PASSINGS}, got {self.state_passing!r}"
            )
        if self.chunk_scan_backend not in CHUNK_SCAN_BACKENDS:
            raise ValueError(
                f"chunk_scan_backend must be one of {CHUNK_SCAN_BACKENDS}, got "
                f"{self.chunk_scan_backend!r}"
            )


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def effective_chunk(cfg: SSDConfig, chunk_size: int, length: int) -> int:
    """The chunk the kernels use: the config's (else chunk_size, rounded up to a power of two),
    no longer than the sequence needs (a short sequence would only walk padding)."""
    chunk = cfg.chunk if cfg.chunk is not None else next_pow2(max(16, chunk_size))
    return max(16, min(chunk, next_pow2(length)))


def fit_blocks(cfg: SSDConfig, chunk: int) -> SSDConfig:
    """cfg with its row blocks no larger than the chunk."""
    block_s = min(cfg.block_s, chunk)
    return dataclasses.replace(
        cfg,
        chunk=chunk,
        block_l=max(block_s, min(cfg.block_l, chunk)),
        block_s=block_s,
        block_k=min(cfg.block_k, chunk),
    )


def _splits(programs_per_split: int, heads_per_group: int) -> int:
    """Fewest head splits (a divisor of heads_per_group) that give _PROGRAMS_PER_SM programs
    an SM."""
    target = _PROGRAMS_PER_SM * core_count()
    split = 1
    while split < heads_per_group and programs_per_split * split < target:
        split *= 2
    while heads_per_group % split:
        split //= 2
    return max(1, split)


def pick_config(
    batch: int,
    length: int,
    heads: int,
    groups: int,
    chunk_size: int = 256,
    base: SSDConfig | None = None,
) -> SSDConfig:
    """`base` (default SSDConfig()) with its chunk and blocks fitted to the sequence and the head
    splits of the group-summing kernels chosen for occupancy."""
    base = base or SSDConfig()
    chunk = effective_chunk(base, chunk_size, length)
    cfg = fit_blocks(base, chunk)
    n_chunks = -(-length // chunk)
    per_group = heads // groups
    row_blocks = chunk // cfg.block_l
    tiles = row_blocks * (chunk // cfg.block_s)
    dcb = _splits(batch * n_chunks * groups * tiles, per_group)
    dbc = _splits(batch * n_chunks * groups * row_blocks, per_group)
    return dataclasses.replace(cfg, dcb_head_splits=dcb, dbc_head_splits=dbc)
