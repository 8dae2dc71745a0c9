"""The Mamba2 mixer (model.py's Block and LM run it when the config is a Mamba2Config).

Axis letters: b batch, t time, d d_model, e d_inner, h heads, p headdim, g groups, n d_state,
x conv channels (conv_dim = e + 2 g n), w d_conv, s segment slot, v vocabulary.

The mixer is mamba_ssm's Mamba2 (its unfused path): in_proj to [z (e), xBC (x), dt (h)]; a
depthwise causal conv with silu over xBC; x, B, C split from it into (h, p), (g, n), (g, n);
the SSD scan with dt_bias, softplus, D per head and A = -exp(A_log); then y * silu(z) normalised
per group of e / g channels (gated RMSNorm with the norm after the gate); out_proj. Parameters
are float32; activations run in `config.dtype` while the residual stream, norms and the scan
state stay float32. Initialisation follows mamba_ssm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_packmamba.config import REMAT_RECOMPUTING_SSD_STATES, Mamba2Config
from jax_packmamba.layers import (
    CONV,
    MIXER_CORE,
    OUT_PROJ_INPUT,
    PROJECTION,
    MixerState,
    ScaledOut,
    check_end_state_call,
    conv_window,
    decode_add_norm,
    dt_bias_init,
    row_end_state,
    saved,
    segment_caches,
    torch_linear_init,
)
from jax_packmamba.ops import (
    causal_conv1d,
    causal_conv1d_step,
    gated_rms_norm,
    ssd_scan,
    ssd_state_update,
)
from jax_packmamba.ops.rms_norm import group_rms_norm
from jax_packmamba.ops.ssd_scan import IMPLS as SSD_IMPLS


def defers_norm(config, impl: str) -> bool:
    """Whether a decode step through `impl` leaves a Mamba2 block's gated norm scale to the
    next residual add (Mamba2Mixer's defer_norm: the Pallas step, a norm over all channels,
    where pallas_kernels.decode.config.MAMBA2_DEFER_NORM, read at each call, allows)."""
    if impl == "xla" or not isinstance(config, Mamba2Config) or config.ngroups != 1:
        return False
    from pallas_kernels.decode import config as decode_config

    return decode_config.MAMBA2_DEFER_NORM


def no_output(config: Mamba2Config, batch: int) -> ScaledOut:
    """A ScaledOut whose value is zeros (b, d): the first block's `pending` where the others
    are ScaledOuts, so that one traced layer step serves every layer."""
    from pallas_kernels.decode import norm_parts

    parts = norm_parts(config.nheads, config.headdim)
    return ScaledOut(
        jnp.zeros((batch, config.d_model), config.compute_dtype),
        jnp.ones((batch, parts), jnp.float32),  # any finite scale: 0 times it is 0
        config.d_inner,
        config.rms_norm_eps,
    )


class RMSNormGated(nnx.Module):
    """mamba_ssm's gated RMSNorm with norm_before_gate=False: (x * silu(z)) normalised over each
    group of `group_size` channels, times a per-channel weight. Computed in float32; returns
    `dtype`. impl: jax_packmamba.ops.gated_rms_norm's ("auto": the Triton kernels on a GPU)."""

    def __init__(self, dim: int, *, group_size: int, eps: float, dtype, impl: str = "auto"):
        if dim % group_size:
            raise ValueError(
                f"RMSNormGated: dim={dim} must be a multiple of group_size={group_size}"
            )
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.group_size = group_size
        self.eps = eps
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x, z):
        """x, z (..., e) -> (..., e) `dtype`."""
        return gated_rms_norm(
            x,
            z,
            self.weight[...],
            group_size=self.group_size,
            eps=self.eps,
            out_dtype=self.dtype,
            impl=self.impl,
        )

    def gated(self, v):
        """The same norm of v = x * silu(z) (..., e) float32, already gated."""
        return group_rms_norm(
            v, self.weight[...], group_size=self.group_size, eps=self.eps, out_dtype=self.dtype
        )


def A_log_init(config: Mamba2Config):
    """log(A) with A ~ U(A_init_range), one per head (A = -exp(A_log) in the scan)."""

    def init(key, shape, dtype=jnp.float32):
        low, high = config.A_init_range
        return jnp.log(jax.random.uniform(key, shape, dtype, low, high))

    return init


class Mamba2Mixer(nnx.Module):
    """in_proj -> segment-aware causal conv over xBC -> SSD scan -> gated RMSNorm -> out_proj."""

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
        self.config = config
        d, e, h = config.d_model, config.d_inner, config.nheads
        dtype = config.compute_dtype
        linear = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.in_proj = nnx.Linear(
            d,
            config.d_in_proj,
            use_bias=config.proj_bias,
            kernel_init=torch_linear_init(),
            **linear,
        )
        # Depthwise conv as torch's Conv1d(groups=channels) default: U(+-1/sqrt(width)) for weight and bias.
        conv_bound = 1.0 / math.sqrt(config.d_conv)
        self.conv_weight = nnx.Param(
            jax.random.uniform(
                rngs.params(),
                (config.conv_dim, config.d_conv),
                jnp.float32,
                -conv_bound,
                conv_bound,
            )
        )
        self.conv_bias = (
            nnx.Param(
                jax.random.uniform(
                    rngs.params(), (config.conv_dim,), jnp.float32, -conv_bound, conv_bound
                )
            )
            if config.conv_bias
            else None
        )
        self.dt_bias = nnx.Param(dt_bias_init(config)(rngs.params(), (h,)))
        self.A_log = nnx.Param(A_log_init(config)(rngs.params(), (h,)))
        self.D = nnx.Param(jnp.ones((e,) if config.D_has_hdim else (h,), jnp.float32))
        self.norm = RMSNormGated(
            e, group_size=e // config.ngroups, eps=config.rms_norm_eps, dtype=dtype
        )
        # GPT-2-style rescaling of the last projection into the residual stream (one per layer).
        out_scale = 1.0 / math.sqrt(config.n_layer) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(
            e, d, use_bias=config.proj_bias, kernel_init=torch_linear_init(out_scale), **linear
        )

    scan_impls = SSD_IMPLS  # config.scan_impl's values

    def decode_after_add(
        self, residual, pending, norm, cache: MixerState, impl: str, defer_norm: bool = False
    ):
        """MambaMixer.decode_after_add's contract: (residual + pending, out, next cache). The
        Pallas step takes the add and norm into mamba2_pallas (inside its fused kernel where
        pallas_kernels.decode.config.ADD_NORM_IN_PROJ_ROWS allows); a deferred norm's
        ScaledOut pending, an in_proj bias or XLA run the add + norm in front."""
        if impl == "xla" or self.in_proj.bias is not None or isinstance(pending, ScaledOut):
            residual, hidden = decode_add_norm(residual, pending, norm, impl)
            return (residual, *self(hidden, None, cache, decode_impl=impl, defer_norm=defer_norm))
        from pallas_kernels.decode import ResidualNorm

        add_norm = ResidualNorm(residual, norm.weight[...], norm.eps)
        out, cache, residual = self._decode_pallas(
            pending.astype(norm.dtype), cache, impl, defer_norm, add_norm
        )
        return residual, out, cache

    def _decode_pallas(self, hidden, cache: MixerState, impl: str, defer_norm: bool, add_norm=None):
        """The decode step through the Pallas kernels: (out, next cache[, residual' with
        add_norm, mamba2_pallas's])."""
        # The conv step and the state update as two kernels reading in_proj's output in place
        # (in_proj itself fused into the first where mamba2_pallas fuses it), both states
        # updated in place, y gated in the kernel.
        from pallas_kernels.decode import mamba2_core_pallas, mamba2_pallas

        e = self.config.d_inner
        core = (
            cache.conv,
            cache.ssm,
            *self._conv_params(),
            self.dt_bias[...],
            self.A_log[...],
            self._D(),
        )
        interpret = impl == "pallas_interpret"
        # A norm over all e channels scales each row by one number, which commutes with
        # out_proj: the kernel hands back v * weight and v's sums of squares, and the next
        # residual add applies the scale (three XLA kernels a step fewer).
        defer = defer_norm and self.norm.group_size == e
        kw = dict(norm_weight=self.norm.weight[...] if defer else None)
        residual = ()
        if self.in_proj.bias is None:
            weight = self.in_proj.kernel[...].astype(hidden.dtype)
            v, conv, ssm, *rest = mamba2_pallas(
                hidden, weight, *core, **kw, add_norm=add_norm, interpret=interpret
            )
            if add_norm is not None:
                rest, residual = rest[:-1], (rest[-1],)
        else:
            v, conv, ssm, *rest = mamba2_core_pallas(
                self.in_proj(hidden), *core, **kw, interpret=interpret
            )
        cache = MixerState(conv=conv.astype(cache.conv.dtype), ssm=ssm.astype(cache.ssm.dtype))
        if defer:
            return ScaledOut(self.out_proj(v), rest[0], e, self.norm.eps), cache, *residual
        return self.out_proj(self.norm.gated(v)), cache, *residual

    def __call__(
        self,
        hidden,
        segment_ids=None,
        cache: MixerState | None = None,
        *,
        num_segments: int | None = None,
        decode_impl: str = "xla",
        defer_norm: bool = False,
        continues=None,
        start_state: MixerState | None = None,
        return_end_state: bool = False,
    ):
        """MambaMixer.__call__'s contract: hidden (b, t, d) -> (out, None), or with
        num_segments each segment's cache (conv (b, s, w - 1, x) over xBC, the conv's inputs;
        ssm (b, s, h, p, n) float32), or with a cache one token (b, d) -> (out, next cache).
        defer_norm (a decode step through the Pallas kernels, where `defers_norm`): out is a
        ScaledOut, the gated norm's scale left to the next residual add."""
        config = self.config
        if cache is not None:
            # in_proj as ONE product, split after (MambaMixer._decode says why).
            e, x = config.d_inner, config.conv_dim
            if decode_impl != "xla":
                return self._decode_pallas(hidden, cache, decode_impl, defer_norm)
            zxbcdt = self.in_proj(hidden)
            z, xBC, dt = zxbcdt[:, :e], zxbcdt[:, e : e + x], zxbcdt[:, e + x :]
            window = conv_window(cache, xBC)  # (b, w, x)
            x, B, C = self._split_xBC(causal_conv1d_step(window, *self._conv_params()))
            args = (cache.ssm, x, dt, self._A(), B, C, self._D(), None, self.dt_bias[...])
            ssm, y = ssd_state_update(*args, dt_softplus=True)
            y = self.norm(y.reshape(-1, e), z)
            # Stored back in the cache's dtype (generation's state_dtype), y from float32.
            ssm = ssm.astype(cache.ssm.dtype)
            return self.out_proj(y), MixerState(conv=window[:, 1:], ssm=ssm)
        if num_segments is not None and segment_ids is None:
            segment_ids = jnp.zeros(hidden.shape[:2], jnp.int32)
        check_end_state_call(num_segments, return_end_state)
        z, xBC, dt = saved(PROJECTION, *self._in_proj(hidden))
        # The conv hands back x, B and C as separate arrays: the tile kernels write them so,
        # where splitting a kernel's one output would copy them (and concatenate their
        # gradients) in XLA.
        gn = config.ngroups * config.d_state
        x, B, C = self._shape_xBC(
            *saved(
                CONV,
                *causal_conv1d(
                    xBC,
                    *self._conv_params(),
                    segment_ids=segment_ids,
                    activation="silu",
                    impl=config.conv_impl,
                    continues=continues,
                    first_inputs=None if start_state is None else start_state.conv,
                    groups=(config.d_inner, gn, gn),
                ),
            )
        )
        # dt_bias goes into the scan in float32 (added before the softplus), as in mamba_ssm.
        result = ssd_scan(
            x,
            dt,
            self._A(),
            B,
            C,
            self._D(),
            None,
            self.dt_bias[...],
            dt_softplus=True,
            segment_ids=segment_ids,
            chunk_size=config.chunk_size,
            continues=continues,
            first_run_states=None if start_state is None else start_state.ssm,
            return_final_states=num_segments is not None,
            num_segments=num_segments,
            impl=config.scan_impl,
            save_chunk_states=config.remat not in REMAT_RECOMPUTING_SSD_STATES,
            # A training call's carry: each row's end, from the kernels' state passing.
            return_row_end_states=return_end_state,
        )
        multiple = num_segments is not None or return_end_state
        y, ssm = result if multiple else (result, None)
        y = saved(MIXER_CORE, y.reshape(*y.shape[:2], config.d_inner))
        out = self.out_proj(saved(OUT_PROJ_INPUT, self.norm(y, z)))
        if not multiple:
            return out, None
        if return_end_state:
            return out, row_end_state(xBC, segment_ids, ssm, config.d_conv)
        return out, segment_caches(xBC, segment_ids, num_segments, ssm, config.d_conv, continues)

    def _in_proj(self, hidden):
        """(z, xBC, dt): in_proj(hidden) as three products with the kernel's column blocks.
        Splitting one (..., d_in_proj) product copies each part out of it and its gradient
        concatenates them back, activation-sized work; slicing the kernel is weight-sized."""
        proj, config = self.in_proj, self.config
        bias = None if proj.bias is None else proj.bias[...]
        hidden, kernel, bias = proj.promote_dtype(
            (hidden, proj.kernel[...], bias), dtype=proj.dtype
        )
        contract = (((hidden.ndim - 1,), (0,)), ((), ()))
        edges = [0, config.d_inner, config.d_inner + config.conv_dim, config.d_in_proj]

        def part(i):
            cols = slice(edges[i], edges[i + 1])
            y = proj.dot_general(hidden, kernel[:, cols], contract, precision=proj.precision)
            return y if bias is None else y + bias[cols]

        return part(0), part(1), part(2)

    def _split_xBC(self, xBC):
        """(..., x) -> x (..., h, p), B and C (..., g, n)."""
        config = self.config
        gn = config.ngroups * config.d_state
        return self._shape_xBC(*jnp.split(xBC, [config.d_inner, config.d_inner + gn], axis=-1))

    def _shape_xBC(self, x, B, C):
        """x (..., d_inner), B and C (..., g * n) -> x (..., h, p), B and C (..., g, n)."""
        config = self.config
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, config.nheads, config.headdim),
            B.reshape(*lead, config.ngroups, config.d_state),
            C.reshape(*lead, config.ngroups, config.d_state),
        )

    def _conv_params(self):
        dtype = self.config.compute_dtype
        bias = None if self.conv_bias is None else self.conv_bias[...].astype(dtype)
        return self.conv_weight[...].astype(dtype), bias

    def _A(self):
        return -jnp.exp(self.A_log[...])

    def _D(self):
        """(h,) or (h, p) when D_has_hdim."""
        D = self.D[...]
        return D.reshape(self.config.nheads, self.config.headdim) if self.config.D_has_hdim else D
