"""Sampling controls against direct numpy computations of Hugging Face's definitions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.sampling import SamplingConfig, SamplingMode, is_eos, penalize, sample, warp


def logits_of(rows, vocab, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, (rows, vocab)).astype(np.float32)


def hf_repetition_penalty(logits, seen_ids, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor: gather, rescale, scatter."""
    out = logits.copy()
    for row, ids in enumerate(seen_ids):
        ids = np.asarray(sorted(set(ids)), np.int64)
        score = out[row, ids]
        out[row, ids] = np.where(score < 0, score * penalty, score / penalty)
    return out


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hf_keep(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Which tokens survive transformers' warpers (temperature, top-k, top-p, min-p), computed
    row by row in float64 as its code states them."""
    x = logits.astype(np.float64) / temperature
    keep = np.ones(x.shape, bool)
    for row in range(x.shape[0]):
        s = x[row].copy()
        if top_k is not None:
            kth = np.sort(s)[::-1][min(top_k, s.size) - 1]
            s[s < kth] = -np.inf
        if top_p is not None:
            order = np.argsort(s, kind="stable")  # ascending
            cumulative = np.cumsum(softmax(s[order]))
            remove = cumulative <= 1 - top_p
            remove[-1] = False
            s[order[remove]] = -np.inf
        if min_p is not None:
            p = softmax(s)
            s[p < min_p * p.max()] = -np.inf
        keep[row] = np.isfinite(s)
    return keep


def test_repetition_penalty_matches_hugging_face():
    logits = logits_of(3, 50)
    seen_ids = [[0, 3, 3, 7, 49], [], list(range(0, 50, 2))]
    seen = np.zeros(logits.shape, bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    for penalty in (1.2, 0.8, 1.0):
        got = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(seen), jnp.float32(penalty)))
        np.testing.assert_allclose(got, hf_repetition_penalty(logits, seen_ids, penalty), rtol=1e-6)
    # Both signs occur among the penalised logits, so both branches were checked.
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any()


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=0.9),
        dict(top_p=0.5, temperature=0.7),
        dict(top_p=0.05),
        dict(top_p=1.0),
        dict(top_k=7),
        dict(top_k=40, top_p=0.8),
        dict(min_p=0.1),
        dict(min_p=0.02, temperature=1.5),
        dict(top_p=0.9, min_p=0.05, temperature=0.7),
        dict(top_k=1),
    ],
)
@pytest.mark.parametrize("cut", ["sort", "bisect"])
def test_filters_keep_what_hugging_face_keeps(kw, cut, monkeypatch):
    monkeypatch.setattr("jax_packmamba.sampling.BISECT_ROWS", 1 if cut == "bisect" else 0)
    logits = logits_of(6, 300, seed=1)
    config = SamplingConfig(**kw)
    sort = config.mode.sort
    # A fresh jit a case: the rule is read when warp is traced.
    x = jax.jit(lambda x, p: warp(x, p, sort=sort))(jnp.asarray(logits), config.params())
    got = np.isfinite(np.asarray(x))
    want = hf_keep(logits, **kw)
    assert want.sum(-1).min() >= 1 and (want.sum(-1) < 300).any() or kw == dict(top_p=1.0)
    np.testing.assert_array_equal(got, want)
    # The kept logits are the tempered logits, untouched.
    t = kw.get("temperature", 1.0)
    np.testing.assert_allclose(np.asarray(x)[got], (logits / np.float32(t))[got], rtol=1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.02, 0.3, 0.2, 0.03]] * 4000))
    key = jax.random.key(0)

    def draws(**kw):
        config = SamplingConfig(**kw)
        return np.asarray(sample(logits, None, key, config.params(), config.mode))

    # 4000 draws: 5 sigma is ~0.04. top_p 0.75 keeps 0.4, 0.3, 0.2 (0.9 of the mass).
    freq = np.bincount(draws(top_p=0.75), minlength=6) / 4000
    np.testing.assert_allclose(freq, [0, 0.4 / 0.9, 0, 0.3 / 0.9, 0.2 / 0.9, 0], atol=0.04)
    # min_p 0.1 drops tokens under 0.04 (0.4 x 0.1): 0.02 and 0.03 go.
    freq = np.bincount(draws(min_p=0.1), minlength=6) / 4000
    np.testing.assert_allclose(freq, np.array([0.05, 0.4, 0, 0.3, 0.2, 0]) / 0.95, atol=0.04)
    freq = np.bincount(draws(), minlength=6) / 4000
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.02, 0.3, 0.2, 0.03], atol=0.04)
    assert set(draws(temperature=0)) == {1}
    # Rows draw from their own keys: identical rows do not all draw the same token.
    assert len(set(draws(top_p=0.75)[:100])) > 1


def test_greedy_is_argmax_of_the_penalised_logits():
    logits = logits_of(4, 64, seed=2)
    seen = np.zeros(logits.shape, bool)
    top = logits.argmax(-1)
    seen[np.arange(4), top] = True  # the penalty can unseat the best token
    config = SamplingConfig(temperature=0, repetition_penalty=3.0)
    got = np.asarray(
        sample(
            jnp.asarray(logits), jnp.asarray(seen), jax.random.key(0), config.params(), config.mode
        )
    )
    want = hf_repetition_penalty(logits, [[t] for t in top], 3.0).argmax(-1)
    np.testing.assert_array_equal(got, want)
    assert (got != top).any()
    plain = SamplingConfig(temperature=0)
    np.testing.assert_array_equal(
        np.asarray(
            sample(jnp.asarray(logits), None, jax.random.key(0), plain.params(), plain.mode)
        ),
        top,
    )


def test_sampling_values_are_traced_so_changing_them_does_not_retrace():
    traces = []

    @jax.jit
    def step(logits, seen, key, params):
        traces.append(1)
        return sample(logits, seen, key, params, SamplingMode(greedy=False, sort=True))

    logits = jnp.asarray(logits_of(2, 100, seed=3))
    seen = jnp.zeros((2, 100), bool)
    for kw in (
        dict(top_p=0.9, temperature=0.7, repetition_penalty=1.2),
        dict(top_k=5, top_p=0.5, temperature=1.3, min_p=0.1, eos_ids=(3, 4), seed=9),
        dict(top_p=1.0),
    ):
        config = SamplingConfig(**kw)
        step(logits, seen, jax.random.key(config.seed), config.params())
    assert len(traces) == 1


def test_eos_ids_and_bad_values():
    params = SamplingConfig(eos_ids=(5, 9)).params()
    np.testing.assert_array_equal(
        np.asarray(is_eos(jnp.asarray([5, 6, 9, -1]), params)), [True, False, True, False]
    )
    assert not np.asarray(is_eos(jnp.asarray([0, -1]), SamplingConfig().params())).any()
    for kw, match in [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(eos_ids=tuple(range(9))), "eos_ids"),
        (dict(seed=1.5), "seed"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*32\)"),
        (dict(seed=2**32), "seed must be an int in"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**kw)


def test_the_integer_key_sort_sorts_floats():
    from jax_packmamba.sampling import _sort_floats

    x = np.concatenate(
        [logits_of(3, 200, seed=5), np.array([[-np.inf, -0.0, 0.0, np.inf] * 50] * 3, np.float32)],
        axis=1,
    )
    np.testing.assert_array_equal(np.asarray(_sort_floats(jnp.asarray(x))), np.sort(x, axis=-1))


@pytest.mark.parametrize("top_k", [None, 1, 37, 4999])
@pytest.mark.parametrize("top_p", [0.9, 0.3, 1.0])
def test_the_cut_without_a_sort_is_the_sorts_cut_up_to_the_order_of_its_sums(
    top_k, top_p, monkeypatch
):
    # Flat rows (the mass above a token moves by less than float32's rounding of the sums
    # there), a peaked one, ties and the vocabulary's -inf padding: the k-th largest exact, and
    # the top-p cut where float64 puts it, within the float32 sums' rounding.
    from jax_packmamba.sampling import _top_cut

    rng = np.random.default_rng(11)
    x = rng.normal(0, 0.2, (5, 5000)).astype(np.float32)
    x[1] = np.round(x[1] * 20) / 20  # ties everywhere
    x[2, rng.integers(0, 5000, 3)] += 15.0  # peaked
    x[3, 4990:] = -np.inf  # padding
    x[4, :] = 0.5  # one value
    config = SamplingConfig(top_k=top_k, top_p=top_p)
    params = config.params()
    sorted_cut = np.asarray(jax.jit(lambda x: _top_cut(x, params, 0))(jnp.asarray(x)))[:, 0]
    monkeypatch.setattr("jax_packmamba.sampling.BISECT_ROWS", 1)  # read when traced
    cut = jax.jit(lambda x: _top_cut(x, params, 0))(jnp.asarray(x))
    cut = np.asarray(cut)[:, 0].astype(np.float64)
    for row, logits in enumerate(x.astype(np.float64)):
        values = np.sort(logits)[::-1]
        kth = values[min(top_k or 5000, 5000) - 1]
        assert cut[row] >= kth and cut[row] in logits
        if top_p == 1.0:
            assert cut[row] == kth
            continue
        p = np.where(logits >= kth, np.exp(logits - logits.max()), 0.0)
        bound = top_p * p.sum()
        above = lambda t: p[logits > t].sum()  # noqa: E731
        rounding = 1e-4 * p.sum()
        # The cut stays (mass above it below the bound), the next value down would not.
        assert cut[row] == kth or above(cut[row]) < bound + rounding
        lower = logits[logits < cut[row]]
        if cut[row] > kth and lower.size:
            assert above(lower.max()) >= bound - rounding
        # Where the bound is far from every partial mass, both cuts are the same token.
        partial = np.array([above(t) for t in np.unique(logits[logits >= kth])])
        if np.min(np.abs(partial - bound)) > rounding:
            assert cut[row] == sorted_cut[row]


def test_the_cut_without_a_sort_has_no_sort_from_its_rows(monkeypatch):
    monkeypatch.setattr("jax_packmamba.sampling.BISECT_ROWS", 4)
    config = SamplingConfig(top_p=0.9)

    def sorts(rows):
        jaxpr = jax.make_jaxpr(lambda x: warp(x, config.params(), sort=True))(jnp.zeros((rows, 64)))
        return len(re.findall(r"\bsort\[", str(jaxpr)))

    assert sorts(4) == 0 and sorts(3) == 1  # from BISECT_ROWS rows


def test_the_search_kernel_finds_what_the_xla_search_finds(monkeypatch):
    # pallas_kernels.sampling's one-launch search against _smallest_key_under (through the
    # interpreter on a CPU, compiled on a GPU): a vocabulary of 300 in tiles of 128 (a ragged
    # last tile), ties, -inf padding, one value. Counts (top-k's k-th largest) are exact, so
    # the key is the same; masses are summed in another order, so the top-p cut is checked
    # against float64's masses within their rounding.
    from jax_packmamba import sampling
    from pallas_kernels.sampling import smallest_key_under

    rng = np.random.default_rng(13)
    x = rng.normal(0, 1.0, (5, 300)).astype(np.float32)
    x[1] = np.round(x[1] * 5) / 5  # ties
    x[3, 290:] = -np.inf
    x[4] = 0.5
    interpret = jax.default_backend() != "gpu"

    @jax.jit
    def both(x, k, top_p):
        keys = sampling._float_keys(x)
        lo = jnp.min(keys, axis=-1, keepdims=True)
        hi = jnp.max(keys, axis=-1, keepdims=True)
        search = lambda w, bound: smallest_key_under(  # noqa: E731
            keys, w, bound, lo, hi, block_v=128, interpret=interpret
        )
        kth = search(None, k)
        ones = jnp.ones(keys.shape, jnp.float32)
        want_kth = sampling._smallest_key_under(keys, ones, k, lo, hi)
        p = jnp.where(
            x >= sampling._key_floats(kth), jnp.exp(x - jnp.max(x, -1, keepdims=True)), 0.0
        )
        return kth, want_kth, search(p, top_p * jnp.sum(p, axis=-1, keepdims=True))

    for k, top_p in ((1, 0.9), (37, 0.3), (300, 0.9), (150, 0.999)):
        kth, want_kth, cut = both(jnp.asarray(x), jnp.full((5, 1), k, jnp.float32), top_p)
        np.testing.assert_array_equal(np.asarray(kth), np.asarray(want_kth))
        kth = np.asarray(sampling._key_floats(kth))[:, 0].astype(np.float64)
        cut = np.asarray(sampling._key_floats(cut))[:, 0].astype(np.float64)
        for row, logits in enumerate(x.astype(np.float64)):
            assert kth[row] == np.sort(logits)[::-1][k - 1]
            p = np.where(logits >= kth[row], np.exp(logits - logits.max()), 0.0)
            bound, rounding = top_p * p.sum(), 1e-5 * p.sum()
            assert cut[row] in logits and p[logits > cut[row]].sum() < bound + rounding
            lower = logits[logits < cut[row]]
            if lower.size and lower.max() >= kth[row]:
                assert p[logits > lower.max()].sum() >= bound - rounding
    monkeypatch.setattr(sampling, "BISECT_IMPL", "pallas")  # read when traced
    monkeypatch.setattr(sampling, "BISECT_ROWS", 1)
    params = SamplingConfig(top_k=37, top_p=1.0).params()
    cut = jax.jit(lambda x: sampling._top_cut(x, params, 0))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(cut)[:, 0], np.sort(x, axis=-1)[:, -37])


def test_the_search_kernel_lowers_for_cuda():
    from pallas_kernels.sampling import smallest_key_under
    from tests.gpu import lower_for_cuda

    rows, vocab = 32, 50280
    spec = jax.ShapeDtypeStruct
    for weights in (None, spec((rows, vocab), jnp.float32)):
        text = lower_for_cuda(
            lambda keys, w, bound, lo, hi: smallest_key_under(
                keys, w, bound, lo, hi, interpret=False
            ),
            spec((rows, vocab), jnp.int32),
            weights,
            spec((rows, 1), jnp.float32),
            spec((rows, 1), jnp.int32),
            spec((rows, 1), jnp.int32),
        )
        assert "sampling_key_search" in text
    keys, bounds = jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 1), jnp.int32)
    for args, name in (
        ((keys.astype(jnp.float32), None, 1.0, bounds, bounds), "keys"),
        ((keys, jnp.zeros((2, 9)), 1.0, bounds, bounds), "weights"),
        ((keys, None, 1.0, bounds[:1], bounds), "lo"),
    ):
        with pytest.raises(ValueError, match=name):
            smallest_key_under(*args, interpret=True)


def prefilter_logits():
    """Rows whose top-p 0.9 nucleus fits in 8 tokens (one dominant group) and rows whose
    nucleus is most of the 300 (flat), both in one batch."""
    rng = np.random.default_rng(7)
    peaked = rng.normal(0, 1, (3, 300)).astype(np.float32)
    peaked[np.arange(3), rng.integers(0, 300, 3)] += 12.0  # ~all the mass on one token
    peaked[0, :5] += 9.0  # row 0: a nucleus of a few tokens
    flat = rng.normal(0, 0.3, (3, 300)).astype(np.float32)
    return np.concatenate([peaked, flat])


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p=0.999, temperature=0.7),
        dict(top_k=40, top_p=0.9),  # k beyond the prefilter: the k-th from the sort
        dict(top_k=6),
        dict(top_p=1.0, min_p=0.05),
    ],
)
def test_prefilter_keeps_what_the_sort_and_hugging_face_keep(kw):
    logits = prefilter_logits()
    want = hf_keep(logits, **kw)
    nucleus = hf_keep(logits, top_p=kw.get("top_p", 1.0), temperature=kw.get("temperature", 1.0))
    if kw.get("top_p", 1.0) < 1:
        # Both cases occur: nuclei inside the prefilter's 8 and far larger.
        assert nucleus.sum(-1).min() <= 8 and nucleus.sum(-1).max() > 100
    config = SamplingConfig(**kw)
    params = config.params()
    outs = {
        k: np.asarray(
            jax.jit(warp, static_argnames=("sort", "prefilter"))(
                jnp.asarray(logits), params, sort=True, prefilter=k
            )
        )
        for k in (0, 8)
    }
    for k, x in outs.items():
        np.testing.assert_array_equal(np.isfinite(x), want, err_msg=f"prefilter {k}")
    np.testing.assert_array_equal(outs[8], outs[0])


def test_prefilter_equals_its_fallback_bit_for_bit_and_draws_the_same_tokens():
    from jax_packmamba.sampling import _top_cut

    logits = jnp.asarray(prefilter_logits())
    # Jitted once, outside the loop: the settings are traced arguments (a lambda jitted anew
    # each iteration compiled again).
    top_cut = jax.jit(_top_cut, static_argnums=2, static_argnames="force_sort")
    for kw in (dict(top_p=0.9), dict(top_p=0.6, temperature=0.5), dict(top_k=3, top_p=0.95)):
        params = SamplingConfig(**kw).params()
        x = logits / params.temperature
        cut = top_cut(x, params, 8)
        sorted_cut = top_cut(x, params, 8, force_sort=True)
        np.testing.assert_array_equal(np.asarray(cut), np.asarray(sorted_cut))
    # The same tokens as the sort alone, key for key: rows of one batch taking the
    # prefilter's cut and the sort's, and a batch whose nuclei all fit (no sort at all).
    # Jitted (as the decode loop runs it): eagerly every op compiles on its own.
    sample_jit = jax.jit(sample, static_argnums=4)
    for batch in (logits, logits[:3]):
        for seed in range(3):
            key = jax.random.key(seed)
            tokens = {
                k: np.asarray(
                    sample_jit(
                        batch,
                        None,
                        key,
                        SamplingConfig(top_p=0.9, prefilter=k).params(),
                        SamplingConfig(top_p=0.9, prefilter=k).mode,
                    )
                )
                for k in (0, 8, 16)
            }
            np.testing.assert_array_equal(tokens[8], tokens[0])
            np.testing.assert_array_equal(tokens[16], tokens[0])


def test_prefilter_is_static_and_checked():
    assert SamplingConfig(top_p=0.9, prefilter=16).mode == SamplingMode(False, True, 16)
    assert SamplingConfig(top_p=0.9).mode.prefilter == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prefilter must be an int >= 0"):
            SamplingConfig(prefilter=bad)
