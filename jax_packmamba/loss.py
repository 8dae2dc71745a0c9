"""The language-model loss on packed batches: next-token cross-entropy on real targets only."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
