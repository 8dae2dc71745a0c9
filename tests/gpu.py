"""GPU test helpers: parameters marked `gpu` that skip cleanly without one, and lowering for
CUDA on a machine without a GPU."""

import contextlib
import re

import jax
import pytest

HAS_GPU = jax.default_backend() == "gpu"


def ieee_float32_on_gpu():
    """XLA's float32 products at IEEE precision on a GPU, whose default is TF32 (~1e-3
    relative), for a test comparing two XLA programs at float32 tolerances; nothing on a CPU
    (already IEEE there: a precision context would only compile every program again)."""
    return jax.default_matmul_precision("highest") if HAS_GPU else contextlib.nullcontext()


def on_gpu(value):
    return pytest.param(
        value, marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]
    )


def lower_for_cuda(fn, *args, auto_axes: bool = False) -> str:
    """StableHLO text of jit(fn) lowered for CUDA. Pallas asks for the target GPU's kind, which an
    abstract mesh device supplies; XLA is never asked to compile, so nothing needs a GPU.
    auto_axes: the mesh axis is Auto rather than Explicit (no shardings in the types, as on a
    real single device), for code that vmaps or scatters over a batch."""
    from jax._src import mesh as mesh_lib

    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    kw = dict(axis_types=(jax.sharding.AxisType.Auto,)) if auto_axes else {}
    mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device, **kw)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def lowered_ops(text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op name, the shapes of its tensor results) for each op of lowered StableHLO `text`."""
    ops = []
    for line in text.splitlines():
        op = re.search(r"= (stablehlo\.\w+|\"?[a-z_]+\.[\w.]+)", line)
        result = line.rsplit("->", 1)[-1] if "->" in line else line.rsplit(":", 1)[-1]
        shapes = re.findall(r"tensor<((?:\d+x)+)\w+>", result)
        if op and shapes:
            dims = [tuple(int(d) for d in shape.rstrip("x").split("x")) for shape in shapes]
            ops.append((op.group(1).strip('"'), dims))
    return ops
