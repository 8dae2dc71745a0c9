"""Device mesh and shardings: a (data, fsdp) mesh over all devices.

Parameters and optimizer state are sharded on the fsdp axis (each array along its largest
dimension divisible by the fsdp size; arrays with none stay replicated); batch rows are sharded
on data x fsdp together, so every device computes on its own rows (FSDP is data parallelism
whose parameters are gathered when needed). XLA's SPMD partitioner inserts the collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.config import ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(config: MeshConfig) -> None:
    """jax.distributed.initialize() for multi-host runs, when configured (before any jax use)."""
    if not config.distributed:
        return
    kwargs = {k: v for k, v in dict(coordinator_address=config.coordinator_address,
                                    num_processes=config.num_processes,
                                    process_id=config.process_id).items() if v is not None}
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
        raise ConfigError(f"--mesh.data={data} x --mesh.fsdp={fsdp} = {data * fsdp} devices, but "
                          f"there are {num_devices}; use -1 on one axis to fill")
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


def state_shardings(mesh: Mesh, abstract_state):
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)),
                        abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays are (grad_accum, rows, length): rows over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_rows(rows: int, mesh: Mesh, mode: str) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        hint = ("single mode runs one sequence per step, so it needs one device "
                "(e.g. CUDA_VISIBLE_DEVICES=0)") if mode == "single" else \
               f"make --data.batch_size a multiple of {shards}"
        raise ConfigError(f"batch rows ({rows}) must divide evenly over the {shards} data-parallel "
                          f"devices (mesh data x fsdp); {hint}")


def put_batch(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global host arrays -> sharded jax arrays (every process holds the same global batch)."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in arrays.items()}
