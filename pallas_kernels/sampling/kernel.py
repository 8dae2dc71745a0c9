"""The top-k / top-p cut's key search in one kernel (jax_packmamba.sampling's `_bisect_cut`).

Per row (one program), the smallest int32 key m in [lo, hi] with sum(weights[keys > m]) <
bound, given that hi has it: the search of sampling._smallest_key_under, whose arithmetic this
follows step for step. Each pass tries the 7 thresholds that split [lo, hi] in 8, summing the
weights above each in one walk over the row's tiles, and keeps the part where the sum first
falls under the bound; 11 passes narrow any int32 range to one key. Without weights the sums
are counts (top-k's k-th largest) and only the keys are read.

Why (a hypothesis, untimed): XLA runs each of the 22 passes a step (two searches) as its own
reduction over (rows, vocabulary, 7), the 7 thresholds minor, which its reduction emitter
serves poorly, plus the launches between them. Here each search is one launch: a program a
row walks the row's tiles once a pass (re-read from L2: 200 KB of keys, and as much of
weights, at the 50k vocabulary), its lanes summing their own columns across tiles (a
(8, block_v) accumulator) so that the block-wide sums come once a pass, with the tile loads
pipelined (num_stages). Predicted at batch 32: ~0.1-0.2 ms a step for both searches, against
the sort's 0.31 ms (one H100, pallas_kernels/decode/DESIGN.md, round 7) and the XLA search's
untimed figure; a row's walk is serial, so a batch under the SM count leaves SMs idle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import launch

WAYS, PASSES = 8, 11  # sampling._WAYS, _PASSES
LOG2_WAYS = WAYS.bit_length() - 1
U32 = jnp.uint32


def _thresholds(lo, hi):
    """(8,) int32: lo + floor(j (hi - lo) / 8) for j = 1..8 (the 8th is hi), in uint32 parts
    as sampling._smallest_key_under computes them (hi - lo wraps past 2^31; its bits as
    uint32 do not, and no product passes 2^32)."""
    j = (launch.iota(WAYS) + 1).astype(U32)
    width = jax.lax.bitcast_convert_type(hi - lo, U32)
    q, r = jax.lax.shift_right_logical(width, U32(LOG2_WAYS)), width & U32(WAYS - 1)
    offsets = q * j + jax.lax.shift_right_logical(r * j, U32(LOG2_WAYS))
    return lo + jax.lax.bitcast_convert_type(offsets, jnp.int32)


def _pick(values, index):
    """values[index] of an (8,) vector, index traced."""
    return jnp.sum(jnp.where(launch.iota(WAYS) == index, values, 0))


def _search_kernel(r, *, vocab: int, block_v: int):
    row = pl.program_id(0)
    weighted = "weights" in r
    bound = launch.load(r["bound"], (row, 0))
    tiles = -(-vocab // block_v)

    def weights_above(t):
        # Each lane sums its own columns across the tiles; the block-wide sums come once a pass.
        def tile(i, acc):
            cols = i * block_v + launch.iota(block_v)
            ok = cols < vocab
            idx = (row, pl.ds(i * block_v, block_v))
            keys = launch.load(r["keys"], idx, mask=ok, other=0)
            above = (keys[None, :] > t[:, None]) & ok[None, :]
            if weighted:
                w = launch.load(r["weights"], idx, mask=ok, other=0.0)
                return acc + jnp.where(above, w[None, :], 0.0)
            return acc + above.astype(jnp.float32)

        acc = jnp.zeros((WAYS, block_v), jnp.float32)
        return jnp.sum(jax.lax.fori_loop(0, tiles, tile, acc), axis=1)

    def one_pass(_, bounds):
        lo, hi = bounds
        t = _thresholds(lo, hi)
        # The 8th threshold is hi itself, which has the property: not counted.
        tried = launch.iota(WAYS) < WAYS - 1
        under = jnp.sum((tried & (weights_above(t) < bound)).astype(jnp.int32))
        first = (WAYS - 1) - under  # the first threshold under the bound (7: none)
        t_first = _pick(t, jnp.minimum(first, WAYS - 2))
        t_before = _pick(t, jnp.maximum(first - 1, 0))
        return jnp.where(first > 0, t_before + 1, lo), jnp.where(under > 0, t_first, hi)

    lo, hi = launch.load(r["lo"], (row, 0)), launch.load(r["hi"], (row, 0))
    _, hi = jax.lax.fori_loop(0, PASSES, one_pass, (lo, hi))
    launch.store(r["out"], (row, 0), hi)


def smallest_key_under(
    keys,
    weights,
    bound,
    lo,
    hi,
    *,
    block_v: int = 1024,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool,
):
    """(b, 1) int32: sampling._smallest_key_under's search, one program a row. keys (b, v)
    int32; weights (b, v) float32, or None to count keys; bound (b, 1) or one value for all
    rows, float32; lo, hi (b, 1) int32."""
    if keys.ndim != 2 or keys.dtype != jnp.int32:
        raise ValueError(f"keys must be (rows, vocabulary) int32, got {keys.shape} {keys.dtype}")
    b, v = keys.shape
    if weights is not None and weights.shape != keys.shape:
        raise ValueError(f"weights must have keys' shape {keys.shape}, got {weights.shape}")
    for name, a in (("lo", lo), ("hi", hi)):
        if a.shape != (b, 1):
            raise ValueError(f"{name} must be ({b}, 1), got {a.shape}")
    bound = jnp.broadcast_to(jnp.asarray(bound, jnp.float32), (b, 1))
    (out,) = launch.call(
        _search_kernel,
        dict(
            keys=keys,
            weights=weights,
            bound=bound,
            lo=lo.astype(jnp.int32),
            hi=hi.astype(jnp.int32),
        ),
        dict(out=jax.ShapeDtypeStruct((b, 1), jnp.int32)),
        grid=(b,),
        name="sampling_key_search",
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        vocab=v,
        block_v=block_v,
    )
    return out
