"""Pallas (Triton) kernels of one decode step: the Mamba1 mixer's middle (kernel.py;
`mixer_core_pallas` runs them), the Mamba2 mixer's conv step and state update (kernel.py's
conv, ssd_update.py; `mamba2_core_pallas`, or the state update alone, `ssd_update_pallas`)
and the residual add + RMSNorm in front of every block of either family (add_norm.py;
`add_rms_norm`; or in the fused in_proj kernel: `mixer_pallas` / `mamba2_pallas(add_norm=...)`)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

# jax registers a config that enters its trace context (pallas_fuser_disable_nested_fuse) when
# the Pallas fuser is first imported, which the interpreter does lazily at its first call. Left
# to happen mid-run, that changes the trace context, and every jitted function traced before it
# misses its cache once (the decode loop compiled twice). Importing it with the kernels, before
# anything is traced, keeps the context fixed.
import jax.experimental.pallas.fuser  # noqa: F401
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode import config as decode_config
from pallas_kernels.decode import kernel, ssd_update
from pallas_kernels.decode.add_norm import add_rms_norm
from pallas_kernels.decode.config import DecodeConfig, pick_config
from pallas_kernels.decode.ssd_update import STATE_DTYPES, norm_parts, ssd_update_pallas

__all__ = [
    "STATE_DTYPES",
    "DecodeConfig",
    "ResidualNorm",
    "add_rms_norm",
    "check_mixer_core_args",
    "check_mamba2_args",
    "mamba2_core_pallas",
    "mamba2_pallas",
    "mixer_core_pallas",
    "mixer_pallas",
    "norm_parts",
    "pick_config",
    "ssd_update_pallas",
    "supported",
]

F32 = jnp.float32


class ResidualNorm(NamedTuple):
    """A block's residual add and RMSNorm for mixer_pallas or mamba2_pallas to do first: the
    residual stream (b, d) float32, the norm's weight (d,) and epsilon."""

    residual: jax.Array
    weight: jax.Array
    eps: float


def supported(d_state: int) -> bool:
    """Whether the kernels take this shape (they load each row's d_state states as one
    power-of-two block)."""
    return d_state >= 1 and d_state & (d_state - 1) == 0


def mixer_core_pallas(
    xz,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    dt_proj_weight,
    dt_bias,
    A_log,
    D,
    *,
    config: DecodeConfig | None = None,
    interpret: bool = False,
):
    """The per-token part of a Mamba1 mixer between in_proj and out_proj, in two kernels.

    Args (c is the compute dtype, that of xz):
      xz: (b, 2e) in_proj output, x then z.
      conv_state: (b, w - 1, e) c, the last conv inputs, oldest first.
      ssm_state: (b, e, n) float32 or bfloat16 (its storage dtype: read, updated in float32,
        stored back in that dtype; any other dtype is cast to float32).
      conv_weight: (e, w); conv_bias: (e,) or None (used in c, as the unfused step does).
      x_proj_weight: (e, r + 2n); dt_proj_weight: (r, e), both c.
      dt_bias: (e,) float32; A_log: (e, n) float32 (A = -exp(A_log)); D: (e,) float32 or None.
      config: block sizes (default `pick_config`).
      interpret: run through the Pallas interpreter (any backend; no PTX math).

    Returns:
      (y (b, e) c, conv_state', ssm_state'), the same values as the unfused step
      (jax_packmamba.model.mixer_core_xla, MambaMixer's decode step between its in_proj and
      out_proj). Both states are written in place where the caller lets XLA donate them (a
      while loop's carry does).
    """
    b, e, n, r, w = check_mixer_core_args(
        xz,
        conv_state,
        ssm_state,
        conv_weight,
        conv_bias,
        x_proj_weight,
        dt_proj_weight,
        dt_bias,
        A_log,
        D,
    )
    cfg = config or pick_config(b, e, n)
    st = _static(b, e, n, r, w, cfg, xz.dtype, interpret)
    c = xz.dtype
    conv_args = (
        xz,
        conv_state.astype(c),
        conv_weight.astype(c),
        None if conv_bias is None else conv_bias.astype(c),
    )
    if cfg.x_proj_in_conv:
        conv_state, xc, parts = kernel.conv_x_proj(
            *conv_args,
            x_proj_weight.astype(c),
            st=st,
            num_warps=cfg.num_warps_conv,
            interpret=interpret,
        )
    else:
        conv_st = dataclasses.replace(st, conv_blocks_per_program=1)
        conv_state, xc = kernel.conv_step(
            *conv_args, st=conv_st, num_warps=cfg.num_warps_conv, interpret=interpret
        )
        precision = jax.lax.Precision.HIGHEST if c == F32 else None  # as the kernels' dots
        dbc = jnp.dot(xc, x_proj_weight.astype(c), preferred_element_type=F32, precision=precision)
        parts = dbc[None]
    y, ssm_state = _ssm_update(
        parts, xc, xz, ssm_state, dt_proj_weight, dt_bias, A_log, D, st, cfg, interpret
    )
    return y, conv_state, ssm_state


def mixer_pallas(
    hidden,
    in_proj_weight,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    dt_proj_weight,
    dt_bias,
    A_log,
    D,
    *,
    add_norm: ResidualNorm | None = None,
    config: DecodeConfig | None = None,
    interpret: bool = False,
):
    """A Mamba1 mixer's decode step from its normed input to out_proj's input: in_proj (no
    bias), then mixer_core_pallas's work. Where the config fuses in_proj (pick_config: a batch
    of at most config.FUSE_IN_PROJ_ROWS rows), in_proj and the conv/x_proj kernel are one
    kernel (decode_in_proj_conv, all rows in one block of 16 or 32); otherwise in_proj is
    XLA's product and mixer_core_pallas follows.

    Args: hidden (b, d) in the compute dtype c; in_proj_weight (d, 2e) c; the rest as
    mixer_core_pallas's. add_norm: the block's residual add and norm in front: hidden is then
    the previous block's output, and the step's input add_rms_norm(add_norm.residual, hidden,
    add_norm.weight, eps=add_norm.eps)'s normed half; the fused kernel does that work itself
    where the config says (add_norm_in_proj: decode_add_norm_in_proj_conv), otherwise the
    add + norm kernel runs first.

    Returns:
      (y (b, e) c, conv_state', ssm_state'), mixer_core_pallas(hidden @ in_proj_weight, ...)'s
      values; in_proj's float32 sums may round to a different c value where they are summed in
      another order. With add_norm, residual' = residual + hidden (b, d) float32 follows (not
      in place: the fused kernel's programs all read the residual).
    """
    check_in_proj_args(hidden, in_proj_weight, "2 * d_inner")
    c = hidden.dtype
    b, d = hidden.shape
    if add_norm is not None:
        _check_residual_norm(add_norm, b, d)
    xz_shape = jax.ShapeDtypeStruct((b, in_proj_weight.shape[1]), c)
    core_args = (
        conv_state,
        ssm_state,
        conv_weight,
        conv_bias,
        x_proj_weight,
        dt_proj_weight,
        dt_bias,
        A_log,
        D,
    )
    b, e, n, r, w = check_mixer_core_args(xz_shape, *core_args)
    cfg = config or pick_config(b, e, n, d)
    fused_norm = add_norm is not None and cfg.fuse_in_proj and cfg.add_norm_in_proj
    residual, hidden = _add_norm_in_front(add_norm, fused_norm, hidden, interpret)
    if not cfg.fuse_in_proj:
        xz = jnp.dot(hidden, in_proj_weight.astype(c))
        y = mixer_core_pallas(xz, *core_args, config=cfg, interpret=interpret)
        return (*y, *residual)
    most = max(cfg.block_rows, decode_config.FUSED_ROWS_MAX)
    if b > most or d % cfg.block_k or e % cfg.block_conv:
        raise ValueError(
            f"fuse_in_proj needs batch <= {most}, d_model={d} a multiple of "
            f"block_k={cfg.block_k} and d_inner={e} of block_conv={cfg.block_conv}"
        )
    st = _static(b, e, n, r, w, cfg, c, interpret, d_model=d)
    # The fused kernel takes all rows in one block (32 past 16); the state kernel keeps the
    # config's row blocks (one H100, DESIGN.md round 6: at 32 rows a 32-row state block took
    # 10.8 us a 2.8b layer where two 16-row blocks took 7.4).
    fused_rows = max(cfg.block_rows, decode_config.fused_block_rows(b))
    fused_st, norm_args = _add_norm_inside(
        add_norm, fused_norm, dataclasses.replace(st, block_rows=fused_rows)
    )
    results = kernel.in_proj_conv(
        hidden,
        in_proj_weight.astype(c),
        conv_state.astype(c),
        conv_weight.astype(c),
        None if conv_bias is None else conv_bias.astype(c),
        x_proj_weight.astype(c),
        st=fused_st,
        num_warps=cfg.num_warps_in_proj,
        num_stages=cfg.num_stages_in_proj,
        interpret=interpret,
        **norm_args,
    )
    if fused_norm:
        residual, results = results[:1], results[1:]
    xz, conv_state, xc, parts = results
    y, ssm_state = _ssm_update(parts, xc, xz, ssm_state, *core_args[5:], st, cfg, interpret)
    return (y, conv_state, ssm_state, *residual)


def _add_norm_in_front(add_norm: ResidualNorm | None, fused: bool, hidden, interpret: bool):
    """((residual',) or (), the step's input): the add + norm kernel in front where add_norm
    is given and the fused kernel does not take it; hidden as it is otherwise."""
    if add_norm is None or fused:
        return (), hidden
    residual, hidden = add_rms_norm(
        add_norm.residual,
        hidden,
        add_norm.weight,
        eps=add_norm.eps,
        dtype=hidden.dtype,
        interpret=interpret,
    )
    return (residual,), hidden


def _add_norm_inside(add_norm: ResidualNorm | None, fused: bool, st: kernel.Static):
    """The fused kernel's Static and extra inputs for the add + norm inside it (fused)."""
    if not fused:
        return st, {}
    inputs = dict(residual=add_norm.residual, norm_weight=add_norm.weight.astype(F32))
    return dataclasses.replace(st, norm_eps=float(add_norm.eps)), inputs


def _check_residual_norm(add_norm: ResidualNorm, b: int, d: int):
    residual, weight = add_norm.residual, add_norm.weight
    if tuple(np.shape(residual)) != (b, d) or jnp.result_type(residual) != F32:
        raise ValueError(
            f"add_norm.residual must be (batch={b}, d_model={d}) float32, got shape "
            f"{tuple(np.shape(residual))} dtype {jnp.result_type(residual)}"
        )
    if tuple(np.shape(weight)) != (d,):
        raise ValueError(f"add_norm.weight must have shape ({d},), got {tuple(np.shape(weight))}")


# The Mamba2 conv step's tiling (fused with in_proj or not): rows as the Mamba1 kernels',
# channel blocks of 64, in_proj's contraction tiles of 128.
MAMBA2_CONV = DecodeConfig()


def mamba2_core_pallas(
    zxbcdt,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    dt_bias,
    A_log,
    D,
    *,
    norm_weight=None,
    interpret=False,
):
    """A Mamba2 mixer's decode step between in_proj and its norm, in two kernels that read
    in_proj's output where it lies (no slices of it copied out): the conv step over xBC
    (decode_conv, the conv state shifted in place), then the state update (decode_ssd_update,
    in place) with x, B and C read from the conv's output, z and dt from in_proj's, and its
    output gated, y * silu(z), in float32: the gated RMSNorm's input before normalising.

    Args (c is the compute dtype, that of zxbcdt; e = h * p, x = e + 2 g n):
      zxbcdt: (b, e + x + h) in_proj's output: z, xBC, dt.
      conv_state: (b, w - 1, x) the last conv inputs, oldest first (stored in c).
      ssm_state: (b, h, p, n) float32 or bfloat16 (its storage dtype; others run as float32).
      conv_weight: (x, w); conv_bias: (x,) or None (used in c, as the unfused step does).
      dt_bias, A_log: (h,) float32 (A = -exp(A_log)); D: (h,), (h, p) or None.
      norm_weight: (e,) or None: the weight of a gated RMSNorm over all e channels (one
        group). Its scale rsqrt(mean(v^2) + eps) is one number a row, which commutes with
        out_proj: the caller applies it after out_proj (Mamba2Mixer's `defer_norm`), and the
        kernel hands back what it needs, v * weight in c and v's sums of squares.
      interpret: run through the Pallas interpreter (any backend; no PTX math).

    Returns:
      (v (b, e) float32, conv_state', ssm_state'): v = y * silu(z) with y = C.h + D x from the
      float32 state, as Mamba2Mixer's XLA step computes them (which rounds y to c first).
      With norm_weight: (v * norm_weight in c, conv_state', ssm_state', sumsq (b, P) float32),
      where sumsq summed over P is the sum of v^2 over the row's e channels.
    """
    dims = check_mamba2_args(
        zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D
    )
    c = zxbcdt.dtype
    st = _mamba2_conv_static(dims, MAMBA2_CONV, c, interpret)
    conv_state, xbc = kernel.conv_step(
        zxbcdt,
        conv_state.astype(c),
        conv_weight.astype(c),
        None if conv_bias is None else conv_bias.astype(c),
        st=st,
        num_warps=MAMBA2_CONV.num_warps_conv,
        interpret=interpret,
    )
    return _mamba2_update(
        zxbcdt, xbc, conv_state, ssm_state, dt_bias, A_log, D, dims, norm_weight, interpret
    )


def mamba2_pallas(
    hidden,
    in_proj_weight,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    dt_bias,
    A_log,
    D,
    *,
    fuse: bool | None = None,
    norm_weight=None,
    add_norm: ResidualNorm | None = None,
    interpret: bool = False,
):
    """A Mamba2 mixer's decode step from its normed input to its norm's input: in_proj (no
    bias), then mamba2_core_pallas's work. Fused (fuse None: at most
    config.MAMBA2_FUSE_IN_PROJ_ROWS rows, where the shapes tile evenly), in_proj and the conv
    step are one kernel (decode_in_proj_conv, as Mamba1's mixer_pallas runs it); otherwise
    in_proj is XLA's product and mamba2_core_pallas follows. add_norm: as mixer_pallas's (the
    block's residual add and norm first, inside the fused kernel up to
    config.ADD_NORM_IN_PROJ_ROWS rows; residual' last in the results).

    Args: hidden (b, d) in the compute dtype c; in_proj_weight (d, e + x + h) c; the rest as
    mamba2_core_pallas's. Returns mamba2_core_pallas(hidden @ in_proj_weight, ...)'s values
    (in_proj's float32 sums may round to another c value where summed in another order).
    """
    check_in_proj_args(hidden, in_proj_weight, "d_in_proj")
    c = hidden.dtype
    b, d = hidden.shape
    if add_norm is not None:
        _check_residual_norm(add_norm, b, d)
    zxbcdt_shape = jax.ShapeDtypeStruct((b, in_proj_weight.shape[1]), c)
    args = (conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D)
    dims = check_mamba2_args(zxbcdt_shape, *args)
    cfg = MAMBA2_CONV
    e, x = dims[1] * dims[2], dims[5]
    tiles = not (d % cfg.block_k or e % cfg.block_conv or x % cfg.block_conv)
    most = decode_config.FUSED_ROWS_MAX
    if fuse is None:
        fuse = tiles and b <= min(decode_config.MAMBA2_FUSE_IN_PROJ_ROWS, most)
    fused_norm = add_norm is not None and fuse and b <= decode_config.ADD_NORM_IN_PROJ_ROWS
    residual, hidden = _add_norm_in_front(add_norm, fused_norm, hidden, interpret)
    if not fuse:
        zxbcdt = jnp.dot(hidden, in_proj_weight.astype(c))
        results = mamba2_core_pallas(zxbcdt, *args, norm_weight=norm_weight, interpret=interpret)
        return (*results, *residual)
    if b > most or not tiles:
        raise ValueError(
            f"fuse needs batch <= {most}, d_model={d} a multiple of {cfg.block_k}, "
            f"d_inner={e} and conv_dim={x} of {cfg.block_conv}"
        )
    cfg = dataclasses.replace(cfg, block_rows=decode_config.fused_block_rows(b))  # one block
    st = dataclasses.replace(
        _mamba2_conv_static(dims, cfg, c, interpret),
        d_model=d,
        block_k=cfg.block_k,
        xz_width=in_proj_weight.shape[1],
    )
    st, norm_args = _add_norm_inside(add_norm, fused_norm, st)
    results = kernel.in_proj_conv(
        hidden,
        in_proj_weight.astype(c),
        conv_state.astype(c),
        conv_weight.astype(c),
        None if conv_bias is None else conv_bias.astype(c),
        None,
        st=st,
        num_warps=cfg.num_warps_in_proj,
        num_stages=cfg.num_stages_in_proj,
        interpret=interpret,
        **norm_args,
    )
    if fused_norm:
        residual, results = results[:1], results[1:]
    zxbcdt, conv_state, xbc = results
    results = _mamba2_update(
        zxbcdt, xbc, conv_state, ssm_state, dt_bias, A_log, D, dims, norm_weight, interpret
    )
    return (*results, *residual)


def check_in_proj_args(hidden, in_proj_weight, width: str):
    """hidden (b, d) and in_proj_weight (d, width): ValueError naming the argument otherwise."""
    if jnp.ndim(hidden) != 2 or jnp.ndim(in_proj_weight) != 2:
        raise ValueError(
            f"hidden (batch, d_model) and in_proj_weight (d_model, {width}) must be 2-D, got "
            f"{jnp.shape(hidden)} and {jnp.shape(in_proj_weight)}"
        )
    if jnp.shape(hidden)[1] != jnp.shape(in_proj_weight)[0]:
        raise ValueError(
            f"in_proj_weight must be (d_model={jnp.shape(hidden)[1]}, {width}), got "
            f"{jnp.shape(in_proj_weight)}"
        )


def check_mamba2_args(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D):
    """Validates mamba2_core_pallas's shapes; returns (b, h, p, g, n, x, w)."""
    shape = lambda a: tuple(np.shape(a))  # noqa: E731
    if len(shape(ssm_state)) != 4:
        raise ValueError(
            f"ssm_state must be (batch, heads, headdim, d_state), got {shape(ssm_state)}"
        )
    b, h, p, n = shape(ssm_state)
    e = h * p
    if len(shape(conv_state)) != 3 or shape(conv_state)[0] != b:
        raise ValueError(
            f"conv_state must be (batch={b}, d_conv - 1, conv_dim), got {shape(conv_state)}"
        )
    x = shape(conv_state)[2]
    if x <= e or (x - e) % (2 * n) or h % ((x - e) // (2 * n)):
        raise ValueError(
            f"conv_state's conv_dim={x} must be d_inner={e} + 2 * groups * d_state={n}, with "
            f"groups dividing heads={h}"
        )
    g = (x - e) // (2 * n)
    w = shape(conv_state)[1] + 1
    expected = dict(
        zxbcdt=(b, e + x + h), conv_weight=(x, w), conv_bias=(x,), dt_bias=(h,), A_log=(h,)
    )
    given = dict(
        zxbcdt=zxbcdt, conv_weight=conv_weight, conv_bias=conv_bias, dt_bias=dt_bias, A_log=A_log
    )
    for name, a in given.items():
        if a is not None and shape(a) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {shape(a)}")
    if D is not None and shape(D) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or {(h, p)}, got {shape(D)}")
    return b, h, p, g, n, x, w


def _mamba2_conv_static(dims, cfg: DecodeConfig, dtype, interpret: bool) -> kernel.Static:
    """The conv step over xBC, which starts after z in in_proj's output."""
    b, h, p, _, n, x, w = dims
    return kernel.Static(
        batch=b,
        d_inner=x,  # the conv's channels: all of xBC
        d_state=n,
        dt_rank=0,
        width=w,
        block_rows=cfg.block_rows,
        block_conv=cfg.block_conv,
        conv_blocks_per_program=1,
        block_state=cfg.block_state,
        dtype=jnp.dtype(dtype).name,
        fast=not interpret,
        x_col=h * p,
    )


def _mamba2_update(
    zxbcdt, xbc, conv_state, ssm_state, dt_bias, A_log, D, dims, norm_weight, interpret
):
    """decode_ssd_update reading x, B, C from the conv's output xbc and z, dt from zxbcdt:
    mamba2_core_pallas's return values."""
    _, h, p, g, n, x, _ = dims
    if norm_weight is not None and tuple(np.shape(norm_weight)) != (h * p,):
        raise ValueError(f"norm_weight must have shape {(h * p,)}, got {np.shape(norm_weight)}")
    st = ssd_update.packed_static(h, g, p, n, x, fast=not interpret)
    inputs = dict(xbc=xbc.reshape(-1), zxbcdt=zxbcdt.reshape(-1), A_log=A_log.astype(F32))
    state = ssm_state if ssm_state.dtype in STATE_DTYPES else ssm_state.astype(F32)
    dt_bias = None if dt_bias is None else dt_bias.astype(F32)
    D = None if D is None else D.astype(F32)
    if norm_weight is None:
        ssm_state, v = ssd_update.update(state, inputs, D, dt_bias, st, F32, interpret)
        return v, conv_state, ssm_state
    ssm_state, vw, sumsq = ssd_update.update(
        state, inputs, D, dt_bias, st, zxbcdt.dtype, interpret, norm_weight.astype(F32)
    )
    return vw, conv_state, ssm_state, sumsq


def _static(b, e, n, r, w, cfg: DecodeConfig, dtype, interpret: bool, d_model: int = 0):
    return kernel.Static(
        batch=b,
        d_inner=e,
        d_state=n,
        dt_rank=r,
        width=w,
        block_rows=cfg.block_rows,
        block_conv=cfg.block_conv,
        conv_blocks_per_program=cfg.conv_blocks_per_program,
        block_state=cfg.block_state,
        dtype=jnp.dtype(dtype).name,
        fast=not interpret,
        d_model=d_model,
        block_k=cfg.block_k,
        xz_width=2 * e,
    )


def _ssm_update(parts, xc, xz, ssm_state, dt_proj_weight, dt_bias, A_log, D, st, cfg, interpret):
    """The x_proj partials summed (one small XLA reduction over the channel groups' (p, b, R),
    or inside the state kernel with cfg.state_sums_parts at one row a program), then the
    state-update kernel: (y, ssm_state')."""
    c = xz.dtype
    if cfg.state_sums_parts and cfg.state_one_row and parts.shape[0] > 1:
        x_proj_out = parts
    else:
        x_proj_out = parts[0] if parts.shape[0] == 1 else jnp.sum(parts, axis=0)
    if cfg.state_one_row:
        st = dataclasses.replace(st, block_rows=1)
    ssm_state, y = kernel.ssm_update(
        x_proj_out,
        dt_proj_weight.astype(c),
        dt_bias.astype(F32),
        A_log.astype(F32),
        None if D is None else D.astype(F32),
        xc,
        xz,
        ssm_state if ssm_state.dtype in STATE_DTYPES else ssm_state.astype(F32),
        st=st,
        num_warps=cfg.num_warps_state,
        interpret=interpret,
    )
    return y, ssm_state


def check_mixer_core_args(
    xz,
    conv_state,
    ssm_state,
    conv_weight,
    conv_bias,
    x_proj_weight,
    dt_proj_weight,
    dt_bias,
    A_log,
    D,
):
    """Validates shapes; returns (b, e, n, r, w)."""
    shape = lambda a: tuple(np.shape(a))  # noqa: E731
    if len(shape(xz)) != 2 or shape(xz)[1] % 2:
        raise ValueError(f"xz must be (batch, 2 * d_inner), got shape {shape(xz)}")
    b, e = shape(xz)[0], shape(xz)[1] // 2
    if len(shape(conv_weight)) != 2 or shape(conv_weight)[0] != e:
        raise ValueError(f"conv_weight must be (d_inner={e}, d_conv), got {shape(conv_weight)}")
    w = shape(conv_weight)[1]
    if len(shape(A_log)) != 2 or shape(A_log)[0] != e:
        raise ValueError(f"A_log must be (d_inner={e}, d_state), got {shape(A_log)}")
    n = shape(A_log)[1]
    if not supported(n):
        raise ValueError(f"d_state={n} must be a power of two for the decode kernels")
    if len(shape(dt_proj_weight)) != 2 or shape(dt_proj_weight)[1] != e:
        raise ValueError(
            f"dt_proj_weight must be (dt_rank, d_inner={e}), got {shape(dt_proj_weight)}"
        )
    r = shape(dt_proj_weight)[0]
    if w < 2:
        raise ValueError(f"d_conv={w} must be at least 2 (the state holds d_conv - 1 inputs)")
    expected = dict(
        conv_state=(b, w - 1, e),
        ssm_state=(b, e, n),
        conv_bias=(e,),
        x_proj_weight=(e, r + 2 * n),
        dt_bias=(e,),
        D=(e,),
    )
    given = dict(
        conv_state=conv_state,
        ssm_state=ssm_state,
        conv_bias=conv_bias,
        x_proj_weight=x_proj_weight,
        dt_bias=dt_bias,
        D=D,
    )
    for name, a in given.items():
        if a is not None and shape(a) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {shape(a)}")
    return b, e, n, r, w
