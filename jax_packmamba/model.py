"""Flax NNX Mamba language models (Mamba1 and Mamba2) whose every operator respects segment
boundaries: one Block and one LM for both families, the config picking the mixer (MambaMixer
here, Mamba2Mixer in mamba2.py).

Axis letters: l layer, b batch, t time, d d_model, e d_inner, n d_state, r dt_rank, s segment
slot, v vocabulary.

Each mixer has one call, `mixer(hidden, segment_ids=None, cache=None) -> (out, cache)`:
training (no cache; returns None), packed prefill (`num_segments=S`: returns each segment's
final cache) and decode (`cache` given: one token per row, hidden (b, d), cache in and out).
The LM holds its blocks stacked on a leading layer axis (the checkpoint layout either way) and
runs them in an unrolled loop, or, with config.scan_layers, under one `lax.scan`, so a program
holds one copy of the block whatever the depth (faster compiles; without remat it needs more
memory on a GPU, since every saved intermediate is a stacked buffer: docs/performance.md); the
remat policy (config.remat) applies per layer in both, and "save_kernel_outputs" keeps only
what a GEMM or a kernel makes.

Parameters are float32; activations run in `config.dtype` (bfloat16 on GPU) while the residual
stream, norms and the scan state stay float32. Initialisation follows mamba_ssm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba.config import (
    HybridConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    hybrid_runs,
)
from jax_packmamba.hybrid import MLP, AttentionMixer, BlockConfig
from jax_packmamba.layers import (  # MixerState, RMSNorm: public here too
    CONV,
    MIXER_CORE,
    MIXER_INPUT,
    OUT_PROJ_INPUT,
    PROJECTION,
    SAVED_NAMES,
    MixerState,
    RMSNorm,
    check_end_state_call,
    conv_window,
    decode_add_norm,
    dt_bias_init,
    row_end_state,
    saved,
    segment_caches,
    torch_linear_init,
)
from jax_packmamba.loss import CHUNK_TOKENS, chunked_cross_entropy
from jax_packmamba.mamba2 import Mamba2Mixer
from jax_packmamba.mamba3 import GatedMLP, Mamba3Mixer
from jax_packmamba.ops import (
    causal_conv1d,
    causal_conv1d_step,
    selective_scan,
    selective_state_update,
)
from jax_packmamba.ops.links import check_continues
from jax_packmamba.ops.segments import check_pallas_platform
from jax_packmamba.ops.selective_scan import IMPLS as SCAN_IMPLS

DECODE_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")

# Primitives whose outputs remat "save_kernel_outputs" keeps: the Pallas kernels' (the conv's,
# and the scans' outputs and chunk states, which their backward kernels read), so no kernel
# runs twice.
KERNEL_PRIMITIVES = ("pallas_call",)


def _kernel_outputs_saveable(prim, *_, **__) -> bool:
    return prim.name in KERNEL_PRIMITIVES


# Kernels (pallas_call's `name`, by prefix) whose outputs "save_projections_and_scan" recomputes:
# the conv's and the gated norm's, each one cheap pass over inputs the policy keeps (in_proj's
# outputs; the scan's output and z). Not the block's norm: its backward would rerun it for its
# row statistics anyway.
RECOMPUTED_KERNELS = ("causal_conv1d", "gated_rms_norm")


def _scan_kernel_outputs_saveable(prim, *_, **params) -> bool:
    return prim.name in KERNEL_PRIMITIVES and not params["name"].startswith(RECOMPUTED_KERNELS)


_SAVE_PROJECTIONS_AND_SCAN = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(MIXER_INPUT, PROJECTION, MIXER_CORE),
    _scan_kernel_outputs_saveable,
)

# config.remat -> the jax.checkpoint policy of each layer (absent: no remat).
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_matmul_outputs": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep what costs a GEMM or a kernel to make (layers.SAVED_NAMES, the Pallas kernels'
    # outputs); recompute the elementwise rest (norms, gates, casts, splits). Under a scan
    # the layer's saved values are stacked buffers, so an intermediate XLA would fuse away
    # unrolled (the norms' float32 copies) costs memory there unless recomputed.
    "save_kernel_outputs": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES), _kernel_outputs_saveable
    ),
    # mamba_ssm's memory-efficient trade: keep the mixer's input, the projections' outputs and
    # the scan's (with the scan kernels' outputs its backward reads: Mamba1's chunk states;
    # Mamba2's SSD recomputes its own, mamba2.py); recompute the conv, the gated norm and
    # out_proj's input. Mamba1: save_kernel_outputs less the conv's output.
    "save_projections_and_scan": _SAVE_PROJECTIONS_AND_SCAN,
    # The same policy; Mamba2's SSD keeps its chunk-entry states from the forward (a kernel
    # output the policy saves), since the mixer does not ask it to recompute them
    # (config.REMAT_RECOMPUTING_SSD_STATES).
    "save_projections_scan_and_states": _SAVE_PROJECTIONS_AND_SCAN,
}


class MambaMixer(nnx.Module):
    """in_proj -> segment-aware causal conv -> x_proj/dt_proj -> selective scan -> out_proj."""

    scan_impls = SCAN_IMPLS  # config.scan_impl's values

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, e, n, r = config.d_model, config.d_inner, config.d_state, config.dt_rank_resolved
        dtype = config.compute_dtype
        linear = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.in_proj = nnx.Linear(
            d, 2 * e, use_bias=config.proj_bias, kernel_init=torch_linear_init(), **linear
        )
        # Depthwise conv as mamba's Conv1d(groups=e): U(+-1/sqrt(width)) for weight and bias.
        conv_bound = 1.0 / math.sqrt(config.d_conv)
        self.conv_weight = nnx.Param(
            jax.random.uniform(
                rngs.params(), (e, config.d_conv), jnp.float32, -conv_bound, conv_bound
            )
        )
        self.conv_bias = (
            nnx.Param(jax.random.uniform(rngs.params(), (e,), jnp.float32, -conv_bound, conv_bound))
            if config.conv_bias
            else None
        )
        self.x_proj = nnx.Linear(
            e, r + 2 * n, use_bias=False, kernel_init=torch_linear_init(), **linear
        )
        dt_std = r**-0.5 * config.dt_scale
        self.dt_proj = nnx.Linear(
            r,
            e,
            use_bias=True,
            kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                key, shape, dtype, -dt_std, dt_std
            ),
            bias_init=dt_bias_init(config),
            **linear,
        )
        self.A_log = nnx.Param(
            jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (e, n)))
        )
        self.D = nnx.Param(jnp.ones((e,), jnp.float32))
        # GPT-2-style rescaling of the last projection into the residual stream (one per layer).
        out_scale = 1.0 / math.sqrt(config.n_layer) if config.rescale_prenorm_residual else 1.0
        self.out_proj = nnx.Linear(
            e, d, use_bias=config.proj_bias, kernel_init=torch_linear_init(out_scale), **linear
        )

    def __call__(
        self,
        hidden,
        segment_ids=None,
        cache: MixerState | None = None,
        *,
        num_segments: int | None = None,
        decode_impl: str = "xla",
        continues=None,
        start_state: MixerState | None = None,
        return_end_state: bool = False,
    ):
        """hidden (b, t, d) -> (out (b, t, d), None); with num_segments, the cache of each
        segment (b, s, ...) instead of None (segment_ids None: one segment, slot 0); with a
        cache (conv (b, w - 1, e), ssm (b, e, n)), one token: hidden (b, d) -> (out (b, d),
        next cache), what the sequence call gives the next token of each row's sequence.
        decode_impl: "xla", "pallas" or "pallas_interpret" (resolve_decode_impl).

        start_state (a cache of (b, ...) arrays): the state each row's first run starts from
        where it does not continue the row before; return_end_state: the cache is each row's
        last run's end state (b, ...) instead of None (see LM)."""
        if cache is not None:
            return self._decode(hidden, cache, decode_impl)
        config = self.config
        if num_segments is not None and segment_ids is None:
            segment_ids = jnp.zeros(hidden.shape[:2], jnp.int32)
        check_end_state_call(num_segments, return_end_state)
        x, z = saved(PROJECTION, *self._in_proj(hidden))  # (b, t, e) each
        weight, bias = self._conv_params()
        x_conv = causal_conv1d(
            x,
            weight,
            bias,
            segment_ids=segment_ids,
            activation="silu",
            impl=config.conv_impl,
            continues=continues,
            first_inputs=None if start_state is None else start_state.conv,
        )
        x_conv = saved(CONV, x_conv)
        dt, B, C = self._dt_B_C(x_conv)
        # dt_proj's bias goes into the scan as delta_bias, in float32, as in mamba_ssm.
        result = selective_scan(
            x_conv,
            dt,
            self._A(),
            B,
            C,
            self.D[...],
            z,
            self.dt_proj.bias[...],
            delta_softplus=True,
            segment_ids=segment_ids,
            continues=continues,
            first_run_states=None if start_state is None else start_state.ssm,
            return_final_states=num_segments is not None,
            num_segments=num_segments,
            impl=config.scan_impl,
            # A training call's carry: each row's end, from the kernel's chunk-state pass.
            return_row_end_states=return_end_state,
        )
        multiple = num_segments is not None or return_end_state
        y, ssm = result if multiple else (result, None)
        out = self.out_proj(saved(OUT_PROJ_INPUT, saved(MIXER_CORE, y)))
        if not multiple:
            return out, None
        if return_end_state:
            return out, row_end_state(x, segment_ids, ssm, config.d_conv)
        return out, segment_caches(x, segment_ids, num_segments, ssm, config.d_conv, continues)

    def decode_after_add(self, residual, pending, norm: RMSNorm, cache: MixerState, impl: str):
        """The block's decode step from its residual stream: (residual + pending, out, next
        cache), where pending is the previous block's output and `norm` the block's norm
        (layers.decode_add_norm's add and norm, then the mixer's step). With a Pallas impl the
        add and norm go to mixer_pallas, whose fused in_proj kernel does them itself where
        pallas_kernels.decode.config.ADD_NORM_IN_PROJ_ROWS allows (the add + norm kernel runs
        in front otherwise)."""
        if impl == "xla" or self.in_proj.bias is not None:
            residual, hidden = decode_add_norm(residual, pending, norm, impl)
            return (residual, *self._decode(hidden, cache, impl))
        from pallas_kernels.decode import ResidualNorm, mixer_pallas

        c = norm.dtype
        add_norm = ResidualNorm(residual, norm.weight[...], norm.eps)
        y, conv, ssm, residual = mixer_pallas(
            pending.astype(c),
            self.in_proj.kernel[...].astype(c),
            *self._decode_core(cache),
            add_norm=add_norm,
            interpret=impl == "pallas_interpret",
        )
        return residual, self.out_proj(y), MixerState(conv=conv, ssm=ssm)

    def _decode_core(self, cache: MixerState):
        """The decode kernels' arguments after in_proj's (mixer_core_pallas's, past xz)."""
        return (
            cache.conv,
            cache.ssm,
            self.conv_weight[...],
            None if self.conv_bias is None else self.conv_bias[...],
            self.x_proj.kernel[...],
            self.dt_proj.kernel[...],
            self.dt_proj.bias[...],
            self.A_log[...],
            self.D[...],
        )

    def _decode(self, hidden, cache: MixerState, impl: str):
        core = self._decode_core(cache)
        if impl != "xla" and self.in_proj.bias is None:
            # in_proj through mixer_pallas, which fuses it with the conv kernel at the batches
            # pallas_kernels.decode.config.FUSE_IN_PROJ_ROWS allows (up to 32 rows).
            from pallas_kernels.decode import mixer_pallas

            weight = self.in_proj.kernel[...].astype(hidden.dtype)
            y, conv, ssm = mixer_pallas(hidden, weight, *core, interpret=impl == "pallas_interpret")
            return self.out_proj(y), MixerState(conv=conv, ssm=ssm)
        # in_proj as ONE product, split after: slicing a weight in front of a product (as
        # _in_proj does for training, where activations are large) copies it every step.
        xz = self.in_proj(hidden)  # (b, 2e)
        if impl == "xla":
            y, conv, ssm = mixer_core_xla(xz, *core)
        else:
            from pallas_kernels.decode import mixer_core_pallas

            y, conv, ssm = mixer_core_pallas(xz, *core, interpret=impl == "pallas_interpret")
        return self.out_proj(y), MixerState(conv=conv, ssm=ssm)

    def _in_proj(self, hidden):
        """(x, z): in_proj(hidden) split in two, computed as two products with the kernel's
        halves. Splitting one (..., 2e) product copies both halves out of it and its gradient
        concatenates them back, activation-sized work; slicing and concatenating the kernel is
        weight-sized."""
        proj, e = self.in_proj, self.config.d_inner
        bias = None if proj.bias is None else proj.bias[...]
        hidden, kernel, bias = proj.promote_dtype(
            (hidden, proj.kernel[...], bias), dtype=proj.dtype
        )
        contract = (((hidden.ndim - 1,), (0,)), ((), ()))

        def half(i):
            cols = slice(i * e, (i + 1) * e)
            y = proj.dot_general(hidden, kernel[:, cols], contract, precision=proj.precision)
            return y if bias is None else y + bias[cols]

        return half(0), half(1)

    def _conv_params(self):
        dtype = self.config.compute_dtype
        bias = None if self.conv_bias is None else self.conv_bias[...].astype(dtype)
        return self.conv_weight[...].astype(dtype), bias

    def _dt_B_C(self, x):
        """x_proj and dt_proj (without its bias, which the scan adds in float32)."""
        r, n = self.config.dt_rank_resolved, self.config.d_state
        dt, B, C = jnp.split(saved(PROJECTION, self.x_proj(x)), [r, r + n], axis=-1)
        return (
            saved(PROJECTION, dt @ self.dt_proj.kernel[...].astype(self.config.compute_dtype)),
            B,
            C,
        )

    def _A(self):
        return -jnp.exp(self.A_log[...])


def mixer_core_xla(
    xz,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    dt_proj_weight,
    dt_bias,
    A_log,
    D,
):
    """The middle of MambaMixer's decode step in XLA ops (same arguments and results as
    pallas_kernels.decode.mixer_core_pallas): (y (b, e), conv_state', ssm_state')."""
    c = xz.dtype
    e = xz.shape[-1] // 2
    n = A_log.shape[-1]
    r = dt_proj_weight.shape[0]
    x, z = xz[:, :e], xz[:, e:]
    window = conv_window(MixerState(conv_state, ssm_state), x)  # (b, w, e)
    x_conv = causal_conv1d_step(
        window, conv_weight.astype(c), None if conv_bias is None else conv_bias.astype(c)
    )
    dt, B, C = jnp.split(x_conv @ x_proj_weight.astype(c), [r, r + n], axis=-1)
    dt = dt @ dt_proj_weight.astype(c)
    ssm, y = selective_state_update(ssm_state, x_conv, dt, -jnp.exp(A_log), B, C, D, z, dt_bias)
    # The update and y are float32; the state is stored back in its own dtype (the decode
    # state's storage dtype, generation's state_dtype: float32 or bfloat16).
    return y, window[:, 1:], ssm.astype(ssm_state.dtype)


def mixer_class(config: MambaConfig | Mamba2Config | HybridConfig) -> type:
    """The mixer a config builds: MambaMixer, Mamba2Mixer for a Mamba2Config (and for a
    HybridConfig, whose recurrent mixers are Mamba2's), Mamba3Mixer for a Mamba3Config."""
    if isinstance(config, HybridConfig):
        return Mamba2Mixer
    return {MambaConfig: MambaMixer, Mamba2Config: Mamba2Mixer, Mamba3Config: Mamba3Mixer}[
        type(config)
    ]


def make_mixer(config, rngs: nnx.Rngs):
    """The block's mixer: the family's for a Mamba config; for a hybrid BlockConfig, the
    Mamba2 mixer, attention or the MLP by its kind."""
    if not isinstance(config, BlockConfig):
        return mixer_class(config)(config, rngs=rngs)
    if config.kind == "M":
        return Mamba2Mixer(config.hybrid.mamba2_config(), rngs=rngs)
    return {"*": AttentionMixer, "-": MLP}[config.kind](config.hybrid, rngs=rngs)


def resolve_decode_impl(impl: str, config) -> str:
    """ "auto" is "pallas" on a GPU where the kernels take the shape, else "xla": the Pallas
    decode kernels (pallas_kernels/decode) for Mamba1 (its mixer core, with in_proj fused at
    small batch), for Mamba2 and a hybrid's Mamba2 layers (the conv step and the state update,
    one H100: mamba2-2.7b 3.28 -> 3.11 ms a step at batch 1, 14.09 -> 12.36 ms at 128,
    pallas_kernels/decode/DESIGN.md, round 4) and the residual add + norm of every block.
    Mamba-3's decode step is XLA's. Call it before tracing: it imports the kernels' package."""
    if impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "xla"
        if jax.default_backend() == "gpu" and isinstance(
            config, (MambaConfig, Mamba2Config, HybridConfig)
        ):
            from pallas_kernels.decode import supported

            mamba1 = isinstance(config, MambaConfig)
            impl = "pallas" if not mamba1 or supported(config.d_state) else "xla"
    check_pallas_platform(impl, fallback="xla", name="decode_impl")
    if impl != "xla":
        # Before anything is traced (pallas_kernels/decode/__init__.py says why).
        import pallas_kernels.decode  # noqa: F401
    return impl


class Block(nnx.Module):
    """Pre-norm residual block of any family: r <- r + mixer(norm(r)), r in float32; a
    Mamba3Config with d_intermediate > 0 adds r <- r + mlp(norm2(r)), as mamba_ssm's Block.

    `block(residual, segment_ids=None, cache=None, **options) -> (residual, cache)`, the
    mixer's call (MambaMixer.__call__) around the residual stream."""

    def __init__(self, config: MambaConfig | Mamba2Config | BlockConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype)
        self.mixer = make_mixer(config, rngs)
        self.norm2 = self.mlp = nnx.data(None)
        if isinstance(config, Mamba3Config) and config.d_intermediate:
            self.norm2 = RMSNorm(
                config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype
            )
            self.mlp = GatedMLP(config, rngs=rngs)

    def __call__(self, residual, segment_ids=None, cache: MixerState | None = None, **options):
        # The stream passes through the norm op so that its backward receives the stream's
        # gradient and adds it to the norm's in one pass (the add itself joins out_proj's).
        residual, normed = self.norm.add(residual, None)
        out, cache = self.mixer(saved(MIXER_INPUT, normed), segment_ids, cache, **options)
        residual = residual + out.astype(jnp.float32)
        if self.mlp is not None:
            residual = residual + self.mlp(self.norm2(residual)).astype(jnp.float32)
        return residual, cache


class HybridLayer(nnx.Module):
    """One layer of a hybrid: its blocks (HybridConfig.layers' letters) in order, with Block's
    call; the cache is a tuple with one entry per block (None for an MLP, and None as a whole
    in training)."""

    def __init__(self, kinds: str, config: HybridConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(BlockConfig(kind, config), rngs=rngs) for kind in kinds])

    def __call__(self, residual, segment_ids=None, cache=None, **options):
        caches = []
        for i, block in enumerate(self.blocks):
            residual, c = block(
                residual, segment_ids, None if cache is None else cache[i], **options
            )
            caches.append(c)
        return residual, (None if all(c is None for c in caches) else tuple(caches))


class LM(nnx.Module):
    """Mamba language model of either family: `model(input_ids, segment_ids=None) -> logits`.

    input_ids (b, t) int; segment_ids (b, t) int or None: the state of every layer restarts
    where segment_ids change, so each packed sequence is computed as if it were alone.
    Logits are (b, t, config.padded_vocab_size) in the compute dtype.
    `model.cross_entropy(input_ids, segment_ids, targets, loss_mask)` is the training loss
    without them (the head fused with the loss over chunks of tokens).

    `model(input_ids, segment_ids, num_segments=S) -> (logits, cache)` is the packed prefill
    (cache: MixerState with leading axes (l, b, S)); `model(tokens (b,), cache=cache) ->
    (logits (b, v), cache)` one decode step (cache with leading axes (l, b)).

    `continues` (b,) bool (packing.pack_stream's links): row r's first sequence continues row
    r - 1's last one, and every layer carries its conv and SSM state over the link, so a
    document split over rows gets the logits it gets unsplit (jax_packmamba/ops/links.py).
    Across calls (a document longer than a batch): `return_end_state=True` also returns each
    row's last run's end state, a MixerState of (l, b, ...) arrays (conv: the last d_conv - 1
    conv inputs of that run; ssm: its state), and `start_state` (same layout) is the state each
    row's first run starts from where it does not continue the row before: carry row b - 1's
    end into the next call's row 0 and the document goes on as if unsplit (end_state_like
    gives zeros of that layout).

    `layers` is one Block whose parameters are stacked on a leading layer axis (`layer(i)`
    gives block i alone). With a HybridConfig, `layers` is a list of such stacks of HybridLayer,
    one per run of identical layers (config.hybrid_runs), run in order, and a cache is a list
    with one entry per run.
    """

    def __init__(self, config: MambaConfig | Mamba2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embedding = nnx.Embed(
            config.padded_vocab_size,
            config.d_model,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(config.initializer_range),
            rngs=rngs,
        )

        if isinstance(config, HybridConfig):
            # One stack per run of identical consecutive layers (hybrid_runs), each scanned:
            # the program holds one copy per run, however deep the run.
            self.layers = nnx.List(
                [
                    _stacked(lambda r, k=kinds: HybridLayer(k, config, rngs=r), count, rngs)
                    for kinds, count in hybrid_runs(config.layers)
                ]
            )
        else:
            self.layers = _stacked(lambda r: Block(config, rngs=r), config.n_layer, rngs)
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=config.compute_dtype)
        self.lm_head = nnx.data(None)  # data either way, so an untied head can be assigned
        if not config.tie_embeddings:
            self.lm_head = nnx.Linear(
                config.d_model,
                config.padded_vocab_size,
                use_bias=False,
                dtype=config.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=jax.nn.initializers.normal(config.initializer_range),
                rngs=rngs,
            )

    def __call__(
        self,
        input_ids,
        segment_ids=None,
        cache: MixerState | None = None,
        *,
        num_segments: int | None = None,
        decode_impl: str = "xla",
        continues=None,
        start_state: MixerState | None = None,
        return_end_state: bool = False,
    ):
        residual, cache = self._residual(
            input_ids,
            segment_ids,
            cache,
            num_segments=num_segments,
            decode_impl=decode_impl,
            continues=continues,
            start_state=start_state,
            return_end_state=return_end_state,
        )
        logits = self.head(residual)
        return logits if cache is None else (logits, cache)

    def cross_entropy(
        self,
        input_ids,
        segment_ids,
        targets,
        loss_mask,
        *,
        continues=None,
        start_state: MixerState | None = None,
        return_end_state: bool = False,
        chunk_tokens: int = CHUNK_TOKENS,
    ):
        """(sum of next-token cross-entropy where loss_mask, number of targets), float32: what
        masked_cross_entropy of `model(input_ids, segment_ids)` gives, with the head and the
        loss fused over chunks of about chunk_tokens tokens (loss.chunked_cross_entropy), so
        that neither the logits nor float32 copies of them are ever held for every token.
        start_state / return_end_state as for __call__; with return_end_state, the end state
        is returned third."""
        residual, end_state = self._residual(
            input_ids,
            segment_ids,
            continues=continues,
            start_state=start_state,
            return_end_state=return_end_state,
        )
        hidden = self.norm_f(residual)
        if self.lm_head is None:
            weight, transposed = self.embedding.embedding[...], False
        else:
            weight, transposed = self.lm_head.kernel[...], True
        ce, count = chunked_cross_entropy(
            hidden, weight, targets, loss_mask, transposed=transposed, chunk_tokens=chunk_tokens
        )
        return (ce, count, end_state) if return_end_state else (ce, count)

    def _residual(
        self,
        input_ids,
        segment_ids=None,
        cache: MixerState | None = None,
        *,
        num_segments: int | None = None,
        decode_impl: str = "xla",
        continues=None,
        start_state: MixerState | None = None,
        return_end_state: bool = False,
    ):
        """The residual stream after the last layer (before norm_f), and the cache as
        __call__ returns it."""
        if cache is None:
            check_model_inputs(input_ids, segment_ids, self.config)
            check_continues(continues, np.shape(input_ids)[0])
        elif continues is not None or start_state is not None or return_end_state:
            raise ValueError(
                "continues, start_state and return_end_state are for a sequence call; a "
                "decode step takes none"
            )
        if (start_state is not None or return_end_state) and num_segments is not None:
            raise ValueError(
                "start_state and return_end_state are for a training call, not a prefill"
            )
        residual = self.embedding(input_ids)
        links = {} if continues is None else dict(continues=continues)
        if return_end_state:
            links["return_end_state"] = True
        options = dict(
            scan=self.config.scan_layers,
            remat=self.config.remat if cache is None else "none",
            num_segments=num_segments,
            decode_impl=decode_impl,
            **links,
        )
        if isinstance(self.config, HybridConfig):
            if continues is not None or start_state is not None or return_end_state:
                raise ValueError(
                    "continues, start_state and return_end_state (rows linked across) are "
                    "not supported for hybrid models yet: attention would need each row's "
                    "keys of the row before"
                )
            # cache: a list with one entry per run (leading layer axis within the run).
            training = cache is None and num_segments is None
            caches = []
            for i, run in enumerate(self.layers):
                residual, c = run_layers(
                    run, residual, segment_ids, None if cache is None else cache[i], **options
                )
                caches.append(c)
            return residual, (None if training else caches)
        if start_state is not None:
            check_start_state(start_state, self.config, np.shape(input_ids)[0])
            options["start_state"] = start_state
        return run_layers(self.layers, residual, segment_ids, cache, **options)

    def head(self, residual):
        """Final norm and vocabulary projection: residual (..., d) -> logits (..., v)."""
        return vocab_logits(
            residual, self.norm_f, self.embedding, self.lm_head, self.config.compute_dtype
        )

    def layer(self, i: int) -> Block:
        """Block i on its own (a copy of its slice of the stacked parameters)."""
        if isinstance(self.config, HybridConfig):
            raise ValueError(
                "LM.layer(i) takes a Mamba model; a hybrid's layers are runs: "
                "model.layers[run] is a stack of HybridLayer"
            )
        graph, state = nnx.split(self.layers)
        return nnx.merge(graph, jax.tree.map(lambda x: x[i], state))


def _stacked(make, count: int, rngs: nnx.Rngs):
    """`count` modules from `make(rngs)`, parameters stacked on a leading axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
        return make(rngs)

    return stacked(rngs)


def run_layers(
    layers: Block,
    residual,
    segment_ids=None,
    cache=None,
    *,
    scan: bool,
    remat: str = "none",
    start_state=None,
    **options,
):
    """Runs the stacked blocks `layers` over the residual stream (cache: leading layer axis, in
    and out; None in training). remat: a REMAT_POLICIES name, applied to each layer, or "none".

    scan=True: one `lax.scan` step per layer (one copy of the block in the program: compile
    time does not grow with depth). scan=False: an unrolled loop, each layer's parameters split
    from the stack with `jnp.split` (whose transpose is one concatenate per parameter, not a
    full-size pad per layer as `x[i]`'s), and the layers' caches stacked back.
    """
    graph, params = nnx.split(layers)

    def layer(residual, xs):
        layer_params, layer_cache, layer_start = xs
        start = {} if layer_start is None else dict(start_state=layer_start)
        return nnx.merge(graph, layer_params)(
            residual, segment_ids, layer_cache, **options, **start
        )

    if remat != "none":  # CSE could undo the remat only outside a scan (jax.checkpoint's note)
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(layer, residual, (params, cache, start_state))

    n_layer = jax.tree.leaves(params)[0].shape[0]

    def unstack(tree):
        if tree is None:
            return [None] * n_layer
        splits = jax.tree.map(lambda x: [jnp.squeeze(y, 0) for y in jnp.split(x, n_layer)], tree)
        return [jax.tree.map(lambda _, s: s[i], tree, splits) for i in range(n_layer)]

    caches = []
    for layer_params, layer_cache, layer_start in zip(
        unstack(params), unstack(cache), unstack(start_state)
    ):
        residual, layer_cache = layer(residual, (layer_params, layer_cache, layer_start))
        caches.append(layer_cache)
    if caches[0] is None:
        return residual, None
    return residual, jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


# The names each family's classes had before one Block and one LM served both.
MambaLM = Mamba2LM = LM
HybridLM = LM  # with a HybridConfig
MambaBlock = Mamba2Block = Block


def vocab_logits(residual, norm_f: RMSNorm, embedding: nnx.Embed, lm_head, dtype):
    """norm_f, then lm_head, or the embedding table when tied (lm_head None)."""
    hidden = norm_f(residual)
    if lm_head is not None:
        return lm_head(hidden)
    return hidden @ embedding.embedding[...].astype(dtype).T


def check_model_inputs(input_ids, segment_ids, config: MambaConfig):
    shape = tuple(input_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"input_ids must have length >= 1, got shape {shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if segment_ids is not None and tuple(segment_ids.shape) != shape:
        raise ValueError(
            f"segment_ids must have the shape of input_ids {shape}, got {tuple(segment_ids.shape)}"
        )


def check_start_state(start_state, config, batch: int) -> None:
    """Raises ValueError unless start_state is a MixerState of the model's per-layer, per-row
    state shapes: conv (l, b, w - 1, channels), ssm (l, b, ...)."""
    if not isinstance(start_state, MixerState):
        raise ValueError(f"start_state must be a MixerState, got {type(start_state).__name__}")
    want = jax.eval_shape(lambda: end_state_like(config, batch))
    for name in ("conv", "ssm"):
        got = tuple(np.shape(getattr(start_state, name)))
        if got != getattr(want, name).shape:
            raise ValueError(
                f"start_state.{name} must have shape {getattr(want, name).shape} (layers, "
                f"batch, ...), got {got}"
            )


def end_state_like(config: MambaConfig | Mamba2Config, batch: int) -> MixerState:
    """Zeros shaped as `model(..., return_end_state=True)`'s end state: (l, b, ...) per leaf."""
    n = config.n_layer
    if isinstance(config, Mamba2Config):
        channels = config.conv_dim
        ssm = (n, batch, config.nheads, config.headdim, config.d_state)
    else:
        channels = config.d_inner
        ssm = (n, batch, config.d_inner, config.d_state)
    return MixerState(
        conv=jnp.zeros((n, batch, config.d_conv - 1, channels), config.compute_dtype),
        ssm=jnp.zeros(ssm, jnp.float32),
    )
