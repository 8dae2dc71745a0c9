"""The SSD chunk-scan forward on Pallas Mosaic GPU (wgmma, TMA, mbarriers): a second
implementation of kernel.chunk_scan with the same inputs, outputs and math.

Per (row block of 64 outputs, head, batch row x chunk) program, one warpgroup:

  acc  = 2^(cs_l) [l entered] (C_l h_in^T)                  one wgmma, only if a row entered
  acc += sum_j W_j X_j,  W_j[l, s] = CB[l, s] 2^(cs_l - cs_s) dt'_s [s <= l, s in l's run]
  y    = acc + D x_l (+ y_add_l);  y_pre = y;  y *= silu(z_l)

X_j (64 tokens x headdim) and the C B^T tile come in by TMA into 128-byte-swizzled SMEM; W_j is
built in registers (the WGMMA layout) and is the wgmma's A operand, X_j its B operand. The s
blocks before the run of the block's first row hold no unmasked pair and are skipped (as the
Triton kernel does), the next block's copies are issued before the current block's wgmma (two
slots), and the diagonal block's x tile is reused for D x_l.

What differs from the Triton kernel, and why:
- No masked loads: the glue pads x, z, C and y_add to whole chunks (a no-op when the length is a
  chunk multiple) and slices y; padded rows read dt' = 0 and are never part of a real row's run.
- h_in (float32) is rounded to the matmul dtype in SMEM (registers in between), as the Triton
  kernel's `.astype(mm)` does before its dot.
- wgmma takes 16-bit operands here (float32 would run as TF32), so only bfloat16 and float16
  inputs are taken; headdim and d_state must be multiples of 64 (one 128-byte swizzle row of
  bf16) and the chunk a multiple of 64 (wgmma's M).

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
        raise ValueError(f"the Mosaic GPU chunk scan needs x in one of {MM_DTYPES} (wgmma runs "
                         f"float32 as TF32), got {st.mm_dtype}")
    for name, v in (("headdim", st.headdim), ("d_state", st.d_state), ("chunk", st.chunk)):
        if v % BLOCK:
            raise ValueError(f"the Mosaic GPU chunk scan needs {name}={v} to be a multiple of "
                             f"{BLOCK}")
    if st.headdim > 256:
        raise ValueError(f"the Mosaic GPU chunk scan needs headdim={st.headdim} <= 256 (wgmma N)")


def _smem(shape, dtype):
    """SMEM buffer in the swizzled, tiled layout wgmma and TMA share."""
    dtype = jnp.dtype(dtype)
    tile = SWIZZLE // dtype.itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, tile)),
                                                plgpu.SwizzleTransform(SWIZZLE)))


def _rows(v, shape):
    return lax.broadcast_in_dim(v, shape, (0,))


def _cols(v, shape):
    return lax.broadcast_in_dim(v, shape, (1,))


def _kernel(*refs, names, st: Static, h_in_path: str):
    n_in = len(names["in"])
    r = dict(zip(names["in"], refs[:n_in]))
    o = dict(zip(names["out"], refs[n_in:n_in + len(names["out"])]))
    scratch = refs[n_in + len(names["out"]):]
    (c_s, hin_s, hin32_s, cb_s, x_s, w_s, cs_s, dt_s, csl_s, lo_s, dp_s, yadd_s, z_s, ypre_s, y_s,
     bar_rows, bar_inter, bar_blk) = scratch
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

    # The row data: cs_l, seg_lo_l, and what the epilogue reads; all independent of the loop.
    plgpu.copy_gmem_to_smem(r["cs"].at[b, h, rows], csl_s, bar_rows)
    if st.has_seg:
        plgpu.copy_gmem_to_smem(r["seg_lo"].at[b, rows], lo_s, bar_rows)
        lo_first = r["seg_lo"][b, t0]  # runs only grow along a chunk: the block's earliest
    else:
        lo_first = -jnp.minimum(c, 1)  # 0 in a row's first chunk, entered (-1) after it
    if st.d_per_p:
        plgpu.copy_gmem_to_smem(r["D"].at[h], dp_s, bar_rows)
    if st.has_y_add:
        plgpu.copy_gmem_to_smem(r["y_add"].at[b, rows, h], yadd_s, bar_rows)
    if st.has_z:
        plgpu.copy_gmem_to_smem(r["z"].at[b, rows, h], z_s, bar_rows)
    entered = lo_first < 0

    @pl.when(entered)
    def _():
        plgpu.copy_gmem_to_smem(r["C"].at[b, rows, g], c_s, bar_inter)
        if h_in_path == "tma":
            plgpu.copy_gmem_to_smem(r["h_in"].at[b, c, h], hin32_s, bar_inter)

    j0 = lax.div(jnp.maximum(lo_first, 0), jnp.int32(BLOCK))

    def issue(j, slot):
        s = pl.ds(c0 + j * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(r["cb"].at[b, c, g, pl.ds(l0, BLOCK), pl.ds(j * BLOCK, BLOCK)],
                                cb_s.at[slot], bar_blk.at[slot])
        plgpu.copy_gmem_to_smem(r["x"].at[b, s, h], x_s.at[slot], bar_blk.at[slot])
        plgpu.copy_gmem_to_smem(r["cs"].at[b, h, s], cs_s.at[slot], bar_blk.at[slot])
        plgpu.copy_gmem_to_smem(r["dtp"].at[b, h, s], dt_s.at[slot], bar_blk.at[slot])

    issue(j0, 0)
    plgpu.barrier_wait(bar_rows)
    cs_l = plgpu.load(csl_s, layout=plgpu.Layout.WGMMA.reduce(1))
    if st.has_seg:
        lo_l = plgpu.load(lo_s, layout=plgpu.Layout.WGMMA.reduce(1))
    else:
        lo_l = plgpu.layout_cast(jnp.full((BLOCK,), lo_first, jnp.int32),
                                 plgpu.Layout.WGMMA.reduce(1))

    def inter():
        # h_in rounded to the matmul dtype (as the Triton kernel's dot operand), then C h_in^T.
        if h_in_path == "tma":
            plgpu.barrier_wait(bar_inter)
            hin = hin32_s[...]
        else:
            hin = plgpu.load(r["h_in"].at[b, c, h], layout=plgpu.Layout.WGMMA, optimized=False)
        hin_s[...] = hin.astype(mm)
        plgpu.commit_smem()
        if h_in_path != "tma":
            plgpu.barrier_wait(bar_inter)

        def mm_inter(acc_ref):
            plgpu.wgmma(acc_ref, c_s, hin_s.transpose((1, 0)))
            return acc_ref[...]

        ch = pl.run_scoped(mm_inter, plgpu.ACC((BLOCK, p), F32))
        scale = jnp.exp2(jnp.where(lo_l < 0, cs_l, -jnp.inf))
        return ch * _rows(scale, ch.shape)

    zero = plgpu.layout_cast(jnp.zeros((BLOCK, p), F32), plgpu.Layout.WGMMA)
    y_inter = lax.cond(entered, inter, lambda: zero)

    pos_l = l0 + plgpu.broadcasted_iota(jnp.int32, tile, 0, layout=plgpu.Layout.WGMMA)
    pos_s0 = plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
    lo_b = _rows(jnp.maximum(lo_l, 0), tile)
    cs_lb = _rows(cs_l, tile)

    def intra(acc_ref):
        def step(j, carry):
            slot = lax.rem(j - j0, jnp.int32(2))
            plgpu.barrier_wait(bar_blk.at[slot])
            cb = cb_s.at[slot][...].astype(F32)
            cs_sv = plgpu.load(cs_s.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            dt_sv = plgpu.load(dt_s.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            pos_s = j * BLOCK + pos_s0
            mask = (pos_s <= pos_l) & (pos_s >= lo_b)
            decay = jnp.exp2(jnp.where(mask, cs_lb - _cols(cs_sv, tile), -jnp.inf))
            w = jnp.where(mask, cb * decay * _cols(dt_sv, tile), 0.0).astype(mm)
            # The previous block's wgmma read W's buffer and the other slot: it must be done
            # before they are overwritten (this block's W was built meanwhile).
            plgpu.wgmma_wait(0)

            @pl.when(j < i)
            def _():
                issue(j + 1, 1 - slot)

            # W goes through SMEM: the interpreter's wgmma takes SMEM operands only, and so the
            # kernel the CPU tests run is the one the GPU runs.
            w_s[...] = w
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, w_s, x_s.at[slot])
            return carry

        lax.fori_loop(j0, i + 1, step, 0)
        return acc_ref[...]

    y = pl.run_scoped(intra, plgpu.ACC((BLOCK, p), F32)) + y_inter
    if st.has_D:
        # The diagonal block (j = i) is the last one the loop loaded: its x tile is x_l.
        x_l = x_s.at[lax.rem(i - j0, jnp.int32(2))][...].astype(F32)
        if st.d_per_p:
            d = plgpu.load(dp_s, layout=plgpu.Layout.WGMMA.reduce(0))
            y = y + _cols(d, y.shape) * x_l
        else:
            y = y + r["D"][h] * x_l
    if st.has_y_add:
        y = y + yadd_s[...]
    if st.has_z:
        ypre_s[...] = y.astype(ypre_s.dtype)
        z = z_s[...].astype(F32)
        y = y * (z * (1.0 / (1.0 + jnp.exp(-z))))
    y_s[...] = y.astype(y_s.dtype)
    plgpu.commit_smem()
    if st.has_z:
        plgpu.copy_smem_to_gmem(ypre_s, o["y_pre"].at[b, rows, h])
    plgpu.copy_smem_to_gmem(y_s, o["y"].at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def _pad_rows(a, padded):
    if a is None or a.shape[1] == padded:
        return a
    return jnp.pad(a, ((0, 0), (0, padded - a.shape[1])) + ((0, 0),) * (a.ndim - 2))


H_IN_PATHS = ("registers", "tma")


def chunk_scan(inputs: dict, *, st: Static, y_dtype, interpret: bool = False,
               h_in_path: str = "registers"):
    """Same contract as kernel.chunk_scan: y (b, t, h, p) and, with z, y_pre (or None).
    interpret: run in the Mosaic GPU interpreter (CPU).
    h_in_path: how the float32 state entering the chunk reaches the bf16 SMEM operand:
    "registers" (GMEM -> registers, 32 KiB less SMEM a program) or "tma" (TMA into a float32
    SMEM buffer, then registers)."""
    check_supported(st)
    if h_in_path not in H_IN_PATHS:
        raise ValueError(f"h_in_path must be one of {H_IN_PATHS}, got {h_in_path!r}")
    if jnp.dtype(y_dtype) != jnp.dtype(st.mm_dtype):
        raise ValueError(f"y_dtype={jnp.dtype(y_dtype)} must be x's dtype {st.mm_dtype}")
    T = st.padded
    ins = {k: v for k, v in inputs.items() if v is not None}
    for k in ("x", "z", "C", "y_add"):
        if k in ins:
            ins[k] = _pad_rows(ins[k], T)
    ins["h_in"] = ins["h_in"].astype(F32)
    ins["cs"], ins["dtp"] = ins["cs"].astype(F32), ins["dtp"].astype(F32)
    mm = jnp.dtype(st.mm_dtype)
    rows = jax.ShapeDtypeStruct((st.batch, T, st.heads, st.headdim), mm)
    out_names = ("y", "y_pre") if st.has_z else ("y",)
    out_type = tuple(rows for _ in out_names)
    p, n = st.headdim, st.d_state
    vec = lambda dtype: plgpu.SMEM((BLOCK,), dtype)  # noqa: E731
    scratch = (
        _smem((BLOCK, n), mm),  # C rows
        _smem((p, n), mm),  # h_in rounded
        _smem((p, n), F32) if h_in_path == "tma" else None,
        _smem((2, BLOCK, BLOCK), ins["cb"].dtype),
        _smem((2, BLOCK, p), mm),  # x of the s block
        _smem((BLOCK, BLOCK), mm),  # W
        plgpu.SMEM((2, BLOCK), F32),  # cs_s
        plgpu.SMEM((2, BLOCK), F32),  # dt'_s
        vec(F32),  # cs_l
        vec(jnp.int32) if st.has_seg else None,  # seg_lo_l
        plgpu.SMEM((p,), F32) if st.d_per_p else None,  # per-channel D
        _smem((BLOCK, p), F32) if st.has_y_add else None,
        _smem((BLOCK, p), mm) if st.has_z else None,  # z
        _smem((BLOCK, p), mm) if st.has_z else None,  # y_pre
        _smem((BLOCK, p), mm),  # y
        plgpu.Barrier(num_arrivals=1 + st.has_seg + st.d_per_p + st.has_y_add + st.has_z),
        plgpu.Barrier(num_arrivals=1 + (h_in_path == "tma")),
        plgpu.Barrier(num_arrivals=4, num_barriers=2),
    )
    names = {"in": tuple(ins), "out": out_names}
    call = plgpu.kernel(
        lambda *refs: _kernel(*refs, names=names, st=st, h_in_path=h_in_path),
        out_type=out_type, scratch_types=scratch,
        grid=(st.chunk // BLOCK, st.heads, st.batch * st.n_chunks),
        grid_names=("row", "head", "bc"), kernel_name="ssd_chunk_scan_mgpu")
    if interpret:
        # plgpu.kernel's own interpret= does not reach its lowering in jax 0.11.2; the context
        # does (jax's tests/pallas/gpu_pallas_interpret_test.py uses it the same way).
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            outs = call(*ins.values())
    else:
        outs = call(*ins.values())
    outs = tuple(o[:, :st.length] if T != st.length else o for o in outs)
    return (outs[0], outs[1]) if st.has_z else (outs[0], None)
