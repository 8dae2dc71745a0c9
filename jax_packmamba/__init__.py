"""jax-packmamba: Mamba on packed variable-length data in JAX."""

from jax_packmamba.config import HybridConfig, Mamba2Config, Mamba3Config, MambaConfig
from jax_packmamba.generation import generate
from jax_packmamba.loss import chunked_cross_entropy, masked_cross_entropy
from jax_packmamba.mamba2 import Mamba2Mixer, RMSNormGated
from jax_packmamba.mamba3 import Mamba3Mixer
from jax_packmamba.model import (
    LM,
    Block,
    HybridLM,
    Mamba2Block,
    Mamba2LM,
    MambaBlock,
    MambaLM,
    MambaMixer,
    RMSNorm,
)
from jax_packmamba.ops import (
    apply_rope,
    attention,
    attention_reference,
    causal_conv1d,
    mamba3_mimo_scan,
    mamba3_mimo_scan_reference,
    mamba3_scan,
    mamba3_scan_reference,
    mamba3_state_update,
    positions_from_segment_ids,
    segment_ids_from_positions,
    segment_starts,
    selective_scan,
    selective_scan_reference,
    ssd_scan,
    ssd_scan_reference,
    ssd_state_update,
)
from jax_packmamba.packing import (
    PackedBatch,
    SplitSequenceWarning,
    pack_sequences,
    pack_stream,
    pad_sequences,
    rows_needed,
    unpack,
)
from jax_packmamba.pretrained import from_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "Block",
    "LM",
    "Mamba2Block",
    "HybridConfig",
    "HybridLM",
    "Mamba2Config",
    "Mamba2LM",
    "Mamba2Mixer",
    "Mamba3Config",
    "Mamba3Mixer",
    "MambaBlock",
    "MambaConfig",
    "MambaLM",
    "MambaMixer",
    "PackedBatch",
    "RMSNorm",
    "RMSNormGated",
    "SplitSequenceWarning",
    "apply_rope",
    "attention",
    "attention_reference",
    "causal_conv1d",
    "chunked_cross_entropy",
    "from_pretrained",
    "generate",
    "mamba3_mimo_scan",
    "mamba3_mimo_scan_reference",
    "mamba3_scan",
    "mamba3_scan_reference",
    "mamba3_state_update",
    "masked_cross_entropy",
    "pack_sequences",
    "pack_stream",
    "pad_sequences",
    "positions_from_segment_ids",
    "rows_needed",
    "save_pretrained",
    "segment_ids_from_positions",
    "segment_starts",
    "selective_scan",
    "selective_scan_reference",
    "ssd_scan",
    "ssd_scan_reference",
    "ssd_state_update",
    "unpack",
]
