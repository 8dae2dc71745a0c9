"""Probes and one-off experiments: `PYTHONPATH=. python3 benchmarks/probes/<name>.py`."""
