"""All-reduce, reduce-scatter and all-gather bandwidth between this host's devices (jax collectives).

    PYTHONPATH=. python3 benchmarks/probes/psum_bandwidth.py --out DIR           # every local GPU
    PYTHONPATH=. python3 benchmarks/probes/psum_bandwidth.py --devices 2 --dtypes bfloat16
    PYTHONPATH=. python3 benchmarks/probes/psum_bandwidth.py --smoke --out DIR   # CPU check

What is timed: one jitted shard_map over a 1-D mesh of the devices, per op and size:
  all_reduce      jax.lax.psum of an S-byte buffer on each device (what data-parallel gradients
                  do; S = 516 MB is the 130m preset's float32 gradient)
  reduce_scatter  jax.lax.psum_scatter(tiled): S bytes in, S/n out (FSDP's gradient reduction)
  all_gather      jax.lax.all_gather(tiled): S/n in, S out (FSDP's parameter gather)
Sizes: S = 1 MB .. 1 GB in powers of 4 by default (--sizes-mb); the buffer is float32 or
bfloat16 (--dtypes), so bfloat16's bandwidth shows whether NCCL moves it as fast.

Bandwidth as nccl-tests reports it: algbw = S / t, and the bus bandwidth busbw = algbw x
2(n-1)/n for all_reduce and algbw x (n-1)/n for the others: the bytes each device's links carry
per second in a ring, comparable across device counts and with the link's peak. On one device
the collectives move nothing (busbw 0).

Timing: benchmarks/harness.py time_calls (warm-up calls, then groups of back-to-back calls,
the median over groups of the group's time / calls). "gradient_estimates" gives, for the
presets' gradient bytes (float32 and bfloat16), the all-reduce time interpolated from the
measured sizes (log-log; beyond the largest, at its bandwidth): the time data parallelism
spends on its gradient all-reduce if nothing overlaps it.

Writes --out/psum_bandwidth_<slug>_<n>dev.json (harness header first; --smoke adds the variant
_smoke). --smoke on CPU: 4 host devices (XLA_FLAGS --xla_force_host_platform_device_count=4
unless a count is set), sizes of 4 KB .. 64 KB, a check of the script that measures nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time

from benchmarks import harness

OPS = ("all_reduce", "reduce_scatter", "all_gather")
DTYPES = ("float32", "bfloat16")
DEFAULT_SIZES_MB = (1, 4, 16, 64, 256, 1024)
SMOKE_SIZES_MB = (0.004, 0.016, 0.064)
ESTIMATE_PRESETS = ("130m", "1.4b", "2.8b")
SMOKE_DEVICES = 4
MB = 10**6  # sizes and GB/s in powers of ten, as nccl-tests


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw for op over n devices (nccl-tests' convention)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def interpolate_ms(rows: list[dict], nbytes: float) -> tuple[float | None, str]:
    """(median ms of an all_reduce of nbytes, how it was found): log-log between the measured
    sizes ("interpolated"), or beyond the largest in proportion to the bytes, at its bandwidth
    ("extrapolated"); None below the smallest."""
    pts = sorted((r["bytes"], r["median_ms"]) for r in rows if r["median_ms"] > 0)
    if not pts or nbytes < pts[0][0]:
        return None, "below the measured sizes"
    if nbytes >= pts[-1][0]:
        return pts[-1][1] * nbytes / pts[-1][0], "extrapolated"
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if b0 <= nbytes <= b1:
            w = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0))), "interpolated"
    raise AssertionError("unreachable")


def collective(op: str, mesh):
    """The jitted collective over mesh axis "x"; its input is the (n x elements) global array
    sharded on x (one S-byte buffer a device; all_gather takes the S/n-byte shards)."""
    import jax
    from jax.sharding import PartitionSpec as P

    def body(x):
        if op == "all_reduce":
            return jax.lax.psum(x, "x")
        if op == "reduce_scatter":
            return jax.lax.psum_scatter(x, "x", tiled=True)
        return jax.lax.all_gather(x, "x", tiled=True)

    return jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
    )


def measure(devices, sizes_mb, dtypes, ops, *, warmup, groups, per_group, log=print) -> list:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(devices)
    mesh = Mesh(np.asarray(devices), ("x",))
    rows = []
    for dtype in dtypes:
        item = jnp.dtype(dtype).itemsize
        for op in ops:
            fn = collective(op, mesh)
            for size_mb in sizes_mb:
                # Elements of the full (unsharded) buffer, a multiple of n so that it scatters.
                elements = max(n, int(size_mb * MB / item) // n * n)
                per_device = elements // n if op == "all_gather" else elements
                x = jax.jit(
                    lambda: jnp.ones((n * per_device,), dtype),  # made in place
                    out_shardings=NamedSharding(mesh, P("x")),
                )()
                t0 = time.perf_counter()
                fn.lower(x).compile()
                compile_s = time.perf_counter() - t0
                timing = harness.time_calls(
                    fn, [(x,)], warmup=warmup, groups=groups, per_group=per_group
                )
                nbytes = elements * item
                t = timing.median_s
                algbw = nbytes / t / 1e9
                rows.append(
                    dict(
                        op=op,
                        dtype=dtype,
                        devices=n,
                        bytes=nbytes,
                        median_ms=1e3 * t,
                        min_ms=1e3 * timing.min_s,
                        max_ms=1e3 * timing.max_s,
                        group_ms=[1e3 * g for g in timing.group_s],
                        algbw_GBps=algbw,
                        busbw_GBps=algbw * bus_factor(op, n),
                        compile_s=compile_s,
                    )
                )
                log(
                    f"{op:15s} {dtype:9s} {nbytes / MB:9.3f} MB  {1e3 * t:9.3f} ms  algbw "
                    f"{algbw:8.2f} GB/s  busbw {rows[-1]['busbw_GBps']:8.2f} GB/s"
                )
                del x
    return rows


def gradient_estimates(rows: list[dict], presets=ESTIMATE_PRESETS) -> dict:
    """For each preset's parameter count: its gradient's bytes in float32 and bfloat16 and the
    all_reduce time interpolated from rows (None where outside the measured sizes)."""
    from benchmarks import workloads

    out = {}
    for preset in presets:
        params = workloads.model_config(preset, backend="gpu").num_params()
        est = dict(num_params=params)
        for dtype, item in (("float32", 4), ("bfloat16", 2)):
            ar = [r for r in rows if r["op"] == "all_reduce" and r["dtype"] == dtype]
            ms, how = interpolate_ms(ar, params * item)
            est[dtype] = dict(bytes=params * item, all_reduce_ms=ms, how=how)
        out[preset] = est
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = harness.argument_parser(__doc__)
    ap.add_argument(
        "--devices", type=int, default=None, help="use the first N local devices (default all)"
    )
    ap.add_argument(
        "--sizes-mb",
        default=None,
        help="comma list of buffer sizes in MB (default "
        + ",".join(map(str, DEFAULT_SIZES_MB))
        + ")",
    )
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--warmup", type=int, default=None, help="default 2 (smoke 1)")
    ap.add_argument("--groups", type=int, default=None, help="default 7 (smoke 2)")
    ap.add_argument("--per-group", type=int, default=None, help="default 5 (smoke 2)")
    args = ap.parse_args(argv)
    try:
        sizes = [float(s) for s in args.sizes_mb.split(",")] if args.sizes_mb else None
    except ValueError:
        ap.error(f"--sizes-mb: expected a comma list of numbers, got {args.sizes_mb!r}")
    if sizes is not None and (not sizes or min(sizes) <= 0):
        ap.error(f"--sizes-mb: sizes must be positive, got {args.sizes_mb!r}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    ops = [o for o in args.ops.split(",") if o]
    for name, given, allowed in (("dtypes", dtypes, DTYPES), ("ops", ops, OPS)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            ap.error(f"--{name}: {bad or 'none given'}; choose from {list(allowed)}")
    if args.devices is not None and args.devices < 1:
        ap.error(f"--devices must be >= 1, got {args.devices}")
    if args.smoke and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Before jax starts its backend; it only adds CPU devices (a GPU run is unaffected).
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={SMOKE_DEVICES}"
        ).strip()
    import jax

    local = jax.local_devices()
    if args.devices is not None and args.devices > len(local):
        ap.error(f"--devices {args.devices}: this host has {len(local)}")
    devices = local[: args.devices or len(local)]

    def pick(value, full, smoke):
        return value if value is not None else (smoke if args.smoke else full)

    new = harness.new_result(
        "psum_bandwidth",
        script=__file__,
        argv=argv,
        out_dir=args.out,
        smoke=args.smoke,
        variant=f"{len(devices)}dev",
        device=devices[0],
    )
    print(f"psum_bandwidth: {len(devices)} x {new.info.kind}; -> {new.path}", flush=True)
    rows = measure(
        devices,
        sizes or pick(None, DEFAULT_SIZES_MB, SMOKE_SIZES_MB),
        dtypes,
        ops,
        warmup=pick(args.warmup, 2, 1),
        groups=pick(args.groups, 7, 2),
        per_group=pick(args.per_group, 5, 2),
    )
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_") or k == "XLA_FLAGS"}
    harness.write_json(
        new.path,
        dict(
            **new.header,
            devices=len(devices),
            environment=env,
            rows=rows,
            gradient_estimates=gradient_estimates(rows),
        ),
    )
    print(f"psum_bandwidth: wrote {new.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
