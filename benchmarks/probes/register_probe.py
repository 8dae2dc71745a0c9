"""Registers and spills of the Pallas scan kernels for sm_90a, without a GPU.

    PYTHONPATH=. python3 benchmarks/probes/register_probe.py dump --out DIR [field=value ...]
    PYTHONPATH=. python3 benchmarks/probes/register_probe.py compile --out DIR [kernel ...]
    PYTHONPATH=. python3 benchmarks/probes/register_probe.py report --out DIR [--ptxas PATH]
    PYTHONPATH=. python3 benchmarks/probes/register_probe.py dump --smoke --out DIR   # seconds

--out DIR is the probe's folder: dump writes the kernels' Triton IR and meta.json there, compile
their PTX, report reads it and writes report.json (both JSONs with the harness header).

dump: lowers forward + backward of the scan (default shape: the 1.4b training step, b 8,
    L 2048, d_inner 4096, d_state 16, bf16, segments, softplus; --smoke: b 2, L 64, d_inner 64)
    for CUDA on an abstract H200 (as tests/test_selective_scan_impls.py does), catching each
    kernel's Triton module as text (<kernel>.ttir) and its launch parameters (meta.json).
    ScanConfig overrides as field=value. Needs only jax; about 40 s (--smoke: seconds).
compile: Triton IR -> ttgir, llir, ptx, cubin with the pip `triton` package (3.5.0 parsed
    jaxlib 0.11.2's IR as text). Run this verb with the python of a separate virtual
    environment that has `triton==3.5.0` installed (it would clash with jaxlib's own Triton);
    it needs only triton and numpy (no jax). The gradient kernel takes ~8 min of CPU
    (Triton's coalescing pass on its unrolled IR).
report: `ptxas -arch=sm_90a -v` on each .ptx: registers, stack frame, spill stores/loads (no
    jax needed; --ptxas names the ptxas binary if it is not on PATH).

Checked against a profiler trace on the H200 (2026-11-21): chunk_grads 255 registers (trace
255) and fwd_chunk_states 128 (128) match; chunk_dstates (76 vs 96) and fwd_chunk_outputs (128
vs 138) come out 10-20 low, since XLA compiles the same IR with its own Triton fork and ptxas.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

from benchmarks import harness, workloads  # neither imports jax: compile runs without it

FULL_SHAPE = (8, 2048, 4096, 16)
SMOKE_SHAPE = (2, 64, 64, 16)


def dump(out: pathlib.Path, overrides: dict, shape=FULL_SHAPE, *, config=None,
         header: dict | None = None) -> dict:
    """Writes <kernel>.ttir and meta.json (config, shape, each kernel's launch; header first)
    into `out` and returns the meta. config: the ScanConfig to apply `overrides` to (default:
    the heuristic's pick for `shape`)."""
    import jax
    import jax.numpy as jnp
    from jax._src import mesh as mesh_lib
    from jax._src.pallas.triton import lowering

    from pallas_kernels.selective_scan.config import pick_config
    from pallas_kernels.selective_scan.vjp import selective_scan_pallas

    out.mkdir(parents=True, exist_ok=True)
    captured = []
    lower = lowering.lower_jaxpr_to_triton_module

    def catching(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    b, length, d, n = shape
    cfg = dataclasses.replace(config if config is not None else pick_config(b, length, d, n),
                              **overrides)
    bf, f32, sds = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
    args = [sds((b, length, d), bf), sds((b, length, d), bf), sds((d, n), f32),
            sds((b, length, n), bf), sds((b, length, n), bf), sds((d,), f32),
            sds((b, length, d), bf), sds((d,), f32), sds((b, length), jnp.int32)]

    def loss(*xs):
        *xs, seg = xs
        y = selective_scan_pallas(*xs, delta_softplus=True, segment_ids=seg, config=cfg)
        return y.astype(f32).sum()

    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)
    lowering.lower_jaxpr_to_triton_module = catching
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).trace(*args).lower(
                lowering_platforms=("cuda",)).as_text()
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    launches = {m.group(4): dict(grid=[int(m.group(i)) for i in (1, 2, 3)],
                                 num_stages=int(m.group(5)), num_warps=int(m.group(6)))
                for m in re.finditer(r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) '
                                     r': i32, ir = ".*?", name = "(\w+)", num_stages = (\d+) : '
                                     r'i32, num_warps = (\d+) : i32', text, re.S)}
    meta = dict(config=dataclasses.asdict(cfg), shape=shape, kernels={})
    for asm in captured:
        name = re.search(r"tt\.func (?:public )?@(\w+)", asm).group(1)
        (out / f"{name}.ttir").write_text(asm)
        meta["kernels"][name] = launches.get(name, {})
    (out / "meta.json").write_text(json.dumps({**(header or {}), **meta}, indent=1))
    return meta


def compile_ir(out: pathlib.Path, only: list[str]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    meta = json.loads((out / "meta.json").read_text())["kernels"]
    for name, launch in meta.items():
        if only and name not in only:
            continue
        kernel = triton.compile(str(out / f"{name}.ttir"), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=launch.get("num_warps", 1),
                                             num_stages=launch.get("num_stages", 1)))
        (out / f"{name}.ptx").write_text(kernel.asm["ptx"])
        print(f"compiled {name}", flush=True)


def parse_ptxas(log: str) -> dict:
    """registers, and stack / spill_stores / spill_loads bytes, from `ptxas -v` output."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    return dict(registers=int(regs.group(1)) if regs else None,
                **(dict(zip(("stack", "spill_stores", "spill_loads"), map(int, spill.groups())))
                   if spill else {}))


def report(out: pathlib.Path, ptxas: str = "ptxas") -> dict:
    rows = {}
    for ptx in sorted(out.glob("*.ptx")):
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
        rows[ptx.stem] = parse_ptxas(log)
        print(f"{ptx.stem:40s} {rows[ptx.stem]}")
    return rows


def parse_args(argv):
    common = harness.common_args(out_default=None, out_required=True,
                                 out_help="the probe's folder (IR, PTX, meta.json, report.json)")
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = ap.add_subparsers(dest="verb", required=True)
    d = verbs.add_parser("dump", parents=[common], help="lower the scan, keep each kernel's IR")
    workloads.add_scan_arguments(d, full_shape=FULL_SHAPE, smoke_shape=SMOKE_SHAPE)
    c = verbs.add_parser("compile", parents=[common], help="IR -> PTX with the triton package")
    c.add_argument("kernels", nargs="*", help="only these kernels (default all)")
    r = verbs.add_parser("report", parents=[common], help="ptxas -v on each .ptx")
    r.add_argument("--ptxas", default="ptxas", help="the ptxas binary (default: from PATH)")
    args = ap.parse_args(argv)
    if args.verb == "dump":
        args.shape, args.overrides = workloads.scan_arguments(d, args)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.verb == "compile":  # the triton venv: no jax, so no harness header
        compile_ir(args.out, args.kernels)
        return 0
    # The kernels are lowered for an abstract H200 whatever this machine is: the header names
    # this machine (none for report, which only runs ptxas), "target" the device of the IR.
    info = harness.device_info() if args.verb == "dump" else None
    head = dict(harness.header(info, script=__file__, argv=argv), target="NVIDIA H200 (sm_90a)")
    if args.verb == "dump":
        print(json.dumps(dump(args.out, args.overrides, args.shape, header=head), indent=1))
    else:
        harness.write_json(args.out / "report.json", dict(head, kernels=report(args.out,
                                                                               args.ptxas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
