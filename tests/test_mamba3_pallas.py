"""The Mamba-3 (SISO) scan with its SSD core in the Pallas kernels (mamba3_scan(impl="pallas"),
pallas_kernels.ssd.ssd_chunked_pallas) against the float64 per-step loop and the reference:
outputs, per-slot final states and every gradient (random cotangents); bit-exact isolation of
segments; packed equals alone; the CUDA lowering on this CPU machine; the model's scan_impl.

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
    mamba3_scan,
    mamba3_scan_pallas,
    mamba3_scan_reference,
)
from pallas_kernels.ssd import SSDConfig
from tests.gpu import HAS_GPU, lower_for_cuda, on_gpu
from tests.loops import mamba3_loop, rel_err
from tests.test_mamba3_reference import initial_states, inputs
from tests.test_ssd_impls import BACKWARD, FORWARD, TRITON_CALL

IMPLS = ["pallas_interpret", on_gpu("pallas")]
NAMES = ("x", "dt", "A", "trap", "B", "C", "angles", "D", "z", "B_bias", "C_bias")
SHAPE = dict(batch=2, length=40, heads=4, headdim=16, groups=2, d_state=16, n_angles=4)
SLOTS = 6  # id 0 occurs in neither row: its final state is zeros
# Chunks of 32 (the second ragged) in 16-row blocks, so runs cross block and chunk edges.
CONFIG = SSDConfig(chunk=32, block_l=16, block_s=16, block_k=16)
# Row 0: runs of 1, 15, 16 (from a block edge to a chunk edge), 3, 5 tokens; row 1: 4, 12, 16
# (from a block edge to a chunk edge), 7, 1 (the row's last token alone).
RUNS = ([1, 15, 16, 3, 5], [4, 12, 16, 7, 1])


def segment_ids():
    rows = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(r)]) for r in RUNS]
    return jnp.asarray(np.stack(rows), jnp.int32)


def states_init(seed):
    s = SHAPE
    return initial_states(
        seed, s["batch"], SLOTS, s["heads"], s["headdim"], s["d_state"], s["n_angles"]
    )


_COMPILED = {}


def scan_fn(impl):
    """jit(grad) of sum(y * cot_y) + sum(final * cot_f) for `impl`, compiled once per impl."""
    if impl not in _COMPILED:

        def loss(args, init, seg, cot_y, cot_f):
            kwargs = dict(
                segment_ids=seg,
                chunk_size=CONFIG.chunk,
                initial_states=init,
                return_final_states=True,
                num_segments=SLOTS,
            )
            if impl == "reference":
                y, final = mamba3_scan_reference(**args, **kwargs)
            else:
                y, final = mamba3_scan_pallas(
                    **args, **kwargs, interpret=impl == "pallas_interpret", config=CONFIG
                )
            total = jnp.sum(y * cot_y) + sum(jnp.sum(v * c) for v, c in zip(final, cot_f))
            return total, (y, final)

        _COMPILED[impl] = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    return _COMPILED[impl]


def cotangents(seed, args, init):
    rng = np.random.default_rng(seed)
    cot_y = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    cot_f = Mamba3State(*(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in init))
    return cot_y, cot_f


def loop_grads(args, init, seg, cot_y, cot_f):
    """The float64 loop's (grads, (y, final states)) for the same loss."""
    ids = np.asarray(seg)
    last = np.array(
        [[np.nonzero(r == s)[0][-1] if (r == s).any() else -1 for s in range(SLOTS)] for r in ids]
    )
    present, where = last >= 0, np.maximum(last, 0)
    rows = np.arange(ids.shape[0])[:, None]

    def loss(a, init):
        y, states = mamba3_loop(**a, segment_ids=seg, initial_states=init)
        total, finals = jnp.sum(y * cot_y), []
        for state, c in zip(states, cot_f):
            picked = state[rows, where]
            mask = present.reshape(*present.shape, *[1] * (picked.ndim - 2))
            finals.append(jnp.where(mask, picked, 0.0))
            total = total + jnp.sum(finals[-1] * c)
        return total, (y, finals)

    with jax.enable_x64(True):
        a64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        i64 = Mamba3State(*(jnp.asarray(v, jnp.float64) for v in init))
        c64 = (jnp.asarray(cot_y, jnp.float64), [jnp.asarray(c, jnp.float64) for c in cot_f])
        cot_y, cot_f = c64
        out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(a64, i64)
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


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_alone(impl):
    """The training path (segment ids, no states) through the public op: each run of row 0
    (lengths 1, 15 and 16: one token, not a chunk multiple, a whole 16-token chunk alone)
    alone equals its slice of the packed rows."""
    args = inputs(6, **SHAPE)
    seg = segment_ids()
    run = jax.jit(mamba3_scan, static_argnames=("chunk_size", "impl"))
    y = run(**args, segment_ids=seg, chunk_size=CONFIG.chunk, impl=impl)
    ids = np.asarray(seg[0])
    for s in (1, 2, 3):
        where = np.nonzero(ids == s)[0]
        lo, hi = where[0], where[-1] + 1
        alone = {k: (v[:1, lo:hi] if v.ndim >= 3 else v) for k, v in args.items()}
        np.testing.assert_allclose(
            y[:1, lo:hi],
            run(**alone, chunk_size=CONFIG.chunk, impl=impl),
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"id {s}",
        )


def test_training_path_lowers_for_cuda_on_kernels():
    """jax.grad of mamba3_scan(impl="pallas") with bf16 rows and segment ids, lowered for CUDA:
    the SSD kernels (forward and backward, the per-token cumsum among them) and no scatter (the
    glue moves values between tokens and slots by one-hot contractions only)."""
    b, t, h, p, g, n, a = 2, 300, 8, 64, 1, 128, 32
    bf16, f32, sds = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
    rows = dict(
        x=sds((b, t, h, p), bf16),
        dt=sds((b, t, h), f32),
        A=sds((b, t, h), f32),
        trap=sds((b, t, h), f32),
        B=sds((b, t, g, n), bf16),
        C=sds((b, t, g, n), bf16),
        angles=sds((b, t, h, a), f32),
        D=sds((h,), f32),
        z=sds((b, t, h, p), bf16),
        B_bias=sds((h, n), f32),
        C_bias=sds((h, n), f32),
    )

    def loss(args, seg):
        y = mamba3_scan(**args, segment_ids=seg, impl="pallas")
        return y.astype(f32).sum()

    text = lower_for_cuda(jax.grad(loss), rows, sds((b, t), jnp.int32))
    names = re.findall(r'name = "(ssd_[a-z_]+)"', text)
    assert sorted(names) == sorted(FORWARD + BACKWARD), names
    assert text.count(TRITON_CALL) == len(FORWARD) + len(BACKWARD)
    assert "stablehlo.scatter" not in text


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
    want = model(ids, seg)
    got = kernels(ids, seg)
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
