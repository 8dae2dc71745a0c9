"""The pure training step, its optimizer and state, and the jitted, sharded wrappers.

Axis letters: a micro-batches (gradient accumulation), b rows, t time, v vocabulary.

    train_step(state, batch) -> (state, metrics)

batch holds (a, b, t) arrays tokens, segment_ids, targets, loss_mask. The loss is the mean
cross-entropy over every real target of all a micro-batches (loss_mask: no target across a
document boundary, none on padding), so accumulating a micro-batches gives exactly the gradient
of one batch holding all of them. Parameters are float32; the model computes in its config's
dtype (bfloat16 on GPU); the loss takes the logits in float32, a chunk of tokens at a time
(jax_packmamba.loss.chunked_cross_entropy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_packmamba import LM, Mamba2Config, MambaConfig
from jax_packmamba.loss import CHUNK_TOKENS
from train.config import OptimConfig

# Mamba-3's B_bias and C_bias are biases, its mimo_x/z/o per-channel scales (as norm weights).
NO_DECAY_NAMES = (
    "bias",
    "conv_bias",
    "A_log",
    "D",
    "B_bias",
    "C_bias",
    "mimo_x",
    "mimo_z",
    "mimo_o",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # float32 parameters as a plain nested dict (nnx.to_pure_dict), see init_state
    opt_state: Any
    rng: jax.Array  # uint32 key data, split every step (the model itself is deterministic)
    # --data.long_docs=link_across_steps: {"conv", "ssm"} (l, b, ...), the state every row's
    # last document ended in (init_carry); with --data.stream_groups=G > 1 the same with a
    # leading group axis, (G, l, b, ...), and "next_group" (int32 scalar: the group the next
    # micro-batch serves); None otherwise (the state's tree is then unchanged).
    carry: Any = None


def _names(path) -> list[str]:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
    return out


def decay_mask(params):
    """True where AdamW applies weight decay: matrices, not norms, biases, A_log or D (nor
    Mamba2's dt_bias and gated norm: vectors, and "norm" is in the gated norm's path). Under
    "layers" the leading axis is the layer axis, not a matrix dimension."""

    def decide(path, leaf):
        names = _names(path)
        if any("norm" in n for n in names) or (names and names[-1] in NO_DECAY_NAMES):
            return False
        return leaf.ndim - ("layers" in names) >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def learning_rate_schedule(config: OptimConfig, total_steps: int):
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, total_steps)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def model_graphdef(model_config: MambaConfig | Mamba2Config):
    """(graphdef, abstract params as a plain dict) of the model without allocating it."""
    abstract = nnx.eval_shape(lambda: LM(model_config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(params)


# The carry's key of the group the next micro-batch serves (--data.stream_groups > 1 only).
NEXT_GROUP = "next_group"


def init_carry(model_config: MambaConfig | Mamba2Config, rows: int, groups: int = 1) -> dict:
    """Zeros of the state carried across steps: every layer's conv inputs and SSM state of
    every row, (l, rows, ...) (the model's end_state_like as a dict); with groups > 1
    (--data.stream_groups) every group's, (groups, l, rows, ...), and "next_group" 0."""
    from jax_packmamba.model import end_state_like

    states = end_state_like(model_config, rows)._asdict()
    if groups == 1:
        return states
    carry = {k: jnp.zeros((groups, *v.shape), v.dtype) for k, v in states.items()}
    return carry | {NEXT_GROUP: jnp.zeros((), jnp.int32)}


def init_state(
    model_config: MambaConfig | Mamba2Config,
    tx: optax.GradientTransformation,
    seed: int,
    carry_rows: int | None = None,
    carry_groups: int = 1,
) -> TrainState:
    model = LM(model_config, rngs=nnx.Rngs(seed))
    # Plain arrays, not nnx Variables: every call of the jitted step flattens the state and
    # rebuilds the returned one, in Python for Variables. With the 1,450 leaves of a 48-layer
    # model (parameters and both Adam moments) a jitted call that only returns the state took
    # 8-9 ms longer with Variables (benchmarks/results/dispatch_nvidia-h200.json).
    params = nnx.to_pure_dict(nnx.split(model)[1])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
        carry=None if carry_rows is None else init_carry(model_config, carry_rows, carry_groups),
    )


def token_losses(
    graphdef,
    params,
    tokens,
    segment_ids,
    targets,
    loss_mask,
    continues=None,
    *,
    chunk_tokens: int = CHUNK_TOKENS,
):
    """(sum of masked cross-entropy, number of targets) for one (b, t) micro-batch; continues
    (b, 1) bool: the rows' links (--data.long_docs=link), row 0's ignored. The head and the
    loss run fused over chunks of about chunk_tokens of the (b, t) tokens (LM.cross_entropy):
    no (b, t, v) logits are held."""
    links = {} if continues is None else dict(continues=continues[:, 0].at[0].set(False))
    model = nnx.merge(graphdef, params)
    return model.cross_entropy(
        tokens, segment_ids, targets, loss_mask, chunk_tokens=chunk_tokens, **links
    )


def carried_losses(graphdef, params, mb: dict, carry: dict, *, chunk_tokens: int = CHUNK_TOKENS):
    """token_losses for --data.long_docs=link_across_steps, where every row is a stream of its
    own (train.data.Batcher): row r's first document starts from carry's row r where the
    micro-batch's flag for row r says it is the rest of the document row r ended with in the
    previous micro-batch, from zeros elsewhere; no links between rows. Returns (sum, (count,
    the carry for the next micro-batch: every row's end state, gradient stopped: truncated
    backprop through time))."""
    from jax_packmamba.layers import MixerState

    rest = mb["continues"][:, 0]  # (b,)

    def start(c):  # (l, b, ...)
        flags = rest.reshape(1, -1, *(1,) * (c.ndim - 2))
        return jnp.where(flags, c, jnp.zeros((), c.dtype))

    ce, n, end = nnx.merge(graphdef, params).cross_entropy(
        mb["tokens"],
        mb["segment_ids"],
        mb["targets"],
        mb["loss_mask"],
        start_state=MixerState(**{k: start(v) for k, v in carry.items()}),
        return_end_state=True,
        chunk_tokens=chunk_tokens,
    )
    return ce, (n, {k: jax.lax.stop_gradient(v) for k, v in end._asdict().items()})


def grouped_carried_losses(
    graphdef, params, mb: dict, carry: dict, *, chunk_tokens: int = CHUNK_TOKENS
):
    """carried_losses over a carry of G groups of rows (init_carry's, groups > 1): runs the
    micro-batch from group carry["next_group"]'s states (a dynamic index of the unsharded
    group axis), writes back that group's end states only and moves next_group on (mod G).
    A carry without groups goes to carried_losses as it is."""
    if NEXT_GROUP not in carry:
        return carried_losses(graphdef, params, mb, carry, chunk_tokens=chunk_tokens)
    g = carry[NEXT_GROUP]
    states = {k: v for k, v in carry.items() if k != NEXT_GROUP}
    groups = next(iter(states.values())).shape[0]
    rows = {k: jax.lax.dynamic_index_in_dim(v, g, keepdims=False) for k, v in states.items()}
    ce, (n, end) = carried_losses(graphdef, params, mb, rows, chunk_tokens=chunk_tokens)
    new = {k: jax.lax.dynamic_update_index_in_dim(states[k], end[k], g, 0) for k in states}
    return ce, (n, new | {NEXT_GROUP: (g + 1) % groups})


def sum_grads_carried(
    graphdef, params, batch: dict, carry: dict, *, chunk_tokens: int = CHUNK_TOKENS
):
    """sum_grads with the state carried from micro-batch to micro-batch (carried_losses; with
    stream groups, grouped_carried_losses); also returns the carry after the last one."""

    def micro(acc, mb):
        grad_sum, ce_sum, count, carry = acc
        (ce, (n, carry)), grads = jax.value_and_grad(
            lambda p: grouped_carried_losses(graphdef, p, mb, carry, chunk_tokens=chunk_tokens),
            has_aux=True,
        )(params)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, ce_sum + ce, count + n, carry), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), carry)
    (grad_sum, ce_sum, count, carry), _ = jax.lax.scan(micro, init, batch)
    return grad_sum, ce_sum, count, carry


def sum_grads(graphdef, params, batch: dict, *, chunk_tokens: int = CHUNK_TOKENS):
    """(gradient of the summed cross-entropy, that sum, the number of targets) over the (a, b, t)
    batch: its a micro-batches accumulated in float32 (chunk_tokens: token_losses')."""

    def micro(carry, mb):
        grad_sum, ce_sum, count = carry
        (ce, n), grads = jax.value_and_grad(
            lambda p: token_losses(
                graphdef,
                p,
                mb["tokens"],
                mb["segment_ids"],
                mb["targets"],
                mb["loss_mask"],
                mb.get("continues"),
                chunk_tokens=chunk_tokens,
            ),
            has_aux=True,
        )(params)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, ce_sum + ce, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grad_sum, ce_sum, count), _ = jax.lax.scan(micro, init, batch)
    return grad_sum, ce_sum, count


def explicit_grad_sums(graphdef, mesh, abstract_params, reduce_dtype):
    """sum_grads whose cross-device reduction is explicit, in reduce_dtype (a shard_map).

    Each device gathers the full parameters (all_gather over fsdp), computes the gradient of its
    own rows' summed cross-entropy (accumulated over micro-batches in float32), casts it to
    reduce_dtype and reduces it: psum_scatter over fsdp onto the parameter's shard (parameters
    the fsdp axis does not shard: psum), then psum over data; then back to float32. The loss sum
    and target count are psum'd exactly (float32, int32). Under the SPMD default XLA reduces in
    the gradients' dtype, float32; with reduce_dtype bfloat16 the gradient collectives move half
    the bytes, at the cost of summing the devices' gradients in bfloat16.

    check_vma=False: the gradient of each device's loss with respect to its gathered parameters
    is then its own, unreduced (with vma checking, jax would insert a float32 psum for the
    replicated parameters itself), and kernels that know nothing of vma types run unchanged.
    """
    from jax.sharding import PartitionSpec as P

    from train import sharding

    fsdp_size = mesh.shape["fsdp"]
    specs = sharding.param_specs(abstract_params, fsdp_size)
    batch_spec = P(None, sharding.BATCH_AXES, None)

    def fsdp_dim(spec):
        return next((i for i, name in enumerate(spec) if name == "fsdp"), None)

    def gather(x, spec):
        dim = fsdp_dim(spec)
        return x if dim is None else jax.lax.all_gather(x, "fsdp", axis=dim, tiled=True)

    def reduce(g, spec):
        g = g.astype(reduce_dtype)
        dim = fsdp_dim(spec)
        if dim is None:
            g = jax.lax.psum(g, sharding.BATCH_AXES)
        else:
            g = jax.lax.psum(
                jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True), "data"
            )
        return g.astype(jnp.float32)

    def local(params, batch, *carry):
        full = jax.tree.map(gather, params, specs)
        if carry:  # each device carries its own rows' streams: no row reads another's state
            grad_sum, ce_sum, count, *carry = sum_grads_carried(graphdef, full, batch, *carry)
        else:
            grad_sum, ce_sum, count = sum_grads(graphdef, full, batch)
        grads = jax.tree.map(reduce, grad_sum, specs)
        return (
            grads,
            jax.lax.psum(ce_sum, sharding.BATCH_AXES),
            jax.lax.psum(count, sharding.BATCH_AXES),
            *carry,
        )

    def grad_sums(params, batch, *carry):
        """(gradient sums, loss sum, target count[, the carry after the batch]): with a
        carried state (TrainState.carry) given, sum_grads_carried on each device's rows."""
        batch_specs = {k: batch_spec for k in batch}
        carried = tuple(sharding.carry_specs(c) for c in carry)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs, batch_specs, *carried),
            out_specs=(specs, P(), P(), *carried),
            check_vma=False,
        )(params, batch, *carry)

    return grad_sums


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef,
    tx,
    schedule=None,
    grad_sums=None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[TrainState, dict]:
    """One optimizer step over the (a, b, t) batch; pure. schedule(step) is reported as lr.

    grad_sums(params, batch) -> (grad_sum, ce_sum, count) as sum_grads (the default, whose
    cross-device reduction XLA's SPMD partitioner places); explicit_grad_sums gives one that
    reduces across devices itself, in a chosen dtype. With a carried state
    (--data.long_docs=link_across_steps) it is called as grad_sums(params, batch, carry) and
    also returns the carry after the batch, as sum_grads_carried (the default then).
    chunk_tokens: the loss's (token_losses') where this step makes the default grad_sums.
    """
    carry = state.carry
    if carry is not None:
        if grad_sums is None:
            grad_sums = functools.partial(sum_grads_carried, graphdef, chunk_tokens=chunk_tokens)
        grad_sum, ce_sum, count, carry = grad_sums(state.params, batch, carry)
    else:
        if grad_sums is None:
            grad_sums = functools.partial(sum_grads, graphdef, chunk_tokens=chunk_tokens)
        grad_sum, ce_sum, count = grad_sums(state.params, batch)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    loss = ce_sum / denom
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    metrics = dict(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        targets=count,
        real_tokens=(batch["segment_ids"] > 0).sum(dtype=jnp.int32),
    )
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, carry=carry)
    return new, metrics


def eval_step(params, batch: dict, *, graphdef, chunk_tokens: int = CHUNK_TOKENS) -> dict:
    """Summed cross-entropy and target count over an (a, b, t) batch (no update;
    chunk_tokens: token_losses')."""

    def micro(carry, mb):
        ce, n = token_losses(
            graphdef,
            params,
            mb["tokens"],
            mb["segment_ids"],
            mb["targets"],
            mb["loss_mask"],
            mb.get("continues"),
            chunk_tokens=chunk_tokens,
        )
        return (carry[0] + ce, carry[1] + n), None

    (ce, n), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), batch)
    return dict(ce_sum=ce, targets=n)


@dataclasses.dataclass
class Compiled:
    """The jitted init/train/eval functions bound to a model, optimizer and mesh."""

    graphdef: Any
    abstract_state: TrainState
    state_shardings: TrainState
    init: Any
    train_step: Any
    eval_step: Any


def build(
    model_config: MambaConfig | Mamba2Config,
    optim: OptimConfig,
    total_steps: int,
    mesh,
    grad_reduce: str = "auto",
    carry_rows: int | None = None,
    stream_groups: int = 1,
) -> Compiled:
    """grad_reduce: "auto" (XLA's SPMD partitioner reduces the gradients, in float32), or
    "float32" / "bfloat16": explicit_grad_sums in that dtype (see train.sharding.GRAD_REDUCE).
    carry_rows: the state carries each of that many rows' documents across steps
    (--data.long_docs=link_across_steps; its rows axis sharded as the batch's rows), in
    stream_groups groups (--data.stream_groups)."""
    from train import sharding

    reduce_dtype = sharding.grad_reduce_dtype(grad_reduce)
    tx = make_optimizer(optim, total_steps)
    schedule = learning_rate_schedule(optim, total_steps)
    graphdef, _ = model_graphdef(model_config)
    if stream_groups > 1 and carry_rows is None:
        raise ValueError(f"stream_groups={stream_groups} needs carry_rows (link_across_steps)")
    abstract = jax.eval_shape(lambda: init_state(model_config, tx, 0, carry_rows, stream_groups))
    shardings = sharding.state_shardings(mesh, abstract)
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    # Under the SPMD partitioner the loss is traced on the whole batch, whose rows the mesh's
    # devices share: asking for mesh.size times the chunk gives each device CHUNK_TOKENS of its
    # own rows a chunk (explicit_grad_sums traces each device's rows: the default fits).
    spmd_chunk = CHUNK_TOKENS * mesh.size
    grad_sums = (
        functools.partial(
            sum_grads if carry_rows is None else sum_grads_carried,
            graphdef,
            chunk_tokens=spmd_chunk,
        )
        if reduce_dtype is None
        else explicit_grad_sums(graphdef, mesh, abstract.params, reduce_dtype)
    )
    init = jax.jit(
        functools.partial(
            init_state, model_config, tx, carry_rows=carry_rows, carry_groups=stream_groups
        ),
        static_argnums=0,
        out_shardings=shardings,
    )
    step = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            tx=tx,
            schedule=schedule,
            grad_sums=grad_sums,
            chunk_tokens=spmd_chunk,
        ),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, rep),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, chunk_tokens=spmd_chunk),
        in_shardings=(shardings.params, batch_sh),
        out_shardings=rep,
    )
    return Compiled(graphdef, abstract, shardings, init, step, evaluate)
