"""The chunked SSD (Mamba2) reference against a per-step float64 loop, its packing isolation,
per-slot initial and final states, the recurrent step, and argument checks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_packmamba as jp
from tests.compiled import compiled, compiled_vjp
from tests.loops import rel_err, ssd_scan_loop

# Jitted: one compile per shape rather than one per op.
_loop = jax.jit(ssd_scan_loop, static_argnames=("dt_softplus",))


def normal(seed, shape, dtype=jnp.float32, scale=1.0):
    """Host-side random normals (no per-shape device compiles, which dominate small tests)."""
    return jnp.asarray(
        scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32
    ).astype(dtype)


def ssd_inputs(
    seed,
    batch,
    length,
    heads,
    headdim,
    groups,
    d_state,
    *,
    D_shape="heads",
    with_z=True,
    with_bias=True,
    dtype=jnp.float32,
):
    D_dims = {"heads": (heads,), "heads_headdim": (heads, headdim), None: None}[D_shape]
    seeds = [seed * 8 + i for i in range(8)]
    return dict(
        x=normal(seeds[0], (batch, length, heads, headdim), dtype),
        dt=normal(seeds[1], (batch, length, heads), dtype, scale=0.5),
        A=-jnp.exp(normal(seeds[2], (heads,))),
        B=normal(seeds[3], (batch, length, groups, d_state), dtype),
        C=normal(seeds[4], (batch, length, groups, d_state), dtype),
        D=None if D_dims is None else normal(seeds[5], D_dims),
        z=normal(seeds[6], (batch, length, heads, headdim), dtype) if with_z else None,
        dt_bias=normal(seeds[7], (heads,), scale=0.3) if with_bias else None,
    )


def random_segment_ids(rng, batch, length, max_segments):
    """Rows of consecutive runs 1, 2, ... with random lengths (some of length 1)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(
            rng.choice(np.arange(1, length), size=min(max_segments - 1, length - 1), replace=False)
        )
        rows.append(np.searchsorted(cuts, np.arange(length), side="right") + 1)
    return jnp.asarray(np.stack(rows), jnp.int32)


def ids_from_lengths(lengths_per_row):
    """(b, t) ids 1, 2, ... numbering consecutive runs of the given lengths."""
    return jnp.asarray(
        np.stack([np.repeat(np.arange(1, len(ls) + 1), ls) for ls in lengths_per_row]), jnp.int32
    )


def last_states(states, segment_ids, num_segments):
    """(b, s, h, p, n): states (b, t, h, p, n) at each slot's last token, zeros where absent."""
    seg = np.asarray(segment_ids)
    is_slot = seg[..., None] == np.arange(num_segments)  # (b, t, s)
    last = np.max(np.where(is_slot, np.arange(seg.shape[1])[:, None], -1), axis=1)  # (b, s)
    picked = jnp.take_along_axis(
        states, jnp.asarray(np.maximum(last, 0))[..., None, None, None], axis=1
    )
    return jnp.where(jnp.asarray(last >= 0)[..., None, None, None], picked, 0.0)


def loop_outputs(args, kw, initial_states, segment_ids, num_segments):
    """(y, final states) of the float64 loop; call under jax.enable_x64."""
    y, states = _loop(**args, **kw, segment_ids=segment_ids, initial_states=initial_states)
    seg = np.zeros(y.shape[:2], np.int32) if segment_ids is None else segment_ids
    return y, last_states(states, seg, num_segments)


_CALLS = itertools.count()


def vjp_all(fn, arrays, cotangents):
    """(fn(*arrays), its gradients under cotangents) in one compiled program (eagerly, every
    op compiles on its own), with XLA's backend optimisations off on CPU (tests/compiled.py).
    Every caller passes a fresh closure: a key of its own per call."""
    return compiled_vjp(("ssd_reference", next(_CALLS)), fn, arrays, cotangents)


@pytest.mark.parametrize(
    "batch,length,heads,headdim,groups,d_state,chunk,D_shape,with_z,with_bias,softplus,segments,init",
    [
        # One token, one slot starting from its initial state without segment ids.
        (1, 1, 4, 2, 2, 3, 64, "heads", True, True, True, None, True),
        (2, 17, 4, 3, 1, 4, 64, None, False, False, False, None, False),  # bare, one padded chunk
        (2, 17, 4, 3, 2, 4, 8, "heads_headdim", True, True, True, "random", True),  # 3 chunks
        (
            1,
            300,
            4,
            2,
            2,
            3,
            128,
            "heads",
            False,
            True,
            True,
            "random",
            True,
        ),  # odd length, many length-1
        (2, 300, 6, 2, 2, 3, 64, "heads_headdim", True, False, True, "chunk_edges", False),
    ],
)
def test_ssd_matches_float64_loop(
    batch,
    length,
    heads,
    headdim,
    groups,
    d_state,
    chunk,
    D_shape,
    with_z,
    with_bias,
    softplus,
    segments,
    init,
):
    """Outputs, every slot's final state and the gradients of all inputs (initial states
    included, and through the final states) against autodiff of the float64 loop."""
    args = ssd_inputs(
        length * 13 + heads + groups,
        batch,
        length,
        heads,
        headdim,
        groups,
        d_state,
        D_shape=D_shape,
        with_z=with_z,
        with_bias=with_bias,
    )
    num_segments = 1
    seg = None
    if segments == "random":
        # Up to ~length / 2 runs (many of length 1) with ids 0..4 reused by several runs each
        # (every run of id s starts from slot s), and a slot that never occurs (zeros).
        seg = (
            random_segment_ids(np.random.default_rng(length), batch, length, max(1, length // 2))
            % 5
        )
        num_segments = 6
    elif segments == "chunk_edges":  # every boundary on a chunk edge, and one inside a chunk
        seg = ids_from_lengths([[64, 64, 128, 44], [1, 63, 64, 30, 142]])
        num_segments = 6
    if init:
        args["initial_states"] = normal(7, (batch, num_segments, heads, headdim, d_state))
    names = [k for k, v in args.items() if v is not None]
    kw = dict(dt_softplus=softplus)

    def ours(*arrays):
        a = dict(zip(names, arrays))
        return jp.ssd_scan(
            **a,
            **kw,
            segment_ids=seg,
            chunk_size=chunk,
            return_final_states=True,
            num_segments=num_segments,
            impl="reference",
        )

    cot_y = normal(1, (batch, length, heads, headdim))
    cot_final = normal(2, (batch, num_segments, heads, headdim, d_state))
    (y, final), got = vjp_all(ours, [args[k] for k in names], (cot_y, cot_final))
    assert y.dtype == jnp.float32 and final.shape == cot_final.shape
    with jax.enable_x64(True):

        def loop(*arrays):
            a = dict(zip(names, arrays))
            init_states = a.pop("initial_states", None)
            return loop_outputs(a, kw, init_states, seg, num_segments)

        (y_ref, final_ref), want = vjp_all(
            loop,
            [jnp.asarray(args[k], jnp.float64) for k in names],
            (jnp.asarray(cot_y, jnp.float64), jnp.asarray(cot_final, jnp.float64)),
        )
        want = [np.asarray(w) for w in want]
    errors = {"y": rel_err(y, y_ref), "final_states": rel_err(final, final_ref)}
    errors.update({f"d{name}": rel_err(g, w) for name, g, w in zip(names, got, want)})
    print(" ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors["y"] < 2e-6 * np.sqrt(length), errors
    assert errors["final_states"] < 2e-6 * np.sqrt(length), errors
    for name in names:
        # Gradients sum over time (and batch for A, D, dt_bias): looser, scaled by length.
        assert errors[f"d{name}"] < 1e-5 * np.sqrt(length * batch), (name, errors)


def test_bf16_inputs_accumulate_in_f32():
    """bfloat16 inputs: outputs in bfloat16 within its rounding of the float64 loop run on the
    same (rounded) inputs; final states float32; gradients in the inputs' dtypes."""
    batch, length, heads, headdim, groups, d_state = 2, 200, 4, 8, 2, 8
    args = ssd_inputs(3, batch, length, heads, headdim, groups, d_state, dtype=jnp.bfloat16)
    seg = random_segment_ids(np.random.default_rng(3), batch, length, 6)
    names = [k for k, v in args.items() if v is not None]

    def ours(*arrays):
        return jp.ssd_scan(
            **dict(zip(names, arrays)),
            dt_softplus=True,
            segment_ids=seg,
            chunk_size=64,
            return_final_states=True,
            num_segments=7,
        )

    cot = (
        normal(4, (batch, length, heads, headdim), jnp.bfloat16),
        normal(5, (batch, 7, heads, headdim, d_state)),
    )
    (y, final), got = vjp_all(ours, [args[k] for k in names], cot)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert [g.dtype for g in got] == [args[k].dtype for k in names]
    with jax.enable_x64(True):

        def loop(*arrays):
            return loop_outputs(dict(zip(names, arrays)), dict(dt_softplus=True), None, seg, 7)

        (y_ref, final_ref), want = vjp_all(
            loop,
            [jnp.asarray(args[k], jnp.float64) for k in names],
            tuple(jnp.asarray(c, jnp.float64) for c in cot),
        )
    errors = {"y": rel_err(y, y_ref), "final_states": rel_err(final, final_ref)}
    errors.update({f"d{name}": rel_err(g, w) for name, g, w in zip(names, got, want)})
    print(" ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert errors["y"] < 1e-2, errors
    assert errors["final_states"] < 1e-5 * np.sqrt(length), errors  # float32 inside, same inputs
    for name in names:
        # bf16 rounding of each gradient (and of the cotangent the loop sees exactly).
        assert errors[f"d{name}"] < 2e-2, (name, errors)


# Packing: each sequence of a packed row computes exactly what it computes alone. Boundaries at
# 64, 128 and 192 lie on chunk edges (chunk 64); sequence 2 is exactly one chunk.
LENGTHS = [1, 63, 64, 1, 37, 26, 10]
CHUNK = 64
PER_TOKEN = ("x", "dt", "B", "C", "z")


def packed_case():
    total = sum(LENGTHS)
    seg = ids_from_lengths([LENGTHS])
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    args = ssd_inputs(11, 1, total, 4, 2, 2, 3, D_shape="heads_headdim")
    init = normal(12, (1, len(LENGTHS) + 1, 4, 2, 3))
    return args, seg, starts, init


def out_and_grads(args, init, seg, cot):
    """Outputs and gradients, one compiled program per shape (seg is an argument)."""

    def run(args, init, seg, cot):
        def f(a, h0):
            return jp.ssd_scan(
                **a,
                dt_softplus=True,
                segment_ids=seg,
                chunk_size=CHUNK,
                initial_states=h0,
                return_final_states=True,
            )

        out, vjp = jax.vjp(f, args, init)
        return out, vjp(cot)

    xs = (args, init, seg, cot)
    return compiled(("ssd_packed", seg is None), run, *xs)(*xs)


def test_packed_equals_alone():
    args, seg, starts, init = packed_case()
    cot = (normal(13, args["x"].shape), jnp.zeros_like(init))
    (y, final), (g, g_init) = out_and_grads(args, init, seg, cot)
    for i in (2, 4):  # exactly one chunk; inside a chunk (a compile per length)
        start, n = starts[i], LENGTHS[i]
        sl = slice(start, start + n)
        alone = {k: (v[:, sl] if k in PER_TOKEN else v) for k, v in args.items()}
        slot = init[:, i + 1 : i + 2]  # the slot of id i + 1, as the one slot of the sequence alone
        (y1, final1), (g1, g_init1) = out_and_grads(
            alone, slot, None, (cot[0][:, sl], jnp.zeros_like(slot))
        )
        # Float32 sums in another order (the chunks fall elsewhere).
        np.testing.assert_allclose(y[:, sl], y1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(final[:, i + 1], final1[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g_init[:, i + 1], g_init1[:, 0], rtol=2e-5, atol=2e-5)
        for k in PER_TOKEN:
            np.testing.assert_allclose(g[k][:, sl], g1[k], rtol=2e-5, atol=2e-5, err_msg=k)


@pytest.mark.parametrize("victim", [2, 4])  # exactly one chunk; one inside a chunk
def test_perturbing_one_segment_leaves_others_bit_identical(victim):
    args, seg, starts, init = packed_case()
    sl = slice(starts[victim], starts[victim] + LENGTHS[victim])
    noisy = {
        k: (v.at[:, sl].add(normal(14, v[:, sl].shape)) if k in PER_TOKEN else v)
        for k, v in args.items()
    }
    noisy_init = init.at[:, victim + 1].add(1.0)
    # Zero the victim's cotangents, so that shared parameters' gradients come from the others.
    cot = (
        normal(15, args["x"].shape).at[:, sl].set(0.0),
        normal(16, init.shape).at[:, victim + 1].set(0.0),
    )
    (y0, f0), (g0, gi0) = out_and_grads(args, init, seg, cot)
    (y1, f1), (g1, gi1) = out_and_grads(noisy, noisy_init, seg, cot)
    assert not np.array_equal(y0[:, sl], y1[:, sl])
    assert not np.array_equal(f0[:, victim + 1], f1[:, victim + 1])
    keep = np.ones(seg.shape[1], bool)
    keep[sl] = False
    others = np.arange(init.shape[1]) != victim + 1
    np.testing.assert_array_equal(y0[:, keep], y1[:, keep])
    np.testing.assert_array_equal(f0[:, others], f1[:, others])
    np.testing.assert_array_equal(gi0[:, others], gi1[:, others])
    for k in args:
        if k in PER_TOKEN:
            np.testing.assert_array_equal(g0[k][:, keep], g1[k][:, keep], err_msg=k)
        else:
            np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)


def test_state_update_steps_equal_the_scan():
    batch, length, heads, headdim, groups, d_state = 2, 20, 4, 3, 2, 5
    args = ssd_inputs(16, batch, length, heads, headdim, groups, d_state, D_shape="heads_headdim")
    init = normal(17, (batch, 1, heads, headdim, d_state))
    y, final = jp.ssd_scan(
        **args, dt_softplus=True, chunk_size=8, initial_states=init, return_final_states=True
    )
    step = jax.jit(
        lambda state, t: jp.ssd_state_update(
            state,
            args["x"][:, t],
            args["dt"][:, t],
            args["A"],
            args["B"][:, t],
            args["C"][:, t],
            args["D"],
            args["z"][:, t],
            args["dt_bias"],
        )
    )
    state = init[:, 0]
    for t in range(length):
        state, y_t = step(state, t)
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-5, atol=1e-5)
    assert state.dtype == jnp.float32
    np.testing.assert_allclose(state, final[:, 0], rtol=1e-5, atol=1e-5)


def test_no_per_token_state_tensor_in_forward_or_backward():
    """No value of the traced forward + backward (initial and final states included) is as
    large as a (batch, length, heads, headdim, d_state) tensor: the largest are the intra-chunk
    (b, c, h, L, L) matrices. Checked on the jaxpr, every nested jaxpr included."""
    batch, length, heads, headdim, groups, d_state, chunk, slots = 2, 512, 4, 16, 2, 32, 64, 4
    f32 = jnp.float32

    def loss(x, dt, A, B, C, init, seg):
        y, final = jp.ssd_scan_reference(
            x,
            dt,
            A,
            B,
            C,
            dt_softplus=True,
            segment_ids=seg,
            chunk_size=chunk,
            initial_states=init,
            return_final_states=True,
            num_segments=slots,
        )
        return jnp.sum(y) + jnp.sum(final)

    shapes = [
        (batch, length, heads, headdim),
        (batch, length, heads),
        (heads,),
        (batch, length, groups, d_state),
        (batch, length, groups, d_state),
        (batch, slots, heads, headdim, d_state),
    ]
    specs = [jax.ShapeDtypeStruct(shape, f32) for shape in shapes] + [
        jax.ShapeDtypeStruct((batch, length), jnp.int32)
    ]
    closed = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(6))))(*specs)

    def all_jaxprs(jaxpr):
        yield jaxpr
        for eqn in jaxpr.eqns:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        yield from all_jaxprs(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        yield from all_jaxprs(sub)

    largest = max(
        int(np.prod(v.aval.shape))
        for j in all_jaxprs(closed.jaxpr)
        for eqn in j.eqns
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    )
    per_token_states = batch * length * heads * headdim * d_state
    assert largest == batch * (length // chunk) * heads * chunk * chunk < per_token_states // 4


def good_args():
    return ssd_inputs(0, 2, 9, 4, 3, 2, 5)


@pytest.mark.parametrize(
    "change,kw,match",
    [
        (lambda a: {"x": a["x"][0]}, {}, "x must be"),
        (
            lambda a: {
                "x": a["x"][:, :0],
                "dt": a["dt"][:, :0],
                "B": a["B"][:, :0],
                "C": a["C"][:, :0],
                "z": a["z"][:, :0],
            },
            {},
            "length must be at least 1",
        ),
        (lambda a: {"dt": a["dt"][..., :3]}, {}, "dt must have shape"),
        (lambda a: {"A": a["A"][:, None]}, {}, "A must be"),
        (lambda a: {"B": a["B"][..., :1, :]}, {}, "B must have shape|C must have shape"),
        (lambda a: {"B": a["B"][:, :, :, None]}, {}, "B must be"),
        (lambda a: {"C": a["C"][..., :2]}, {}, "C must have shape"),
        (
            lambda a: {
                "B": jnp.tile(a["B"], (1, 1, 3, 1))[:, :, :3],
                "C": jnp.tile(a["C"], (1, 1, 3, 1))[:, :, :3],
            },
            {},
            "multiple of groups",
        ),
        (lambda a: {"D": a["A"][:2]}, {}, "D must have shape"),
        (lambda a: {"z": a["z"][..., :2]}, {}, "z must have shape"),
        (lambda a: {"dt_bias": a["A"][:3]}, {}, "dt_bias must have shape"),
        (lambda a: {"x": a["x"].astype(jnp.int32)}, {}, "x must be a real floating"),
        (lambda a: {"dt": a["dt"].astype(jnp.int32)}, {}, "dt must be a real floating"),
        (
            lambda a: {},
            {"segment_ids": jnp.zeros((2, 5), jnp.int32)},
            "segment_ids must have shape",
        ),
        (
            lambda a: {},
            {"segment_ids": jnp.zeros((2, 9), jnp.float32)},
            "segment_ids must be an integer",
        ),
        (lambda a: {}, {"impl": "cuda"}, "impl must be one of"),
        (lambda a: {}, {"save_chunk_states": "no"}, "save_chunk_states must be a bool"),
        # The Pallas kernels take headdim and d_state powers of two >= 16 only.
        (lambda a: {}, {"impl": "pallas"}, "headdim=3 \\(x's axis 3\\)"),
        (lambda a: {}, {"impl": "pallas_interpret"}, "powers of two >= 16"),
        (lambda a: {}, {"chunk_size": 0}, "chunk_size must be a positive int"),
        (lambda a: {}, {"chunk_size": 8.0}, "chunk_size must be a positive int"),
        (
            lambda a: {},
            {"return_final_states": True, "segment_ids": jnp.zeros((2, 9), jnp.int32)},
            "needs num_segments",
        ),
        (lambda a: {}, {"num_segments": 0}, "num_segments must be a positive int"),
        (
            lambda a: {},
            {
                "segment_ids": jnp.full((2, 9), 3, jnp.int32),
                "num_segments": 3,
                "return_final_states": True,
            },
            r"segment_ids must lie in \[0, num_segments=3\)",
        ),
        # Ids {0, 1} with one slot: segment 1's final state would be dropped.
        (
            lambda a: {},
            {
                "segment_ids": jnp.asarray([[0] * 4 + [1] * 5] * 2),
                "num_segments": 1,
                "return_final_states": True,
            },
            r"num_segments=1\) \(the slots of return_final_states\), got ids up to 1: pass num_segments=2 or more",
        ),
        (
            lambda a: {},
            {"segment_ids": jnp.full((2, 9), -1, jnp.int32), "num_segments": 3},
            "segment_ids must lie in",
        ),
        (lambda a: {}, {"initial_states": jnp.zeros((2, 2, 4, 3, 4))}, "initial_states must be"),
        (
            lambda a: {},
            {"initial_states": jnp.zeros((2, 2, 4, 3, 5)), "num_segments": 3},
            "must equal initial_states.shape",
        ),
        (
            lambda a: {},
            {"initial_states": jnp.zeros((2, 2, 4, 3, 5), jnp.int32)},
            "initial_states must be a real floating",
        ),
        (
            lambda a: {},
            {
                "initial_states": jnp.zeros((2, 2, 4, 3, 5)),
                "segment_ids": jnp.full((2, 9), 2, jnp.int32),
            },
            "segment_ids must lie in",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_argument(change, kw, match):
    args = good_args()
    with pytest.raises(ValueError, match=match):
        jp.ssd_scan(**{**args, **change(args)}, **kw)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message off a GPU")
def test_pallas_impl_off_a_gpu_names_impl():
    args = ssd_inputs(0, 1, 9, 2, 16, 1, 16)  # shapes the kernels take
    with pytest.raises(
        ValueError,
        match='impl="pallas" runs Triton kernels, which need a GPU, but this '
        'runs on \'cpu\'; use impl="pallas_interpret" .*"reference"',
    ):
        jp.ssd_scan(**args, impl="pallas")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {"x": a["x"][:, :3]}, "multiple of groups"),
        (lambda a: {"x": a["x"][:, None]}, "x must be"),
        (lambda a: {"state": a["state"][..., :2]}, "state must have shape"),
        (lambda a: {"dt": a["dt"][:, :2]}, "dt must have shape"),
        (lambda a: {"B": a["B"][:, :1]}, "C must have shape"),
        (lambda a: {"D": a["D"][:2]}, "D must have shape"),
    ],
)
def test_state_update_bad_input(change, match):
    a = good_args()
    step = dict(
        state=jnp.zeros((2, 4, 3, 5)),
        x=a["x"][:, 0],
        dt=a["dt"][:, 0],
        A=a["A"],
        B=a["B"][:, 0],
        C=a["C"][:, 0],
        D=a["D"],
        z=a["z"][:, 0],
        dt_bias=a["dt_bias"],
    )
    with pytest.raises(ValueError, match=match):
        jp.ssd_state_update(**{**step, **change(step)})
