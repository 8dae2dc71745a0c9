"""Text generation with a recurrent cache: one packed prefill, then one jitted decode loop.

Axis letters: l layer, p prompt, r packed row, t time, d d_model, e d_inner, n d_state,
w d_conv - 1, v vocabulary.

    prefill  all prompts, whatever their lengths, are packed into rows (`pack_sequences`) and
             run through the model ONCE; every layer's scan returns each segment's final SSM
             state and the conv state is gathered from each prompt's last w conv inputs (zeros
             where the prompt is shorter), so each prompt leaves with the state it would have
             had run alone: DecodeState(conv (l, p, w, e), ssm (l, p, e, n)).
    decode   a `lax.while_loop` of recurrent steps (sample, then one token through every
             layer): the state has a fixed size, so a token costs the same whatever was
             generated before, and the loop compiles once for a given batch and length.

The layers' parameters are stacked (`prepare`) so both passes `lax.scan` over layers: the
compile time does not grow with the depth. Weights that the model only uses cast to the compute
dtype (projections, conv) are stored cast, which changes no result and halves what each decode
step reads in bfloat16.

The command line is jax_packmamba/generate.py: `python -m jax_packmamba.generate --checkpoint DIR
--prompt "..."`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_packmamba.config import MambaConfig
from jax_packmamba.model import MambaLM, MixerState, vocab_logits
from jax_packmamba.packing import COLUMN, PIECE_LENGTH, ROW, pack_sequences

# Parameters that the model casts to the compute dtype before use (nnx.Linear and the conv);
# dt_proj.bias is not among them: it enters the scan in float32.
_CAST_PARAMS = {("in_proj", "kernel"), ("in_proj", "bias"), ("x_proj", "kernel"),
                ("dt_proj", "kernel"), ("out_proj", "kernel"), ("out_proj", "bias"),
                ("conv_weight",), ("conv_bias",), ("lm_head", "kernel")}


class DecodeState(NamedTuple):
    """Recurrent cache of every layer: conv (l, p, d_conv - 1, e) in the compute dtype (the
    last conv inputs, oldest first), ssm (l, p, e, n) float32."""

    conv: jax.Array
    ssm: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["config", "graphs"])
@dataclasses.dataclass(frozen=True)
class PreparedModel:
    """A MambaLM split for inference: the layers' parameters stacked along a leading axis.

    params: {"embedding", "layers", "norm_f", "lm_head", "head_embedding"} nnx states (None
    where absent); graphs: (block, embedding, norm_f, lm_head) graph definitions (static).
    head_embedding is the tied output table already in the compute dtype (None when the head
    is untied or the compute dtype is float32): each decode step then reads it at its size
    instead of casting the float32 table again. Build with `prepare(model)`; a pytree, so it passes through jit.
    """

    config: MambaConfig
    graphs: tuple
    params: dict


def prepare(model: MambaLM) -> PreparedModel:
    """Stacks the layers of `model` and stores compute-dtype copies of the weights that are
    only used in the compute dtype. The result does not share memory with the model."""
    if isinstance(model, PreparedModel):
        return model
    if not isinstance(model, MambaLM):
        raise ValueError(f"model must be a MambaLM or PreparedModel, got {type(model).__name__}")
    dtype = model.config.compute_dtype
    block_graph, _ = nnx.split(model.layers[0])
    layers = [inference_state(layer, "layers", dtype) for layer in model.layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    params = dict(layers=stacked)
    graphs = [block_graph]
    for name in ("embedding", "norm_f", "lm_head"):
        module = getattr(model, name)
        graphs.append(None if module is None else nnx.split(module)[0])
        params[name] = None if module is None else inference_state(module, name, dtype)
    tied_cast = model.lm_head is None and dtype != jnp.float32
    params["head_embedding"] = (
        jax.tree.map(lambda x: x.astype(dtype), params["embedding"]) if tied_cast else None)
    return PreparedModel(config=model.config, graphs=tuple(graphs), params=params)


def inference_state(module, name: str, dtype):
    """A copy of `module`'s state (module = model.<name>, or a block for name "layers") with
    the weights used only in the compute dtype cast to it."""

    def cast(path, x):
        names = (name, *(k.key for k in path if isinstance(k, jax.tree_util.DictKey)))
        if any(names[-len(suffix):] == suffix for suffix in _CAST_PARAMS):
            return x.astype(dtype)
        return jnp.array(x)  # a copy, so that the caller may free the model

    return jax.tree_util.tree_map_with_path(cast, nnx.split(module)[1])


# ---------------------------------------------------------------------------------------------
# Prefill and step.


def prefill(model, prompts) -> tuple[jax.Array, DecodeState]:
    """Runs all prompts through the model in one packed pass.

    Args:
      model: MambaLM or PreparedModel.
      prompts: list of 1-D integer token sequences, each at least one token long.

    Returns:
      (logits (p, v) float32 at each prompt's last token, DecodeState for p prompts).
    """
    model = prepare(model)
    prompts = _check_prompts(prompts, model.config)
    longest = max(len(p) for p in prompts)
    row_length = max(2, 1 << (longest - 1).bit_length())  # one compile per power of two
    batch = pack_sequences(prompts, row_length)
    placements = batch.placements  # one piece per prompt, in prompt order
    rows = placements[:, ROW]
    slots = batch.segment_ids[rows, placements[:, COLUMN]]
    last = placements[:, COLUMN] + placements[:, PIECE_LENGTH] - 1
    return _prefill(model, jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids),
                    jnp.asarray(rows), jnp.asarray(slots), jnp.asarray(last),
                    num_segments=int(batch.segment_ids.max()) + 1)


@functools.partial(jax.jit, static_argnames=("num_segments",))
def _prefill(model: PreparedModel, tokens, segment_ids, rows, slots, last, *, num_segments):
    block_graph, embed_graph, _, _ = model.graphs
    residual = nnx.merge(embed_graph, model.params["embedding"])(tokens)

    def layer(residual, params):
        block = nnx.merge(block_graph, params)
        residual, state = block.prefill(residual, segment_ids, num_segments=num_segments)
        return residual, MixerState(state.conv[rows, slots], state.ssm[rows, slots])

    residual, states = jax.lax.scan(layer, residual, model.params["layers"])
    logits = _head(model, residual[rows, last])
    return logits, DecodeState(conv=states.conv, ssm=states.ssm)


@jax.jit
def step(model: PreparedModel, tokens, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """One token per sequence through every layer: tokens (p,) int -> (logits (p, v) float32,
    next DecodeState). `model` must be prepared (`prepare`)."""
    block_graph, embed_graph, _, _ = model.graphs
    residual = nnx.merge(embed_graph, model.params["embedding"])(tokens)

    def layer(residual, xs):
        params, conv, ssm = xs
        residual, state = nnx.merge(block_graph, params).step(residual, MixerState(conv, ssm))
        return residual, state

    residual, states = jax.lax.scan(layer, residual, (model.params["layers"], state.conv, state.ssm))
    return _head(model, residual), DecodeState(conv=states.conv, ssm=states.ssm)


def _head(model: PreparedModel, residual):
    _, embed_graph, norm_graph, head_graph = model.graphs
    params = model.params
    lm_head = None if head_graph is None else nnx.merge(head_graph, params["lm_head"])
    table = params["embedding"] if params["head_embedding"] is None else params["head_embedding"]
    logits = vocab_logits(residual, nnx.merge(norm_graph, params["norm_f"]),
                          nnx.merge(embed_graph, table), lm_head, model.config.compute_dtype)
    return logits.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Sampling and the decode loop.


def sample_next_token(logits, key, *, temperature=1.0, top_k=None, top_p=None, vocab_size=None):
    """Samples one token per row of logits (p, v); temperature 0 is greedy (argmax).

    Only ids below vocab_size (default: all) can be drawn. top_k keeps the k largest logits;
    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (after
    temperature and top_k). top_k and the presence of top_p must be static under jit.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if vocab_size is not None and vocab_size < v:
        logits = jnp.where(jnp.arange(v) < vocab_size, logits, -jnp.inf)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, v))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = before < top_p  # always keeps the most likely token
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode(model, logits, state: DecodeState, max_new_tokens: int, *, temperature=1.0,
           top_k=None, top_p=None, seed=0, eos_id=None):
    """Samples up to max_new_tokens per sequence from prefill's (logits, state).

    Returns (tokens (p, max_new_tokens) int32, num_generated (p,) int32) as jax arrays: row i
    holds its num_generated[i] tokens (ending with eos_id if it stopped there), then eos_id (or
    0) as filler. One jitted while_loop; it ends when every sequence has stopped.
    """
    model = prepare(model)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id)
    greedy = temperature == 0
    return _decode(model, logits, state, jax.random.key(seed),
                   jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p or 1.0),
                   jnp.int32(-1 if eos_id is None else eos_id),
                   max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                   use_top_p=top_p is not None)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p"))
def _decode(model, logits, state, key, temperature, top_p, eos_id, *, max_new_tokens, greedy,
            top_k, use_top_p):
    num = logits.shape[0]
    fill = jnp.maximum(eos_id, 0)
    sample = functools.partial(
        sample_next_token, temperature=0 if greedy else temperature, top_k=top_k,
        top_p=top_p if use_top_p else None, vocab_size=model.config.vocab_size)

    first = sample(logits, jax.random.fold_in(key, 0))
    out = jnp.full((num, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    done = first == eos_id
    count = jnp.ones((num,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, previous, state, out, done, count = carry
        logits, state = step(model, previous, state)
        token = jnp.where(done, fill, sample(logits, jax.random.fold_in(key, i)))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        count = count + (~done).astype(jnp.int32)
        return i + 1, token, state, out, done | (token == eos_id), count

    carry = (jnp.int32(1), first, state, out, done, count)
    _, _, _, out, _, count = jax.lax.while_loop(cond, body, carry)
    return out, count


def generate(model, prompts, max_new_tokens: int, *, temperature=1.0, top_k=None, top_p=None,
             seed=0, eos_id=None) -> list[np.ndarray]:
    """Continues each prompt by up to max_new_tokens tokens.

    Args:
      model: MambaLM (or PreparedModel).
      prompts: list of 1-D integer token sequences (any lengths, at least one token each).
      max_new_tokens: tokens to generate per prompt (>= 0).
      temperature: softmax temperature; 0 is greedy decoding.
      top_k, top_p: optional top-k and nucleus filtering.
      seed: PRNG seed of the sampling.
      eos_id: a sequence stops after generating this id (included in its output).

    Returns:
      One int32 numpy array of generated tokens per prompt, in prompt order.

    A MambaLM is stacked for inference (`prepare`) on every call; for repeated calls pass
    `prepare(model)` instead.
    """
    model = prepare(model)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id)
    prompts = _check_prompts(prompts, model.config)
    if max_new_tokens == 0:
        return [np.zeros((0,), np.int32) for _ in prompts]
    logits, state = prefill(model, prompts)
    tokens, count = decode(model, logits, state, max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id)
    tokens, count = np.asarray(tokens), np.asarray(count)
    return [tokens[i, :count[i]] for i in range(len(prompts))]


def _check_prompts(prompts, config: MambaConfig) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise ValueError(f"prompts must be a list of 1-D token sequences, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D integer sequence, got "
                             f"shape {a.shape} dtype {a.dtype}")
        if a.min() < 0 or a.max() >= config.padded_vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {config.padded_vocab_size}): "
                             f"min {a.min()}, max {a.max()}")
        out.append(a.astype(np.int32))
    if not out:
        raise ValueError("prompts is empty")
    return out


def _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if eos_id is not None and (not isinstance(eos_id, (int, np.integer)) or eos_id < 0):
        raise ValueError(f"eos_id must be None or an int >= 0, got {eos_id!r}")
