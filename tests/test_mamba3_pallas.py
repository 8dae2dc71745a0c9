"""The Mamba-3 scans with their SSD core in the Pallas kernels (mamba3_scan(impl="pallas"),
pallas_kernels.ssd.ssd_chunked_pallas; MIMO's fused (L R)-long axis) against the float64
per-step loops and the references: outputs, per-slot final states and every gradient (random
cotangents); bit-exact isolation of segments; packed equals alone; the CUDA lowering on this
CPU machine; the model's scan_impl.

"pallas_interpret" runs the Triton kernels through the Pallas interpreter (CPU); "pallas" the
same on a GPU (skipped without one). An interpreted forward + backward costs ~20 s of tracing
and compiling per shape, so the tests share one compiled function and vary only data.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_packmamba as jp
from jax_packmamba.ops.mamba3 import (
    Mamba3State,
    mamba3_mimo_scan,
    mamba3_mimo_scan_pallas,
    mamba3_mimo_scan_reference,
    mamba3_scan,
    mamba3_scan_pallas,
    mamba3_scan_reference,
)
from pallas_kernels.ssd import SSDConfig
from tests.compiled import compiled
from tests.gpu import HAS_GPU, lower_for_cuda, on_gpu
from tests.loops import mamba3_loop, mamba3_mimo_loop, rel_err
from tests.test_mamba3_mimo import NAMES as MIMO_NAMES
from tests.test_mamba3_mimo import mimo_inputs, mimo_states
from tests.test_mamba3_reference import initial_states, inputs
from tests.test_ssd_impls import BACKWARD, FORWARD, TRITON_CALL

IMPLS = ["pallas_interpret", on_gpu("pallas")]
NAMES = ("x", "dt", "A", "trap", "B", "C", "angles", "D", "z", "B_bias", "C_bias")
SHAPE = dict(batch=2, length=40, heads=4, headdim=16, groups=2, d_state=16, n_angles=4)
# MIMO: 2 heads, each one SSD head on the flattened (L R)-long axis (token (t, r) at t R + r).
MIMO_SHAPE = dict(SHAPE, heads=2, groups=1)
SLOTS = 6  # id 0 occurs in neither row: its final state is zeros
# Chunks of 32 (the second ragged) in 16-row blocks, so runs cross block and chunk edges.
CONFIG = SSDConfig(chunk=32, block_l=16, block_s=16, block_k=16)
# Row 0: runs of 1, 15, 16 (from a block edge to a chunk edge), 3, 5 tokens; row 1: 4, 12, 16
# (from a block edge to a chunk edge), 7, 1 (the row's last token alone).
RUNS = ([1, 15, 16, 3, 5], [4, 12, 16, 7, 1])
PER_TOKEN = ("x", "dt", "A", "trap", "B", "C", "angles", "z")  # (batch, length, ...)
# MIMO's chunks, on the flattened axis: 16 steps at rank 2 (CONFIG) and at rank 4, so the runs
# of 15 and 16 steps end on flattened chunk edges (R 16 and R 32 tokens), the 16-step run spans
# a whole chunk, and the rows (40 R tokens) end mid-chunk; runs of 1 step are R tokens.
MIMO_CONFIGS = {2: CONFIG, 4: SSDConfig(chunk=64, block_l=16, block_s=16, block_k=16)}


def segment_ids():
    rows = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(r)]) for r in RUNS]
    return jnp.asarray(np.stack(rows), jnp.int32)


def states_init(seed):
    s = SHAPE
    return initial_states(
        seed, s["batch"], SLOTS, s["heads"], s["headdim"], s["d_state"], s["n_angles"]
    )


def scan_fn(impl, mimo=False, config=CONFIG):
    """grad of sum(y * cot_y) + sum(final * cot_f) for `impl` ("reference_fused": the MIMO
    reference in the kernels' fused form), compiled once per impl and shapes (with XLA's
    backend optimisations off on CPU: tests/compiled.py)."""
    key = ("mamba3", impl, mimo, config)

    def run(*args):
        reference = mamba3_mimo_scan_reference if mimo else mamba3_scan_reference
        kernels = mamba3_mimo_scan_pallas if mimo else mamba3_scan_pallas

        def loss(args, init, seg, cot_y, cot_f):
            # MIMO's chunk_size counts steps: R of them make the flattened chunk.
            rank = args["B"].shape[2] if mimo else 1
            kwargs = dict(
                segment_ids=seg,
                chunk_size=config.chunk // rank,
                initial_states=init,
                return_final_states=True,
                num_segments=SLOTS,
            )
            if impl == "reference":
                y, final = reference(**args, **kwargs)
            elif impl == "reference_fused":
                y, final = reference(**args, **kwargs, fused=True)
            else:
                y, final = kernels(
                    **args, **kwargs, interpret=impl == "pallas_interpret", config=config
                )
            total = jnp.sum(y * cot_y) + sum(jnp.sum(v * c) for v, c in zip(final, cot_f))
            return total, (y, final)

        return compiled(key, jax.grad(loss, argnums=(0, 1), has_aux=True), *args)(*args)

    return run


def cotangents(seed, args, init):
    rng = np.random.default_rng(seed)
    cot_y = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    cot_f = Mamba3State(*(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in init))
    return cot_y, cot_f


def loop_grads(args, init, seg, cot_y, cot_f, loop=mamba3_loop):
    """The float64 loop's (grads, (y, final states)) for the same loss."""

    def loss(a, init, seg, cot_y, cot_f):
        y, states = loop(**a, segment_ids=seg, initial_states=init)
        t = jnp.arange(seg.shape[1])
        is_slot = seg[..., None] == jnp.arange(SLOTS)  # (b, t, s)
        last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)  # (b, s)
        present, where = last >= 0, jnp.maximum(last, 0)
        rows = jnp.arange(seg.shape[0])[:, None]
        total, finals = jnp.sum(y * cot_y), []
        for state, c in zip(states, cot_f):
            picked = state[rows, where]
            mask = present.reshape(*present.shape, *[1] * (picked.ndim - 2))
            finals.append(jnp.where(mask, picked, 0.0))
            total = total + jnp.sum(finals[-1] * c)
        return total, (y, finals)

    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)  # noqa: E731
        xs = (f64(args), Mamba3State(*f64(list(init))), seg, f64(cot_y), f64(list(cot_f)))
        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        out = compiled(("mamba3_loop", loop.__name__), grad, *xs)(*xs)
        return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_float64_loop_and_reference(impl):
    """Outputs, final states (slot 0 absent: zeros) and the gradients of every input and
    initial state against the float64 loop, and against the reference."""
    args = inputs(0, **SHAPE)
    init = states_init(1)
    seg = segment_ids()
    cot_y, cot_f = cotangents(2, args, init)
    (g_args, g_init), (y, final) = scan_fn(impl)(args, init, seg, cot_y, cot_f)
    (r_args, r_init), (y_ref, final_ref) = loop_grads(args, init, seg, cot_y, cot_f)
    final_ref[3] = np.mod(final_ref[3], 2 * np.pi)
    assert rel_err(y, y_ref) < 1e-5
    for name, got, want in zip(Mamba3State._fields, final, final_ref):
        assert rel_err(got, want) < 1e-5, name
    for k in NAMES:
        assert rel_err(g_args[k], r_args[k]) < 1e-4, k
    for name, got, want in zip(Mamba3State._fields, g_init, r_init):
        assert rel_err(got, want) < 1e-4, name
    # And the reference, whose SSD core is the pure-JAX chunked one.
    (x_args, x_init), (y_x, final_x) = scan_fn("reference")(args, init, seg, cot_y, cot_f)
    assert rel_err(y, y_x) < 1e-5
    for got, want in zip(
        (*final, *g_init, *g_args.values()), (*final_x, *x_init, *x_args.values())
    ):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_matches_float64_loop(impl):
    """bf16 x, z, B and C (the model's compute dtype; dt, A, trap, angles float32), packed,
    without states: outputs and every gradient against the float64 loop on the same rounded
    inputs, within bf16's rounding of the matmul operands, the output and the gradients."""
    args = inputs(11, **SHAPE)
    for k in ("x", "z", "B", "C"):
        args[k] = args[k].astype(jnp.bfloat16)
    seg = segment_ids()
    cot = jnp.asarray(np.random.default_rng(12).standard_normal(args["x"].shape), jnp.float32)

    def loss(a, seg, cot):
        y = mamba3_scan(**a, segment_ids=seg, chunk_size=CONFIG.chunk, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    xs = (args, seg, cot)
    grads, y = compiled(("mamba3_bf16", impl), jax.grad(loss, has_aux=True), *xs)(*xs)

    def loop_loss(a, seg, cot):
        y, _ = mamba3_loop(**a, segment_ids=seg)
        return jnp.sum(y * cot), y

    with jax.enable_x64(True):
        a64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        xs = (a64, seg, jnp.asarray(cot, jnp.float64))
        grad64 = jax.grad(loop_loss, has_aux=True)
        want, y_ref = compiled(("mamba3_loop_bf16",), grad64, *xs)(*xs)
    assert rel_err(np.asarray(y, np.float32), np.asarray(y_ref)) < 1e-2
    for k in NAMES:
        got = np.asarray(grads[k], np.float32)
        assert rel_err(got, np.asarray(want[k])) < 3e-2, k


@pytest.mark.parametrize("impl", IMPLS)
def test_segments_are_bitwise_isolated(impl):
    """Perturbing one run's inputs and its slot's initial state leaves every bit of the other
    runs' outputs and per-token gradients, and the other slots' final states and initial-state
    gradients."""
    args = inputs(3, **SHAPE)
    init = states_init(4)
    seg = segment_ids()
    cot_y, cot_f = cotangents(5, args, init)
    target = 3  # row 0: the 16-token run from a block edge to a chunk edge
    in_run = np.asarray(seg) == target
    (g_a, g_i), (y, final) = scan_fn(impl)(args, init, seg, cot_y, cot_f)
    bumped = dict(args)
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        v = args[k]
        mask = in_run.reshape(in_run.shape + (1,) * (v.ndim - 2))
        bumped[k] = jnp.where(mask, v + 0.5, v)
    init_b = Mamba3State(*(a.at[:, target].add(0.5) for a in init))
    (g_a2, g_i2), (y2, final2) = scan_fn(impl)(bumped, init_b, seg, cot_y, cot_f)
    keep = ~in_run
    assert not np.array_equal(y[in_run], y2[in_run])  # the perturbation reached its run
    np.testing.assert_array_equal(y[keep], y2[keep])
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        np.testing.assert_array_equal(g_a[k][keep], g_a2[k][keep], err_msg=k)
    others = np.arange(SLOTS) != target
    for a, b in zip((*final, *g_i), (*final2, *g_i2)):
        np.testing.assert_array_equal(a[:, others], b[:, others])


@pytest.mark.parametrize("rank", sorted(MIMO_CONFIGS))
@pytest.mark.parametrize("impl", IMPLS)
def test_mimo_matches_float64_loop_references_and_is_isolated(impl, rank):
    """MIMO (out_proj on, initial states): outputs, final states and every gradient against
    the float64 MIMO loop and both references (R^2 SSD heads: an independent form; the fused
    form in pure JAX on the same flattened chunks); then one run's inputs and slot perturbed
    leave the other runs' outputs and gradients and the other slots' final states
    bit-identical."""
    s, config = MIMO_SHAPE, MIMO_CONFIGS[rank]
    args = mimo_inputs(8, rank=rank, **s)
    init = mimo_states(
        9, s["batch"], SLOTS, s["heads"], s["headdim"], s["d_state"], s["n_angles"], rank=rank
    )
    seg = segment_ids()
    cot_y, cot_f = cotangents(10, args, init)
    run = scan_fn(impl, mimo=True, config=config)
    (g_args, g_init), (y, final) = run(args, init, seg, cot_y, cot_f)
    (r_args, r_init), (y_ref, final_ref) = loop_grads(
        args, init, seg, cot_y, cot_f, loop=mamba3_mimo_loop
    )
    final_ref[3] = np.mod(final_ref[3], 2 * np.pi)
    assert rel_err(y, y_ref) < 1e-5
    for name, got, want in zip(Mamba3State._fields, final, final_ref):
        assert rel_err(got, want) < 1e-5, name
    for k in MIMO_NAMES:
        assert rel_err(g_args[k], r_args[k]) < 1e-4, k
    for name, got, want in zip(Mamba3State._fields, g_init, r_init):
        assert rel_err(got, want) < 1e-4, name
    for form in ("reference", "reference_fused"):
        (x_args, x_init), (y_x, final_x) = scan_fn(form, mimo=True, config=config)(
            args, init, seg, cot_y, cot_f
        )
        assert rel_err(y, y_x) < 1e-5, form
        for got, want in zip(
            (*final, *g_init, *g_args.values()), (*final_x, *x_init, *x_args.values())
        ):
            assert rel_err(got, want) < 1e-4, form

    target = 3  # the 16-step run: a whole flattened chunk, from chunk edge to chunk edge
    in_run = np.asarray(seg) == target
    bumped = dict(args)
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        mask = in_run.reshape(in_run.shape + (1,) * (args[k].ndim - 2))
        bumped[k] = jnp.where(mask, args[k] + 0.5, args[k])
    init_b = Mamba3State(*(a.at[:, target].add(0.5) for a in init))
    (g_a2, g_i2), (y2, final2) = run(bumped, init_b, seg, cot_y, cot_f)
    keep = ~in_run
    assert not np.array_equal(y[in_run], y2[in_run])
    np.testing.assert_array_equal(y[keep], y2[keep])
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        np.testing.assert_array_equal(g_args[k][keep], g_a2[k][keep], err_msg=k)
    others = np.arange(SLOTS) != target
    for a, b in zip((*final, *g_init), (*final2, *g_i2)):
        np.testing.assert_array_equal(a[:, others], b[:, others])


@pytest.mark.parametrize("impl", IMPLS)
def test_mimo_packed_equals_alone(impl):
    """MIMO (rank 2) through the public op, segment ids, no states, per-rank outputs: each run
    of row 0 (1, 15 and 16 steps: 2 tokens, 30, and one whole 32-token flattened chunk) alone
    equals its slice of the packed rows."""
    args = mimo_inputs(13, **MIMO_SHAPE)
    args["out_proj"] = None
    seg = segment_ids()
    chunk = CONFIG.chunk // 2  # steps: 32 flattened tokens at rank 2

    def run(a, seg=None):
        def f(a, seg):
            return mamba3_mimo_scan(**a, segment_ids=seg, chunk_size=chunk, impl=impl)

        return compiled(("mamba3_mimo_alone", impl, seg is None), f, a, seg)(a, seg)

    y = run(args, seg)  # (b, t, R, h, p)
    ids = np.asarray(seg[0])
    for i in (1, 2, 3):
        where = np.nonzero(ids == i)[0]
        lo, hi = where[0], where[-1] + 1
        alone = {k: (v[:1, lo:hi] if k in PER_TOKEN else v) for k, v in args.items()}
        np.testing.assert_allclose(
            y[:1, lo:hi], run(alone), rtol=1e-5, atol=1e-5, err_msg=f"id {i}"
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_alone(impl):
    """The training path (segment ids, no states) through the public op: each run of row 0
    (lengths 1, 15 and 16: one token, not a chunk multiple, a whole 16-token chunk alone)
    alone equals its slice of the packed rows."""
    args = inputs(6, **SHAPE)
    seg = segment_ids()

    def run(a, seg=None):
        def f(a, seg):
            return mamba3_scan(**a, segment_ids=seg, chunk_size=CONFIG.chunk, impl=impl)

        key = ("mamba3_alone", impl, a["x"].shape, seg is None)
        return compiled(key, f, a, seg)(a, seg)

    y = run(args, seg)
    ids = np.asarray(seg[0])
    for s in (1, 2, 3):
        where = np.nonzero(ids == s)[0]
        lo, hi = where[0], where[-1] + 1
        alone = {k: (v[:1, lo:hi] if v.ndim >= 3 else v) for k, v in args.items()}
        np.testing.assert_allclose(
            y[:1, lo:hi], run(alone), rtol=1e-5, atol=1e-5, err_msg=f"id {s}"
        )


def lowering_rows(b=2, t=300, h=8, p=64, g=1, n=128, a=32, rank=None):
    """Abstract mamba3_scan (rank None) or mamba3_mimo_scan arguments: bf16 rows, float32
    per-token rates and parameters."""
    bf16, f32, sds = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
    bc = (b, t, g, n) if rank is None else (b, t, rank, g, n)
    rows = dict(
        x=sds((b, t, h, p), bf16),
        dt=sds((b, t, h), f32),
        A=sds((b, t, h), f32),
        trap=sds((b, t, h), f32),
        B=sds(bc, bf16),
        C=sds(bc, bf16),
        angles=sds((b, t, h, a), f32),
        D=sds((h,), f32),
        z=sds((b, t, h, p), bf16),
    )
    if rank is not None:
        rows.update({k: sds((h, rank, p), f32) for k in ("x_proj", "z_proj", "out_proj")})
    return rows


def kernel_names(text):
    names = re.findall(r'name = "(ssd_[a-z_]+)"', text)
    assert text.count(TRITON_CALL) == len(names)
    # The glue moves values between tokens and slots by one-hot contractions only: a scatter
    # (a gather's gradient) would be atomic adds on a GPU, in no fixed order.
    assert "stablehlo.scatter" not in text
    return sorted(names)


def test_training_path_lowers_for_cuda_on_kernels():
    """jax.grad of mamba3_scan(impl="pallas") with bf16 rows and segment ids, lowered for CUDA:
    the SSD kernels (forward and backward, the per-token cumsum among them) and no scatter."""
    rows = lowering_rows()

    def loss(args, seg):
        y = mamba3_scan(**args, segment_ids=seg, impl="pallas")
        return y.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.grad(loss), rows, jax.ShapeDtypeStruct((2, 300), jnp.int32))
    assert kernel_names(text) == sorted(FORWARD + BACKWARD)


def test_states_and_mimo_paths_lower_for_cuda():
    """Initial and final states (SISO), MIMO (rank 2) with segment ids, and MIMO (rank 4)
    with initial and final states: the same kernels (one SSD call: the fused axis) and no
    scatter, forward and backward."""
    f32, sds = jnp.float32, jax.ShapeDtypeStruct
    b, t, h, p, n, a, slots = 1, 100, 4, 16, 32, 8, 3
    rows = lowering_rows(b, t, h, p, 1, n, a)
    init = Mamba3State(
        sds((b, slots, h, p, n), f32),
        sds((b, slots, h, n), f32),
        sds((b, slots, h, p), f32),
        sds((b, slots, h, a), f32),
    )
    seg = sds((b, t), jnp.int32)

    def states_loss(args, init, seg):
        y, final = mamba3_scan(
            **args, segment_ids=seg, initial_states=init, return_final_states=True, impl="pallas"
        )
        return y.astype(f32).sum() + sum(v.sum() for v in final)

    text = lower_for_cuda(jax.grad(states_loss, argnums=(0, 1)), rows, init, seg)
    assert kernel_names(text) == sorted(FORWARD + BACKWARD)

    mimo_rows = lowering_rows(b, t, h, p, 1, n, a, rank=2)

    def mimo_loss(args, seg):
        y = mamba3_mimo_scan(**args, segment_ids=seg, impl="pallas")
        return y.astype(f32).sum()

    text = lower_for_cuda(jax.grad(mimo_loss), mimo_rows, seg)
    assert kernel_names(text) == sorted(FORWARD + BACKWARD)

    rank = 4
    mimo_rows = lowering_rows(b, t, h, p, 1, n, a, rank=rank)
    mimo_init = init._replace(k=sds((b, slots, rank, h, n), f32))

    def mimo_states_loss(args, init, seg):
        y, final = mamba3_mimo_scan(
            **args, segment_ids=seg, initial_states=init, return_final_states=True, impl="pallas"
        )
        return y.astype(f32).sum() + sum(v.sum() for v in final)

    grad = jax.grad(mimo_states_loss, argnums=(0, 1))
    text = lower_for_cuda(grad, mimo_rows, mimo_init, seg)
    assert kernel_names(text) == sorted(FORWARD + BACKWARD)


def test_model_scan_impl_reaches_the_kernels():
    """A Mamba3 LM (headdim and d_state 16) with scan_impl="pallas_interpret" gives the
    reference model's logits on a packed batch."""
    config = jp.Mamba3Config.preset("tiny", n_layer=1, d_model=32, d_intermediate=0)
    model = jp.LM(config, rngs=nnx.Rngs(0))
    kernels = jp.LM(
        jp.Mamba3Config.preset(
            "tiny", n_layer=1, d_model=32, d_intermediate=0, scan_impl="pallas_interpret"
        ),
        rngs=nnx.Rngs(0),
    )
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 256, (1, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([1, 2, 3], [1, 16, 7])[None], jnp.int32)

    def logits(m):  # one compiled program (an eager nnx call compiles op by op)
        graphdef, params = nnx.split(m)
        fn = lambda p, ids, seg: nnx.merge(graphdef, p)(ids, seg)  # noqa: E731
        return compiled(("mamba3_lm", graphdef), fn, params, ids, seg)(params, ids, seg)

    want = logits(model)
    got = logits(kernels)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_impl_argument_checks():
    args = inputs(7, batch=1, length=5)  # headdim 4, d_state 8: not for the kernels
    with pytest.raises(ValueError, match="impl must be one of"):
        mamba3_scan(**args, impl="triton")
    with pytest.raises(ValueError, match="headdim=4"):
        mamba3_scan(**args, impl="pallas_interpret")
    if not HAS_GPU:
        ok = inputs(7, batch=1, length=5, headdim=16, d_state=16)
        with pytest.raises(ValueError, match='impl="pallas" runs Triton kernels'):
            mamba3_scan(**ok, impl="pallas")
        # "auto" off a GPU is the reference, whatever the shapes.
        np.testing.assert_array_equal(
            mamba3_scan(**ok, impl="auto"), mamba3_scan(**ok, impl="reference")
        )
