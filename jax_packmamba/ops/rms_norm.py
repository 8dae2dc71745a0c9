"""Row norms: RMSNorm with the residual add in front of it (mamba_ssm's prenorm block with
residual_in_fp32) and Mamba2's gated RMSNorm. Each row (token) is normalised on its own, so
packing never mixes sequences here.

Axis letters: c columns (features); every leading axis is a row.

    add_rms_norm:   stream = residual + hidden (float32; hidden where residual is None)
                    normed = stream / sqrt(mean(stream^2) + eps) * weight
    gated_rms_norm: v = x * silu(z), normalised the same way over each group of group_size
                    columns, times weight (mamba_ssm's RMSNormGated, norm_before_gate=False)

Everything is computed in float32. impl:
  "reference": these definitions in jnp ops, differentiated by autodiff ("auto" without a GPU);
  "pallas": Triton kernels (pallas_kernels/norm; GPU only, ValueError elsewhere), forward and
      a one-pass backward that recomputes the normalisation (and the gate) from the saved
      inputs and per-row rstd ("auto" on a GPU);
  "pallas_interpret": the same kernels through the Pallas interpreter (any backend; tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.segments import check_pallas_platform

NORM_IMPLS = ("auto", "reference", "pallas", "pallas_interpret")
F32 = jnp.float32


def add_rms_norm(hidden, residual, weight, *, eps: float, out_dtype=None, impl: str = "auto"):
    """(stream, normed): stream = residual + hidden in float32 (hidden cast to float32 where
    residual is None), normed = RMSNorm(stream) * weight in out_dtype (default hidden's dtype).

    hidden (..., c); residual None or (..., c); weight (c,). The backward takes both outputs'
    cotangents: the stream's own is added to the norm's input gradient in the same pass."""
    _check_rows("hidden", hidden, weight, residual=residual)
    out_dtype = _out_dtype(out_dtype, hidden)
    impl = _resolve(impl, hidden)
    if impl == "reference":
        return add_rms_norm_reference(hidden, residual, weight, eps=eps, out_dtype=out_dtype)
    from pallas_kernels.norm import add_rms_norm_pallas

    return add_rms_norm_pallas(
        hidden,
        residual,
        weight,
        eps=eps,
        out_dtype=out_dtype,
        interpret=impl == "pallas_interpret",
    )


def rms_norm(x, weight, *, eps: float, out_dtype=None, impl: str = "auto"):
    """RMSNorm(x) * weight in out_dtype (default x's dtype): add_rms_norm's normed without a
    residual, for callers that keep no stream (nothing but the norm is stored or read)."""
    _check_rows("x", x, weight)
    out_dtype = _out_dtype(out_dtype, x)
    impl = _resolve(impl, x)
    if impl == "reference":
        return _normalize(x.astype(F32), weight, eps).astype(out_dtype)
    from pallas_kernels.norm import rms_norm_pallas

    return rms_norm_pallas(
        x, weight, eps=eps, out_dtype=out_dtype, interpret=impl == "pallas_interpret"
    )


def gated_rms_norm(
    x, z, weight, *, group_size: int, eps: float, out_dtype=None, impl: str = "auto"
):
    """RMSNorm of x * silu(z) over each group of group_size columns, times weight, in out_dtype
    (default x's dtype). x, z (..., c); weight (c,); c a multiple of group_size."""
    _check_rows("x", x, weight)
    if np.shape(z) != np.shape(x):
        raise ValueError(f"z must have x's shape {np.shape(x)}, got {np.shape(z)}")
    _check_float("z", z)
    cols = np.shape(x)[-1]
    if not isinstance(group_size, int) or group_size < 1 or cols % group_size:
        raise ValueError(
            f"group_size must be a positive int dividing x's last axis {cols}, got {group_size!r}"
        )
    out_dtype = _out_dtype(out_dtype, x)
    impl = _resolve(impl, x)
    if impl == "reference":
        return gated_rms_norm_reference(
            x, z, weight, group_size=group_size, eps=eps, out_dtype=out_dtype
        )
    from pallas_kernels.norm import gated_rms_norm_pallas

    return gated_rms_norm_pallas(
        x,
        z,
        weight,
        group_size=group_size,
        eps=eps,
        out_dtype=out_dtype,
        interpret=impl == "pallas_interpret",
    )


def add_rms_norm_reference(hidden, residual, weight, *, eps: float, out_dtype=None):
    """The pure-JAX spec of `add_rms_norm` (same contract), differentiated by autodiff."""
    out_dtype = _out_dtype(out_dtype, hidden)
    stream = hidden.astype(F32) if residual is None else residual.astype(F32) + hidden.astype(F32)
    return stream, _normalize(stream, weight, eps).astype(out_dtype)


def gated_rms_norm_reference(x, z, weight, *, group_size: int, eps: float, out_dtype=None):
    """The pure-JAX spec of `gated_rms_norm` (same contract), differentiated by autodiff."""
    out_dtype = _out_dtype(out_dtype, x)
    v = x.astype(F32) * jax.nn.silu(z.astype(F32))
    return group_rms_norm(v, weight, group_size=group_size, eps=eps, out_dtype=out_dtype)


def group_rms_norm(v, weight, *, group_size: int, eps: float, out_dtype):
    """`gated_rms_norm`'s normalisation of its already gated float32 input v = x * silu(z) (a
    decode step's kernel gates it): RMSNorm over each group of group_size columns, times
    weight, in out_dtype. XLA ops."""
    groups = v.reshape(*v.shape[:-1], -1, group_size)
    groups = groups * jax.lax.rsqrt(jnp.mean(jnp.square(groups), axis=-1, keepdims=True) + eps)
    return (groups.reshape(v.shape) * weight).astype(out_dtype)


def _normalize(x, weight, eps):
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * weight


def _out_dtype(out_dtype, x):
    return jnp.dtype(jnp.result_type(x) if out_dtype is None else out_dtype)


def _resolve(impl: str, x) -> str:
    if impl not in NORM_IMPLS:
        raise ValueError(f"impl must be one of {NORM_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl != "reference" and int(np.prod(np.shape(x)[:-1])) == 0:
        return "reference"  # no rows: nothing to launch
    check_pallas_platform(impl, fallback="reference")
    return impl


def _check_float(name, a):
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise ValueError(f"{name} must be a real floating array, got dtype {jnp.result_type(a)}")


def _check_rows(name, x, weight, *, residual=None):
    if len(np.shape(x)) < 1 or np.shape(x)[-1] == 0:
        raise ValueError(f"{name} must be (..., columns) with columns >= 1, got {np.shape(x)}")
    cols = np.shape(x)[-1]
    if np.shape(weight) != (cols,):
        raise ValueError(
            f"weight must have shape ({cols},) to match {name} {np.shape(x)}, got "
            f"{np.shape(weight)}"
        )
    if residual is not None and np.shape(residual) != np.shape(x):
        raise ValueError(
            f"residual must have {name}'s shape {np.shape(x)}, got {np.shape(residual)}"
        )
    for n, a in {name: x, "weight": weight, "residual": residual}.items():
        if a is not None:
            _check_float(n, a)
