"""The pure-JAX reference ops against per-timestep float64 loops, and their packing isolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_packmamba as jp
import jax_packmamba.ops as jp_ops
from tests.compiled import compiled, compiled_vjp
from tests.loops import causal_conv1d_loop, rel_err, selective_scan_loop


def scan_inputs(
    key,
    batch,
    length,
    d_inner,
    d_state,
    *,
    with_D=True,
    with_z=True,
    with_bias=True,
    dtype=jnp.float32,
):
    k = jax.random.split(key, 8)
    args = dict(
        u=jax.random.normal(k[0], (batch, length, d_inner), dtype),
        delta=0.5 * jax.random.normal(k[1], (batch, length, d_inner), dtype),
        A=-jnp.exp(jax.random.normal(k[2], (d_inner, d_state))),
        B=jax.random.normal(k[3], (batch, length, d_state), dtype),
        C=jax.random.normal(k[4], (batch, length, d_state), dtype),
        D=jax.random.normal(k[5], (d_inner,)) if with_D else None,
        z=jax.random.normal(k[6], (batch, length, d_inner), dtype) if with_z else None,
        delta_bias=0.3 * jax.random.normal(k[7], (d_inner,)) if with_bias else None,
    )
    return args


def random_segment_ids(rng, batch, length, max_segments):
    """Rows of consecutive runs 1, 2, ... with random lengths (some of length 1)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(
            rng.choice(np.arange(1, length), size=min(max_segments - 1, length - 1), replace=False)
        )
        rows.append(np.searchsorted(cuts, np.arange(length), side="right") + 1)
    return jnp.asarray(np.stack(rows), jnp.int32)


def to64(tree):
    return jax.tree.map(lambda x: None if x is None else np.asarray(x, np.float64), tree)


def loop_outputs(key, args, seg=None, **kw):
    """The float64 loop's (y, states) on args, compiled once per key (which must name args'
    layout and kw) and shapes; seg (segment ids or None) is an argument."""
    with jax.enable_x64(True):
        a = {k: v for k, v in to64(args).items() if v is not None}

        def loop(a, seg):
            return selective_scan_loop(**a, segment_ids=seg, **kw)

        return jax.tree.map(np.asarray, compiled(("loop", key), loop, a, seg)(a, seg))


def loop_y(key, args, seg=None, **kw):
    return loop_outputs(key, args, seg, **kw)[0]


@pytest.mark.parametrize(
    "batch,length,d_inner,d_state,with_D,with_z,with_bias,softplus,segmented,method",
    [
        (1, 1, 3, 2, True, True, True, True, True, "sequential"),
        (2, 17, 5, 4, False, False, False, False, False, "associative"),
        (2, 17, 5, 4, True, False, True, True, True, "sequential"),
        (
            1,
            130,
            4,
            3,
            False,
            True,
            False,
            True,
            True,
            "associative",
        ),  # two chunk edges, odd length
        (1, 130, 4, 3, True, True, True, True, True, "sequential"),
        (3, 64, 2, 5, True, True, True, False, True, "associative"),  # exactly one chunk
    ],
)
def test_scan_matches_float64_loop(
    batch, length, d_inner, d_state, with_D, with_z, with_bias, softplus, segmented, method
):
    key = jax.random.key(length * 7 + d_inner)
    args = scan_inputs(
        key, batch, length, d_inner, d_state, with_D=with_D, with_z=with_z, with_bias=with_bias
    )
    seg = random_segment_ids(np.random.default_rng(length), batch, length, 6) if segmented else None
    # Outputs and gradients (a random cotangent) of the reference and of the float64 loop, each
    # one compiled program (eager autodiff compiles every primitive of both passes on its own).
    names = [k for k, v in args.items() if v is not None]
    cot = jax.random.normal(jax.random.key(1), args["u"].shape)
    key = (batch, length, d_inner, d_state, with_D, with_z, with_bias, softplus, segmented)

    def scan(*xs):
        a = {**args, **dict(zip(names, xs))}
        return jp.selective_scan_reference(
            **a, delta_softplus=softplus, segment_ids=seg, method=method
        )

    y, got = compiled_vjp(("reference", method, key), scan, [args[k] for k in names], cot)
    with jax.enable_x64(True):

        def loop(*xs):
            a = {**to64(args), **dict(zip(names, xs))}
            return selective_scan_loop(**a, delta_softplus=softplus, segment_ids=seg)[0]

        primals = [jnp.asarray(args[k], jnp.float64) for k in names]
        ref, want = compiled_vjp(("loop", key), loop, primals, jnp.asarray(cot, jnp.float64))
        ref, want = np.asarray(ref), [np.asarray(w) for w in want]
    err = rel_err(y, ref)
    print(f"scan rel err {err:.2e}")
    assert err < 2e-6 * np.sqrt(length)

    # Gradients against autodiff of the float64 loop.
    for name, g, w in zip(names, got, want):
        err = rel_err(g, w)
        print(f"d{name} rel err {err:.2e}")
        # Gradients sum over time (and batch for A, D, delta_bias): looser, scaled by length.
        assert err < 1e-5 * np.sqrt(length * batch), name


def test_scan_bf16_inputs_accumulate_in_f32():
    args = scan_inputs(jax.random.key(3), 2, 200, 8, 4, dtype=jnp.bfloat16)
    y = compiled(
        ("bf16",), lambda a: jp.selective_scan(**a, delta_softplus=True, impl="reference"), args
    )(args)
    assert y.dtype == jnp.bfloat16
    ref = loop_y("bf16", args, delta_softplus=True)
    assert rel_err(y, ref) < 1e-2


def test_final_states_are_each_segments_last_state():
    batch, length, d_inner, d_state = 2, 90, 3, 4
    args = scan_inputs(jax.random.key(5), batch, length, d_inner, d_state)
    seg = random_segment_ids(np.random.default_rng(0), batch, length, 5)
    seg = seg.at[1, 60:].set(0)  # trailing padding run uses slot 0

    def scan(a, seg, **kw):
        return jp.selective_scan(**a, segment_ids=seg, return_final_states=True, **kw)

    def scan_softplus(a, seg):
        return scan(a, seg, delta_softplus=True, num_segments=7, impl="reference")

    _, final = compiled(("final", True), scan_softplus, args, seg)(args, seg)
    _, states = loop_outputs("final", args, seg, delta_softplus=True)
    seg = np.asarray(seg)
    for b in range(batch):
        for s in range(7):
            where = np.nonzero(seg[b] == s)[0]
            want = states[b, where[-1]] if where.size else np.zeros((d_inner, d_state))
            np.testing.assert_allclose(final[b, s], want, rtol=1e-5, atol=1e-5)
    # Without segments: slot 0 is the whole row's last state.
    _, final = compiled(("final", False), lambda a: scan(a, None, impl="reference"), args)(args)
    _, states = loop_outputs("final_unsegmented", args)
    np.testing.assert_allclose(final[:, 0], states[:, -1], rtol=1e-5, atol=1e-5)


CONVS = {"custom_vjp": jp_ops.causal_conv1d, "reference": jp_ops.causal_conv1d_reference}


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize(
    "length,width,segmented,bias,activation",
    [
        (1, 4, True, True, "silu"),
        (23, 4, True, False, None),
        (23, 3, False, True, "silu"),
        (9, 4, True, True, None),
    ],
)
def test_conv_matches_float64_loop(length, width, segmented, bias, activation, conv):
    conv = CONVS[conv]
    k = jax.random.split(jax.random.key(length + width), 3)
    x = jax.random.normal(k[0], (2, length, 6))
    w = jax.random.normal(k[1], (6, width))
    b = jax.random.normal(k[2], (6,)) if bias else None
    seg = random_segment_ids(np.random.default_rng(1), 2, length, 5) if segmented else None
    cot = jax.random.normal(jax.random.key(length + 1), x.shape)
    # Each side's outputs and gradients in one compiled program (eagerly, every op of the
    # loop and its gradient compiles on its own).
    key = (length, width, segmented, bias, activation)
    out, got = compiled_vjp(
        ("conv", conv.__name__, key),
        lambda x_, w_, b_: conv(x_, w_, b_, segment_ids=seg, activation=activation),
        (x, w, b),
        cot,
    )
    with jax.enable_x64(True):
        ref, want = compiled_vjp(
            ("conv_loop", key),
            lambda x_, w_, b_: causal_conv1d_loop(
                x_, w_, b_, segment_ids=seg, activation=activation
            ),
            (*to64((x, w)), None if b is None else np.asarray(b, np.float64)),
            np.asarray(cot, np.float64),
        )
    assert rel_err(out, ref) < 1e-6
    for g, want_g in zip(got, want):
        if want_g is None:
            assert g is None
        else:
            assert rel_err(g, want_g) < 1e-5


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_bf16_custom_vjp_matches_reference(activation):
    """In bfloat16 the hand-written backward and autodiff of the reference agree to bf16
    rounding (both accumulate in float32)."""
    k = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k[0], (2, 300, 64), jnp.bfloat16)
    w = jax.random.normal(k[1], (64, 4), jnp.bfloat16)
    b = jax.random.normal(k[2], (64,), jnp.bfloat16)
    seg = random_segment_ids(np.random.default_rng(2), 2, 300, 9)
    cot = jax.random.normal(k[3], x.shape, jnp.bfloat16)
    outs = []
    for conv in CONVS.values():
        y, grads = compiled_vjp(
            ("conv_bf16", conv.__name__, activation),
            lambda x_, w_, b_: conv(x_, w_, b_, segment_ids=seg, activation=activation),
            (x, w, b),
            cot,
        )
        outs.append((y, *grads))
    for got, want in zip(*outs):
        assert got.dtype == want.dtype == jnp.bfloat16
        assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) < 1e-2


def test_positions_and_segment_ids_round_trip():
    seg = jnp.array([[1, 1, 1, 2, 3, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 1, 2, 1, 2, 1, 2]])
    pos = jp.positions_from_segment_ids(seg)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 0, 1, 0, 1], list(range(8)), [0] * 8])
    np.testing.assert_array_equal(
        jp.segment_ids_from_positions(pos), [[1, 1, 1, 2, 3, 3, 4, 4], [1] * 8, list(range(1, 9))]
    )
    np.testing.assert_array_equal(jp.segment_starts(seg)[0], [1, 0, 0, 1, 1, 0, 1, 0])


# Packing isolation: each sequence of a packed row computes exactly what it computes alone.

LENGTHS = [1, 5, 64, 1, 37, 20]  # a 64 ends exactly on a chunk edge; lengths of 1


def packed_layout(lengths):
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return jnp.asarray(seg[None], jnp.int32), starts


@pytest.mark.parametrize("op", ["scan_sequential", "scan_associative", "conv"])
def test_packed_equals_alone_and_perturbation_is_isolated(op):
    total = sum(LENGTHS)
    seg, starts = packed_layout(LENGTHS)
    if op.startswith("scan"):
        full = scan_inputs(jax.random.key(11), 1, total, 4, 3)
        per_token = ["u", "delta", "B", "C", "z"]

        def run(a, s):
            return jp.selective_scan_reference(
                **a, delta_softplus=True, segment_ids=s, method=op.removeprefix("scan_")
            )
    else:
        k = jax.random.split(jax.random.key(12), 3)
        full = dict(
            x=jax.random.normal(k[0], (1, total, 4)),
            weight=jax.random.normal(k[1], (4, 4)),
            bias=jax.random.normal(k[2], (4,)),
        )
        per_token = ["x"]

        def run(a, s):
            return jp.causal_conv1d(
                a["x"], a["weight"], a["bias"], segment_ids=s, activation="silu"
            )

    cot = jax.random.normal(jax.random.key(13), (1, total, 4))

    def out_and_grads(a, s, c):
        def f(a, s, c):
            y, vjp = jax.vjp(lambda a_: run(a_, s), a)
            return y, vjp(c)[0]

        # One compiled program per shape (eagerly, every primitive of both passes compiles).
        return compiled(("packed", op, s is None), f, a, s, c)(a, s, c)

    y, g = out_and_grads(full, seg, cot)
    for _i, (start, n) in enumerate(zip(starts, LENGTHS)):
        sl = slice(start, start + n)
        alone = {k: (v[:, sl] if k in per_token else v) for k, v in full.items()}
        y1, g1 = out_and_grads(alone, None, cot[:, sl])
        np.testing.assert_allclose(y[:, sl], y1, rtol=2e-6, atol=2e-6)
        for k in per_token:
            np.testing.assert_allclose(g[k][:, sl], g1[k], rtol=2e-5, atol=2e-5)

    # Perturb sequence 2 (length 64, ends on a chunk edge); zero its cotangent so that shared
    # parameters' gradients come from the other sequences only: everything else bit-identical.
    victim = slice(starts[2], starts[2] + LENGTHS[2])
    noisy = {
        k: (
            v.at[:, victim].add(jax.random.normal(jax.random.key(14), v[:, victim].shape))
            if k in per_token
            else v
        )
        for k, v in full.items()
    }
    masked_cot = cot.at[:, victim].set(0.0)
    y0, g0 = out_and_grads(full, seg, masked_cot)
    y2, g2 = out_and_grads(noisy, seg, masked_cot)
    assert not np.array_equal(y0[:, victim], y2[:, victim])
    keep = np.ones(total, bool)
    keep[victim] = False
    np.testing.assert_array_equal(y0[:, keep], y2[:, keep])
    for k in full:
        if k in per_token:
            np.testing.assert_array_equal(g0[k][:, keep], g2[k][:, keep])
        else:
            np.testing.assert_array_equal(g0[k], g2[k])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a: jp.selective_scan(a["u"][0], a["delta"], a["A"], a["B"], a["C"]), "u must be"),
        (
            lambda a: jp.selective_scan(a["u"], a["delta"][:, :3], a["A"], a["B"], a["C"]),
            "delta must have shape",
        ),
        (lambda a: jp.selective_scan(a["u"], a["delta"], a["A"][:2], a["B"], a["C"]), "A must be"),
        (
            lambda a: jp.selective_scan(a["u"], a["delta"], a["A"], a["B"][..., :1], a["C"]),
            "B must have shape",
        ),
        (
            lambda a: jp.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["A"]),
            "D must have shape",
        ),
        (
            lambda a: jp.selective_scan(
                a["u"].astype(jnp.int32), a["delta"], a["A"], a["B"], a["C"]
            ),
            "u must be a real floating",
        ),
        (
            lambda a: jp.selective_scan(
                a["u"], a["delta"], a["A"], a["B"], a["C"], segment_ids=jnp.zeros((2, 5), jnp.int32)
            ),
            "segment_ids must have shape",
        ),
        (
            lambda a: jp.selective_scan(
                a["u"],
                a["delta"],
                a["A"],
                a["B"],
                a["C"],
                segment_ids=jnp.zeros((2, 9), jnp.float32),
            ),
            "segment_ids must be an integer",
        ),
        (
            lambda a: jp.selective_scan(
                a["u"][:, :0], a["delta"][:, :0], a["A"], a["B"][:, :0], a["C"][:, :0]
            ),
            "length must be at least 1",
        ),
        (
            lambda a: jp.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], impl="cuda"),
            "impl must be one of",
        ),
        (
            lambda a: jp.selective_scan(
                a["u"],
                a["delta"],
                a["A"],
                a["B"],
                a["C"],
                return_final_states=True,
                segment_ids=jnp.zeros((2, 9), jnp.int32),
            ),
            "needs num_segments",
        ),
        (lambda a: jp.causal_conv1d(a["u"], a["A"][:2]), "weight must be"),
        (lambda a: jp.causal_conv1d(a["u"][0], a["A"]), "x must be"),
        (lambda a: jp.causal_conv1d(a["u"], a["A"], activation="relu"), "activation must be"),
        (lambda a: jp.causal_conv1d(a["u"][:, :0], a["A"]), "length must be at least 1"),
        # Ids {0, 1} with one slot: segment 1's final state would be dropped.
        (
            lambda a: jp.selective_scan(
                a["u"],
                a["delta"],
                a["A"],
                a["B"],
                a["C"],
                return_final_states=True,
                segment_ids=jnp.asarray([[0] * 4 + [1] * 5] * 2),
                num_segments=1,
            ),
            r"segment_ids must lie in \[0, num_segments=1\) \(the slots of return_final_states\), got ids up "
            r"to 1: pass num_segments=2 or more",
        ),
        (
            lambda a: jp.selective_scan(
                a["u"],
                a["delta"],
                a["A"],
                a["B"],
                a["C"],
                return_final_states=True,
                segment_ids=np.full((2, 9), -1),
                num_segments=3,
            ),
            "segment_ids must lie in .* got a negative id -1",
        ),
        (
            lambda a: jp.positions_from_segment_ids(jnp.asarray([[1.0, 1.0, 2.0]])),
            "segment_ids must be an integer array, got dtype float32",
        ),
        (
            lambda a: jp.positions_from_segment_ids(jnp.asarray([1, 1, 2])),
            r"segment_ids must be a \(batch, length\)",
        ),
        (
            lambda a: jp.segment_ids_from_positions(jnp.asarray([[0.0, 1.0, 0.5]])),
            "positions must be an integer array, got dtype float32",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_argument(call, match):
    args = scan_inputs(jax.random.key(0), 2, 9, 4, 3)
    with pytest.raises(ValueError, match=match):
        call(args)


def test_final_state_slots_of_traced_ids_are_not_checked_but_enough_slots_are_taken():
    # Under jit the ids are traced: no check can run (the docstring states the contract), and
    # with enough slots segment 1's state is the last state of its run.
    args = scan_inputs(jax.random.key(1), 1, 9, 4, 3)
    seg = jnp.asarray([[0] * 4 + [1] * 5])
    run = jax.jit(
        lambda seg, n: jp.selective_scan(
            **args, segment_ids=seg, return_final_states=True, num_segments=n, impl="reference"
        )[1],
        static_argnums=1,
    )
    assert run(seg, 1).shape == (1, 1, 4, 3)
    with jax.enable_x64(True):
        _, states = selective_scan_loop(**to64(args), segment_ids=seg)
    np.testing.assert_allclose(run(seg, 2)[0, 1], np.asarray(states)[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message off a GPU")
@pytest.mark.parametrize("op", ["selective_scan", "causal_conv1d"])
def test_pallas_impl_off_a_gpu_names_impl(op):
    a = scan_inputs(jax.random.key(0), 2, 9, 4, 3)
    fallback = "reference" if op == "selective_scan" else "xla"
    call = {
        "selective_scan": lambda impl: jp.selective_scan(
            a["u"], a["delta"], a["A"], a["B"], a["C"], impl=impl
        ),
        "causal_conv1d": lambda impl: jp.causal_conv1d(a["u"], a["A"], impl=impl),
    }[op]
    with pytest.raises(
        ValueError,
        match=f'impl="pallas" runs Triton kernels, which need a GPU, but this runs on '
        f'\'cpu\'; use impl="pallas_interpret" .*"{fallback}" or "auto"',
    ):
        call("pallas")
    with pytest.raises(ValueError, match='impl="pallas"'):  # the same under jit
        jax.jit(lambda: call("pallas"))()
