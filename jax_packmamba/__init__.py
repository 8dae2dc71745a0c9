"""jax-packmamba: Mamba on packed variable-length data in JAX."""

from jax_packmamba.ops import (
    causal_conv1d,
    positions_from_segment_ids,
    segment_ids_from_positions,
    segment_starts,
    selective_scan,
    selective_scan_reference,
)

__version__ = "0.1.0"

from jax_packmamba.config import MambaConfig
from jax_packmamba.model import MambaBlock, MambaLM, MambaMixer, RMSNorm
from jax_packmamba.packing import PackedBatch, SplitSequenceWarning, pack_sequences, pad_sequences, unpack
