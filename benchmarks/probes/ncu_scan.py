"""One forward + backward of the Pallas scan at the 1.4b training shape, for Nsight Compute.

    PYTHONPATH=. ncu --clock-control none -k regex:selective_scan --launch-skip 4 \\
        --launch-count 4 --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section LaunchStats \\
        --section InstructionStats \\
        python3 benchmarks/probes/ncu_scan.py run [field=value ...] [--shape b:l:d:n]
    PYTHONPATH=. python3 benchmarks/probes/ncu_scan.py run --smoke --out DIR    # CPU check

run: the jitted forward+backward twice (the first call compiles and warms up; skip its four
kernels with --launch-skip 4), 64 segments a row, bf16, softplus, z and D on, as
benchmarks/bench_scan.py times it. field=value arguments override the ScanConfig the heuristic
picks. Not a timing (ncu measures the kernels' launches), so no harness.time_calls. Writes
--out/ncu_scan_<slug>.json (default benchmarks/results/; the harness header, shape and config, so
the profile can be matched to what ran; one from another commit moves to history/ first).
--smoke: a tiny shape with 4 segments a row, through the Pallas interpreter on CPU, with the
interpreter-friendly config of benchmarks/workloads.py.

summarize: per SASS instruction, with the SourceCounters section in a saved report (ncu ... -o REP):

    ncu -i REP.ncu-rep --page source --csv --print-source sass | gzip > sass.csv.gz
    PYTHONPATH=. python3 benchmarks/probes/ncu_scan.py summarize sass.csv.gz --out DIR

prints the warp-stall reasons' shares of all samples, and each opcode's share of the executed
instructions and of the samples (a sample lands on the instruction a warp is stalled at), and
writes them to --out/<the CSV's stem>_summary.json (the header names the machine that
summarized, not the one profiled).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import gzip
import pathlib
import re
import sys

from benchmarks import harness, workloads

FULL_SHAPE = (8, 2048, 4096, 16)
SEGMENTS = 64  # a row
SMOKE_SHAPE = (1, 32, 32, 4)
SMOKE_SEGMENTS = 4


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


def run(shape, overrides: dict, *, smoke: bool):
    """Forward + backward twice; returns the ScanConfig it ran."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.selective_scan import pick_config, selective_scan_pallas

    interpret = jax.default_backend() == "cpu"
    base = dataclasses.replace(pick_config(*shape), **(workloads.SMOKE_SCAN_OVERRIDES if smoke
                                                       else {}))
    config = dataclasses.replace(base, **overrides)
    args, seg = workloads.scan_inputs(jax.random.PRNGKey(0), *shape, jnp.bfloat16,
                                      SMOKE_SEGMENTS if smoke else SEGMENTS)
    args = tuple(args.values())
    ct = jax.random.normal(jax.random.PRNGKey(1), args[0].shape, jnp.bfloat16)

    @jax.jit
    def fwd_bwd(args, seg, ct):
        f = lambda *a: selective_scan_pallas(*a, delta_softplus=True, segment_ids=seg,  # noqa: E731
                                             config=config, interpret=interpret)
        return jax.vjp(f, *args)[1](ct)

    for _ in range(2):
        jax.block_until_ready(fwd_bwd(args, seg, ct))
    return config


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = ap.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("run", parents=[harness.common_args()],
                         help="forward + backward twice, for ncu")
    workloads.add_scan_arguments(r, full_shape=FULL_SHAPE, smoke_shape=SMOKE_SHAPE)
    s = verbs.add_parser("summarize", parents=[harness.common_args()],
                         help="stall reasons and opcodes from ncu's per-instruction CSV")
    s.add_argument("csv", type=pathlib.Path, help="ncu --page source --csv output (.csv[.gz])")
    args = ap.parse_args(argv)
    if args.verb == "run":
        args.shape, args.overrides = workloads.scan_arguments(r, args)
        segments = SMOKE_SEGMENTS if args.smoke else SEGMENTS
        if args.shape[1] <= segments:
            r.error(f"--shape: the length must exceed the {segments} segments a row")
    elif not args.csv.is_file():
        s.error(f"summarize: no file {args.csv}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.verb == "summarize":
        result = summarize(args.csv)
        print("stall reason: share of samples")
        for reason, share in result["stalls"].items():
            if share >= 0.001:
                print(f"  {reason:18s} {share:6.1%}")
        print("opcode: share of executed instructions, share of samples")
        for op, (ex, sa) in list(result["opcodes"].items())[:20]:
            print(f"  {op:10s} {ex:6.1%} {sa:6.1%}")
        stem, _ = harness.split_ext(args.csv.name)
        path = harness.write_json(args.out / f"{stem}_summary.json",
                                  dict(harness.header(None, script=__file__, argv=argv),
                                       source=args.csv.name, **result))
        print(f"wrote {path}")
        return 0
    new = harness.new_result("ncu_scan", script=__file__, argv=argv, out_dir=args.out,
                             smoke=args.smoke)
    config = run(args.shape, args.overrides, smoke=args.smoke)
    harness.write_json(new.path, dict(new.header, shape=args.shape,
                                      config=dataclasses.asdict(config)))
    print("ran", config)
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
