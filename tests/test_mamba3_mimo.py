"""The Mamba-3 MIMO reference (rank R) against a per-step float64 loop of its recurrence: outputs,
per-slot initial and final states and gradients, packed, in both forms (R^2 SSD heads and the
fused (L R)-long axis); isolation; argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_packmamba.ops.mamba3 import (
    Mamba3State,
    _mimo,
    mamba3_mimo_scan,
    mamba3_mimo_scan_reference,
)
from jax_packmamba.ops.ssd_scan import ssd_chunked
from tests.compiled import compiled
from tests.loops import mamba3_mimo_loop, rel_err
from tests.test_mamba3_reference import CHUNK, segment_rows

RANK = 2
NAMES = (
    "x", "dt", "A", "trap", "B", "C", "angles", "x_proj", "D", "z", "z_proj", "out_proj",
    "B_bias", "C_bias",
)  # fmt: skip


def mimo_inputs(
    seed, batch=2, length=21, heads=4, headdim=4, groups=2, d_state=8, n_angles=2, rank=RANK
):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    per_token = (batch, length, heads)
    return dict(
        x=normal(batch, length, heads, headdim),
        dt=jax.nn.softplus(normal(*per_token, scale=0.5) - 1.0),
        A=-jax.nn.softplus(normal(*per_token)),
        trap=normal(*per_token),
        B=normal(batch, length, rank, groups, d_state),
        C=normal(batch, length, rank, groups, d_state),
        angles=normal(batch, length, heads, n_angles),
        x_proj=normal(heads, rank, headdim),
        D=normal(heads),
        z=normal(batch, length, heads, headdim),
        z_proj=normal(heads, rank, headdim),
        out_proj=normal(heads, rank, headdim),
        B_bias=normal(heads, rank, d_state, scale=0.5),
        C_bias=normal(heads, rank, d_state, scale=0.5),
    )


def mimo_states(seed, batch, slots, heads=4, headdim=4, d_state=8, n_angles=2, rank=RANK):
    rng = np.random.default_rng(seed)
    shapes = dict(
        ssm=(batch, slots, heads, headdim, d_state),
        k=(batch, slots, rank, heads, d_state),
        x=(batch, slots, heads, headdim),
        angle=(batch, slots, heads, n_angles),
    )
    return Mamba3State(
        **{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    )


@pytest.mark.parametrize("fused", [False, True])
def test_mamba3_mimo_matches_float64_loop(fused):
    """Packed rows with per-slot initial states: outputs, final states and the gradients of
    everything (random cotangents) against the float64 loop and jax.grad of it, for the R^2
    heads (the public op's reference) and the fused form (mamba3_mimo_scan_reference's
    fused=True, the kernels' layout; its flattened chunks of 2 CHUNK tokens end where the
    packed rows' runs do)."""
    args = mimo_inputs(0)
    seg = segment_rows(2)
    slots = 6
    init = mimo_states(1, 2, slots)
    rng = np.random.default_rng(2)
    cot_y = rng.standard_normal(args["x"].shape)
    cot_f = [rng.standard_normal(a.shape) for a in init]
    ids = np.asarray(seg)
    last = np.array(
        [
            [np.nonzero(ids[b] == s)[0][-1] if (ids[b] == s).any() else -1 for s in range(slots)]
            for b in range(2)
        ]
    )
    present, rows, where = last >= 0, np.arange(2)[:, None], np.maximum(last, 0)

    def ours(a, init):
        scan = (
            functools.partial(mamba3_mimo_scan_reference, fused=True) if fused else mamba3_mimo_scan
        )
        y, final = scan(
            **a,
            segment_ids=seg,
            chunk_size=CHUNK,
            initial_states=init,
            return_final_states=True,
            num_segments=slots,
        )
        loss = jnp.sum(y * cot_y) + sum(jnp.sum(v * c) for v, c in zip(final, cot_f))
        return loss, (y, final)

    def loop(a, init):
        y, states = mamba3_mimo_loop(**a, segment_ids=seg, initial_states=init)
        loss = jnp.sum(y * cot_y)
        finals = []
        for state, c in zip(states, cot_f):
            picked = state[rows, where]
            mask = present.reshape(*present.shape, *[1] * (picked.ndim - 2))
            finals.append(jnp.where(mask, picked, 0.0))
            loss = loss + jnp.sum(finals[-1] * c)
        return loss, (y, finals)

    # Compiled with XLA's backend optimisations off on CPU (tests/compiled.py).
    grad = jax.grad(ours, argnums=(0, 1), has_aux=True)
    g_ours, (y, final) = compiled(("mimo_grads", fused), grad, args, init)(args, init)
    with jax.enable_x64(True):
        a64 = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
        i64 = Mamba3State(*(jnp.asarray(v, jnp.float64) for v in init))
        grad = jax.grad(loop, argnums=(0, 1), has_aux=True)
        g_ref, (y_ref, final_ref) = compiled(("mimo_loop_grads",), grad, a64, i64)(a64, i64)
        g_ref, y_ref, final_ref = jax.tree.map(np.asarray, (g_ref, y_ref, final_ref))
    assert rel_err(y, y_ref) < 1e-5
    final_ref[3] = np.mod(final_ref[3], 2 * np.pi)
    for name, got, want in zip(Mamba3State._fields, final, final_ref):
        assert rel_err(got, want) < 1e-5, name
    for k in NAMES:
        assert rel_err(g_ours[0][k], g_ref[0][k]) < 1e-4, k
    for name, got, want in zip(Mamba3State._fields, g_ours[1], g_ref[1]):
        assert rel_err(got, want) < 1e-4, name


@pytest.mark.parametrize("fused", [False, True])
def test_mamba3_mimo_alone_and_isolation(fused):
    """No initial states, per-rank outputs (no out_proj), either form: a run alone equals its
    slice of the packed row, and perturbing one run leaves the others' outputs bit-identical."""
    args = mimo_inputs(3, batch=1)
    args["out_proj"] = None
    seg = segment_rows(1)
    op = functools.partial(mamba3_mimo_scan_reference, fused=True) if fused else mamba3_mimo_scan

    def scan(segment_ids=None, **a):
        fn = lambda a, seg: op(**a, segment_ids=seg, chunk_size=CHUNK)  # noqa: E731
        return compiled(("mimo_alone", fused), fn, a, segment_ids)(a, segment_ids)

    y = scan(**args, segment_ids=seg)  # (1, t, R, h, p)
    ids = np.asarray(seg[0])
    where = np.nonzero(ids == 3)[0]  # 8 tokens from chunk edge to edge
    span = slice(where[0], where[-1] + 1)
    alone = {
        k: (v[:, span] if v is not None and v.ndim >= 3 and v.shape[0] == 1 else v)
        for k, v in args.items()
    }
    np.testing.assert_allclose(y[:, where[0] : where[-1] + 1], scan(**alone), rtol=1e-5, atol=1e-6)
    in_run = (ids == 3)[None]
    bumped = dict(args)
    for k in ("x", "dt", "A", "trap", "B", "C", "angles", "z"):
        mask = in_run.reshape(in_run.shape + (1,) * (args[k].ndim - 2))
        bumped[k] = jnp.where(mask, args[k] + 0.5, args[k])
    y2 = scan(**bumped, segment_ids=seg)
    assert not np.array_equal(y[0, in_run[0]], y2[0, in_run[0]])
    np.testing.assert_array_equal(y[0, ~in_run[0]], y2[0, ~in_run[0]])


def test_mamba3_mimo_argument_checks():
    args = mimo_inputs(4, batch=1, length=5)
    with pytest.raises(ValueError, match="x_proj must have shape"):
        mamba3_mimo_scan(**{**args, "x_proj": args["x_proj"][:, :1]})
    with pytest.raises(ValueError, match="B must be"):
        mamba3_mimo_scan(**{**args, "B": args["B"][:, :, 0]})
    with pytest.raises(ValueError, match="z needs z_proj"):
        mamba3_mimo_scan(**{**args, "z_proj": None})


def test_mamba3_mimo_fused_form_on_chunks_that_cut_steps():
    """The fused form's algebra does not need chunk edges on step edges (the kernels round a
    flattened chunk of chunk_size R tokens up to a power of two, which cuts steps for R = 3):
    its SSD core on 7-token chunks at rank 2 and 3 gives the R^2 heads' outputs and final
    states, with initial states and packed rows."""
    slots = 6
    seg = segment_rows(2)

    def on_7_token_chunks(*args, chunk_size, **kwargs):
        return ssd_chunked(*args, chunk_size=7, **kwargs)

    for rank in (2, 3):
        args = mimo_inputs(5, rank=rank)
        init = mimo_states(6, 2, slots, rank=rank)
        flags = dict(chunk_size=CHUNK, return_final_states=True, num_segments=slots)
        arrays = dict(segment_ids=seg, initial_states=init)  # arguments: compiled, not static

        def reference(a, arrays):
            return mamba3_mimo_scan_reference(**a, **arrays, **flags)

        want = compiled(("mimo_reference",), reference, args, arrays)(args, arrays)
        names = ("x", "dt", "A", "trap", "B", "C", "angles", "x_proj", "D", "z", "z_proj")
        names += ("out_proj", "B_bias", "C_bias")
        xs = [args[k] for k in names]
        fn = functools.partial(_mimo, on_7_token_chunks, fused=True, **flags)
        got = compiled(("mimo_7_token_chunks",), lambda xs, a: fn(*xs, **a), xs, arrays)(xs, arrays)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert rel_err(a, b) < 1e-5, rank
