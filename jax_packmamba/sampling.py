"""Next-token sampling as Hugging Face `generate` and mamba_ssm define it, jit-friendly.

Axis letters: b batch, v vocabulary.

Order, as in Hugging Face's logits processors and warpers:

    repetition penalty   a token already seen (prompt or generated) has its logit divided by
                         the penalty if positive, multiplied by it if negative
    greedy               temperature 0: argmax of the penalised logits (no warper applies)
    temperature          logits / temperature
    top-k                keep the k largest (ties with the k-th kept)
    top-p                keep the smallest set of most likely tokens whose mass reaches top_p:
                         a token stays while the mass of the tokens above it is < top_p (HF
                         and mamba_ssm drop where the ascending cumulative softmax is
                         <= 1 - top_p: the same set; the most likely token always stays)
    min-p                keep tokens whose probability is at least min_p times the largest
    draw                 one categorical draw per row, from its own key (so a row's tokens do
                         not depend on how many rows the batch was padded to)

Every value is a traced scalar (`SamplingParams`), so changing temperature, top_k, top_p,
min_p, the penalty, the EOS ids or the seed never recompiles. Three things are static
(`SamplingMode`): greedy or not, whether the sort that top-k and top-p need runs at all, and
the top-p prefilter's K.

The prefilter (SamplingConfig.prefilter = K > 0) finds the top-k / top-p cut from the K largest
logits (`lax.top_k`, which XLA runs as one small kernel on a GPU for K <= 16) instead of a sort
of the whole vocabulary, and falls back to the sort (one `lax.cond` for the batch) when a row's
nucleus is not inside its K largest or top_k is between K and the vocabulary. Its tokens are
the fallback's, bit for bit: both compute the mass above each token with the same additions
over the K largest (`_nucleus`), so a row whose nucleus ends inside them gets the same cut
either way. Without the prefilter (K = 0) the cut comes from the sort with a plain cumulative
sum, whose float rounding differs only where a token's mass above lies within rounding of
top_p. From BISECT_ROWS rows it comes from no sort at all (`_bisect_cut`): the k-th largest by
counting and the top-p cut by masses, each a search of the logits' int32 keys; the same cut,
up to that rounding (its masses are sums in another order).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# EOS ids a call may give (padded with -1 to this many: a fixed shape, one compile).
MAX_EOS_IDS = 8
# Rows from which top-k / top-p find their cut by a search of the logits' keys instead of a
# sort of the vocabulary (no prefilter; `_bisect_cut`), read when a step is traced; 0: never.
# Off until timed: one H100 spent 313 us a decode step at batch 32 in the sort (272 at 128, 32
# at 1; pallas_kernels/decode/DESIGN.md, round 7); the search reads the (b, v) keys 22 times,
# predicted ~0.1 ms there.
BISECT_ROWS = 0
# How `_bisect_cut` searches: "xla" (each pass its own reductions, 22 passes a step) or
# "pallas" (pallas_kernels.sampling: each search one kernel launch, a program a row, every
# pass re-reading the row from L2; through the Pallas interpreter off a GPU). Read when a step
# is traced. "xla" until the two are timed against each other and the sort.
BISECT_IMPL = "xla"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What a user chooses. temperature 0 is greedy; None turns a filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    eos_ids: tuple[int, ...] = ()
    seed: int = 0
    prefilter: int = 0  # K of the top-p prefilter (module docstring); 0: sort every step

    def __post_init__(self):
        number = (int, float, np.integer, np.floating)
        if not isinstance(self.temperature, number) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (
            not isinstance(self.top_k, (int, np.integer))
            or isinstance(self.top_k, bool)
            or self.top_k < 1
        ):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (
            not isinstance(self.top_p, number) or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (
            not isinstance(self.min_p, number) or not 0 <= self.min_p <= 1
        ):
            raise ValueError(f"min_p must be None or in [0, 1], got {self.min_p!r}")
        if not isinstance(self.repetition_penalty, number) or not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}"
            )
        eos = tuple(self.eos_ids)
        if len(eos) > MAX_EOS_IDS or any(
            not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0 for i in eos
        ):
            raise ValueError(
                f"eos_ids must be at most {MAX_EOS_IDS} ints >= 0, got {self.eos_ids!r}"
            )
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in eos))
        # jax.random.key keeps 32 bits of the seed (without x64): a wider one would alias.
        if (
            not isinstance(self.seed, (int, np.integer))
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**32
        ):
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if (
            not isinstance(self.prefilter, (int, np.integer))
            or isinstance(self.prefilter, bool)
            or self.prefilter < 0
        ):
            raise ValueError(f"prefilter must be an int >= 0, got {self.prefilter!r}")

    @property
    def mode(self) -> SamplingMode:
        return SamplingMode(
            greedy=self.temperature == 0,
            sort=self.top_k is not None or self.top_p is not None,
            prefilter=int(self.prefilter),
        )

    def params(self) -> SamplingParams:
        """The traced values (host scalars turned into device arrays)."""
        eos = list(self.eos_ids) + [-1] * (MAX_EOS_IDS - len(self.eos_ids))
        return SamplingParams(
            temperature=jnp.float32(self.temperature if self.temperature > 0 else 1.0),
            top_k=jnp.int32(self.top_k if self.top_k is not None else 2**31 - 1),
            top_p=jnp.float32(self.top_p if self.top_p is not None else 1.0),
            min_p=jnp.float32(self.min_p or 0.0),
            repetition_penalty=jnp.float32(self.repetition_penalty),
            eos_ids=jnp.asarray(eos, jnp.int32),
        )


class SamplingMode(NamedTuple):
    """The static part: greedy, whether top-k / top-p (which need a sort) are on, and the
    top-p prefilter's K (0: off)."""

    greedy: bool
    sort: bool
    prefilter: int = 0


class SamplingParams(NamedTuple):
    """The traced part; neutral values turn a stage off (top_k huge, top_p 1, min_p 0,
    penalty 1, eos_ids all -1)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    eos_ids: jax.Array


def penalize(logits, seen, penalty):
    """Hugging Face's repetition penalty: logits (b, v), seen (b, v) bool."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def warp(logits, params: SamplingParams, *, sort: bool, prefilter: int = 0):
    """Temperature, then top-k, top-p (if `sort`) and min-p: the logits (b, v) float32 to draw
    from, -inf where a filter removed the token. prefilter: K of the top-p prefilter (0: off)."""
    x = logits.astype(jnp.float32) / params.temperature
    if sort:
        x = jnp.where(x >= _top_cut(x, params, prefilter), x, -jnp.inf)
    # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p) (log 0 = -inf keeps all).
    floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(params.min_p)
    return jnp.where(x >= floor, x, -jnp.inf)


def _top_cut(x, params: SamplingParams, prefilter: int, *, force_sort=False):
    """(b, 1): the smallest logit that top-k and top-p keep (each row keeps x >= it).

    force_sort: take the sort's branch whatever the prefilter finds (tests: the fallback)."""
    v = x.shape[-1]
    k = jnp.clip(params.top_k, 1, v)
    top = jnp.max(x, axis=-1, keepdims=True)
    block = min(prefilter, v)
    if block == 0 and BISECT_ROWS and x.shape[0] >= BISECT_ROWS:
        return _bisect_cut(x, k, top, params)
    if block == 0:
        descending = _sort_floats(x)[:, ::-1]
        kth = jax.lax.dynamic_slice_in_dim(descending, k - 1, 1, axis=-1)
        cut, _ = _nucleus(descending, kth, top, _mass(x, kth, top), params, block=0)
        return cut
    largest = jax.lax.top_k(x, block)[0]  # (b, K) descending
    # The k-th largest, exactly, whichever way it is found: from the K largest, the minimum
    # (k = v), or the sort (K < k < v, in the fallback below).
    kth = jnp.where(
        k <= block,
        jax.lax.dynamic_slice_in_dim(largest, jnp.minimum(k, block) - 1, 1, axis=-1),
        jnp.min(x, axis=-1, keepdims=True),
    )
    kth_sorted = (k > block) & (k < v)
    mass = _mass(x, kth, top)
    cut, inside = _nucleus(largest, kth, top, mass, params, block=block)
    use_sort = kth_sorted | ~inside  # (b, 1)

    def sorted_cut():
        descending = _sort_floats(x)[:, ::-1]
        kth_s = jnp.where(
            kth_sorted, jax.lax.dynamic_slice_in_dim(descending, k - 1, 1, axis=-1), kth
        )
        # The mass computed above, unless the k-th largest came from the sort only now.
        mass_s = jnp.where(kth_sorted, _mass(x, kth_s, top), mass)
        full, _ = _nucleus(descending, kth_s, top, mass_s, params, block=block)
        return jnp.where(use_sort, full, cut)

    if force_sort:
        use_sort = jnp.ones_like(use_sort)
        return sorted_cut()
    return jax.lax.cond(jnp.any(use_sort), sorted_cut, lambda: cut)


def _bisect_cut(x, k, top, params: SamplingParams):
    """(b, 1): _top_cut's cut without a sort (k: top_k clipped to the vocabulary; top: each
    row's largest logit). Both bounds are token values found by searching the int32 keys
    (`_float_keys`: the sort's order), each the smallest key m whose weight strictly above it
    is under a bound (`_smallest_key_under`): the k-th largest, where fewer than k keys are
    above (a count); top-p's cut, where the mass above (over the tokens top-k keeps) is <
    top_p times their mass, the first token in the sort's order that stays (`_nucleus`), as a
    threshold (used where top_p < 1; top_p = 1 keeps from the k-th largest down). Both
    searches always run (top_k and top_p are traced: skipping one would take a lax.cond, whose
    predicate the host reads back, breaking the decode step's command buffer).
    """
    keys = _float_keys(x)
    lowest = jnp.min(keys, axis=-1, keepdims=True)
    highest = jnp.max(keys, axis=-1, keepdims=True)
    kth = _key_floats(_key_search(keys, None, k, lowest, highest))
    p = jnp.where(x >= kth, jnp.exp(x - top), 0.0)  # the terms of _mass(x, kth, top)
    bound = params.top_p * jnp.sum(p, axis=-1, keepdims=True)
    smallest = _key_floats(_key_search(keys, p, bound, lowest, highest))
    return jnp.maximum(kth, jnp.where(params.top_p < 1, smallest, -jnp.inf))


def _key_search(keys, weights, bound, lo, hi):
    """_smallest_key_under by BISECT_IMPL (weights None: a count of the keys above)."""
    if BISECT_IMPL == "pallas":
        from pallas_kernels.sampling import smallest_key_under

        interpret = jax.default_backend() != "gpu"
        return smallest_key_under(keys, weights, bound, lo, hi, interpret=interpret)
    if BISECT_IMPL != "xla":
        raise ValueError(f'BISECT_IMPL must be "xla" or "pallas", got {BISECT_IMPL!r}')
    weights = jnp.ones_like(keys) if weights is None else weights
    return _smallest_key_under(keys, weights, bound, lo, hi)


# Thresholds a pass of _smallest_key_under tries (7: a row's key range in 8 parts); passes
# that narrow any int32 range to one key (8^11 >= 2^32).
_WAYS, _PASSES = 8, 11


def _smallest_key_under(keys, weights, bound, lo, hi):
    """(b, 1) int32: per row, the smallest m in [lo, hi] with sum(weights[keys > m]) < bound,
    given that hi has it (the sum never grows with m). Each pass sums the weights above 7
    thresholds splitting [lo, hi] in 8 (one read of keys and weights) and keeps the part where
    the sum first falls under the bound: _PASSES passes, where halving would take 32."""
    j = jnp.arange(1, _WAYS, dtype=jnp.uint32)
    for _ in range(_PASSES):
        # hi - lo wraps past 2^31, its bits read as uint32 do not; floor(j * width / 8) is
        # computed in parts so that no product passes 2^32.
        width = jax.lax.bitcast_convert_type(hi - lo, jnp.uint32)
        q, r = width // _WAYS, width % _WAYS
        offsets = q * j + (r * j) // _WAYS  # (b, 7), non-decreasing
        t = lo + jax.lax.bitcast_convert_type(offsets, jnp.int32)
        above = jnp.sum(jnp.where(keys[:, :, None] > t[:, None, :], weights[:, :, None], 0), axis=1)
        under = jnp.sum(above < bound, axis=-1, keepdims=True)  # the last `under` thresholds
        first = (_WAYS - 1) - under  # the first threshold under the bound (7: none)
        t_first = jnp.take_along_axis(t, jnp.minimum(first, _WAYS - 2), axis=-1)
        t_before = jnp.take_along_axis(t, jnp.maximum(first - 1, 0), axis=-1)
        lo, hi = (
            jnp.where(first > 0, t_before + 1, lo),
            jnp.where(under > 0, t_first, hi),
        )
    return hi


def _mass(x, kth, top):
    """(b, 1): sum of exp(x - top) over the tokens top-k keeps (softmax's denominator)."""
    return jnp.sum(jnp.where(x >= kth, jnp.exp(x - top), 0.0), axis=-1, keepdims=True)


def _nucleus(descending, kth, top, mass, params: SamplingParams, *, block: int):
    """(cut (b, 1), inside (b, 1) bool) of the top-p filter over logits sorted descending
    (b, L), L the vocabulary or the prefilter's K: a token stays while the mass of the tokens
    above it is < top_p * mass; cut is max(kth, the smallest that stays). inside: the tokens
    past these L are all dropped (their mass above reaches top_p), so the cut is the whole
    vocabulary's.

    The mass above the first `block` tokens is one associative_scan over those tokens alone,
    the same additions for L = block and L = v, so a prefilter of K = block and the sort
    agree bit for bit wherever the nucleus ends inside the K largest; the rest (L = v) is
    a cumulative sum started from their total, never below it.
    """
    p = jnp.where(descending >= kth, jnp.exp(descending - top), 0.0)
    if block:
        head = jax.lax.associative_scan(jnp.add, p[:, :block], axis=1)
        tail = head[:, -1:] + jnp.cumsum(p[:, block:], axis=-1)
        inclusive = jnp.concatenate([head, tail], axis=-1)
    else:
        inclusive = jnp.cumsum(p, axis=-1)
    above = jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], axis=-1)
    bound = params.top_p * mass
    filtering = params.top_p < 1
    stays = (above < bound) | ~filtering  # the first token: above = 0 < bound
    smallest = jnp.min(jnp.where(stays, descending, jnp.inf), axis=-1, keepdims=True)
    cut = jnp.maximum(kth, jnp.where(filtering, smallest, -jnp.inf))
    inside = ~filtering | (inclusive[:, -1:] >= bound)
    return cut, inside


def _sort_floats(x):
    """jnp.sort(x, axis=-1) for float32 without NaNs, as a sort of order-preserving int32 keys.

    jnp.sort compares floats with a total-order comparator (NaNs, -0.0) that XLA's GPU sort
    rewriter does not take for a CUB radix sort; a plain integer compare it does. A float's
    bits, read as int32, order the non-negative floats; flipping all but the sign bit of the
    negative ones reverses their order, as it must (the map is its own inverse).
    """
    return _key_floats(jax.lax.sort(_float_keys(x), dimension=x.ndim - 1))


def _flip(keys):
    return jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys)


def _float_keys(x):
    """Order-preserving int32 keys of float32 values (_sort_floats says how)."""
    return _flip(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32))


def _key_floats(keys):
    """The float32 values of _float_keys' keys (the map is its own inverse)."""
    return jax.lax.bitcast_convert_type(_flip(keys), jnp.float32)


def sample(logits, seen, key, params: SamplingParams, mode: SamplingMode, *, vocab_size=None):
    """One token per row of logits (b, v) -> (b,) int32.

    seen: (b, v) bool of tokens the repetition penalty applies to (None: none). key: one PRNG
    key for the step; row i draws with fold_in(key, i). Ids >= vocab_size are never drawn.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if vocab_size is not None and vocab_size < v:
        logits = jnp.where(jnp.arange(v) < vocab_size, logits, -jnp.inf)
    if seen is not None:
        logits = penalize(logits, seen, params.repetition_penalty)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = warp(logits, params, sort=mode.sort, prefilter=mode.prefilter)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def is_eos(tokens, params: SamplingParams):
    """(b,) bool: the token is one of the EOS ids."""
    eos = params.eos_ids[None, :]
    return jnp.any((tokens[:, None] == eos) & (eos >= 0), axis=-1)
