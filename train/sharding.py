"""Device mesh and shardings: a (data, fsdp) mesh over all devices.

Parameters and optimizer state are sharded on the fsdp axis (each array along its largest
dimension divisible by the fsdp size; arrays with none stay replicated); batch rows are sharded
on data x fsdp together, so every device computes on its own rows (FSDP is data parallelism
whose parameters are gathered when needed). XLA's SPMD partitioner inserts the collectives.
The optimizer state (both Adam moments) takes each parameter's sharding, so it is sharded on
fsdp too (ZeRO-style); with fsdp = 1 everything is replicated and gradients are all-reduced.

Gradient communication (MeshConfig.grad_reduce, GRAD_REDUCE): "auto" leaves the reduction to
the SPMD partitioner (float32; the single-device result up to summation order); "float32" /
"bfloat16" reduce explicitly in that dtype (train.step.explicit_grad_sums: reduce-scatter over
fsdp onto each parameter's shard, all-reduce over data).

Overlap (MeshConfig.overlap_collectives, OVERLAP_XLA_FLAGS): XLA's GPU latency-hiding
scheduler, which moves the (already asynchronous) collectives' start early and their end late
so that they run during the backward pass. The flags must be in XLA_FLAGS before jax starts
its backend (apply_mesh_options); they are GPU flags, parsed and unused on CPU.

Memory (default_memory_fraction): the trainer lets XLA's GPU allocator take MEM_FRACTION of each
device's memory, as the benchmarks do, unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp")
# MeshConfig.grad_reduce -> the dtype the gradients are reduced in (None: XLA's SPMD choice).
GRAD_REDUCE = {"auto": None, "float32": "float32", "bfloat16": "bfloat16"}
# MeshConfig.overlap_collectives: XLA's latency-hiding scheduler (schedules async collectives
# to overlap compute; async collectives themselves are XLA's GPU default, turned off only by
# --xla_gpu_disable_async_collectives) and a high-priority stream for them.
OVERLAP_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)
# The share of each GPU's memory that XLA's allocator takes, unless XLA_PYTHON_CLIENT_MEM_FRACTION
# is set. jax's default, 0.75, leaves 20 GB of an 80 GB card unused: mamba2-1.3b at 8 x 2048
# (14 GiB of state, 47 GiB of step temporaries) ran out of memory under it, while
# benchmarks/bench_train.py, whose children run at 0.95, trained the same program.
MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
MEM_FRACTION = "0.95"


def grad_reduce_dtype(grad_reduce: str):
    """The dtype name MeshConfig.grad_reduce reduces gradients in (None for "auto")."""
    if grad_reduce not in GRAD_REDUCE:
        raise ConfigError(f"--mesh.grad_reduce={grad_reduce!r} is not one of {list(GRAD_REDUCE)}")
    return GRAD_REDUCE[grad_reduce]


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def default_memory_fraction(environ: dict | None = None) -> str | None:
    """Sets XLA_PYTHON_CLIENT_MEM_FRACTION to MEM_FRACTION where it is unset (a value already
    set wins) and returns the value in effect. environ None: this process's os.environ, read by
    jax when its backend starts, so call it before anything touches a device; once the backend
    has started nothing is set (it would be ignored) and the result is None. A dict: the
    environment of a process still to start."""
    this_process = environ is None
    environ = os.environ if this_process else environ
    if this_process and _backends_started():
        return None
    return environ.setdefault(MEM_FRACTION_VAR, MEM_FRACTION)


def add_xla_flags(flags, environ: dict | None = None) -> list[str]:
    """Appends to XLA_FLAGS each flag whose name is not there yet (a value already set wins);
    returns those added. environ None: this process's os.environ, and then a ConfigError when a
    flag must be added but jax's backend has already started (XLA reads XLA_FLAGS once, so it
    would be silently ignored); a dict: the environment of a process still to start."""
    this_process = environ is None
    environ = os.environ if this_process else environ
    current = environ.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0] for f in current.split()}
    missing = [f for f in flags if f.split("=", 1)[0] not in present]
    if missing and this_process and _backends_started():
        raise ConfigError(
            f"the XLA flags {missing} must be set before jax starts its backend; "
            f'set XLA_FLAGS="{" ".join(missing)}" in the environment'
        )
    if missing:
        environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    return missing


def apply_mesh_options(config: MeshConfig) -> list[str]:
    """Checks grad_reduce and overlap_collectives, and sets the overlap flags (before jax's
    backend starts: call it before anything touches a device). Returns the flags added."""
    grad_reduce_dtype(config.grad_reduce)
    if not isinstance(config.overlap_collectives, bool):
        raise ConfigError(
            f"--mesh.overlap_collectives must be true or false, got {config.overlap_collectives!r}"
        )
    return add_xla_flags(OVERLAP_XLA_FLAGS) if config.overlap_collectives else []


def maybe_initialize_distributed(config: MeshConfig) -> None:
    """jax.distributed.initialize() for multi-host runs, when configured (before any jax use)."""
    if not config.distributed:
        return
    kwargs = {
        k: v
        for k, v in dict(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        ).items()
        if v is not None
    }
    jax.distributed.initialize(**kwargs)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int]:
    data, fsdp = config.data, config.fsdp
    if data == -1:
        if num_devices % fsdp:
            raise ConfigError(f"--mesh.fsdp={fsdp} does not divide the {num_devices} devices")
        data = num_devices // fsdp
    elif fsdp == -1:
        if num_devices % data:
            raise ConfigError(f"--mesh.data={data} does not divide the {num_devices} devices")
        fsdp = num_devices // data
    if data * fsdp != num_devices:
        raise ConfigError(
            f"--mesh.data={data} x --mesh.fsdp={fsdp} = {data * fsdp} devices, but "
            f"there are {num_devices}; use -1 on one axis to fill"
        )
    return data, fsdp


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension divisible by fsdp; replicate when none is (or fsdp == 1)."""
    if fsdp == 1 or not shape:
        return P()
    dims = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % fsdp == 0]
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[dims[0]] = "fsdp"
    return P(*spec)


def param_specs(tree, fsdp: int):
    """param_spec of every leaf; under "layers" (blocks stacked on a leading layer axis, which
    the model scans) of each layer's slice, the layer axis unsharded."""

    def spec(path, x):
        shape = tuple(x.shape)
        if any(getattr(k, "key", None) == "layers" for k in path):
            return P(None, *param_spec(shape[1:], fsdp))
        return param_spec(shape, fsdp)

    return jax.tree_util.tree_map_with_path(spec, tree)


def carry_specs(carry):
    """PartitionSpecs of a carried state (TrainState.carry, (layers, rows, ...)): its rows over
    data x fsdp, as the batch's rows, so each device holds the states of its rows; with stream
    groups ((groups, layers, rows, ...) and the scalar next group) the group axis is not
    sharded (the step indexes it), the scalar replicated."""
    lead = (None, None) if "next_group" in carry else (None,)
    return jax.tree.map(lambda x: P(*lead, BATCH_AXES) if x.ndim else P(), carry)


def state_shardings(mesh: Mesh, abstract_state):
    """param_specs' shardings, a carried state's by carry_specs."""
    specs = param_specs(abstract_state, mesh.shape["fsdp"])
    carry = getattr(abstract_state, "carry", None)
    if carry is not None:
        specs = dataclasses.replace(specs, carry=carry_specs(carry))
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays are (grad_accum, rows, length): rows over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_rows(rows: int, mesh: Mesh, mode: str) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        hint = (
            (
                "single mode runs one sequence per step, so it needs one device "
                "(e.g. CUDA_VISIBLE_DEVICES=0)"
            )
            if mode == "single"
            else f"make --data.batch_size a multiple of {shards}"
        )
        raise ConfigError(
            f"batch rows ({rows}) must divide evenly over the {shards} data-parallel "
            f"devices (mesh data x fsdp); {hint}"
        )


def put_batch(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global host arrays -> sharded jax arrays (every process holds the same global batch)."""
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        for k, v in arrays.items()
    }


# Collectives in compiled HLO text: "%name = TYPE op(...)"; TYPE an array type or a tuple of them.
_COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\w+\[[\d,]*\]\S*)\s+(all-reduce|reduce-scatter|all-gather|"
    r"all-to-all|collective-permute)(-start)?\("
)
_ARRAY = re.compile(r"\b(pred|[su]\d+|bf16|f\d+)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "bf16": 2}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per call, by "op dtype" (e.g. "all-reduce f32"),
    from a compiled module's text (jitted.lower(...).compile().as_text()). Async pairs count
    once (their -start); an all-gather-start's tuple counts its last array, the gathered one."""
    out: dict[str, int] = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        arrays = _ARRAY.findall(m.group(1))
        if m.group(2) == "all-gather" and m.group(3):
            arrays = arrays[-1:]
        for dtype, dims in arrays:
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            item = _ITEM_BYTES.get(dtype) or int(re.sub(r"\D", "", dtype)) // 8
            key = f"{m.group(2)} {dtype}"
            out[key] = out.get(key, 0) + size * item
    return out
