"""Mamba-3 (SISO) scan with state resets at segment boundaries: public op, chunked reference and
the recurrent step.

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
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.segments import check_segment_ids, check_segment_slots, segment_starts
from jax_packmamba.ops.selective_scan import accumulation_dtype, run_cumsum
from jax_packmamba.ops.ssd_scan import ssd_chunked

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
    return mamba3_scan_reference(
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
    batch, length, heads, headdim = x.shape
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
    y, final_ssm = ssd_chunked(
        x,
        sigma,
        log_decay,
        k,
        q,
        segment_ids=segment_ids,
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
    if (
        not isinstance(chunk_size, (int, np.integer))
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if num_segments is None and return_final_states:
        if segment_ids is not None:
            raise ValueError(
                "return_final_states with segment_ids needs num_segments (ids must "
                "lie in [0, num_segments))"
            )
        num_segments = 1
    if num_segments is not None:
        if (
            not isinstance(num_segments, (int, np.integer))
            or isinstance(num_segments, bool)
            or num_segments < 1
        ):
            raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
        check_segment_slots(
            segment_ids,
            num_segments,
            used_by="return_final_states" if return_final_states else "initial_states",
        )
    return num_segments
