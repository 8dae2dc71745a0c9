"""Pallas (Triton) SSD scan (Mamba2) with segment resets; see vjp.py for the entry point and
DESIGN.md for how it works."""

from pallas_kernels.ssd.config import SSDConfig, pick_config
from pallas_kernels.ssd.vjp import ssd_chunked_pallas, ssd_scan_pallas, supported

__all__ = ["SSDConfig", "pick_config", "ssd_chunked_pallas", "ssd_scan_pallas", "supported"]
