"""Pallas kernels of jax-packmamba (GPU through the Triton backend; interpret mode on CPU)."""
