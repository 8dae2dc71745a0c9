"""Registers, spills and SASS instruction mix of the selective-scan kernels (GPU machine).

    PYTHONPATH=. python3 benchmarks/probes/sass_probe.py --out DIR [field=value ...]
    PYTHONPATH=. python3 benchmarks/probes/sass_probe.py --smoke --out DIR   # CPU: the IR only

Captures the Triton IR that Pallas hands to XLA (register_probe.dump: forward + backward at b 1,
L 8192, d_inner 4096, d_state 16, bf16, segments, softplus; the ScanConfig defaults with the
field=value overrides), compiles it again with the `triton` package (a close relative of XLA's
own Triton, so the numbers are indicative; num_warps of the config, one stage), and prints per
kernel: registers, spills, and counts of the SASS opcodes that matter for this scan (needs the
triton package and CUDA's cuobjdump). Writes into --out (the probe's folder) each kernel's .ttir,
.cubin and .sass, and sass_probe.json (harness header, config, per kernel the resource usage and
opcode counts, or why a step failed). --smoke: a tiny shape, and only the IR capture (what a CPU
machine can do).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shutil
import subprocess
import sys

from benchmarks import harness, workloads
from benchmarks.probes import register_probe

FULL_SHAPE = (1, 8192, 4096, 16)
# "/*0a20*/  @P0 FFMA R1, ..." -> FFMA
_OPCODE = r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)"


def opcode_counts(sass: str) -> collections.Counter:
    """Opcode (without modifiers) -> count in cuobjdump -sass output."""
    return collections.Counter(m.group(1).split(".")[0] for m in re.finditer(_OPCODE, sass))


def sass_of(ttir, out, name: str, num_warps: int) -> dict:
    """Compiles one kernel's IR for sm_90 and reads its SASS and resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(str(ttir), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=1))
    cubin = out / f"{name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True,
                          text=True).stdout
    (out / f"{name}.sass").write_text(sass)
    ops = opcode_counts(sass)
    res = subprocess.run(["cuobjdump", "-res-usage", str(cubin)], capture_output=True,
                         text=True).stdout
    return dict(usage=re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", res),
                total=sum(ops.values()), top=ops.most_common(14))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = harness.argument_parser(__doc__, out_default=None, out_required=True,
                                 out_help="the probe's folder (IR, cubins, SASS, sass_probe.json)")
    workloads.add_scan_arguments(ap)  # over the ScanConfig defaults, not the heuristic's pick
    args = ap.parse_args(argv)
    from pallas_kernels.selective_scan import ScanConfig

    cfg = dataclasses.replace(ScanConfig(), **workloads.scan_arguments(ap, args)[1])
    info = harness.device_info()
    head = harness.header(info, script=__file__, argv=argv)
    shape = register_probe.SMOKE_SHAPE if args.smoke else FULL_SHAPE
    meta = register_probe.dump(args.out, {}, shape, config=cfg, header=head)
    kernels = {}
    for name in meta["kernels"]:
        if args.smoke:
            kernels[name] = dict(status="captured", ttir=f"{name}.ttir")
            continue
        if shutil.which("cuobjdump") is None:
            kernels[name] = dict(status="skipped", reason="cuobjdump not on PATH")
            continue
        try:
            kernels[name] = dict(status="ok", **sass_of(args.out / f"{name}.ttir", args.out,
                                                         name, cfg.num_warps))
        except Exception as e:  # noqa: BLE001 - indicative only; the other kernels still count
            kernels[name] = dict(status="error", error=repr(e)[:400])
        k = kernels[name]
        if k["status"] == "ok":
            top = ", ".join(f"{o}:{c}" for o, c in k["top"])
            print(f"{name}: {' '.join(k['usage'])} total={k['total']} | {top}", flush=True)
        else:
            print(f"{name}: {k['status']} {k.get('error', k.get('reason', ''))}", flush=True)
    path = harness.write_json(args.out / "sass_probe.json",
                              dict(head, config=dataclasses.asdict(cfg), shape=shape,
                                   kernels=kernels))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
