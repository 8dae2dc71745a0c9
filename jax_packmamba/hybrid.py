"""The blocks a hybrid model (HybridConfig: Bamba, Nemotron-H) adds to the Mamba2 mixer:
segment-aware causal self-attention (GQA, optional partial RoPE) and an MLP. model.py's Block
and LM run them.

Axis letters: b batch, t time, d d_model, h query heads, k key/value heads, c head dim,
s segment slot, T the KV cache's length, f d_ff.

Both follow the mixers' one call, `block(hidden, segment_ids=None, cache=None, *,
num_segments=None, decode_impl=...) -> (out, cache)`: training (returns None), packed prefill
(`num_segments=S`: attention returns each segment's KVCache) and decode (one token (b, d) with a
cache). The MLP is position-wise and keeps no cache (always None).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import HybridConfig
from jax_packmamba.layers import (
    MIXER_CORE,
    OUT_PROJ_INPUT,
    PROJECTION,
    saved,
    torch_linear_init,
)
from jax_packmamba.ops.attention import apply_rope, attention
from jax_packmamba.ops.segments import positions_from_segment_ids, segment_starts


@dataclasses.dataclass(frozen=True, slots=True)
class BlockConfig:
    """One block of a hybrid: its kind (a HybridConfig.layers letter) and the model's config.
    Block reads d_model, rms_norm_eps and compute_dtype from it."""

    kind: str
    hybrid: HybridConfig

    @property
    def d_model(self) -> int:
        return self.hybrid.d_model

    @property
    def rms_norm_eps(self) -> float:
        return self.hybrid.rms_norm_eps

    @property
    def compute_dtype(self):
        return self.hybrid.compute_dtype


class KVCache(NamedTuple):
    """Attention's cache: k, v (..., T, k, c) in the compute dtype, token j of the sequence at
    index j (zeros past `length`); length (...) int32, the tokens held (the next one's position).
    A prefill returns T = its row length; generation pads T for the tokens it will add."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


def pad_kv_cache(cache: KVCache, extra: int) -> KVCache:
    """`cache` with room for `extra` more tokens (T + extra)."""
    pad = [(0, 0)] * (cache.k.ndim - 3) + [(0, extra), (0, 0), (0, 0)]
    return KVCache(jnp.pad(cache.k, pad), jnp.pad(cache.v, pad), cache.length)


def _linear(d_in, d_out, bias, config: HybridConfig, rngs, scale=1.0):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=torch_linear_init(scale),
        dtype=config.compute_dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _out_scale(config: HybridConfig) -> float:
    # GPT-2-style rescaling of each projection into the residual stream, as the Mamba2 mixer.
    return 1.0 / math.sqrt(len(config.blocks)) if config.rescale_prenorm_residual else 1.0


class AttentionMixer(nnx.Module):
    """q, k, v projections -> RoPE on the first rotary_dim channels at each token's position in
    its segment -> segment-aware causal GQA attention (jp.attention) -> o_proj."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, k, c = (
            config.d_model,
            config.num_heads,
            config.num_kv_heads,
            config.attention_head_dim,
        )
        bias = config.attention_bias
        self.q_proj = _linear(d, h * c, bias, config, rngs)
        self.k_proj = _linear(d, k * c, bias, config, rngs)
        self.v_proj = _linear(d, k * c, bias, config, rngs)
        self.o_proj = _linear(h * c, d, bias, config, rngs, _out_scale(config))

    def _qkv(self, hidden, positions):
        config = self.config
        lead = hidden.shape[:-1]
        c = config.attention_head_dim
        q, k, v = saved(PROJECTION, self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden))
        q = q.reshape(*lead, config.num_heads, c)
        k = k.reshape(*lead, config.num_kv_heads, c)
        v = v.reshape(*lead, config.num_kv_heads, c)
        if config.rotary_dim:
            rope = dict(theta=config.rope_theta, rotary_dim=config.rotary_dim)
            q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
        return q, k, v

    def __call__(
        self,
        hidden,
        segment_ids=None,
        cache: KVCache | None = None,
        *,
        num_segments: int | None = None,
        decode_impl: str = "xla",
    ):
        """hidden (b, t, d) -> (out, None); with num_segments, also each segment's KVCache
        (b, s, t, k, c) (its last run's tokens when an id occurs in several runs, as the
        Mamba caches); with a cache (b, T, k, c), one token (b, d) -> (out (b, d), cache with
        the token appended at index cache.length)."""
        if cache is not None:
            return self._decode(hidden, cache)
        config = self.config
        batch, length = hidden.shape[:2]
        ids = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
        positions = positions_from_segment_ids(ids)
        q, k, v = self._qkv(hidden, positions)
        y = attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            causal=True,
            max_segments=config.attention_max_segments,
            impl=config.attention_impl,
        )
        y = saved(MIXER_CORE, y.reshape(batch, length, -1))
        out = self.o_proj(saved(OUT_PROJ_INPUT, y))
        if num_segments is None:
            return out, None
        return out, _segment_kv(k, v, ids, positions, num_segments)

    def _decode(self, hidden, cache: KVCache):
        config = self.config
        batch = hidden.shape[0]
        pos = cache.length  # (b,)
        q, k, v = self._qkv(hidden[:, None], pos[:, None])
        rows = jnp.arange(batch)
        # A full cache drops the token instead of overwriting index T - 1 (generation sizes
        # T so that this never happens).
        k_all = cache.k.at[rows, pos].set(k[:, 0].astype(cache.k.dtype), mode="drop")
        v_all = cache.v.at[rows, pos].set(v[:, 0].astype(cache.v.dtype), mode="drop")
        g = config.num_heads // config.num_kv_heads
        c = config.attention_head_dim
        f32 = jnp.float32
        qg = q[:, 0].astype(f32).reshape(batch, config.num_kv_heads, g, c)
        logits = jnp.einsum("bkgc,bTkc->bkgT", qg, k_all.astype(f32)) / math.sqrt(c)
        seen = jnp.arange(k_all.shape[1])[None] <= pos[:, None]  # (b, T)
        logits = jnp.where(seen[:, None, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bkgT,bTkc->bkgc", probs, v_all.astype(f32))
        out = self.o_proj(y.reshape(batch, -1).astype(config.compute_dtype))
        return out, KVCache(k_all, v_all, pos + 1)


def _segment_kv(k, v, segment_ids, positions, num_segments: int) -> KVCache:
    """Each slot's KVCache from a packed row: the tokens of the last run of id s at their
    positions (b, s, t, k, c); ids outside [0, S) are left out."""
    batch, length = segment_ids.shape
    runs = jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)  # 1, 2, ...
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
    last_run = (
        jnp.zeros((batch, num_segments), jnp.int32).at[rows, segment_ids].max(runs, mode="drop")
    )
    in_last = runs == jnp.take_along_axis(
        last_run, jnp.clip(segment_ids, 0, num_segments - 1), axis=1
    )
    slot = jnp.where(in_last, segment_ids, num_segments)  # out of range: dropped
    shape = (batch, num_segments, length) + k.shape[2:]
    k_cache = jnp.zeros(shape, k.dtype).at[rows, slot, positions].set(k, mode="drop")
    v_cache = jnp.zeros(shape, v.dtype).at[rows, slot, positions].set(v, mode="drop")
    lengths = jnp.zeros((batch, num_segments), jnp.int32).at[rows, slot].add(1, mode="drop")
    return KVCache(k_cache, v_cache, lengths)


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)) (Bamba) or down(relu(up(x))^2) (Nemotron-H)."""

    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gate_proj = (
            _linear(d, f, bias, config, rngs) if config.mlp_activation == "silu_gated" else None
        )
        self.up_proj = _linear(d, f, bias, config, rngs)
        self.down_proj = _linear(f, d, bias, config, rngs, _out_scale(config))

    def __call__(
        self, hidden, segment_ids=None, cache=None, *, num_segments=None, decode_impl: str = "xla"
    ):
        up = saved(PROJECTION, self.up_proj(hidden))
        if self.gate_proj is None:
            act = jnp.square(jax.nn.relu(up))
        else:
            act = jax.nn.silu(saved(PROJECTION, self.gate_proj(hidden))) * up
        return self.down_proj(saved(OUT_PROJ_INPUT, act)), None
