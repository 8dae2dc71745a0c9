"""Elementwise math for Pallas Triton kernels: inline-PTX forms of the special functions and
the fused multiply-add, shared by every kernel package.

`fast=True` selects the PTX forms (GPU only: the Pallas interpreter cannot run PTX); `fast=False`
the plain jnp forms, which the interpreter runs on any backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
F32 = jnp.float32


def ptx(asm: str, *args):
    """One float32 result per element from inline PTX: $0 the result, $1... the arguments
    (broadcast to one shape)."""
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
    args = [jnp.broadcast_to(jnp.asarray(a, F32), shape) for a in args]
    [y] = plgpu.elementwise_inline_asm(
        asm,
        args=args,
        constraints=",".join(["=r"] + ["r"] * len(args)),
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)],
    )
    return y


def _ptx1(op, x):
    return ptx(f"{op} $0, $1;", x)


def exp2(x, *, fast: bool):
    if fast:
        # One MUFU op; libdevice's exp2f adds denormal handling around it. mamba_ssm uses the same
        # instruction (exp2f under --use_fast_math). ex2.approx(-inf) = +0, which the resets use.
        return _ptx1("ex2.approx.ftz.f32", x)
    return jnp.exp2(x)


def fma(a, b, c, *, fast: bool):
    """a * b + c, rounded once. XLA compiles Pallas Triton kernels without floating-point
    contraction (Nsight Compute counted 0 FFMA in these kernels: every a * b + c was an FMUL and
    an FADD), so the fused form has to be asked for."""
    if fast:
        return ptx("fma.rn.f32 $0, $1, $2, $3;", a, b, c)
    return a * b + c


def sigmoid(x, *, fast: bool = False):
    if fast:
        # Per (t, d) only, but libdevice's expf and the IEEE divide cost more than all the rest of
        # a step's per-channel work.
        return _ptx1("rcp.approx.ftz.f32", 1.0 + _ptx1("ex2.approx.ftz.f32", x * -LOG2E))
    return 1.0 / (1.0 + jnp.exp(-x))


def softplus(x, *, fast: bool = False):
    # Stable for both signs; jax.nn.softplus is logaddexp(x, 0), the same function. The fast
    # form loses log1p's accuracy only where exp(-|x|) < 2^-24, an absolute error below 6e-8.
    if fast:
        e = _ptx1("ex2.approx.ftz.f32", jnp.abs(x) * -LOG2E)
        return jnp.maximum(x, 0.0) + LN2 * _ptx1("lg2.approx.ftz.f32", 1.0 + e)
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))
