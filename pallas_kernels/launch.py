"""What every Pallas Triton kernel package shares: the `pallas_call` wrapper, masked loads and
stores, BlockSpecs for fixed tiles, and the device's core count for the tiling heuristics.

A kernel body takes its refs by name, `body(r, **static)`: `r` maps each input and output name
to its ref. An optional input is an input passed as None: `call` leaves it out, and the body asks
`"name" in r`. That is the only place its presence is recorded (no `has_name` flag beside it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Streaming multiprocessors of an H100 SXM or H200 (both 132). The heuristics' fallback where
# the device does not say (CPU, the interpreter): CPU runs then tile as the GPU would.
DEFAULT_CORES = 132


@functools.cache
def core_count() -> int:
    """Streaming multiprocessors of the default device (DEFAULT_CORES where it has none)."""
    cores = getattr(jax.devices()[0], "core_count", None)
    return int(cores) if cores else DEFAULT_CORES


def call(
    body: Callable,
    inputs: Mapping[str, jax.Array | None],
    outputs: Mapping[str, jax.ShapeDtypeStruct],
    *,
    grid: tuple[int, ...],
    name: str,
    num_warps: int,
    num_stages: int = 1,
    interpret: bool,
    aliases: Mapping[str, str] | None = None,
    in_specs: Mapping[str, pl.BlockSpec] | None = None,
    out_specs: Mapping[str, pl.BlockSpec] | None = None,
    **static,
) -> tuple:
    """pallas_call(body) on the present (not None) inputs; returns the outputs as a tuple, in
    the order of `outputs`.

    aliases: {output name: input name} written in place. in_specs, out_specs: BlockSpecs of
    the named operands whose tile is fixed per program; the others are whole arrays, indexed by
    hand in the body. static: keyword arguments bound into the body.
    """
    present = {k: v for k, v in inputs.items() if v is not None}
    names = (*present, *outputs)
    aliases = aliases or {}
    io_alias = {list(present).index(aliases[o]): i for i, o in enumerate(outputs) if o in aliases}

    def kernel(*refs):
        body(dict(zip(names, refs)), **static)

    specs = {}
    if in_specs:
        specs["in_specs"] = tuple(in_specs.get(k, pl.no_block_spec) for k in present)
    if out_specs:
        specs["out_specs"] = tuple(out_specs.get(k, pl.no_block_spec) for k in outputs)
    return tuple(
        pl.pallas_call(
            kernel,
            out_shape=tuple(outputs.values()),
            grid=grid,
            **specs,
            input_output_aliases=io_alias,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name=name,
        )(*present.values())
    )


def i32(v):
    # The interpreter's load/store discharge rejects plain Python ints as indices.
    return jnp.int32(v) if isinstance(v, int) else v


def load(ref, idx, mask=None, other=0):
    """ref[idx], masked (`other` where mask is False, nothing read there)."""
    idx = tuple(i32(i) for i in idx)
    if mask is None:
        return plgpu.load(ref.at[idx])
    return plgpu.load(ref.at[idx], mask=mask, other=other)


def store(ref, idx, value, mask=None):
    """ref[idx] = value in ref's dtype, masked (nothing written where mask is False)."""
    idx = tuple(i32(i) for i in idx)
    plgpu.store(ref.at[idx], value.astype(ref.dtype), mask=mask)


def iota(n: int):
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
