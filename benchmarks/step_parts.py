"""The parts of a training step, for per-part tables of ours and mamba_ssm's step side by side.

Pure Python (no jax, no torch), so the PyTorch profiler script and breakdown.py share one
classification. A kernel is put in a part by its name, and for ours (XLA fusions are named
after HLO instructions, not the op) also by the source line breakdown.hlo_sources found for it.
"""

from __future__ import annotations

import re

PARTS = ("gemm", "ssm kernels", "conv", "norms", "loss", "optimizer", "elementwise", "other")

_GEMM = re.compile(r"gemm|cublas|cutlass|xmma|nvjet|sm90_|matmul|wgmma|dot_fusion|dot_", re.I)
_SSM = re.compile(
    r"selective_scan|ssd|chunk_scan|chunk_state|state_passing|_bmm_chunk|chunk_cumsum|"
    r"scan_(fwd|bwd)|mamba_chunk|combine",
    re.I,
)
_CONV = re.compile(r"causal_conv|conv1d", re.I)
_NORM = re.compile(r"layer_norm|rms_?norm|_layer_norm|norm_fwd|norm_bwd|RMSNorm", re.I)
_LOSS = re.compile(r"cross_entropy|log_softmax|nll_loss|softmax|logsumexp|loss\.py", re.I)
# optax's own sources (XLA fusions of ours carry them, by file basename and function):
# apply_updates, add_decayed_weights, tree_update_moment in _tree_math.py, scale_by_adam...
_OPT = re.compile(
    r"adam|multi_tensor|optax|clip|global_norm|optim|apply_updates|decayed_weights|"
    r"update_moment|_tree_math|bias_correction|scale_by_",
    re.I,
)
_ELEM = re.compile(r"elementwise|vectorized|unrolled_elementwise|loop_|fusion|copy|reduce", re.I)


def part(kernel: str, source: str = "") -> str:
    """The part of a step a GPU kernel belongs to (one of PARTS)."""
    text = f"{kernel} {source}"
    for name, pattern in (
        ("gemm", _GEMM),
        ("ssm kernels", _SSM),
        ("conv", _CONV),
        ("norms", _NORM),
        ("loss", _LOSS),
        ("optimizer", _OPT),
    ):
        # GEMMs are told by the kernel's own name only: a fusion that merely sits in a norm's
        # source line is not a GEMM, and a cuBLAS call under the loss is.
        if pattern.search(kernel if name == "gemm" else text):
            return name
    return "elementwise" if _ELEM.search(text) else "other"


def table(kernel_us: dict[str, float], steps: int, sources: dict[str, str] | None = None) -> dict:
    """{part: ms per step} from total microseconds per kernel over `steps` steps."""
    out = dict.fromkeys(PARTS, 0.0)
    for name, us in kernel_us.items():
        out[part(name, (sources or {}).get(name, ""))] += us / 1e3 / steps
    return out
