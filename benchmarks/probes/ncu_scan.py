"""One forward + backward of the Pallas scan at the 1.4b training shape, for Nsight Compute.

    ncu --clock-control none -k regex:selective_scan --launch-skip 4 --launch-count 4 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        --section Occupancy --section LaunchStats --section InstructionStats \\
        python3 benchmarks/ncu_scan.py [field=value ...] [shape=b:l:d:n] [interpret=1]

Runs the jitted forward+backward twice (the first call compiles and warms up; skip its four
kernels with --launch-skip 4), 64 segments a row, bf16, softplus, z and D on, as
benchmarks/bench_scan.py times it. Arguments override the ScanConfig the heuristic picks.

Per SASS instruction, with the SourceCounters section in a saved report (ncu ... -o REP):

    ncu -i REP.ncu-rep --page source --csv --print-source sass | gzip > sass.csv.gz
    python3 benchmarks/ncu_scan.py summarize sass.csv.gz

prints the warp-stall reasons' shares of all samples, and each opcode's share of the executed
instructions and of the samples (a sample lands on the instruction a warp is stalled at).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import re
import sys

import jax
import jax.numpy as jnp

from benchmarks.bench_scan import _field, make_inputs
from pallas_kernels.selective_scan import pick_config, selective_scan_pallas


def summarize(path) -> dict:
    """{"stalls": {reason: share of samples}, "opcodes": {opcode: (share of executed
    instructions, share of samples)}} from ncu's --page source --csv --print-source sass."""
    with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(f))
    header = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    col = {name: i for i, name in enumerate(rows[header])}
    data = [r for r in rows[header + 1:] if len(r) == len(rows[header])]

    def num(r, name):
        text = r[col[name]].replace(",", "")
        return float(text) if text not in ("", "-") else 0.0

    samples_col, executed_col = "Warp Stall Sampling (All Samples)", "Instructions Executed"
    reasons = [c for c in col if c.startswith("stall_") and "Not Issued" not in c]
    total_samples = sum(num(r, samples_col) for r in data) or 1.0
    total_executed = sum(num(r, executed_col) for r in data) or 1.0
    stalls = {c[len("stall_"):]: sum(num(r, c) for r in data) / total_samples for c in reasons}
    executed, sampled = collections.Counter(), collections.Counter()
    for r in data:
        m = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", r[col["Source"]])
        op = m.group(1) if m else "?"
        executed[op] += num(r, executed_col) / total_executed
        sampled[op] += num(r, samples_col) / total_samples
    return dict(stalls=dict(sorted(stalls.items(), key=lambda kv: -kv[1])),
                opcodes={op: (executed[op], sampled[op]) for op, _ in executed.most_common()})


def main(argv):
    if argv[:1] == ["summarize"]:
        result = summarize(argv[1])
        print("stall reason: share of samples")
        for reason, share in result["stalls"].items():
            if share >= 0.001:
                print(f"  {reason:18s} {share:6.1%}")
        print("opcode: share of executed instructions, share of samples")
        for op, (ex, sa) in list(result["opcodes"].items())[:20]:
            print(f"  {op:10s} {ex:6.1%} {sa:6.1%}")
        return
    pairs = dict(a.split("=") for a in argv)
    shape = tuple(map(int, pairs.pop("shape", "8:2048:4096:16").split(":")))
    interpret = bool(int(pairs.pop("interpret", "0")))  # a CPU check of this script
    overrides = {k: _field(k, v) for k, v in pairs.items()}
    config = dataclasses.replace(pick_config(*shape), **overrides)
    args, seg = make_inputs(jax.random.PRNGKey(0), *shape, jnp.bfloat16, 64)
    args = tuple(args.values())
    ct = jax.random.normal(jax.random.PRNGKey(1), args[0].shape, jnp.bfloat16)

    @jax.jit
    def fwd_bwd(args, seg, ct):
        f = lambda *a: selective_scan_pallas(*a, delta_softplus=True, segment_ids=seg,
                                             config=config, interpret=interpret)
        return jax.vjp(f, *args)[1](ct)

    for _ in range(2):
        jax.block_until_ready(fwd_bwd(args, seg, ct))
    print("ran", config)


if __name__ == "__main__":
    main(sys.argv[1:])
