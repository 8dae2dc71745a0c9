"""PackMamba training program: `python -m train --help` (config.py lists every option).

Modules: config (dataclass parts + CLI), data (documents, tokenizers, packed/padded/single
batches), step (pure jitted train_step), sharding (data x fsdp mesh), checkpoint (orbax),
metrics (throughput, MFU, metrics.jsonl, loss curve), trainer (the run).
"""
