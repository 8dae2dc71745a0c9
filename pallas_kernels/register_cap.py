"""Register caps (`.maxnreg`) for Pallas Triton kernels.

Without a cap, ptxas gives each thread of a kernel as many registers as it finds a use for, up
to 255, and registers decide how many warps an SM holds: a one-warp kernel at 255 registers runs
8 warps an SM (12.5% occupancy), at 168 registers 12, at 128 registers 16. A kernel whose serial
loop waits on latencies may gain more from the extra warps than it loses to the few spills a cap
causes. Triton's `maxnreg` option sets that cap, but jax 0.11's Pallas Triton backend has no
compiler parameter for it. The option only sets the module attribute `ttg.maxnreg`, which
Triton's LLVM lowering turns into `.maxnreg`; so a kernel named `capped_name(name, n)` gets the
attribute on its lowered module, through a wrapper around the Pallas lowering function
(installed once, on first use; it changes nothing for other kernels).
"""

from __future__ import annotations

import functools
import re

_SUFFIX = "_maxnreg"
_CAPPED = re.compile(rf"{_SUFFIX}(\d+)$")


def capped_name(name: str, maxnreg: int | None) -> str:
    """The kernel name that carries a register cap (None: no cap, `name` unchanged)."""
    if maxnreg is None:
        return name
    # ptxas rounds a cap to a multiple of 8 and needs at least 24 registers a thread.
    if not 24 <= maxnreg <= 255 or maxnreg % 8:
        raise ValueError(f"maxnreg must be a multiple of 8 in [24, 255], got {maxnreg}")
    _install()
    return f"{name}{_SUFFIX}{maxnreg}"


@functools.cache
def _install() -> None:
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    lower = lowering.lower_jaxpr_to_triton_module

    @functools.wraps(lower)
    def lower_with_cap(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        match = _CAPPED.search(jaxpr.debug_info.func_name)
        if match:
            module = result.module.operation
            with module.context:
                module.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(
                    ir.IntegerType.get_signless(32), int(match.group(1))
                )
        return result

    lowering.lower_jaxpr_to_triton_module = lower_with_cap
