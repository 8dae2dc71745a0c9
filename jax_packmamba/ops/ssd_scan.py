"""SSD scan (Mamba2) with state resets at segment boundaries: public op and chunked reference.

Axis letters: b batch, t time, h heads, p headdim, g groups (of B and C), k heads per group,
n state (d_state), s segment slot, c chunk, l and m positions within a chunk (L = its length).

Semantics are mamba_ssm's `mamba_chunk_scan_combined` with `seq_idx`, plus per-slot initial and
final states. Head h reads group h // k of B and C (k = heads // groups). Per head:

    dt'    = softplus(dt + dt_bias)          if dt_softplus (the bias is added either way)
    h_t    = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T     h: (p, n), state in float32
    y_t    = h_t C_t + D x_t
    y_t   *= silu(z_t)                       if z is given

A run is a maximal stretch of equal segment_ids; a new run begins at t = 0 and wherever the id
changes. A run of id s begins from h_{start - 1} = initial_states[b, s] (zero without
initial_states): every run of id s in a row starts from that same slot. No information passes
between runs.

The reference is the chunked SSD algorithm ("state space duality", Mamba2 paper section 6),
with the scalar-per-head decay doing the work that makes resets and per-slot states cheap.
Within a chunk let a_l = dt'_l A and cum_l = the sum of a over l's run up to l: a cumsum that
restarts at every run start (from the chunk's start for the run that entered the chunk), so that
a run's numbers depend on its own tokens only. "Same run" is the segment mask.

 1. intra-chunk: y_l += sum_{m <= l, same run} (C_l . B_m) exp(cum_l - cum_m) dt'_m x_m, one
    (L, L) matrix per chunk and head;
 2. chunk states: the state at the chunk's last position from a zero start, summed over the
    tokens of the last run only: S_c = sum_m exp(cum_{L-1} - cum_m) dt'_m x_m B_m^T;
 3. state passing: h_in(c + 1) = d_c h_in(c) + S_c + e_c with d_c = exp(cum_{L-1}) when the
    chunk's last token still belongs to the run that entered it, else 0 (the reset cuts the
    incoming state); `lax.associative_scan` over chunks on these affine maps;
 4. output: y_l += exp(cum_l) C_l . base_l, where base_l is h_in(c) when l's run entered the
    chunk and initial_states[b, s_l] when the run began inside it (in both cases exp(cum_l) is
    the decay from the base to l).

Initial states never become per-token matrices: since a state decays as a whole, a run's
initial state reaches its outputs only as exp(cum_l) (C_l . init[s_l]), computed as one matmul
of C masked by the one-hot slot (b, c, L, s, g, n) against init (b, s, h, p, n) contracting
(s, n) (num_segments times the work of the C . h_in term, and only when initial_states are
given), and its chunk-end state e_c = exp(cum_{L-1}) init[s_{L-1}] (when the last run began in
the chunk) is one state per chunk. Final states are read from the chunk that holds each slot's
last token: that chunk's inputs gathered per slot (b, s, L, ...), the last run's tokens weighted
by their decay to that token, plus exp(cum) times the base (h_in of the chunk or the slot's
initial state). Memory is the chunk states (b, c, h, p, n), the per-slot states (b, s, h, p, n),
per-slot chunk inputs (b, s, L, h, p) and the intra-chunk (b, c, h, L, L); no (b, t, h, p, n)
tensor exists.

Each step runs under `jax.checkpoint`, so the backward keeps only the chunked inputs (x, B, C
at their dtype, a few (b, t, h) float32 arrays) and the chunk states (b, c, h, p, n) between
passes, and recomputes the (L, L) matrices. At the mamba2-1.3b training shape (8 x 2048, 64
heads, headdim 64, d_state 128, 1 group, chunk 256, bfloat16 inputs, segment_ids) one call keeps
about 0.44 GB for its backward (x 134 MB, chunk states 268 MB); its temporaries peak at 1.9 GB
in the forward and 6.7 GB in forward + backward (XLA's buffer assignment of the compiled
function, `memory_analysis()`, on CPU; the (b, c, h, L, L) float32 matrix alone is 1.07 GB and
the backward holds a few at once). With initial_states and final states for 16 slots the
forward's temporaries stay at 1.9 GB.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jax_packmamba.ops.links import (
    chain_row_states,
    check_continues,
    compact_ids,
    row_ends_by_slot,
    single_run_rows,
)
from jax_packmamba.ops.segments import (
    check_chunk_and_slots,
    check_pallas_platform,
    check_segment_ids,
    segment_starts,
)
from jax_packmamba.ops.selective_scan import (
    accumulation_dtype,
    check_first_run_states,
    combine_affine,
    discretize_delta,
)

Impl = Literal["auto", "reference", "pallas", "pallas_interpret"]
IMPLS = ("auto", "reference", "pallas", "pallas_interpret")

DEFAULT_CHUNK = 256  # mamba_ssm's Mamba2 chunk_size


def ssd_scan(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    *,
    dt_softplus: bool = False,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_states=None,
    continues=None,
    first_run_states=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    impl: Impl = "auto",
    save_chunk_states: bool = True,
    return_row_end_states: bool = False,
):
    """SSD (Mamba2) scan with resets at segment boundaries.

    Args:
      x: (batch, length, heads, headdim), float32 or bfloat16.
      dt: (batch, length, heads).
      A: (heads,) real, negative (A = -exp(A_log) in Mamba2).
      B, C: (batch, length, groups, d_state); heads must be a multiple of groups.
      D: optional (heads,) or (heads, headdim) skip.
      z: optional (batch, length, heads, headdim) gate; the output is multiplied by silu(z).
      dt_bias: optional (heads,), added to dt (before the softplus when dt_softplus).
      dt_softplus: apply softplus to dt + dt_bias.
      segment_ids: optional (batch, length) integers; the state restarts where they change.
      chunk_size: tokens per chunk of the chunked algorithm (any length works: the last chunk
        is padded internally).
      initial_states: optional (batch, num_segments, heads, headdim, d_state): every run of id
        s in row b begins from initial_states[b, s] (zeros without it).
      continues: optional (batch,) bool: row b's first run continues row b - 1's last run (a
        document longer than a row; chains are consecutive rows). That run starts from the
        state row b - 1's last run ends in (its initial_states slot is not read), so outputs
        and gradients are those of the document as one sequence. continues[0] must be False.
        The kernels pass the state from row to row as from chunk to chunk (no second scan,
        no extra kernel); the reference, and the kernels with initial_states, read the rows'
        end states in one contraction over time (jax_packmamba/ops/links.py).
      first_run_states: optional (batch, heads, headdim, d_state): the state each row's first
        run (the one at t = 0) starts from where it does not continue the row before (zeros
        without it): a document's state carried from an earlier batch. Not with
        initial_states. Without continues it enters the one scan as the first run's state.
      return_final_states: also return, for every slot s in [0, num_segments), the float32
        state after the last token of the last run of id s in each row (zeros where the id
        does not occur): (batch, num_segments, heads, headdim, d_state).
      num_segments: number of slots; segment ids must lie in [0, num_segments). Concrete
        ids are checked here (ValueError naming the num_segments they need); traced ids (under
        jit) cannot be, and a run of an id outside the slots starts from zeros and its final
        state is not returned. Defaults to initial_states.shape[1] when given, else to 1
        without segment_ids (slot 0 is the whole row).
      impl: "reference" (pure JAX, any backend), "pallas" (the Triton kernels of
        pallas_kernels/ssd; GPU only, ValueError elsewhere; headdim and d_state powers of two
        >= 16), "pallas_interpret" (the same kernels through the Pallas interpreter, any
        backend) or "auto" (pallas on a GPU when the shapes allow, else the reference).
      save_chunk_states: the Pallas path keeps the state entering each chunk (b, c, h, p, n)
        float32 for its backward; False recomputes it there (the chunk-state kernel and the
        state passing again: less memory, a little more time). The reference ignores it.
      return_row_end_states: also return each row's float32 state after its last token (its
        last run's end state), (batch, heads, headdim, d_state): what a document that goes on
        past the batch carries into the next one. The kernels read it from their state
        passing, where a row's end passes on (no final-state glue); the reference from the
        final states with the row's last run in a slot of its own. Not with
        return_final_states or initial_states.

    Returns:
      y with x's shape and dtype, or (y, final_states) when return_final_states, or (y,
      row_end_states) when return_row_end_states.
    """
    num_segments = check_ssd_scan_args(
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        segment_ids,
        chunk_size,
        initial_states,
        return_final_states,
        num_segments,
    )
    check_continues(continues, np.shape(x)[0])
    batch, _, heads, headdim = np.shape(x)
    check_first_run_states(
        first_run_states, initial_states, (batch, heads, headdim, np.shape(B)[3])
    )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(save_chunk_states, bool):
        raise ValueError(f"save_chunk_states must be a bool, got {save_chunk_states!r}")
    if return_row_end_states and (return_final_states or initial_states is not None):
        raise ValueError(
            "return_row_end_states is not taken with return_final_states or initial_states"
        )
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" and _pallas_takes(x, B) else "reference"
    if impl == "pallas" and _pallas_takes(x, B):  # shapes the kernels refuse get that message
        check_pallas_platform(impl, fallback="reference")
    args = (x, dt, A, B, C, D, z, dt_bias)
    if return_row_end_states and impl == "reference":
        return row_ends_by_slot(
            ssd_scan,
            *args,
            segment_ids=segment_ids,
            length_like=x,
            dt_softplus=dt_softplus,
            chunk_size=chunk_size,
            continues=continues,
            first_run_states=first_run_states,
            impl=impl,
        )
    run = functools.partial(
        _run_impl,
        impl,
        args,
        dt_softplus,
        chunk_size,
        save_chunk_states=save_chunk_states,
        row_ends=return_row_end_states,
    )
    if continues is None and first_run_states is None:
        return run(segment_ids, initial_states, return_final_states, num_segments)
    return _continued(
        impl,
        run,
        args,
        dt_softplus,
        segment_ids,
        initial_states,
        continues,
        return_final_states,
        num_segments,
        first_run_states,
    )


def _run_impl(
    impl,
    args,
    dt_softplus,
    chunk_size,
    segment_ids,
    initial_states,
    return_final_states,
    num_segments,
    first_run_states=None,
    continues=None,
    *,
    save_chunk_states=True,
    row_ends=False,
):
    """The scan; first_run_states (b, h, p, n), only without initial_states, and on the
    reference only without final states: each row's run at t = 0 starts from it, every other
    run from zeros. continues (b,), False at row 0: the kernels only, without
    initial_states. row_ends: the kernels only, (y, each row's end state)."""
    if first_run_states is not None and impl == "reference":
        assert not return_final_states
        # The first run in slot 0 of three, the others from zeros.
        shape = (first_run_states.shape[0], 3, *first_run_states.shape[1:])
        init = jnp.zeros(shape, first_run_states.dtype).at[:, 0].set(first_run_states)
        ids = compact_ids(_ids(segment_ids, args[0]), "first")
        return ssd_scan_reference(
            *args,
            dt_softplus=dt_softplus,
            segment_ids=ids,
            chunk_size=chunk_size,
            initial_states=init,
            num_segments=3,
        )
    kwargs = dict(
        dt_softplus=dt_softplus,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    if impl != "reference":
        from pallas_kernels.ssd import ssd_scan_pallas

        if first_run_states is not None:
            kwargs["first_run_states"] = first_run_states
        if continues is not None:
            kwargs["continues"] = continues
        return ssd_scan_pallas(
            *args,
            interpret=impl == "pallas_interpret",
            save_chunk_states=save_chunk_states,
            return_row_end_states=row_ends,
            **kwargs,
        )
    return ssd_scan_reference(*args, **kwargs)


def _ids(segment_ids, x):
    if segment_ids is None:
        return jnp.zeros(x.shape[:2], jnp.int32)
    return segment_ids.astype(jnp.int32)


def _continued(
    impl,
    run,
    args,
    dt_softplus,
    segment_ids,
    initial_states,
    continues,
    return_final_states,
    num_segments,
    first_run_states=None,
):
    """Each row's first run from its own start (jax_packmamba/ops/links.py). The kernels take
    `continues` themselves (without initial_states): their state passing runs on from each row
    into the next where it continues, as from chunk to chunk, and a continuing row's given start
    is not read. Otherwise every row's last-run end state is read directly
    (`_last_run_end_states`, one contraction over time, no scan), a pass over the rows chains
    them, then one scan runs with each row's first run moved to a slot holding its start.
    Without `continues` (first_run_states only) the given starts go straight into that one
    scan."""
    x, dt, A, B = args[:4]
    batch, length, heads, headdim = x.shape
    d_state = B.shape[3]
    rows = jnp.arange(batch)
    if continues is not None and impl != "reference" and initial_states is None:
        continues = continues & (rows > 0)
        if first_run_states is not None:
            first_run_states = jnp.where(continues[:, None, None, None], 0.0, first_run_states)
        return run(
            segment_ids, None, return_final_states, num_segments, first_run_states, continues
        )
    seg = _ids(segment_ids, x)
    acc = accumulation_dtype(x)
    state_shape = (batch, heads, headdim, d_state)
    if first_run_states is not None:
        given = first_run_states.astype(acc)
    elif initial_states is None:
        given = jnp.zeros(state_shape, acc)
    else:
        given = initial_states[rows, seg[:, 0]].astype(acc)
    first = given
    if continues is not None:
        dtp = discretize_delta(dt, args[7], dt_softplus)  # (b, t, h), dt_bias is args[7]
        single = single_run_rows(seg)
        # The last run's total decay: a masked sum (other runs add exact zeros), no scan.
        run_index = jnp.cumsum(segment_starts(seg).astype(jnp.int32), axis=1)
        in_last = (run_index == run_index[:, -1:])[..., None]
        log_decay = jnp.sum(jnp.where(in_last, dtp * A.astype(dtp.dtype), 0.0), axis=1)
        decay = jnp.exp(log_decay)[..., None, None]  # (b, h, 1, 1)
        # The last run's end from its own start: a single-run row's start is `given`, a later
        # run's its slot's initial state (zeros without initial states).
        base = jnp.where(single[:, None, None, None], given, 0.0)
        if initial_states is not None:
            base = jnp.where(
                single[:, None, None, None], base, initial_states[rows, seg[:, -1]].astype(acc)
            )
        end = _last_run_end_states(x, dtp, A, B, seg) + decay * base
        first = chain_row_states(end, decay, single, continues, given)
    if initial_states is None and (impl != "reference" or not return_final_states):
        return run(segment_ids, None, return_final_states, num_segments, first)
    slots = num_segments or 1
    init = (
        jnp.zeros((batch, slots, *state_shape[1:]), acc)
        if initial_states is None
        else initial_states
    )
    # Slot `slots` is the first run's own; other runs keep their ids and slots.
    first_run = jnp.cumsum(segment_starts(seg).astype(jnp.int32), axis=1) == 1
    out = run(
        jnp.where(first_run, slots, seg),
        jnp.concatenate([init.astype(first.dtype), first[:, None]], axis=1),
        return_final_states,
        slots + 1,
    )
    if not return_final_states:
        return out
    y, final = out
    # The first run's id holds its state unless a later run of that id ends the row's use of it.
    later_same = jnp.any(~first_run & (seg == seg[:, :1]), axis=1)
    own = (jnp.arange(slots) == seg[:, :1]) & ~later_same[:, None]  # (b, s)
    return y, jnp.where(own[..., None, None, None], final[:, slots:], final[:, :slots])


@jax.checkpoint
def _last_run_end_states(x, dtp, A, B, seg):
    """(b, h, p, n): each row's state after its last token when its last run starts from zero,
    sum over the last run's tokens s of exp(sum_{s < u} dt'_u A) dt'_s x_s B_s^T. The last run
    is the row's suffix, so the exponent is a suffix sum over that run's tokens only (<= 0, and
    no other run's values enter it: isolation to the bit). One contraction over time, in x's
    dtype with float32 accumulation (what the kernels' chunk states use); its backward is two
    more, and under the checkpoint it keeps only its inputs. dt' (b, t, h) in the accumulation
    dtype."""
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    acc = dtp.dtype
    run = jnp.cumsum(segment_starts(seg).astype(jnp.int32), axis=1)
    in_last = (run == run[:, -1:])[..., None]  # (b, t, 1)
    a = dtp * A.astype(acc)  # (b, t, h)
    later = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    # Sum over u > s. Not lax.cumsum: along a non-minor axis XLA's GPU lowering keeps it a
    # length-t reduce-window, t^2 adds (440 us a layer at mamba2-1.3b's 8 x 2048, forward and
    # again in the backward); the associative scan is t log t.
    after = jax.lax.associative_scan(jnp.add, later, reverse=True, axis=1)
    weight = _masked_exp(in_last, after) * dtp  # (b, t, h)
    mm = x.dtype if jnp.finfo(x.dtype).bits < 32 else acc
    wx = (weight[..., None] * x.astype(acc)).astype(mm)
    wx = wx.reshape(batch, length, groups, heads // groups * headdim)
    end = jnp.einsum(
        "btgq,btgn->bgqn",
        wx,
        B.astype(mm),
        precision=jax.lax.Precision.HIGHEST if mm == acc else None,
        preferred_element_type=acc,
    )
    return end.reshape(batch, heads, headdim, d_state)


def _pallas_takes(x, B) -> bool:
    """Whether the Pallas kernels take these shapes (headdim and d_state powers of two >= 16);
    "auto" falls back to the reference for the others."""
    from pallas_kernels.ssd import supported

    return supported(np.shape(x)[3], np.shape(B)[3])


def check_ssd_scan_args(
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    segment_ids,
    chunk_size,
    initial_states,
    return_final_states,
    num_segments,
) -> int | None:
    """Validates shapes, dtypes and ids before anything runs; returns the resolved num_segments."""
    x_shape = tuple(np.shape(x))
    if len(x_shape) != 4:
        raise ValueError(f"x must be (batch, length, heads, headdim), got shape {x_shape}")
    batch, length, heads, headdim = x_shape
    if length == 0:
        raise ValueError(f"length must be at least 1, got x with shape {x_shape}")
    if tuple(np.shape(A)) != (heads,):
        raise ValueError(
            f"A must be (heads,) = ({heads},) to match x {x_shape}, got shape {np.shape(A)}"
        )
    b_shape = tuple(np.shape(B))
    if len(b_shape) != 4 or b_shape[:2] != (batch, length):
        raise ValueError(
            f"B must be (batch, length, groups, d_state) with (batch, length) = "
            f"{(batch, length)}, got shape {b_shape}"
        )
    groups, d_state = b_shape[2:]
    if groups < 1 or heads % groups:
        raise ValueError(
            f"heads={heads} (x's axis 2) must be a multiple of groups={groups} (B's axis 2)"
        )
    expected = dict(dt=(batch, length, heads), C=b_shape, z=x_shape, dt_bias=(heads,))
    given = dict(dt=dt, C=C, z=z, dt_bias=dt_bias)
    for name, a in given.items():
        if a is not None and tuple(np.shape(a)) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} to match x {x_shape} and B "
                f"{b_shape}, got {tuple(np.shape(a))}"
            )
    if D is not None and tuple(np.shape(D)) not in ((heads,), (heads, headdim)):
        raise ValueError(
            f"D must have shape (heads,) = ({heads},) or (heads, headdim) = "
            f"{(heads, headdim)}, got {tuple(np.shape(D))}"
        )
    if initial_states is not None:
        shape = tuple(np.shape(initial_states))
        if len(shape) != 5 or shape[0] != batch or shape[2:] != (heads, headdim, d_state):
            raise ValueError(
                f"initial_states must be (batch, num_segments, heads, headdim, d_state) = "
                f"{(batch, 'num_segments', heads, headdim, d_state)}, got shape {shape}"
            )
        if num_segments is not None and num_segments != shape[1]:
            raise ValueError(
                f"num_segments={num_segments!r} must equal initial_states.shape[1]={shape[1]}"
            )
        num_segments = shape[1]
    for name, a in dict(x=x, A=A, B=B, D=D, initial_states=initial_states, **given).items():
        if a is not None and not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(
                f"{name} must be a real floating array, got dtype {jnp.result_type(a)}"
            )
    check_segment_ids(segment_ids, batch, length)
    return check_chunk_and_slots(
        segment_ids,
        chunk_size,
        num_segments,
        return_final_states=return_final_states,
        initial_states_given=initial_states is not None,
    )


@functools.partial(
    jax.jit,
    static_argnames=("dt_softplus", "chunk_size", "return_final_states", "num_segments"),
)
def ssd_scan_reference(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    *,
    dt_softplus: bool = False,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_states=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
):
    """The chunked pure-JAX SSD scan; same arguments as `ssd_scan` (see there and the module
    docstring for the algorithm). Ids outside [0, num_segments) are not checked here: such a
    run starts from zeros and its final state is dropped."""
    acc = accumulation_dtype(x)  # float32 unless the caller runs a float64 oracle
    dt = discretize_delta(dt, dt_bias, dt_softplus).astype(acc)
    y, final = ssd_chunked(
        x,
        dt,
        dt * A.astype(acc),
        B,
        C,
        D,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        initial_states=initial_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    y = y.astype(x.dtype)
    return (y, final) if return_final_states else y


def ssd_chunked(
    x,
    weight,
    log_decay,
    B,
    C,
    D=None,
    *,
    segment_ids=None,
    chunk_size: int = DEFAULT_CHUNK,
    initial_states=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
):
    """The chunked algorithm with the decay and the input weight given apart, per token:
    h_t = exp(log_decay_t) h_{t-1} + weight_t x_t B_t^T, y_t = h_t C_t + D x_t. SSD has
    (weight, log_decay) = (dt', dt' A); Mamba-3 (ops/mamba3.py) its trapezoidal input scale
    and a per-token dt A. weight and log_decay: (b, t, h) in the accumulation dtype.

    Returns (y (b, t, h, p) in the accumulation dtype, no gate; final states (b, s, h, p, n)
    or None)."""
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2:]
    per_group = heads // groups
    acc = weight.dtype
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    if num_segments is None:
        num_segments = 1 if initial_states is None else initial_states.shape[1]
    L = min(chunk_size, length)
    n_chunks = -(-length // L)
    pad = n_chunks * L - length

    def chunked(a, mode="constant"):
        # (b, t, ...) -> (b, c, L, ...). Padded steps have weight 0 and log-decay 0 (decay 1,
        # no input) and continue the row's last run, so the last chunk ends in the state of
        # the last token.
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)
        return a.reshape(batch, n_chunks, L, *a.shape[2:])

    # x, B and C stay in their dtype here and are cast inside each checkpointed step, so the
    # backward keeps them at their size.
    starts = chunked(segment_starts(segment_ids))  # padding: False
    slot = chunked(segment_ids.astype(jnp.int32), mode="edge")
    xs = dict(
        dt=chunked(weight),  # (b, c, L, h)
        x=chunked(x).reshape(batch, n_chunks, L, groups, per_group, headdim),
        B=chunked(B),
        C=chunked(C),
        cum=_run_cumsum(chunked(log_decay), starts),  # (b, c, L, h)
        # Run index within the chunk: 0 for the run that entered it, 1, 2, ... after each start.
        run=jnp.cumsum(starts.astype(jnp.int32), axis=2),
    )
    init = None
    if initial_states is not None:
        init = initial_states.astype(acc).reshape(
            batch, num_segments, groups, per_group, headdim, d_state
        )
        xs["slot_onehot"] = (slot[..., None] == jnp.arange(num_segments)).astype(
            acc
        )  # (b, c, L, s)

    h_in = _states_entering_chunks(xs, init)  # (b, c, g, k, p, n): steps 2 and 3
    # Steps 1 and 4.
    D_gk = (
        None
        if D is None
        else jnp.broadcast_to(D.reshape(heads, -1), (heads, headdim)).reshape(
            groups, per_group, headdim
        )
    )
    y = _chunk_outputs(xs, h_in, init, D_gk)  # (b, c, L, g, k, p)
    y = y.reshape(batch, n_chunks * L, heads, headdim)[:, :length]
    if not return_final_states:
        return y, None
    final = _final_states(xs, h_in, init, segment_ids, num_segments)
    return y, final.reshape(batch, num_segments, heads, headdim, d_state)


def _run_cumsum(a, starts):
    """(b, c, L, h): the inclusive sum of a over each token's run within its chunk, restarting
    at every run start (starts (b, c, L)), as a product with the causal same-run mask. Not a
    difference of one chunk-wide cumsum: a run's log-decays then depend on its own tokens only,
    to the bit, so a packed sequence's results cannot change with its neighbours' values. The
    mask is exact in any precision; "highest" keeps a GPU from summing a in TF32."""
    run = jnp.cumsum(starts.astype(jnp.int32), axis=2)
    L = a.shape[2]
    mask = jnp.tril(jnp.ones((L, L), bool)) & (run[..., :, None] == run[..., None, :])
    return jnp.einsum("bclm,bcmh->bclh", mask.astype(a.dtype), a, precision="highest")


def _split_heads(a, groups):
    """(..., h) -> (..., g, k)."""
    return a.reshape(*a.shape[:-1], groups, a.shape[-1] // groups)


def _masked_exp(mask, log):
    """exp(log) where mask, exactly 0 elsewhere; the exponent is masked first, so that neither
    an overflow nor its gradient can leak out of the masked entries."""
    return jnp.exp(jnp.where(mask, log, -jnp.inf))


@jax.checkpoint
def _states_entering_chunks(xs, init):
    """(b, c, g, k, p, n): the state entering each chunk (chunk states, then state passing).
    One checkpoint for both, so the backward keeps only its result between passes."""
    groups = xs["B"].shape[3]
    drive = _chunk_states(xs, init)  # (b, c, g, k, p, n)
    last_entered = xs["run"][:, :, -1] == 0  # the last token's run entered the chunk
    decay = jnp.where(last_entered[..., None], jnp.exp(xs["cum"][:, :, -1]), 0.0)  # (b, c, h)
    decay = _split_heads(decay, groups)[..., None, None]
    _, h_out = jax.lax.associative_scan(combine_affine, (decay, drive), axis=1)
    # Chunk 0 begins with a reset (t = 0 starts a run), so its incoming state is never read.
    return jnp.concatenate([jnp.zeros_like(h_out[:, :1]), h_out[:, :-1]], axis=1)


def _chunk_states(xs, init):
    """(b, c, g, k, p, n): each chunk's state at its last position from a zero incoming state,
    plus, when the last run began inside the chunk, its slot's initial state decayed there."""
    groups = xs["B"].shape[3]
    cum, run = xs["cum"], xs["run"]
    in_last_run = (run == run[:, :, -1:])[..., None]  # (b, c, L, 1)
    weight = _masked_exp(in_last_run, cum[:, :, -1:] - cum) * xs["dt"]  # (b, c, L, h)
    wx = _split_heads(weight, groups)[..., None] * xs["x"].astype(cum.dtype)  # (b, c, L, g, k, p)
    states = jnp.einsum("bclgkp,bclgn->bcgkpn", wx, xs["B"].astype(cum.dtype))
    if init is None:
        return states
    began = (run[:, :, -1] > 0).astype(states.dtype)  # (b, c)
    last_slot = xs["slot_onehot"][:, :, -1]  # (b, c, s)
    init_last = jnp.einsum("bcs,bsgkpn->bcgkpn", last_slot * began[..., None], init)
    base_decay = _split_heads(jnp.exp(xs["cum"][:, :, -1]), groups)  # (b, c, g, k)
    return states + base_decay[..., None, None] * init_last


@jax.checkpoint
def _chunk_outputs(xs, h_in, init, D):
    """(b, c, L, g, k, p): the intra-chunk term plus each token's decayed base state read by C,
    plus the D skip (D (g, k, p) or None; added here so that the backward keeps x at its size)."""
    groups = xs["B"].shape[3]
    cum, run = xs["cum"], xs["run"]
    C, B, x = (xs[k].astype(cum.dtype) for k in ("C", "B", "x"))
    L = cum.shape[2]
    causal = jnp.tril(jnp.ones((L, L), bool))
    same_run = causal & (run[..., :, None] == run[..., None, :])  # (b, c, l, m)
    cum_h = _split_heads(cum, groups)  # (b, c, L, g, k)
    log_decay = jnp.moveaxis(cum_h[:, :, :, None] - cum_h[:, :, None, :], (2, 3), (4, 5))
    decay = _masked_exp(same_run[:, :, None, None], log_decay)  # (b, c, g, k, l, m)
    cb = jnp.einsum("bclgn,bcmgn->bcglm", C, B)  # (b, c, g, l, m): one per group
    dtx = _split_heads(xs["dt"], groups)[..., None] * x  # (b, c, m, g, k, p)
    y = jnp.einsum("bcgklm,bcmgkp->bclgkp", cb[:, :, :, None] * decay, dtx)
    entered = (run == 0)[..., None, None, None]  # (b, c, L, 1, 1, 1)
    off = jnp.where(entered, jnp.einsum("bclgn,bcgkpn->bclgkp", C, h_in), 0.0)
    if init is not None:
        # C . init[slot] for tokens whose run began in the chunk: C masked by the one-hot slot,
        # contracted with every slot's initial state over (s, n).
        began = (run > 0).astype(C.dtype)[..., None]
        c_slot = (xs["slot_onehot"] * began)[..., None, None] * C[
            :, :, :, None
        ]  # (b, c, L, s, g, n)
        off = off + jnp.einsum("bclsgn,bsgkpn->bclgkp", c_slot, init)
    base_decay = _split_heads(jnp.exp(cum), groups)[..., None]  # (b, c, L, g, k, 1)
    y = y + base_decay * off
    return y if D is None else y + D.astype(y.dtype) * x


def _select(a, onehot):
    """sum_c onehot[b, s, c] a[b, c, ...] -> (b, s, ...): the entry each slot picks, exactly.
    Floats go through a contraction, not a gather: a gather's gradient is a scatter-add, which
    XLA runs with atomic adds on a GPU (sums in a new order on every run, so other segments'
    gradients would change with this one's). A one-hot dot's gradient is a dot, and its other
    terms are exact zeros. Integers (no gradient) are gathered."""
    index = jnp.argmax(onehot, axis=-1)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        index = index.reshape(*index.shape, *([1] * (a.ndim - 2)))
        return jnp.take_along_axis(a, index, axis=1)
    return jnp.einsum(
        "bsc,bc...->bs...",
        onehot.astype(a.dtype),
        a,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=a.dtype,
    )


@jax.checkpoint
def _final_states_from(xs_slot, h_in_slot, init, present):
    """The state after each slot's last token, from its chunk's inputs selected per slot
    (b, s, L, ...) and xs_slot["pos"] (b, s), the token's position in that chunk."""
    groups = xs_slot["B"].shape[3]
    cum, run, pos = xs_slot["cum"], xs_slot["run"], xs_slot["pos"]
    L = cum.shape[2]
    at_pos = pos[..., None] == jnp.arange(L)  # (b, s, L): each slot's last token

    def at_last(a):  # (b, s, L, ...) -> (b, s, ...) at each slot's last token
        b, s = a.shape[:2]
        flat = a.reshape(b * s, *a.shape[2:])
        return _select(flat, at_pos.reshape(b * s, 1, L)).reshape(b, s, *a.shape[3:])

    cum_last, run_last = at_last(cum), at_last(run)  # (b, s, h), (b, s)
    mask = (jnp.arange(L) <= pos[..., None]) & (run == run_last[..., None])  # (b, s, L)
    weight = _masked_exp(mask[..., None], cum_last[:, :, None] - cum) * xs_slot["dt"]
    wx = _split_heads(weight, groups)[..., None] * xs_slot["x"].astype(
        cum.dtype
    )  # (b, s, L, g, k, p)
    state = jnp.einsum("bslgkp,bslgn->bsgkpn", wx, xs_slot["B"].astype(cum.dtype))
    # The base the last run decays from: the chunk's incoming state if the run entered the
    # chunk, else the slot's initial state.
    entered = (run_last == 0)[..., None, None, None, None]
    base = jnp.where(entered, h_in_slot, 0.0 if init is None else init)
    base_decay = _split_heads(jnp.exp(cum_last), groups)[..., None, None]
    state = state + base_decay * base
    return jnp.where(present[:, :, None, None, None, None], state, 0.0)


def _final_states(xs, h_in, init, segment_ids, num_segments):
    """(b, s, g, k, p, n): the state after the last token of the last run of each slot."""
    batch, length = segment_ids.shape
    L = xs["cum"].shape[2]
    t = jnp.arange(length)
    is_slot = segment_ids[..., None] == jnp.arange(num_segments)  # (b, t, s)
    last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)  # (b, s)
    present = last >= 0
    last = jnp.maximum(last, 0)
    chunk, pos = last // L, last % L
    at_chunk = chunk[..., None] == jnp.arange(xs["cum"].shape[1])  # (b, s, c)
    xs_slot = {k: _select(xs[k], at_chunk) for k in ("dt", "x", "B", "cum", "run")}
    xs_slot["pos"] = pos
    return _final_states_from(xs_slot, _select(h_in, at_chunk), init, present)


def _finish_output(y, x, D, z):
    """Adds the D skip and applies the silu(z) gate in float32 (or wider); returns x's dtype."""
    acc = accumulation_dtype(y)
    if D is not None:
        D = D.astype(acc)
        y = y + x.astype(acc) * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return y.astype(x.dtype)


def ssd_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, *, dt_softplus: bool = True
):
    """One step of `ssd_scan`: the recurrent decoding form of the same op.

    state (b, h, p, n) float32; x, z (b, h, p); dt (b, h); A, dt_bias (h,); B, C (b, g, n);
    D (h,) or (h, p). Returns (next state (b, h, p, n) float32, y (b, h, p) in x's dtype).
    """
    check_ssd_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    acc = jnp.promote_types(accumulation_dtype(x), jnp.result_type(state))
    heads, groups = x.shape[1], B.shape[1]
    dt = discretize_delta(dt, dt_bias, dt_softplus).astype(acc)  # (b, h)
    B_h = jnp.repeat(B.astype(acc), heads // groups, axis=1)  # head h reads group h // k
    C_h = jnp.repeat(C.astype(acc), heads // groups, axis=1)
    decay = jnp.exp(dt * A.astype(acc))[..., None, None]
    state = (
        decay * state.astype(acc) + (dt[..., None] * x.astype(acc))[..., None] * B_h[:, :, None, :]
    )
    # A product and a sum over n, not an einsum: XLA fuses them with the update above into
    # one pass that reads the old state once and writes the new one (a dot_general would be
    # a GEMM reading the new state back, and TF32 on a GPU by default).
    y = jnp.sum(state * C_h[:, :, None, :], axis=-1)
    return state, _finish_output(y, x, D, z)


def check_ssd_state_update_args(state, x, dt, A, B, C, D, z, dt_bias):
    x_shape = tuple(np.shape(x))
    if len(x_shape) != 3:
        raise ValueError(f"x must be (batch, heads, headdim), got shape {x_shape}")
    batch, heads, headdim = x_shape
    b_shape = tuple(np.shape(B))
    if len(b_shape) != 3 or b_shape[0] != batch:
        raise ValueError(
            f"B must be (batch, groups, d_state) with batch={batch}, got shape {b_shape}"
        )
    groups, d_state = b_shape[1:]
    if groups < 1 or heads % groups:
        raise ValueError(
            f"heads={heads} (x's axis 1) must be a multiple of groups={groups} (B's axis 1)"
        )
    expected = dict(
        state=(batch, heads, headdim, d_state),
        dt=(batch, heads),
        A=(heads,),
        C=b_shape,
        z=x_shape,
        dt_bias=(heads,),
    )
    given = dict(state=state, dt=dt, A=A, C=C, z=z, dt_bias=dt_bias)
    for name, a in given.items():
        if a is not None and tuple(np.shape(a)) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} to match x {x_shape} and B "
                f"{b_shape}, got {tuple(np.shape(a))}"
            )
    if D is not None and tuple(np.shape(D)) not in ((heads,), (heads, headdim)):
        raise ValueError(
            f"D must have shape ({heads},) or {(heads, headdim)}, got {tuple(np.shape(D))}"
        )
    for name, a in dict(x=x, B=B, D=D, **given).items():
        if a is not None and not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(
                f"{name} must be a real floating array, got dtype {jnp.result_type(a)}"
            )
