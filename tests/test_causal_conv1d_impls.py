"""Every causal-conv implementation against float64 per-step loops, and packing isolation.

Parametrized over "xla" (XLA ops with the written-out backward), "pallas_interpret" (the walking
Triton kernels through the Pallas interpreter, on CPU), "pallas_tile_interpret" (the
tile-parallel ones, likewise) and "pallas" / "pallas_tile" (the same kernels on a GPU; skipped
without one). The walking runs pin a 16-step chunk and the tile runs 16-row forward tiles and
8-row backward tiles in 16-step chunks, so short rows cross tile and chunk edges; channel counts
are not multiples of the 128-channel block. Plus tests that lower the kernels for CUDA on this
CPU machine, and that the walking backward's blocks of steps (bwd_unroll) change no bit.
"""

import functools
import re
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops import causal_conv1d, positions_from_segment_ids
from pallas_kernels.causal_conv1d import KERNEL, TileConfig, causal_conv1d_pallas
from pallas_kernels.causal_conv1d import kernel as walk_kernel
from pallas_kernels.causal_conv1d import vjp as conv_vjp
from tests.compiled import compiled, compiled_vjp, run_without_fma
from tests.gpu import HAS_GPU, lower_for_cuda, lowered_ops, on_gpu
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


def lowering_args(batch, length, channels, width, *extra):
    """Abstract (x, weight, bias, segment ids or positions, *extra) for lowering a conv for CUDA:
    bf16 activations and weights, int32 ids."""
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    return (
        sds((batch, length, channels), bf),
        sds((channels, width), bf),
        sds((channels,), bf),
        sds((batch, length), jnp.int32),
        *extra,
    )


def groups_sum(parts):
    """A loss over the output's channel groups that weighs each group differently, so that
    every group's cotangent is its own."""
    return sum(p.astype(jnp.float32).sum() * (i + 1) for i, p in enumerate(parts))


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
        # Compiled: eagerly, every op of the loop and its gradient compiles on its own.
        # Its float64 program does not depend on dtype: both dtypes' cases share it.
        y64, want = compiled_vjp(
            ("conv_loop", case),
            lambda *a: causal_conv1d_loop(*a, segment_ids=seg, activation=activation),
            (to64(x), to64(w), to64(b)),
            to64(cot),
        )
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
    y, grads = compiled_vjp(
        ("conv", impl, case, jnp.dtype(dtype).name),
        lambda *a: conv(impl, *a, seg, activation),
        (x, w, b),
        cot,
    )
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
        def f(x_, s, c):
            y, vjp = jax.vjp(lambda a: conv(impl, a, w, b, s, "silu"), x_)
            return y, vjp(c)[0]

        return compiled(("packed_conv", impl, s is None), f, x_, s, c)(x_, s, c)

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
        def f(x_, w_, b_, c):
            y_, vjp = jax.vjp(lambda a, w_, b_: conv(impl, a, w_, b_, seg, "silu"), x_, w_, b_)
            return (y_, *vjp(c))

        return compiled(("perturbed_conv", impl), f, x_, w, b, masked)(x_, w, b, masked)

    base, moved = everything(x), everything(noisy)
    keep = np.ones(total, bool)
    keep[victim] = False
    assert not np.array_equal(base[0][:, victim], moved[0][:, victim])
    np.testing.assert_array_equal(base[0][:, keep], moved[0][:, keep])
    np.testing.assert_array_equal(base[1][:, keep], moved[1][:, keep])
    np.testing.assert_array_equal(base[2], moved[2])
    np.testing.assert_array_equal(base[3], moved[3])


BLOCKS_64 = TileConfig(fwd_block_c=64, bwd_block_c=64)


@pytest.mark.parametrize(
    "impl, tile, kernel_name, groups, in_kernel, joined",
    [
        ("xla", None, None, (128, 64, 8), False, True),
        ("pallas_tile_interpret", BLOCKS_64, "tile", (128, 64, 8), True, False),
        # Boundary 192: not a multiple of the 128-channel blocks, so split after.
        ("pallas_tile_interpret", EDGE_TILE, "tile", (128, 64, 8), False, True),
        # The tile forward writes the groups; boundary 192 is no multiple of the walking
        # backward's 128 channels a program, so their cotangents are joined for it.
        ("pallas_tile_interpret", BLOCKS_64, "tile_walk", (128, 64, 8), True, True),
        # Boundaries of 128 multiples (as Mamba2's): the walking backward reads each group's
        # cotangent (the last group narrower than a block).
        ("pallas_tile_interpret", BLOCKS_64, "tile_walk", (128, 128, 40), True, False),
    ],
)
def test_channel_groups_are_the_split_output_and_its_gradient(
    impl, tile, kernel_name, groups, in_kernel, joined
):
    channels = sum(groups)
    bounds = list(np.cumsum(groups)[:-1])
    k = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k[0], (2, 40, channels))
    w, b = jax.random.normal(k[1], (channels, 4)), jax.random.normal(k[2], (channels,))
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
                kernel_name=kernel_name,
                tile=tile,
                groups=groups,
            )

    y, vjp = jax.vjp(f, x, w, b)
    if kernel_name == "tile_walk":  # two kernels' halves: against the XLA impl
        y_xla, vjp_xla = jax.vjp(functools.partial(causal_conv1d, **kw, impl="xla"), x, w, b)
        np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5)
        for g, g_xla in zip(vjp(cot), vjp_xla(cot)):
            np.testing.assert_allclose(g, g_xla, rtol=1e-4, atol=1e-4)
    parts, vjp_parts = jax.vjp(lambda *a: f(*a, groups=groups), x, w, b)
    assert [p.shape for p in parts] == [(2, 40, g) for g in groups]
    cots = tuple(jnp.split(cot, bounds, axis=-1))
    if kernel_name == "tile_walk":
        # The same kernels on the same values, one array or several: bit-identical.
        np.testing.assert_array_equal(jnp.concatenate(parts, -1), y)
        for g, g_parts in zip(vjp(cot), vjp_parts(cots)):
            np.testing.assert_array_equal(g_parts, g)
    np.testing.assert_allclose(jnp.concatenate(parts, -1), y, rtol=1e-6, atol=1e-6)
    for g, g_parts in zip(vjp(cot), vjp_parts(cots)):
        np.testing.assert_allclose(g_parts, g, rtol=1e-5, atol=1e-5)
    # Written by the kernel as three arrays, or split after it; the cotangents read by the
    # backward kernel as they are, or joined first.
    jaxpr = str(jax.make_jaxpr(lambda *a: f(*a, groups=groups))(x, w, b))
    assert ("split" not in jaxpr) == in_kernel
    assert ("concatenate" in str(jax.make_jaxpr(vjp_parts)(cots))) == joined
    with pytest.raises(
        ValueError, match=f"groups must be positive ints summing to channels={channels}"
    ):
        causal_conv1d(x, w, b, groups=(100, 50))


def test_conv_rejects_unknown_impl():
    x = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_conv1d(x, jnp.zeros((2, 4)), impl="cuda")


# The (backward, forward) kernel names each kernel choice lowers to.
KERNEL_NAMES = {
    "walk": ["causal_conv1d_bwd", "causal_conv1d_fwd"],
    "tile": ["causal_conv1d_tile_bwd", "causal_conv1d_tile_fwd"],
    "tile_walk": ["causal_conv1d_bwd", "causal_conv1d_tile_fwd"],
}


@pytest.mark.parametrize(
    "impl, kernel",
    [
        ("pallas_walk", "walk"),
        ("pallas_tile", "tile"),
        ("pallas_tile_walk", "tile_walk"),
        ("pallas", KERNEL),
    ],
)
@pytest.mark.parametrize("width, bias", [(4, True), (1, False)])
def test_pallas_conv_lowers_for_cuda_with_named_kernels(impl, kernel, width, bias):
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
    assert sorted(names) == KERNEL_NAMES[kernel], names
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_tile_conv_with_channel_groups_lowers_for_cuda():
    def loss(x, w, b, seg):
        parts = causal_conv1d(
            x, w, b, segment_ids=seg, activation="silu", impl="pallas_tile", groups=(256, 128, 8)
        )
        return groups_sum(parts)

    args = lowering_args(2, 300, 392, 4)
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
    # The walking backward reads cotangent groups only where no program straddles two.
    st = walk_kernel.Static(length=4, channels=200, width=4, block_e=128, chunk=4, silu=True)
    x, w_t = jnp.zeros((1, 4, 200)), jnp.zeros((4, 200))
    gs = (jnp.zeros((1, 4, 64)), jnp.zeros((1, 4, 136)))
    with pytest.raises(ValueError, match=r"gs must split 200 channels at multiples of 128"):
        walk_kernel.conv_bwd(x, w_t, None, pos, gs, st=st, num_warps=4, interpret=True)
    for bad in (0, 3, 2.0):
        with pytest.raises(
            ValueError, match=f"bwd_unroll must be a positive power of two, got {bad}"
        ):
            causal_conv1d_pallas(x, jnp.zeros((200, 4)), None, pos, activation=None, bwd_unroll=bad)
    for bad in (1, "yes"):
        with pytest.raises(ValueError, match=f"bwd_pipeline must be a bool, got {bad!r}"):
            causal_conv1d_pallas(
                x, jnp.zeros((200, 4)), None, pos, activation=None, bwd_pipeline=bad
            )


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


# Inputs before t = 0 (`prefix`): x at t = -(w-1) .. -1, read by a run whose positions start at
# w - 1 (it "began" before t = 0). Row 0's first run reads it (a run of 1, then runs ending on
# the 16-step chunk edge and crossing the tile kernels' 8-row backward tiles), row 1's does not
# (positions from 0: the prefix is ignored, its gradient zero).
PREFIX_SEGMENTS = [[1, 15, 5], [21]]
PREFIX_CASES = [  # (width, length, dtype, tolerance); rows shorter than the prefix last
    (2, 21, jnp.float32, 2e-6),
    (3, 21, jnp.float32, 2e-6),
    (4, 21, jnp.float32, 2e-6),
    (4, 21, jnp.bfloat16, 2e-2),
    (4, 2, jnp.float32, 2e-6),
    (3, 1, jnp.float32, 2e-6),
]


def conv_with_prefix(impl, x, w, b, positions, prefix):
    if impl == "xla":
        import importlib

        conv_module = importlib.import_module("jax_packmamba.ops.causal_conv1d")
        return conv_module._causal_conv1d_jit(x, w, b, positions, prefix, None, "silu")
    return causal_conv1d_pallas(
        x,
        w,
        b,
        positions,
        activation="silu",
        prefix=prefix,
        interpret=impl.endswith("_interpret"),
        kernel_name="tile" if impl.startswith("pallas_tile") else "walk",
        chunk=EDGE_CHUNK,
        tile=EDGE_TILE,
    )


@functools.cache
def prefix_case(width, length, dtype):
    """Inputs (x, w, b, prefix, cotangent, positions) and the float64 loop's output and
    gradients over the prefix and the row concatenated (the prefix in the first run's segment
    where the row reads it, in a segment of its own where not), computed once for every impl."""
    k = width - 1
    keys = jax.random.split(jax.random.key(width * 100 + length), 5)
    channels = 10
    x = jax.random.normal(keys[0], (2, length, channels)).astype(dtype)
    w = (0.5 * jax.random.normal(keys[1], (channels, width))).astype(dtype)
    b = jax.random.normal(keys[2], (channels,)).astype(dtype)
    prefix = jax.random.normal(keys[3], (2, k, channels)).astype(dtype)
    cot = jax.random.normal(keys[4], x.shape).astype(dtype)
    seg = segments(PREFIX_SEGMENTS) if length == 21 else jnp.ones((2, length), jnp.int32)
    reads = jnp.asarray([True, False])
    positions = positions_from_segment_ids(seg)
    first_run = positions == jnp.arange(length)
    positions = positions + jnp.where(reads[:, None] & first_run, k, 0)
    ids = jnp.concatenate([jnp.where(reads[:, None], seg[:, :1], -1).repeat(k, 1), seg], 1)
    to64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    with jax.enable_x64(True):

        def whole(x_, w_, b_, p_):
            ext = jnp.concatenate([p_, x_], axis=1)
            return causal_conv1d_loop(ext, w_, b_, segment_ids=ids, activation="silu")[:, k:]

        y64, want = compiled_vjp(
            ("prefix_loop", width, length),  # float64 whatever dtype: one program for both
            whole,
            tuple(map(to64, (x, w, b, prefix))),
            to64(cot),
        )
    return (x, w, b, prefix, cot, positions), y64, want


@pytest.mark.parametrize("width, length, dtype, tol", PREFIX_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_is_read_as_the_inputs_before_the_row(impl, width, length, dtype, tol):
    """Against the float64 loop over the prefix and the row concatenated: outputs and the
    gradients of x, the weights, the bias and the prefix, under a random cotangent."""
    if impl == "pallas_tile_interpret" and dtype == jnp.bfloat16:
        pytest.skip("the tile kernels' dtype handling is covered by the float64-loop cases")
    (x, w, b, prefix, cot, positions), y64, want = prefix_case(width, length, dtype)
    y, grads = compiled_vjp(
        ("prefix", impl, width, length, jnp.dtype(dtype).name),
        lambda *a: conv_with_prefix(impl, *a[:3], positions, a[3]),
        (x, w, b, prefix),
        cot,
    )
    assert y.dtype == dtype
    assert rel_err(y.astype(jnp.float32), y64) < tol
    for g, g64 in zip(grads, want):
        assert g.dtype == dtype
        assert rel_err(g.astype(jnp.float32), g64) < 4 * tol
    assert np.abs(np.asarray(grads[3][0], np.float32)).max() > 0
    assert not np.asarray(grads[3][1]).any()  # row 1 does not read its prefix


def test_bad_prefix_is_refused():
    x, w = jnp.zeros((2, 5, 3)), jnp.zeros((3, 4))
    pos = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"prefix must be \(batch, width - 1, channels\)"):
        causal_conv1d_pallas(x, w, None, pos, activation=None, prefix=jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match=r"linked must be \(batch, width - 1\)"):
        causal_conv1d_pallas(
            x, w, None, pos, activation=None, prefix=jnp.zeros((2, 3, 3)), linked=jnp.ones(2, bool)
        )


# Linked rows (continues): rows of 12, the prefix of width 4 is 3 steps. Row 0 reads
# first_inputs; row 1 continues document 2 with a piece of 2; row 2 continues document 4, whose
# piece at row 1's end (2 steps) is shorter than the prefix; row 3 does not continue and reads
# its first_inputs.
LINKED_ROWS = [[1] * 5 + [2] * 7, [2] * 2 + [3] * 8 + [4] * 2, [4] * 12, [5] * 12]
LINKED_CONTINUES = [False, True, True, False]
LINKED_READS_FIRST = [0, 3]  # the rows whose first_inputs are read


def linked_alone(x, first, w, b):
    """The float64 loop over the rows laid end to end, each row that does not continue
    preceded by its first_inputs (in its first segment): every document whole."""
    seg = np.asarray(LINKED_ROWS)
    k = w.shape[1] - 1
    parts, ids, where = [], [], []
    for r in range(len(LINKED_ROWS)):
        if not LINKED_CONTINUES[r]:
            parts.append(first[r])
            ids.append(np.full(k, seg[r, 0]))
        where.append(sum(p.shape[0] for p in parts))
        parts.append(x[r])
        ids.append(seg[r])
    flat = jnp.concatenate(parts)[None]
    ids = jnp.asarray(np.concatenate(ids))[None]
    y = causal_conv1d_loop(flat, w, b, segment_ids=ids, activation="silu")[0]
    return jnp.stack([y[s : s + seg.shape[1]] for s in where])


@functools.cache
def linked_case(channels=10):
    """Inputs (x, first_inputs, w, b, cotangent) of the linked rows, float32, and linked_alone's
    output and gradients, computed once for every impl."""
    batch, length, width = len(LINKED_ROWS), len(LINKED_ROWS[0]), 4
    keys = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(keys[0], (batch, length, channels))
    first = jax.random.normal(keys[1], (batch, width - 1, channels))
    w = 0.5 * jax.random.normal(keys[2], (channels, width))
    b = jax.random.normal(keys[3], (channels,))
    cot = jax.random.normal(keys[4], x.shape)
    with jax.enable_x64(True):
        to64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        y64, want = compiled_vjp(
            ("linked_loop",), linked_alone, tuple(map(to64, (x, first, w, b))), to64(cot)
        )
    return (x, first, w, b, cot), y64, want


# tile_walk with the output as channel groups at a 128 boundary: the tile forward writes them
# and the walking backward reads their cotangents (the prefix gradient joins their heads).
LINKED_GROUPS = (128, 8)
GPU_ONLY = on_gpu(None).marks


@pytest.mark.parametrize(
    "impl, groups",
    [
        ("xla", None),
        ("pallas_walk_interpret", None),
        ("pallas_tile_interpret", None),
        ("pallas_tile_walk_interpret", None),
        ("pallas_tile_walk_interpret", LINKED_GROUPS),
        pytest.param("pallas_walk", None, marks=GPU_ONLY),
        pytest.param("pallas_tile", None, marks=GPU_ONLY),
        pytest.param("pallas_tile_walk", None, marks=GPU_ONLY),
        pytest.param("pallas_tile_walk", LINKED_GROUPS, marks=GPU_ONLY),
    ],
)
def test_linked_rows_read_the_previous_row_through_the_prefix(impl, groups, monkeypatch):
    """causal_conv1d(continues=, first_inputs=) against every document run whole (float64
    loop): outputs and gradients of x, first_inputs, the weights and the bias; perturbing the
    document that crosses from row 0 into row 1 leaves every other document's outputs and
    gradients, and first_inputs' gradient, bit-identical. With groups, the output comes as
    channel groups and their cotangents go back as such."""
    kernel = impl.removeprefix("pallas_").removesuffix("_interpret")
    if impl.endswith("_interpret"):  # the op's interpreter impl runs vjp.KERNEL
        monkeypatch.setattr("pallas_kernels.causal_conv1d.vjp.KERNEL", kernel)
        impl = "pallas_interpret"
    seg = jnp.asarray(LINKED_ROWS, jnp.int32)
    continues = jnp.asarray(LINKED_CONTINUES)
    (x, first, w, b, cot), y64, want = linked_case(10 if groups is None else sum(groups))
    cots = cot if groups is None else tuple(jnp.split(cot, np.cumsum(groups)[:-1], axis=-1))

    def traced(x_, first_, w_, b_):
        def f(*a):
            return causal_conv1d(
                a[0],
                a[2],
                a[3],
                segment_ids=seg,
                activation="silu",
                impl=impl,
                continues=continues,
                first_inputs=a[1],
                groups=groups,
            )

        y, vjp = jax.vjp(f, x_, first_, w_, b_)
        return y, vjp(cots)

    def run(*a):  # `kernel` in the key: the monkeypatched vjp.KERNEL decides what is traced
        return compiled(("linked", impl, kernel, groups), traced, *a)(*a)

    def joined(y):
        return y if groups is None else jnp.concatenate(y, -1)

    y, grads = run(x, first, w, b)
    y = joined(y)
    if impl != "xla":
        jaxpr = str(jax.make_jaxpr(traced)(x, first, w, b))
        called = re.findall(r"name=(causal_conv1d\w*)", jaxpr)
        assert sorted(set(called)) == KERNEL_NAMES[kernel], called
        # The groups' cotangents go to the backward kernel unjoined (only their heads are, for
        # the prefix's gradient).
        assert not re.findall(rf"\[{seg.shape[0]},{seg.shape[1]},\d+\] = concatenate", jaxpr)
    assert rel_err(y, y64) < 1e-5
    for g, g64 in zip(grads, want):
        assert rel_err(g, g64) < 1e-5
    unread = [r for r in range(len(LINKED_ROWS)) if r not in LINKED_READS_FIRST]
    assert not np.asarray(grads[1][np.asarray(unread)]).any()

    y1, grads1 = run(x.at[0, 5:].add(0.5), first, w, b)
    y1 = joined(y1)
    others = np.ones(seg.shape, bool)
    others[0, 5:] = others[1, :2] = False  # document 2: row 0's end, row 1's start
    assert not np.array_equal(y[1, :2], y1[1, :2])
    np.testing.assert_array_equal(np.asarray(y)[others], np.asarray(y1)[others])
    np.testing.assert_array_equal(np.asarray(grads[0])[others], np.asarray(grads1[0])[others])
    np.testing.assert_array_equal(grads[1], grads1[1])


def full_size_ops(text, batch, length):
    """The sorted names of the ops in lowered `text` with a result of a whole (batch, length,
    any) shape."""
    whole = lambda shape: len(shape) >= 3 and shape[:2] == (batch, length)  # noqa: E731
    return sorted(op for op, shapes in lowered_ops(text) if any(map(whole, shapes)))


@pytest.mark.parametrize("impl", ["pallas_walk", "pallas_tile", "pallas_tile_walk"])
def test_links_add_no_full_size_ops_to_the_lowered_conv(impl):
    """Mamba2-1.3b's conv (8 x 2048 x 4352 bf16, groups x, B, C), lowered for CUDA with and
    without links and first_inputs: the linked one has exactly the unlinked one's operations
    on arrays of a whole (b, t, channels) shape, none added (the linked conv once wrote a window
    conv's outputs over the row's head: full-size dynamic_update_slice, pad and add ops)."""
    sds = jax.ShapeDtypeStruct
    batch, length, channels, width = 8, 2048, 4352, 4
    groups = (4096, 128, 128)

    def lowered_ops(linked):
        def loss(x, w, b, seg, continues, first):
            parts = causal_conv1d(
                x,
                w,
                b,
                segment_ids=seg,
                activation="silu",
                impl=impl,
                groups=groups,
                continues=continues if linked else None,
                first_inputs=first if linked else None,
            )
            return groups_sum(parts)

        args = lowering_args(
            batch,
            length,
            channels,
            width,
            sds((batch,), jnp.bool_),
            sds((batch, width - 1, channels), jnp.bfloat16),
        )
        text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2, 5)), *args)
        return full_size_ops(text, batch, length)

    plain, linked = lowered_ops(False), lowered_ops(True)
    assert "stablehlo.custom_call" in plain  # the kernels: the count does see full-size ops
    assert linked == plain


@pytest.mark.parametrize(
    "groups, joined",
    [
        ((4096, 128, 128), False),  # every boundary a multiple of 128: read as they are
        ((4096, 64, 192), True),  # 4160 splits a walking program's 128 channels: joined
    ],
)
def test_tile_walk_backward_reads_the_groups_cotangents_unjoined(groups, joined):
    """tile_walk at mamba2-1.3b's conv shape (8 x 2048 x 4352 bf16, as x, B and C), lowered for
    CUDA: the tile forward writes the groups (64-channel blocks, so that the unaligned groups are
    written by it too) and the walking backward reads their cotangents with no full-size
    concatenate; where a boundary is no multiple of its 128 channels a program, one joins them."""
    batch, length, channels, width = 8, 2048, sum(groups), 4

    def loss(x, w, b, positions):
        parts = causal_conv1d_pallas(
            x,
            w,
            b,
            positions,
            activation="silu",
            kernel_name="tile_walk",
            tile=BLOCKS_64,
            groups=groups,
        )
        assert len(parts) == len(groups)  # the forward wrote them, no split after
        return groups_sum(parts)

    args = lowering_args(batch, length, channels, width)
    text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
    ops = full_size_ops(text, batch, length)
    assert "stablehlo.custom_call" in ops
    assert "stablehlo.slice" not in ops  # nor a split after the forward
    assert ops.count("stablehlo.concatenate") == joined


# The walking backward in blocks of bwd_unroll steps (all of a block's loads first), without and
# with the pipeline (bwd_pipeline: the next block's loads carried through the loop), against one
# step at a time, called directly (kernel.conv_bwd). Rows of 50 steps in EDGE_SEGMENTS: segments
# end on the 16-step chunk edges. (width, chunk, bwd_unroll, channel groups, linked: a prefix
# read by row 0's first run and a dx_tail, silu and bias):
UNROLL_CASES = [
    # 4 blocks of 4, then the w - 1 steps past the chunk (pipelined: the loop's last prefetch)
    (4, 16, 4, (128, 128, 40), True, True),
    # 8 blocks of 2, no step past the chunk (pipelined: the last prefetch reads nothing)
    (1, 16, 2, (200,), False, False),
    (2, 2, 4, (200,), True, True),  # chunk < bwd_unroll: one block of 2 + 1 steps (no loop)
]


def _unroll_mismatches(interpret: bool) -> list[str]:
    """The UNROLL_CASES whose dx, dweight or dbias partials, with or without the pipeline,
    differ in any bit from bwd_unroll=1's without it."""
    seg = np.asarray(segments(EDGE_SEGMENTS))
    batch, length = seg.shape
    starts = np.concatenate([np.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run_start = np.maximum.accumulate(np.where(starts, np.arange(length), 0), axis=1)
    rng = np.random.default_rng(7)

    def normal(*shape):  # numpy's: no eager XLA op to compile
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    mismatches = []
    for width, chunk, bwd_unroll, groups, linked, silu in UNROLL_CASES:
        channels = sum(groups)
        x, w_t, bias = normal(batch, length, channels), normal(width, channels), None
        if silu:
            bias = normal(channels)
        gs = tuple(normal(batch, length, g) for g in groups)
        positions = np.arange(length) - run_start
        prefix = dx_tail = None
        if linked:  # row 0's first run began w - 1 steps before the row
            positions[0, : EDGE_SEGMENTS[0][0]] += width - 1
            prefix, dx_tail = normal(batch, width - 1, channels), normal(batch, width - 1, channels)
        args = (x, w_t, bias, jnp.asarray(positions, jnp.int32), gs, prefix, dx_tail)
        runs = []
        for unroll, pipeline in ((1, False), (bwd_unroll, False), (bwd_unroll, True)):
            st = walk_kernel.Static(
                length=length,
                channels=channels,
                width=width,
                block_e=conv_vjp.BLOCK_E,
                chunk=chunk,
                silu=silu,
                bwd_unroll=unroll,
                bwd_pipeline=pipeline,
            )

            def bwd(*a, st=st):
                return walk_kernel.conv_bwd(
                    *a, st=st, num_warps=conv_vjp.NUM_WARPS, interpret=interpret
                )

            runs.append(compiled(("conv_bwd", st, groups), bwd, *args)(*args))
        for pipeline, run in zip((False, True), runs[1:]):
            for name, a, b in zip(("dx", "dweight", "dbias"), runs[0], run):
                if not np.array_equal(np.asarray(a), np.asarray(b)):
                    mismatches.append(
                        f"{name} of width {width}, chunk {chunk}, unroll {bwd_unroll}, "
                        f"pipeline {pipeline}"
                    )
    return mismatches


def test_walking_backward_in_blocks_is_bit_identical_interpreted():
    """_unroll_mismatches through the interpreter, in a CPU process whose XLA has no FMA
    instructions: XLA on CPU contracts a * b + c into one FMA wherever both land in one fusion,
    and a loop body of one step and of several fuse differently (an ulp apart in places);
    without FMA every op rounds alone."""
    run_without_fma(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_walking_backward_in_blocks_is_bit_identical_on_gpu():
    assert _unroll_mismatches(interpret=False) == []


@pytest.mark.parametrize(
    "bwd_unroll, bwd_pipeline, width", [(None, None, 4), (8, False, 4), (2, False, 1), (4, True, 4)]
)
def test_walking_backward_in_blocks_lowers_for_cuda(monkeypatch, bwd_unroll, bwd_pipeline, width):
    """tile_walk at mamba2-1.3b's conv shape (8 x 2048 x 4352 bf16, as x, B and C, linked rows:
    the groups' cotangents, the prefix and dx_tail all read in a block's loads; width 1 reads
    no prefix), lowered for CUDA with bwd_unroll and bwd_pipeline given or, None,
    vjp.BWD_UNROLL's (4 here) and vjp.BWD_PIPELINE's (False here), which reach the kernel."""
    monkeypatch.setattr(conv_vjp, "BWD_UNROLL", 4)
    monkeypatch.setattr(conv_vjp, "BWD_PIPELINE", False)
    blocks = []  # (bwd_unroll, bwd_pipeline) of each backward kernel
    conv_bwd = walk_kernel.conv_bwd

    def spy(*args, st, **kw):
        blocks.append((st.bwd_unroll, st.bwd_pipeline))
        return conv_bwd(*args, st=st, **kw)

    monkeypatch.setattr(walk_kernel, "conv_bwd", spy)
    sds = jax.ShapeDtypeStruct
    batch, length, groups = 8, 2048, (4096, 128, 128)
    channels = sum(groups)

    def loss(x, w, b, positions, prefix, linked):
        parts = causal_conv1d_pallas(
            x,
            w,
            b,
            positions,
            activation="silu",
            prefix=prefix,
            linked=linked,
            kernel_name="tile_walk",
            groups=groups,
            bwd_unroll=bwd_unroll,
            bwd_pipeline=bwd_pipeline,
        )
        return groups_sum(parts)

    args = lowering_args(
        batch,
        length,
        channels,
        width,
        sds((batch, width - 1, channels), jnp.bfloat16),
        sds((batch, width - 1), jnp.bool_),
    )
    text = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2, 4)), *args)
    names = re.findall(r'name = "(causal_conv1d_[a-z_]+)"', text)
    assert sorted(names) == KERNEL_NAMES["tile_walk"], names
    assert blocks == [(bwd_unroll or 4, bool(bwd_pipeline))]


if __name__ == "__main__":  # test_walking_backward_in_blocks_is_bit_identical_interpreted's process
    mismatches = _unroll_mismatches(interpret=True)
    sys.exit(f"bwd_unroll > 1 or the pipeline differs from 1 in {mismatches}" if mismatches else 0)
