"""The chunked Mamba-3 (SISO) reference against a per-step float64 loop of its recurrence: outputs,
per-slot initial and final states, gradients; packed equals alone, bit-exact isolation, the
recurrent step, and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops.mamba3 import Mamba3State, mamba3_scan, mamba3_state_update
from tests.compiled import compiled
from tests.loops import mamba3_loop, rel_err


# Compiled once per static flags and shapes, with XLA's backend optimisations off on CPU
# (tests/compiled.py: these run for milliseconds, their compiles take seconds).
def _loop(**arrays):
    return compiled(("mamba3_loop",), lambda a: mamba3_loop(**a), arrays)(arrays)


def _scan(*, chunk_size, return_final_states=False, num_segments=None, **arrays):
    flags = dict(
        chunk_size=chunk_size, return_final_states=return_final_states, num_segments=num_segments
    )
    key = ("mamba3_scan", *flags.values())
    return compiled(key, lambda a: mamba3_scan(**a, **flags), arrays)(arrays)


NAMES = ("x", "dt", "A", "trap", "B", "C", "angles", "D", "z", "B_bias", "C_bias")
CHUNK = 8
# Runs of 1, 7, 8 (its start and end on chunk edges), 1, 4 tokens: lengths of 1, not chunk
# multiples, boundaries on chunk edges; 21 tokens, not a chunk multiple either.
SEGMENTS = np.array([1] + [2] * 7 + [3] * 8 + [4] + [5] * 4, np.int32)


def inputs(seed, batch=2, length=21, heads=4, headdim=4, groups=2, d_state=8, n_angles=2):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    per_token = (batch, length, heads)
    return dict(
        x=normal(batch, length, heads, headdim),
        dt=jax.nn.softplus(normal(*per_token, scale=0.5) - 1.0),
        A=-jax.nn.softplus(normal(*per_token)),
        trap=normal(*per_token),
        B=normal(batch, length, groups, d_state),
        C=normal(batch, length, groups, d_state),
        angles=normal(batch, length, heads, n_angles),
        D=normal(heads),
        z=normal(batch, length, heads, headdim),
        B_bias=normal(heads, d_state, scale=0.5),
        C_bias=normal(heads, d_state, scale=0.5),
    )


def initial_states(seed, batch, slots, heads=4, headdim=4, d_state=8, n_angles=2):
    rng = np.random.default_rng(seed)
    shapes = dict(
        ssm=(batch, slots, heads, headdim, d_state),
        k=(batch, slots, heads, d_state),
        x=(batch, slots, heads, headdim),
        angle=(batch, slots, heads, n_angles),
    )
    return Mamba3State(
        **{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    )


def segment_rows(batch):
    """Row 0: SEGMENTS; row 1: its reverse order of runs (ids 1.. again)."""
    row1 = np.concatenate([np.full(n, i + 1) for i, n in enumerate([4, 1, 8, 7, 1])])
    return jnp.asarray(np.stack([SEGMENTS, row1])[:batch], jnp.int32)


def run_loop(args, segment_ids, init):
    """The float64 loop's outputs (no final states)."""
    with jax.enable_x64(True):
        a64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        i64 = None if init is None else Mamba3State(*(jnp.asarray(v, jnp.float64) for v in init))
        return np.asarray(_loop(**a64, segment_ids=segment_ids, initial_states=i64)[0])


def test_mamba3_matches_float64_loop_packed_and_alone():
    """No initial states: packed rows against the loop, and each run alone against its slice
    of the packed row."""
    args = inputs(0)
    seg = segment_rows(2)
    y = _scan(**args, segment_ids=seg, chunk_size=CHUNK)
    assert rel_err(y, run_loop(args, seg, None)) < 1e-5
    ids = np.asarray(seg[0])
    for s in (1, 2, 3):  # runs of 1, 7 and 8 tokens (the last one from chunk edge to edge)
        where = np.nonzero(ids == s)[0]
        alone = {
            k: (v[:1, where[0] : where[-1] + 1] if v.ndim >= 3 else v) for k, v in args.items()
        }
        np.testing.assert_allclose(
            y[:1, where[0] : where[-1] + 1],
            _scan(**alone, chunk_size=CHUNK),
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"id {s}",
        )


def test_mamba3_isolation_bit_exact():
    """Perturbing one run's inputs (and its slot's initial state) leaves every other run's
    outputs, final states and gradients bit-identical."""
    args = inputs(3, batch=1)
    seg = segment_rows(1)
    slots = 6
    init = initial_states(4, 1, slots)
    target = 3
    in_run = (np.asarray(seg) == target)[..., None]
    rng = np.random.default_rng(5)
    cot = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)

    def f(a, init):
        y, final = mamba3_scan(
            **a,
            segment_ids=seg,
            chunk_size=CHUNK,
            initial_states=init,
            return_final_states=True,
            num_segments=slots,
        )
        return jnp.sum(y * cot) + sum(jnp.sum(v) for v in final), (y, final)

    def grad(args, init):
        fn = jax.grad(f, argnums=(0, 1), has_aux=True)
        return compiled(("mamba3_isolation",), fn, args, init)(args, init)

    (g_a, g_i), (y, final) = grad(args, init)
    bumped = dict(args)
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        v = args[k]
        mask = in_run.reshape(in_run.shape[:2] + (1,) * (v.ndim - 2))
        bumped[k] = jnp.where(mask, v + 0.5, v)
    init_b = Mamba3State(*(a.at[:, target].add(0.5) for a in init))
    (g_a2, g_i2), (y2, final2) = grad(bumped, init_b)
    keep = ~in_run[0, :, 0]
    assert not np.array_equal(y[0, ~keep], y2[0, ~keep])  # the perturbation did reach its run
    np.testing.assert_array_equal(y[0, keep], y2[0, keep])
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        np.testing.assert_array_equal(g_a[k][0, keep], g_a2[k][0, keep], err_msg=k)
    others = np.arange(slots) != target
    for a, b in zip((*final, *g_i), (*final2, *g_i2)):
        np.testing.assert_array_equal(a[:, others], b[:, others])


def test_mamba3_outputs_final_states_and_gradients_match_float64_loop():
    """With per-slot initial states (ids 0 and 5 absent from a row: zero final states), the
    outputs, final states and the gradients of everything (random cotangents) against the
    float64 loop and jax.grad of it."""
    args = inputs(6)
    seg = segment_rows(2)
    slots = 6
    init = initial_states(7, 2, slots)
    rng = np.random.default_rng(8)
    cot_y = rng.standard_normal(args["x"].shape)
    cot_f = [rng.standard_normal(a.shape) for a in init]
    ids = np.asarray(seg)
    last = np.array(
        [
            [np.nonzero(ids[b] == s)[0][-1] if (ids[b] == s).any() else -1 for s in range(slots)]
            for b in range(2)
        ]
    )
    present = last >= 0
    rows = np.arange(2)[:, None]
    where = np.maximum(last, 0)

    def ours(a, init):
        y, final = mamba3_scan(
            **a,
            segment_ids=seg,
            chunk_size=CHUNK,
            initial_states=init,
            return_final_states=True,
            num_segments=slots,
        )
        # theta mod 2 pi has slope 1: the cotangent reaches theta unchanged.
        loss = jnp.sum(y * cot_y) + sum(jnp.sum(v * c) for v, c in zip(final, cot_f))
        return loss, (y, final)

    def loop(a, init):
        y, states = mamba3_loop(**a, segment_ids=seg, initial_states=init)
        loss = jnp.sum(y * cot_y)
        finals = []
        for state, c in zip(states, cot_f):
            picked = state[rows, where]  # (b, s, ...) at each slot's last token
            mask = present.reshape(*present.shape, *[1] * (picked.ndim - 2))
            finals.append(jnp.where(mask, picked, 0.0))
            loss = loss + jnp.sum(finals[-1] * c)
        return loss, (y, finals)

    grad = jax.grad(ours, argnums=(0, 1), has_aux=True)
    g_ours, (y, final) = compiled(("mamba3_grads",), grad, args, init)(args, init)
    with jax.enable_x64(True):
        a64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        i64 = Mamba3State(*(jnp.asarray(v, jnp.float64) for v in init))
        grad = jax.grad(loop, argnums=(0, 1), has_aux=True)
        g_ref, (y_ref, final_ref) = compiled(("mamba3_loop_grads",), grad, a64, i64)(a64, i64)
        g_ref, y_ref, final_ref = jax.tree.map(np.asarray, (g_ref, y_ref, final_ref))
    assert rel_err(y, y_ref) < 1e-5
    final_ref[3] = np.mod(final_ref[3], 2 * np.pi)
    for name, got, want in zip(Mamba3State._fields, final, final_ref):
        assert rel_err(got, want) < 1e-5, name
    for k in NAMES:
        assert rel_err(g_ours[0][k], g_ref[0][k]) < 1e-4, k
    for name, got, want in zip(Mamba3State._fields, g_ours[1], g_ref[1]):
        assert rel_err(got, want) < 1e-4, name


def test_mamba3_step_continues_the_scan():
    """Prefill's final state, then steps, equals the full scan; states carried one token at a
    time through mamba3_state_update."""
    args = inputs(9, batch=2, length=12)
    split = 7
    head = {k: (v[:, :split] if v.ndim >= 3 else v) for k, v in args.items()}
    y_full = _scan(**args, chunk_size=CHUNK)
    _, state = _scan(**head, chunk_size=CHUNK, return_final_states=True)
    state = Mamba3State(*(a[:, 0] for a in state))

    def step(state, **tok):
        fn = lambda s, t: mamba3_state_update(s, **t)  # noqa: E731
        return compiled(("mamba3_step",), fn, state, tok)(state, tok)

    for t in range(split, 12):
        tok = {k: (v[:, t] if v.ndim >= 3 else v) for k, v in args.items()}
        state, y_t = step(state, **tok)
        np.testing.assert_allclose(y_t, y_full[:, t], rtol=1e-5, atol=1e-5)
    # And a prefill continued by a second scan from the first one's final state.
    tail = {k: (v[:, split:] if v.ndim >= 3 else v) for k, v in args.items()}
    _, state = _scan(**head, chunk_size=CHUNK, return_final_states=True)
    y_tail = _scan(**tail, chunk_size=CHUNK, initial_states=state)
    np.testing.assert_allclose(y_tail, y_full[:, split:], rtol=1e-5, atol=1e-5)


def test_mamba3_argument_checks():
    args = inputs(10, batch=1, length=5)
    with pytest.raises(ValueError, match="trap must have shape"):
        mamba3_scan(**{**args, "trap": args["trap"][..., :2]})
    with pytest.raises(ValueError, match="angles' last axis"):
        mamba3_scan(**{**args, "angles": jnp.zeros((1, 5, 4, 5))})
    with pytest.raises(ValueError, match="num_segments"):
        mamba3_scan(**args, segment_ids=jnp.ones((1, 5), jnp.int32), return_final_states=True)
    with pytest.raises(ValueError, match="num_segments=2"):
        mamba3_scan(
            **args,
            segment_ids=jnp.ones((1, 5), jnp.int32),
            return_final_states=True,
            num_segments=1,
        )
    with pytest.raises(ValueError, match="initial_states.k"):
        init = initial_states(0, 1, 2)
        mamba3_scan(**args, initial_states=init._replace(k=init.k[..., :3]))
