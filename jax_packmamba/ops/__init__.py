"""Segment-aware ops: each public op beside its pure-JAX reference."""

from jax_packmamba.ops.attention import apply_rope, attention, attention_reference
from jax_packmamba.ops.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_reference,
    causal_conv1d_step,
    segment_conv_windows,
)
from jax_packmamba.ops.mamba3 import (
    Mamba3State,
    mamba3_mimo_scan,
    mamba3_mimo_scan_reference,
    mamba3_scan,
    mamba3_scan_reference,
    mamba3_state_update,
)
from jax_packmamba.ops.rms_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    gated_rms_norm,
    gated_rms_norm_reference,
    rms_norm,
)
from jax_packmamba.ops.segments import (
    positions_from_segment_ids,
    segment_ends,
    segment_ids_from_positions,
    segment_starts,
)
from jax_packmamba.ops.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_state_update,
)
from jax_packmamba.ops.ssd_scan import ssd_scan, ssd_scan_reference, ssd_state_update

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rope",
    "attention",
    "attention_reference",
    "causal_conv1d",
    "causal_conv1d_reference",
    "causal_conv1d_step",
    "gated_rms_norm",
    "gated_rms_norm_reference",
    "rms_norm",
    "Mamba3State",
    "mamba3_mimo_scan",
    "mamba3_mimo_scan_reference",
    "mamba3_scan",
    "mamba3_scan_reference",
    "mamba3_state_update",
    "segment_conv_windows",
    "segment_ends",
    "positions_from_segment_ids",
    "segment_ids_from_positions",
    "segment_starts",
    "selective_scan",
    "selective_scan_reference",
    "selective_state_update",
    "ssd_scan",
    "ssd_scan_reference",
    "ssd_state_update",
]
