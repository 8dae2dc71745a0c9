"""Selective scan (Mamba1) with state resets at segment boundaries: public op and reference.

Axis letters: b batch, t time, d channels (d_inner), n state (d_state), s segment slot.

Semantics are mamba_ssm's `selective_scan_fn`, plus resets:

    delta  = softplus(delta + delta_bias)            if delta_softplus (bias optional)
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t u_t   h: (d, n), state in float32
    y_t    = C_t . h_t + D u_t
    y_t   *= silu(z_t)                                if z is given

and h_{t-1} is taken as zero at t = 0 and wherever segment_ids[b, t] != segment_ids[b, t - 1],
so no information passes between segments.

`selective_scan_reference` is the spec the Pallas kernel is tested against, and the execution
path on CPU/TPU. It walks time in chunks (a `lax.scan` over chunks carrying the (b, d, n)
state, an associative scan inside a chunk) and rematerialises each chunk in the backward pass,
so neither direction holds a (b, t, d, n) tensor for the whole sequence.
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
    check_pallas_platform,
    check_segment_ids,
    check_segment_slots,
    segment_ends,
    segment_starts,
)
from pallas_kernels.common import combine_affine

Impl = Literal["auto", "reference", "pallas", "pallas_interpret"]
IMPLS = ("auto", "reference", "pallas", "pallas_interpret")

DEFAULT_CHUNK = 64


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus: bool = False,
    segment_ids=None,
    initial_states=None,
    continues=None,
    first_run_states=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    impl: Impl = "auto",
    return_row_end_states: bool = False,
):
    """Selective scan with resets at segment boundaries.

    Args:
      u, delta: (batch, length, d_inner), float32 or bfloat16.
      A: (d_inner, d_state), real float (A = -exp(A_log) in Mamba).
      B, C: (batch, length, d_state).
      D, delta_bias: optional (d_inner,).
      z: optional (batch, length, d_inner) gate; the output is multiplied by silu(z).
      delta_softplus: apply softplus to delta (after adding delta_bias).
      segment_ids: optional (batch, length) integers; the state restarts where they change.
      initial_states: optional (batch, num_segments, d_inner, d_state): every run of id s in
        row b begins from initial_states[b, s] (zeros without it). The run at t = 0 takes its
        state the way a time chunk takes its predecessor's (free on every impl); runs that begin
        later in a row add their initial state's decayed contribution as one XLA term that
        holds a (batch, length, d_inner, d_state) float32 array.
      continues: optional (batch,) bool: row b's first run continues row b - 1's last run (a
        document longer than a row, its pieces at the end of row b - 1 and the start of row b;
        chains over several rows are consecutive rows). That run starts from the state row
        b - 1's last run ends in (its initial_states slot is not read), so outputs and
        gradients are those of the document run as one sequence. continues[0] must be False.
        The kernels carry it in their chunk-state pass (no extra scan); the reference, and
        mid-row initial_states, run a second scan (jax_packmamba/ops/links.py).
      first_run_states: optional (batch, d_inner, d_state): the state each row's first run
        (the one at t = 0) starts from where it does not continue the row before (zeros
        without it): a document's state carried from an earlier batch. Free on every impl, as
        initial_states' run at t = 0; not with initial_states.
      return_final_states: also return, for every segment slot s in [0, num_segments), the
        float32 state after the last token of the last run of id s in each row (zeros where
        the id does not occur): shape (batch, num_segments, d_inner, d_state). This is what a
        packed prefill hands to recurrent decoding.
      num_segments: number of slots for `return_final_states`; segment ids must lie in
        [0, num_segments). Defaults to 1 without segment_ids (slot 0 is the whole row).
        Concrete ids are checked here (ValueError naming the num_segments they need); traced
        ids (under jit) cannot be, and the state of an id outside the slots is not returned.
      impl: "reference" (pure JAX), "pallas" (Triton kernel; GPU only, ValueError elsewhere),
        "pallas_interpret" (the same kernel through the Pallas interpreter, any backend) or
        "auto" (pallas on GPU, else reference).
      return_row_end_states: also return each row's float32 state after its last token (its
        last run's end state), (batch, d_inner, d_state): what a document that goes on past
        the batch carries into the next one. The kernel reads it from its chunk-state pass
        (the last chunk's incoming state carried through it: no per-token work); the
        reference from the final states with the row's last run in a slot of its own. Not
        with return_final_states or initial_states.

    Returns:
      y with u's shape and dtype, or (y, final_states) when return_final_states, or (y,
      row_end_states) when return_row_end_states.
    """
    num_segments = check_selective_scan_args(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        segment_ids,
        return_final_states,
        num_segments,
        initial_states,
    )
    check_continues(continues, np.shape(u)[0])
    check_first_run_states(first_run_states, initial_states, (np.shape(u)[0], *np.shape(A)))
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if return_row_end_states and (return_final_states or initial_states is not None):
        raise ValueError(
            "return_row_end_states is not taken with return_final_states or initial_states"
        )
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    check_pallas_platform(impl, fallback="reference")
    args = (u, delta, A, B, C, D, z, delta_bias)
    if return_row_end_states and impl == "reference":
        return row_ends_by_slot(
            selective_scan,
            *args,
            segment_ids=segment_ids,
            length_like=u,
            delta_softplus=delta_softplus,
            continues=continues,
            first_run_states=first_run_states,
            impl=impl,
        )
    if initial_states is None and continues is None and not return_row_end_states:
        return _run_impl(
            impl,
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            segment_ids,
            first_run_states,
            return_final_states,
            num_segments,
        )
    run = functools.partial(
        _scan_from_starts, impl, args, delta_softplus, segment_ids, initial_states
    )
    if continues is None and not return_row_end_states:
        return run(None, return_final_states, num_segments)
    if impl != "reference" and (initial_states is None or segment_ids is None):
        # The kernel's chunk-state pass carries the state over linked rows itself (no second
        # scan; mid-row initial states would also change a last run's end: generic path then)
        # and hands on each row's end.
        first = first_run_states if initial_states is None else initial_states[:, 0]
        from pallas_kernels.selective_scan import selective_scan_pallas

        return selective_scan_pallas(
            *args,
            interpret=impl == "pallas_interpret",
            delta_softplus=delta_softplus,
            segment_ids=segment_ids,
            first_run_states=first,
            continues=continues,
            return_final_states=return_final_states,
            num_segments=num_segments,
            return_row_end_states=return_row_end_states,
        )
    return _continued(
        impl,
        run,
        args,
        delta_softplus,
        segment_ids,
        initial_states,
        continues,
        return_final_states,
        num_segments,
        first_run_states,
    )


def check_first_run_states(first_run_states, initial_states, state_shape):
    """Raises ValueError unless first_run_states is None or a real floating array of
    (batch, *state) = state_shape, given without initial_states."""
    if first_run_states is None:
        return
    if initial_states is not None:
        raise ValueError(
            "pass first_run_states or initial_states, not both (initial_states' slot of the "
            "run at t = 0 is its first-run state)"
        )
    shape = tuple(np.shape(first_run_states))
    if shape != tuple(state_shape):
        raise ValueError(f"first_run_states must have shape {tuple(state_shape)}, got {shape}")
    if not jnp.issubdtype(jnp.result_type(first_run_states), jnp.floating):
        raise ValueError(
            f"first_run_states must be a real floating array, got dtype "
            f"{jnp.result_type(first_run_states)}"
        )


def _run_impl(
    impl,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    segment_ids,
    first_run_states,
    return_final_states,
    num_segments,
):
    kwargs = dict(
        delta_softplus=delta_softplus,
        segment_ids=segment_ids,
        first_run_states=first_run_states,
        return_final_states=return_final_states,
        num_segments=num_segments,
    )
    if impl == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, **kwargs)
    from pallas_kernels.selective_scan import selective_scan_pallas

    return selective_scan_pallas(
        u, delta, A, B, C, D, z, delta_bias, interpret=impl == "pallas_interpret", **kwargs
    )


def _scan_from_starts(
    impl,
    args,
    delta_softplus,
    segment_ids,
    initial_states,
    first,
    return_final_states,
    num_segments,
):
    """The scan with per-slot initial states; `first` (b, d, n), when given, replaces the
    state the run at t = 0 starts from."""
    u, delta, A, B, C, D, z, delta_bias = args
    batch = u.shape[0]
    seg = _ids(segment_ids, u)
    if first is None and initial_states is not None:
        first = initial_states[jnp.arange(batch), seg[:, 0]]
    out = _run_impl(
        impl, *args, delta_softplus, segment_ids, first, return_final_states, num_segments
    )
    if initial_states is None or segment_ids is None:  # no run begins after t = 0
        return out
    y, final = out if return_final_states else (out, None)
    y_mid, final_mid = _later_runs_from_initial_states(
        discretize_delta(delta, delta_bias, delta_softplus), A, C, initial_states, seg
    )
    acc = accumulation_dtype(u)
    if z is not None:
        y_mid = y_mid * jax.nn.silu(z.astype(acc))
    y = (y.astype(acc) + y_mid).astype(u.dtype)
    return (y, final + final_mid) if return_final_states else y


def _ids(segment_ids, u):
    if segment_ids is None:
        return jnp.zeros(u.shape[:2], jnp.int32)
    return segment_ids.astype(jnp.int32)


@jax.checkpoint
def _later_runs_from_initial_states(delta, A, C, init, seg):
    """What the initial states of runs that begin after t = 0 add, by linearity: such a run's
    state is its zero-start state plus exp(A * (its delta summed up to t)) * init[slot]. Returns
    (y term (b, t, d) before D and the gate, final-state term (b, s, d, n))."""
    acc = delta.dtype
    cum = run_cumsum(delta, segment_starts(seg))  # (b, t, d)
    later = jnp.cumsum(segment_starts(seg).astype(jnp.int32), axis=1) > 1  # (b, t)
    A = A.astype(acc)
    init = init.astype(acc)
    per_token = jnp.take_along_axis(init, seg[:, :, None, None], axis=1)  # (b, t, d, n)
    decayed = jnp.exp(cum[..., None] * A) * per_token
    y = jnp.where(later[..., None], jnp.einsum("btdn,btn->btd", decayed, C.astype(acc)), 0.0)
    # Each slot's final state is read at its last token, when that token's run began later.
    t = jnp.arange(seg.shape[1])
    is_slot = seg[..., None] == jnp.arange(init.shape[1])  # (b, t, s)
    last = jnp.max(jnp.where(is_slot, t[:, None], -1), axis=1)  # (b, s)
    at_last = jnp.take_along_axis(decayed, jnp.maximum(last, 0)[:, :, None, None], axis=1)
    read = (last >= 0) & jnp.take_along_axis(later, jnp.maximum(last, 0), axis=1)
    return y, jnp.where(read[..., None, None], at_last, 0.0)


def run_cumsum(a, starts):
    """(b, t, ...): the inclusive sum of a over each token's run, restarting at every run start
    (starts (b, t)). A segmented associative scan: a run's sums depend on its own tokens only,
    to the bit (a difference of row-wide cumsums would not)."""
    flags = jnp.broadcast_to(starts.reshape(*starts.shape, *(1,) * (a.ndim - 2)), a.shape)

    def combine(x, y):
        fx, vx = x
        fy, vy = y
        return fx | fy, jnp.where(fy, vy, vx + vy)

    return jax.lax.associative_scan(combine, (flags, a), axis=1)[1]


def _continued(
    impl,
    run,
    args,
    delta_softplus,
    segment_ids,
    initial_states,
    continues,
    return_final_states,
    num_segments,
    first_run_states=None,
):
    """Rows linked by `continues`: one scan from the given starts gives each row's last-run end
    state and (with its total decay) the affine map from the first run's start to it; a pass
    over the rows chains them; a second scan runs from the chained starts."""
    u, delta, A, B, C, D, z, delta_bias = args
    batch, d_state = u.shape[0], A.shape[1]
    seg = _ids(segment_ids, u)
    rows = jnp.arange(batch)
    if initial_states is None:  # the last run's end state, whatever range the ids have
        ids = compact_ids(seg, "last")
        _, final = _run_impl(impl, *args, delta_softplus, ids, first_run_states, True, 3)
        end = final[:, 0]
    else:
        _, final = run(None, True, num_segments)
        end = final[rows, seg[:, -1]]  # (b, d, n)
    starts = segment_starts(seg)
    last_sum = run_cumsum(discretize_delta(delta, delta_bias, delta_softplus), starts)[:, -1]
    decay = jnp.exp(last_sum[..., None] * A.astype(last_sum.dtype))  # (b, d, n)
    if first_run_states is not None:
        given = first_run_states.astype(end.dtype)
    elif initial_states is None:
        given = jnp.zeros((batch, u.shape[2], d_state), end.dtype)
    else:
        given = initial_states[rows, seg[:, 0]].astype(end.dtype)
    first = chain_row_states(end, decay, single_run_rows(seg), continues, given)
    return run(first, return_final_states, num_segments)


def check_selective_scan_args(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    segment_ids,
    return_final_states,
    num_segments,
    initial_states=None,
) -> int | None:
    """Validates shapes and dtypes before anything runs; returns the resolved num_segments."""
    shapes = dict(u=np.shape(u), delta=np.shape(delta), A=np.shape(A), B=np.shape(B), C=np.shape(C))
    if len(shapes["u"]) != 3:
        raise ValueError(f"u must be (batch, length, d_inner), got shape {shapes['u']}")
    batch, length, d_inner = shapes["u"]
    if length == 0:
        raise ValueError(f"length must be at least 1, got u with shape {shapes['u']}")
    if len(shapes["A"]) != 2 or shapes["A"][0] != d_inner:
        raise ValueError(
            f"A must be (d_inner, d_state) with d_inner={d_inner}, got shape {shapes['A']}"
        )
    d_state = shapes["A"][1]
    expected = dict(
        delta=(batch, length, d_inner),
        B=(batch, length, d_state),
        C=(batch, length, d_state),
        z=(batch, length, d_inner),
        D=(d_inner,),
        delta_bias=(d_inner,),
    )
    given = dict(delta=delta, B=B, C=C, z=z, D=D, delta_bias=delta_bias)
    for name, x in given.items():
        if x is not None and np.shape(x) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} to match u {shapes['u']} and A "
                f"{shapes['A']}, got {np.shape(x)}"
            )
    for name, x in dict(u=u, A=A, **given).items():
        if x is None:
            continue
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must be a real floating array, got dtype {dtype}")
    check_segment_ids(segment_ids, batch, length)
    if initial_states is not None:
        shape = tuple(np.shape(initial_states))
        if len(shape) != 4 or shape[0] != batch or shape[2:] != (d_inner, d_state):
            raise ValueError(
                f"initial_states must be (batch, num_segments, d_inner, d_state) = "
                f"{(batch, 'num_segments', d_inner, d_state)}, got shape {shape}"
            )
        if not jnp.issubdtype(jnp.result_type(initial_states), jnp.floating):
            raise ValueError(
                f"initial_states must be a real floating array, got dtype "
                f"{jnp.result_type(initial_states)}"
            )
        if num_segments is not None and num_segments != shape[1]:
            raise ValueError(
                f"num_segments={num_segments!r} must equal initial_states.shape[1]={shape[1]}"
            )
        num_segments = shape[1]
        check_segment_slots(segment_ids, num_segments, used_by="initial_states")
    if return_final_states:
        if num_segments is None:
            if segment_ids is not None:
                raise ValueError(
                    "return_final_states with segment_ids needs num_segments (ids must lie in "
                    "[0, num_segments))"
                )
            num_segments = 1
        if (
            not isinstance(num_segments, (int, np.integer))
            or isinstance(num_segments, bool)
            or num_segments < 1
        ):
            raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
        check_segment_slots(segment_ids, num_segments, used_by="return_final_states")
    return num_segments


def accumulation_dtype(x):
    """float32 for bf16/f16/f32 inputs; float64 for float64 inputs (the test-only oracle)."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def discretize_delta(delta, delta_bias, delta_softplus):
    """delta in the accumulation dtype after the optional bias and softplus."""
    acc = accumulation_dtype(delta)
    delta = delta.astype(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(acc)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


@functools.partial(
    jax.jit,
    static_argnames=("delta_softplus", "return_final_states", "num_segments", "chunk", "method"),
)
def selective_scan_reference(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus: bool = False,
    segment_ids=None,
    first_run_states=None,
    return_final_states: bool = False,
    num_segments: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    method: Literal["auto", "sequential", "associative"] = "auto",
):
    """Pure-JAX selective scan; same arguments as `selective_scan` (see there), except that
    initial states come as first_run_states (b, d, n): the state the run at t = 0 of each row
    starts from (zeros without it), carried in like a chunk's incoming state.

    method: how a chunk is scanned. "sequential" steps through it (least work: fastest on
    CPU); "associative" runs `lax.associative_scan` over it (log depth: fastest on
    accelerators, where each sequential step costs a kernel launch); "auto" picks by backend.
    """
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    f32 = accumulation_dtype(u)  # float32 unless the caller runs a float64 oracle
    if method == "auto":
        method = "sequential" if jax.default_backend() == "cpu" else "associative"
    delta = discretize_delta(delta, delta_bias, delta_softplus)
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
        num_segments = num_segments or 1
    starts = segment_starts(segment_ids)
    if first_run_states is not None:
        starts = starts.at[:, 0].set(False)  # t = 0 continues from first_run_states
    ends = segment_ends(segment_ids)  # where each segment's final state is read

    chunk = min(chunk, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length

    def time_chunks(x, fill=0):
        # (b, t, ...) -> (n_chunks, b, chunk, ...); padded steps have delta = 0 and u = 0, so
        # they leave the state unchanged, and they are never segment ends.
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = x.reshape(batch, n_chunks, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    xs = dict(
        delta=time_chunks(delta),
        du=time_chunks(delta * u.astype(f32)),
        B=time_chunks(B.astype(f32)),
        C=time_chunks(C.astype(f32)),
        starts=time_chunks(starts),
        ends=time_chunks(ends, fill=False),
        seg=time_chunks(segment_ids.astype(jnp.int32)),
    )
    A = A.astype(f32)

    def scan_chunk(h, x):
        """(b, d, n) state entering the chunk -> (state leaving it, y (b, c, d), states).

        states (b, c, d, n) after every step; the sequential path keeps them only when the
        final states are asked for.
        """
        if method == "sequential":

            def step(h, x_t):
                delta_t, du_t, B_t, C_t, start_t = x_t
                decay = jnp.where(start_t[:, None, None], 0.0, jnp.exp(delta_t[..., None] * A))
                h = decay * h + du_t[..., None] * B_t[:, None, :]
                y_t = jnp.einsum("bdn,bn->bd", h, C_t)
                return h, (y_t, h if return_final_states else None)

            per_step = [jnp.swapaxes(x[k], 0, 1) for k in ("delta", "du", "B", "C", "starts")]
            h, (y, hs) = jax.lax.scan(step, h, per_step)
            return h, jnp.swapaxes(y, 0, 1), None if hs is None else jnp.swapaxes(hs, 0, 1)
        decay = jnp.exp(x["delta"][..., None] * A)  # (b, c, d, n)
        decay = jnp.where(x["starts"][..., None, None], 0.0, decay)
        drive = x["du"][..., None] * x["B"][:, :, None, :]
        decay_cum, drive_cum = jax.lax.associative_scan(combine_affine, (decay, drive), axis=1)
        hs = decay_cum * h[:, None] + drive_cum
        return hs[:, -1], jnp.einsum("bcdn,bcn->bcd", hs, x["C"]), hs

    @jax.checkpoint
    def chunk_step(carry, x):
        h, final = carry
        h, y, hs = scan_chunk(h, x)
        if final is not None:
            # For each slot, the last end-of-segment step of that id in this chunk (if any).
            steps = jnp.arange(x["seg"].shape[1])
            hit = x["ends"][..., None] & (x["seg"][..., None] == jnp.arange(final.shape[1]))
            last = jnp.max(jnp.where(hit, steps[None, :, None], -1), axis=1)  # (b, s)
            picked = jnp.take_along_axis(hs, jnp.maximum(last, 0)[:, :, None, None], axis=1)
            final = jnp.where((last >= 0)[:, :, None, None], picked, final)
        return (h, final), y

    h0 = jnp.zeros((batch, d_inner, d_state), f32)
    if first_run_states is not None:
        h0 = first_run_states.astype(f32)
    final0 = (
        jnp.zeros((batch, num_segments, d_inner, d_state), f32) if return_final_states else None
    )
    (_, final), y = jax.lax.scan(chunk_step, (h0, final0), xs)
    y = jnp.moveaxis(y, 0, 1).reshape(batch, n_chunks * chunk, d_inner)[:, :length]
    y = finish_output(y, u, D, z)
    return (y, final) if return_final_states else y


def finish_output(y, u, D, z):
    """Adds the D skip and applies the silu(z) gate in float32 (or wider); returns u's dtype."""
    acc = accumulation_dtype(y)
    if D is not None:
        y = y + u.astype(acc) * D.astype(acc)
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return y.astype(u.dtype)


def selective_state_update(h, u, delta, A, B, C, D, z, delta_bias):
    """One step of `selective_scan` (delta_softplus on) from state h (b, e, n) float32: the
    recurrent decoding form of the same op. e is d_inner.

    u, delta, z (b, e); B, C (b, n); D, delta_bias (e,). Returns (next h, y (b, e) in u's dtype).
    """
    delta = discretize_delta(delta, delta_bias, True)
    f32 = accumulation_dtype(u)
    h = (
        jnp.exp(delta[..., None] * A.astype(f32)) * h
        + (delta * u.astype(f32))[..., None] * B.astype(f32)[:, None, :]
    )
    y = jnp.einsum("ben,bn->be", h, C.astype(f32))
    return h, finish_output(y, u, D, z)
