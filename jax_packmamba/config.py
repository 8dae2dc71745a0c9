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
    # The billion-parameter presets keep only the projections' and the scan's outputs for the
    # backward (REMAT): under mamba_ssm's peak memory at 8 x 2048 rows, a few percent slower
    # than keeping everything (docs/performance.md, "Training against mamba_ssm and the memory policy").
    "1.4b": dict(n_layer=48, d_model=2048, remat="save_projections_and_scan"),
    "2.8b": dict(n_layer=64, d_model=2560, remat="save_projections_and_scan"),
    # Small enough to train on a laptop CPU in minutes; bytes as tokens.
    "tiny": dict(n_layer=2, d_model=64, vocab_size=256, d_state=8),
}

DTYPES = ("float32", "bfloat16", "float16")

# What each layer saves for the backward pass (model.REMAT_POLICIES): everything ("none"),
# nothing ("full": the block is recomputed), only its matmuls' outputs, or its matmuls' and
# kernels' outputs ("save_kernel_outputs": only elementwise work is recomputed), or only the
# projections' and the scan's outputs ("save_projections_and_scan", mamba_ssm's memory-efficient
# trade: the conv, the gated norm and the SSD's chunk states are recomputed), or those and the
# SSD's chunk states ("save_projections_scan_and_states": 128 MiB a mamba2-1.3b layer kept to
# spare the backward a chunk-state kernel and a state passing; the same as the last for Mamba1,
# whose scan chunk states both keep). The remat flag's old values still work: False is
# "none", True is "full".
REMAT = (
    "none",
    "full",
    "save_matmul_outputs",
    "save_kernel_outputs",
    "save_projections_and_scan",
    "save_projections_scan_and_states",
)
# The policies under which the SSD's backward recomputes the states entering each chunk
# (ssd_scan's save_chunk_states=False) rather than keeping them from the forward.
REMAT_RECOMPUTING_SSD_STATES = ("save_projections_and_scan",)


def _check_positive_ints(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{type(config).__name__}.{name} must be a positive int, got {value!r}"
            )


def _check_remat(config) -> None:
    value = config.remat
    if isinstance(value, bool):
        object.__setattr__(config, "remat", "full" if value else "none")
    elif value not in REMAT:
        raise ValueError(
            f"{type(config).__name__}.remat must be one of {REMAT} (or a bool: "
            f"True is 'full'), got {value!r}"
        )
    if not isinstance(config.scan_layers, bool):
        raise ValueError(
            f"{type(config).__name__}.scan_layers must be a bool, got {config.scan_layers!r}"
        )


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
    scan_layers: bool = False  # run the layers under one lax.scan (model.run_layers)

    def __post_init__(self):
        _check_positive_ints(
            self,
            "d_model",
            "n_layer",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "pad_vocab_size_multiple",
        )
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(
                f"MambaConfig.dt_rank must be None or a positive int, got {self.dt_rank!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")
        if self.dtype not in DTYPES:
            raise ValueError(f"MambaConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check_remat(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> MambaConfig:
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
            d * 2 * e
            + bias * 2 * e  # in_proj
            + e * self.d_conv
            + (e if self.conv_bias else 0)  # conv
            + e * (r + 2 * n)  # x_proj
            + r * e
            + e  # dt_proj
            + e * n
            + e  # A_log, D
            + e * d
            + bias * d  # out_proj
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
    # Keeping the SSD's chunk states: 410.0 against 418.6 ms a packed 8 x 2048 step, 50.6
    # against 44.6 GiB, both under mamba_ssm's 56.0 (one H100, 2026-12-07; docs/performance.md).
    "1.3b": dict(n_layer=48, d_model=2048, remat="save_projections_scan_and_states"),
    "2.7b": dict(n_layer=64, d_model=2560, remat="save_projections_and_scan"),
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
    scan_layers: bool = False  # run the layers under one lax.scan (model.run_layers)

    def __post_init__(self):
        _check_positive_ints(
            self,
            "d_model",
            "n_layer",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "headdim",
            "ngroups",
            "chunk_size",
            "pad_vocab_size_multiple",
        )
        if self.d_inner % self.headdim:
            raise ValueError(
                f"Mamba2Config: d_inner = expand * d_model = {self.d_inner} must be a "
                f"multiple of headdim={self.headdim}"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"Mamba2Config: nheads = d_inner / headdim = {self.nheads} must be a "
                f"multiple of ngroups={self.ngroups}"
            )
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(
                f"Mamba2Config.A_init_range must satisfy 0 < low <= high, got {self.A_init_range!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Mamba2Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check_remat(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> Mamba2Config:
        """A released model's shape by name ("130m" ... "2.7b", also as "mamba2-130m" ..., or
        "tiny"), with overrides."""
        key = name.removeprefix("mamba2-")
        if key not in MAMBA2_PRESETS:
            raise ValueError(
                f"unknown Mamba2 preset {name!r}; choose from {sorted(MAMBA2_PRESETS)}"
            )
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
            d * self.d_in_proj
            + bias * self.d_in_proj  # in_proj
            + self.conv_dim * self.d_conv
            + (self.conv_dim if self.conv_bias else 0)  # conv
            + 2 * h  # dt_bias, A_log
            + (e if self.D_has_hdim else h)  # D
            + e  # gated norm
            + e * d
            + bias * d  # out_proj
        )
        embed = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * (mixer + d) + d + embed

    def flops_per_token(self, *, training: bool = True) -> float:
        """Model FLOPs per token: matmuls, conv and the chunked SSD (forward x3 if training).

        The SSD term counts the chunked algorithm's products per token (L = chunk_size):
        C B^T, 2 L n per group; the (L, L) matrix times x, 2 L p per head; the chunk state and
        the read of the incoming state, 2 p n each per head.
        """
        d, e, h, n, p, L = (
            self.d_model,
            self.d_inner,
            self.nheads,
            self.d_state,
            self.headdim,
            self.chunk_size,
        )
        matmul = 2 * (d * self.d_in_proj + e * d)
        conv = 2 * self.conv_dim * self.d_conv
        ssd = self.ngroups * 2 * L * n + h * (2 * L * p + 4 * p * n)
        per_layer = matmul + conv + ssd
        lm_head = 2 * d * self.padded_vocab_size
        forward = self.n_layer * per_layer + lm_head
        return 3.0 * forward if training else float(forward)


# Mamba-3 shapes. "1.5b" is ours (no released Mamba-3 config states its shape here): 24 layers
# of 2048 with a gated MLP after each mixer, about 1.5B parameters untied at the 50277
# vocabulary. "tiny" is for CPU tests, with chunks short enough that a row crosses their edges.
# 1.5b keeps only its kernels' outputs for the backward: with every residual saved its 8 x 2048
# step needed 107.5 GiB on an 80 GB H100; so it trains in 51 GiB (docs/mamba3.md).
MAMBA3_PRESETS = {
    "1.5b": dict(n_layer=24, d_model=2048, d_intermediate=5504, remat="save_kernel_outputs"),
    "tiny": dict(
        n_layer=2,
        d_model=64,
        vocab_size=256,
        d_state=16,
        headdim=16,
        chunk_size=8,
        d_intermediate=128,
    ),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Mamba3Config:
    """Mamba-3 language model hyper-parameters (names follow mamba_ssm 2.3.2's Mamba3 and its
    MambaConfig: d_intermediate > 0 adds a gated MLP after each mixer, as mixer_seq_simple
    builds it, its hidden width rounded up to a multiple of 128).

    is_mimo: rank mimo_rank B and C per token (mamba_ssm recommends chunk_size 64 / rank).
    There is no conv; the conv_impl field exists so that the training program can pass one,
    and is unused.
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 128
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    rope_fraction: float = 0.5
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_floor: float = 1e-4
    is_outproj_norm: bool = False  # a gated RMSNorm (norm before the gate) instead of silu(z)
    is_mimo: bool = False
    mimo_rank: int = 4
    chunk_size: int = 64
    d_intermediate: int = 0  # the MLP's hidden width before rounding; 0: no MLP
    rms_norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    rescale_prenorm_residual: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    scan_impl: str = "auto"  # see jax_packmamba.mamba3_scan (SISO and MIMO)
    conv_impl: str = "auto"  # unused: Mamba-3 has no conv
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        _check_positive_ints(
            self,
            "d_model",
            "n_layer",
            "vocab_size",
            "d_state",
            "expand",
            "headdim",
            "ngroups",
            "mimo_rank",
            "chunk_size",
            "pad_vocab_size_multiple",
        )
        if self.d_inner % self.headdim:
            raise ValueError(
                f"Mamba3Config: d_inner = expand * d_model = {self.d_inner} must be a "
                f"multiple of headdim={self.headdim}"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"Mamba3Config: nheads = d_inner / headdim = {self.nheads} must be a "
                f"multiple of ngroups={self.ngroups}"
            )
        if self.rope_fraction not in (0.5, 1.0):
            raise ValueError(
                f"Mamba3Config.rope_fraction must be 0.5 or 1.0, got {self.rope_fraction!r}"
            )
        if self.num_rope_angles < 1:
            raise ValueError(
                f"Mamba3Config: d_state={self.d_state} leaves no rotary angle at "
                f"rope_fraction={self.rope_fraction}"
            )
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(
                f"Mamba3Config.d_intermediate must be an int >= 0, got {self.d_intermediate!r}"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min=} {self.dt_max=}")
        if not self.A_floor > 0:
            raise ValueError(f"Mamba3Config.A_floor must be > 0, got {self.A_floor!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Mamba3Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        impls = ("auto", "reference", "pallas", "pallas_interpret")  # ops.ssd_scan.IMPLS
        if self.scan_impl not in impls:
            raise ValueError(
                f"Mamba3Config.scan_impl must be one of {impls}, got {self.scan_impl!r}"
            )
        _check_remat(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> Mamba3Config:
        """ "1.5b" or "tiny" (also as "mamba3-1.5b", "mamba3-tiny"), with overrides."""
        key = name.removeprefix("mamba3-")
        if key not in MAMBA3_PRESETS:
            raise ValueError(
                f"unknown Mamba3 preset {name!r}; choose from {sorted(MAMBA3_PRESETS)}"
            )
        return cls(**{**MAMBA3_PRESETS[key], **overrides})

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def num_rope_angles(self) -> int:
        """Rotary angles per head: half the rotated state dims (rope_fraction of d_state,
        made even)."""
        rotated = int(self.d_state * self.rope_fraction)
        return (rotated - rotated % 2) // 2

    @property
    def d_in_proj(self) -> int:
        """in_proj's outputs: z, x, B, C (rank R each), dd_dt, dd_A, trap, angles."""
        return (
            2 * self.d_inner
            + 2 * self.rank * self.ngroups * self.d_state
            + 3 * self.nheads
            + self.num_rope_angles
        )

    @property
    def rank(self) -> int:
        """B and C per token: mimo_rank with is_mimo, else 1."""
        return self.mimo_rank if self.is_mimo else 1

    @property
    def mlp_hidden(self) -> int:
        """The gated MLP's hidden width: d_intermediate rounded up to a multiple of 128."""
        return -(-self.d_intermediate // 128) * 128

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, e, h, n = self.d_model, self.d_inner, self.nheads, self.d_state
        mixer = (
            d * self.d_in_proj
            + h  # dt_bias
            + 2 * h * self.rank * n  # B_bias, C_bias
            + 2 * n  # B_norm, C_norm
            + h  # D
            + (3 * h * self.rank * self.headdim if self.is_mimo else 0)  # mimo_x, _z, _o
            + (e if self.is_outproj_norm else 0)
            + e * d
        )
        mlp = 3 * d * self.mlp_hidden + d if self.d_intermediate else 0
        embed = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * (mixer + d + mlp) + d + embed

    def flops_per_token(self, *, training: bool = True) -> float:
        """Model FLOPs per token: matmuls and the chunked scan (forward x3 if training), the
        scan counted as SSD's with one group per head (the biases make B and C per head) and,
        for MIMO, a fused chunk of L R steps per head and rank."""
        d, e, h, n, p, L = (
            self.d_model,
            self.d_inner,
            self.nheads,
            self.d_state,
            self.headdim,
            self.chunk_size,
        )
        matmul = 2 * (d * self.d_in_proj + e * d)
        if self.d_intermediate:
            matmul += 2 * 3 * d * self.mlp_hidden
        R = self.rank
        scan = h * R * (2 * L * R * n + 2 * L * R * p + 4 * p * n)
        forward = self.n_layer * (matmul + scan) + 2 * d * self.padded_vocab_size
        return 3.0 * forward if training else float(forward)


# Both families' presets under one name space, as the training program and the benchmarks
# take them: the Mamba1 names as they are, the Mamba2 ones prefixed ("mamba2-130m", ...).
MODEL_PRESETS = (
    tuple(sorted(PRESETS))
    + tuple(f"mamba2-{name}" for name in MAMBA2_PRESETS)
    + tuple(f"mamba3-{name}" for name in MAMBA3_PRESETS)
    + ("hybrid-tiny", "hybrid-1b")
)


def config_class(preset: str) -> type:
    """The config class of a preset name in MODEL_PRESETS: Mamba2Config for "mamba2-...",
    Mamba3Config for "mamba3-...", HybridConfig for "hybrid-..."."""
    if preset.startswith("hybrid-"):
        return HybridConfig
    if preset.startswith("mamba3-"):
        return Mamba3Config
    return Mamba2Config if preset.startswith("mamba2-") else MambaConfig


def preset_config(preset: str, **overrides) -> MambaConfig | Mamba2Config:
    """The config of a preset of either family (a name in MODEL_PRESETS), with overrides."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(MODEL_PRESETS)}")
    return config_class(preset).preset(preset, **overrides)


# Block kinds of a hybrid layer (HybridConfig.layers): a Mamba2 mixer, causal self-attention, an
# MLP. Letters as Nemotron-H's hybrid_override_pattern spells them ("-" is its MLP).
HYBRID_KINDS = {"M": "mamba2", "*": "attention", "-": "mlp"}
MLP_ACTIVATIONS = ("silu_gated", "relu2")  # Bamba's gated silu; Nemotron-H's relu(x)^2, no gate

HYBRID_PRESETS = {
    # CPU tests: two Mamba2 layers and one attention layer, each with a gated MLP (Bamba-like).
    "tiny": dict(
        layers=("M-", "*-", "M-"),
        d_model=64,
        vocab_size=256,
        d_state=16,
        headdim=16,
        chunk_size=32,
        num_heads=4,
        num_kv_heads=2,
        rotary_dim=8,
        d_ff=128,
    ),
    # ~1.1B (untied, the Mamba presets' 50277 vocabulary): 24 layers of Mamba2 or GQA attention
    # (one in six, Bamba-9B's share), each with a gated MLP, 2048 wide.
    "1b": dict(
        layers=("M-",) * 5
        + ("*-",)
        + ("M-",) * 5
        + ("*-",)
        + ("M-",) * 5
        + ("*-",)
        + ("M-",) * 5
        + ("*-",),
        d_model=2048,
        vocab_size=50277,
        d_state=128,
        headdim=64,
        ngroups=1,
        num_heads=16,
        num_kv_heads=4,
        rotary_dim=64,
        d_ff=2560,
    ),
}


@dataclasses.dataclass(frozen=True, slots=True)
class HybridConfig:
    """A hybrid language model (Bamba, Nemotron-H): pre-norm residual blocks of three kinds.

    `layers` is the pattern: one string of HYBRID_KINDS letters per layer, each letter one
    block `r <- r + block(norm(r))` run in order ("M-" is a Bamba Mamba2 layer: mixer, then
    MLP; Nemotron-H layers are one letter, or pairs "M-" / "*-" where its pattern allows).
    Runs of identical consecutive layers are stacked and run under one lax.scan, so a program
    holds one copy of each run's layer, not one per layer. Mamba2 fields are Mamba2Config's.
    """

    layers: tuple[str, ...] = ("M-", "*-", "M-")
    d_model: int = 768
    vocab_size: int = 50277
    # Mamba2 mixers
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False
    # attention (GQA); head_dim None: d_model // num_heads; rotary_dim 0: no position encoding
    num_heads: int = 12
    num_kv_heads: int = 4
    head_dim: int | None = None
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_max_segments: int | None = None  # bound for jp.attention's "cudnn_packed" path
    attention_impl: str = "auto"  # jp.attention's impl
    # MLPs
    d_ff: int = 3072
    mlp_activation: str = "silu_gated"
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = False
    rescale_prenorm_residual: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"
    scan_impl: str = "auto"
    conv_impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False  # run each run of layers under one lax.scan (model.run_layers)

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, list):
            object.__setattr__(self, "layers", layers := tuple(layers))
        if (
            not isinstance(layers, tuple)
            or not layers
            or not all(isinstance(s, str) and s and set(s) <= set(HYBRID_KINDS) for s in layers)
        ):
            raise ValueError(
                f"HybridConfig.layers must be a non-empty tuple of non-empty strings "
                f"of {sorted(HYBRID_KINDS)} ({HYBRID_KINDS}), got {layers!r}"
            )
        _check_positive_ints(
            self,
            "d_model",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "headdim",
            "ngroups",
            "chunk_size",
            "num_heads",
            "num_kv_heads",
            "d_ff",
            "pad_vocab_size_multiple",
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"HybridConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"HybridConfig: d_model={self.d_model} must be a multiple of "
                f"num_heads={self.num_heads} when head_dim is None"
            )
        hd = self.attention_head_dim
        if not isinstance(hd, int) or hd < 1:
            raise ValueError(f"HybridConfig.head_dim must be None or a positive int, got {hd!r}")
        if (
            not isinstance(self.rotary_dim, int)
            or not 0 <= self.rotary_dim <= hd
            or self.rotary_dim % 2
        ):
            raise ValueError(
                f"HybridConfig.rotary_dim must be an even int in [0, head_dim={hd}], "
                f"got {self.rotary_dim!r}"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"HybridConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, got "
                f"{self.mlp_activation!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"HybridConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check_remat(self)
        self.mamba2_config()  # Mamba2Config checks the mixer's own fields

    @classmethod
    def preset(cls, name: str, **overrides) -> HybridConfig:
        """ "tiny" (CPU tests) or "1b" (also as "hybrid-tiny", "hybrid-1b"), with overrides."""
        key = name.removeprefix("hybrid-")
        if key not in HYBRID_PRESETS:
            raise ValueError(
                f"unknown hybrid preset {name!r}; choose from {sorted(HYBRID_PRESETS)}"
            )
        return cls(**{**HYBRID_PRESETS[key], **overrides})

    @property
    def blocks(self) -> str:
        """Every block's kind in order, the layers' strings joined."""
        return "".join(self.layers)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def attention_head_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def mamba2_config(self) -> Mamba2Config:
        """The Mamba2Config of the Mamba2 mixers (n_layer: the blocks, for the init scale)."""
        names = (
            "d_model",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "headdim",
            "ngroups",
            "chunk_size",
            "A_init_range",
            "dt_min",
            "dt_max",
            "dt_init_floor",
            "conv_bias",
            "proj_bias",
            "rms_norm_eps",
            "rescale_prenorm_residual",
            "initializer_range",
            "dtype",
            "scan_impl",
            "conv_impl",
            "remat",  # its mixers read it (REMAT_RECOMPUTING_SSD_STATES)
        )
        try:
            return Mamba2Config(n_layer=len(self.blocks), **{n: getattr(self, n) for n in names})
        except ValueError as e:
            raise ValueError(f"HybridConfig: {e}") from None

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        m = self.mamba2_config()
        mamba = (m.num_params() - m.padded_vocab_size * m.d_model - m.d_model) // m.n_layer
        d, hd = self.d_model, self.attention_head_dim
        qkv = (self.num_heads + 2 * self.num_kv_heads) * hd
        attention = d * qkv + self.num_heads * hd * d + d
        if self.attention_bias:
            attention += qkv + d
        up = 2 if self.mlp_activation == "silu_gated" else 1
        mlp = up * d * self.d_ff + self.d_ff * d + d
        if self.mlp_bias:
            mlp += up * self.d_ff + d
        per = {"M": mamba, "*": attention, "-": mlp}
        embed = self.padded_vocab_size * d * (1 if self.tie_embeddings else 2)
        return sum(per[k] for k in self.blocks) + d + embed

    def flops_per_token(self, *, training: bool = True, context: int = 2048) -> float:
        """Model FLOPs per token (forward x3 if training); attention's scores counted at an
        average causal context of `context` / 2 tokens."""
        m = self.mamba2_config()
        mamba = (
            m.flops_per_token(training=False) - 2 * m.d_model * m.padded_vocab_size
        ) / m.n_layer
        d, hd = self.d_model, self.attention_head_dim
        attention = (
            2 * d * (self.num_heads + 2 * self.num_kv_heads) * hd
            + 2 * self.num_heads * hd * d
            + 4 * self.num_heads * hd * context / 2
        )
        mlp = 2 * (3 if self.mlp_activation == "silu_gated" else 2) * d * self.d_ff
        per = {"M": mamba, "*": attention, "-": mlp}
        forward = sum(per[k] for k in self.blocks) + 2 * d * self.padded_vocab_size
        return 3.0 * forward if training else float(forward)


def hybrid_runs(layers: tuple[str, ...]) -> list[tuple[str, int]]:
    """(layer kinds, count) of each run of identical consecutive layers."""
    runs: list[tuple[str, int]] = []
    for kinds in layers:
        if runs and runs[-1][0] == kinds:
            runs[-1] = (kinds, runs[-1][1] + 1)
        else:
            runs.append((kinds, 1))
    return runs
