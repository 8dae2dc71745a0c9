"""Every selective-scan implementation against a float64 run of the reference.

One test class, parametrized over implementations: "reference" (pure JAX), "pallas_interpret"
(the Triton kernels through the Pallas interpreter, on CPU) and "pallas" (the same kernels on a
GPU; skipped without one). Plus tests that lower the jitted Pallas path for CUDA on this CPU
machine and look for the named kernels, so a primitive Triton cannot lower, or a silent
fallback to the reference, fails here rather than on the first GPU.

Interpreter runs compile every kernel once per shape and config (~10 s each on a CI core), so
the shapes are few and small, and tests that need chunk edges pin a small ScanConfig.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops.selective_scan import selective_scan, selective_scan_reference
from pallas_kernels.selective_scan import ScanConfig, selective_scan_pallas
from tests.compiled import compiled
from tests.gpu import lower_for_cuda, on_gpu
from tests.loops import rel_err

IMPLS = [
    "reference",
    "pallas_interpret",
    on_gpu("pallas"),
]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Small chunks, so that a short row crosses several chunk and checkpoint edges.
EDGE_CONFIG = ScanConfig(block_d=32, bwd_block_d=32, chunk=16, ckpt=8, window=4, unroll=4)


def host_normal(seed, shape, scale=1.0, dtype=jnp.float32):
    """Normals drawn on the host (no device compile per shape, as eager jax.random has)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(np.asarray(x, np.float32).astype(dtype))


def make_args(seed, batch, length, d_inner, d_state, dtype, *, optional=True):
    s = [1000 * seed + i for i in range(8)]
    rows, channels = (batch, length, d_inner), (d_inner,)
    args = dict(
        u=host_normal(s[0], rows, dtype=dtype),
        delta=host_normal(s[1], rows, 0.5, dtype),
        A=-jnp.asarray(np.exp(np.asarray(host_normal(s[2], (d_inner, d_state), 0.5)))),
        B=host_normal(s[3], (batch, length, d_state), dtype=dtype),
        C=host_normal(s[4], (batch, length, d_state), dtype=dtype),
        D=host_normal(s[5], channels) if optional else None,
        z=host_normal(s[6], rows, dtype=dtype) if optional else None,
        delta_bias=host_normal(s[7], channels, 0.3) if optional else None,
    )
    return args


def segments_from_lengths(lengths_per_row):
    """(b, t) ids 0, 1, 2, ... numbering consecutive runs of the given lengths."""
    rows = [np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]
    return jnp.asarray(np.stack(rows), jnp.int32)


def run(impl, args, *, config=None, **kw):
    if impl != "reference" and config is not None:
        return selective_scan_pallas(
            *args.values(), interpret=impl == "pallas_interpret", config=config, **kw
        )
    return selective_scan(*args.values(), impl=impl, **kw)


def tolerance(dtype, length):
    # f32 lands near 1e-7; bf16 outputs and gradients are rounded to bf16 (~2e-3 relative).
    # Both grow slowly with the number of accumulated steps.
    base = 2e-5 if dtype == jnp.float32 else 1.5e-2
    return base * max(1.0, np.sqrt(length / 1000))


def outputs_and_grads(impl, args, cts, *, config=None, segment_ids=None, **kw):
    """(outputs, gradients of the present (not None) inputs under the cotangents cts) of impl,
    compiled once per impl, config, static flags and shapes: tests that vary only data
    (segment layouts, perturbations, cotangents) share one program."""
    present = [k for k in NAMES if args[k] is not None]

    def fn(xs, seg, cts):
        def f(*xs):
            full = {**dict.fromkeys(NAMES), **dict(zip(present, xs))}
            return run(impl, full, config=config, segment_ids=seg, **kw)

        out, vjp = jax.vjp(f, *xs)
        return out, vjp(cts)

    key = ("scan", impl, config, tuple(present), tuple(sorted(kw.items())))
    xs = [args[k] for k in present]
    return compiled(key, fn, xs, segment_ids, cts)(xs, segment_ids, cts)


def float64_outputs_and_grads(args, cts, *, segment_ids=None, **kw):
    """The reference's outputs and gradients in float64 on the same (already rounded) inputs."""
    present = [k for k in NAMES if args[k] is not None]

    def fn(xs, seg, cts):
        def f(*xs):
            full = {**dict.fromkeys(NAMES), **dict(zip(present, xs))}
            return selective_scan_reference(*[full[n] for n in NAMES], segment_ids=seg, **kw)

        out, vjp = jax.vjp(f, *xs)
        return out, vjp(cts)

    with jax.enable_x64(True):
        xs = [np.asarray(args[k], np.float64) for k in present]
        cts = jax.tree.map(lambda c: np.asarray(c, np.float64), cts)
        key = ("float64", tuple(present), tuple(sorted(kw.items())))
        out, grads = compiled(key, fn, xs, segment_ids, cts)(xs, segment_ids, cts)
        return jax.tree.map(np.asarray, (out, grads))


def random_cotangents(args, seed, *, return_final_states=False, num_segments=None, **_):
    """Random normal cotangents of y and, with final states, of them."""
    u = args["u"]
    y = host_normal(seed, u.shape, dtype=u.dtype)
    if not return_final_states:
        return y
    batch, _, d_inner = u.shape
    final = (batch, num_segments or 1, d_inner, args["A"].shape[1])
    return y, host_normal(seed + 1, final)


_FLOAT64_CACHE = {}


def check_against_float64(impl, args, *, case, config=None, cotangent_key=1, **kw):
    """Outputs and every input's gradient (random cotangent through jax.vjp) against the
    reference run in float64 on the same (already rounded) inputs. `case` names the inputs,
    so the float64 run is shared by all implementations."""
    cts = random_cotangents(args, cotangent_key, **kw)
    out, grads = outputs_and_grads(impl, args, cts, config=config, **kw)
    if case not in _FLOAT64_CACHE:
        _FLOAT64_CACHE[case] = float64_outputs_and_grads(args, cts, **kw)
    out64, grads64 = _FLOAT64_CACHE[case]
    present = {k: v for k, v in args.items() if v is not None}
    length = args["u"].shape[1]
    errs = {}
    for i, (o, o64) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(out64))):
        errs[f"out{i}"] = rel_err(o, o64)
    for name, g, g64 in zip(present, grads, grads64):
        assert g.shape == present[name].shape and g.dtype == present[name].dtype, name
        errs["d" + name] = rel_err(g, g64)
    print(impl, {k: f"{v:.2e}" for k, v in errs.items()})
    tol = tolerance(args["u"].dtype, length)
    for name, e in errs.items():
        assert np.isfinite(e) and e < tol, (name, e, tol, errs)
    return out, grads


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


# The tests that pin EDGE_CONFIG share one shape and static flags, so the interpreter compiles
# their kernels once.
EDGE_SHAPE = (2, 50, 40, 4)
EDGE_SEGMENTS = 6


def edge_kw(seg):
    return dict(
        delta_softplus=True, segment_ids=seg, return_final_states=True, num_segments=EDGE_SEGMENTS
    )


class TestSelectiveScanImpls:
    @pytest.mark.parametrize(
        "length, dtype, seg_lengths",
        [
            (1, jnp.float32, None),
            (17, jnp.bfloat16, [[1, 1, 5, 1, 9], [3, 14]]),  # segments of length 1
            # The default 128-step chunks: a run of 1 ending on the chunk edge 128, a ragged
            # last chunk (300 = 2 * 128 + 44), the row's last token alone.
            (300, jnp.float32, [[1, 126, 1, 100, 72], [299, 1]]),
        ],
    )
    def test_matches_float64(self, impl, length, dtype, seg_lengths):
        args = make_args(length, 2, length, 40, 4, dtype)
        kw = dict(delta_softplus=True)
        if seg_lengths is not None:
            kw.update(
                segment_ids=segments_from_lengths(seg_lengths),
                return_final_states=True,
                num_segments=max(map(len, seg_lengths)),
            )
        check_against_float64(impl, args, case=f"float64-{length}", **kw)

    def test_optional_inputs_absent(self, impl):
        # No D, z or delta_bias, no softplus, d_inner spanning three channel blocks.
        args = make_args(5, 1, 45, 80, 4, jnp.float32, optional=False)
        args["delta"] = jnp.abs(args["delta"])
        check_against_float64(impl, args, case="optional", config=EDGE_CONFIG)

    def test_boundaries_on_chunk_edges(self, impl):
        # EDGE_CONFIG has 16-step chunks and 8-step checkpoints: boundaries at 16 and 32 land
        # on chunk starts, 24 and 40 on checkpoints, and [32, 33) is one token long.
        seg = segments_from_lengths([[16, 8, 8, 1, 7, 10], [16, 16, 16, 2]])
        args = make_args(7, *EDGE_SHAPE, jnp.float32)
        check_against_float64(impl, args, case="edges", config=EDGE_CONFIG, **edge_kw(seg))

    def test_final_states_last_run_of_each_id(self, impl):
        # Row 0: id 2 occurs twice (its second run counts), id 3 never (zeros), id 0 is one
        # token. Row 1: a single id (5) for the whole row.
        row0 = [2] * 3 + [1] * 2 + [0] + [2] * 2 + [4] * 41 + [1]
        seg = jnp.asarray([row0, [5] * 50], jnp.int32)
        args = make_args(9, *EDGE_SHAPE, jnp.float32)
        out, _ = check_against_float64(impl, args, case="final", config=EDGE_CONFIG, **edge_kw(seg))
        final = np.asarray(out[1])
        assert final.shape == (2, EDGE_SEGMENTS, 40, 4) and final.dtype == np.float32
        assert np.all(final[0, 3] == 0) and np.all(final[0, 5] == 0) and np.all(final[1, :5] == 0)

    @pytest.mark.parametrize("state_split", [1, 2])
    def test_segments_are_bitwise_isolated(self, impl, state_split):
        """Perturbing one segment's inputs changes no bit of any other segment's outputs,
        per-token gradients or final states."""
        if impl == "reference" and state_split > 1:
            pytest.skip("state_split is a Pallas kernel layout")
        seg = segments_from_lengths([[16, 1, 23, 10], [5, 35, 1, 9]])
        args = make_args(11, *EDGE_SHAPE, jnp.float32)
        config = (
            dataclasses.replace(EDGE_CONFIG, state_split=state_split)
            if impl != "reference"
            else None
        )
        ct_y = host_normal(12, args["u"].shape)
        ct_f = host_normal(13, (2, EDGE_SEGMENTS, 40, 4))

        def outputs_and_grads_of(a):
            out, grads = outputs_and_grads(impl, a, (ct_y, ct_f), config=config, **edge_kw(seg))
            return out, dict(zip(NAMES, grads))

        out0, g0 = outputs_and_grads_of(args)
        victim = np.asarray(seg) == 2  # id 2: 23 tokens in row 0, one token in row 1
        noise = host_normal(14, args["u"].shape)
        perturbed = dict(args)
        for name in ("u", "delta", "z"):
            perturbed[name] = jnp.where(victim[..., None], args[name] + noise, args[name])
        for name in ("B", "C"):
            perturbed[name] = jnp.where(victim[..., None], args[name] * 1.5 + 0.1, args[name])
        out1, g1 = outputs_and_grads_of(perturbed)
        keep = ~victim
        assert not np.array_equal(np.asarray(out0[0])[victim], np.asarray(out1[0])[victim])
        np.testing.assert_array_equal(np.asarray(out0[0])[keep], np.asarray(out1[0])[keep])
        for name in ("u", "delta", "z", "B", "C"):
            np.testing.assert_array_equal(
                np.asarray(g0[name])[keep], np.asarray(g1[name])[keep], err_msg=name
            )
        others = [s for s in range(EDGE_SEGMENTS) if s != 2]
        np.testing.assert_array_equal(
            np.asarray(out0[1])[:, others], np.asarray(out1[1])[:, others]
        )


@pytest.mark.parametrize("state_split", [2, 4])
@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_state_split_matches_float64(impl, state_split):
    """The gradient kernel with each channel's states split over 2 or 4 lanes
    (ScanConfig.state_split): chunk and checkpoint edges, one-token segments, final states, and
    40 channels, which leave the last 16-channel block partly empty."""
    seg = segments_from_lengths([[16, 8, 8, 1, 7, 10], [16, 16, 16, 2]])
    args = make_args(7, *EDGE_SHAPE, jnp.float32)
    config = dataclasses.replace(EDGE_CONFIG, state_split=state_split)
    check_against_float64(impl, args, case="edges", config=config, **edge_kw(seg))


@pytest.mark.parametrize("reduce", ["xor", "shfl"])
@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_reduce_modes_match_float64(impl, reduce):
    """Both butterflies for the dB/dC channel sums at d_state 16, the models' size, where every
    lane of the warp ends with a sum of its own (at d_state 4 above several lanes share one),
    with chunk and checkpoint edges, one-token segments and a partly empty channel block (24
    channels: 16 + 8). Windows of 2 steps and no unrolling: the kernel's body repeats its
    per-state code for every step of a window and of an unrolled iteration, and at d_state 16
    that took the interpreter ~30 s to compile per mode; 4-step windows and unrolling are
    covered at d_state 4 above (the butterfly is the same in every step)."""
    seg = segments_from_lengths([[16, 8, 8, 1, 7, 10], [16, 16, 16, 2]])
    args = make_args(8, 2, 50, 24, 16, jnp.float32)
    config = dataclasses.replace(EDGE_CONFIG, reduce=reduce, window=2, unroll=1)
    check_against_float64(impl, args, case="edges16", config=config, **edge_kw(seg))


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_without_window_rows_matches_float64(impl):
    """ScanConfig(window_rows=False) (the reverse steps load a window's delta and u rows again
    instead of reusing the advance's; the default before it was timed) on
    test_boundaries_on_chunk_edges' inputs (d_state 4: the rows' reuse does not depend on it,
    and d_state 16 took the interpreter ~4x as long to compile). Not bitwise equal to the
    default in the interpreter: XLA fuses the reused values differently (dA differs by ~6e-5
    relative)."""
    seg = segments_from_lengths([[16, 8, 8, 1, 7, 10], [16, 16, 16, 2]])
    args = make_args(7, *EDGE_SHAPE, jnp.float32)
    config = dataclasses.replace(EDGE_CONFIG, window_rows=False)
    check_against_float64(impl, args, case="edges", config=config, **edge_kw(seg))


@pytest.mark.parametrize("ns", [1, 4, 16])
def test_xor_transpose_sums_against_numpy(ns):
    """xor_transpose_sums on its own (the interpreter's shuffles): lane i's k-th term belongs to
    state k ^ (i % ns); lane i gets dC at state i % ns summed over all 32 lanes if i < 16, else
    dB."""
    from pallas_kernels.selective_scan.kernel_bwd import xor_transpose_sums

    rng = np.random.default_rng(ns)
    terms_c, terms_b = rng.normal(size=(2, 32, ns)).astype(np.float32)
    lane = np.arange(32)
    dc = [jnp.asarray(terms_c[lane, (lane % ns) ^ k]) for k in range(ns)]
    db = [jnp.asarray(terms_b[lane, (lane % ns) ^ k]) for k in range(ns)]
    got = np.asarray(xor_transpose_sums(dc, db, fast=False))
    want = np.where(
        lane < 16,
        terms_c.sum(0, dtype=np.float64)[lane % ns],
        terms_b.sum(0, dtype=np.float64)[lane % ns],
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reduce_mode_fallbacks():
    from pallas_kernels.selective_scan.kernel import Static
    from pallas_kernels.selective_scan.vjp import _reduce_mode

    def mode(d_state=16, block_d=32, **cfg):
        st = Static(
            length=64,
            d_inner=64,
            d_state=d_state,
            block_d=block_d,
            chunk=16,
            unroll=4,
            delta_softplus=True,
            prefetch=True,
            fast=False,
        )
        return _reduce_mode(ScanConfig(**cfg), st)

    assert mode() == "xor"
    assert mode(d_state=12) == "shfl"  # xor needs a power of two
    assert mode(state_split=2) == "shfl"  # the split layouts have their own butterfly
    assert mode(d_state=32) == "tree"  # 2 * d_state sums do not fit one warp's lanes
    assert mode(block_d=64) == "tree"
    assert mode(reduce="shfl") == "shfl"


TRITON_CALL = "__gpu$xla.gpu.triton"
KERNELS = (
    "selective_scan_fwd_chunk_states",
    "selective_scan_fwd_chunk_outputs",
    "selective_scan_bwd_chunk_dstates",
    "selective_scan_bwd_chunk_grads",
)


def lowering_args(b=2, length=300, d=80, n=16):
    """Abstract scan arguments (u, delta, A, B, C, D, z, delta_bias, segment_ids), bf16 rows."""
    bf, f32, sds = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
    return [
        sds((b, length, d), bf),
        sds((b, length, d), bf),
        sds((d, n), f32),
        sds((b, length, n), bf),
        sds((b, length, n), bf),
        sds((d,), f32),
        sds((b, length, d), bf),
        sds((d,), f32),
        sds((b, length), jnp.int32),
    ]


@pytest.mark.parametrize("segments", [False, True])
def test_pallas_lowers_for_cuda_with_named_kernels(segments):
    args, f32 = lowering_args(), jnp.float32

    def loss(*xs):
        *xs, seg = xs
        kw = dict(segment_ids=seg, num_segments=4) if segments else {}
        y, final = selective_scan(
            *xs, delta_softplus=True, return_final_states=True, impl="pallas", **kw
        )
        return y.astype(f32).sum() + final.sum()

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8))), *args)
    names = re.findall(r'name = "(selective_scan_[a-z_]+)"', text)
    assert sorted(names) == sorted(KERNELS), names
    assert text.count(TRITON_CALL) == len(KERNELS)
    # The reference's chunked scan would show up as an XLA while loop over chunks.
    assert "stablehlo.while" not in text
    # The default dB/dC butterfly is the xor one: shuffles, and not the PTX block with selects.
    assert "shfl.sync.bfly.b32 $0, $1, 8, 31, -1" in text
    assert "selp.f32 s" not in text


@pytest.mark.parametrize("state_split", [2, 4])
def test_state_split_lowers_for_cuda(state_split):
    args, f32 = lowering_args(), jnp.float32
    config = dataclasses.replace(EDGE_CONFIG, chunk=64, state_split=state_split, grads_maxnreg=168)

    def loss(*xs):
        *xs, seg = xs
        y, final = selective_scan_pallas(
            *xs,
            delta_softplus=True,
            return_final_states=True,
            segment_ids=seg,
            num_segments=4,
            config=config,
        )
        return y.astype(f32).sum() + final.sum()

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8))), *args)
    assert text.count(TRITON_CALL) == len(KERNELS)
    # The register cap reaches the gradient kernel's module, and only it.
    assert 'name = "selective_scan_bwd_chunk_grads_maxnreg168"' in text
    assert text.count("ttg.maxnreg") == 1
    assert "selp.f32 s" in text  # the split layouts keep the PTX butterfly
    assert (
        "shfl.sync.bfly.b32 $0, $1, 16, 31, -1" in text
        if state_split == 2
        else ("shfl.sync.bfly.b32 $0, $1, 8, 31, -1" in text)
    )


def test_without_window_rows_lowers_for_cuda():
    args, f32 = lowering_args(), jnp.float32
    config = dataclasses.replace(EDGE_CONFIG, chunk=64, window_rows=False)

    def loss(*xs):
        *xs, seg = xs
        y = selective_scan_pallas(*xs, delta_softplus=True, segment_ids=seg, config=config)
        return y.astype(f32).sum()

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8))), *args)
    assert text.count(TRITON_CALL) == len(KERNELS)


def test_cuda_lowering_rejects_what_triton_cannot_lower():
    """The lowering test above is only worth having if an unsupported primitive fails it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, o_ref):
        o_ref[...] = jax.lax.cummax(x_ref[...], axis=0)  # no Triton lowering rule

    def fn(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            compiler_params=plgpu.CompilerParams(num_warps=1),
            name="uses_cummax",
        )(x)

    with pytest.raises(Exception, match="cummax|Unimplemented|not implemented|NotImplemented"):
        lower_for_cuda(fn, jax.ShapeDtypeStruct((32,), jnp.float32))


def test_register_cap_names_are_checked():
    from pallas_kernels.register_cap import capped_name

    assert capped_name("k", None) == "k"
    assert capped_name("k", 168) == "k_maxnreg168"
    for bad in (100, 16, 256):
        with pytest.raises(ValueError, match="multiple of 8"):
            capped_name("k", bad)
