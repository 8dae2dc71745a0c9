"""Compile the Pallas SSD kernels for sm_90a without a GPU: shared memory, registers, spills.

    PYTHONPATH=. python3 benchmarks/probes/ssd_triton_probe.py dump DIR [--shape b,t,h,p,g,n]
        [--dtype bfloat16] [--no-segments] [--states] [--config field=value,...]
    /tmp/tvenv/bin/python benchmarks/probes/ssd_triton_probe.py compile DIR [kernel ...]

dump: lowers forward + backward of ssd_scan_pallas (default: the first benchmark shape,
    8 x 2048, 64 heads, headdim 64, one group, d_state 128, bf16, 64-segment rows, softplus,
    D and z) for CUDA on an abstract H200 (as tests/gpu.py does), writing each kernel's Triton
    module as text (<kernel>.ttir) and its launch parameters (meta.json). Needs only jax.
compile: Triton IR -> ptx with the pip `triton` package (3.5.0 parses jaxlib 0.11.2's IR as
    text; install it in a separate venv: python3.12 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip
    install triton==3.5.0), then `ptxas -v` (the one that package ships): per kernel the
    shared memory, registers and spill bytes. XLA compiles the same IR with its own Triton, so
    the figures are close, not equal; a kernel this fails to compile would fail on the GPU too.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys


def dump(out: pathlib.Path, shape, dtype: str, segments: bool, states: bool, overrides: dict):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax._src import mesh as mesh_lib
    from jax._src.pallas.triton import lowering

    from pallas_kernels.ssd import SSDConfig, pick_config, ssd_scan_pallas

    b, t, h, p, g, n = shape
    config = dataclasses.replace(pick_config(b, t, h, g, 256, SSDConfig()), **overrides)
    out.mkdir(parents=True, exist_ok=True)
    captured = []
    lower = lowering.lower_jaxpr_to_triton_module

    def catching(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    dt, f32, sds = jnp.dtype(dtype), jnp.float32, jax.ShapeDtypeStruct
    args = [sds((b, t, h, p), dt), sds((b, t, h), dt), sds((h,), f32), sds((b, t, g, n), dt),
            sds((b, t, g, n), dt), sds((h,), f32), sds((b, t, h, p), dt), sds((h,), f32),
            sds((b, t), jnp.int32), sds((b, 4, h, p, n), f32)]

    def loss(*xs):
        *xs, seg, init = xs
        kw = dict(segment_ids=seg if segments else None)
        if states:
            kw.update(initial_states=init, return_final_states=True, num_segments=4)
        out_ = ssd_scan_pallas(*xs, dt_softplus=True, config=config, **kw)
        y, final = out_ if states else (out_, jnp.zeros(()))
        return y.astype(f32).sum() + final.sum()

    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)
    lowering.lower_jaxpr_to_triton_module = catching
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            grad = jax.grad(loss, argnums=tuple(range(8)) + ((9,) if states else ()))
            text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    launches = {m.group(4): dict(grid=[int(m.group(i)) for i in (1, 2, 3)],
                                 num_stages=int(m.group(5)), num_warps=int(m.group(6)))
                for m in re.finditer(r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) '
                                     r': i32, ir = ".*?", name = "(\w+)", num_stages = (\d+) : '
                                     r'i32, num_warps = (\d+) : i32', text, re.S)}
    meta = dict(config=dataclasses.asdict(config), shape=shape, dtype=dtype, kernels={})
    for asm in captured:
        name = re.search(r"tt\.func (?:public )?@(\w+)", asm).group(1)
        (out / f"{name}.ttir").write_text(asm)
        meta["kernels"][name] = launches.get(name, {})
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def compile_ir(out: pathlib.Path, only: list[str]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    meta = json.loads((out / "meta.json").read_text())["kernels"]
    rows = {}
    for name, launch in meta.items():
        if only and name not in only:
            continue
        try:
            kernel = triton.compile(str(out / f"{name}.ttir"), target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=launch.get("num_warps", 4),
                                                 num_stages=launch.get("num_stages", 1)))
        except Exception as e:  # noqa: BLE001 - report every kernel
            rows[name] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
            print(f"{name:26s} FAILED {rows[name]['error']}", flush=True)
            continue
        ptx = out / f"{name}.ptx"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        rows[name] = dict(grid=launch.get("grid"), shared=kernel.metadata.shared,
                          registers=int(regs.group(1)) if regs else None,
                          spill_stores=int(spill.group(1)) if spill else None,
                          spill_loads=int(spill.group(2)) if spill else None)
        print(f"{name:26s} {rows[name]}", flush=True)
    (out / "compiled.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("verb", choices=("dump", "compile"))
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("kernels", nargs="*", help="compile: only these kernels")
    p.add_argument("--shape", default="8,2048,64,64,1,128", help="b,t,h,p,g,n")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-segments", action="store_true")
    p.add_argument("--states", action="store_true", help="with initial and final states")
    p.add_argument("--config", default="", help="SSDConfig overrides field=value,...")
    args = p.parse_args(argv)
    if args.verb == "dump":
        overrides = {}
        for kv in filter(None, args.config.split(",")):
            key, _, value = kv.partition("=")
            overrides[key] = int(value) if value.isdigit() else value
        shape = tuple(int(v) for v in args.shape.split(","))
        meta = dump(args.dir, shape, args.dtype, not args.no_segments, args.states, overrides)
        print(json.dumps(meta, indent=1))
    else:
        compile_ir(args.dir, args.kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
