"""Pallas (Triton) segment-aware causal conv; see vjp.py for the entry point."""

from pallas_kernels.causal_conv1d.vjp import causal_conv1d_pallas, num_programs

__all__ = ["causal_conv1d_pallas", "num_programs"]
