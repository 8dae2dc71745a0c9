"""Pallas (Triton) segment-aware causal conv; see vjp.py for the entry point."""

from pallas_kernels.causal_conv1d.config import TILE, TileConfig
from pallas_kernels.causal_conv1d.vjp import KERNEL, KERNELS, causal_conv1d_pallas, num_programs

__all__ = ["KERNEL", "KERNELS", "TILE", "TileConfig", "causal_conv1d_pallas", "num_programs"]
