"""Mamba-3 scans with state resets at segment boundaries: SISO (public op, chunked reference,
the recurrent step) and MIMO (mamba3_mimo_scan, rank R; its docstring has its math).

Axis letters: b batch, t time, h heads, p headdim, g groups (of B and C), n state (d_state),
a rotary angles (a <= n / 2), s segment slot.

Semantics are mamba_ssm 2.3.2's `mamba3_siso_combined` (and its step kernel) with segments,
per-slot initial and final states. Per head, with lambda_t = sigmoid(trap_t):

    theta_t = theta_{t-1} + dt_t pi tanh(angles_t)                  (a angles per head)
    k_t     = R(theta_t) (B_t + B_bias),  q_t = R(theta_t) (C_t + C_bias)
    alpha_t = exp(dt_t A_t),  beta_t = (1 - lambda_t) dt_t alpha_t,  gamma_t = lambda_t dt_t
    h_t     = alpha_t h_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T    h: (p, n)
    y_t     = h_t q_t + D x_t,   y_t *= silu(z_t) if z is given

R(theta) rotates the interleaved pairs (2i, 2i + 1) of the first `a` pairs of the state dims by
theta_i (the rest are left as they are). A_t is per token (Mamba-3's data-dependent decay).

Packing rule: a run (a maximal stretch of equal segment_ids) starts from its slot's initial
state (h, k, x, theta) = initial_states[b, s] (zeros without it): theta's cumsum restarts there,
and the first token's trapezoid term reads the slot's k and x (zero without initial states).
Equivalently, the next-token term of every run's last token is zero: no information passes
between runs. Final states are, per slot, (h, k, x, theta mod 2 pi) after the slot's last
token in the row, what the step needs to continue the sequence.

The chunked form is SSD (ops/ssd_scan.py's `ssd_chunked`) with two changes. Token s reaches
h_t (t > s) as exp(sum_{r in (s, t]} dt_r A_r) (gamma_s + (1 - lambda_{s+1}) dt_{s+1}) x_s k_s^T:
alpha_{s+1} inside beta_{s+1} is the first decay step. So the SSD runs with per-token
log-decay dt A and input scale sigma_s = gamma_s + (1 - lambda_{s+1}) dt_{s+1}, where the
second term is zero when s + 1 starts a new run or is past the row; its diagonal (t = s) has
gamma_s instead of sigma_s, corrected after: y_s += (gamma_s - sigma_s) (q_s . k_s) x_s.
The initial k, x term of a run is the rank-1 state (1 - lambda_f) dt_f x0 k0^T added before
its first token f; it reaches the run's tokens through the run's decay alone, computed per
token outside the chunked scan (a segmented cumsum of dt A), so each run of a slot gets its
own first token's weight.

`mamba3_scan(impl="pallas")` runs that SSD core through the Pallas SSD kernels with the
per-token decay and input scale (pallas_kernels.ssd.ssd_chunked_pallas); the rotary, sigma, the
diagonal correction, the first-token carry and the states stay the same JAX around it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.segments import (
    check_chunk_and_slots,
    check_pallas_platform,
    check_segment_ids,
    segment_starts,
)
from jax_packmamba.ops.selective_scan import accumulation_dtype, run_cumsum
from jax_packmamba.ops.ssd_scan import IMPLS, Impl, ssd_chunked

DEFAULT_CHUNK = 64  # mamba_ssm's Mamba-3 SISO chunk_size


class Mamba3State(NamedTuple):
    """The recurrent state of a Mamba-3 layer (leading axes (b,) or (b, s)): ssm (..., h, p, n),
    k (..., h, n) the last rotated key, x (..., h, p) the last input, angle (..., h, a) theta mod
    2 pi; all in float32 (float64 for a float64 oracle)."""

    ssm: jax.Array
    k: jax.Array
    x: jax.Array
    angle: jax.Array


def mamba3_scan(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    D=None,
    z=None,
    B_bias=None,
    C_bias=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_states: Mamba3State | None = None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    impl: Impl = "auto",
):
    """Mamba-3 SISO scan with resets at segment boundaries (module docstring: the math).

    Args:
      x: (batch, length, heads, headdim), float32 or bfloat16.
      dt: (batch, length, heads), the step after its softplus (positive).
      A: (batch, length, heads), the per-token decay rate (negative).
      trap: (batch, length, heads), the trapezoid logits (lambda = sigmoid(trap)).
      B, C: (batch, length, groups, d_state); heads must be a multiple of groups.
      angles: (batch, length, heads, n_angles), the rotary rates before tanh; n_angles <=
        d_state / 2.
      D: optional (heads,) skip. z: optional (batch, length, heads, headdim) gate.
      B_bias, C_bias: optional (heads, d_state), added to B and C before the rotation.
      segment_ids: optional (batch, length) integers; everything restarts where they change.
      chunk_size: tokens per chunk (any length works).
      initial_states: optional Mamba3State with leading axes (batch, num_segments): every
        run of id s starts from slot s.
      return_final_states: also return a Mamba3State (batch, num_segments, ...) after each
        slot's last token (zeros where the id does not occur).
      num_segments: number of slots; ids must lie in [0, num_segments) (checked when
        concrete). Defaults to the initial states' slots, else 1 without segment_ids.
      impl: "reference" (pure JAX), "pallas" (the SSD core through the Triton kernels of
        pallas_kernels/ssd; GPU only; headdim and d_state powers of two >= 16),
        "pallas_interpret" (the same kernels through the Pallas interpreter, any backend) or
        "auto" (the kernels on a GPU where they take the shapes, else the reference:
        docs/mamba3.md).

    Returns:
      y with x's shape and dtype, or (y, final Mamba3State).
    """
    num_segments = _check_args(
        x,
        dt,
        A,
        trap,
        B,
        C,
        angles,
        D,
        z,
        B_bias,
        C_bias,
        segment_ids,
        chunk_size,
        initial_states,
        return_final_states,
        num_segments,
    )
    impl = resolve_impl(impl, x, B)
    args = (x, dt, A, trap, B, C, angles, D, z, B_bias, C_bias)
    kwargs = dict(
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    if impl != "reference":
        return mamba3_scan_pallas(*args, interpret=impl == "pallas_interpret", **kwargs)
    return mamba3_scan_reference(*args, **kwargs)


def _pallas_takes(x, B) -> bool:
    from pallas_kernels.ssd import supported

    return supported(np.shape(x)[3], np.shape(B)[-1])


def resolve_impl(impl, x, B) -> str:
    """impl ("auto" resolved) for the SISO and MIMO scans; ValueError for a kernel path that
    cannot run: an unknown name, shapes the kernels refuse, "pallas" off a GPU."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # The kernels, forward + backward at mamba3-1.5b's heads (docs/mamba3.md): SISO 8.2
        # ms against the reference's 18.1 (1 x 16384 tokens), MIMO rank 4 on the fused
        # (L R)-long axis 12.6 ms against the fused reference's 20.7 and the R^2-heads one's
        # 94.7 (1 x 4096); one H200, 2026-12-06.
        gpu = jax.default_backend() == "gpu" and _pallas_takes(x, B)
        return "pallas" if gpu else "reference"
    if impl != "reference" and not _pallas_takes(x, B):
        raise ValueError(
            f"impl={impl!r}: the Pallas SSD kernels need headdim and d_state powers of two "
            f">= 16, got headdim={np.shape(x)[3]} (x's axis 3), d_state={np.shape(B)[-1]} "
            f'(B\'s last axis); use impl="reference" or "auto"'
        )
    check_pallas_platform(impl, fallback="reference")
    return impl


def rotate_pairs(v, theta):
    """Rotates the interleaved pairs (2i, 2i + 1), i < theta.shape[-1], of v's last axis by
    theta[..., i]; v (..., n), theta (..., a) with a <= n / 2."""
    a = theta.shape[-1]
    pairs = v[..., : 2 * a].reshape(*v.shape[:-1], a, 2)
    v0, v1 = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    rotated = jnp.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1)
    return jnp.concatenate([rotated.reshape(*v.shape[:-1], 2 * a), v[..., 2 * a :]], axis=-1)


def _heads(a, heads):
    """(..., g, n) -> (..., h, n): head h reads group h // (h / g)."""
    return jnp.repeat(a, heads // a.shape[-2], axis=-2)


def _biased(a, bias, heads, acc):
    a = _heads(a.astype(acc), heads)
    return a if bias is None else a + bias.astype(acc)


def _per_slot_at_tokens(values, segment_ids, num_segments):
    """values (b, s, ...) -> (b, t, ...): each token's slot's entry, as an exact one-hot
    contraction (a gather's gradient is a scatter-add, whose order on a GPU is not fixed)."""
    onehot = (segment_ids[..., None] == jnp.arange(num_segments)).astype(values.dtype)
    return jnp.einsum("bts,bs...->bt...", onehot, values, precision=jax.lax.Precision.HIGHEST)


def _at_slot_last_tokens(values, last_onehot):
    """values (b, t, ...) -> (b, s, ...) at each slot's last token (zeros where absent)."""
    return jnp.einsum(
        "bst,bt...->bs...",
        last_onehot.astype(values.dtype),
        values,
        precision=jax.lax.Precision.HIGHEST,
    )


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_final_states", "num_segments"))
def mamba3_scan_reference(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    D=None,
    z=None,
    B_bias=None,
    C_bias=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_states: Mamba3State | None = None,
    return_final_states: bool = False,
    num_segments: int | None = None,
):
    """The chunked pure-JAX Mamba-3 scan; same arguments as `mamba3_scan` (unchecked)."""
    return _siso(
        ssd_chunked,
        x,
        dt,
        A,
        trap,
        B,
        C,
        angles,
        D,
        z,
        B_bias,
        C_bias,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )


@functools.partial(
    jax.jit,
    static_argnames=("chunk_size", "return_final_states", "num_segments", "interpret", "config"),
)
def mamba3_scan_pallas(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    D=None,
    z=None,
    B_bias=None,
    C_bias=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_states: Mamba3State | None = None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    interpret: bool = False,
    config=None,
):
    """`mamba3_scan` with its SSD core in the Pallas kernels (`interpret`: through the Pallas
    interpreter; `config`: a pallas_kernels.ssd.SSDConfig overriding the tiling heuristic);
    same arguments (unchecked)."""
    return _siso(
        _pallas_ssd(interpret, config),
        x,
        dt,
        A,
        trap,
        B,
        C,
        angles,
        D,
        z,
        B_bias,
        C_bias,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )


def _pallas_ssd(interpret: bool, config, dtype=None):
    """`ssd_chunked`'s twin on the Pallas SSD kernels, their matmul operands x, k and q in
    `dtype` (default: x's)."""
    from pallas_kernels.ssd import ssd_chunked_pallas

    def ssd(x, weight, log_decay, k, q, **kwargs):
        # The kernels' matmuls read x, k and q in one dtype: cast once, not on every load.
        mm = x.dtype if dtype is None else dtype
        x, k, q = x.astype(mm), k.astype(mm), q.astype(mm)
        return ssd_chunked_pallas(
            x, weight, log_decay, k, q, interpret=interpret, config=config, **kwargs
        )

    return ssd


def _siso(
    ssd,
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    D,
    z,
    B_bias,
    C_bias,
    *,
    segment_ids,
    chunk_size,
    initial_states,
    return_final_states,
    num_segments,
):
    """The SISO scan around `ssd`, ops/ssd_scan.py's `ssd_chunked` or its kernels' twin."""
    batch, length, heads, headdim = x.shape
    given_ids = segment_ids
    acc = accumulation_dtype(x)
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if num_segments is None:
        num_segments = 1 if initial_states is None else initial_states.ssm.shape[1]
    starts = segment_starts(segment_ids)  # (b, t)
    dt, A = dt.astype(acc), A.astype(acc)
    lam = jax.nn.sigmoid(trap.astype(acc))
    gamma = lam * dt
    # The next token's trapezoid weight, zero where it starts a run or is past the row.
    next_weight = jnp.where(starts[..., None], 0.0, (1.0 - lam) * dt)
    next_weight = jnp.concatenate([next_weight[:, 1:], jnp.zeros_like(dt[:, :1])], axis=1)
    sigma = gamma + next_weight

    theta = run_cumsum(dt[..., None] * math.pi * jnp.tanh(angles.astype(acc)), starts)
    if initial_states is not None:
        theta = theta + _per_slot_at_tokens(
            initial_states.angle.astype(acc), segment_ids, num_segments
        )
    k = rotate_pairs(_biased(B, B_bias, heads, acc), theta)  # (b, t, h, n)
    q = rotate_pairs(_biased(C, C_bias, heads, acc), theta)
    log_decay = dt * A
    y, final_ssm = ssd(
        x,
        sigma,
        log_decay,
        k,
        q,
        segment_ids=given_ids,
        chunk_size=chunk_size,
        initial_states=None if initial_states is None else initial_states.ssm,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    skip = (gamma - sigma) * jnp.einsum("bthn,bthn->bth", q, k)
    if D is not None:
        skip = skip + D.astype(acc)
    y = y + skip[..., None] * x.astype(acc)

    if initial_states is not None:
        # The slot's previous (k, x) enters each run before its first token f with weight
        # (1 - lambda_f) dt_f, then decays with the run: exp(run cumsum of dt A).
        first_weight = run_cumsum(jnp.where(starts[..., None], (1.0 - lam) * dt, 0.0), starts)
        carried = first_weight * jnp.exp(run_cumsum(log_decay, starts))  # (b, t, h)
        k0 = _per_slot_at_tokens(initial_states.k.astype(acc), segment_ids, num_segments)
        x0 = _per_slot_at_tokens(initial_states.x.astype(acc), segment_ids, num_segments)
        y = y + (carried * jnp.einsum("bthn,bthn->bth", q, k0))[..., None] * x0
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    y = y.astype(x.dtype)
    if not return_final_states:
        return y

    t = jnp.arange(length)
    is_slot = segment_ids[..., None] == jnp.arange(num_segments)  # (b, t, s)
    last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)  # (b, s), -1: absent
    last_onehot = last[..., None] == t  # (b, s, t)
    if initial_states is not None:
        prev = (
            initial_states.x.astype(acc)[..., :, None] * initial_states.k.astype(acc)[..., None, :]
        )
        carried_last = _at_slot_last_tokens(carried, last_onehot)  # (b, s, h)
        final_ssm = final_ssm + carried_last[..., None, None] * prev
    final = Mamba3State(
        ssm=final_ssm,
        k=_at_slot_last_tokens(k, last_onehot),
        x=_at_slot_last_tokens(x.astype(acc), last_onehot),
        angle=jnp.mod(_at_slot_last_tokens(theta, last_onehot), 2 * math.pi),
    )
    return y, final


def mamba3_state_update(
    state: Mamba3State,
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    D=None,
    z=None,
    B_bias=None,
    C_bias=None,
):
    """One step of `mamba3_scan`: state (leading axis b), x, z (b, h, p), dt, A, trap (b, h),
    B, C (b, g, n), angles (b, h, a). Returns (next state, y (b, h, p) in x's dtype)."""
    heads = x.shape[1]
    acc = jnp.promote_types(accumulation_dtype(x), state.ssm.dtype)
    dt, A = dt.astype(acc), A.astype(acc)
    lam = jax.nn.sigmoid(trap.astype(acc))
    theta = state.angle.astype(acc) + dt[..., None] * math.pi * jnp.tanh(angles.astype(acc))
    theta = jnp.mod(theta, 2 * math.pi)
    k = rotate_pairs(_biased(B, B_bias, heads, acc), theta)
    q = rotate_pairs(_biased(C, C_bias, heads, acc), theta)
    xa = x.astype(acc)
    alpha = jnp.exp(dt * A)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt

    def outer(weight, v, key):
        return weight[..., None, None] * v[..., :, None] * key[..., None, :]

    ssm = (
        alpha[..., None, None] * state.ssm.astype(acc)
        + outer(beta, state.x.astype(acc), state.k.astype(acc))
        + outer(gamma, xa, k)
    )
    y = jnp.einsum("bhpn,bhn->bhp", ssm, q)
    if D is not None:
        y = y + D.astype(acc)[:, None] * xa
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return Mamba3State(ssm=ssm, k=k, x=xa, angle=theta), y.astype(x.dtype)


def rotate_halves(v, theta):
    """Rotates the pairs (i, i + n / 2), i < theta.shape[-1], of v's last axis (n) by
    theta[..., i], as mamba_ssm's MIMO kernels do; v (..., n), theta (..., a), a <= n / 2."""
    half, a = v.shape[-1] // 2, theta.shape[-1]
    v0, v1 = v[..., :half], v[..., half:]
    pad = [(0, 0)] * (theta.ndim - 1) + [(0, half - a)]
    cos = jnp.pad(jnp.cos(theta), pad, constant_values=1.0)
    sin = jnp.pad(jnp.sin(theta), pad)
    return jnp.concatenate([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1)


def mamba3_mimo_scan(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    x_proj,
    D=None,
    z=None,
    z_proj=None,
    out_proj=None,
    B_bias=None,
    C_bias=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK // 4,
    initial_states: Mamba3State | None = None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    impl: Impl = "auto",
):
    """Mamba-3 MIMO (rank R) scan with resets at segment boundaries: `mamba3_scan`'s rule and
    arguments (impl included: "reference" runs R^2 SSD heads, the kernels one (L R)-long axis a
    head, `_mimo_fused`; chunk_size counts time steps, R tokens each on that axis), with
    per-rank keys and queries and the inputs x_r = x_proj[:, r] * x:

        h_t     = alpha_t h_{t-1} + beta_t sum_r x_{t-1,r} k_{t-1,r}^T + gamma_t sum_r x_{t,r} k_{t,r}^T
        y_{t,r} = h_t q_{t,r} + D x_{t,r},  y_{t,r} *= silu(z_proj[:, r] * z_t) if z is given
        out_t   = sum_r out_proj[:, r] * y_{t,r}          (without out_proj: y (b, t, R, h, p))

    with the halves rotation (pairs (i, i + n / 2)) of mamba_ssm's MIMO kernels.

    Args (beyond mamba3_scan's): B, C (batch, length, R, groups, d_state); x_proj, z_proj,
      out_proj (heads, R, headdim); B_bias, C_bias (heads, R, d_state). initial_states and
      the final states: Mamba3State with k (batch, num_segments, R, heads, d_state) and x the
      input before x_proj (batch, num_segments, heads, headdim), as mamba_ssm's cache.
    """
    num_segments = _check_mimo_args(
        x,
        dt,
        A,
        trap,
        B,
        C,
        angles,
        dict(x_proj=x_proj, z_proj=z_proj, out_proj=out_proj),
        dict(B_bias=B_bias, C_bias=C_bias),
        D,
        z,
        segment_ids,
        chunk_size,
        initial_states,
        return_final_states,
        num_segments,
    )
    impl = resolve_impl(impl, x, B)
    args = (x, dt, A, trap, B, C, angles, x_proj, D, z, z_proj, out_proj, B_bias, C_bias)
    kwargs = dict(
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    if impl != "reference":
        return mamba3_mimo_scan_pallas(*args, interpret=impl == "pallas_interpret", **kwargs)
    return mamba3_mimo_scan_reference(*args, **kwargs)


@functools.partial(
    jax.jit, static_argnames=("chunk_size", "return_final_states", "num_segments", "fused")
)
def mamba3_mimo_scan_reference(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    x_proj,
    D=None,
    z=None,
    z_proj=None,
    out_proj=None,
    B_bias=None,
    C_bias=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK // 4,
    initial_states: Mamba3State | None = None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    fused: bool = False,
):
    """The pure-JAX MIMO scan; `mamba3_mimo_scan`'s arguments (unchecked).

    The state sums R rank-1 inputs per token, and each of the R queries reads it. As SSD
    heads (the default): head (h, r, r') carries input r' (x_{r'}, k_{r'}) and query r, all
    with head h's decay and trapezoid weights; summing over r' gives y_{t,r}. R^2 SISO heads:
    simple and exact, R times the work of the fused form, and an independent check of it.
    fused=True runs the kernels' form (`_mimo_fused`: one (L R)-long axis per head) through
    the same pure-JAX chunked SSD.
    """
    return _mimo(
        ssd_chunked,
        x,
        dt,
        A,
        trap,
        B,
        C,
        angles,
        x_proj,
        D,
        z,
        z_proj,
        out_proj,
        B_bias,
        C_bias,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
        fused=fused,
    )


@functools.partial(
    jax.jit,
    static_argnames=("chunk_size", "return_final_states", "num_segments", "interpret", "config"),
)
def mamba3_mimo_scan_pallas(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    x_proj,
    D=None,
    z=None,
    z_proj=None,
    out_proj=None,
    B_bias=None,
    C_bias=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK // 4,
    initial_states: Mamba3State | None = None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    interpret: bool = False,
    config=None,
):
    """`mamba3_mimo_scan` in its fused form (`_mimo_fused`: h SSD heads on one (L R)-long
    axis) on the Pallas kernels (as `mamba3_scan_pallas`; the per-rank inputs x_proj * x
    enter the matmuls in x's dtype); same arguments (unchecked)."""
    return _mimo(
        _pallas_ssd(interpret, config, x.dtype),
        x,
        dt,
        A,
        trap,
        B,
        C,
        angles,
        x_proj,
        D,
        z,
        z_proj,
        out_proj,
        B_bias,
        C_bias,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
        fused=True,
    )


def _mimo(
    ssd,
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    x_proj,
    D,
    z,
    z_proj,
    out_proj,
    B_bias,
    C_bias,
    *,
    segment_ids,
    chunk_size,
    initial_states,
    return_final_states,
    num_segments,
    fused,
):
    """The MIMO scan around `ssd` (`ssd_chunked` or its kernels' twin), its core in the fused
    form (`_mimo_fused`) or as R^2 heads (`_mimo_heads`)."""
    batch, length, heads, headdim = x.shape
    given_ids = segment_ids
    acc = accumulation_dtype(x)
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if num_segments is None:
        num_segments = 1 if initial_states is None else initial_states.ssm.shape[1]
    starts = segment_starts(segment_ids)
    dt, A = dt.astype(acc), A.astype(acc)
    lam = jax.nn.sigmoid(trap.astype(acc))
    gamma = lam * dt
    next_weight = jnp.where(starts[..., None], 0.0, (1.0 - lam) * dt)
    next_weight = jnp.concatenate([next_weight[:, 1:], jnp.zeros_like(dt[:, :1])], axis=1)
    sigma = gamma + next_weight
    theta = run_cumsum(dt[..., None] * math.pi * jnp.tanh(angles.astype(acc)), starts)
    if initial_states is not None:
        theta = theta + _per_slot_at_tokens(
            initial_states.angle.astype(acc), segment_ids, num_segments
        )

    def keys(a, bias):  # (b, t, R, g, n) -> rotated (b, t, R, h, n)
        a = _heads(a.astype(acc), heads)
        a = a if bias is None else a + jnp.swapaxes(bias.astype(acc), 0, 1)
        return rotate_halves(a, theta[:, :, None])

    k, q = keys(B, B_bias), keys(C, C_bias)
    psi = jnp.swapaxes(x_proj.astype(acc), 0, 1)  # (R, h, p)
    x_r = x.astype(acc)[:, :, None] * psi  # (b, t, R, h, p)
    log_decay = dt * A
    core = _mimo_fused if fused else _mimo_heads
    y, final_ssm = core(
        ssd,
        x_r,
        k,
        q,
        sigma,
        gamma,
        log_decay,
        segment_ids=given_ids,
        chunk_size=chunk_size,
        initial_ssm=None if initial_states is None else initial_states.ssm.astype(acc),
        return_final_states=return_final_states,
        num_segments=num_segments,
    )  # y (b, t, R, h, p)
    if D is not None:
        y = y + D.astype(acc)[:, None] * x_r
    if initial_states is not None:
        first_weight = run_cumsum(jnp.where(starts[..., None], (1.0 - lam) * dt, 0.0), starts)
        carried = first_weight * jnp.exp(run_cumsum(log_decay, starts))  # (b, t, h)
        k0 = jnp.moveaxis(initial_states.k.astype(acc), 2, 3)  # (b, s, h, R, n)
        x0 = initial_states.x.astype(acc)  # (b, s, h, p)
        k0 = _per_slot_at_tokens(k0, segment_ids, num_segments)  # (b, t, h, R, n)
        x0 = _per_slot_at_tokens(x0, segment_ids, num_segments)[:, :, None] * psi
        qk0 = jnp.einsum("btrhn,bthsn->btrhs", q, k0)
        y = y + carried[:, :, None, :, None] * jnp.einsum("btrhs,btshp->btrhp", qk0, x0)
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc)[:, :, None] * jnp.swapaxes(z_proj.astype(acc), 0, 1))
    if out_proj is not None:
        y = jnp.einsum("btrhp,hrp->bthp", y, out_proj.astype(acc))
    y = y.astype(x.dtype)
    if not return_final_states:
        return y

    t = jnp.arange(length)
    is_slot = segment_ids[..., None] == jnp.arange(num_segments)
    last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)
    last_onehot = last[..., None] == t
    if initial_states is not None:
        psi_x0 = initial_states.x.astype(acc)[:, :, None] * psi  # (b, s, R, h, p)
        prev = jnp.einsum("bsrhp,bsrhn->bshpn", psi_x0, initial_states.k.astype(acc))
        final_ssm = final_ssm + _at_slot_last_tokens(carried, last_onehot)[..., None, None] * prev
    final = Mamba3State(
        ssm=final_ssm,
        k=_at_slot_last_tokens(k, last_onehot),
        x=_at_slot_last_tokens(x.astype(acc), last_onehot),
        angle=jnp.mod(_at_slot_last_tokens(theta, last_onehot), 2 * math.pi),
    )
    return y, final


def _mimo_heads(
    ssd,
    x_r,
    k,
    q,
    sigma,
    gamma,
    log_decay,
    *,
    segment_ids,
    chunk_size,
    initial_ssm,
    return_final_states,
    num_segments,
):
    """The MIMO core as R^2 SSD heads: head (h, r, r') has input r' and query r; x_r, k, q
    (b, t, R, h, .), sigma, gamma, log_decay (b, t, h). Returns (y (b, t, R, h, p) before D,
    final ssm (b, s, h, p, n) or None)."""
    batch, length, rank, heads, headdim = x_r.shape
    shape = (batch, length, heads, rank, rank)

    def fused(a, axis_r, n_last):  # (b, t, R, h, n) -> (b, t, h R R, n) along r or r'
        a = jnp.moveaxis(a, 2, 3)  # (b, t, h, R, n)
        a = jnp.expand_dims(a, 4 if axis_r == "r" else 3)
        return jnp.broadcast_to(a, (*shape, n_last)).reshape(batch, length, -1, n_last)

    def per_head(a):  # (b, t, h) -> (b, t, h R R)
        return jnp.broadcast_to(a[..., None, None], shape).reshape(batch, length, -1)

    init = None
    if initial_ssm is not None:  # the slot's state enters once: on the r' = 0 heads
        only_first = (jnp.arange(rank) == 0).astype(initial_ssm.dtype)[:, None, None]
        ssm0 = initial_ssm[:, :, :, None, None] * only_first  # (b, s, h, 1, r', p, n)
        init = jnp.broadcast_to(
            ssm0, (batch, num_segments, heads, rank, rank, headdim, ssm0.shape[-1])
        ).reshape(batch, num_segments, heads * rank * rank, headdim, -1)
    y, final_ssm = ssd(
        fused(x_r, "r'", headdim),
        per_head(sigma),
        per_head(log_decay),
        fused(k, "r'", k.shape[-1]),
        fused(q, "r", q.shape[-1]),
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=init,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    y = y.reshape(*shape, headdim).sum(axis=4)  # (b, t, h, R, p)
    y = jnp.moveaxis(y, 3, 2)  # (b, t, R, h, p)
    qk = jnp.einsum("btrhn,btshn->btrhs", q, k)  # (b, t, R, h, R')
    diag = jnp.einsum("btrhs,btshp->btrhp", qk, x_r)
    y = y + ((gamma - sigma)[:, :, None, :, None]) * diag
    if final_ssm is not None:  # any query r: the state sums the inputs r'
        final_ssm = final_ssm.reshape(
            batch, num_segments, heads, rank, rank, headdim, final_ssm.shape[-1]
        )[:, :, :, 0].sum(axis=3)
    return y, final_ssm


def _mimo_fused(
    ssd,
    x_r,
    k,
    q,
    sigma,
    gamma,
    log_decay,
    *,
    segment_ids,
    chunk_size,
    initial_ssm,
    return_final_states,
    num_segments,
):
    """The MIMO core as h SSD heads on one flattened axis (mamba_ssm's MIMO layout): token
    (t, r) at position t R + r, inputs (x_{t,r}, k_{t,r}) and query q_{t,r}; same arguments and
    returns as `_mimo_heads`, R times less SSD work.

    The log-decay dt_t A_t sits on (t, 0) and 0 on (t, r > 0), so input (s, r') reaches query
    (t, r), t > s, through exp(sum_{u in (s, t]} dt_u A_u) with weight sigma_s: every rank of
    step s, as the recurrence's state sum. At t = s the causal scan takes the inputs r' <= r
    with sigma_t, where the recurrence takes all r' with gamma_t, hence the correction
    y_{t,r} += sum_{r'} (gamma_t - sigma_t [r' <= r]) (q_{t,r} . k_{t,r'}) x_{t,r'}.
    Segment ids repeat R times (a run starts at (t, 0) and decays first there, as the SISO
    scan's initial state does); a slot's final state is the SSD's after its last flattened
    token (t, R - 1), whose sigma is gamma (the run ends there). chunk_size counts time steps
    (mamba_ssm's MIMO chunk_size): the flattened chunk is chunk_size R tokens (the kernels
    round it up to a power of two; the algebra holds on any chunk edges)."""
    batch, length, rank, heads, headdim = x_r.shape

    def flat(a):  # (b, t, R, ...) -> (b, t R, ...), t-major
        return a.reshape(batch, length * rank, *a.shape[3:])

    sigma_r = jnp.broadcast_to(sigma[:, :, None], (batch, length, rank, heads))
    decay_r = jnp.concatenate(
        [log_decay[:, :, None], jnp.zeros((batch, length, rank - 1, heads), log_decay.dtype)],
        axis=2,
    )
    ids = None
    if segment_ids is not None:
        ids = jnp.broadcast_to(segment_ids[:, :, None], (batch, length, rank))
        ids = ids.reshape(batch, length * rank)
    y, final_ssm = ssd(
        flat(x_r),
        flat(sigma_r),
        flat(decay_r),
        flat(k),
        flat(q),
        segment_ids=ids,
        chunk_size=chunk_size * rank,
        initial_states=initial_ssm,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    y = y.reshape(batch, length, rank, heads, headdim)
    # [r, r']: the flattened scan already gave query r the inputs r' <= r of its own step.
    causal = jnp.arange(rank)[None, :] <= jnp.arange(rank)[:, None]
    own_step = gamma[:, :, None, :, None] - jnp.where(
        causal[:, None, :], sigma[:, :, None, :, None], 0.0
    )  # (b, t, R, h, R')
    qk = jnp.einsum("btrhn,btshn->btrhs", q, k)
    y = y + jnp.einsum("btrhs,btshp->btrhp", own_step * qk, x_r)
    return y, final_ssm


def _check_mimo_args(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    projections,
    biases,
    D,
    z,
    segment_ids,
    chunk_size,
    initial_states,
    return_final_states,
    num_segments,
) -> int | None:
    """_check_args for the MIMO scan: its SISO checks on rank 0's B and C, then the ranks."""
    b_shape = tuple(np.shape(B))
    if len(b_shape) != 5:
        raise ValueError(
            f"B must be (batch, length, R, groups, d_state) for the MIMO scan, got {b_shape}"
        )
    rank, d_state = b_shape[2], b_shape[4]
    if tuple(np.shape(C)) != b_shape:
        raise ValueError(f"C must have B's shape {b_shape}, got {tuple(np.shape(C))}")
    heads, headdim = np.shape(x)[2:] if np.ndim(x) == 4 else (None, None)
    if projections["x_proj"] is None:
        raise ValueError("x_proj (heads, R, headdim) is required by the MIMO scan")
    for name, a in projections.items():
        if a is not None and tuple(np.shape(a)) != (heads, rank, headdim):
            raise ValueError(
                f"{name} must have shape (heads, R, headdim) = {(heads, rank, headdim)}, "
                f"got {tuple(np.shape(a))}"
            )
    if z is not None and projections["z_proj"] is None:
        raise ValueError("z needs z_proj (heads, R, headdim) in the MIMO scan")
    for name, a in biases.items():
        if a is not None and tuple(np.shape(a)) != (heads, rank, d_state):
            raise ValueError(
                f"{name} must have shape (heads, R, d_state) = {(heads, rank, d_state)}, "
                f"got {tuple(np.shape(a))}"
            )
    if initial_states is not None:
        if not isinstance(initial_states, Mamba3State):
            raise ValueError(
                f"initial_states must be a Mamba3State, got {type(initial_states).__name__}"
            )
        k_shape = tuple(np.shape(initial_states.k))
        if len(k_shape) != 5 or k_shape[2] != rank:
            raise ValueError(
                f"initial_states.k must be (batch, num_segments, R={rank}, heads, d_state), "
                f"got {k_shape}"
            )
        # The SISO checks see rank 0's keys.
        initial_states = initial_states._replace(
            k=jax.ShapeDtypeStruct(k_shape[:2] + k_shape[3:], jnp.float32)
        )
    rank0 = jax.ShapeDtypeStruct(b_shape[:2] + b_shape[3:], jnp.result_type(B))
    return _check_args(
        x,
        dt,
        A,
        trap,
        rank0,
        rank0,
        angles,
        D,
        z,
        None,
        None,
        segment_ids,
        chunk_size,
        initial_states,
        return_final_states,
        num_segments,
    )


def _check_args(
    x,
    dt,
    A,
    trap,
    B,
    C,
    angles,
    D,
    z,
    B_bias,
    C_bias,
    segment_ids,
    chunk_size,
    initial_states,
    return_final_states,
    num_segments,
) -> int | None:
    """Validates shapes, dtypes and ids before anything runs; returns the resolved
    num_segments."""
    x_shape = tuple(np.shape(x))
    if len(x_shape) != 4:
        raise ValueError(f"x must be (batch, length, heads, headdim), got shape {x_shape}")
    batch, length, heads, headdim = x_shape
    if length == 0:
        raise ValueError(f"length must be at least 1, got x with shape {x_shape}")
    b_shape = tuple(np.shape(B))
    if len(b_shape) != 4 or b_shape[:2] != (batch, length):
        raise ValueError(
            f"B must be (batch, length, groups, d_state) with (batch, length) = "
            f"{(batch, length)}, got shape {b_shape}"
        )
    groups, d_state = b_shape[2:]
    if groups < 1 or heads % groups:
        raise ValueError(
            f"heads={heads} (x's axis 2) must be a multiple of groups={groups} (B's axis 2)"
        )
    a_shape = tuple(np.shape(angles))
    if len(a_shape) != 4 or a_shape[:3] != (batch, length, heads):
        raise ValueError(
            f"angles must be (batch, length, heads, n_angles) = "
            f"{(batch, length, heads, 'n_angles')}, got shape {a_shape}"
        )
    n_angles = a_shape[3]
    if not 1 <= n_angles <= d_state // 2:
        raise ValueError(
            f"angles' last axis must be in [1, d_state / 2 = {d_state // 2}], got {n_angles}"
        )
    per_token = (batch, length, heads)
    expected = dict(
        dt=per_token,
        A=per_token,
        trap=per_token,
        C=b_shape,
        D=(heads,),
        z=x_shape,
        B_bias=(heads, d_state),
        C_bias=(heads, d_state),
    )
    given = dict(dt=dt, A=A, trap=trap, C=C, D=D, z=z, B_bias=B_bias, C_bias=C_bias)
    for name, a in given.items():
        if a is not None and tuple(np.shape(a)) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} to match x {x_shape} and B "
                f"{b_shape}, got {tuple(np.shape(a))}"
            )
    state_slots = None
    if initial_states is not None:
        if not isinstance(initial_states, Mamba3State):
            raise ValueError(
                f"initial_states must be a Mamba3State, got {type(initial_states).__name__}"
            )
        state_slots = np.shape(initial_states.ssm)[1] if np.ndim(initial_states.ssm) > 1 else 0
        want = dict(
            ssm=(batch, state_slots, heads, headdim, d_state),
            k=(batch, state_slots, heads, d_state),
            x=(batch, state_slots, heads, headdim),
            angle=(batch, state_slots, heads, n_angles),
        )
        for name, shape in want.items():
            got = tuple(np.shape(getattr(initial_states, name)))
            if got != shape:
                raise ValueError(
                    f"initial_states.{name} must have shape (batch, num_segments, ...) = "
                    f"{shape}, got {got}"
                )
        if num_segments is not None and num_segments != state_slots:
            raise ValueError(
                f"num_segments={num_segments!r} must equal the initial states' slots {state_slots}"
            )
        num_segments = state_slots
    floats = dict(x=x, angles=angles, B=B, **given)
    if initial_states is not None:
        floats.update({f"initial_states.{k}": v for k, v in initial_states._asdict().items()})
    for name, a in floats.items():
        if a is not None and not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(
                f"{name} must be a real floating array, got dtype {jnp.result_type(a)}"
            )
    check_segment_ids(segment_ids, batch, length)
    return check_chunk_and_slots(
        segment_ids,
        chunk_size,
        num_segments,
        return_final_states=return_final_states,
        initial_states_given=initial_states is not None,
    )
