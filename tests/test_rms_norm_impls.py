"""The row norms (add_rms_norm, rms_norm, gated_rms_norm) of every implementation against a
float64 definition (tests/loops.py), values and gradients under random cotangents.

Parametrized over "reference" (jnp ops), "pallas_interpret" (the Triton kernels through the
Pallas interpreter, on CPU) and "pallas" (the same kernels on a GPU; skipped without one).
Column counts are not powers of two (masked blocks) and row counts not multiples of the row
block. Plus: per-token isolation, the backward's multi-tile walk, its prefetched walk
bit-identical to the plain one, CUDA lowering on this CPU machine, and the argument checks.
"""

import re
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.norm.vjp as norm_vjp
from jax_packmamba.ops import add_rms_norm, gated_rms_norm, rms_norm
from tests.compiled import compiled_vjp, run_without_fma
from tests.gpu import HAS_GPU, lower_for_cuda, on_gpu
from tests.loops import rel_err, rms_norm_groups_loop

IMPLS = ["reference", "pallas_interpret", on_gpu("pallas")]
DTYPES = [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)]
EPS = 1e-5


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _to64(a):
    return None if a is None else np.asarray(a, np.float64)


def _tree64(tree):
    return jax.tree.map(_to64, tree)


def _check(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        assert rel_err(g.astype(jnp.float32), w) < tol


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", ["residual", "no_residual", "norm_only"])
def test_add_rms_norm_matches_float64(impl, dtype, tol, case):
    k = jax.random.split(jax.random.key(zlib.crc32(case.encode())), 6)
    shape = (2, 13, 160)  # 26 rows: not a multiple of the 16-row block; 160 columns: masked
    hidden = _normal(k[0], shape, dtype)
    residual = None if case != "residual" else _normal(k[1], shape, jnp.float32, 3.0)
    weight = _normal(k[2], (160,), jnp.float32, 0.2) + 1.0
    out_dtype = jnp.bfloat16 if dtype == jnp.float32 and case == "residual" else dtype
    if case == "norm_only":

        def f(h, r, w):
            return rms_norm(h, w, eps=EPS, out_dtype=out_dtype, impl=impl)

        def f64(h, r, w):
            return rms_norm_groups_loop(h, w, EPS, 160)

        cots = _normal(k[4], shape, out_dtype)
    else:

        def f(h, r, w):
            return add_rms_norm(h, r, w, eps=EPS, out_dtype=out_dtype, impl=impl)

        def f64(h, r, w):
            stream = h if r is None else r + h
            return stream, rms_norm_groups_loop(stream, w, EPS, 160)

        cots = (_normal(k[3], shape, jnp.float32), _normal(k[4], shape, out_dtype))

    key = ("add_rms_norm", impl, case, jnp.dtype(out_dtype).name)
    out, grads = compiled_vjp(key, f, (hidden, residual, weight), cots)
    with jax.enable_x64(True):
        primals64 = (_to64(hidden), _to64(residual), _to64(weight))
        out64, grads64 = compiled_vjp(("add_rms_norm64", case), f64, primals64, _tree64(cots))
    if case == "norm_only":
        assert out.dtype == out_dtype
    else:
        assert out[0].dtype == jnp.float32 and out[1].dtype == out_dtype
    # bfloat16 outputs round to 2^-8; the float32 stream is exact.
    out_tol = tol if out_dtype == dtype else 1e-2
    _check(out, out64, out_tol)
    assert (grads[1] is None) == (residual is None)
    assert grads[0].dtype == dtype and grads[2].dtype == jnp.float32
    if residual is not None:
        assert grads[1].dtype == jnp.float32
    _check(grads, grads64, 4 * out_tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("cols,group_size", [(160, 160), (96, 24)])
def test_gated_rms_norm_matches_float64(impl, dtype, tol, cols, group_size):
    k = jax.random.split(jax.random.key(cols + group_size), 5)
    shape = (3, 7, cols)  # 21 rows
    x, z = _normal(k[0], shape, dtype), _normal(k[1], shape, dtype, 2.0)
    weight = _normal(k[2], (cols,), jnp.float32, 0.2) + 1.0
    cot = _normal(k[3], shape, dtype)

    def f(x, z, w):
        return gated_rms_norm(x, z, w, group_size=group_size, eps=EPS, impl=impl)

    def f64(x, z, w):
        return rms_norm_groups_loop(x * z / (1.0 + jnp.exp(-z)), w, EPS, group_size)

    out, grads = compiled_vjp(("gated_rms_norm", impl, group_size), f, (x, z, weight), cot)
    with jax.enable_x64(True):
        primals64 = (_to64(x), _to64(z), _to64(weight))
        out64, grads64 = compiled_vjp(("gated_rms_norm64", group_size), f64, primals64, _to64(cot))
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [dtype, dtype, jnp.float32]
    _check(out, out64, tol)
    _check(grads, grads64, 4 * tol)


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
@pytest.mark.parametrize("op", ["add", "gated"])
def test_one_token_perturbed_leaves_other_rows_bit_identical(impl, op):
    """Norms are per token: changing one token (one packed segment's) changes no other row's
    outputs or input gradients."""
    k = jax.random.split(jax.random.key(7), 5)
    shape, bf = (2, 19, 96), jnp.bfloat16
    a, b = _normal(k[0], shape, bf), _normal(k[1], shape, bf)
    weight = _normal(k[2], (96,), jnp.float32, 0.2) + 1.0
    cot = _normal(k[3], shape, bf)
    if op == "add":
        b = b.astype(jnp.float32)

        def f(a, b):
            return add_rms_norm(a, b, weight, eps=EPS, impl=impl)[1]
    else:

        def f(a, b):
            return gated_rms_norm(a, b, weight, group_size=48, eps=EPS, impl=impl)

    def run(a, b):
        out, grads = compiled_vjp(("one_token", impl, op), f, (a, b), cot)
        return (out, *grads)

    base = run(a, b)
    hit = (1, 11)  # row 1, token 11
    moved = run(a.at[hit].multiply(3.0), b.at[hit].add(1.0))
    others = np.ones(shape[:2], bool)
    others[hit] = False
    for x, y in zip(base, moved):
        np.testing.assert_array_equal(np.asarray(x[others]), np.asarray(y[others]))
        assert not np.array_equal(np.asarray(x[hit]), np.asarray(y[hit]))


@pytest.mark.parametrize("op", ["add", "gated"])
def test_backward_programs_walking_several_tiles(monkeypatch, op):
    """Few programs each walking several row tiles (the last one past the rows), as on a GPU
    at training shapes, against the reference."""
    monkeypatch.setattr(norm_vjp, "core_count", lambda: 1)  # 2 backward programs
    k = jax.random.split(jax.random.key(3), 4)
    shape = (5, 15, 40)  # 75 rows: 5 tiles of 16, 3 a program
    x = _normal(k[0], shape, jnp.float32)
    y = _normal(k[1], shape, jnp.float32)
    weight = _normal(k[2], (40,), jnp.float32, 0.2) + 1.0
    cot = _normal(k[3], shape, jnp.float32)
    programs, st = norm_vjp._bwd_programs(norm_vjp._static(75, 40, 1, EPS))
    assert (programs, st.tiles_per_program) == (2, 3)

    def f(impl):
        def g(x, y, w):
            if op == "add":
                return add_rms_norm(x, y, w, eps=EPS, impl=impl)[1]
            return gated_rms_norm(x, y, w, group_size=40, eps=EPS, impl=impl)

        return compiled_vjp(("tiles", impl, op), g, (x, y, weight), cot)

    _check(f("pallas_interpret"), f("reference"), 2e-6)


def _prefetch_mismatches(impl) -> list[str]:
    """The outputs and gradients (tree paths) that differ between the backward's plain walk
    and its software-pipelined one (BWD_PREFETCH: each tile loaded during the one before it),
    for each set of inputs the backward loads: two tiles a program, the last program's second
    tile past the rows (its prefetch reads nothing), and one program walking all three tiles
    of each of two groups."""
    rows, bf, f32 = 40, jnp.bfloat16, jnp.float32  # 3 tiles of 16 rows, the last of 8
    k = jax.random.split(jax.random.key(11), 11)
    shape, gated_shape = (2, 20, 40), (2, 20, 80)
    primals = (
        _normal(k[0], shape, bf),  # hidden, added to
        _normal(k[1], shape, f32, 3.0),  # a residual: d_hidden and d_residual both stored
        _normal(k[2], shape, f32),  # rms_norm's x
        _normal(k[3], (40,), f32, 0.2) + 1.0,
        _normal(k[4], gated_shape, bf),  # gated x and z: two groups of 40
        _normal(k[5], gated_shape, bf, 2.0),
        _normal(k[6], (80,), f32, 0.2) + 1.0,
    )
    cots = (
        (_normal(k[7], shape, f32), _normal(k[8], shape, bf)),
        _normal(k[9], shape, f32),
        _normal(k[10], gated_shape, bf),
    )

    def f(hidden, residual, x, w, gx, gz, gw):
        return (
            add_rms_norm(hidden, residual, w, eps=EPS, out_dtype=bf, impl=impl),
            rms_norm(x, w, eps=EPS, impl=impl),
            gated_rms_norm(gx, gz, gw, group_size=40, eps=EPS, impl=impl),
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norm_vjp, "core_count", lambda: 1)
        for groups, programs, tiles_per_program in ((1, 2, 2), (2, 1, 3)):
            got, st = norm_vjp._bwd_programs(norm_vjp._static(rows, 40, groups, EPS))
            assert (got, st.tiles_per_program) == (programs, tiles_per_program)
        runs = []
        for prefetch in (False, True):
            patch.setattr(norm_vjp, "BWD_PREFETCH", prefetch)
            runs.append(compiled_vjp(("prefetch", impl, prefetch), f, primals, cots))
    plain, prefetched = (jax.tree_util.tree_flatten_with_path(run)[0] for run in runs)
    return [
        jax.tree_util.keystr(path)
        for (path, a), (_, b) in zip(plain, prefetched, strict=True)
        if a.dtype != b.dtype or not np.array_equal(np.asarray(a), np.asarray(b))
    ]


def test_backward_prefetch_is_bit_identical_interpreted():
    """_prefetch_mismatches through the interpreter, in a CPU process whose XLA has no FMA
    instructions: XLA on CPU contracts a * b + c into one FMA wherever both land in one
    fusion, and the two walks' programs fuse differently (an ulp apart in places); without
    FMA every op rounds alone, as in the Triton kernels."""
    run_without_fma(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_backward_prefetch_is_bit_identical_on_gpu():
    assert _prefetch_mismatches("pallas") == []


@pytest.mark.parametrize("impl", ["pallas_interpret", on_gpu("pallas")])
def test_modules_match_reference_modules(impl):
    from jax_packmamba import RMSNorm, RMSNormGated

    k = jax.random.split(jax.random.key(5), 3)
    x = _normal(k[0], (2, 9, 64), jnp.float32)  # power-of-two blocks, unmasked
    z = _normal(k[1], (2, 9, 64), jnp.float32)
    outs = {}
    for i in ("reference", impl):
        norm = RMSNorm(64, eps=EPS, dtype=jnp.bfloat16, impl=i)
        gated = RMSNormGated(64, group_size=32, eps=EPS, dtype=jnp.bfloat16, impl=i)
        outs[i] = (norm(x), norm.add(x, None)[1], gated(x, z))
    for a, b in zip(outs["reference"], outs[impl]):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2)


@pytest.mark.parametrize("prefetch", [False, True])
def test_kernels_lower_for_cuda(monkeypatch, prefetch):
    monkeypatch.setattr(norm_vjp, "BWD_PREFETCH", prefetch)
    x = jnp.ones((4, 8, 2560), jnp.bfloat16)  # 2560 columns: a masked 4096 block
    r = jnp.ones((4, 8, 2560), jnp.float32)
    w = jnp.ones((2560,), jnp.float32)

    def loss(x, r, w):
        stream, normed = add_rms_norm(x, r, w, eps=EPS, impl="pallas")
        gated = gated_rms_norm(x, normed, w, group_size=1280, eps=EPS, impl="pallas")
        plain = rms_norm(stream, w, eps=EPS, impl="pallas")
        return jnp.sum(stream) + jnp.sum(gated.astype(jnp.float32)) + jnp.sum(plain)

    text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, r, w)
    names = sorted(re.findall(r'name = "((?:gated_)?rms_norm_[a-z]+)"', text))
    assert names == [
        "gated_rms_norm_bwd",
        "gated_rms_norm_fwd",
        "rms_norm_bwd",
        "rms_norm_bwd",
        "rms_norm_fwd",
        "rms_norm_fwd",
    ], names


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w: add_rms_norm(x, None, w[:3], eps=EPS), "weight must have shape"),
        (lambda x, w: add_rms_norm(x, x[:1], w, eps=EPS), "residual must have"),
        (lambda x, w: rms_norm(x.astype(jnp.int32), w, eps=EPS), "x must be a real floating"),
        (lambda x, w: gated_rms_norm(x, x, w, group_size=5, eps=EPS), "group_size must"),
        (lambda x, w: gated_rms_norm(x, x[:1], w, group_size=4, eps=EPS), "z must have"),
        (lambda x, w: rms_norm(x, w, eps=EPS, impl="triton"), "impl must be one of"),
        (lambda x, w: rms_norm(x, w, eps=EPS, impl="pallas"), 'impl="pallas" runs Triton'),
    ],
)
def test_bad_arguments_raise_naming_them(call, match):
    if match.startswith("impl=") and jax.default_backend() == "gpu":
        pytest.skip("pallas runs here")
    x, w = jnp.ones((2, 3, 8)), jnp.ones((8,))
    with pytest.raises(ValueError, match=match):
        call(x, w)


if __name__ == "__main__":  # test_backward_prefetch_is_bit_identical_interpreted's process
    mismatches = _prefetch_mismatches("pallas_interpret")
    sys.exit(f"prefetch=True differs from prefetch=False in {mismatches}" if mismatches else 0)
