"""The Mosaic GPU chunk-scan forward (pallas_kernels/ssd/chunk_scan_mgpu.py, selected by
SSDConfig(chunk_scan_backend="mosaic")) against the float64 loop, the Triton kernel and itself.

On CPU the kernel runs in the Mosaic GPU interpreter ("interpret"); the "gpu" twins run the same
tests on a GPU and skip without one. The interpreter accepts things the GPU lowering refuses, so
test_lowers_for_cuda also lowers the kernel for CUDA on this machine (jax.export), which checks
the layouts and primitives Mosaic GPU can compile (not what ptxas says). The other kernels of the
forward (cumulative decays, C B^T, chunk states, state passing) are the Triton ones, through
their interpreter.

Shapes satisfy wgmma's: 64-row blocks, headdim and d_state 64, chunks of 128 (two row blocks, so
a row block loops over one or two s blocks through both copy slots) with a ragged last chunk.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd import SSDConfig, chunk_scan_mgpu, ssd_scan_pallas
from pallas_kernels.ssd import kernel as ssd_kernel
from pallas_kernels.ssd import vjp as ssd_vjp
from tests.gpu import lower_for_cuda, on_gpu
from tests.loops import rel_err, ssd_scan_loop
from tests.test_ssd_impls import (
    Case,
    compiled,
    ids_from_lengths,
    last_states,
    make_args,
    normal,
    present,
    random_segments,
)

IMPLS = ["interpret", on_gpu("gpu")]
MOSAIC = SSDConfig(chunk=128, chunk_scan_backend="mosaic")
# Everything on: two groups of two heads, 6 slots with initial and final states (the kernel's
# y_add input), z, D, dt_bias, softplus; 150 tokens = one chunk of 128 and a ragged one.
CASE = Case(2, 150, 4, 64, 2, 64, "bfloat16", num_segments=6, config=MOSAIC)
TOL = 1e-2  # bf16 outputs and bf16 matmul operands (test_ssd_impls.tolerance)


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def forward(impl: str, config: SSDConfig, names):
    def run(arrays, seg):
        return ssd_scan_pallas(
            **dict(zip(names, arrays)),
            dt_softplus=True,
            segment_ids=seg,
            return_final_states=True,
            num_segments=CASE.num_segments,
            interpret=impl == "interpret",
            config=config,
        )

    return run


def outputs(impl: str, args: dict, seg, config: SSDConfig = MOSAIC):
    """(y, final states), compiled once per implementation and backend."""
    names = present(args)
    arrays = [args[k] for k in names]
    fn = compiled(
        ("mosaic_fwd", impl, config.chunk_scan_backend), forward(impl, config, names), arrays, seg
    )
    return fn(arrays, seg)


@jax.jit
def _loop(a, seg, init):
    y, states = ssd_scan_loop(**a, dt_softplus=True, segment_ids=seg, initial_states=init)
    return y, last_states(states, seg, CASE.num_segments)


def loop_outputs(args: dict, seg):
    with jax.enable_x64(True):
        a = {k: jnp.asarray(v, jnp.float64) for k, v in args.items() if v is not None}
        init = a.pop("initial_states")
        return jax.tree.map(np.asarray, _loop(a, seg, init))


def check_against_loop(impl, seg, seed):
    args = make_args(CASE, seed)
    y, final = outputs(impl, args, seg)
    y64, final64 = loop_outputs(args, seg)
    errs = dict(y=rel_err(y, y64), final=rel_err(final, final64))
    print(impl, errs)
    assert y.dtype == jnp.bfloat16 and y.shape == args["x"].shape
    for name, e in errs.items():
        assert np.isfinite(e) and e < TOL, (name, e, errs)
    return args, y, final


class TestMosaicChunkScan:
    def test_matches_float64_loop(self, impl):
        """Random runs (some one token long, ids reused) and a slot that never occurs."""
        seg = random_segments(CASE, 21)
        assert np.any(np.diff(np.flatnonzero(np.diff(np.asarray(seg)[0]) != 0)) == 1)
        check_against_loop(impl, seg, seed=21)

    def test_boundaries_on_chunk_and_block_edges(self, impl):
        # Chunks of 128 in 64-row blocks: row 0 has boundaries at 64 (a block edge) and 128 (a
        # chunk edge) and a one-token run at 128; row 1 one run across the chunk edge (every
        # row block of chunk 1 reads the incoming state) and a one-token last run.
        row0 = np.repeat([0, 1, 2, 3, 4], [64, 64, 1, 20, 1])
        row1 = np.repeat([5, 1], [149, 1])
        seg = jnp.asarray(np.stack([row0, row1]), jnp.int32)
        check_against_loop(impl, seg, seed=22)

    def test_segments_are_bitwise_isolated(self, impl):
        """Perturbing one segment (its tokens and initial state) changes no bit of any other
        segment's outputs or of the other slots' final states."""
        seg = ids_from_lengths([[60, 1, 40, 20, 29], [5, 59, 1, 9, 76]])
        args = make_args(CASE, 24)
        y0, f0 = outputs(impl, args, seg)
        victim = np.asarray(seg) == 2  # 40 tokens across a block edge in row 0, one in row 1
        noise = normal(25, args["x"].shape, jnp.bfloat16)
        v2, v4 = victim[..., None], victim[..., None, None]
        perturbed = dict(
            args,
            x=jnp.where(v4, args["x"] + noise, args["x"]),
            z=jnp.where(v4, args["z"] - noise, args["z"]),
            dt=jnp.where(v2, args["dt"] + noise[..., 0], args["dt"]),
            B=jnp.where(v4, args["B"] * 1.5 + 0.1, args["B"]),
            C=jnp.where(v4, args["C"] * 1.5 + 0.1, args["C"]),
            initial_states=args["initial_states"].at[:, 2].add(1.0),
        )
        y1, f1 = outputs(impl, perturbed, seg)
        y0, y1 = np.asarray(y0), np.asarray(y1)
        assert not np.array_equal(y0[victim], y1[victim])
        np.testing.assert_array_equal(y0[~victim], y1[~victim])
        others = [s for s in range(CASE.num_segments) if s != 2]
        np.testing.assert_array_equal(np.asarray(f0)[:, others], np.asarray(f1)[:, others])


def test_one_token_rows():
    """Rows of one token (their chunk raised from 16 to 64, 63 rows of padding): y = dt' x (C.B)
    + D x, gated, and the final state dt' x B^T, against the float64 loop."""
    case = dataclasses.replace(CASE, length=1, num_segments=2)
    args = make_args(case, 31)
    seg = jnp.zeros((case.batch, 1), jnp.int32)
    y, final = ssd_scan_pallas(
        **{k: v for k, v in args.items() if v is not None},
        dt_softplus=True,
        segment_ids=seg,
        return_final_states=True,
        num_segments=2,
        interpret=True,
        config=MOSAIC,
    )
    with jax.enable_x64(True):
        a = {k: jnp.asarray(v, jnp.float64) for k, v in args.items() if v is not None}
        init = a.pop("initial_states")
        y64, states = ssd_scan_loop(**a, dt_softplus=True, segment_ids=seg, initial_states=init)
        final64 = last_states(states, seg, 2)
    assert y.shape == args["x"].shape
    assert rel_err(y, y64) < TOL and rel_err(final, final64) < TOL


def kernel_inputs(seed, *, seg: bool, d_per_p: bool, batch=1, length=200, heads=2, chunk=128):
    """(Static, inputs) of the chunk-scan kernels, made by the Triton kernels before them."""
    rng = np.random.default_rng(seed)
    p = n = 64

    def rnd(shape, scale=1.0, dtype=jnp.bfloat16):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32).astype(dtype)

    x, z = rnd((batch, length, heads, p)), rnd((batch, length, heads, p))
    dt = rnd((batch, length, heads), 0.5)
    B, C = rnd((batch, length, 1, n)), rnd((batch, length, 1, n))
    A = -jnp.exp(rnd((heads,), 0.5, jnp.float32))
    D = rnd((heads, p) if d_per_p else (heads,), 1.0, jnp.float32)
    bias = rnd((heads,), 0.3, jnp.float32)
    ids = None
    if seg:
        cuts = np.sort(rng.choice(np.arange(1, length), size=length // 16, replace=False))
        ids = jnp.asarray(
            np.searchsorted(cuts, np.arange(length), side="right")[None].repeat(batch, 0), jnp.int32
        )
    plan = ssd_vjp.make_plan(
        x,
        B,
        D,
        dt_softplus=True,
        chunk_size=chunk,
        has_init=False,
        return_states=False,
        interpret=True,
        config=SSDConfig(chunk=chunk),
    )
    st = plan.st
    seg_lo = None if ids is None else ssd_vjp.segment_bounds(ids, st.chunk, st.padded)[0]
    cs, dtp = ssd_vjp._cumsum(plan, True, dict(dt=dt, A=A, bias=bias), seg_lo)
    launch = ssd_vjp._launch(plan, True)
    cb = ssd_kernel.chunk_cb(dict(C=C, B=B), st=st, **launch)
    S = ssd_kernel.chunk_states(
        dict(x=x, B=B, cs=cs, dtp=dtp, seg_lo=seg_lo), mode="fwd", st=st, **launch
    )
    decay = ssd_vjp.chunk_decay(cs, seg_lo, st=st)
    h_in, _ = ssd_vjp._pass_states(
        plan, True, S.reshape(batch, st.n_chunks, heads, p * n), decay, None
    )
    h_in = h_in.reshape(batch, st.n_chunks, heads, p, n)
    y_add = rnd((batch, length, heads, p), 0.5, jnp.float32)
    return (
        st,
        plan,
        dict(x=x, z=z, C=C, cb=cb, cs=cs, dtp=dtp, h_in=h_in, D=D, y_add=y_add, seg_lo=seg_lo),
    )


def test_kernel_matches_triton_kernel():
    """Kernel against kernel, y and the pre-gate y_pre, both in their interpreters, on what the
    op-level tests leave out: no segment ids (the second chunk entered), a per-channel D, a
    y_add input, and chunks of 256 where the last row block walks four s blocks (both copy
    slots twice). The benchmark compares the two at its shapes on the GPU."""
    st, plan, ins = kernel_inputs(30, seg=False, d_per_p=True, length=300, chunk=256)
    y_t, yp_t = ssd_kernel.chunk_scan(
        ins, st=st, y_dtype=jnp.bfloat16, **ssd_vjp._launch(plan, True)
    )
    y_m, yp_m = chunk_scan_mgpu.chunk_scan(ins, st=st, y_dtype=jnp.bfloat16, interpret=True)
    assert y_m.shape == y_t.shape and yp_m.shape == yp_t.shape
    assert rel_err(y_m, y_t) < 5e-3 and rel_err(yp_m, yp_t) < 5e-3


def abstract_inputs(st, seg):
    sds, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    b, t, h, p, n, nc, T = (
        st.batch,
        st.length,
        st.heads,
        st.headdim,
        st.d_state,
        st.n_chunks,
        st.padded,
    )
    ins = dict(
        x=sds((b, t, h, p), bf),
        z=sds((b, t, h, p), bf),
        C=sds((b, t, 1, n), bf),
        cb=sds((b, nc, 1, st.chunk, st.chunk), bf),
        cs=sds((b, h, T), f32),
        dtp=sds((b, h, T), f32),
        h_in=sds((b, nc, h, p, n), f32),
        D=sds((h,), f32),
    )
    if seg:
        ins["seg_lo"] = sds((b, T), jnp.int32)
    return ins


@pytest.mark.parametrize("seg", [False, True])
def test_lowers_for_cuda(seg):
    """The kernel at the benchmark's tile sizes (chunk 256, headdim 64, d_state 128, a ragged
    length) lowered for CUDA on this CPU machine: layouts, TMA and wgmma shapes Mosaic GPU
    takes, one Mosaic GPU custom call, the kernel's name."""
    st = ssd_kernel.Static(
        batch=2,
        length=300,
        heads=4,
        headdim=64,
        d_state=128,
        groups=1,
        chunk=256,
        block_l=64,
        block_s=64,
        block_k=64,
        block_state=1024,
        block_heads=16,
        dt_softplus=True,
        d_per_p=False,
        mm_dtype="bfloat16",
        cb_dtype="input",
        fast=True,
    )

    def f(ins):
        return chunk_scan_mgpu.chunk_scan(ins, st=st, y_dtype=jnp.bfloat16)

    text = jax.export.export(jax.jit(f), platforms=["cuda"])(abstract_inputs(st, seg)).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert "ssd_chunk_scan_mgpu" in text


def test_training_path_lowers_with_mosaic_chunk_scan():
    """The public op's forward + backward with the Mosaic chunk scan, lowered for CUDA: the
    Mosaic kernel replaces the Triton ssd_chunk_scan and every other kernel stays."""
    from tests.test_ssd_impls import BACKWARD, FORWARD, lowering_args

    args = lowering_args(b=1, length=300, h=4, p=64, g=1, n=128)

    def loss(*xs):
        *xs, seg = xs
        y = ssd_scan_pallas(
            *xs, dt_softplus=True, segment_ids=seg, config=SSDConfig(chunk_scan_backend="mosaic")
        )
        return y.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.grad(loss, argnums=tuple(range(8))), *args)
    names = re.findall(r'name = "(ssd_[a-z_]+)"', text)
    expected = [k for k in FORWARD if k != "ssd_chunk_scan"] + list(BACKWARD)
    assert sorted(names) == sorted(expected), names
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_refuses_what_it_cannot_run():
    args = make_args(dataclasses.replace(CASE, dtype="float32"), 0)
    with pytest.raises(ValueError, match="float32"):
        ssd_scan_pallas(
            **{k: v for k, v in args.items() if v is not None}, interpret=True, config=MOSAIC
        )
    args = make_args(dataclasses.replace(CASE, headdim=32), 0)
    with pytest.raises(ValueError, match="headdim=32"):
        ssd_scan_pallas(
            **{k: v for k, v in args.items() if v is not None}, interpret=True, config=MOSAIC
        )
    with pytest.raises(ValueError, match="chunk_scan_backend"):
        SSDConfig(chunk_scan_backend="cuda")
