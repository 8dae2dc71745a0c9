"""custom_vjp wiring of the Pallas causal conv: argument layout and the partial-sum reductions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.causal_conv1d import kernel

F32 = jnp.float32
BLOCK_E = 128  # channels a program: one per thread on 4 warps
NUM_WARPS = 4
CHUNK = 256  # time steps a program (each also re-reads w - 1 rows of halo)


def causal_conv1d_pallas(
    x, weight, bias, positions, *, activation, interpret: bool = False, chunk: int = CHUNK
):
    """Same contract as jax_packmamba.ops.causal_conv1d (arguments already validated there),
    with positions (b, t) int32 = positions_from_segment_ids(segment_ids). `chunk` (time steps
    a program, a power of two) is for tests that need chunk edges in short rows."""
    _, length, channels = x.shape
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    st = kernel.Static(
        length=length,
        channels=channels,
        width=weight.shape[1],
        block_e=BLOCK_E,
        chunk=min(chunk, 1 << max(0, (length - 1).bit_length())),
        silu=activation == "silu",
    )
    return _conv_jit(st, interpret, x, weight, bias, positions.astype(jnp.int32))


def num_programs(batch: int, length: int, channels: int, chunk: int = CHUNK) -> int:
    """Programs one kernel launch runs for x (batch, length, channels)."""
    return batch * -(-length // chunk) * -(-channels // BLOCK_E)


def _kernel_params(weight, bias):
    w_t = weight.astype(F32).T  # (w, e): each tap is a coalesced row
    return w_t, None if bias is None else bias.astype(F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv(st, interpret, x, weight, bias, positions):
    return kernel.conv_fwd(
        x, *_kernel_params(weight, bias), positions, st=st, num_warps=NUM_WARPS, interpret=interpret
    )


def _conv_fwd(st, interpret, x, weight, bias, positions):
    return _conv(st, interpret, x, weight, bias, positions), (x, weight, bias, positions)


def _conv_bwd(st, interpret, res, g):
    x, weight, bias, positions = res
    dx, dw, dbias = kernel.conv_bwd(
        x,
        *_kernel_params(weight, bias),
        positions,
        g,
        st=st,
        num_warps=NUM_WARPS,
        interpret=interpret,
    )
    dweight = dw.sum((0, 1)).T.astype(weight.dtype)
    dbias = None if bias is None else dbias.sum((0, 1)).astype(bias.dtype)
    return dx, dweight, dbias, None


_conv.defvjp(_conv_fwd, _conv_bwd)
# Eager callers (tests) would otherwise re-trace the kernels on every call.
_conv_jit = jax.jit(_conv, static_argnums=(0, 1))
