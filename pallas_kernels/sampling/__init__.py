"""Pallas (Triton) kernel of the sampler: the top-k / top-p cut's key search (kernel.py)."""

from pallas_kernels.sampling.kernel import smallest_key_under

__all__ = ["smallest_key_under"]
