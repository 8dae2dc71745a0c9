"""Text generation with a recurrent cache: one packed prefill, then one jitted decode loop.

Axis letters: l layer, p prompt, P prompts padded to the batch bucket, r packed row, t time,
d d_model, e d_inner, n d_state, w d_conv - 1, v vocabulary, T new-token bucket.

    prefill  all prompts, whatever their lengths, are packed into rows (`pack_sequences`) and
             run through the model in ONE packed pass, one jitted layer function called once
             per layer (so its compile does not grow with the depth); every layer's scan
             returns each segment's final SSM state and the conv state is gathered from each
             prompt's last w conv inputs (zeros where the prompt is shorter), so each prompt
             leaves with the state it would have had run alone.
    decode   a `lax.while_loop` of steps (one token through every layer, then sampling,
             jax_packmamba.sampling): the state has a fixed size, so a token costs the same
             whatever was generated before. The layers are unrolled inside the step, with
             each layer's weights and states in buffers of their own: XLA then reads every
             weight where it lies (a layer-stacked weight sliced in a loop is copied every
             step), updates every state in place, and runs the step as straight-line code
             (CUDA graphs on a GPU): `prepare` un-stacks the model's layer-stacked weights
             once. Each layer is the model's Block (model.py) taken apart: the previous
             block's residual add and this block's norm (one kernel, layers.decode_add_norm),
             then the mixer with a cache, which runs XLA ops or the Pallas kernels of
             pallas_kernels/decode (`decode_impl`: Mamba1's mixer core, Mamba2's state
             update); the last block's add goes with the final norm.

Both families run the same engine; a Mamba2 layer's state: conv (p, d_conv - 1, conv_dim)
(xBC, the conv's inputs) and ssm (p, heads, headdim, d_state). A hybrid (HybridConfig) runs it
layer by layer too, its state a HybridDecodeState: per layer, each block's cache (Mamba2's as
above, attention's KVCache (p, T, kv heads, head dim), none for an MLP); so does Mamba-3, its
layer's cache the mixer's Mamba3State (ssm, k, x, angle). The prefill returns
each prompt's keys and values at their positions (T = the packed row's length); the decode
loop pads T by its new-token bucket, so a token costs a read of T keys.

Compiles: one per (model, batch bucket, new-token bucket, sampling mode): the batch is padded
to a power of two, max_new_tokens to a power of two (at least 16) with the real count traced,
sampling values are traced (sampling.py), and the prefill's packed rows and segment count are
bucketed to powers of two. `compile_stats` measures what a call compiled.

Weights that the model only uses in the compute dtype (projections, conv) are stored cast: each
decode step reads them at that size. By default the embedding table is stored once, in the
compute dtype, for both the input lookup and the tied head, as mamba_ssm's bfloat16 model
does: in bfloat16 that rounds the residual stream's input (the model keeps it float32) and
saves the float32 table's memory; `prepare(model, embedding_in_compute_dtype=False)` keeps
the float32 table for the lookup (and a compute-dtype copy for a tied head). In float32 the
two are the same.

The SSM state's storage dtype (`state_dtype`, prefill_batch and generate): by default (None)
the model's compute dtype, as mamba_ssm keeps its Mamba1 and Mamba2 decode states in the
weights' dtype (and transformers' MambaCache in the model's): a bfloat16 model stores a
bfloat16 state, which halves the bytes each decode step reads and writes (the state update is
memory-bound at batch > 1), a float32 model a float32 one; "float32" keeps a bfloat16 model's
state in float32 for the extra accuracy. Mamba-3 keeps float32 (bfloat16 is refused for it),
and so does a float16 model. The prefill hands the state over rounded to it; each step reads
it, updates it in float32 (y from the float32 update) and stores it back rounded (the mixers
store the state in the dtype they were given it in, in both decode impls). The conv state
keeps the compute dtype.

The command line is jax_packmamba/generate.py.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba.compilation_cache import CompileStats, compile_stats  # noqa: F401 (re-exported)
from jax_packmamba.config import (
    HybridConfig,
    Mamba2Config,
    Mamba3Config,
    MambaConfig,
    hybrid_runs,
)
from jax_packmamba.hybrid import KVCache, pad_kv_cache
from jax_packmamba.layers import decode_add_norm
from jax_packmamba.mamba2 import Mamba2Mixer, defers_norm, no_output
from jax_packmamba.model import LM, MixerState, resolve_decode_impl
from jax_packmamba.packing import (
    COLUMN,
    PIECE_LENGTH,
    ROW,
    SEQUENCE_INDEX,
    pack_sequences,
    pack_stream,
)
from jax_packmamba.sampling import SamplingConfig, SamplingParams, is_eos, sample

# Parameters that the model casts to the compute dtype before use (nnx.Linear and the conv);
# dt_proj.bias (Mamba2: dt_bias) is not among them: it enters the scan in float32. Mamba2's
# mixer has no x_proj or dt_proj; its gated norm, A_log and D stay float32 as Mamba1's do.
_CAST_PARAMS = {
    ("in_proj", "kernel"),
    ("in_proj", "bias"),
    ("x_proj", "kernel"),
    ("dt_proj", "kernel"),
    ("out_proj", "kernel"),
    ("out_proj", "bias"),
    ("conv_weight",),
    ("conv_bias",),
    ("lm_head", "kernel"),
    *(
        (name, leaf)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for leaf in ("kernel", "bias")
    ),
}

MIN_NEW_TOKEN_BUCKET = 16

# Storage dtypes of the decode SSM state (`state_dtype`); None is the model's compute dtype
# (resolve_state_dtype).
STATE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_state_dtype(state_dtype, config):
    """The SSM state's storage dtype for a model of `config`: "float32", "bfloat16" or those
    jnp/numpy dtypes -> a jnp dtype; ValueError naming `state_dtype` otherwise.

    None (the default) is the compute dtype (config.compute_dtype), as mamba_ssm stores its
    Mamba1 and Mamba2 decode states in the weights' dtype: bfloat16 for a bfloat16 model,
    float32 for a float32 one; float32 for a float16 model (no float16 state here), for
    Mamba-3 (whose state stays float32: bfloat16 is refused) and for config None (no model)."""
    if state_dtype is None:
        if config is None or isinstance(config, Mamba3Config):
            return jnp.float32
        return STATE_DTYPES.get(jnp.dtype(config.compute_dtype).name, jnp.float32)
    try:
        name = jnp.dtype(state_dtype).name if not isinstance(state_dtype, str) else state_dtype
    except TypeError:
        name = None
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None, 'float32' or 'bfloat16', got {state_dtype!r}")
    if isinstance(config, Mamba3Config) and name != "float32":
        raise ValueError(
            f"state_dtype={name!r}: a Mamba-3 model's decode state stays float32 (None)"
        )
    return STATE_DTYPES[name]


def _store_state(state, dtype):
    """The state with every SSM state (DecodeState.ssm, a hybrid's MixerState.ssm) cast to
    the storage dtype; conv states and KV caches as they are. float32: the state itself."""
    if dtype == jnp.float32:
        return state
    if isinstance(state, DecodeState):
        return state._replace(ssm=tuple(s.astype(dtype) for s in state.ssm))
    return jax.tree.map(
        lambda c: c._replace(ssm=c.ssm.astype(dtype)) if isinstance(c, MixerState) else c,
        state,
        is_leaf=lambda c: isinstance(c, MixerState),
    )


class DecodeState(NamedTuple):
    """Recurrent cache, one buffer per layer: conv[l] (p, d_conv - 1, e) in the compute dtype
    (the last conv inputs, oldest first), ssm[l] (p, e, n) in the storage dtype (state_dtype:
    the compute dtype unless asked). Mamba2: conv[l] (p, d_conv - 1, conv_dim) (xBC) and ssm[l]
    (p, heads, headdim, d_state)."""

    conv: tuple
    ssm: tuple


class HybridDecodeState(NamedTuple):
    """A hybrid model's cache: one entry per layer, the layer's tuple of block caches
    (MixerState for a Mamba2 block, KVCache (p, T, k, c) for attention, None for an MLP)."""

    layers: tuple


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["config", "graphs"]
)
@dataclasses.dataclass(frozen=True)
class PreparedModel:
    """A model (LM, either family) split for inference.

    params: {"embedding", "layers", "norm_f", "lm_head", "head_embedding"}: nnx states,
    "layers" a tuple of one state per block (None where absent); graphs: (block, embedding,
    norm_f, lm_head) graph definitions (static). head_embedding is a compute-dtype copy of a
    tied table kept in float32 (None otherwise: the head reads "embedding"). Build with
    `prepare(model)`; a pytree, so it passes through jit.
    """

    config: MambaConfig | Mamba2Config
    graphs: tuple
    params: dict


def prepare(model: LM, *, embedding_in_compute_dtype: bool = True) -> PreparedModel:
    """Splits `model` for inference, one state per layer (un-stacked), with compute-dtype copies of the
    weights only used in the compute dtype (and of the embedding table unless
    embedding_in_compute_dtype is False; see the module docstring). The result does not share
    memory with the model."""
    if isinstance(model, PreparedModel):
        return model
    if not isinstance(model, LM):
        raise ValueError(
            f"model must be a MambaLM, Mamba2LM or PreparedModel, got {type(model).__name__}"
        )
    dtype = model.config.compute_dtype
    if isinstance(model.config, HybridConfig):
        # graphs[0]: one graph per layer (a run's layers share theirs).
        layer_graphs, layer_params = [], []
        for run, (_, count) in zip(model.layers, hybrid_runs(model.config.layers)):
            graph, stacked = nnx.split(run)
            stacked = inference_state(stacked, "layers", dtype)
            layer_graphs += [graph] * count
            layer_params += [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)]
        params = dict(layers=tuple(layer_params))
        graphs = [tuple(layer_graphs)]
    else:
        block_graph, stacked = nnx.split(model.layers)
        layers = inference_state(stacked, "layers", dtype)
        params = dict(
            layers=tuple(jax.tree.map(lambda x: x[i], layers) for i in range(model.config.n_layer))
        )
        graphs = [block_graph]
    for name in ("embedding", "norm_f", "lm_head"):
        module = getattr(model, name)
        graphs.append(None if module is None else nnx.split(module)[0])
        params[name] = (
            None if module is None else inference_state(nnx.split(module)[1], name, dtype)
        )
    cast = lambda state: jax.tree.map(lambda x: x.astype(dtype), state)  # noqa: E731
    params["head_embedding"] = None
    if embedding_in_compute_dtype:
        params["embedding"] = cast(params["embedding"])
    elif model.lm_head is None and dtype != jnp.float32:
        params["head_embedding"] = cast(params["embedding"])
    return PreparedModel(config=model.config, graphs=tuple(graphs), params=params)


def inference_state(state, name: str, dtype):
    """A copy of the nnx state of model.<name> with the weights used only in the compute dtype
    cast to it."""

    def cast(path, x):
        names = (name, *(k.key for k in path if isinstance(k, jax.tree_util.DictKey)))
        if any(names[-len(suffix) :] == suffix for suffix in _CAST_PARAMS):
            return x.astype(dtype)
        return jnp.array(x)  # a copy, so that the caller may free the model

    return jax.tree_util.tree_map_with_path(cast, state)


def batch_bucket(num: int) -> int:
    """Rows the decode loop runs for `num` prompts: the next power of two."""
    return 1 << max(0, (num - 1).bit_length())


def new_token_bucket(max_new_tokens: int) -> int:
    """Columns of the decode loop's token buffer: a power of two, at least 16."""
    return max(MIN_NEW_TOKEN_BUCKET, 1 << max(0, (max_new_tokens - 1).bit_length()))


# ---------------------------------------------------------------------------------------------
# Prefill.


@dataclasses.dataclass
class Prefilled:
    """What the prefill hands to decoding, padded to the batch bucket P (rows past num_prompts
    repeat the last prompt and are never reported). Decoding consumes it: its buffers are
    donated to the decode loop.

    logits (P, v) float32 at each prompt's last token; state for P rows; seen (P, v) bool, the
    prompts' tokens (for the repetition penalty).
    """

    logits: jax.Array
    state: DecodeState
    seen: jax.Array
    num_prompts: int


class PrefillInputs(NamedTuple):
    """The host side of a prefill: prompts packed into rows, bucketed (numpy arrays)."""

    tokens: np.ndarray  # (r, t) packed tokens, r and t powers of two
    segment_ids: np.ndarray  # (r, t): 1, 2, ... per prompt in a row, 0 for padding
    rows: np.ndarray  # (P,) each prompt's row (padding rows repeat the last prompt's)
    slots: np.ndarray  # (P,) its segment id there
    last: np.ndarray  # (P,) the column of its last token
    prompt_of: np.ndarray  # (r, t) the prompt each token belongs to (P for padding)
    num_segments: int  # segment slots per row, a power of two
    num_prompts: int
    continues: np.ndarray | None = None  # (r,) bool: linked rows (max_row), else None


def prefill_inputs(prompts, config: MambaConfig, max_row: int | None = None) -> PrefillInputs:
    """Packs prompts for `prefill_batch` (the part that runs on the host).

    Rows are as long as the longest prompt (rounded up to a power of two). With max_row, a
    prompt longer than that is not given a row of its own length: all prompts are laid end to
    end in rows of max_row tokens (packing.pack_stream), the rows linked (`continues`) so each
    layer carries its state over them, as training's --data.long_docs=link does."""
    prompts = _check_prompts(prompts, config)
    num = len(prompts)
    size = batch_bucket(num)
    longest = max(len(p) for p in prompts)
    row_length = max(2, 1 << (longest - 1).bit_length())  # one compile per power of two
    continues = None
    if max_row is not None and longest > max_row:
        if isinstance(config, HybridConfig):
            raise ValueError(
                f"max_row={max_row}: a hybrid model's prefill cannot link rows (attention "
                f"would need the previous row's keys); leave max_row None"
            )
        if not isinstance(max_row, int) or max_row < max(2, config.d_conv - 1):
            raise ValueError(
                f"max_row must be an int of at least max(2, d_conv - 1) = "
                f"{max(2, config.d_conv - 1)}, got {max_row!r}"
            )
        batch = pack_stream(prompts, max_row)
        continues = batch.continues
    else:
        batch = pack_sequences(prompts, row_length)
    placements = batch.placements  # sorted by prompt, then piece; a prompt's last piece last
    rows, columns, lengths = (
        placements[:, ROW],
        placements[:, COLUMN],
        placements[:, PIECE_LENGTH],
    )
    prompt = placements[:, SEQUENCE_INDEX]
    final = np.flatnonzero(np.r_[prompt[1:] != prompt[:-1], True])  # each prompt's last piece
    slots = batch.segment_ids[rows[final], columns[final]]
    last = (columns + lengths - 1)[final]
    # Packed rows and segment slots bucketed to powers of two; padding rows hold segment 0.
    num_rows = batch_bucket(batch.tokens.shape[0])
    tokens = _pad_to(batch.tokens, num_rows)
    prompt_of = np.full(tokens.shape, size, np.int32)  # `size`: no prompt (dropped)
    for i, r, c, n in zip(prompt, rows, columns, lengths):
        prompt_of[r, c : c + n] = i
    index = lambda a: _pad_to(a.astype(np.int32), size, repeat_last=True)  # noqa: E731
    return PrefillInputs(
        tokens=tokens,
        segment_ids=_pad_to(batch.segment_ids, num_rows),
        rows=index(rows[final]),
        slots=index(slots),
        last=index(last),
        prompt_of=prompt_of,
        num_segments=batch_bucket(int(batch.segment_ids.max()) + 1),
        num_prompts=num,
        continues=None if continues is None else _pad_to(continues, num_rows),
    )


def prefill_batch(model, prompts, max_row: int | None = None, *, state_dtype=None) -> Prefilled:
    """Runs all prompts through the model in one packed pass (see the module docstring);
    max_row: prefill_inputs'; state_dtype: the SSM state's storage dtype (None: the model's
    compute dtype, resolve_state_dtype; "float32" or "bfloat16": the state is rounded to it
    here, and kept so by every decode step)."""
    model = prepare(model)
    # Each layer's states leave its prefill in the storage dtype: rounded there, the float32
    # states of every layer never exist together (at batch 128 mamba2-2.7b's are 21 GB).
    store = jnp.dtype(resolve_state_dtype(state_dtype, model.config)).name
    inputs = prefill_inputs(prompts, model.config, max_row)
    links = {} if inputs.continues is None else dict(continues=jnp.asarray(inputs.continues))
    rows, slots, last = map(jnp.asarray, (inputs.rows, inputs.slots, inputs.last))
    segment_ids = jnp.asarray(inputs.segment_ids)
    residual = _embed(_table(model), jnp.asarray(inputs.tokens))
    if isinstance(model.config, (HybridConfig, Mamba3Config)):  # caches of any structure
        # A hybrid has a graph a layer; Mamba-3's layers share one.
        hybrid = isinstance(model.config, HybridConfig)
        graphs = model.graphs[0] if hybrid else itertools.repeat(model.graphs[0])
        caches = []
        for graph, params in zip(graphs, model.params["layers"]):
            residual, cache = _prefill_hybrid_layer(
                graph,
                params,
                residual,
                segment_ids,
                rows,
                slots,
                num_segments=inputs.num_segments,
                store=store,
            )
            caches.append(cache)
        state = HybridDecodeState(tuple(caches))
    conv, ssm = [], []
    mixer_state = not isinstance(model.config, (HybridConfig, Mamba3Config))
    for params in model.params["layers"] if mixer_state else ():
        residual, c, s = _prefill_layer(
            model.graphs[0],
            params,
            residual,
            segment_ids,
            rows,
            slots,
            num_segments=inputs.num_segments,
            store=store,
            **links,
        )
        conv.append(c)
        ssm.append(s)
        state = DecodeState(tuple(conv), tuple(ssm))
    logits = _prefill_head(_head_params(model), model.graphs, model.config, residual, rows, last)
    seen = _seen(
        jnp.asarray(inputs.tokens),
        jnp.asarray(inputs.prompt_of),
        size=len(inputs.rows),
        vocab=model.config.padded_vocab_size,
    )
    return Prefilled(logits, state, seen, inputs.num_prompts)


def prefill(
    model, prompts, max_row: int | None = None, *, state_dtype=None
) -> tuple[jax.Array, DecodeState]:
    """Runs all prompts through the model in one packed pass.

    Args:
      model: MambaLM, Mamba2LM or PreparedModel.
      prompts: list of 1-D integer token sequences, each at least one token long.
      max_row: optional longest row: when a prompt is longer, the prompts are laid end to end
        in linked rows of max_row tokens (prefill_inputs), with the same results.
      state_dtype: the SSM state's storage dtype: None (the model's compute dtype, as
        mamba_ssm; float32 for Mamba-3), "float32" or "bfloat16".

    Returns:
      (logits (p, v) float32 at each prompt's last token, DecodeState for p prompts).
    """
    out = prefill_batch(model, prompts, max_row, state_dtype=state_dtype)
    num = out.num_prompts
    return out.logits[:num], jax.tree.map(lambda x: x[:num], out.state)


@functools.partial(
    jax.jit, static_argnames=("graph", "num_segments", "store"), donate_argnames=("residual",)
)
def _prefill_layer(
    graph,
    params,
    residual,
    segment_ids,
    rows,
    slots,
    *,
    num_segments,
    store="float32",
    continues=None,
):
    """One layer of the packed prefill: (residual, conv (p, w - 1, x), ssm (p, ...) in the
    storage dtype `store`) at the prompts' rows and slots."""
    links = {} if continues is None else dict(continues=continues)
    residual, cache = nnx.merge(graph, params)(
        residual, segment_ids, num_segments=num_segments, **links
    )
    return residual, cache.conv[rows, slots], cache.ssm[rows, slots].astype(store)


@functools.partial(
    jax.jit, static_argnames=("graph", "num_segments", "store"), donate_argnames=("residual",)
)
def _prefill_hybrid_layer(
    graph, params, residual, segment_ids, rows, slots, *, num_segments, store="float32"
):
    residual, cache = nnx.merge(graph, params)(residual, segment_ids, num_segments=num_segments)
    return residual, _store_state(jax.tree.map(lambda x: x[rows, slots], cache), jnp.dtype(store))


@jax.jit
def _embed(table, tokens):
    return table[tokens].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphs", "config"))
def _prefill_head(head_params, graphs, config, residual, rows, last):
    return _head(head_params, graphs, config, residual[rows, last])


@functools.partial(jax.jit, static_argnames=("size", "vocab"))
def _seen(tokens, prompt_of, *, size, vocab):
    seen = jnp.zeros((size, vocab), bool)
    return seen.at[prompt_of.ravel(), tokens.ravel()].set(True, mode="drop")


def _pad_to(a, rows, *, repeat_last=False):
    if a.shape[0] == rows:
        return a
    fill = (
        np.repeat(a[-1:], rows - a.shape[0], axis=0)
        if repeat_last
        else np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)
    )
    return np.concatenate([a, fill])


# ---------------------------------------------------------------------------------------------
# One step through every layer.


def _table(model: PreparedModel):
    return model.params["embedding"]["embedding"][...]


def _head_params(model: PreparedModel):
    head = model.params["head_embedding"]
    return dict(
        norm_f=model.params["norm_f"],
        lm_head=model.params["lm_head"],
        embedding=model.params["embedding"] if head is None else head,
    )


def _head(head_params, graphs, config: MambaConfig, residual):
    """Final norm and vocabulary projection: residual (..., d) -> logits (..., v) float32."""
    hidden = nnx.merge(graphs[2], head_params["norm_f"])(residual)
    return _project(head_params, graphs, config, hidden)


def _project(head_params, graphs, config: MambaConfig, hidden):
    """The vocabulary projection of the normed hidden (..., d) -> logits (..., v) float32."""
    if head_params["lm_head"] is not None:
        logits = nnx.merge(graphs[3], head_params["lm_head"])(hidden)
    else:
        table = head_params["embedding"]["embedding"][...]
        logits = hidden @ table.astype(config.compute_dtype).T
    return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graph", "impl"))
def _layer_step(graph, params, residual, pending, conv, ssm, *, impl: str):
    """One token through one block, whose residual add is left to the next: (residual + the
    previous block's output `pending`, this block's output, conv, ssm). The add and this
    block's norm are one kernel with a Pallas impl (layers.decode_add_norm), or part of the
    mixer's fused in_proj kernel (the mixers' decode_after_add). Jitted, so that
    the decode step, which calls it once per layer with arguments of the same shapes, traces
    and lowers the block once (a call to one function, which XLA inlines before optimising): a
    fresh process pays the tracing and lowering before it can look the program up in the
    persistent cache."""
    block = nnx.merge(graph, params)
    options = {}
    if isinstance(block.mixer, Mamba2Mixer):
        options = dict(defer_norm=defers_norm(block.mixer.config, impl))
    residual, out, cache = block.mixer.decode_after_add(
        residual, pending, block.norm, MixerState(conv, ssm), impl, **options
    )
    return residual, out, cache.conv, cache.ssm


@functools.partial(jax.jit, static_argnames=("graph", "impl"))
def _hybrid_layer_step(graph, params, residual, cache, *, impl: str):
    """_layer_step for a hybrid layer: its blocks' caches in a tuple."""
    return nnx.merge(graph, params)(residual, cache=cache, decode_impl=impl)


def _step(model: PreparedModel, tokens, state: DecodeState, impl: str):
    residual = _table(model)[tokens].astype(jnp.float32)
    if isinstance(model.config, HybridConfig | Mamba3Config):
        # A hybrid has one graph per layer (its kinds differ); Mamba-3's layers share one.
        graphs = model.graphs[0]
        if isinstance(model.config, Mamba3Config):
            graphs = [graphs] * len(state.layers)
        caches = []
        for graph, params, cache in zip(graphs, model.params["layers"], state.layers):
            residual, cache = _hybrid_layer_step(graph, params, residual, cache, impl=impl)
            caches.append(cache)
        return (
            _head(_head_params(model), model.graphs, model.config, residual),
            HybridDecodeState(tuple(caches)),
        )
    # The first block adds zeros (exact), so that every layer calls one _layer_step; a Mamba2
    # block's output through the Pallas step leaves its norm's scale to the next add.
    if defers_norm(model.config, impl):
        pending = no_output(model.config, residual.shape[0])
    else:
        pending = jnp.zeros(residual.shape, model.config.compute_dtype)
    conv, ssm = [], []
    for params, c, s in zip(model.params["layers"], state.conv, state.ssm):
        residual, pending, c, s = _layer_step(
            model.graphs[0], params, residual, pending, c, s, impl=impl
        )
        conv.append(c)
        ssm.append(s)
    head = _head_params(model)
    norm_f = nnx.merge(model.graphs[2], head["norm_f"])
    _, hidden = decode_add_norm(residual, pending, norm_f, impl)
    return _project(head, model.graphs, model.config, hidden), DecodeState(tuple(conv), tuple(ssm))


def step(model: PreparedModel, tokens, state: DecodeState, *, decode_impl: str = "auto"):
    """One token per sequence through every layer: tokens (p,) int -> (logits (p, v) float32,
    next DecodeState). `model` must be prepared (`prepare`)."""
    return _step_jit(model, tokens, state, impl=resolve_decode_impl(decode_impl, model.config))


_step_jit = jax.jit(_step, static_argnames=("impl",))


# ---------------------------------------------------------------------------------------------
# The decode loop.


class _Run(NamedTuple):
    """The decode loop's carry."""

    i: jax.Array  # () tokens generated so far (the next column of `out`)
    token: jax.Array  # (P,) the last token of each row
    state: DecodeState
    out: jax.Array  # (P, T) generated tokens, the filler after a row stops
    done: jax.Array  # (P,) stopped (an EOS id, or a padding row)
    count: jax.Array  # (P,) tokens generated, EOS included
    seen: jax.Array  # (P, v) tokens the repetition penalty applies to
    key: jax.Array


def _filler(params: SamplingParams):
    return jnp.maximum(params.eos_ids[0], 0)


@functools.partial(
    jax.jit, static_argnames=("mode", "vocab_size", "columns"), donate_argnames=("state", "seen")
)
def _start(logits, state, seen, key, params, num_prompts, *, mode, vocab_size, columns):
    size = logits.shape[0]
    rows = jnp.arange(size)
    first = sample(logits, seen, jax.random.fold_in(key, 0), params, mode, vocab_size=vocab_size)
    padding = rows >= num_prompts
    fill = _filler(params)
    first = jnp.where(padding, fill, first)
    out = jnp.full((size, columns), fill, jnp.int32).at[:, 0].set(first)
    return _Run(
        i=jnp.int32(1),
        token=first,
        state=state,
        out=out,
        done=padding | is_eos(first, params),
        count=(~padding).astype(jnp.int32),
        seen=seen.at[rows, first].set(True),
        key=key,
    )


def _decode_loop_body(model, run: _Run, limit, params, *, mode, impl, vocab_size):
    """Steps until `limit` tokens are generated or every row has stopped."""
    fill = _filler(params)
    rows = jnp.arange(run.token.shape[0])

    def cond(run):
        return (run.i < limit) & ~jnp.all(run.done)

    def body(run):
        logits, state = _step(model, run.token, run.state, impl)
        token = sample(
            logits,
            run.seen,
            jax.random.fold_in(run.key, run.i),
            params,
            mode,
            vocab_size=vocab_size,
        )
        token = jnp.where(run.done, fill, token)
        return _Run(
            i=run.i + 1,
            token=token,
            state=state,
            out=jax.lax.dynamic_update_slice(run.out, token[:, None], (0, run.i)),
            done=run.done | is_eos(token, params),
            count=run.count + (~run.done).astype(jnp.int32),
            seen=run.seen.at[rows, token].set(True),
            key=run.key,
        )

    return jax.lax.while_loop(cond, body, run)


# From this many rows the decode loop compiles with XLA's Triton GEMM fusions off, so that every
# product is cuBLAS's: at batch 128 XLA's Triton GEMMs split K and sum the splits in separate
# reduction fusions (11.6 us a 2.8b layer) where cuBLAS's split-K reduces in 4.9. One H100
# (docs/log.md, thirteenth session): 2.8b 6.52 -> 5.89 ms a step at batch 128, mamba2-2.7b
# 12.53 -> 11.79; at batch 1 to 32 cuBLAS was slower (2.8b 3.14 -> 3.23 at 1, 4.18 -> 4.23 at
# 32; mamba2-2.7b 3.60 -> 3.79 at 8).
CUBLAS_GEMM_ROWS = 64
_LOOP_JIT = dict(static_argnames=("mode", "impl", "vocab_size"), donate_argnames=("run",))
_decode_loop = jax.jit(_decode_loop_body, **_LOOP_JIT)
_decode_loop_cublas = jax.jit(
    _decode_loop_body, compiler_options={"xla_gpu_enable_triton_gemm": False}, **_LOOP_JIT
)


def decode_loop_for(rows: int):
    """The jitted decode loop for a batch of `rows` rows (the run's padded rows): cuBLAS's GEMMs
    from CUBLAS_GEMM_ROWS rows (the module's value, read at each call), XLA's below."""
    return _decode_loop_cublas if rows >= CUBLAS_GEMM_ROWS else _decode_loop


def _begin(
    model: PreparedModel, prefilled: Prefilled, max_new_tokens: int, sampling: SamplingConfig
) -> _Run:
    if isinstance(prefilled.state, HybridDecodeState):
        # Room in every KV cache for the loop's tokens (its bucket: the loop may run that far).
        prefilled.state = jax.tree.map(
            lambda c: (
                pad_kv_cache(c, new_token_bucket(max_new_tokens)) if isinstance(c, KVCache) else c
            ),
            prefilled.state,
            is_leaf=lambda c: isinstance(c, KVCache),
        )
    run = _start(
        prefilled.logits,
        prefilled.state,
        prefilled.seen,
        jax.random.key(sampling.seed),
        sampling.params(),
        jnp.int32(prefilled.num_prompts),
        mode=sampling.mode,
        vocab_size=model.config.vocab_size,
        columns=new_token_bucket(max_new_tokens),
    )
    prefilled.state = prefilled.seen = None  # donated
    return run


def decode_batch(
    model,
    prefilled: Prefilled,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    decode_impl: str = "auto",
):
    """Samples up to max_new_tokens per prompt from a prefill (which it consumes).

    Returns numpy (tokens (p, max_new_tokens) int32, num_generated (p,) int32): row i holds its
    num_generated[i] tokens (ending with an EOS id if it stopped at one), then the first EOS id
    (or 0) as filler.
    """
    model = prepare(model)
    sampling = sampling or SamplingConfig()
    _check_max_new_tokens(max_new_tokens)
    num = prefilled.num_prompts
    if max_new_tokens == 0:
        return np.zeros((num, 0), np.int32), np.zeros((num,), np.int32)
    impl = resolve_decode_impl(decode_impl, model.config)
    run = _begin(model, prefilled, max_new_tokens, sampling)
    run = decode_loop_for(run.token.shape[0])(
        model,
        run,
        jnp.int32(max_new_tokens),
        sampling.params(),
        mode=sampling.mode,
        impl=impl,
        vocab_size=model.config.vocab_size,
    )
    out, count = np.asarray(run.out), np.asarray(run.count)
    return out[:num, :max_new_tokens], count[:num]


def stream(
    model,
    prefilled: Prefilled,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    block: int = 8,
    decode_impl: str = "auto",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """decode_batch in jitted blocks of `block` steps (the same compiled loop, run to a later
    limit each time): yields numpy (tokens (p, generated so far), num_generated (p,)) after
    the first token and after each block, until every prompt is done."""
    model = prepare(model)
    sampling = sampling or SamplingConfig()
    _check_max_new_tokens(max_new_tokens)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    num = prefilled.num_prompts
    if max_new_tokens == 0:
        return
    impl = resolve_decode_impl(decode_impl, model.config)
    params = sampling.params()
    run = _begin(model, prefilled, max_new_tokens, sampling)
    while True:
        i, done = int(run.i), bool(np.all(np.asarray(run.done)))
        yield np.asarray(run.out)[:num, :i], np.asarray(run.count)[:num]
        if i >= max_new_tokens or done:
            return
        run = decode_loop_for(run.token.shape[0])(
            model,
            run,
            jnp.int32(min(i + block, max_new_tokens)),
            params,
            mode=sampling.mode,
            impl=impl,
            vocab_size=model.config.vocab_size,
        )


# ---------------------------------------------------------------------------------------------
# The functions callers had before the batch/stream API (same arguments, same results).


def sample_next_token(
    logits, key, *, temperature=1.0, top_k=None, top_p=None, min_p=None, vocab_size=None
):
    """Samples one token per row of logits (p, v); temperature 0 is greedy (argmax).

    Only ids below vocab_size (default: all) can be drawn; see jax_packmamba.sampling.
    """
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return sample(logits, None, key, config.params(), config.mode, vocab_size=vocab_size)


def sampling_config(
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=1.0,
    seed=0,
    eos_id=None,
    eos_ids=(),
) -> SamplingConfig:
    """A SamplingConfig from keyword arguments (eos_id and eos_ids together)."""
    eos = tuple(eos_ids) + (() if eos_id is None else (eos_id,))
    if eos_id is not None and (not isinstance(eos_id, (int, np.integer)) or eos_id < 0):
        raise ValueError(f"eos_id must be None or an int >= 0, got {eos_id!r}")
    return SamplingConfig(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_ids=eos,
        seed=seed,
    )


def decode(
    model,
    logits,
    state: DecodeState,
    max_new_tokens: int,
    *,
    prompts=None,
    decode_impl: str = "auto",
    **sampling,
):
    """Samples up to max_new_tokens per sequence from prefill's (logits, state).

    sampling: the keyword arguments of `sampling_config`. prompts (optional): the prompts'
    tokens, which the repetition penalty counts as seen (as Hugging Face does); without them
    only generated tokens count. Returns (tokens (p, max_new_tokens) int32, num_generated (p,)
    int32) as jax arrays, as decode_batch.
    """
    model = prepare(model)
    config = sampling_config(**sampling)
    _check_max_new_tokens(max_new_tokens)
    num = logits.shape[0]
    size = batch_bucket(num)
    vocab = model.config.padded_vocab_size
    seen = np.zeros((size, vocab), bool)
    for i, p in enumerate(prompts or ()):
        seen[i, np.asarray(p, np.int64)] = True
    pad = lambda x: (
        jnp.concatenate([x, jnp.repeat(x[-1:], size - num, axis=0)]) if size > num else x
    )  # noqa: E731
    prefilled = Prefilled(pad(logits), jax.tree.map(pad, state), jnp.asarray(seen), num)
    tokens, count = decode_batch(model, prefilled, max_new_tokens, config, decode_impl=decode_impl)
    return jnp.asarray(tokens), jnp.asarray(count)


def generate(
    model,
    prompts,
    max_new_tokens: int,
    *,
    decode_impl: str = "auto",
    state_dtype=None,
    **sampling,
) -> list[np.ndarray]:
    """Continues each prompt by up to max_new_tokens tokens.

    Args:
      model: MambaLM or Mamba2LM (or PreparedModel).
      prompts: list of 1-D integer token sequences (any lengths, at least one token each).
      max_new_tokens: tokens to generate per prompt (>= 0).
      decode_impl: "auto", "xla", "pallas" or "pallas_interpret" (model.resolve_decode_impl).
      state_dtype: the SSM state's storage dtype between decode steps: None (the model's
        compute dtype, as mamba_ssm: bfloat16 for a bfloat16 model, half a float32 state's
        memory traffic; float32 for a float32 model and for Mamba-3), "float32" (the extra
        accuracy for a bfloat16 model) or "bfloat16". The update itself is always float32.
      sampling: temperature (0: greedy), top_k, top_p, min_p, repetition_penalty, seed, and
        eos_id / eos_ids (a sequence stops after generating one, which its output includes);
        see jax_packmamba.sampling.

    Returns:
      One int32 numpy array of generated tokens per prompt, in prompt order.

    A MambaLM is prepared for inference (`prepare`) on every call; for repeated calls pass
    `prepare(model)` instead.
    """
    model = prepare(model)
    config = sampling_config(**sampling)
    _check_max_new_tokens(max_new_tokens)
    prompts = _check_prompts(prompts, model.config)
    resolve_decode_impl(decode_impl, model.config)  # a bad decode_impl fails before the prefill
    resolve_state_dtype(state_dtype, model.config)
    if max_new_tokens == 0:
        return [np.zeros((0,), np.int32) for _ in prompts]
    prefilled = prefill_batch(model, prompts, state_dtype=state_dtype)
    tokens, count = decode_batch(model, prefilled, max_new_tokens, config, decode_impl=decode_impl)
    return [tokens[i, : count[i]] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------
# Compilation accounting and argument checks.


def _check_prompts(prompts, config: MambaConfig) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise ValueError(
            f"prompts must be a list of 1-D token sequences, got {type(prompts).__name__}"
        )
    out = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}] must be a non-empty 1-D integer sequence, got "
                f"shape {a.shape} dtype {a.dtype}"
            )
        if a.min() < 0 or a.max() >= config.padded_vocab_size:
            raise ValueError(
                f"prompts[{i}] has token ids outside [0, {config.padded_vocab_size}): "
                f"min {a.min()}, max {a.max()}"
            )
        out.append(a.astype(np.int32))
    if not out:
        raise ValueError("prompts is empty")
    return out


def _check_max_new_tokens(max_new_tokens):
    if (
        not isinstance(max_new_tokens, (int, np.integer))
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def timed(fn, *args, **kwargs):
    """(result, seconds, CompileStats) of fn(*args, **kwargs), blocking on the result."""
    with compile_stats() as stats:
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        seconds = time.perf_counter() - start
    return out, seconds, stats
