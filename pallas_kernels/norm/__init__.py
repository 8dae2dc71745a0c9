"""Pallas (Triton) row norms: residual add + RMSNorm and the gated RMSNorm; see vjp.py for the
entry points."""

from pallas_kernels.norm.vjp import add_rms_norm_pallas, gated_rms_norm_pallas, rms_norm_pallas

__all__ = ["add_rms_norm_pallas", "gated_rms_norm_pallas", "rms_norm_pallas"]
