"""Segment-aware attention against a float64 per-query loop, packing isolation, and RoPE.

Parametrized over "reference" (XLA, any backend) and the cuDNN paths "cudnn" (segment mask) and
"cudnn_packed" (one cuDNN sequence per segment), which need a GPU and are skipped without one;
on CPU their twins are a test that lowers them for CUDA (forward and backward) and finds the
cuDNN custom calls, so a silent fallback to the reference cannot pass, and the "cudnn" route's
own call run through jax's XLA attention against the loop. Rows of 40 tokens hold
segments of 1 token, segments ending on the 16- and 32-column edges, a repeated id after
another (a new segment) and trailing padding (id 0).
"""

import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_packmamba as jp
from tests.gpu import on_gpu
from tests.loops import attention_loop, rel_err, rope_formula

# The module, not the function `attention` that jax_packmamba.ops exports under the same name.
attention_module = importlib.import_module("jax_packmamba.ops.attention")
IMPLS = ["reference", on_gpu("cudnn"), on_gpu("cudnn_packed")]
MAX_SEGMENTS = 8
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
# (lengths, ids) per row; 40 columns each.
ROWS = [([1, 15, 16, 1, 7], [1, 2, 3, 4, 5]), ([3, 13, 1, 1, 18, 4], [1, 2, 1, 3, 4, 0])]
# Relative error bounds (tests/loops.rel_err). float32: rounding of a 40-term softmax. bfloat16
# inputs are rounded before the float64 loop sees them, so what is left is the kernels'
# bfloat16 probabilities and outputs (8 mantissa bits, about 4e-3 each); gradients pass
# through two more bfloat16 products, hence looser.
TOLERANCE = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 5e-2)}


def segment_rows(rows=ROWS):
    return jnp.asarray(np.stack([np.repeat(ids, lengths) for lengths, ids in rows]), jnp.int32)


def inputs(dtype, batch=2, length=40, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, HEADS, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (batch, length, KV_HEADS, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (batch, length, KV_HEADS, HEAD_DIM), jnp.float32)
    g = jax.random.normal(keys[3], (batch, length, HEADS, HEAD_DIM), jnp.float32)
    return tuple(a.astype(dtype) for a in (q, k, v, g))


def dtypes_for(impl):
    return [jnp.float32, jnp.bfloat16] if impl == "reference" else [jnp.bfloat16]


def attend_with_grads(impl, causal=True):
    """jit((q, k, v, g, ids) -> (out, dq, dk, dv)) through jax.vjp with cotangent g."""

    def run(q, k, v, g, ids):
        fn = lambda q, k, v: jp.attention(
            q, k, v, segment_ids=ids, causal=causal, impl=impl, max_segments=MAX_SEGMENTS
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    return jax.jit(run)


IMPL_NAMES = ["reference", "cudnn", "cudnn_packed"]
CASE_PARAMS = [
    pytest.param(impl, dtype, marks=IMPLS[i].marks if i else ())
    for i, impl in enumerate(IMPL_NAMES)
    for dtype in dtypes_for(impl)
]


@pytest.mark.parametrize("impl,dtype", CASE_PARAMS)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_float64_loop(impl, dtype, causal):
    q, k, v, g = inputs(dtype)
    ids = segment_rows()
    got = attend_with_grads(impl, causal)(q, k, v, g, ids)
    want = attention_loop(q, k, v, g, segment_ids=ids, causal=causal)
    out_tol, grad_tol = TOLERANCE[dtype]
    errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    print(impl, dtype.__name__, causal, errors)
    assert errors["out"] < out_tol
    assert max(errors["dq"], errors["dk"], errors["dv"]) < grad_tol


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [40, 39])
def test_cudnn_mask_route_through_xla_matches_loop(causal, length):
    """The CPU twin of impl="cudnn": the same jax.nn.dot_product_attention call (mask,
    is_causal, odd rows padded) with implementation="xla", against the float64 loop."""
    q, k, v, g = inputs(jnp.float32, length=length)
    ids = segment_rows([([1, 15, 16, 1, length - 33], [1, 2, 1, 3, 0])] * 2)
    runs = attention_module._run_index(ids, *ids.shape)

    @jax.jit
    def run(q, k, v, g):
        fn = lambda q, k, v: attention_module._cudnn_masked(
            q, k, v, runs, causal=causal, scale=HEAD_DIM**-0.5, implementation="xla"
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    got = run(q, k, v, g)
    want = attention_loop(q, k, v, g, segment_ids=ids, causal=causal)
    out_tol, grad_tol = TOLERANCE[jnp.float32]
    assert rel_err(got[0], want[0]) < out_tol
    assert max(rel_err(a, b) for a, b in zip(got[1:], want[1:])) < grad_tol


@pytest.mark.parametrize("impl", IMPLS)
def test_one_segment_rows_match_loop(impl):
    """segment_ids=None (each row one segment) and a row of a single token."""
    dtype = dtypes_for(impl)[-1]
    for length in (1, 24):
        q, k, v, g = inputs(dtype, batch=1, length=length, seed=length)

        @jax.jit
        def run(q, k, v, g):
            fn = lambda q, k, v: jp.attention(q, k, v, impl=impl, max_segments=1)
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(g))

        got = run(q, k, v, g)
        want = attention_loop(q, k, v, g, segment_ids=np.zeros(q.shape[:2], np.int32))
        tol = TOLERANCE[dtype]
        assert rel_err(got[0], want[0]) < tol[0]
        for got_grad, want_grad in zip(got[1:], want[1:]):
            assert rel_err(got_grad, want_grad) < tol[1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row,cols", [(0, slice(16, 32)), (1, slice(16, 17)), (1, slice(36, 40))])
def test_segments_are_bit_isolated(impl, row, cols):
    """Changing one segment's q, k, v and cotangent leaves every other token's output and
    dq, dk, dv bit-identical."""
    dtype = dtypes_for(impl)[-1]
    q, k, v, g = inputs(dtype)
    ids = segment_rows()
    fn = attend_with_grads(impl)
    before = fn(q, k, v, g, ids)
    # A backward that accumulates with atomics (as flash-attention backwards may) differs from
    # run to run, and then no bitwise comparison means anything: say so rather than blame
    # the masking.
    for name, a, b in zip(("out", "dq", "dk", "dv"), before, fn(q, k, v, g, ids)):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), (
            f"{impl}: {name} differs between two identical runs (not deterministic; on a GPU "
            "try XLA_FLAGS=--xla_gpu_deterministic_ops=true)"
        )
    noise = inputs(dtype, seed=7)
    changed = [a.at[row, cols].set(n[row, cols] * 3) for a, n in zip((q, k, v, g), noise)]
    after = fn(*changed, ids)
    outside = np.ones(ids.shape, bool)
    outside[row, cols] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), before, after):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_array_equal(a[outside], b[outside], err_msg=name)
        if name in ("out", "dv"):  # the change did arrive (dq, dk of a 1-token segment are 0)
            assert not np.array_equal(a[~outside], b[~outside]), name


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_matches_alone(impl):
    """Each segment's outputs and gradients in a packed row equal the segment run alone."""
    dtype = dtypes_for(impl)[-1]
    q, k, v, g = inputs(dtype)
    ids = segment_rows()
    packed = attend_with_grads(impl)(q, k, v, g, ids)
    tol = TOLERANCE[dtype]
    # (row, start, length): the first token alone, a segment on the 16..32 block edges, the
    # 18-token one after two single tokens, and the padding run (one compile per length).
    for r, start, n in [(0, 0, 1), (0, 16, 16), (1, 18, 18), (1, 36, 4)]:
        piece = [a[r : r + 1, start : start + n] for a in (q, k, v, g)]
        alone = attend_with_grads(impl)(*piece, jnp.ones((1, n), jnp.int32))
        for i, (a, b) in enumerate(zip(packed, alone)):
            err = rel_err(a[r : r + 1, start : start + n], b)
            assert err < tol[min(i, 1)], (r, start, n, i, err)


def test_packed_layout_describes_runs():
    # Row 0: runs of 2, 3, 1 (the last one padding); row 1 one run; row 2 four runs, one more
    # than the 3 slots: its last run is left out.
    ids = jnp.asarray([[1, 1, 2, 2, 2, 0], [5, 5, 5, 5, 5, 5], [1, 2, 1, 1, 3, 4]], jnp.int32)
    runs = attention_module._run_index(ids, *ids.shape)
    seqlen, offsets = attention_module.packed_layout(runs, 3)
    np.testing.assert_array_equal(seqlen, [[2, 3, 1], [6, -1, -1], [1, 1, 2]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1], [0, -1, -1, -1], [0, 1, 2, -1]])
    # Random rows: the runs the layout describes cover each row exactly, in order.
    ids = np.random.default_rng(0).integers(0, 3, (4, 50))
    runs = attention_module._run_index(jnp.asarray(ids, jnp.int32), *ids.shape)
    seqlen, offsets = (np.asarray(a) for a in attention_module.packed_layout(runs, 50))
    for row in range(4):
        n = int(runs[row, -1]) + 1
        rebuilt = np.repeat(np.arange(n), seqlen[row, :n])
        np.testing.assert_array_equal(rebuilt, runs[row])
        np.testing.assert_array_equal(offsets[row, :n], np.r_[0, np.cumsum(seqlen[row, : n - 1])])
        assert (seqlen[row, n:] == -1).all() and (offsets[row, n:] == -1).all()


def test_too_few_max_segments_is_refused(monkeypatch):
    monkeypatch.setattr(attention_module, "_target_platform", lambda: "gpu")
    q, k, v, _ = inputs(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"max_segments=4 is less than the 6 segments of row 1"):
        jp.attention(q, k, v, segment_ids=segment_rows(), impl="cudnn_packed", max_segments=4)


def test_auto_is_the_reference_off_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU choice")
    q, k, v, _ = inputs(jnp.bfloat16)
    ids = segment_rows()
    np.testing.assert_array_equal(
        jp.attention(q, k, v, segment_ids=ids), jp.attention_reference(q, k, v, segment_ids=ids)
    )


@pytest.mark.parametrize(
    "platform,dtype,head_dim,max_segments,want",
    [
        ("cuda", jnp.bfloat16, 128, 64, "cudnn"),  # measured faster than cudnn_packed
        ("cuda", jnp.float16, 64, None, "cudnn"),
        ("cuda", jnp.float32, 128, 64, "reference"),  # cuDNN's flash attention is bf16/fp16 only
        ("cuda", jnp.bfloat16, 12, 64, "reference"),  # head dim not a multiple of 8
        ("cpu", jnp.bfloat16, 128, 64, "reference"),
    ],
)
def test_auto_choice(monkeypatch, platform, dtype, head_dim, max_segments, want):
    monkeypatch.setattr(attention_module, "_target_platform", lambda: platform)
    q = jax.ShapeDtypeStruct((1, 8, 2, head_dim), dtype)
    assert attention_module._auto_impl(q, max_segments) == want


CUDNN_CALLS = (
    "__cudnn$fmhaScaleBiasSoftmax",
    "__cudnn$fmhaScaleBiasSoftmaxBackward",
    "__cudnn$fmhaSoftmax",
    "__cudnn$fmhaSoftmaxBackward",
)


@pytest.mark.parametrize(
    "impl,length,calls",
    [
        ("cudnn", 40, ("__cudnn$fmhaScaleBiasSoftmax(", "__cudnn$fmhaScaleBiasSoftmaxBackward(")),
        ("cudnn", 39, ("__cudnn$fmhaScaleBiasSoftmax(", "__cudnn$fmhaScaleBiasSoftmaxBackward(")),
        ("cudnn_packed", 40, ("__cudnn$fmhaSoftmax(", "__cudnn$fmhaSoftmaxBackward(")),
    ],
)
def test_cudnn_paths_lower_for_cuda(monkeypatch, impl, length, calls):
    """Forward and backward lower to cuDNN's fused attention custom calls for CUDA on this
    machine. jax asks the installed cuDNN and GPU for their versions while tracing; on a
    machine without them we answer as an H100/H200 with cuDNN 9.10 would."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_fa, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn_fa, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(attention_module, "_target_platform", lambda: "cuda")
    q, k, v, g = inputs(jnp.bfloat16, length=length)
    ids = segment_rows([([1, 15, 16, 1, length - 33], [1, 2, 3, 4, 5])] * 2)

    def loss(q, k, v):
        out = jp.attention(q, k, v, segment_ids=ids, impl=impl, max_segments=MAX_SEGMENTS)
        return jnp.sum(out.astype(jnp.float32) * g)

    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(c) for c in CUDNN_CALLS],
    )(q, k, v)
    text = exported.mlir_module()
    for call in calls:
        assert text.count(call) == 1, call


@pytest.mark.parametrize("impl", ["cudnn", "cudnn_packed"])
def test_cudnn_off_a_gpu_names_impl(impl):
    if jax.default_backend() == "gpu":
        pytest.skip("checks the refusal off a GPU")
    q, k, v, _ = inputs(jnp.bfloat16)
    with pytest.raises(ValueError, match=f'impl="{impl}" runs cuDNN kernels, which need a GPU'):
        jp.attention(q, k, v, segment_ids=segment_rows(), impl=impl, max_segments=8)


def _bad(**changes):
    q, k, v, _ = inputs(jnp.float32, length=8)
    args = dict(
        q=q,
        k=k,
        v=v,
        segment_ids=jnp.ones((2, 8), jnp.int32),
        causal=True,
        scale=None,
        impl="reference",
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args,message",
    [
        (
            _bad(q=jnp.zeros((2, 8, 4))),
            r"q must be \(batch, length, heads, head_dim\), got shape \(2, 8, 4\)",
        ),
        (
            _bad(q=jnp.zeros((2, 8, 3, 16))),
            r"q's heads \(3\) must be a multiple of k's kv_heads \(2\)",
        ),
        (
            _bad(k=jnp.zeros((2, 8, 2, 8)), v=jnp.zeros((2, 8, 2, 8))),
            r"k must be \(batch, length, kv_heads, head_dim\)",
        ),
        (_bad(v=jnp.zeros((2, 8, 1, 16))), r"k and v must have the same shape"),
        (
            _bad(k=jnp.zeros((2, 7, 2, 16)), v=jnp.zeros((2, 7, 2, 16))),
            r"to match q \(2, 8, 4, 16\)",
        ),
        (_bad(v=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), r"q, k and v must share a dtype"),
        (
            _bad(q=jnp.zeros((2, 8, 4, 16), jnp.int32)),
            r"q must be a real floating array, got dtype int32",
        ),
        (
            _bad(segment_ids=jnp.ones((2, 7), jnp.int32)),
            r"segment_ids must have shape \(batch, length\) = \(2, 8\)",
        ),
        (_bad(segment_ids=jnp.ones((2, 8))), r"segment_ids must be an integer array"),
        (_bad(causal="yes"), r"causal must be a bool, got 'yes'"),
        (_bad(scale=float("nan")), r"scale must be a finite Python number or None"),
        (
            _bad(impl="flash"),
            r"impl must be one of \('auto', 'reference', 'cudnn', 'cudnn_packed'\), got 'flash'",
        ),
        (_bad(max_segments=0), r"max_segments must be a positive int or None, got 0"),
    ],
)
def test_bad_input_names_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        jp.attention(**args)


@pytest.mark.parametrize(
    "impl,change,message",
    [
        *[
            (impl, dict(dtype=jnp.float32), r"takes bfloat16 or float16 q, k, v .* got float32")
            for impl in ("cudnn", "cudnn_packed")
        ],
        *[
            (impl, dict(head_dim=12), r"needs head_dim a multiple of 8 and at most 256, got 12")
            for impl in ("cudnn", "cudnn_packed")
        ],
        ("cudnn_packed", dict(max_segments=None), r'impl="cudnn_packed" needs max_segments'),
    ],
)
def test_cudnn_limits_name_impl(monkeypatch, impl, change, message):
    monkeypatch.setattr(attention_module, "_target_platform", lambda: "gpu")
    dtype, head_dim = change.get("dtype", jnp.bfloat16), change.get("head_dim", 16)
    q, k = jnp.zeros((1, 4, 2, head_dim), dtype), jnp.zeros((1, 4, 1, head_dim), dtype)
    with pytest.raises(ValueError, match=message):
        jp.attention(q, k, k, impl=impl, max_segments=change.get("max_segments", 4))


@pytest.mark.parametrize("rotary_dim", [None, 8])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_rope_matches_formula_per_segment(rotary_dim, dtype, tol):
    ids = segment_rows()
    positions = jp.positions_from_segment_ids(ids)
    x = jax.random.normal(jax.random.key(3), (2, 40, 3, 16), jnp.float32).astype(dtype)
    got = jp.apply_rope(x, positions, theta=10_000.0, rotary_dim=rotary_dim)
    want = rope_formula(x, positions, theta=10_000.0, rotary_dim=rotary_dim or 16)
    assert got.dtype == dtype
    assert rel_err(got, want) < tol
    if rotary_dim:  # the channels past rotary_dim pass through untouched
        np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])
    # A segment starts at angle 0: its first token comes out unchanged.
    starts = np.asarray(positions) == 0
    np.testing.assert_array_equal(np.asarray(got)[starts], np.asarray(x)[starts])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rotary_dim=7), r"rotary_dim must be an even int in \(0, head_dim=16\], got 7"),
        (dict(rotary_dim=18), r"rotary_dim must be an even int in \(0, head_dim=16\], got 18"),
        (dict(theta=0.0), r"theta must be a positive number, got 0.0"),
        (
            dict(positions=jnp.zeros((2, 5), jnp.int32)),
            r"positions must have shape \(batch, length\) = \(2, 4\)",
        ),
        (dict(positions=jnp.zeros((2, 4))), r"positions must be an integer array"),
        (dict(x=jnp.zeros((2, 4, 16))), r"x must be \(batch, length, heads, head_dim\)"),
    ],
)
def test_rope_bad_input(kwargs, message):
    args = dict(x=jnp.zeros((2, 4, 1, 16)), positions=jnp.zeros((2, 4), jnp.int32), theta=1e4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        jp.apply_rope(**args)


def test_benchmark_smoke_writes_checked_timings(tmp_path):
    from benchmarks import bench_attention

    assert bench_attention.main(["--smoke", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("attention_*_smoke.json")
    data = json.loads(path.read_text())
    assert data["errors"] == []
    assert data["timings"][0]["impl"] == "reference" and data["timings"][0]["fwdbwd_ms"] > 0


@pytest.mark.parametrize("fixture", ["bamba", "bamba_tied"])
def test_rope_matches_transformers_bamba(fixture):
    """q and k through transformers' own Bamba rotary embedding (partial_rotary_factor 0.5) at
    per-segment positions (tests/fixtures/parity/<fixture>/rope.npz, made by
    scripts/make_parity_fixtures.py)."""
    ref = np.load(Path(__file__).parent / "fixtures" / "parity" / fixture / "rope.npz")
    positions = jnp.asarray(ref["positions"])
    for name in ("q", "k"):
        got = jp.apply_rope(
            jnp.asarray(ref[name]),
            positions,
            theta=float(ref["theta"]),
            rotary_dim=int(ref["rotary_dim"]),
        )
        np.testing.assert_allclose(got, ref[f"{name}_rot"], rtol=1e-6, atol=1e-6, err_msg=name)
    assert int(ref["rotary_dim"]) == ref["q"].shape[-1] // 2  # Bamba rotates half the head
