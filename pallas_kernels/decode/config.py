"""Block sizes of the decode-step kernels and the heuristic that picks them.

Work split (kernel.py): the conv/x_proj kernel gives each program `block_rows` batch rows and
`conv_blocks_per_program` blocks of `block_conv` channels, and writes one x_proj partial per
program column; the state-update kernel gives each program `block_rows` rows and `block_state`
channels with all d_state states of each.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.launch import core_count


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Static tiling of the decode-step kernels. Hashable, so it can be a static argument.

    block_rows: batch rows per program. The x_proj and dt_proj products are `jnp.dot`s, which
        Triton needs at least 16 rows for; rows past the batch are masked (never loaded, never
        stored), so a batch of 1 costs no extra memory traffic, only idle lanes.
    block_conv: channels per block of the conv/x_proj kernel (power of two, >= 16).
    conv_blocks_per_program: blocks each conv/x_proj program walks; its x_proj partial covers
        all of them. 1 at small batch (most programs, one load phase each); more at large batch,
        so fewer partials are written and summed.
    block_state: channels per program of the state-update kernel (power of two, >= 16; its
        (block_rows, block_state, d_state) float32 state tile lives in registers).
    num_warps_conv, num_warps_state: warps per program of each kernel.
    fuse_in_proj: mixer_pallas runs in_proj and the conv/x_proj kernel as one kernel
        (decode_in_proj_conv: one row block, its programs are in_proj's column blocks of
        block_conv); mixer_core_pallas ignores it.
    x_proj_in_conv: x_proj's partials in the conv kernel (decode_conv_x_proj), or (False) the
        conv step alone (decode_conv) and x_proj as XLA's product, which at large batch
        reads x_proj's weight once rather than once a row block (pick_config: past
        X_PROJ_IN_CONV_ROWS rows).
    state_one_row: the state-update kernel one batch row a program, dt_proj as a product
        summed over the rank instead of a dot over a 16-row block (a batch of 1 pads its row
        to 16 for the dot and carries 16 rows of state tile). pick_config: up to
        STATE_ONE_ROW_ROWS rows.
    state_sums_parts: with state_one_row, the state-update kernel sums x_proj's partials
        itself (each program loads every partial of its row) instead of an XLA reduction
        before it (pick_config: up to STATE_SUMS_PARTS_ROWS rows).
    add_norm_in_proj: with fuse_in_proj, mixer_pallas(add_norm=...) runs the block's residual
        add and RMSNorm inside the fused kernel (decode_add_norm_in_proj_conv) instead of
        the add + norm kernel in front of it (pick_config: up to ADD_NORM_IN_PROJ_ROWS rows).
    block_k: in_proj's contraction tile in that kernel (a divisor of d_model).
    num_warps_in_proj, num_stages_in_proj: its warps, and how deep Triton pipelines the
        weight tiles' loads (the kernel is a read of in_proj's weight).
    """

    block_rows: int = 16
    block_conv: int = 64
    conv_blocks_per_program: int = 1
    block_state: int = 32
    num_warps_conv: int = 4
    num_warps_state: int = 4
    fuse_in_proj: bool = False
    x_proj_in_conv: bool = True
    state_one_row: bool = False
    state_sums_parts: bool = False
    add_norm_in_proj: bool = False
    block_k: int = 128
    num_warps_in_proj: int = 4
    num_stages_in_proj: int = 3

    def __post_init__(self):
        for name in ("block_rows", "block_conv", "block_state", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        for name in (
            "conv_blocks_per_program",
            "num_warps_conv",
            "num_warps_state",
            "num_warps_in_proj",
            "num_stages_in_proj",
        ):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"{name}={v} must be >= 1")


# Rows up to which mixer_pallas fuses in_proj into the conv kernel (decode_in_proj_conv): one
# row block, of 16 rows or (17 to 32 rows) of 32. One H100 (DESIGN.md, round 4): the 2.8b
# decode step 3.27 -> 3.06 ms at batch 1 and 3.68 -> 3.49 ms at 16; round 7, with the state
# kernel on 16-row blocks beside the fused kernel's 32: 4.055 -> 3.927 ms at batch 32.
FUSE_IN_PROJ_ROWS = 32
FUSED_ROWS_MAX = 32


def fused_block_rows(batch: int) -> int:
    """The fused kernel's one row block for `batch` rows (at most FUSED_ROWS_MAX): 16 or 32."""
    rows = DecodeConfig().block_rows
    return rows if batch <= rows else FUSED_ROWS_MAX


# The same for Mamba2's decode step (mamba2_pallas): in_proj fused into its conv step. One H100
# (DESIGN.md, rounds 5 and 6): the mamba2-2.7b step 3.031 -> 2.979 ms at batch 1, and with one
# block of 32 rows 5.790 -> 5.499 ms at batch 32 (Mamba1's 2.8b went 4.098 -> 4.252 there: 16).
MAMBA2_FUSE_IN_PROJ_ROWS = 32
# Whether Mamba2's decode step leaves its gated norm's scale to the next residual add
# (jax_packmamba.mamba2.defers_norm: the state-update kernel writes v * weight and v's sums of
# squares, the add + norm kernel scales; three XLA kernels a layer fewer). Off: one H100
# (DESIGN.md, round 6) ran the mamba2-2.7b step 2.917 -> 2.870 ms at batch 1, 11.741 -> 11.808
# at 128 and 5.740 -> 6.492 at 32; the two kernels that took the work over grew by about what
# the three XLA kernels took.
MAMBA2_DEFER_NORM = False
# Rows up to which Mamba1's conv kernel also computes x_proj's partials (decode_conv_x_proj);
# past them the conv step runs alone (decode_conv) and x_proj is XLA's product, which reads
# x_proj's weight once rather than once a row block. One H100 (DESIGN.md, round 5), the 2.8b
# mixer core: 28.35 -> 27.03 us a layer at batch 32, 75.69 -> 61.22 at 128; at 8 it was
# 18.57 -> 20.92 (and up to FUSE_IN_PROJ_ROWS rows in_proj's fused kernel takes x_proj's
# partials anyway).
X_PROJ_IN_CONV_ROWS = 16
# Rows up to which Mamba1's state kernel runs one row a program (state_one_row). One H100
# (DESIGN.md, round 6): the 2.8b step 3.064 / 3.132 -> 2.970 / 2.970 ms at batch 1 (the kernel
# 5.61 -> 4.27 us a layer); the mixer core 18.50 -> 21.81 us at 8, 27.93 -> 41.24 at 32.
STATE_ONE_ROW_ROWS = 1
# Rows up to which Mamba1's state kernel, one row a program, sums x_proj's partials itself
# (state_sums_parts; each program loads its row's p x R float32 partials, 61 KB at 2.8b, from
# L2) instead of the XLA reduction in front of it. Off until timed: one H100 (DESIGN.md, round
# 7) spent 1.70 us a 2.8b layer at batch 1 in that reduction (input_reduce_fusion), a launch
# of its own; predicted ~-1 us a layer, ~-0.06 ms a step.
STATE_SUMS_PARTS_ROWS = 0
# Rows up to which the fused in_proj kernel (Mamba1's through add_norm_in_proj, Mamba2's in
# mamba2_pallas) also does the block's residual add and RMSNorm. Off: one H100 (DESIGN.md,
# round 7) ran the fused kernel at 67.6 us a 2.8b layer against 23.8 without it (batch 1), with
# residual' stored inside its walk; the store moved after the walk since (f69b425), untimed.
# Predicted: the add + norm kernel's 2.4 us a layer less the extra L2 loads, ~-0.1 ms a step.
ADD_NORM_IN_PROJ_ROWS = 0


def pick_config(batch: int, d_inner: int, d_state: int, d_model: int | None = None) -> DecodeConfig:
    """Most programs at small batch; past X_PROJ_IN_CONV_ROWS rows x_proj as XLA's product
    after the conv step alone, and 8 warps where the state tile would crowd 4 warps'
    registers; the state kernel one row a program up to STATE_ONE_ROW_ROWS rows. With d_model
    (mixer_pallas): in_proj fused into the conv kernel at up to FUSE_IN_PROJ_ROWS rows, where
    the shapes tile evenly (the modules' values, read at each call)."""
    base = DecodeConfig()
    fuse = (
        d_model is not None
        and batch <= min(FUSE_IN_PROJ_ROWS, FUSED_ROWS_MAX)
        and d_model % base.block_k == 0
        and d_inner % base.block_conv == 0
    )
    # base.block_rows is the other kernels'; the fused one takes all rows in one block.
    row_blocks = -(-batch // base.block_rows)
    conv_blocks = -(-d_inner // base.block_conv)
    # About two programs an SM for the conv kernel, never fewer than one block each.
    per_program = max(1, min(conv_blocks, (conv_blocks * row_blocks) // (2 * core_count())))
    tile = base.block_rows * base.block_state * d_state
    return dataclasses.replace(
        base,
        conv_blocks_per_program=per_program,
        num_warps_state=4 if tile <= 8192 else 8,
        fuse_in_proj=fuse,
        x_proj_in_conv=batch <= X_PROJ_IN_CONV_ROWS,
        state_one_row=batch <= STATE_ONE_ROW_ROWS,
        state_sums_parts=batch <= min(STATE_ONE_ROW_ROWS, STATE_SUMS_PARTS_ROWS),
        add_norm_in_proj=fuse and batch <= ADD_NORM_IN_PROJ_ROWS,
    )
