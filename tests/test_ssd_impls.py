"""The Pallas SSD kernels (pallas_kernels/ssd) against the float64 loop and the reference.

One test class, parametrized over implementations: "pallas_interpret" (the Triton kernels through
the Pallas interpreter, on CPU) and "pallas" (the same kernels on a GPU; skipped without one).
The reference has its own tests (test_ssd_reference.py). Plus tests that lower the jitted Pallas
path for CUDA on this CPU machine and look for the named kernels, so that a primitive Triton
cannot lower, or a silent fallback to the reference, fails here rather than on the first GPU.

An interpreted forward + backward costs ~10 s of tracing and XLA compilation per shape and
static configuration (its run is milliseconds), so the tests share three compiled cases (CASES)
and vary only data: segment layouts, perturbations and cotangents are arguments of the compiled
function. The cases pin small chunks (16 and 32 tokens) so that a short row crosses several
chunks and several row blocks inside a chunk, and XLA compiles them with its backend
optimisation off (the interpreter's code runs for milliseconds either way).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from jax_packmamba.ops.ssd_scan import ssd_scan, ssd_scan_reference
from pallas_kernels.ssd import SSDConfig, ssd_scan_pallas
from pallas_kernels.ssd.vjp import segment_bounds
from tests.gpu import lower_for_cuda, lowered_ops, on_gpu
from tests.loops import rel_err, ssd_scan_loop

IMPLS = ["pallas_interpret", on_gpu("pallas")]
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@dataclasses.dataclass(frozen=True)
class Case:
    """A compiled configuration: shapes, dtype, which optional inputs exist, the kernel config."""

    batch: int
    length: int
    heads: int
    headdim: int
    groups: int
    d_state: int
    dtype: str
    config: SSDConfig
    num_segments: int  # slots; 0: no segment ids, no initial or final states
    D_shape: str | None = "heads"
    with_z: bool = True
    with_bias: bool = True
    softplus: bool = True
    init: bool = True


CASES = {
    # Everything on, float32: 3 chunks of 32 (the last ragged), two 16-row blocks a chunk, two
    # groups of two heads with the group-summing kernels split over them, 6 slots with
    # initial and final states.
    "f32": Case(
        2,
        75,
        4,
        16,
        2,
        16,
        "float32",
        num_segments=6,
        config=SSDConfig(
            chunk=32, block_l=16, block_s=16, block_k=16, dcb_head_splits=2, dbc_head_splits=2
        ),
    ),
    # bfloat16, a per-channel D, no initial states: 32-row blocks over 16-row tiles, the XLA
    # state passing and a float32 C B^T.
    "bf16": Case(
        2,
        75,
        4,
        16,
        2,
        16,
        "bfloat16",
        num_segments=6,
        D_shape="heads_headdim",
        init=False,
        config=SSDConfig(
            chunk=32, block_l=32, block_s=16, block_k=32, state_passing="xla", cb_dtype="float32"
        ),
    ),
    # The bare op: no segment ids, D, z, bias, softplus or states; one group; chunk 16.
    "bare": Case(
        1,
        40,
        2,
        16,
        1,
        32,
        "float32",
        num_segments=0,
        D_shape=None,
        with_z=False,
        with_bias=False,
        softplus=False,
        init=False,
        config=SSDConfig(chunk=16, block_l=16, block_s=16, block_k=16),
    ),
}


def normal(seed, shape, dtype=jnp.float32, scale=1.0):
    """Host-side random normals (no device compile per shape)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32).astype(dtype)


def make_args(case: Case, seed: int) -> dict:
    b, t, h, p, g, n = (
        case.batch,
        case.length,
        case.heads,
        case.headdim,
        case.groups,
        case.d_state,
    )
    dtype = jnp.dtype(case.dtype)
    s = [seed * 10 + i for i in range(9)]
    dt = normal(s[1], (b, t, h), dtype, 0.5)
    D_dims = {"heads": (h,), "heads_headdim": (h, p), None: None}[case.D_shape]
    return dict(
        x=normal(s[0], (b, t, h, p), dtype),
        dt=dt if case.softplus else jnp.abs(dt),
        A=-jnp.exp(normal(s[2], (h,), scale=0.5)),
        B=normal(s[3], (b, t, g, n), dtype),
        C=normal(s[4], (b, t, g, n), dtype),
        D=None if D_dims is None else normal(s[5], D_dims),
        z=normal(s[6], (b, t, h, p), dtype) if case.with_z else None,
        dt_bias=normal(s[7], (h,), scale=0.3) if case.with_bias else None,
        initial_states=(
            normal(s[8], (b, case.num_segments, h, p, n), scale=0.5) if case.init else None
        ),
    )


def ids_from_lengths(lengths_per_row):
    """(b, t) ids 0, 1, 2, ... numbering consecutive runs of the given lengths."""
    return jnp.asarray(
        np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]), jnp.int32
    )


def cotangents(case: Case, seed: int):
    y = normal(seed, (case.batch, case.length, case.heads, case.headdim), jnp.dtype(case.dtype))
    if not case.num_segments:
        return y
    return y, normal(
        seed + 1, (case.batch, case.num_segments, case.heads, case.headdim, case.d_state)
    )


def _kwargs(case: Case, seg):
    kw = dict(dt_softplus=case.softplus)
    if case.num_segments:
        kw.update(segment_ids=seg, return_final_states=True, num_segments=case.num_segments)
    return kw


def present(args):
    return [k for k in NAMES if args.get(k) is not None]


_COMPILED = {}


def compiled(key, fn, *args):
    """jit(fn) compiled for args once per key. On CPU XLA's backend optimisations are off: the
    programs here (the interpreter's, the float64 loop's) run for milliseconds either way, and
    that halves their compile time."""
    if key not in _COMPILED:
        opts = dict(xla_backend_optimization_level=0) if jax.default_backend() == "cpu" else None
        _COMPILED[key] = jax.jit(fn).lower(*args).compile(compiler_options=opts)
    return _COMPILED[key]


def forward_and_backward(impl: str, case_name: str, names, save_chunk_states: bool = True):
    """(arrays, seg, cts) -> (outputs, gradients of arrays) of the kernels for one of CASES."""
    case = CASES[case_name]

    def run(arrays, seg, cts):
        def f(*xs):
            return ssd_scan_pallas(
                **dict(zip(names, xs)),
                **_kwargs(case, seg),
                interpret=impl == "pallas_interpret",
                config=case.config,
                save_chunk_states=save_chunk_states,
            )

        out, vjp = jax.vjp(f, *arrays)
        return out, vjp(cts)

    return run


def outputs_and_grads(
    impl: str, case_name: str, args: dict, seg, cts, save_chunk_states: bool = True
):
    """(outputs, {name: gradient}) of the kernels for one of CASES, compiled once per case."""
    names = present(args)
    run = forward_and_backward(impl, case_name, names, save_chunk_states)
    arrays = [args[k] for k in names]
    key = (impl, case_name) if save_chunk_states else (impl, case_name, "recompute states")
    out, grads = compiled(key, run, arrays, seg, cts)(arrays, seg, cts)
    return out, dict(zip(names, grads))


def last_states(states, seg, num_segments):
    """(b, s, h, p, n): states (b, t, h, p, n) at each slot's last token, zeros where absent."""
    t = jnp.arange(seg.shape[1])
    is_slot = seg[..., None] == jnp.arange(num_segments)  # (b, t, s)
    last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)  # (b, s)
    picked = jnp.take_along_axis(states, jnp.maximum(last, 0)[..., None, None, None], axis=1)
    return jnp.where((last >= 0)[..., None, None, None], picked, 0.0)


def loop_outputs_and_grads(case_name: str, args: dict, seg, cts):
    """The float64 loop's outputs and gradients on the same (already rounded) inputs."""
    case = CASES[case_name]
    names = present(args)
    with jax.enable_x64(True):

        def run(arrays, seg, cts):
            def f(*xs):
                a = dict(zip(names, xs))
                init = a.pop("initial_states", None)
                y, states = ssd_scan_loop(
                    **a, dt_softplus=case.softplus, segment_ids=seg, initial_states=init
                )
                if not case.num_segments:
                    return y
                return y, last_states(states, seg, case.num_segments)

            out, vjp = jax.vjp(f, *arrays)
            return out, vjp(cts)

        arrays = [jnp.asarray(args[k], jnp.float64) for k in names]
        cts = jax.tree.map(lambda c: jnp.asarray(c, jnp.float64), cts)
        out, grads = compiled(("loop", case_name), run, arrays, seg, cts)(arrays, seg, cts)
        return jax.tree.map(np.asarray, out), dict(zip(names, map(np.asarray, grads)))


def tolerance(case: Case) -> float:
    # float32 lands near 1e-7 (sums of a few hundred terms); bf16 outputs and gradients are
    # rounded to bf16 (~3e-3 relative here), and the matmuls take bf16 operands.
    return 2e-5 if case.dtype == "float32" else 1e-2


def check_against_loop(impl, case_name, seg, seed):
    case = CASES[case_name]
    args = make_args(case, seed)
    cts = cotangents(case, seed + 5)
    out, grads = outputs_and_grads(impl, case_name, args, seg, cts)
    out64, grads64 = loop_outputs_and_grads(case_name, args, seg, cts)
    errs = {}
    for i, (o, o64) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(out64))):
        errs[f"out{i}"] = rel_err(o, o64)
    for name, g in grads.items():
        assert g.shape == args[name].shape and g.dtype == args[name].dtype, name
        errs["d" + name] = rel_err(g, grads64[name])
    print(impl, case_name, {k: f"{v:.1e}" for k, v in errs.items()})
    tol = tolerance(case)
    for name, e in errs.items():
        assert np.isfinite(e) and e < tol, (name, e, tol, errs)
    return args, out, grads


def random_segments(case: Case, seed: int):
    """Random runs, some of length 1, ids reused by several runs of a row (every run of id s
    starts from slot s) and one slot that never occurs."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(case.batch):
        cuts = np.sort(rng.choice(np.arange(1, case.length), size=case.length // 4, replace=False))
        rows.append(
            np.searchsorted(cuts, np.arange(case.length), side="right") % (case.num_segments - 1)
        )
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


class TestSSDImpls:
    def test_matches_float64_loop(self, impl):
        """Everything on, float32: outputs, final states and every gradient (initial states
        included, and through the final states) with random cotangents; runs of length 1."""
        seg = random_segments(CASES["f32"], 1)
        assert np.any(np.diff(np.flatnonzero(np.diff(np.asarray(seg)[0]) != 0)) == 1)
        check_against_loop(impl, "f32", seg, seed=1)

    def test_bf16_matches_float64_loop(self, impl):
        check_against_loop(impl, "bf16", random_segments(CASES["bf16"], 2), seed=2)

    @pytest.mark.parametrize("case_name", ["f32", "bare"])
    def test_recomputed_chunk_states_give_the_saved_gradients(self, impl, case_name):
        """save_chunk_states=False: the backward reruns the chunk-state kernel and the state
        passing for h_in (and, with initial states, keeps their chunk-end terms s_add) instead
        of keeping h_in: the same kernels on the same inputs, so outputs and gradients are
        bit-identical. "f32": initial and final states, segments; "bare": neither."""
        case = CASES[case_name]
        args, cts = make_args(case, 23), cotangents(case, 29)
        seg = random_segments(case, 3) if case.num_segments else None
        saved = outputs_and_grads(impl, case_name, args, seg, cts)
        recomputed = outputs_and_grads(impl, case_name, args, seg, cts, save_chunk_states=False)
        assert case.init == (case_name == "f32")
        for (path, a), b in zip(
            jax.tree.leaves_with_path(saved), jax.tree.leaves(recomputed), strict=True
        ):
            np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))

    def test_bare_matches_float64_loop(self, impl):
        check_against_loop(impl, "bare", None, seed=3)

    def test_boundaries_on_chunk_edges(self, impl):
        # Chunks of 32 and 16-row blocks: boundaries at 32 and 64 on chunk starts, 16 and 48 on
        # block starts, [32, 33) and [74, 75) one token long.
        row0 = np.repeat([0, 1, 2, 3, 4, 5, 1], [16, 16, 1, 15, 16, 10, 1])
        row1 = np.repeat([0, 1, 2], [32, 32, 11])
        check_against_loop(impl, "f32", jnp.asarray(np.stack([row0, row1]), jnp.int32), seed=4)

    def test_final_states_last_run_of_each_id(self, impl):
        # Row 0: id 2 occurs twice (its second run counts), ids 3 and 5 never (zeros); id 0 is
        # one token. Row 1: id 4 for the whole row.
        row0 = [2] * 3 + [1] * 30 + [0] + [2] * 2 + [4] * 38 + [1]
        seg = jnp.asarray([row0, [4] * 75], jnp.int32)
        _, out, _ = check_against_loop(impl, "f32", seg, seed=5)
        final = np.asarray(out[1])
        assert final.shape == (2, 6, 4, 16, 16) and final.dtype == np.float32
        assert np.all(final[0, [3, 5]] == 0) and np.all(final[1, :4] == 0)
        assert np.all(final[1, 5] == 0) and np.all(final[0, 0] != 0)

    def test_matches_reference(self, impl):
        """The same case against the chunked XLA reference in float32 (other chunking, other
        summation order: float32 rounding apart)."""
        case = CASES["f32"]
        args, seg = make_args(case, 6), random_segments(case, 6)
        cts = cotangents(case, 11)
        out, grads = outputs_and_grads(impl, "f32", args, seg, cts)
        names = present(args)

        def ref(arrays, seg, cts):
            out, vjp = jax.vjp(
                lambda *xs: ssd_scan_reference(
                    **dict(zip(names, xs)), **_kwargs(case, seg), chunk_size=64
                ),
                *arrays,
            )
            return out, vjp(cts)

        arrays = [args[k] for k in names]
        # The reference at IEEE float32: XLA's default on a GPU is TF32 (~1e-3 relative), which
        # would measure the reference's rounding rather than the kernels'.
        with jax.default_matmul_precision("highest"):
            out_r, grads_r = compiled(("reference", "f32"), ref, arrays, seg, cts)(arrays, seg, cts)
        grads_r = dict(zip(names, grads_r))
        for o, o_r in zip(out, out_r):
            assert rel_err(o, o_r) < 1e-5
        for name in names:
            assert rel_err(grads[name], grads_r[name]) < 2e-5, name

    def test_segments_are_bitwise_isolated(self, impl):
        """Perturbing one segment's inputs (and its initial state) changes no bit of any other
        segment's outputs, per-token gradients or final states, nor of the other slots'
        initial-state gradients."""
        case = CASES["f32"]
        seg = ids_from_lengths([[16, 1, 23, 10, 25], [5, 35, 1, 9, 25]])
        args = make_args(case, 7)
        cts = cotangents(case, 8)
        out0, g0 = outputs_and_grads(impl, "f32", args, seg, cts)
        victim = np.asarray(seg) == 2  # id 2: 23 tokens in row 0, one token in row 1
        noise = normal(9, args["x"].shape)
        v2, v3, v4 = victim[..., None], victim[..., None, None], victim[..., None, None]
        perturbed = dict(
            args,
            x=jnp.where(v4, args["x"] + noise, args["x"]),
            z=jnp.where(v4, args["z"] - noise, args["z"]),
            dt=jnp.where(v2, args["dt"] + noise[..., 0], args["dt"]),
            B=jnp.where(v3, args["B"] * 1.5 + 0.1, args["B"]),
            C=jnp.where(v3, args["C"] * 1.5 + 0.1, args["C"]),
        )
        perturbed["initial_states"] = args["initial_states"].at[:, 2].add(1.0)
        out1, g1 = outputs_and_grads(impl, "f32", perturbed, seg, cts)
        keep = ~victim
        y0, y1 = np.asarray(out0[0]), np.asarray(out1[0])
        assert not np.array_equal(y0[victim], y1[victim])
        np.testing.assert_array_equal(y0[keep], y1[keep])
        for name in ("x", "dt", "z", "B", "C"):
            np.testing.assert_array_equal(
                np.asarray(g0[name])[keep], np.asarray(g1[name])[keep], err_msg=name
            )
        others = [s for s in range(case.num_segments) if s != 2]
        np.testing.assert_array_equal(
            np.asarray(out0[1])[:, others], np.asarray(out1[1])[:, others]
        )
        np.testing.assert_array_equal(
            np.asarray(g0["initial_states"])[:, others], np.asarray(g1["initial_states"])[:, others]
        )


def _gpu_param(*values, id):
    return pytest.param(*values, marks=on_gpu(None).marks, id=id)


# The tiling pick_config chooses (no pinned config) at a ragged length, two groups, random runs
# with ids reused along a row, initial and final states. On a GPU also at the sizes where the
# heuristic's head splits and a 256-token chunk are in play (1000 tokens, 8 heads of 64).
@pytest.mark.parametrize(
    "impl,shape,dtype,chunk,num_segments",
    [
        pytest.param("pallas_interpret", (2, 70, 4, 16, 2, 16), "float32", 32, 6, id="interpret"),
        # bf16: the states' per-token contractions run in bf16 with float32 sums, as the kernels.
        pytest.param(
            "pallas_interpret", (2, 70, 4, 16, 2, 16), "bfloat16", 32, 6, id="interpret-bf16"
        ),
        _gpu_param("pallas", (2, 1000, 8, 64, 2, 128), "float32", 256, 6, id="gpu-f32"),
        _gpu_param("pallas", (2, 1000, 8, 64, 2, 128), "bfloat16", 256, 6, id="gpu-bf16"),
        _gpu_param("pallas", (1, 777, 8, 64, 1, 128), "bfloat16", 256, 0, id="gpu-bf16-noseg"),
    ],
)
def test_default_config_matches_float64_reference(impl, shape, dtype, chunk, num_segments):
    case = Case(*shape, dtype, config=None, num_segments=num_segments, init=bool(num_segments))
    args, cts = make_args(case, 17), cotangents(case, 19)
    seg = random_segments(case, 5) if num_segments else None
    names = present(args)
    kw = dict(_kwargs(case, seg), chunk_size=chunk)

    def run(fn, arrays, cts):
        out, vjp = jax.vjp(lambda *xs: fn(**dict(zip(names, xs)), **kw), *arrays)
        return out, vjp(cts)

    ours = functools.partial(
        run, functools.partial(ssd_scan_pallas, interpret=impl == "pallas_interpret")
    )
    arrays = [args[k] for k in names]
    out, grads = compiled(("default", impl, shape, dtype), ours, arrays, cts)(arrays, cts)
    with jax.enable_x64(True):
        a64 = [jnp.asarray(a, jnp.float64) for a in arrays]
        c64 = jax.tree.map(lambda c: jnp.asarray(c, jnp.float64), cts)
        ref = functools.partial(run, ssd_scan_reference)
        out64, grads64 = compiled(("default64", shape), ref, a64, c64)(a64, c64)
    errs = {
        f"out{i}": rel_err(o, o64)
        for i, (o, o64) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(out64)))
    }
    errs.update({"d" + k: rel_err(g, g64) for k, g, g64 in zip(names, grads, grads64)})
    print(impl, shape, dtype, {k: f"{v:.1e}" for k, v in errs.items()})
    # bf16 inputs are rounded before both runs; what is left is the rounding of the matmul
    # operands, outputs and gradients to bf16, over up to 256-token chunks.
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert all(np.isfinite(v) and v < tol for v in errs.values()), (tol, errs)


def scatter_adds_and_atomics(jaxpr) -> list[str]:
    """Names of the scatter-add and atomic primitives anywhere in a jaxpr (kernel bodies and
    other nested jaxprs included)."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name.startswith("scatter-add") or name.startswith("scatter_add") or "atomic" in name:
            found.append(f"{name} {[str(v.aval) for v in eqn.invars]}")
        for sub in jaxprs_in_params(eqn.params):
            found += scatter_adds_and_atomics(sub)
    return found


@pytest.mark.parametrize("impl", ["pallas_interpret", "reference"])
@pytest.mark.parametrize("case_name", ["f32", "bf16"])
def test_no_scatter_add_in_forward_and_backward(case_name, impl):
    """Bitwise isolation on a GPU needs sums in a fixed order. XLA lowers a scatter-add (the
    gradient of a gather or of .at[].add) to atomic adds on a GPU, whose order changes from run
    to run, so the isolation test can fail there while passing through the interpreter on CPU.
    This checks the structure instead: the whole forward + backward (initial and final states,
    segment ids, head splits) holds no scatter-add and no atomic, in the kernels' path and in
    the reference's (which "auto" runs on a GPU for shapes the kernels do not take)."""
    case = CASES[case_name]
    args = make_args(case, 0)
    names = present(args)
    if impl == "reference":

        def run(arrays, seg, cts):
            def f(*xs):
                # The case's chunk, so that the final states are picked among several chunks.
                return ssd_scan_reference(
                    **dict(zip(names, xs)), **_kwargs(case, seg), chunk_size=case.config.chunk
                )

            out, vjp = jax.vjp(f, *arrays)
            return out, vjp(cts)
    else:
        run = forward_and_backward(impl, case_name, names)
    jaxpr = jax.make_jaxpr(run)(
        [args[k] for k in names], random_segments(case, 0), cotangents(case, 1)
    )
    assert scatter_adds_and_atomics(jaxpr.jaxpr) == []


def test_segment_bounds():
    """seg_lo / seg_hi against a direct reading of the runs: chunks of 4, a run crossing two
    chunk edges, one-token runs, a boundary on a chunk edge and the padding."""
    seg = jnp.asarray([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 3]], jnp.int32)
    lo, hi = segment_bounds(seg, 4, 16)
    np.testing.assert_array_equal(lo[0], [0, 0, 0, 0, -1, -1, -1, -1, -1, -1, 2, 3, -1, 1, 1, 1])
    np.testing.assert_array_equal(hi[0], [3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 2, 3, 0, 3, 3, 3])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="block_l=48"):
        SSDConfig(block_l=48)
    with pytest.raises(ValueError, match="block_l=16 must be a multiple of block_s=32"):
        SSDConfig(block_l=16, block_s=32)
    with pytest.raises(ValueError, match="state_passing"):
        SSDConfig(state_passing="scan")
    args = make_args(dataclasses.replace(CASES["bare"], headdim=24), 0)
    with pytest.raises(ValueError, match="headdim=24"):
        ssd_scan_pallas(**{k: v for k, v in args.items() if v is not None})


TRITON_CALL = "__gpu$xla.gpu.triton"
FORWARD = (
    "ssd_chunk_cumsum",
    "ssd_chunk_cb",
    "ssd_chunk_states",
    "ssd_state_passing",
    "ssd_chunk_scan",
)
# The backward recomputes the cumulative decays and C B^T, then runs its own seven.
BACKWARD = (
    "ssd_chunk_cumsum",
    "ssd_chunk_cb",
    "ssd_bwd_chunk_dstates",
    "ssd_bwd_state_passing",
    "ssd_bwd_dx",
    "ssd_bwd_dcb",
    "ssd_bwd_dc",
    "ssd_bwd_db",
    "ssd_bwd_chunk_cumsum",
)


def lowering_args(b=2, length=300, h=8, p=64, g=2, n=128, dtype=jnp.bfloat16):
    """Abstract (x, dt, A, B, C, D, z, dt_bias, segment_ids), bf16 rows, f32 parameters."""
    f32, sds = jnp.float32, jax.ShapeDtypeStruct
    return [
        sds((b, length, h, p), dtype),
        sds((b, length, h), dtype),
        sds((h,), f32),
        sds((b, length, g, n), dtype),
        sds((b, length, g, n), dtype),
        sds((h,), f32),
        sds((b, length, h, p), dtype),
        sds((h,), f32),
        sds((b, length), jnp.int32),
    ]


@pytest.mark.parametrize(
    "segments, save_chunk_states", [(False, True), (True, True), (True, False)]
)
def test_training_path_lowers_for_cuda_on_kernels_only(segments, save_chunk_states):
    """The training path (no initial or final states), forward and backward, through the public
    op: the named kernels and nothing of the reference (its einsums would be dot_generals, its
    scans while loops). Without saved chunk states the backward runs the forward's chunk-state
    kernel and state passing again."""
    args = lowering_args()

    def loss(*xs):
        *xs, seg = xs
        y = ssd_scan(
            *xs,
            dt_softplus=True,
            segment_ids=seg if segments else None,
            impl="pallas",
            save_chunk_states=save_chunk_states,
        )
        return y.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8))), *args)
    names = re.findall(r'name = "(ssd_[a-z_]+)"', text)
    again = () if save_chunk_states else ("ssd_chunk_states", "ssd_state_passing")
    assert sorted(names) == sorted(FORWARD + BACKWARD + again), names
    assert text.count(TRITON_CALL) == len(FORWARD) + len(BACKWARD) + len(again)
    assert "stablehlo.while" not in text and "stablehlo.dot_general" not in text
    assert "stablehlo.scatter" not in text


def test_states_path_lowers_for_cuda():
    """Initial and final states (their XLA glue around the same kernels), a per-channel D,
    float32 inputs (IEEE matmuls), the XLA state passing and float32 C B^T."""
    b, length, h, p, g, n = 1, 100, 4, 16, 1, 32
    args = lowering_args(b, length, h, p, g, n, jnp.float32)
    args[5] = jax.ShapeDtypeStruct((h, p), jnp.float32)
    init = jax.ShapeDtypeStruct((b, 3, h, p, n), jnp.float32)
    config = SSDConfig(chunk=64, block_l=32, block_s=16, state_passing="xla", cb_dtype="float32")

    def loss(*xs):
        *xs, seg, h0 = xs
        y, final = ssd_scan_pallas(
            *xs,
            dt_softplus=True,
            segment_ids=seg,
            initial_states=h0,
            return_final_states=True,
            config=config,
        )
        return y.sum() + final.sum()

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8)) + (9,)), *args, init)
    names = re.findall(r'name = "(ssd_[a-z_]+)"', text)
    expected = [k for k in FORWARD + BACKWARD if "state_passing" not in k]
    assert sorted(names) == sorted(expected), names
    # The states glue's gathers and .at[].add would be scatters: atomic adds on a GPU.
    assert "stablehlo.scatter" not in text


def big_xla_ops(text, min_size):
    """{(op, shape)} of the lowered program's XLA ops outside the kernels (reshapes and
    sharding annotations aside, which move nothing) with a result of more than min_size
    elements."""
    return {
        (op, shape)
        for op, shapes in lowered_ops(text)
        if op.startswith("stablehlo.") and op not in ("stablehlo.custom_call", "stablehlo.reshape")
        for shape in shapes
        if np.prod(shape) > min_size
    }


def test_linked_rows_lower_for_cuda_on_the_training_kernels():
    """Rows linked by `continues` with a carried first-run start and each row's end state out
    (link_across_steps' step), forward and backward: the training path's kernels once each, no
    scatter (atomic adds on a GPU), and no XLA pass over a state- or token-sized array that
    unlinked rows do not make (the row scale, the start and the ends are applied inside the
    state passing: pallas_kernels/ssd/DESIGN.md)."""
    args = lowering_args()
    b, _, h, p = args[0].shape
    n = args[3].shape[3]
    start = jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)
    links = jax.ShapeDtypeStruct((b,), jnp.bool_)

    def loss(*xs, linked=True):
        *xs, seg, continues, first = xs
        if not linked:
            y = ssd_scan(*xs, dt_softplus=True, segment_ids=seg, impl="pallas")
            return y.astype(jnp.float32).sum()
        y, ends = ssd_scan(
            *xs,
            dt_softplus=True,
            segment_ids=seg,
            continues=continues,
            first_run_states=first,
            return_row_end_states=True,
            impl="pallas",
        )
        return y.astype(jnp.float32).sum() + ends.sum()

    argnums = tuple(range(8)) + (10,)
    text = lower_for_cuda(jax.grad(loss, argnums=argnums), *args, links, start)
    names = re.findall(r'name = "(ssd_[a-z_]+)"', text)
    assert sorted(names) == sorted(FORWARD + BACKWARD), names
    assert "stablehlo.scatter" not in text
    unlinked = functools.partial(loss, linked=False)
    plain = lower_for_cuda(jax.grad(unlinked, argnums=argnums), *args, links, start)
    # Larger than the start itself (one state per row): per chunk or per token.
    added = big_xla_ops(text, b * h * p * n) - big_xla_ops(plain, b * h * p * n)
    assert not added, added


@pytest.mark.parametrize("state_passing", ["pallas", "xla"])
@pytest.mark.parametrize("linked", [True, False])
def test_state_passing_with_starts_and_ends_against_a_float64_loop(state_passing, linked):
    """The chunk-state passing (vjp._pass_states and its backward) with a start state added
    before each row's first chunk and each row's end state read out, against a float64 loop
    over rows x chunks: linked, a row's end passes into the next row only where that one
    continues; forward and reverse (a cotangent on the ends too), with the kernel
    (interpreted) and with XLA's scan."""
    from pallas_kernels.ssd import vjp

    b, c, h, p, n = 3, 4, 2, 4, 8
    plan = vjp.make_plan(
        jnp.zeros((b, c * 16, h, p), jnp.float32),
        jnp.zeros((b, c * 16, 1, n), jnp.float32),
        None,
        dt_softplus=False,
        chunk_size=16,
        has_init=False,
        return_states=False,
        interpret=True,
        config=SSDConfig(
            chunk=16, block_l=16, block_s=16, block_state=16, state_passing=state_passing
        ),
    )
    rng = np.random.default_rng(7)
    S, dh = rng.standard_normal((2, b, c, h, p * n)).astype(np.float32)
    start, d_end = rng.standard_normal((2, b, h, p * n)).astype(np.float32)
    decay = rng.uniform(0.5, 1.0, (b, h, c)).astype(np.float32)
    # Linked: row 1 continues row 0, row 2 starts anew.
    into_next = jnp.asarray([1.0, 0.0, 0.0]) if linked else None
    S_, decay_ = jnp.asarray(S), jnp.asarray(decay)
    h_in, end = vjp._pass_states(plan, True, S_, decay_, None, into_next, start, True)
    dS, ddecay, dstart = vjp._pass_states_bwd(
        plan, True, jnp.asarray(dh), h_in, decay_, into_next, True, jnp.asarray(d_end)
    )

    # The loop: one sequence of b * c chunks; the step out of a row's last chunk is cut unless
    # the next row continues, and each row's first chunk adds its start.
    f64 = lambda a: a.astype(np.float64).reshape(b * c, *a.shape[2:])  # noqa: E731
    a = np.swapaxes(decay, 1, 2).astype(np.float64).reshape(b * c, h)
    keep = np.ones(b * c)
    keep[c - 1 :: c] = [1.0, 0.0, 0.0] if linked else 0.0
    want_h, want_end = np.zeros((b * c, h, p * n)), np.zeros((b, h, p * n))
    for k in range(b * c):
        if k % c == 0:
            want_h[k] += start[k // c]
        new = a[k, :, None] * want_h[k] + f64(S)[k]
        if k % c == c - 1:
            want_end[k // c] = new
        if k + 1 < b * c:
            want_h[k + 1] = keep[k] * new
    G = np.zeros((h, p * n))  # the gradient reaching h_in[k + 1]
    want_dS, want_dd = np.zeros((b * c, h, p * n)), np.zeros((b * c, h))
    want_dstart = np.zeros((b, h, p * n))
    for k in reversed(range(b * c)):
        G = keep[k] * G + (d_end[k // c] if k % c == c - 1 else 0.0)
        want_dS[k] = G
        want_dd[k] = np.sum(G * want_h[k], axis=-1)
        G = f64(dh)[k] + a[k, :, None] * G
        if k % c == 0:
            want_dstart[k // c] = G
    assert rel_err(h_in, want_h.reshape(S.shape)) < 1e-6
    assert rel_err(end, want_end) < 1e-6
    assert rel_err(dS, want_dS.reshape(S.shape)) < 1e-6
    assert rel_err(ddecay, np.swapaxes(want_dd.reshape(b, c, h), 1, 2)) < 1e-6
    assert rel_err(dstart, want_dstart) < 1e-6
