"""The Mamba-3 (SISO) mixer and its gated MLP (model.py's Block and LM run them when the config
is a Mamba3Config).

Axis letters: b batch, t time, d d_model, e d_inner, h heads, p headdim, g groups, n d_state,
a rotary angles, s segment slot, f the MLP's hidden width.

The mixer is mamba_ssm 2.3.2's Mamba3 (modules/mamba3.py): one in_proj to
[z (e), x (e), B (R g n), C (R g n), dd_dt (h), dd_A (h), trap (h), angles (a)] (no conv;
R = mimo_rank with is_mimo, else 1);
dt = softplus(dd_dt + dt_bias), A = -max(softplus(dd_A), A_floor), per token; B and C through
an RMSNorm over n (B_norm, C_norm), the per-head B_bias and C_bias added in the scan; the
angles shared by the heads; jp's mamba3_scan with D (impl = config.scan_impl); then
y * silu(z), or with is_outproj_norm a gated RMSNorm per head (norm before the gate);
out_proj. MIMO: jp's mamba3_mimo_scan (the same impl) with mimo_x, mimo_z, mimo_o (h, R, p)
(with is_outproj_norm the norm runs per rank, before mimo_o sums the ranks, as mamba_ssm's
module does); its decode step is that scan over one token from the cache. Parameters are
float32 and named as mamba_ssm's (B_bias and C_bias keep its (h, R, n) shape).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import Mamba3Config
from jax_packmamba.layers import RMSNorm, dt_bias_init, torch_linear_init
from jax_packmamba.ops.mamba3 import (
    Mamba3State,
    mamba3_mimo_scan,
    mamba3_scan,
    mamba3_state_update,
)
from jax_packmamba.ops.ssd_scan import IMPLS as SSD_IMPLS


class RMSNormGatedBefore(nnx.Module):
    """mamba_ssm's gated RMSNorm with norm_before_gate=True: x normalised over each group of
    `group_size` channels, times a per-channel weight, times silu(z). float32 inside."""

    def __init__(self, dim: int, *, group_size: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.group_size = group_size
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x, z):
        x = x.astype(jnp.float32)
        groups = x.reshape(*x.shape[:-1], -1, self.group_size)
        groups = groups * jax.lax.rsqrt(
            jnp.mean(jnp.square(groups), axis=-1, keepdims=True) + self.eps
        )
        y = groups.reshape(x.shape) * self.weight[...] * jax.nn.silu(z.astype(jnp.float32))
        return y.astype(self.dtype)


class GatedMLP(nnx.Module):
    """mamba_ssm's GatedMLP: fc1 to [y, gate] (f each), fc2(y * silu(gate))."""

    def __init__(self, config: Mamba3Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.mlp_hidden
        linear = dict(
            use_bias=False, dtype=config.compute_dtype, param_dtype=jnp.float32, rngs=rngs
        )
        self.fc1 = nnx.Linear(d, 2 * f, kernel_init=torch_linear_init(), **linear)
        out_scale = 1.0 / math.sqrt(config.n_layer) if config.rescale_prenorm_residual else 1.0
        self.fc2 = nnx.Linear(f, d, kernel_init=torch_linear_init(out_scale), **linear)

    def __call__(self, hidden):
        y, gate = jnp.split(self.fc1(hidden), 2, axis=-1)
        return self.fc2(y * jax.nn.silu(gate))


class Mamba3Mixer(nnx.Module):
    """in_proj -> B/C norms -> Mamba-3 scan (rotary, trapezoid) -> gate -> out_proj."""

    scan_impls = SSD_IMPLS  # config.scan_impl's values
    pallas_decode = False  # decode_impl is "xla" only

    def __init__(self, config: Mamba3Config, *, rngs: nnx.Rngs):
        self.config = config
        d, e, h, n = config.d_model, config.d_inner, config.nheads, config.d_state
        dtype = config.compute_dtype
        linear = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.in_proj = nnx.Linear(d, config.d_in_proj, kernel_init=torch_linear_init(), **linear)
        self.dt_bias = nnx.Param(dt_bias_init(config)(rngs.params(), (h,)))
        R = config.rank
        self.B_bias = nnx.Param(jnp.ones((h, R, n), jnp.float32))
        self.C_bias = nnx.Param(jnp.ones((h, R, n), jnp.float32))
        if config.is_mimo:  # mamba_ssm's initial values
            p = config.headdim
            self.mimo_x = nnx.Param(jnp.full((h, R, p), 1.0 / R, jnp.float32))
            self.mimo_z = nnx.Param(jnp.ones((h, R, p), jnp.float32))
            self.mimo_o = nnx.Param(jnp.full((h, R, p), 1.0 / R, jnp.float32))
        self.B_norm = RMSNorm(n, eps=1e-5, dtype=dtype)
        self.C_norm = RMSNorm(n, eps=1e-5, dtype=dtype)
        self.D = nnx.Param(jnp.ones((h,), jnp.float32))
        self.norm = (
            RMSNormGatedBefore(e, group_size=config.headdim, eps=1e-5, dtype=dtype)
            if config.is_outproj_norm
            else None
        )
        out_scale = 1.0 / math.sqrt(config.n_layer) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(e, d, kernel_init=torch_linear_init(out_scale), **linear)

    def __call__(
        self,
        hidden,
        segment_ids=None,
        cache: Mamba3State | None = None,
        *,
        num_segments: int | None = None,
        decode_impl: str = "xla",
        continues=None,
    ):
        """MambaMixer.__call__'s contract: hidden (b, t, d) -> (out, None); with num_segments
        each slot's Mamba3State (b, s, ...); with a cache (Mamba3State (b, ...)), one token
        (b, d) -> (out (b, d), next cache)."""
        if continues is not None:
            raise ValueError("continues (rows linked across) is not supported for Mamba-3 yet")
        config = self.config
        if config.is_mimo:
            return self._mimo(hidden, segment_ids, cache, num_segments)
        z, x, B, C, dt, A, trap, angles = self._inputs(self.in_proj(hidden))
        biases = self.B_bias[...][:, 0], self.C_bias[...][:, 0]
        gate = None if self.norm is not None else z
        if cache is not None:
            cache, y = mamba3_state_update(
                cache, x, dt, A, trap, B, C, angles, self.D[...], gate, *biases
            )
        else:
            if num_segments is not None and segment_ids is None:
                segment_ids = jnp.zeros(hidden.shape[:2], jnp.int32)
            result = mamba3_scan(
                x,
                dt,
                A,
                trap,
                B,
                C,
                angles,
                self.D[...],
                gate,
                *biases,
                segment_ids=segment_ids,
                chunk_size=config.chunk_size,
                return_final_states=num_segments is not None,
                num_segments=num_segments,
                impl=config.scan_impl,
            )
            y, cache = result if num_segments is not None else (result, None)
        y = y.reshape(*y.shape[:-2], config.d_inner)
        if self.norm is not None:
            y = self.norm(y, z.reshape(y.shape))
        return self.out_proj(y.astype(config.compute_dtype)), cache

    def _mimo(self, hidden, segment_ids, cache, num_segments):
        """__call__ for is_mimo; a decode step is the scan over one token from the cache."""
        config = self.config
        step = cache is not None
        if step:  # one token (b, d) as a sequence of one, the cache as slot 0
            hidden = hidden[:, None]
            cache = jax.tree.map(lambda a: a[:, None], cache)
            num_segments = 1
        elif num_segments is not None and segment_ids is None:
            segment_ids = jnp.zeros(hidden.shape[:2], jnp.int32)
        z, x, B, C, dt, A, trap, angles = self._inputs(self.in_proj(hidden))
        norm = self.norm is not None
        result = mamba3_mimo_scan(
            x,
            dt,
            A,
            trap,
            B,
            C,
            angles,
            self.mimo_x[...],
            self.D[...],
            None if norm else z,
            None if norm else self.mimo_z[...],
            None if norm else self.mimo_o[...],
            self.B_bias[...],
            self.C_bias[...],
            segment_ids=segment_ids,
            chunk_size=config.chunk_size,
            initial_states=cache,
            return_final_states=num_segments is not None,
            num_segments=num_segments,
            impl=config.scan_impl,
        )
        y, cache = result if num_segments is not None else (result, None)
        if norm:  # per rank: norm(y_r, mimo_z_r z), then mimo_o sums the ranks
            z_r = z.astype(jnp.float32)[..., None, :, :] * jnp.swapaxes(self.mimo_z[...], 0, 1)
            lead = y.shape[:-2]
            y = self.norm(
                y.reshape(*lead, config.d_inner), z_r.reshape(*lead, config.d_inner)
            ).reshape(y.shape)
            y = jnp.einsum("...rhp,hrp->...hp", y.astype(jnp.float32), self.mimo_o[...])
        out = self.out_proj(y.reshape(*y.shape[:-2], config.d_inner).astype(config.compute_dtype))
        if step:
            return out[:, 0], jax.tree.map(lambda a: a[:, 0], cache)
        return out, cache

    def _inputs(self, proj):
        """in_proj's output (..., d_in_proj) -> z, x (..., h, p); B, C normed (..., g, n);
        dt, A, trap (..., h) float32; angles (..., h, a), shared by the heads."""
        config = self.config
        e, h, p, g, n = (
            config.d_inner,
            config.nheads,
            config.headdim,
            config.ngroups,
            config.d_state,
        )
        R = config.rank
        sizes = [e, e, R * g * n, R * g * n, h, h, h, config.num_rope_angles]
        edges = [sum(sizes[:i]) for i in range(1, len(sizes))]
        z, x, B, C, dd_dt, dd_A, trap, angles = jnp.split(proj, edges, axis=-1)
        lead = proj.shape[:-1]
        dt = jax.nn.softplus(dd_dt.astype(jnp.float32) + self.dt_bias[...])
        A = -jnp.maximum(jax.nn.softplus(dd_A.astype(jnp.float32)), config.A_floor)
        angles = jnp.broadcast_to(
            angles.astype(jnp.float32)[..., None, :], (*lead, h, config.num_rope_angles)
        )
        rank = (R,) if config.is_mimo else ()  # mamba_ssm's (r g n) order
        return (
            z.reshape(*lead, h, p),
            x.reshape(*lead, h, p),
            self.B_norm(B.reshape(*lead, *rank, g, n)),
            self.C_norm(C.reshape(*lead, *rank, g, n)),
            dt,
            A,
            trap.astype(jnp.float32),
            angles,
        )
