"""Initial and final per-slot states around the kernels: plain, differentiable XLA.

The kernels see initial states only as two additive inputs, and give back the states entering
each chunk, h_in; everything per slot happens here, so the training path (no initial states, no
final states) never runs this file. A run of slot s that begins inside chunk c starts from
init[s]: its tokens there read 2^(cs_l) C_l . init[s] (`initial_state_outputs`, added before the
gate), and if the run reaches the chunk end, the chunk hands on 2^(cs_end) init[s] besides its
own state (`initial_state_chunk_ends`, added before state passing). A slot's final state is read
at its last token: the run's tokens in that chunk decayed to it, plus its base (the chunk's h_in
when the run entered the chunk, else init[s]) decayed to it.

Per-slot sums over tokens are one-hot contractions, (b, t, slots, g, n) float32 temporaries and
work proportional to the number of slots: fine for prefill and tests; the training step never
pays for them. The cumulative decay is recomputed here (a segmented associative scan) so that
its gradient flows through these terms too.

Axis letters as in kernel.py; s here is the segment slot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.common import segment_starts

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Glue:
    dtp: jax.Array  # (b, T_pad, h) dt' (0 in the padding)
    cs: jax.Array  # (b, T_pad, h) natural-log cumulative decay, restarting at chunk and run starts
    lo: jax.Array  # (b, T_pad) seg_lo (kernel.py): -1 where the run entered the chunk
    slot: jax.Array  # (b, T_pad) segment slot of each position (the padding continues the last)
    run: jax.Array  # (b, T_pad) run index: strictly increasing over a row's runs
    length: int
    chunk: int
    num_segments: int

    @classmethod
    def build(cls, decay, dt_softplus, segment_ids, seg_lo, num_segments, chunk, padded):
        """decay: dict(dt, A, bias) or dict(log_decay, scale) (vjp._entry)."""
        per_token = "log_decay" in decay
        if per_token:
            dtp = decay["scale"].astype(F32)
        else:
            dtp = decay["dt"].astype(F32)
            if decay["bias"] is not None:
                dtp = dtp + decay["bias"].astype(F32)
            if dt_softplus:
                dtp = jax.nn.softplus(dtp)
        batch, length, heads = dtp.shape
        dtp = jnp.pad(dtp, ((0, 0), (0, padded - length), (0, 0)))
        t = jnp.arange(padded, dtype=jnp.int32)
        if segment_ids is None:
            ids = jnp.zeros((batch, padded), jnp.int32)
            lo = jnp.broadcast_to(jnp.where(t < chunk, 0, -1), (batch, padded))
        else:
            ids = jnp.pad(
                segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)), mode="edge"
            )
            lo = seg_lo
        run = jnp.cumsum(segment_starts(ids).astype(jnp.int32), axis=1) - 1
        restart = (lo == t % chunk) | (t % chunk == 0)  # a chunk start or a run start
        if per_token:  # the padding continues the last run with no decay, as dt' = 0 does
            a = jnp.pad(decay["log_decay"].astype(F32), ((0, 0), (0, padded - length), (0, 0)))
        else:
            a = dtp * decay["A"].astype(F32)
        flags = jnp.broadcast_to(restart[..., None], a.shape)

        def combine(left, right):
            (a_l, f_l), (a_r, f_r) = left, right
            return jnp.where(f_r, a_r, a_l + a_r), f_l | f_r

        cs, _ = jax.lax.associative_scan(combine, (a, flags), axis=1)
        return cls(dtp, cs, lo, ids, run, length, chunk, num_segments)

    def onehot(self, where):
        """(b, T_pad, s) float32: position t holds slot s and `where` (b, T_pad) holds."""
        hit = self.slot[..., None] == jnp.arange(self.num_segments)
        return (hit & where[..., None]).astype(F32)


def _matmul(spec, a, b, like):
    """einsum of a per-token operand with a state, as the kernels' dots take them: in `like`'s
    dtype with float32 accumulation where that is narrower (bf16 x, B, C: the kernels cast the
    states to it too), else float32 at HIGHEST. A float32 HIGHEST contraction of every token
    ran as a SIMT GEMM, 1 ms a layer at mamba2-1.3b's 8 x 2048 (a one-layer trace:
    benchmarks/results/links_nvidia-h100.json)."""
    mm = jnp.dtype(like.dtype)
    if jnp.finfo(mm).bits >= 32:
        return jnp.einsum(spec, a.astype(F32), b.astype(F32), precision=HIGHEST)
    return jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=F32)


def _pad_rows(a, padded):
    return jnp.pad(a.astype(F32), ((0, 0), (0, padded - a.shape[1])) + ((0, 0),) * (a.ndim - 2))


def initial_state_outputs(glue: Glue, C, init):
    """(b, t, h, p) float32: 2^(cs_l) C_l . init[slot_l] where l's run began in l's chunk."""
    batch, padded = glue.lo.shape
    groups, d_state = C.shape[2:]
    _, slots, heads, headdim, _ = init.shape
    c_slot = glue.onehot(glue.lo >= 0)[..., None, None] * _pad_rows(C, padded)[:, :, None]
    init_g = init.astype(F32).reshape(batch, slots, groups, heads // groups, headdim, d_state)
    y = _matmul("btsgn,bsgkpn->btgkp", c_slot, init_g, C)
    y = y.reshape(batch, padded, heads, headdim) * jnp.exp(glue.cs)[..., None]
    return y[:, : glue.length]


def _chunk_ends(a, chunk):
    return a[:, chunk - 1 :: chunk]


def initial_state_chunk_ends(glue: Glue, init):
    """(b, c, h, p, n) float32: 2^(cs_end) init[s] for chunks whose last run (slot s) began
    inside them, else 0."""
    lo_end, slot_end = _chunk_ends(glue.lo, glue.chunk), _chunk_ends(glue.slot, glue.chunk)
    hit = (slot_end[..., None] == jnp.arange(glue.num_segments)) & (lo_end >= 0)[..., None]
    s_add = jnp.einsum("bcs,bshpn->bchpn", hit.astype(F32), init.astype(F32), precision=HIGHEST)
    return s_add * jnp.exp(_chunk_ends(glue.cs, glue.chunk))[..., None, None]


def final_states(glue: Glue, x, B, h_in, init):
    """(b, s, h, p, n) float32: the state after the last token of the last run of each slot
    (zeros for a slot that does not occur).

    Float values move between tokens, slots and chunks only through one-hot contractions, never
    gathers: a gather's gradient is a scatter-add, which XLA lowers to atomic adds on a GPU,
    summing the tokens of a slot in a different order on every run (and the other segments' bits
    with it). A dot's gradient is a dot, summed in a fixed order, and a one-hot operand adds
    exact zeros for the other slots' tokens. Integer gathers below have no gradient."""
    batch, padded = glue.lo.shape
    heads, headdim = x.shape[2:]
    groups, d_state = B.shape[2:]
    t = jnp.arange(padded)
    is_slot = glue.onehot(jnp.broadcast_to(t < glue.length, glue.lo.shape)) > 0  # (b, T_pad, s)
    last = jnp.max(jnp.where(is_slot, t[None, :, None], -1), axis=1)  # (b, s)
    present = last >= 0
    last = jnp.maximum(last, 0)

    def at_last(a):  # integer (b, T_pad) -> (b, s) at each slot's last token
        return jnp.take_along_axis(a, last, axis=1)

    # (b, T_pad, s): 1 at each present slot's last token. cs there, (b, s, h): b T_pad s h
    # multiply-adds, one nonzero term per output.
    last_hot = ((t[None, :, None] == last[:, None, :]) & present[:, None, :]).astype(F32)
    cs_last = jnp.einsum("bts,bth->bsh", last_hot, glue.cs, precision=HIGHEST)
    # A token adds to its slot's final state if it is in the slot's last run and in the chunk
    # of the slot's last token (earlier chunks of the run arrive through h_in).
    slot_c = jnp.clip(glue.slot, 0, glue.num_segments - 1)

    def per_token(a):  # integer (b, s) -> (b, T_pad) of each token's slot
        return jnp.take_along_axis(a, slot_c, axis=1)

    final_run = per_token(at_last(glue.run))
    final_chunk = per_token(last // glue.chunk)
    counts = (
        (glue.run == final_run)
        & (t[None, :] // glue.chunk == final_chunk)
        & (t < glue.length)[None, :]
        & per_token(present)
    )
    counts_hot = glue.onehot(counts)  # (b, T_pad, s)
    # Each counting token's slot's cs_last, (b, T_pad, h): b T_pad s h multiply-adds.
    cs_last_tok = jnp.einsum("bts,bsh->bth", counts_hot, cs_last, precision=HIGHEST)
    decay = jnp.exp(jnp.where(counts[..., None], cs_last_tok - glue.cs, -jnp.inf))
    xw = _pad_rows(x, padded) * (decay * glue.dtp)[..., None]  # (b, T_pad, h, p)
    b_slot = counts_hot[..., None, None] * _pad_rows(B, padded)[:, :, None]
    local = _matmul(
        "btgkp,btsgn->bsgkpn",
        xw.reshape(batch, padded, groups, heads // groups, headdim),
        b_slot,
        x,
    ).reshape(batch, glue.num_segments, heads, headdim, d_state)
    entered = at_last(glue.lo) < 0  # (b, s): the last run entered the last token's chunk
    # h_in of the last token's chunk for slots whose last run entered it, (b, s, h, p, n):
    # b s c h p n multiply-adds, one nonzero term per output (one run covers a chunk's start).
    n_chunks = h_in.shape[1]
    chunk_hot = (
        (jnp.arange(n_chunks)[None, None, :] == (last // glue.chunk)[..., None])
        & (entered & present)[..., None]
    ).astype(F32)  # (b, s, c)
    h_last = jnp.einsum("bsc,bchpn->bshpn", chunk_hot, h_in, precision=HIGHEST)
    base = jnp.where(
        entered[..., None, None, None], h_last, 0.0 if init is None else init.astype(F32)
    )
    final = local + jnp.exp(cs_last)[..., None, None] * base
    return jnp.where(present[..., None, None, None], final, 0.0)
