"""One forward + backward of the Pallas scan at the 1.4b training shape, for Nsight Compute.

    ncu --clock-control none -k regex:selective_scan --launch-skip 4 --launch-count 4 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        --section Occupancy --section LaunchStats --section InstructionStats \\
        python3 benchmarks/ncu_scan.py [field=value ...] [shape=b:l:d:n] [interpret=1]

Runs the jitted forward+backward twice (the first call compiles and warms up; skip its four
kernels with --launch-skip 4), 64 segments a row, bf16, softplus, z and D on, as
benchmarks/bench_scan.py times it. Arguments override the ScanConfig the heuristic picks.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from benchmarks.bench_scan import _field, make_inputs
from pallas_kernels.selective_scan import pick_config, selective_scan_pallas


def main(argv):
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
