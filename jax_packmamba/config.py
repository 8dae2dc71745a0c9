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

# What each layer saves for the backward pass (model.REMAT_POLICIES): everything ("none"),
# nothing ("full": the block is recomputed), or only its matmuls' outputs. The remat flag's
# old values still work: False is "none", True is "full".
REMAT = ("none", "full", "save_matmul_outputs")


def _check_remat(config) -> None:
    value = config.remat
    if isinstance(value, bool):
        object.__setattr__(config, "remat", "full" if value else "none")
    elif value not in REMAT:
        raise ValueError(f"{type(config).__name__}.remat must be one of {REMAT} (or a bool: "
                         f"True is 'full'), got {value!r}")


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
    remat: str = "none"  # REMAT: what each layer recomputes in the backward pass

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
        _check_remat(self)

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


# (n_layer, d_model) of the released state-spaces/mamba2 checkpoints; everything else is shared.
MAMBA2_PRESETS = {
    "130m": dict(n_layer=24, d_model=768),
    "370m": dict(n_layer=48, d_model=1024),
    "780m": dict(n_layer=48, d_model=1536),
    "1.3b": dict(n_layer=48, d_model=2048),
    "2.7b": dict(n_layer=64, d_model=2560),
    # Small enough for CPU tests; bytes as tokens, and chunks short enough that a test row
    # crosses several chunk edges.
    "tiny": dict(n_layer=2, d_model=64, vocab_size=256, d_state=16, headdim=16, chunk_size=32),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Mamba2Config:
    """Mamba2 language model hyper-parameters (names follow mamba_ssm's Mamba2 and MambaConfig).

    The released state-spaces/mamba2-* checkpoints pad the vocabulary to a multiple of 16
    (50277 -> 50288 rows of the tied embedding), unlike the Mamba1 ones (8).
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    A_init_range: tuple[float, float] = (1.0, 16.0)
    D_has_hdim: bool = False  # D per (head, headdim) channel instead of per head
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False  # mamba_ssm's Mamba2 `bias` (in_proj and out_proj)
    rms_norm_eps: float = 1e-5  # the block norms and the gated norm
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    rescale_prenorm_residual: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters and the residual stream stay float32
    scan_impl: str = "auto"  # see jax_packmamba.ssd_scan
    conv_impl: str = "auto"  # see jax_packmamba.causal_conv1d
    remat: str = "none"  # REMAT: what each layer recomputes in the backward pass

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim",
                     "ngroups", "chunk_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.d_inner % self.headdim:
            raise ValueError(f"Mamba2Config: d_inner = expand * d_model = {self.d_inner} must be a "
                             f"multiple of headdim={self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba2Config: nheads = d_inner / headdim = {self.nheads} must be a "
                             f"multiple of ngroups={self.ngroups}")
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(f"Mamba2Config.A_init_range must satisfy 0 < low <= high, got {self.A_init_range!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Mamba2Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check_remat(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Mamba2Config":
        """A released model's shape by name ("130m" ... "2.7b", also as "mamba2-130m" ..., or
        "tiny"), with overrides."""
        key = name.removeprefix("mamba2-")
        if key not in MAMBA2_PRESETS:
            raise ValueError(f"unknown Mamba2 preset {name!r}; choose from {sorted(MAMBA2_PRESETS)}")
        return cls(**{**MAMBA2_PRESETS[key], **overrides})

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C (d_inner + 2 * ngroups * d_state)."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """in_proj's outputs: z, xBC and dt."""
        return self.d_inner + self.conv_dim + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, e, h = self.d_model, self.d_inner, self.nheads
        bias = 1 if self.proj_bias else 0
        mixer = (
            d * self.d_in_proj + bias * self.d_in_proj  # in_proj
            + self.conv_dim * self.d_conv + (self.conv_dim if self.conv_bias else 0)  # conv
            + 2 * h  # dt_bias, A_log
            + (e if self.D_has_hdim else h)  # D
            + e  # gated norm
            + e * d + bias * d  # out_proj
        )
        embed = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * (mixer + d) + d + embed

    def flops_per_token(self, *, training: bool = True) -> float:
        """Model FLOPs per token: matmuls, conv and the chunked SSD (forward x3 if training).

        The SSD term counts the chunked algorithm's products per token (L = chunk_size):
        C B^T, 2 L n per group; the (L, L) matrix times x, 2 L p per head; the chunk state and
        the read of the incoming state, 2 p n each per head.
        """
        d, e, h, n, p, L = (self.d_model, self.d_inner, self.nheads, self.d_state, self.headdim,
                            self.chunk_size)
        matmul = 2 * (d * self.d_in_proj + e * d)
        conv = 2 * self.conv_dim * self.d_conv
        ssd = self.ngroups * 2 * L * n + h * (2 * L * p + 4 * p * n)
        per_layer = matmul + conv + ssd
        lm_head = 2 * d * self.padded_vocab_size
        forward = self.n_layer * per_layer + lm_head
        return 3.0 * forward if training else float(forward)


# Both families' presets under one name space, as the training program and the benchmarks
# take them: the Mamba1 names as they are, the Mamba2 ones prefixed ("mamba2-130m", ...).
MODEL_PRESETS = tuple(sorted(PRESETS)) + tuple(f"mamba2-{name}" for name in MAMBA2_PRESETS)


def config_class(preset: str) -> type:
    """The config class of a preset name in MODEL_PRESETS: Mamba2Config for "mamba2-..."."""
    return Mamba2Config if preset.startswith("mamba2-") else MambaConfig


def preset_config(preset: str, **overrides) -> MambaConfig | Mamba2Config:
    """The config of a preset of either family (a name in MODEL_PRESETS), with overrides."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(MODEL_PRESETS)}")
    return config_class(preset).preset(preset, **overrides)
