"""Plain per-timestep loops: the definitions the reference ops and kernels are checked against.

Written for clarity, not speed; run them under `jax.enable_x64(True)` on float64 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64: the error measure every tolerance here is set for."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def selective_scan_loop(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus=False,
    segment_ids=None,
    initial_states=None,
):
    """One step at a time; returns (y, states) with states (b, t, d, n) after each step. A run
    of id s (a new run wherever the id changes, and at t = 0) starts from
    initial_states[b, s] (zeros without them)."""
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = jnp.log1p(jnp.exp(delta))
    batch, length, d_inner = u.shape
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    previous_ids = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
    new_segment = segment_ids != previous_ids

    def step(h, xs):
        u_t, delta_t, B_t, C_t, new_t, id_t = xs
        start = 0.0
        if initial_states is not None:
            start = jnp.asarray(initial_states)[jnp.arange(batch), id_t]
        h = jnp.where(new_t[:, None, None], start, h)
        h = jnp.exp(delta_t[:, :, None] * A) * h + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
        return h, (jnp.einsum("bdn,bn->bd", h, C_t), h)

    h0 = jnp.zeros((batch, d_inner, A.shape[1]), u.dtype)
    time_major = [jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C, new_segment, segment_ids)]
    _, (y, states) = jax.lax.scan(step, h0, time_major)
    y, states = jnp.swapaxes(y, 0, 1), jnp.swapaxes(states, 0, 1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * z * jax.nn.sigmoid(z)
    return y, states


def causal_conv1d_loop(x, weight, bias=None, *, segment_ids=None, activation=None):
    """out[t] = bias + sum_k w[:, k] x[t - (width - 1) + k], taps before t's segment read 0.

    One step at a time (a scan over t, not unrolled: unrolled, its gradient took seconds to
    compile per shape); step t walks back from t while still inside t's segment."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)

    def back(a, lag):
        """a[:, t - lag] at every t (zeros before the row), time-major."""
        pad = jnp.zeros((batch, min(lag, length), *a.shape[2:]), a.dtype)
        return jnp.swapaxes(jnp.concatenate([pad, a[:, : max(length - lag, 0)]], axis=1), 0, 1)

    taps = [back(x, lag) for lag in range(width)]  # step t's x[t - lag], lag = 0, 1, ...
    ids = [back(segment_ids, lag) for lag in range(width)]
    in_row = [jnp.arange(length) >= lag for lag in range(width)]  # t - lag >= 0

    def step(_, xs):
        taps_t, ids_t, in_row_t = xs
        acc = (
            jnp.zeros((batch, channels), x.dtype)
            if bias is None
            else jnp.broadcast_to(bias, (batch, channels))
        )
        # Walk back from t while still inside t's segment (and the row).
        inside = jnp.ones((batch,), bool)
        for lag in range(width):
            if lag > 0:
                inside = inside & in_row_t[lag] & (ids_t[lag] == ids_t[lag - 1])
            acc = acc + jnp.where(inside[:, None], taps_t[lag] * weight[:, width - 1 - lag], 0.0)
        return None, acc

    _, out = jax.lax.scan(step, None, (taps, ids, in_row))
    out = jnp.swapaxes(out, 0, 1)
    if activation == "silu":
        out = out * jax.nn.sigmoid(out)
    return out


def ssd_scan_loop(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    *,
    dt_softplus=False,
    segment_ids=None,
    initial_states=None,
):
    """Mamba2's recurrence one step at a time; returns (y, states) with states (b, t, h, p, n)
    after each step. Head h reads group h // (heads // groups) of B and C; a run of id s (a
    new run wherever the id changes, and at t = 0) starts from initial_states[b, s] (zeros
    without them)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = jnp.log1p(jnp.exp(dt))
    batch, length, heads, headdim = x.shape
    per_group = heads // B.shape[2]
    B, C = jnp.repeat(B, per_group, axis=2), jnp.repeat(C, per_group, axis=2)  # (b, t, h, n)
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    previous_ids = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
    new_segment = segment_ids != previous_ids
    state_shape = (batch, heads, headdim, B.shape[-1])

    def step(h, xs):
        x_t, dt_t, B_t, C_t, new_t, id_t = xs
        if initial_states is None:
            start = jnp.zeros(state_shape, x.dtype)
        else:
            start = initial_states[jnp.arange(batch), id_t]
        h = jnp.where(new_t[:, None, None, None], start, h)
        h = (
            jnp.exp(dt_t * A)[:, :, None, None] * h
            + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        )
        return h, (jnp.einsum("bhpn,bhn->bhp", h, C_t), h)

    time_major = [jnp.swapaxes(a, 0, 1) for a in (x, dt, B, C, new_segment, segment_ids)]
    _, (y, states) = jax.lax.scan(step, jnp.zeros(state_shape, x.dtype), time_major)
    y, states = jnp.swapaxes(y, 0, 1), jnp.swapaxes(states, 0, 1)
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * z * jax.nn.sigmoid(z)
    return y, states


def attention_loop(q, k, v, g, *, segment_ids, causal=True, scale=None):
    """Attention and its gradients one query at a time in float64 numpy: returns (out, dq, dk,
    dv) for cotangent g (out's shape). Query t of head h sees the keys s of head h // (h / k)
    in t's run of equal segment_ids (s <= t when causal); a new run begins wherever the id
    changes, so a repeated id after another is a new segment."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    ids = np.asarray(segment_ids)
    batch, length, heads, head_dim = q.shape
    per_kv = heads // k.shape[2]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out, dq, dk, dv = (np.zeros_like(a) for a in (q, q, k, v))
    for b in range(batch):
        run = np.cumsum(np.r_[True, ids[b, 1:] != ids[b, :-1]])
        for t in range(length):
            keys = [s for s in range(length) if run[s] == run[t] and (s <= t or not causal)]
            for h in range(heads):
                j = h // per_kv
                logits = np.array([scale * q[b, t, h] @ k[b, s, j] for s in keys])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, t, h] = sum(p_s * v[b, s, j] for p_s, s in zip(p, keys))
                dp = np.array([g[b, t, h] @ v[b, s, j] for s in keys])
                ds = p * (dp - p @ dp)
                for p_s, ds_s, s in zip(p, ds, keys):
                    dv[b, s, j] += p_s * g[b, t, h]
                    dq[b, t, h] += scale * ds_s * k[b, s, j]
                    dk[b, s, j] += scale * ds_s * q[b, t, h]
    return out, dq, dk, dv


def rope_formula(x, positions, *, theta, rotary_dim):
    """Rotary embedding in float64 numpy, pair (i, i + r/2) of the first r channels turned by
    position * theta ** (-2 i / r), as HF Llama's rotate_half writes it."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    half = rotary_dim // 2
    for i in range(half):
        angle = np.asarray(positions, np.float64) * theta ** (-2.0 * i / rotary_dim)
        c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def rms_norm_groups_loop(v, weight, eps, group_size):
    """RMSNorm of each row of v (..., c), one group of group_size columns at a time, times
    weight (c,); the float64 definition the norm ops are checked against."""
    out = []
    for c0 in range(0, v.shape[-1], group_size):
        g = v[..., c0 : c0 + group_size]
        ms = jnp.sum(g * g, axis=-1, keepdims=True) / group_size
        out.append(g / jnp.sqrt(ms + eps) * weight[c0 : c0 + group_size])
    return jnp.concatenate(out, axis=-1)


def mamba3_loop(
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
    initial_states=None,
):
    """Mamba-3 SISO one step at a time, from its recurrence (jax_packmamba/ops/mamba3.py):
    h_t = alpha_t h_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T, y_t = h_t q_t + D x_t.
    A run (new wherever the id changes, and at t = 0) starts from initial_states[b, s] = (h,
    k, x, theta) (zeros without). Returns (y, (h, k, x, theta) after every step (b, t, ...))."""
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    n_angles = angles.shape[-1]
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    previous_ids = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
    new_segment = segment_ids != previous_ids
    B = jnp.repeat(B, heads // groups, axis=2)
    C = jnp.repeat(C, heads // groups, axis=2)
    if B_bias is not None:
        B = B + B_bias
    if C_bias is not None:
        C = C + C_bias
    rows = jnp.arange(batch)

    def rotate(v, theta):  # pairs (2i, 2i + 1), i < n_angles
        out = v
        for i in range(n_angles):
            c, s = jnp.cos(theta[..., i]), jnp.sin(theta[..., i])
            v0, v1 = v[..., 2 * i], v[..., 2 * i + 1]
            out = out.at[..., 2 * i].set(v0 * c - v1 * s).at[..., 2 * i + 1].set(v0 * s + v1 * c)
        return out

    def step(carry, xs):
        h, k_prev, x_prev, theta = carry
        x_t, dt_t, A_t, trap_t, B_t, C_t, ang_t, new_t, id_t = xs
        if initial_states is None:
            starts = [jnp.zeros_like(a) for a in carry]
        else:
            starts = [jnp.asarray(a)[rows, id_t] for a in initial_states]
        h, k_prev, x_prev, theta = (
            jnp.where(new_t.reshape(-1, *[1] * (a.ndim - 1)), s, a)
            for a, s in zip((h, k_prev, x_prev, theta), starts)
        )
        theta = theta + dt_t[..., None] * jnp.pi * jnp.tanh(ang_t)
        k_t, q_t = rotate(B_t, theta), rotate(C_t, theta)
        lam = 1.0 / (1.0 + jnp.exp(-trap_t))
        alpha = jnp.exp(dt_t * A_t)
        beta = (1.0 - lam) * dt_t * alpha
        gamma = lam * dt_t
        h = (
            alpha[..., None, None] * h
            + beta[..., None, None] * x_prev[..., :, None] * k_prev[..., None, :]
            + gamma[..., None, None] * x_t[..., :, None] * k_t[..., None, :]
        )
        y = jnp.einsum("bhpn,bhn->bhp", h, q_t)
        carry = (h, k_t, x_t, theta)
        return carry, (y, carry)

    zeros = jnp.zeros
    carry0 = (
        zeros((batch, heads, headdim, d_state), x.dtype),
        zeros((batch, heads, d_state), x.dtype),
        zeros((batch, heads, headdim), x.dtype),
        zeros((batch, heads, n_angles), x.dtype),
    )
    time_major = [
        jnp.swapaxes(a, 0, 1) for a in (x, dt, A, trap, B, C, angles, new_segment, segment_ids)
    ]
    _, (y, states) = jax.lax.scan(step, carry0, time_major)
    y = jnp.swapaxes(y, 0, 1)
    states = tuple(jnp.swapaxes(s, 0, 1) for s in states)
    if D is not None:
        y = y + x * D[:, None]
    if z is not None:
        y = y * z * jax.nn.sigmoid(z)
    return y, states


def mamba3_mimo_loop(
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
    initial_states=None,
):
    """Mamba-3 MIMO (rank R) one step at a time, from its recurrence
    (jax_packmamba/ops/mamba3.py's mamba3_mimo_scan), the halves rotation (i, i + n / 2).
    Returns (out, (h, k (b, t, R, h, n), x, theta) after every step)."""
    batch, length, heads, headdim = x.shape
    rank, groups, d_state = B.shape[2:]
    n_angles = angles.shape[-1]
    half = d_state // 2
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    previous_ids = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
    new_segment = segment_ids != previous_ids
    B = jnp.repeat(B, heads // groups, axis=3)  # (b, t, R, h, n)
    C = jnp.repeat(C, heads // groups, axis=3)
    if B_bias is not None:
        B = B + jnp.swapaxes(B_bias, 0, 1)
    if C_bias is not None:
        C = C + jnp.swapaxes(C_bias, 0, 1)
    psi = jnp.swapaxes(x_proj, 0, 1)  # (R, h, p)
    rows = jnp.arange(batch)

    def rotate(v, theta):  # v (b, R, h, n), theta (b, h, a)
        out = v
        for i in range(n_angles):
            c, s = jnp.cos(theta[:, None, :, i]), jnp.sin(theta[:, None, :, i])
            v0, v1 = v[..., i], v[..., half + i]
            out = out.at[..., i].set(v0 * c - v1 * s).at[..., half + i].set(v0 * s + v1 * c)
        return out

    def step(carry, xs):
        h, k_prev, x_prev, theta = carry
        x_t, dt_t, A_t, trap_t, B_t, C_t, ang_t, new_t, id_t = xs
        if initial_states is None:
            starts = [jnp.zeros_like(a) for a in carry]
        else:
            starts = [jnp.asarray(a)[rows, id_t] for a in initial_states]
        h, k_prev, x_prev, theta = (
            jnp.where(new_t.reshape(-1, *[1] * (a.ndim - 1)), s, a)
            for a, s in zip((h, k_prev, x_prev, theta), starts)
        )
        theta = theta + dt_t[..., None] * jnp.pi * jnp.tanh(ang_t)
        k_t, q_t = rotate(B_t, theta), rotate(C_t, theta)
        lam = 1.0 / (1.0 + jnp.exp(-trap_t))
        alpha = jnp.exp(dt_t * A_t)
        beta = (1.0 - lam) * dt_t * alpha
        gamma = lam * dt_t
        xr_prev = x_prev[:, None] * psi  # (b, R, h, p)
        xr_t = x_t[:, None] * psi
        h = (
            alpha[..., None, None] * h
            + beta[..., None, None] * jnp.einsum("brhp,brhn->bhpn", xr_prev, k_prev)
            + gamma[..., None, None] * jnp.einsum("brhp,brhn->bhpn", xr_t, k_t)
        )
        y = jnp.einsum("bhpn,brhn->brhp", h, q_t)
        if D is not None:
            y = y + D[:, None] * xr_t
        carry = (h, k_t, x_t, theta)
        return carry, (y, carry)

    zeros = jnp.zeros
    carry0 = (
        zeros((batch, heads, headdim, d_state), x.dtype),
        zeros((batch, rank, heads, d_state), x.dtype),
        zeros((batch, heads, headdim), x.dtype),
        zeros((batch, heads, n_angles), x.dtype),
    )
    time_major = [
        jnp.swapaxes(a, 0, 1) for a in (x, dt, A, trap, B, C, angles, new_segment, segment_ids)
    ]
    _, (y, states) = jax.lax.scan(step, carry0, time_major)
    y = jnp.swapaxes(y, 0, 1)  # (b, t, R, h, p)
    states = tuple(jnp.swapaxes(s, 0, 1) for s in states)
    if z is not None:
        zr = z[:, :, None] * jnp.swapaxes(z_proj, 0, 1)
        y = y * zr * jax.nn.sigmoid(zr)
    if out_proj is not None:
        y = jnp.einsum("btrhp,hrp->bthp", y, out_proj)
    return y, states
