"""Causal softmax attention that never looks across a segment boundary, and rotary embeddings.

Axis letters: b batch, t time (query), s time (key), h query heads, k key/value heads,
g = h // k query heads per key/value head (GQA), d head dim.

    out[b, t, h] = sum_s softmax_s(scale * q[b, t, h] . k[b, s, h // g]) v[b, s, h // g]

over the keys s of t's segment (and s <= t when causal). A segment is a run of equal
`segment_ids` (a new one begins at t = 0 and wherever the id changes, as for every op here), so
two runs of the same id are two segments. Padding (id 0 from our packer) is a segment like any
other: its tokens attend among themselves and the loss masks them, so no row is ever fully
masked and nothing needs a NaN guard.

Every token attends at least to itself, so a masked key's probability is exactly 0 and its
value and key never reach another segment's output or gradient: segments are bit-isolated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.segments import GPU_PLATFORMS, check_segment_ids, segment_starts

# "reference": the pure-JAX spec below (dense masked softmax in float32, autodiff).
# "cudnn": cuDNN flash attention (jax.nn.dot_product_attention, implementation="cudnn") with the
#   segment mask passed as a (b, 1, t, t) boolean mask; any segmentation, every causal block.
# "cudnn_packed": cuDNN's packed ("ragged") layout: each segment is its own sequence, given by
#   per-row offsets and lengths, so blocks across segments are skipped; needs `max_segments`.
ATTENTION_IMPLS = ("auto", "reference", "cudnn", "cudnn_packed")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# cuDNN's flash attention on Hopper takes head dims up to 256 that are multiples of 8
# (jax/_src/cudnn/fused_attention_stablehlo.py, check_is_flash_attention).
CUDNN_MAX_HEAD_DIM = 256


def attention(
    q, k, v, *, segment_ids=None, causal=True, scale=None, max_segments=None, impl="auto"
):
    """Segment-aware (GQA) attention; q (b, t, h, d), k and v (b, t, k, d), h % k == 0.

    segment_ids: (b, t) integers, or None (each row one segment). scale: the logits' factor,
    default 1 / sqrt(d). Returns q's shape and dtype; softmax statistics in float32.
    max_segments: a bound on the number of segments (runs of equal ids) in any row, for
    impl="cudnn_packed", which reserves that many slots per row (its softmax statistics take
    b * max_segments * h * t floats). With concrete ids a row that needs more raises ValueError;
    under jit the ids cannot be read, and tokens of a row's runs past the bound come out NaN
    instead of silently wrong.
    impl:
      "reference": `attention_reference`, XLA ops differentiated by autodiff; any backend;
      "cudnn": cuDNN flash attention with the segment mask (bf16/fp16 on a GPU);
      "cudnn_packed": cuDNN's packed layout, one cuDNN sequence per segment (bf16/fp16 on a
          Hopper or newer GPU, `max_segments` given);
      "auto": "cudnn_packed" on a GPU for bf16/fp16 when `max_segments` is given, else "cudnn"
          there, else "reference" (docs/attention.md says why).
    """
    check_attention_args(q, k, v, segment_ids, causal, scale)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if max_segments is not None and (
        not isinstance(max_segments, (int, np.integer)) or max_segments < 1
    ):
        raise ValueError(f"max_segments must be a positive int or None, got {max_segments!r}")
    if impl == "auto":
        impl = _auto_impl(q, max_segments)
    if impl != "reference":
        _check_cudnn(impl, q, max_segments)
    if impl == "cudnn_packed":
        _check_run_count(segment_ids, max_segments)
    batch, length = np.shape(q)[:2]
    runs = _run_index(segment_ids, batch, length)
    scale = float(1.0 / np.sqrt(np.shape(q)[-1]) if scale is None else scale)
    if impl == "reference":
        return _reference_jit(q, k, v, runs, causal=causal, scale=scale)
    if impl == "cudnn":
        return _cudnn_masked_jit(q, k, v, runs, causal=causal, scale=scale)
    return _cudnn_packed_jit(
        q, k, v, runs, causal=causal, scale=scale, max_segments=int(max_segments)
    )


def attention_reference(q, k, v, *, segment_ids=None, causal=True, scale=None):
    """The pure-JAX spec of `attention` (same contract), differentiated by autodiff."""
    check_attention_args(q, k, v, segment_ids, causal, scale)
    batch, length = np.shape(q)[:2]
    scale = float(1.0 / np.sqrt(np.shape(q)[-1]) if scale is None else scale)
    return _reference_jit(
        q, k, v, _run_index(segment_ids, batch, length), causal=causal, scale=scale
    )


def check_attention_args(q, k, v, segment_ids, causal, scale):
    """Raises ValueError naming the argument unless the shapes, dtypes and flags fit."""
    for name, a in dict(q=q, k=k, v=v).items():
        if len(np.shape(a)) != 4:
            raise ValueError(
                f"{name} must be (batch, length, heads, head_dim), got shape {np.shape(a)}"
            )
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(
                f"{name} must be a real floating array, got dtype {jnp.result_type(a)}"
            )
    batch, length, heads, head_dim = np.shape(q)
    if length == 0:
        raise ValueError(f"length must be at least 1, got q with shape {np.shape(q)}")
    if np.shape(k) != np.shape(v):
        raise ValueError(f"k and v must have the same shape, got {np.shape(k)} and {np.shape(v)}")
    kv_heads = np.shape(k)[2]
    if np.shape(k)[:2] != (batch, length) or np.shape(k)[3] != head_dim:
        raise ValueError(
            f"k must be (batch, length, kv_heads, head_dim) = ({batch}, {length}, kv_heads, "
            f"{head_dim}) to match q {np.shape(q)}, got shape {np.shape(k)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's kv_heads ({kv_heads})")
    dtypes = {jnp.result_type(a) for a in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError(
            f"q, k and v must share a dtype, got {jnp.result_type(q)}, "
            f"{jnp.result_type(k)} and {jnp.result_type(v)}"
        )
    check_segment_ids(segment_ids, batch, length)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if scale is not None and not (
        isinstance(scale, (int, float, np.floating)) and np.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite Python number or None, got {scale!r}")


def _target_platform() -> str:
    """The platform being compiled for: the abstract mesh's device when set, else the default
    backend (as check_pallas_platform decides)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def _cudnn_fits(q) -> bool:
    head_dim = np.shape(q)[-1]
    return (
        jnp.result_type(q) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    )


def _auto_impl(q, max_segments) -> str:
    # cuDNN with the segment mask, even when max_segments would allow the packed layout: on an
    # H100 at 8 x 2048, 64 segments a row, fwd+bwd took 4.38 ms against the packed layout's 5.59
    # (reference 45.8; docs/attention.md).
    del max_segments
    if _target_platform() not in GPU_PLATFORMS or not _cudnn_fits(q):
        return "reference"
    return "cudnn"


def _check_cudnn(impl, q, max_segments):
    platform = _target_platform()
    if platform not in GPU_PLATFORMS:
        raise ValueError(
            f'impl="{impl}" runs cuDNN kernels, which need a GPU, but this runs on '
            f'{platform!r}; use impl="reference" or "auto"'
        )
    dtype, head_dim = jnp.result_type(q), np.shape(q)[-1]
    if dtype not in CUDNN_DTYPES:
        raise ValueError(
            f'impl="{impl}" takes bfloat16 or float16 q, k, v (cuDNN flash '
            f'attention), got {dtype}; cast them or use impl="reference"'
        )
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        raise ValueError(
            f'impl="{impl}" needs head_dim a multiple of 8 and at most '
            f'{CUDNN_MAX_HEAD_DIM}, got {head_dim}; use impl="reference"'
        )
    if impl == "cudnn_packed" and max_segments is None:
        raise ValueError(
            'impl="cudnn_packed" needs max_segments (a bound on the segments in '
            'any row); pass it, or use impl="cudnn"'
        )


def _check_run_count(segment_ids, max_segments):
    if segment_ids is None or isinstance(segment_ids, jax.core.Tracer):
        return
    ids = np.asarray(segment_ids)
    runs = 1 + np.count_nonzero(ids[:, 1:] != ids[:, :-1], axis=1)
    if runs.max() > max_segments:
        raise ValueError(
            f"max_segments={max_segments} is less than the {int(runs.max())} "
            f"segments of row {int(runs.argmax())}; pass max_segments="
            f"{int(runs.max())} or more"
        )


def _run_index(segment_ids, batch, length):
    """(b, t) int32 index 0, 1, ... of each token's segment (run) within its row."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    return jnp.cumsum(segment_starts(jnp.asarray(segment_ids)).astype(jnp.int32), axis=1) - 1


def _allowed(runs, causal):
    """(b, t, s) bool: query t may attend to key s."""
    same = runs[:, :, None] == runs[:, None, :]
    if not causal:
        return same
    t = jnp.arange(runs.shape[1])
    return same & (t[None, :, None] >= t[None, None, :])


def _reference(q, k, v, runs, *, causal, scale):
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    f32 = jnp.float32
    qg = q.astype(f32).reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = scale * jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(f32))
    allowed = _allowed(runs, causal)[:, None, None]
    # -inf, not a large negative number: exp gives an exact 0, and every row keeps its own
    # diagonal, so the maximum is finite.
    logits = jnp.where(allowed, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(f32))
    return out.reshape(q.shape).astype(q.dtype)


_reference_jit = jax.jit(_reference, static_argnames=("causal", "scale"))


def _cudnn_masked(q, k, v, runs, *, causal, scale, implementation="cudnn"):
    # cuDNN's backward with a mask (taken as a bias) needs even lengths: an odd row gets one
    # more token of a segment of its own, which nobody attends to, and it is cut off again.
    # implementation="xla" runs the same call through jax's XLA attention: the CPU twin of
    # this route (tests), checking the mask, the causal flag and the padding.
    length = q.shape[1]
    if length % 2:
        pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        runs = jnp.pad(runs, [(0, 0), (0, 1)], constant_values=-1)
    mask = (runs[:, :, None] == runs[:, None, :])[:, None]  # causal comes from is_causal
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, implementation=implementation
    )
    return out[:, :length]


_cudnn_masked_jit = jax.jit(_cudnn_masked, static_argnames=("causal", "scale", "implementation"))


def packed_layout(runs, max_segments: int):
    """cuDNN's packed description of rows of runs: (seqlen (b, m), offsets (b, m + 1)) int32,
    the length and first column of run j of each row, -1 past the row's last run (m =
    max_segments; runs past m are left out)."""
    batch, length = runs.shape
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), runs.shape)
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], runs.shape)
    # Other tokens, and the starts of runs past the bound, write past the end: dropped.
    slot = jnp.where(starts & (runs < max_segments), runs, max_segments + 1)
    offsets = jnp.full((batch, max_segments + 1), -1, jnp.int32).at[rows, slot].set(t, mode="drop")
    counts = jnp.zeros((batch, max_segments), jnp.int32).at[rows, runs].add(1, mode="drop")
    seqlen = jnp.where(jnp.arange(max_segments) <= runs[:, -1:], counts, -1)
    return seqlen, offsets


def _cudnn_packed(q, k, v, runs, *, causal, scale, max_segments):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    # jax.nn.dot_product_attention does not expose the packed layout; this is the function
    # behind it (jax 0.11.2), which takes per-row segment offsets and lengths.
    seqlen, offsets = packed_layout(runs, max_segments)
    mask_type = cudnn_fa.MaskType.PADDING_CAUSAL if causal else cudnn_fa.MaskType.PADDING
    out = cudnn_fa.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=seqlen,
        kv_seqlen=seqlen,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=scale,
        mask_type=mask_type,
    )
    dropped = (runs >= max_segments)[:, :, None, None]
    return jnp.where(dropped, jnp.asarray(jnp.nan, out.dtype), out)


_cudnn_packed_jit = jax.jit(_cudnn_packed, static_argnames=("causal", "scale", "max_segments"))


def apply_rope(x, positions, *, theta, rotary_dim=None):
    """Rotary position embedding in the half-split layout of HF Llama, Bamba and Nemotron-H.

    x: (b, t, heads, d); positions: (b, t) integers, each token's position in its segment
    (`positions_from_segment_ids`), so every segment starts at angle 0. The first
    `rotary_dim` (default d, even) channels are split into halves x1, x2 and become
        x1 cos - x2 sin,  x2 cos + x1 sin,   angle = position * theta ** (-2 i / rotary_dim)
    for i < rotary_dim / 2; the rest pass through. Computed in float32, returns x's dtype.
    """
    if len(np.shape(x)) != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got shape {np.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"x must be a real floating array, got dtype {jnp.result_type(x)}")
    batch, length, _, head_dim = np.shape(x)
    if tuple(np.shape(positions)) != (batch, length):
        raise ValueError(
            f"positions must have shape (batch, length) = {(batch, length)}, got "
            f"{tuple(np.shape(positions))}"
        )
    if not jnp.issubdtype(jnp.result_type(positions), jnp.integer):
        raise ValueError(
            f"positions must be an integer array, got dtype {jnp.result_type(positions)}"
        )
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if (
        not isinstance(rotary_dim, (int, np.integer))
        or not 0 < rotary_dim <= head_dim
        or rotary_dim % 2
    ):
        raise ValueError(
            f"rotary_dim must be an even int in (0, head_dim={head_dim}], got {rotary_dim!r}"
        )
    if not np.isfinite(theta) or theta <= 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    return _rope_jit(x, positions, theta=float(theta), rotary_dim=int(rotary_dim))


@functools.partial(jax.jit, static_argnames=("theta", "rotary_dim"))
def _rope_jit(x, positions, *, theta, rotary_dim):
    half = rotary_dim // 2
    # The inverse frequencies in float32 as HF computes them (theta ** (arange(0, r, 2) / r)).
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, t, half)
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)
