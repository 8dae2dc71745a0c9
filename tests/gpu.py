"""Parameters for tests that need a CUDA GPU: marked `gpu` and skipped cleanly without one."""

import jax
import pytest

HAS_GPU = jax.default_backend() == "gpu"


def on_gpu(value):
    return pytest.param(value, marks=[pytest.mark.gpu,
                                      pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")])
