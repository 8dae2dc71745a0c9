"""Every causal-conv implementation against float64 per-step loops, and packing isolation.

Parametrized over "xla" (XLA ops with the written-out backward), "pallas_interpret" (the walking
Triton kernels through the Pallas interpreter, on CPU), "pallas_tile_interpret" (the
tile-parallel ones, likewise) and "pallas" / "pallas_tile" (the same kernels on a GPU; skipped
without one). The walking runs pin a 16-step chunk and the tile runs 16-row forward tiles and
8-row backward tiles in 16-step chunks, so short rows cross tile and chunk edges; channel counts
are not multiples of the 128-channel block. Plus tests that lower the kernels for CUDA on this
CPU machine.
"""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops import causal_conv1d, positions_from_segment_ids
from pallas_kernels.causal_conv1d import KERNEL, TileConfig, causal_conv1d_pallas
from tests.gpu import lower_for_cuda, on_gpu
from tests.loops import causal_conv1d_loop, rel_err

IMPLS = [
    "xla",
    "pallas_interpret",
    "pallas_tile_interpret",
    on_gpu("pallas"),
    on_gpu("pallas_tile"),
]
EDGE_CHUNK = 16
EDGE_TILE = TileConfig(fwd_block_t=16, bwd_block_t=8, bwd_chunk=16)


def conv(impl, x, w, b, seg, activation):
    if impl == "xla":
        return causal_conv1d(x, w, b, segment_ids=seg, activation=activation, impl="xla")
    positions = (
        positions_from_segment_ids(seg)
        if seg is not None
        else jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    )
    return causal_conv1d_pallas(
        x,
        w,
        b,
        positions,
        activation=activation,
        interpret=impl.endswith("_interpret"),
        kernel_name="tile" if impl.startswith("pallas_tile") else "walk",
        chunk=EDGE_CHUNK,
        tile=EDGE_TILE,
    )


def segments(lengths_per_row):
    rows = [np.repeat(np.arange(1, len(ls) + 1), ls) for ls in lengths_per_row]
    return jnp.asarray(np.stack(rows), jnp.int32)


# Row lengths 50: segments of 1, ends on the chunk edge 16 and 32, crossing 48 (and the tile
# kernels' backward tile edges 8, 24 and 40).
EDGE_SEGMENTS = [[1, 15, 16, 1, 17], [3, 13, 1, 1, 30, 2]]


CASES = [
    "edges_silu_bias",
    "edges_no_bias",
    "edges_width2",
    "edges_width1",
    "one_step",
    "no_segments",
]


@functools.cache
def loop_case(case, dtype):
    """Inputs of `case` (fixed per case: str hash is salted per process, crc32 is not) and the
    float64 loop's output and gradients, computed once for every implementation."""
    k = jax.random.split(jax.random.key(zlib.crc32(case.encode())), 4)
    length, channels = {"one_step": (1, 6), "no_segments": (37, 6)}.get(case, (50, 200))
    batch = 2
    x = jax.random.normal(k[0], (batch, length, channels), jnp.float32).astype(dtype)
    width = {"edges_width2": 2, "edges_width1": 1}.get(case, 4)
    w = (0.5 * jax.random.normal(k[1], (channels, width), jnp.float32)).astype(dtype)
    b = (
        None
        if case == "edges_no_bias"
        else jax.random.normal(k[2], (channels,), jnp.float32).astype(dtype)
    )
    seg = (
        segments(EDGE_SEGMENTS)
        if case.startswith("edges")
        else (jnp.ones((batch, length), jnp.int32) if case == "one_step" else None)
    )
    activation = None if case == "edges_no_bias" else "silu"
    cot = jax.random.normal(k[3], x.shape, jnp.float32).astype(dtype)
    to64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    with jax.enable_x64(True):
        y64, vjp64 = jax.vjp(
            lambda *a: causal_conv1d_loop(*a, segment_ids=seg, activation=activation),
            to64(x),
            to64(w),
            to64(b),
        )
        want = vjp64(to64(cot))
    return (x, w, b, seg, activation, cot), y64, want


DTYPES = [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)]
# The tile kernels through the interpreter in bfloat16 once (the dtype handling; the cases'
# logic is the float32 runs'), to keep the interpreter's compile time down.
LOOP_CASES = [
    pytest.param(impl.values[0], dtype, tol, case, marks=impl.marks)
    if hasattr(impl, "marks")
    else (impl, dtype, tol, case)
    for impl in IMPLS
    for dtype, tol in DTYPES
    for case in CASES
    if not (impl == "pallas_tile_interpret" and dtype == jnp.bfloat16 and case != CASES[0])
]


@pytest.mark.parametrize("impl, dtype, tol, case", LOOP_CASES)
def test_conv_matches_float64_loop(impl, dtype, tol, case):
    (x, w, b, seg, activation, cot), y64, want = loop_case(case, dtype)
    y, vjp = jax.vjp(lambda *a: conv(impl, *a, seg, activation), x, w, b)
    grads = vjp(cot)
    assert y.dtype == dtype
    # Scaled by the dtype; the gradients of w and b sum over batch x length terms.
    assert rel_err(y.astype(jnp.float32), y64) < tol
    for g, g64 in zip(grads, want):
        if g64 is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert rel_err(g.astype(jnp.float32), g64) < 4 * tol


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_conv_equals_alone_and_perturbation_is_isolated(impl):
    lengths = [1, 15, 16, 1, 17, 30]  # edges at 16 and 32 inside, a segment of 1 on each side
    seg = segments([lengths])
    total = sum(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    k = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k[0], (1, total, 130))
    w = jax.random.normal(k[1], (130, 4))
    b = jax.random.normal(k[2], (130,))
    cot = jax.random.normal(k[3], x.shape)

    def out_and_dx(x_, s, c):
        y, vjp = jax.vjp(lambda a: conv(impl, a, w, b, s, "silu"), x_)
        return y, vjp(c)[0]

    y, dx = out_and_dx(x, seg, cot)
    for start, n in zip(starts, lengths):
        sl = slice(start, start + n)
        y1, dx1 = out_and_dx(x[:, sl], None, cot[:, sl])
        np.testing.assert_allclose(y[:, sl], y1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx[:, sl], dx1, rtol=1e-6, atol=1e-6)

    # Perturb the third sequence (it ends on a chunk edge) with its cotangent zeroed: every other
    # position's output, dx, and the weight gradients are bit-identical.
    victim = slice(starts[2], starts[2] + lengths[2])
    noisy = x.at[:, victim].add(1.0)
    masked = cot.at[:, victim].set(0.0)

    def everything(x_):
        y_, vjp = jax.vjp(lambda a, w_, b_: conv(impl, a, w_, b_, seg, "silu"), x_, w, b)
        return (y_, *vjp(masked))

    base, moved = everything(x), everything(noisy)
    keep = np.ones(total, bool)
    keep[victim] = False
    assert not np.array_equal(base[0][:, victim], moved[0][:, victim])
    np.testing.assert_array_equal(base[0][:, keep], moved[0][:, keep])
    np.testing.assert_array_equal(base[1][:, keep], moved[1][:, keep])
    np.testing.assert_array_equal(base[2], moved[2])
    np.testing.assert_array_equal(base[3], moved[3])


@pytest.mark.parametrize(
    "impl, tile, in_kernel",
    [
        ("xla", None, False),
        ("pallas_tile_interpret", TileConfig(fwd_block_c=64, bwd_block_c=64), True),
        ("pallas_tile_interpret", EDGE_TILE, False),  # boundary 192: not a multiple of 128
    ],
)
def test_channel_groups_are_the_split_output_and_its_gradient(impl, tile, in_kernel):
    groups = (128, 64, 8)
    k = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k[0], (2, 40, 200))
    w, b = jax.random.normal(k[1], (200, 4)), jax.random.normal(k[2], (200,))
    cot = jax.random.normal(k[3], x.shape)
    seg = segments([[1, 15, 24], [16, 16, 8]])
    kw = dict(segment_ids=seg, activation="silu")
    if tile is None:
        f = functools.partial(causal_conv1d, **kw, impl=impl)
    else:
        pos = positions_from_segment_ids(seg)

        def f(x_, w_, b_, groups=None):
            return causal_conv1d_pallas(
                x_,
                w_,
                b_,
                pos,
                activation="silu",
                interpret=True,
                kernel_name="tile",
                tile=tile,
                groups=groups,
            )

    y, vjp = jax.vjp(f, x, w, b)
    parts, vjp_parts = jax.vjp(lambda *a: f(*a, groups=groups), x, w, b)
    assert [p.shape for p in parts] == [(2, 40, g) for g in groups]
    np.testing.assert_allclose(jnp.concatenate(parts, -1), y, rtol=1e-6, atol=1e-6)
    cots = tuple(jnp.split(cot, [128, 192], axis=-1))
    for g, g_parts in zip(vjp(cot), vjp_parts(cots)):
        np.testing.assert_allclose(g_parts, g, rtol=1e-5, atol=1e-5)
    # Written by the kernel as three arrays, or split after it.
    jaxpr = str(jax.make_jaxpr(lambda *a: f(*a, groups=groups))(x, w, b))
    assert ("split" not in jaxpr) == in_kernel
    with pytest.raises(ValueError, match="groups must be positive ints summing to channels=200"):
        causal_conv1d(x, w, b, groups=(100, 50))


def test_conv_rejects_unknown_impl():
    x = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_conv1d(x, jnp.zeros((2, 4)), impl="cuda")


@pytest.mark.parametrize(
    "impl, prefix",
    [
        ("pallas_walk", "causal_conv1d"),
        ("pallas_tile", "causal_conv1d_tile"),
        ("pallas", {"walk": "causal_conv1d", "tile": "causal_conv1d_tile"}[KERNEL]),
    ],
)
@pytest.mark.parametrize("width, bias", [(4, True), (1, False)])
def test_pallas_conv_lowers_for_cuda_with_named_kernels(impl, prefix, width, bias):
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16

    def loss(x, w, b, seg):
        y = causal_conv1d(x, w, b, segment_ids=seg, activation="silu", impl=impl)
        return y.astype(jnp.float32).sum()

    args = (
        sds((2, 300, 200), bf),
        sds((200, width), bf),
        sds((200,), bf) if bias else None,
        sds((2, 300), jnp.int32),
    )
    text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
    names = re.findall(r'name = "(causal_conv1d_[a-z_]+)"', text)
    assert sorted(names) == [f"{prefix}_bwd", f"{prefix}_fwd"], names
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_tile_conv_with_channel_groups_lowers_for_cuda():
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16

    def loss(x, w, b, seg):
        parts = causal_conv1d(
            x, w, b, segment_ids=seg, activation="silu", impl="pallas_tile", groups=(256, 128, 8)
        )
        return sum(p.astype(jnp.float32).sum() * (i + 1) for i, p in enumerate(parts))

    args = (sds((2, 300, 392), bf), sds((392, 4), bf), sds((392,), bf), sds((2, 300), jnp.int32))
    text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
    names = re.findall(r'name = "(causal_conv1d_[a-z_]+)"', text)
    assert sorted(names) == ["causal_conv1d_tile_bwd", "causal_conv1d_tile_fwd"], names


@pytest.mark.parametrize("impl", ["pallas", "pallas_walk", "pallas_tile"])
def test_pallas_conv_off_gpu_names_the_impl(impl):
    if jax.default_backend() == "gpu":
        pytest.skip("checks the error off a GPU")
    x = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match=f'impl="{impl}" runs Triton kernels, which need a GPU'):
        causal_conv1d(x, jnp.zeros((2, 4)), impl=impl)


def test_tile_config_and_kernel_name_are_checked():
    with pytest.raises(ValueError, match="fwd_block_t=48 must be a power of two"):
        TileConfig(fwd_block_t=48)
    with pytest.raises(ValueError, match="bwd_chunk=16 must be at least bwd_block_t=32"):
        TileConfig(bwd_block_t=32, bwd_chunk=16)
    x = jnp.zeros((1, 4, 2))
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="kernel_name must be one of"):
        causal_conv1d_pallas(x, jnp.zeros((2, 4)), None, pos, activation=None, kernel_name="x")


@pytest.mark.parametrize(
    "shape, on_gpu_impl",
    [
        ((8, 2048, 4096), "pallas"),  # the 1.4b packed step: 2048 programs
        ((1, 2048, 4096), "xla"),  # one sequence a step: 256 programs
        ((1, 256, 768), "xla"),
    ],
)
def test_auto_picks_pallas_only_for_launches_that_fill_the_gpu(monkeypatch, shape, on_gpu_impl):
    import sys

    conv_module = sys.modules["jax_packmamba.ops.causal_conv1d"]
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    assert conv_module._auto_impl(x) == ("xla" if jax.default_backend() != "gpu" else on_gpu_impl)
    monkeypatch.setattr(conv_module.jax, "default_backend", lambda: "gpu")
    assert conv_module._auto_impl(x) == on_gpu_impl
