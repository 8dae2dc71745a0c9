"""The SSD chunk-scan forward on Pallas Mosaic GPU (wgmma, TMA, mbarriers): a second
implementation of kernel.chunk_scan with the same inputs, outputs and math.

Per (row block of 64 outputs, head, batch row x chunk) program, one warpgroup:

  acc  = 2^(cs_l) [l entered] (C_l h_in^T)                  one wgmma, only if a row entered
  acc += sum_j W_j X_j,  W_j[l, s] = CB[l, s] 2^(cs_l - cs_s) dt'_s [s <= l, s in l's run]
  y    = acc + D x_l (+ y_add_l);  y_pre = y;  y *= silu(z_l)

X_j (64 tokens x headdim) and the C B^T tile come in by TMA into 128-byte-swizzled SMEM; W_j is
built in registers (the WGMMA layout) and stored to SMEM as the wgmma's A operand, X_j its B
operand. The s blocks run from the diagonal one down to the block holding the start of the run
of the block's first row (earlier blocks hold no unmasked pair; the Triton kernel skips them
too); the diagonal block's copies start first, as it is always needed, and each block's copies
are issued while the previous block is multiplied (two slots); the diagonal block's x tile also
gives D x_l. The design is for residency: 67 KiB of SMEM a program (three an SM as far as SMEM
goes; registers may allow fewer, see DESIGN.md), the epilogue's z and y_add loaded straight into
registers, the outputs staged in the x slots.

What differs from the Triton kernel, and why:
- No masked loads: the glue pads x, z, C and y_add to whole chunks (a no-op when the length is a
  chunk multiple) and slices y; padded rows read dt' = 0 and are never part of a real row's run.
- h_in (float32) is rounded to the matmul dtype in SMEM (registers in between), as the Triton
  kernel's `.astype(mm)` does before its dot.
- wgmma takes 16-bit operands here (float32 would run as TF32), so only bfloat16 and float16
  inputs are taken; headdim and d_state must be multiples of 64 (one 128-byte swizzle row of
  bf16) and the chunk a multiple of 64 (wgmma's M; vjp.make_plan raises a short sequence's
  chunk to 64).

Exactness: every decay is exp2 of a masked exponent, so masked pairs are exact zeros, and a
skipped block or a not-entered row adds nothing; a token's output reads only its own run's
inputs (and the state entering the chunk when its run entered it), like the Triton kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ssd.kernel import Static

F32 = jnp.float32
BLOCK = 64  # rows of an output block and of an s block: wgmma's M for one warpgroup
SWIZZLE = 128
MM_DTYPES = ("bfloat16", "float16")


def check_supported(st: Static) -> None:
    """ValueError naming the value when the Mosaic kernel cannot take these shapes/dtypes."""
    if st.mm_dtype not in MM_DTYPES:
        raise ValueError(
            f"the Mosaic GPU chunk scan needs x in one of {MM_DTYPES} (wgmma runs "
            f"float32 as TF32), got {st.mm_dtype}"
        )
    for name, v in (("headdim", st.headdim), ("d_state", st.d_state), ("chunk", st.chunk)):
        if v % BLOCK:
            raise ValueError(
                f"the Mosaic GPU chunk scan needs {name}={v} to be a multiple of {BLOCK}"
            )
    if st.headdim > 256:
        raise ValueError(f"the Mosaic GPU chunk scan needs headdim={st.headdim} <= 256 (wgmma N)")


def _smem(shape, dtype):
    """SMEM buffer in the swizzled, tiled layout wgmma and TMA share."""
    dtype = jnp.dtype(dtype)
    tile = SWIZZLE // dtype.itemsize
    return plgpu.SMEM(
        shape, dtype, transforms=(plgpu.TilingTransform((8, tile)), plgpu.SwizzleTransform(SWIZZLE))
    )


def _rows(v, shape):
    return lax.broadcast_in_dim(v, shape, (0,))


def _cols(v, shape):
    return lax.broadcast_in_dim(v, shape, (1,))


def _kernel(*refs, names, st: Static):
    n_in = len(names["in"])
    r = dict(zip(names["in"], refs[:n_in]))
    has_seg, has_z, has_y_add, has_D = ("seg_lo" in r, "z" in r, "y_add" in r, "D" in r)
    o = dict(zip(names["out"], refs[n_in : n_in + len(names["out"])]))
    scratch = refs[n_in + len(names["out"]) :]
    ((c_s, hin_s), w_s), cb_s, x_s, vec_s, lo_s, dp_s, bar_rows, bar_inter, bar_blk = scratch
    mm = jnp.dtype(st.mm_dtype)
    L, p = st.chunk, st.headdim
    i = lax.axis_index("row")
    h = lax.axis_index("head")
    bc = lax.axis_index("bc")
    b = lax.div(bc, jnp.int32(st.n_chunks))
    c = lax.rem(bc, jnp.int32(st.n_chunks))
    g = lax.div(h, jnp.int32(st.per_group))
    c0 = c * L
    l0 = i * BLOCK
    t0 = c0 + l0
    rows = pl.ds(t0, BLOCK)
    tile = (BLOCK, BLOCK)
    # vec_s rows: 0 cs_l; 1 + 2 slot cs_s, 2 + 2 slot dt'_s.
    csl_s = vec_s.at[0]

    def issue(j, slot):
        s = pl.ds(c0 + j * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(
            r["cb"].at[b, c, g, pl.ds(l0, BLOCK), pl.ds(j * BLOCK, BLOCK)],
            cb_s.at[slot],
            bar_blk.at[slot],
        )
        plgpu.copy_gmem_to_smem(r["x"].at[b, s, h], x_s.at[slot], bar_blk.at[slot])
        plgpu.copy_gmem_to_smem(r["cs"].at[b, h, s], vec_s.at[1 + 2 * slot], bar_blk.at[slot])
        plgpu.copy_gmem_to_smem(r["dtp"].at[b, h, s], vec_s.at[2 + 2 * slot], bar_blk.at[slot])

    # The s blocks run from the diagonal one (always needed: its copies start before anything
    # else is known) down to the first block of the run of the block's first row.
    issue(i, 0)
    plgpu.copy_gmem_to_smem(r["cs"].at[b, h, rows], csl_s, bar_rows)
    if has_seg:
        plgpu.copy_gmem_to_smem(r["seg_lo"].at[b, rows], lo_s, bar_rows)
        lo_first = r["seg_lo"][b, t0]  # runs only grow along a chunk: the block's earliest
    else:
        lo_first = -jnp.minimum(c, 1)  # 0 in a row's first chunk, entered (-1) after it
    if st.d_per_p:
        plgpu.copy_gmem_to_smem(r["D"].at[h], dp_s, bar_rows)
    entered = lo_first < 0

    @pl.when(entered)
    def _():
        plgpu.copy_gmem_to_smem(r["C"].at[b, rows, g], c_s, bar_inter)

    n_steps = i + 1 - lax.div(jnp.maximum(lo_first, 0), jnp.int32(BLOCK))

    def rows_to_registers(ref):
        # Epilogue operands go GMEM -> registers, issued now so that their latency hides
        # behind the matmuls: an SMEM buffer each would cost residency (see below).
        return plgpu.load(ref.at[b, rows, h], layout=plgpu.Layout.WGMMA, optimized=False)

    z = rows_to_registers(r["z"]) if has_z else None
    y_add = rows_to_registers(r["y_add"]) if has_y_add else None

    @pl.when(entered)
    def _():
        # h_in rounded to the matmul dtype (as the Triton kernel's dot operand) while the copies
        # above fly. It goes GMEM -> registers -> SMEM: a float32 SMEM copy by TMA would be 32
        # KiB more a program, measured 1.5x slower for the lost residency.
        hin = plgpu.load(r["h_in"].at[b, c, h], layout=plgpu.Layout.WGMMA, optimized=False)
        hin_s[...] = hin.astype(mm)
        plgpu.commit_smem()

    plgpu.barrier_wait(bar_rows)
    cs_l = plgpu.load(csl_s, layout=plgpu.Layout.WGMMA.reduce(1))
    if has_seg:
        lo_l = plgpu.load(lo_s, layout=plgpu.Layout.WGMMA.reduce(1))
    else:
        lo_l = plgpu.layout_cast(
            jnp.full((BLOCK,), lo_first, jnp.int32), plgpu.Layout.WGMMA.reduce(1)
        )

    def inter():
        plgpu.barrier_wait(bar_inter)

        def mm_inter(acc_ref):
            plgpu.wgmma(acc_ref, c_s, hin_s.transpose((1, 0)))
            return acc_ref[...]  # waits for the wgmma: W may reuse this SMEM after it

        ch = pl.run_scoped(mm_inter, plgpu.ACC((BLOCK, p), F32))
        scale = jnp.exp2(jnp.where(lo_l < 0, cs_l, -jnp.inf))
        return ch * _rows(scale, ch.shape)

    zero = plgpu.layout_cast(jnp.zeros((BLOCK, p), F32), plgpu.Layout.WGMMA)
    y_inter = lax.cond(entered, inter, lambda: zero)
    lo_l = jnp.maximum(lo_l, 0)

    def step(k, acc_ref, y_base=None):
        """s block j = i - k from slot k % 2; with y_base (the diagonal block, k = 0), also
        returns y_base + D x_l from its x tile, before the slot is reused."""
        j = i - k
        slot = lax.rem(k, 2)
        plgpu.barrier_wait(bar_blk.at[slot])
        cb = cb_s.at[slot][...].astype(F32)
        cs_sv = plgpu.load(vec_s.at[1 + 2 * slot], layout=plgpu.Layout.WGMMA.reduce(0))
        dt_sv = plgpu.load(vec_s.at[2 + 2 * slot], layout=plgpu.Layout.WGMMA.reduce(0))
        # Broadcasts made here, not hoisted out of the loop: held across it they would cost
        # 128 registers a thread, more than three resident programs an SM leave.
        pos_l = l0 + plgpu.broadcasted_iota(jnp.int32, tile, 0, layout=plgpu.Layout.WGMMA)
        pos_s = j * BLOCK + plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
        mask = (pos_s <= pos_l) & (pos_s >= _rows(lo_l, tile))
        decay = jnp.exp2(jnp.where(mask, _rows(cs_l, tile) - _cols(cs_sv, tile), -jnp.inf))
        w = jnp.where(mask, cb * decay * _cols(dt_sv, tile), 0.0).astype(mm)
        if y_base is not None and has_D:
            x_l = x_s.at[slot][...].astype(F32)
            if st.d_per_p:
                d = plgpu.load(dp_s, layout=plgpu.Layout.WGMMA.reduce(0))
                y_base = y_base + _cols(d, y_base.shape) * x_l
            else:
                y_base = y_base + r["D"][h] * x_l
        # The previous block's wgmma read W's buffer and the other slot: it must be done before
        # they are overwritten (this block's W was built meanwhile).
        plgpu.wgmma_wait(0)

        @pl.when(k + 1 < n_steps)
        def _():
            issue(j - 1, 1 - slot)

        # W goes through SMEM: the interpreter's wgmma takes SMEM operands only, and so the
        # kernel the CPU tests run is the one the GPU runs.
        w_s[...] = w
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, w_s, x_s.at[slot])
        return y_base

    def intra(acc_ref):
        y_base = step(jnp.int32(0), acc_ref, y_inter)
        lax.fori_loop(1, n_steps, lambda k, carry: (step(k, acc_ref), carry)[1], 0)
        return acc_ref[...] + y_base

    y = pl.run_scoped(intra, plgpu.ACC((BLOCK, p), F32))
    # Both x slots are free now and hold the outputs on their way out.
    y_s, ypre_s = x_s.at[0], x_s.at[1]
    if has_y_add:
        y = y + y_add
    if has_z:
        ypre_s[...] = y.astype(mm)
        z = z.astype(F32)
        y = y * (z * (1.0 / (1.0 + jnp.exp(-z))))
    y_s[...] = y.astype(mm)
    plgpu.commit_smem()
    if has_z:
        plgpu.copy_smem_to_gmem(ypre_s, o["y_pre"].at[b, rows, h])
    plgpu.copy_smem_to_gmem(y_s, o["y"].at[b, rows, h])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the program may end before the writes


def _pad_rows(a, padded):
    if a is None or a.shape[1] == padded:
        return a
    return jnp.pad(a, ((0, 0), (0, padded - a.shape[1])) + ((0, 0),) * (a.ndim - 2))


def chunk_scan(inputs: dict, *, st: Static, y_dtype, interpret: bool = False):
    """Same contract as kernel.chunk_scan: y (b, t, h, p) and, with z, y_pre (or None).
    interpret: run in the Mosaic GPU interpreter (CPU)."""
    check_supported(st)
    if jnp.dtype(y_dtype) != jnp.dtype(st.mm_dtype):
        raise ValueError(f"y_dtype={jnp.dtype(y_dtype)} must be x's dtype {st.mm_dtype}")
    T = st.padded
    ins = {k: v for k, v in inputs.items() if v is not None}
    for k in ("x", "z", "C", "y_add"):
        if k in ins:
            ins[k] = _pad_rows(ins[k], T)
    for k in ("h_in", "cs", "dtp", "y_add"):
        if k in ins:
            ins[k] = ins[k].astype(F32)
    mm = jnp.dtype(st.mm_dtype)
    rows = jax.ShapeDtypeStruct((st.batch, T, st.heads, st.headdim), mm)
    out_names = ("y", "y_pre") if "z" in ins else ("y",)
    out_type = tuple(rows for _ in out_names)
    p, n = st.headdim, st.d_state
    # SMEM a program (each buffer rounded up to 1 KiB): 32 KiB of C and h_in (W reuses it after
    # the inter-chunk matmul), 2 x 8 KiB of C B^T and of x, 3 KiB of vectors: 67 KiB, three
    # programs an SM. Measured: one fewer resident program costs more than any copy it saves.
    scratch = (
        plgpu.RefUnion((_smem((BLOCK, n), mm), _smem((p, n), mm)), _smem((BLOCK, BLOCK), mm)),
        _smem((2, BLOCK, BLOCK), ins["cb"].dtype),
        _smem((2, BLOCK, p), mm),  # x of the s block, then y and y_pre
        plgpu.SMEM((5, BLOCK), F32),  # cs_l, then cs_s and dt'_s of the two slots
        plgpu.SMEM((BLOCK,), jnp.int32) if "seg_lo" in ins else None,  # seg_lo_l
        plgpu.SMEM((p,), F32) if st.d_per_p else None,  # per-channel D
        plgpu.Barrier(num_arrivals=1 + ("seg_lo" in ins) + st.d_per_p),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=4, num_barriers=2),
    )
    names = {"in": tuple(ins), "out": out_names}
    call = plgpu.kernel(
        lambda *refs: _kernel(*refs, names=names, st=st),
        out_type=out_type,
        scratch_types=scratch,
        grid=(st.chunk // BLOCK, st.heads, st.batch * st.n_chunks),
        grid_names=("row", "head", "bc"),
        kernel_name="ssd_chunk_scan_mgpu",
    )
    if interpret:
        # plgpu.kernel's own interpret= does not reach its lowering in jax 0.11.2; the context
        # does (jax's tests/pallas/gpu_pallas_interpret_test.py uses it the same way).
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            outs = call(*ins.values())
    else:
        outs = call(*ins.values())
    outs = tuple(o[:, : st.length] if T != st.length else o for o in outs)
    return (outs[0], outs[1]) if "z" in ins else (outs[0], None)
