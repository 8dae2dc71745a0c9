"""Benchmarks of jax-packmamba: scripts run as `PYTHONPATH=. python3 benchmarks/<name>.py`.

harness.py (timing, device, result files) and workloads.py (what they run on) are shared;
probes/ holds one-off experiments; results/ the current result of each benchmark, and
results/history/ what those superseded.
"""
