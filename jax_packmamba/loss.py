"""The language-model loss on packed batches: next-token cross-entropy on real targets only.

masked_cross_entropy takes logits. chunked_cross_entropy takes the final hidden state and the
head's weight instead and never holds float32 logits for every token: it runs over chunks of
the time axis, each chunk's logits made, reduced and dropped in turn (one chunk's float32
logits live at a time), and it forms the gradient in that same pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Tokens per chunk of chunked_cross_entropy. One chunk holds its (tokens, vocab) float32 logits
# and their bfloat16 gradient, 6 bytes a logit: 1.2 GB at 4096 tokens and a 50,280 vocabulary.
# Each chunk adds its share to the float32 (vocab, d) weight gradient, a read and write of that
# whole buffer (0.8 GB at d 2048), so much smaller chunks cost time.
CHUNK_TOKENS = 4096


def masked_cross_entropy(logits, targets, loss_mask):
    """(sum of cross-entropy where loss_mask, number of such targets), in float32.

    logits (..., v) in any float dtype; targets and loss_mask (...). PackedBatch's loss_mask is
    False on padding and on each sequence's last token, so no target crosses a boundary.
    Returning the sum and the count (not the mean) lets callers average over micro-batches
    and devices exactly.
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.where(loss_mask, logz - target_logit, 0.0)
    return ce.sum(), loss_mask.sum(dtype=jnp.int32)


def chunked_cross_entropy(
    hidden, weight, targets, loss_mask, *, transposed=False, chunk_tokens=CHUNK_TOKENS
):
    """masked_cross_entropy of the logits `hidden @ weight.T` (transposed: `hidden @ weight`),
    without ever holding them all: (sum of cross-entropy where loss_mask, number of targets).

    hidden (..., t, d) in the compute dtype (the final norm's output); weight (v, d), a tied
    embedding table, or with transposed=True (d, v), a Linear kernel, in any float dtype (the
    products take it in hidden's dtype; its gradient comes back in its own dtype, summed over
    the chunks in float32); targets and loss_mask (..., t). Every logit is computed over all
    v rows of the weight: a vocabulary padded to a multiple takes part in the softmax as it
    does in masked_cross_entropy of the full logits.

    The time axis is cut into chunks of about chunk_tokens tokens over all rows (the leading
    axes stay whole in every chunk, so a batch axis sharded across devices stays sharded; a
    length that is not a multiple is padded inside, masked). Each chunk's logits come from a
    product in hidden's dtype with float32 accumulation and stay float32 for the logsumexp.
    Under differentiation the same pass also forms the gradient, softmax - onehot where
    loss_mask, into d_hidden (per chunk) and d_weight (a float32 sum over chunks), and the
    backward scales them by the loss sum's cotangent: three products as for full logits, no
    recomputation. Tokens outside loss_mask contribute exactly zero to the sum and get a zero
    d_hidden; each token's loss and d_hidden depend on its own hidden row alone.
    """
    hidden, weight, targets, loss_mask = _check(
        hidden, weight, targets, loss_mask, transposed, chunk_tokens
    )
    *lead, length, d = hidden.shape
    rows = math.prod(lead)
    chunk_len = max(1, chunk_tokens // rows)
    count = -(-length // chunk_len)
    chunk_len = -(-length // count)  # as even as may be: padding under one row per chunk
    pad = count * chunk_len - length

    def chunks(x, fill):  # (..., t, *tail) -> (count, rows, chunk_len, *tail)
        x = x.reshape(rows, length, *x.shape[len(lead) + 1 :])
        if pad:
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
            x = jnp.pad(x, widths, constant_values=fill)
        x = x.reshape(rows, count, chunk_len, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    ce_sum = _ce_sum(
        chunks(hidden, 0),
        weight,
        chunks(targets, 0),
        chunks(loss_mask, False),
        transposed,
        jnp.dtype(weight.dtype),
    )
    return ce_sum, loss_mask.sum(dtype=jnp.int32)


def _check(hidden, weight, targets, loss_mask, transposed, chunk_tokens):
    if not isinstance(chunk_tokens, (int, np.integer)) or isinstance(chunk_tokens, bool):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens}")
    if not isinstance(transposed, bool):
        raise ValueError(f"transposed must be a bool, got {transposed!r}")
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    targets, loss_mask = jnp.asarray(targets), jnp.asarray(loss_mask)
    if hidden.ndim < 2 or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise ValueError(
            f"hidden must be a float array (..., t, d), got {hidden.dtype} {hidden.shape}"
        )
    layout = "(d, v)" if transposed else "(v, d)"
    d_axis = 0 if transposed else 1
    if weight.ndim != 2 or not jnp.issubdtype(weight.dtype, jnp.floating):
        raise ValueError(
            f"weight must be a float array {layout}, got {weight.dtype} {weight.shape}"
        )
    if weight.shape[d_axis] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be {layout} with d = hidden's last axis {hidden.shape[-1]}, got "
            f"shape {weight.shape}" + ("" if transposed else " (a (d, v) kernel: transposed=True)")
        )
    if targets.shape != hidden.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be integers of shape {hidden.shape[:-1]} (hidden's without d), got "
            f"{targets.dtype} {targets.shape}"
        )
    if loss_mask.shape != hidden.shape[:-1] or loss_mask.dtype != jnp.bool_:
        raise ValueError(
            f"loss_mask must be bool of shape {hidden.shape[:-1]} (hidden's without d), got "
            f"{loss_mask.dtype} {loss_mask.shape}"
        )
    return hidden, weight, targets, loss_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_sum(hidden, weight, targets, loss_mask, transposed, weight_dtype):
    return _chunk_pass(hidden, weight, targets, loss_mask, transposed, grads=False)[0]


def _ce_sum_fwd(hidden, weight, targets, loss_mask, transposed, weight_dtype):
    ce_sum, d_hidden, d_weight = _chunk_pass(
        hidden, weight, targets, loss_mask, transposed, grads=True
    )
    return ce_sum, (d_hidden, d_weight)


def _ce_sum_bwd(transposed, weight_dtype, res, ct):
    d_hidden, d_weight = res
    return (
        (ct * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype),
        (ct * d_weight).astype(weight_dtype),
        None,
        None,
    )


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def _chunk_pass(hidden, weight, targets, loss_mask, transposed, *, grads):
    """Over chunks hidden (k, r, c, d), targets and loss_mask (k, r, c): the float32 sum of
    cross-entropy where loss_mask and, with grads, the gradients of that sum: d_hidden
    (k, r, c, d) in hidden's dtype and d_weight in weight's layout, float32."""
    f32 = jnp.float32
    w = weight.astype(hidden.dtype)  # once, not per chunk
    d_axis = 0 if transposed else 1
    v_axis = 1 - d_axis

    def body(carry, xs):
        h, t, m = xs  # (r, c, d), (r, c), (r, c)
        logits = jax.lax.dot_general(
            h, w, (((2,), (d_axis,)), ((), ())), preferred_element_type=f32
        )  # (r, c, v)
        lse = jax.nn.logsumexp(logits, axis=-1)
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
        target_logit = jnp.where(hit, logits, 0.0).sum(-1)
        ce = jnp.sum(jnp.where(m, lse - target_logit, 0.0))
        if not grads:
            return carry + ce, None
        total, d_weight = carry
        g = jnp.where(m[..., None], jnp.exp(logits - lse[..., None]) - hit, 0.0).astype(h.dtype)
        d_h = jax.lax.dot_general(
            g, w, (((2,), (v_axis,)), ((), ())), preferred_element_type=f32
        ).astype(h.dtype)
        if transposed:  # (d, v) = h^T g over the chunk's tokens
            d_w = jax.lax.dot_general(
                h, g, (((0, 1), (0, 1)), ((), ())), preferred_element_type=f32
            )
        else:
            d_w = jax.lax.dot_general(
                g, h, (((0, 1), (0, 1)), ((), ())), preferred_element_type=f32
            )
        return (total + ce, d_weight + d_w), d_h

    zero = jnp.zeros((), f32)
    if not grads:
        total, _ = jax.lax.scan(body, zero, (hidden, targets, loss_mask))
        return total, None, None
    (total, d_weight), d_hidden = jax.lax.scan(
        body, (zero, jnp.zeros(weight.shape, f32)), (hidden, targets, loss_mask)
    )
    return total, d_hidden, d_weight
