"""Pallas (Triton) selective scan with segment resets; see vjp.py for the entry point."""

from pallas_kernels.selective_scan.config import ScanConfig, pick_config
from pallas_kernels.selective_scan.vjp import selective_scan_pallas

__all__ = ["ScanConfig", "pick_config", "selective_scan_pallas"]
