"""The chunked head + cross-entropy (loss.chunked_cross_entropy, LM.cross_entropy): values and
gradients against the full logits' masked_cross_entropy and a float64 loop, chunks that do not
divide the tokens, masked tokens, packing isolation, and the training step that uses it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.config import HybridConfig
from jax_packmamba.loss import chunked_cross_entropy, masked_cross_entropy
from tests.compiled import compiled
from train import data as data_lib
from train import step as step_lib

BF16_EPS = 2.0**-8


def inputs(seed, rows, length, d, v, dtype=jnp.float32, mask_p=0.7):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (rows, length, d)).astype(dtype)
    weight = jax.random.normal(k[1], (v, d)) * d**-0.5 * 3  # logits of a few units
    targets = jax.random.randint(k[2], (rows, length), 0, v)
    mask = jax.random.bernoulli(k[3], mask_p, (rows, length))
    ct = jax.random.normal(k[4], ())
    return hidden, weight, targets, mask, ct


def unfused(hidden, weight, targets, mask):
    return masked_cross_entropy(hidden @ weight.astype(hidden.dtype).T, targets, mask)[0]


def chunked(chunk_tokens, transposed=False):
    def loss(hidden, weight, targets, mask):
        w = weight.T if transposed else weight
        ce, _ = chunked_cross_entropy(
            hidden, w, targets, mask, transposed=transposed, chunk_tokens=chunk_tokens
        )
        return ce

    return loss


def value_and_grads(loss, hidden, weight, targets, mask, ct):
    """(loss sum, d_hidden, d_weight) for the cotangent ct on the sum."""
    value, vjp = jax.vjp(lambda h, w: loss(h, w, targets, mask), hidden, weight)
    return (value, *vjp(ct.astype(value.dtype)))


def value_and_grads_jit(loss, *args):
    """value_and_grads for `loss` (a new closure each test), compiled at CPU's fast compile."""
    run = functools.partial(value_and_grads, loss)
    return compiled(("value_and_grads", loss), run, *args)(*args)


def float64_loop(hidden, weight, targets, mask, ct):
    """The loss sum and its gradients token by token in float64 (numpy)."""
    h = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])
    w = np.asarray(weight.astype(hidden.dtype), np.float64)
    t, m, ct = np.asarray(targets).ravel(), np.asarray(mask).ravel(), float(ct)
    total, d_h, d_w = 0.0, np.zeros_like(h), np.zeros_like(w)
    for i in range(h.shape[0]):
        if not m[i]:
            continue
        logits = w @ h[i]
        top = logits.max()
        lse = top + np.log(np.exp(logits - top).sum())
        total += lse - logits[t[i]]
        g = np.exp(logits - lse)
        g[t[i]] -= 1.0
        d_h[i] = ct * (g @ w)
        d_w += ct * np.outer(g, h[i])
    return total, d_h.reshape(hidden.shape), d_w


@pytest.mark.parametrize(
    "chunk_tokens, transposed", [(1, False), (7, True), (16, False), (10_000, True)]
)
def test_float32_matches_full_logits_and_float64(chunk_tokens, transposed):
    # 3 rows x 19: chunk_tokens 7 -> 2 positions a row, 10 chunks, one padded position;
    # 16 -> 5 positions, 4 chunks; 10,000 -> one chunk.
    args = inputs(0, 3, 19, 24, 37)
    got = value_and_grads_jit(chunked(chunk_tokens, transposed), *args)
    want = value_and_grads_jit(unfused, *args)
    exact = float64_loop(*args)
    for g, w, e, name in zip(got, want, exact, ("loss", "d_hidden", "d_weight")):
        scale = np.abs(e).max()
        np.testing.assert_allclose(g, w, rtol=0, atol=3e-6 * scale, err_msg=name)
        np.testing.assert_allclose(g, e, rtol=0, atol=3e-6 * scale, err_msg=name)
    assert got[1].dtype == jnp.float32 and got[2].dtype == jnp.float32


def test_bfloat16_within_dtype_tolerance_and_nearer_float64_than_bf16_logits():
    # hidden in bfloat16, the weight float32 (cast inside, its gradient float32 as the
    # parameter's). The chunked loss keeps the logits float32; the full-logits path rounds
    # them to bfloat16 first, so it is the one further from float64.
    args = inputs(1, 2, 40, 32, 50, dtype=jnp.bfloat16)
    got = value_and_grads_jit(chunked(24), *args)
    want = value_and_grads_jit(unfused, *args)
    exact = float64_loop(*args)
    assert got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
    tokens = int(args[3].sum())
    for g, w, e, name in zip(got, want, exact, ("loss", "d_hidden", "d_weight")):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = np.abs(e).max()
        # d_weight sums bfloat16-rounded softmax terms over the tokens: sqrt(tokens) roundings.
        atol = BF16_EPS * scale * (np.sqrt(tokens) if name == "d_weight" else 2)
        np.testing.assert_allclose(g, e, rtol=0, atol=atol, err_msg=name)
        np.testing.assert_allclose(g, w, rtol=0, atol=4 * atol, err_msg=name)
    assert abs(float(got[0]) - exact[0]) < abs(float(want[0]) - exact[0])


def test_masked_tokens_contribute_exactly_zero():
    hidden, weight, targets, mask, ct = inputs(2, 2, 21, 16, 30)
    f = value_and_grads_jit
    base = f(chunked(10), hidden, weight, targets, mask, ct)
    # Masked tokens: huge hidden rows and targets outside the vocabulary change nothing.
    hidden2 = jnp.where(mask[..., None], hidden, 1e4)
    targets2 = jnp.where(mask, targets, jnp.array([-1, 30, 10**6])[jnp.arange(21) % 3])
    other = f(chunked(10), hidden2, weight, targets2, mask, ct)
    for a, b in zip(base, other):
        np.testing.assert_array_equal(a, b)
    assert not np.asarray(base[1])[~np.asarray(mask)].any()
    # Nothing masked in: a zero sum and zero gradients.
    none = jnp.zeros_like(mask)
    value, d_h, d_w = f(chunked(10), hidden, weight, targets, none, ct)
    assert float(value) == 0.0 and not np.asarray(d_h).any() and not np.asarray(d_w).any()
    assert int(chunked_cross_entropy(hidden, weight, targets, none)[1]) == 0


def test_count_and_single_row_and_leading_axes():
    hidden, weight, targets, mask, ct = inputs(3, 2, 9, 8, 12)
    ce, n = chunked_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4)
    assert n.dtype == jnp.int32 and int(n) == int(mask.sum())
    np.testing.assert_allclose(ce, unfused(hidden, weight, targets, mask), rtol=1e-6)
    # (t, d): one row; (a, b, t, d): every leading axis is rows.
    ce1, _ = chunked_cross_entropy(hidden[1], weight, targets[1], mask[1], chunk_tokens=4)
    np.testing.assert_allclose(ce1, unfused(hidden[1], weight, targets[1], mask[1]), rtol=1e-6)
    ce4, _ = chunked_cross_entropy(hidden[None], weight, targets[None], mask[None], chunk_tokens=4)
    np.testing.assert_allclose(ce4, ce, rtol=1e-6)


def packed_layout():
    """Two rows of 24: row 0 holds A (10 tokens) then B (14), row 1 holds C (24)."""
    seg = np.zeros((2, 24), np.int32)
    seg[0, :10], seg[0, 10:], seg[1] = 1, 2, 3
    return seg


def test_perturbing_one_sequence_leaves_others_bit_identical():
    seg = packed_layout()
    hidden, weight, targets, mask, ct = inputs(4, 2, 24, 16, 40, mask_p=1.0)
    noise = jax.random.normal(jax.random.key(9), hidden.shape)
    perturbed = jnp.where((seg == 1)[..., None], hidden + noise, hidden)
    # chunk_tokens 14 -> 7 positions a row: chunks cut through A, B and C.
    f = value_and_grads_jit
    for other in (2, 3):
        only = jnp.asarray(seg == other)
        a = f(chunked(14), hidden, weight, targets, only, ct)[0]
        b = f(chunked(14), perturbed, weight, targets, only, ct)[0]
        np.testing.assert_array_equal(a, b)
    d_a = f(chunked(14), hidden, weight, targets, mask, ct)[1]
    d_b = f(chunked(14), perturbed, weight, targets, mask, ct)[1]
    keep = seg != 1
    np.testing.assert_array_equal(np.asarray(d_a)[keep], np.asarray(d_b)[keep])
    assert (np.asarray(d_a)[~keep] != np.asarray(d_b)[~keep]).any()


def test_packed_gives_each_sequence_its_alone_loss_and_d_hidden():
    seg = packed_layout()
    hidden, weight, targets, mask, ct = inputs(5, 2, 24, 16, 40)
    f = value_and_grads_jit
    for s, (row, cols) in {
        1: (0, slice(0, 10)),
        2: (0, slice(10, 24)),
        3: (1, slice(0, 24)),
    }.items():
        only = jnp.asarray(seg == s) & mask
        packed = f(chunked(14), hidden, weight, targets, only, ct)
        alone = f(
            chunked(14),
            hidden[row : row + 1, cols],
            weight,
            targets[row : row + 1, cols],
            mask[row : row + 1, cols],
            ct,
        )
        np.testing.assert_allclose(packed[0], alone[0], rtol=1e-6)
        np.testing.assert_allclose(packed[1][row, cols], alone[1][0], rtol=1e-6, atol=1e-7)
        assert not np.asarray(packed[1])[seg != s].any()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden=np.zeros((3, 4), np.int32)), "hidden"),
        (dict(hidden=np.zeros((4,), np.float32)), "hidden"),
        (dict(weight=np.zeros((12, 5), np.float32)), "weight"),
        (dict(weight=np.zeros((4, 12), np.float32)), "transposed=True"),
        (dict(targets=np.zeros((3, 2), np.int32)), "targets"),
        (dict(targets=np.zeros((2, 3), np.float32)), "targets"),
        (dict(loss_mask=np.ones((2, 3), np.int32)), "loss_mask"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(chunk_tokens=True), "chunk_tokens"),
        (dict(chunk_tokens=2.0), "chunk_tokens"),
        (dict(transposed=1), "transposed"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = dict(
        hidden=np.zeros((2, 3, 4), np.float32),
        weight=np.zeros((12, 4), np.float32),
        targets=np.zeros((2, 3), np.int32),
        loss_mask=np.ones((2, 3), bool),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(**args)


# ------------------------------------------------------------------------------------------------
# The model's loss and the training step.

# Mamba1 with tied embeddings: the training step's test below. The hybrid: its own path (the
# runs of layers, an untied head); its Mamba2 mixer is the Mamba2 model's.
MODELS = {
    "mamba2 untied, bf16": jp.Mamba2Config.preset(
        "tiny", n_layer=1, d_model=32, vocab_size=61, tie_embeddings=False, dtype="bfloat16"
    ),
    "hybrid": HybridConfig.preset("tiny", layers=("*-",), d_model=32, vocab_size=61, num_heads=2),
}


def batch(seed, config, rows=2, length=19):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32)
    seg = np.ones((rows, length), np.int32)
    seg[0, 7:], seg[1, 15:] = 2, 0  # two sequences in row 0, padding at the end of row 1
    targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    mask = np.zeros((rows, length), bool)
    mask[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return tuple(jnp.asarray(x) for x in (tokens, seg, targets, mask))


@pytest.mark.parametrize("name", list(MODELS))
def test_model_cross_entropy_matches_full_logits(name):
    config = MODELS[name]
    graphdef, params = nnx.split(make_model(config))
    tokens, seg, targets, mask = batch(0, config)

    def fused(p):
        return nnx.merge(graphdef, p).cross_entropy(tokens, seg, targets, mask, chunk_tokens=8)

    def full(p):
        return masked_cross_entropy(nnx.merge(graphdef, p)(tokens, seg), targets, mask)

    (ce, n), g = compiled(("fused", name), jax.value_and_grad(fused, has_aux=True), params)(params)
    (ce_ref, n_ref), g_ref = compiled(
        ("full", name), jax.value_and_grad(full, has_aux=True), params
    )(params)
    assert int(n) == int(n_ref) == int(mask.sum())
    # bfloat16: the full path rounds the logits to bfloat16, the chunked one keeps float32.
    tol = 3e-2 if config.dtype == "bfloat16" else 2e-5
    np.testing.assert_allclose(ce, ce_ref, rtol=tol / 3)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g), jax.tree.leaves(g_ref)
    ):
        scale = np.abs(b).max() + 1e-12
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=str(path[0]))


def make_model(config):
    return nnx.jit(lambda: jp.LM(config, rngs=nnx.Rngs(0)))()


def test_training_step_loss_and_grads_as_with_full_logits(monkeypatch):
    config = jp.MambaConfig.preset("tiny", n_layer=1)  # the train tests' preset, tied
    graphdef, params = nnx.split(make_model(config))
    params = nnx.to_pure_dict(params)
    parts = [batch(s, config, rows=2, length=33) for s in (1, 2)]
    micro = {k: jnp.stack([p[i] for p in parts]) for i, k in enumerate(data_lib.BATCH_KEYS)}
    # 66 tokens a micro-batch in chunks of 16: 5 chunks of 4 positions a row (33 -> 36).
    sums = functools.partial(step_lib.sum_grads, graphdef, chunk_tokens=16)
    grads, ce, count = compiled("sum_grads_chunked", sums, params, micro)(params, micro)
    assert int(count) == int(micro["loss_mask"].sum())

    def full_logits_losses(graphdef, params, tokens, segment_ids, targets, loss_mask, **_):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids)
        return masked_cross_entropy(logits, targets, loss_mask)

    # The step as it was: the same accumulation over micro-batches, the loss on full logits.
    monkeypatch.setattr(step_lib, "token_losses", full_logits_losses)
    grads_ref, ce_ref, _ = compiled("sum_grads_full", sums, params, micro)(params, micro)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * (np.abs(b).max() + 1e-12))
