"""Block sizes of the Pallas selective scan and the heuristic that picks them.

Work split: one program owns `block_d` channels (whole channels per thread, so the sum over
the state axis n and the broadcast of dt*u stay in registers) and `chunk` consecutive time
steps of one batch row. Programs are parallel over batch x channel blocks x time chunks; the chunk
boundary states are combined by a short associative scan between two kernel passes.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.launch import core_count

# Programs wanted per SM: ~16 resident one-warp programs (registers allow about that many),
# times two waves so the last wave's tail is short. Only the time split is free once block_d is
# fixed, and fewer chunks mean less combine work and smaller saved boundary states.
_PROGRAMS_PER_SM = 2 * 16


@dataclasses.dataclass(frozen=True, slots=True)
class ScanConfig:
    """Static tiling of the scan. Hashable, so it can be a static argument.

    block_d: forward channels per program (power of two); block_d / (32 * num_warps) channels
        per thread. 64 on one warp measured 1.4x faster than 32 (more independent work per
        load latency).
    num_warps: warps per program.
    chunk: time steps per program; a multiple of `ckpt`.
    ckpt: backward only: stride of the transient state checkpoints written by the gradient kernel
        (it holds chunk / ckpt states per program, 1/ckpt of a (b, t, d, n) float32 tensor in
        all, freed when the backward ends). Each step is re-advanced (ckpt/window - 1)/2 extra
        times on average: 8 measured 8-16% faster than 16 in forward+backward.
    window: backward only: steps whose states are held in registers while walking back.
    unroll: time steps per fori_loop iteration (loads of several steps in flight at once).
    bwd_block_d: block_d of the backward kernels (they hold more state per channel).
    reduce: backward sums over channels of dB_t, dC_t: "tree" (one jnp.sum per value: a warp
        shuffle tree each), "shfl" (one transposing butterfly in PTX for all 2 * d_state values
        of a step: 31 shuffles instead of 5 per value; needs bwd_block_d = 32, one warp and
        d_state <= 16, else "tree" is used) or "xor" ("shfl"'s butterfly without its selects,
        by keeping each lane's states in an order that depends on the lane: kernel_bwd.Lanes;
        needs also d_state a power of two and state_split 1, else "shfl" or "tree" is used;
        forward+backward 11% faster than "shfl" at the 1.4b step's shape, docs/log.md, run 8).
    prefetch: time loops load the next iteration's rows while computing this one.
    state_split: backward gradient kernel only: lanes over which each channel's d_state states
        are split (kernel_bwd.Lanes), so each thread carries 1/state_split of the per-state
        registers and more warps fit on an SM. Needs bwd_block_d = 32, one warp, reduce "shfl"
        (or "xor", which then means "shfl")
        and d_state a multiple of it and at most 16; otherwise 1 is used. 2 and 4 measured
        slower than 1 at the 1.4b step's shape, with or without a register cap (docs/log.md, run 5).
    grads_maxnreg: register cap of the backward gradient kernel (pallas_kernels/register_cap.py),
        None for ptxas's choice (255 at the defaults: 8 resident warps an SM).
    window_rows: backward gradient kernel only: load each window's delta and u rows with its dy
        and z rows, before the re-advance, and let the reverse steps reuse what the window's
        advance computed from them, instead of loading them again (docs/log.md, run 9: the kernel
        waits on those loads). On: forward+backward 4.30 -> 4.02 ms at the 1.4b step's shape
        on one H100 (2026-12-07, DESIGN.md), despite ptxas's 348 B of spills against 144.
    """

    block_d: int = 64
    num_warps: int = 1
    chunk: int = 128
    ckpt: int = 8
    window: int = 4
    unroll: int = 4
    bwd_block_d: int = 32
    reduce: str = "xor"
    prefetch: bool = True
    state_split: int = 1
    grads_maxnreg: int | None = None
    window_rows: bool = True

    def __post_init__(self):
        if self.reduce not in ("tree", "shfl", "xor"):
            raise ValueError(f"reduce must be 'tree', 'shfl' or 'xor', got {self.reduce!r}")
        for name in ("block_d", "chunk", "ckpt", "window", "unroll", "bwd_block_d", "state_split"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if self.chunk % self.ckpt or self.ckpt % self.window:
            raise ValueError(
                f"need window | ckpt | chunk, got {self.window=} {self.ckpt=} {self.chunk=}"
            )
        if self.ckpt % self.unroll or self.chunk % self.unroll:
            raise ValueError(f"{self.unroll=} must divide {self.ckpt=} and {self.chunk=}")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def pick_config(batch: int, length: int, d_inner: int, d_state: int) -> ScanConfig:
    """Largest time chunk that still gives ~_PROGRAMS_PER_SM programs an SM (fewer chunks: less
    combine work and smaller saved boundary states)."""
    del d_state
    base = ScanConfig()
    block_d = min(base.block_d, _next_pow2(d_inner))
    bwd_block_d = min(base.bwd_block_d, _next_pow2(d_inner))
    # The backward's gradient kernel is the longest and has the narrower blocks: size for it.
    rows = batch * -(-d_inner // bwd_block_d)
    chunk = 1024
    while chunk > base.ckpt and rows * -(-length // chunk) < _PROGRAMS_PER_SM * core_count():
        chunk //= 2
    # A chunk far longer than the sequence only walks padding.
    chunk = max(base.ckpt, min(chunk, _next_pow2(length)))
    return dataclasses.replace(base, block_d=block_d, bwd_block_d=bwd_block_d, chunk=chunk)
