"""Model configuration: a frozen dataclass with the state-spaces/mamba presets."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# (n_layer, d_model) of the released state-spaces/mamba checkpoints; everything else is shared.
PRESETS = {
    "130m": dict(n_layer=24, d_model=768),
    "370m": dict(n_layer=48, d_model=1024),
    "790m": dict(n_layer=48, d_model=1536),
    "1.4b": dict(n_layer=48, d_model=2048),
    "2.8b": dict(n_layer=64, d_model=2560),
    # Small enough to train on a laptop CPU in minutes; bytes as tokens.
    "tiny": dict(n_layer=2, d_model=64, vocab_size=256, d_state=8),
}

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, slots=True)
class MambaConfig:
    """Mamba1 language model hyper-parameters (names follow mamba_ssm / HF MambaConfig)."""

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16), as mamba_ssm's "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    proj_bias: bool = False
    rms_norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    rescale_prenorm_residual: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters and the residual stream stay float32
    scan_impl: str = "auto"  # see jax_packmamba.selective_scan
    conv_impl: str = "auto"  # see jax_packmamba.causal_conv1d
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                     "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"MambaConfig.dt_rank must be None or a positive int, got {self.dt_rank!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")
        if self.dtype not in DTYPES:
            raise ValueError(f"MambaConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "MambaConfig":
        """A released model's shape by name ("130m" ... "2.8b", or "tiny"), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_resolved(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, e, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank_resolved
        bias = 1 if self.proj_bias else 0
        mixer = (
            d * 2 * e + bias * 2 * e  # in_proj
            + e * self.d_conv + (e if self.conv_bias else 0)  # conv
            + e * (r + 2 * n)  # x_proj
            + r * e + e  # dt_proj
            + e * n + e  # A_log, D
            + e * d + bias * d  # out_proj
        )
        embed = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * (mixer + d) + d + embed

    def flops_per_token(self, *, training: bool = True) -> float:
        """Model FLOPs per token: matmuls, conv and the selective scan (forward x3 if training).

        The scan does about 9 flops per (d_inner, d_state) element per token in the forward
        pass (discretise, update, contract with C).
        """
        d, e, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank_resolved
        matmul = 2 * (d * 2 * e + e * (r + 2 * n) + r * e + e * d)
        conv = 2 * e * self.d_conv
        scan = 9 * e * n
        per_layer = matmul + conv + scan
        lm_head = 2 * d * self.padded_vocab_size
        forward = self.n_layer * per_layer + lm_head
        return 3.0 * forward if training else float(forward)
