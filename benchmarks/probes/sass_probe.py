"""Registers, spills and SASS instruction mix of the selective-scan kernels (GPU machine).

    PYTHONPATH=. python3 benchmarks/sass_probe.py OUT_DIR \
        [chunk:block_d:bwd_block_d:window:ckpt:reduce]

Captures the Triton IR that Pallas hands to XLA, compiles it again with the `triton` package
(a close relative of XLA's own Triton, so the numbers are indicative), and prints per kernel:
registers, spills, and counts of the SASS opcodes that matter for this scan.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from jax._src.pallas.triton import lowering as tl_lowering
from pallas_kernels.selective_scan import ScanConfig, selective_scan_pallas

# "/*0a20*/  @P0 FFMA R1, ..." -> FFMA
_OPCODE = r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)"
captured = {}
_orig = tl_lowering.lower_jaxpr_to_triton_module


def _capture(jaxpr, grid_mapping, *a, **k):
    res = _orig(jaxpr, grid_mapping, *a, **k)
    captured[jaxpr.debug_info.func_name] = res.module.operation.get_asm(enable_debug_info=False)
    return res


tl_lowering.lower_jaxpr_to_triton_module = _capture


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    cfg = ScanConfig()
    if len(sys.argv) > 2:
        chunk, bd, bbd, win, ck, red = sys.argv[2].split(":")
        cfg = ScanConfig(chunk=int(chunk), block_d=int(bd), bwd_block_d=int(bbd), window=int(win),
                         ckpt=int(ck), reduce=red)
    b, L, d, n = 1, 8192, 4096, 16
    bf = jnp.bfloat16
    sd = jax.ShapeDtypeStruct
    args = [sd((b, L, d), bf), sd((b, L, d), bf), sd((d, n), jnp.float32), sd((b, L, n), bf),
            sd((b, L, n), bf), sd((d,), jnp.float32), sd((b, L, d), bf), sd((d,), jnp.float32)]

    def f(*a):
        *a, seg = a
        y, vjp = jax.vjp(lambda *x: selective_scan_pallas(
            *x, delta_softplus=True, segment_ids=seg, config=cfg), *a)
        return vjp(y)

    jax.jit(f).trace(*args, sd((b, L), jnp.int32)).lower()
    import triton
    from triton.backends.compiler import GPUTarget

    nw = cfg.num_warps
    for name, text in captured.items():
        path = os.path.join("/tmp", name + ".ttir")
        with open(path, "w") as fh:
            fh.write(text)
        try:
            k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=nw, num_stages=1))
        except Exception as e:  # indicative only
            print(name, "triton.compile failed:", repr(e)[:400])
            continue
        cubin = os.path.join("/tmp", name + ".cubin")
        with open(cubin, "wb") as fh:
            fh.write(k.asm["cubin"])
        sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        with open(os.path.join(out, name + ".sass"), "w") as fh:
            fh.write(sass)
        ops = collections.Counter(
            m.group(1).split(".")[0] for m in re.finditer(_OPCODE, sass))
        top = ", ".join(f"{o}:{c}" for o, c in ops.most_common(14))
        res = subprocess.run(["cuobjdump", "-res-usage", cubin], capture_output=True,
                             text=True).stdout
        usage = " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", res))
        print(f"{name}: {usage} total={sum(ops.values())} | {top}", flush=True)


if __name__ == "__main__":
    main()
