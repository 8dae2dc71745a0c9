"""Where the time of one training step goes (default: 1.4b, packed, 8 x 2048), by timed variants.

    PYTHONPATH=. python3 benchmarks/breakdown.py                         # 1.4b packed, ~6-8 min
    PYTHONPATH=. python3 benchmarks/breakdown.py --variants step,grad,fwd,opt,matmul
    PYTHONPATH=. python3 benchmarks/breakdown.py --variants grad_noscan,fwd_noscan,grad_noconv,grad_nonorm
    PYTHONPATH=. python3 benchmarks/breakdown.py --trace DIR              # also a profiler trace
    PYTHONPATH=. python3 benchmarks/breakdown.py --smoke --out DIR        # CPU check, seconds
    # A/B of one choice on the full step (~1.5 min each; results keyed by the choice):
    PYTHONPATH=. python3 benchmarks/breakdown.py --variants step --scan-config window=2,unroll=2
    PYTHONPATH=. python3 benchmarks/breakdown.py --variants step --conv-impl pallas
    PYTHONPATH=. python3 benchmarks/breakdown.py --variants step --norm-impl reference

Method. The model is bench_train.py's (benchmarks/workloads.py: released vocabulary, bf16
compute, float32 params, AdamW, train/step.py) on one packed batch of the "instruct" workload
(step time does not depend on the documents: the kernels' work is fixed by the shape). Each
variant below is compiled ahead of time and timed as the median of --steps calls after --warmup
(harness.time_calls with groups of one call: blocking after every call, since the variants are
compared with each other, not with the trainer's overlapped dispatch):
  step         the full train step (train/step.py: forward, backward, clip, AdamW)
  grad         loss and gradients only (value_and_grad of train.step.token_losses)
  fwd          the loss only (forward pass)
  opt          the optimizer alone: clip_by_global_norm + AdamW update + apply, on given grads
  grad_noscan  grad with the selective scan replaced by a stand-in of near-zero cost
  fwd_noscan   fwd with the same stand-in
  grad_noconv  grad with the causal conv replaced by a stand-in (one tap, elementwise)
  grad_nonorm  grad with RMSNorm (the blocks' and the final one, not Mamba2's gated norm)
               replaced by a stand-in (scale only, no reduction)
  matmul       the projections alone at the step's shapes, forward + backward (dX and dW):
               in_proj, x_proj, dt_proj, out_proj of one layer x n_layer, plus the tied lm_head
The stand-ins keep every input in the graph (so upstream gradients are still computed) but do
only a few fused elementwise operations: y = (u * D + delta' * (sum B + sum C)) * silu(z) for the
scan, x * w_last + bias (then silu) for the conv, x * weight for the norm. They are patched into
jax_packmamba.model (its selective_scan, causal_conv1d and RMSNorm.__call__) only while the
variant is traced; nothing else changes.

Parts of the full step (ms and share of `step`):
  scan forward   = fwd - fwd_noscan
  scan backward  = (grad - grad_noscan) - scan forward
  conv (f+b)     = grad - grad_noconv
  norms (f+b)    = grad - grad_nonorm
  matmuls (f+b)  = matmul
  optimizer      = step - grad          (opt alone is reported beside it)
  other          = step - all of the above: embedding, loss (logsumexp over the vocabulary),
                   elementwise glue, residual adds, casts, gradient accumulation buffers
Removing an op also changes how XLA fuses its neighbours, so the parts are estimates that need
not add up exactly; `other` absorbs the difference (and can come out negative). --trace DIR also
writes a jax.profiler trace of a few full steps (perfetto_trace.json.gz, for ui.perfetto.dev)
and sums its device kernel time by kernel name into: scan (the Pallas kernels, named
selective_scan_*), gemm (cuBLAS/cuBLASLt/CUTLASS names), other fusions; best effort, since kernel
names depend on the XLA version. It also attributes each kernel to the JAX source line(s) its
HLO instruction came from (the optimized module's op metadata and stack frames; "bwd" for
transposes), so XLA fusions read as "causal_conv1d.py:33 causal_conv1d bwd" instead of
"input_multiply_reduce_fusion". Library kernels (cuBLAS, Pallas) keep their own names.

Time budget: --time-budget seconds (default 540); a variant whose compile (predicted from the
last one) does not fit is skipped and recorded so; run the rest with --variants in another call.
Results merge into --out/breakdown_<slug>.json (default benchmarks/results/; --smoke:
breakdown_<slug>_smoke.json), keyed preset/mode/shape (plus the choices of an A/B); each record
carries the harness header of the call that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before jax starts: room for 1.4b+

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import harness, step_parts, workloads  # noqa: E402
from benchmarks.bench_train import _memory_analysis  # noqa: E402

VARIANTS = (
    "step",
    "grad",
    "fwd",
    "opt",
    "matmul",
    "grad_noscan",
    "fwd_noscan",
    "grad_noconv",
    "grad_nonorm",
)


# ------------------------------------------------------------------------------------------------
# Stand-ins.


def fake_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus=False,
    segment_ids=None,
    continues=None,
    first_run_states=None,
    return_final_states=False,
    num_segments=None,
    impl="auto",
    return_row_end_states=False,
):
    if (
        return_final_states
        or return_row_end_states
        or continues is not None
        or first_run_states is not None
    ):
        raise NotImplementedError("the stand-in scan has no states and no row links")
    f32 = jnp.float32
    d = delta.astype(f32)
    if delta_bias is not None:
        d = d + delta_bias
    if delta_softplus:
        d = jax.nn.softplus(d)
    bc = B.astype(f32).sum(-1, keepdims=True) + C.astype(f32).sum(-1, keepdims=True)
    y = u.astype(f32) * (1.0 if D is None else D) + d * bc
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(u.dtype)


def fake_conv(
    x,
    weight,
    bias=None,
    *,
    segment_ids=None,
    activation=None,
    impl=None,
    continues=None,
    first_inputs=None,
):
    del impl
    if continues is not None or first_inputs is not None:
        raise NotImplementedError("the stand-in conv has no row links")
    y = x * weight[:, -1]
    if bias is not None:
        y = y + bias
    return jax.nn.silu(y) if activation == "silu" else y


def fake_norm(self, x):
    return (x.astype(jnp.float32) * self.weight[...]).astype(self.dtype)


def fake_norm_add(self, hidden, residual):
    stream = hidden.astype(jnp.float32)
    if residual is not None:
        stream = stream + residual
    return stream, fake_norm(self, stream)


@contextlib.contextmanager
def patched(*, scan=False, conv=False, norm=False):
    import jax_packmamba.model as M

    saved = (M.selective_scan, M.causal_conv1d, M.RMSNorm.__call__, M.RMSNorm.add)
    try:
        if scan:
            M.selective_scan = fake_scan
        if conv:
            M.causal_conv1d = fake_conv
        if norm:
            M.RMSNorm.__call__, M.RMSNorm.add = fake_norm, fake_norm_add
        yield
    finally:
        M.selective_scan, M.causal_conv1d, M.RMSNorm.__call__, M.RMSNorm.add = saved


def override_norm_impl(impl: str) -> None:
    """Every row norm of the models (RMSNorm, the blocks' add + norm, Mamba2's gated norm) with
    `impl` (jax_packmamba.ops.rms_norm's), for the whole process: an A/B of the norm kernels."""
    import jax_packmamba.layers as L
    import jax_packmamba.mamba2 as M2

    def forced(op):
        return lambda *a, **kw: op(*a, **{**kw, "impl": impl})

    L.rms_norm, L.add_rms_norm = forced(L.rms_norm), forced(L.add_rms_norm)
    M2.gated_rms_norm = forced(M2.gated_rms_norm)


def override_scan_config(overrides: dict) -> None:
    """Every Pallas scan traced from now on uses its picked ScanConfig with `overrides` replaced
    (for the whole process: the variants and the trace all see the same tiling)."""
    from pallas_kernels.selective_scan import vjp as scan_vjp
    from pallas_kernels.selective_scan.config import ScanConfig

    dataclasses.replace(ScanConfig(), **overrides)  # unknown fields fail here, before compiling
    pick = scan_vjp.pick_config
    scan_vjp.pick_config = lambda *shape: dataclasses.replace(pick(*shape), **overrides)


# ------------------------------------------------------------------------------------------------


_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_META = re.compile(r'(op_name|stack_frame_id)=(?:"([^"]*)"|(\d+))')
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')
_FIELD = re.compile(r"(\w+)=(\d+)")


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Optimized HLO text -> {instruction name with "." as "_": "file:line function dir"}.

    A kernel in the trace is named after its HLO instruction (fusion, custom call); the
    instruction's metadata names the JAX op and a stack frame (the module's FileNames /
    FunctionNames / FileLocations / StackFrames tables), whose innermost entry is the user
    source line the op came from. dir is "bwd" where the op name is a transpose."""
    tables: dict[str, dict[int, object]] = {}
    table = None
    computation = None
    inside: dict[str, list[str]] = {}  # computation -> sources of its instructions
    calls: dict[str, str] = {}  # instruction -> computation it calls (fusions)
    own: dict[str, str] = {}
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(stripped, {})
            continue
        row = _TABLE_ROW.match(stripped) if table is not None else None
        if row:
            table[int(row.group(1))] = (
                row.group(2)
                if row.group(2) is not None
                else dict((k, int(v)) for k, v in _FIELD.findall(row.group(3)))
            )
            continue
        if stripped:
            table = None
        head = _COMPUTATION.match(line)
        if head:
            computation = head.group(1)
            continue
        m = _HLO_INSTR.match(line)
        if not m:
            continue
        name = m.group(1).replace(".", "_")
        called = _CALLS.search(line)
        if called:
            calls[name] = called.group(1)
        meta = {k: (a or b) for k, a, b in _META.findall(m.group(2))}
        if "op_name" not in meta or "stack_frame_id" not in meta:
            continue
        frame = tables.get("StackFrames", {}).get(int(meta["stack_frame_id"]))
        if not isinstance(frame, dict):
            continue
        loc = tables.get("FileLocations", {}).get(frame.get("file_location_id"), {})
        file = tables.get("FileNames", {}).get(loc.get("file_name_id"), "?")
        func = tables.get("FunctionNames", {}).get(loc.get("function_name_id"), "?")
        op = meta["op_name"].split(";")[0]
        direction = "bwd" if "transpose(" in op else "fwd"
        src = f"{pathlib.Path(file).name}:{loc.get('line', '?')} {func} {direction}"
        own[name] = src
        if computation is not None:
            inside.setdefault(computation, []).append(src)
    sources = dict(own)
    for name, comp in calls.items():
        found = list(dict.fromkeys(inside.get(comp.replace(".", "_"), inside.get(comp, []))))
        if found:
            # The last instructions of a fusion are nearest its root (what it computes).
            sources[name] = " | ".join(found[-2:][::-1])
    return sources


def trace_summary(
    trace_dir: pathlib.Path, steps: int, sources: dict[str, str] | None = None
) -> dict:
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        return dict(error="no perfetto_trace.json.gz written")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {pid for pid, n in names.items() if n.startswith("/device:")}
    kernels: dict[str, float] = {}
    by_source: dict[str, float] = {}
    parts = dict.fromkeys(step_parts.PARTS, 0.0)
    arg_sample: dict[str, dict] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            kernels[e["name"]] = kernels.get(e["name"], 0.0) + float(e["dur"])
            args = e.get("args") or {}
            arg_sample.setdefault(e["name"], {k: str(v)[:200] for k, v in args.items()})
            op = str(args.get("hlo_op") or e["name"]).replace(".", "_")
            src = (sources or {}).get(op) or (sources or {}).get(e["name"]) or f"? {e['name']}"
            by_source[src] = by_source.get(src, 0.0) + float(e["dur"])
            parts[step_parts.part(e["name"], src)] += float(e["dur"]) / 1e3 / steps
    if not kernels:
        return dict(
            file=str(files[-1]),
            processes=sorted(names.values()),
            error="no device kernel events (CPU backend, or an unexpected trace layout)",
        )
    cats = {"scan": 0.0, "gemm": 0.0, "other": 0.0}
    for name, us in kernels.items():
        low = name.lower()
        if "selective_scan" in low:
            cats["scan"] += us
        elif re.search(r"gemm|cublas|cutlass|xmma|nvjet|matmul|dot", low):
            cats["gemm"] += us
        else:
            cats["other"] += us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    return dict(
        file=str(files[-1]),
        steps=steps,
        device_ms_per_step={k: v / 1e3 / steps for k, v in cats.items()},
        device_busy_ms_per_step=sum(kernels.values()) / 1e3 / steps,
        parts_ms_per_step=parts,  # benchmarks/step_parts.py, as profile_torch_step.py's
        top_kernels_ms_per_step=[[n, us / 1e3 / steps] for n, us in top],
        top_kernel_args={n: arg_sample.get(n, {}) for n, _ in top[:8]},
        by_source_ms_per_step=[
            [s, us / 1e3 / steps] for s, us in sorted(by_source.items(), key=lambda kv: -kv[1])[:60]
        ],
    )


SMOKE_MODEL = "n_layer=1,d_model=32,d_state=4"


def parse_args(argv):
    ap = harness.argument_parser(__doc__)
    ap.add_argument("--preset", default=None, help="default 1.4b (smoke: tiny)")
    ap.add_argument("--rows", type=int, default=None, help="default 8 (smoke 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (smoke 64)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=None, help="default 2 (smoke 1)")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed calls per variant (default 10; smoke 2)"
    )
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--scan-impl", default="auto")
    ap.add_argument("--conv-impl", default="auto")
    ap.add_argument(
        "--norm-impl",
        default="auto",
        choices=("auto", "reference", "pallas"),
        help="the row norms' impl (jax_packmamba.ops.rms_norm), for an A/B",
    )
    harness.add_layer_args(ap)
    ap.add_argument(
        "--model",
        default=None,
        help=f"MambaConfig overrides, e.g. n_layer=1 (checks; smoke: {SMOKE_MODEL})",
    )
    ap.add_argument(
        "--scan-config",
        default="",
        help="ScanConfig overrides for every Pallas scan, e.g. window=2,unroll=2 (A/B of "
        "kernel tilings; results are keyed by them)",
    )
    ap.add_argument("--time-budget", type=float, default=540.0)
    ap.add_argument(
        "--trace",
        type=pathlib.Path,
        default=None,
        help="directory for a jax.profiler trace of full steps",
    )
    args = ap.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if bad:
        ap.error(f"unknown --variants {bad}; choose from {list(VARIANTS)}")
    try:
        scan_overrides = workloads.scan_config_overrides(filter(None, args.scan_config.split(",")))
    except ValueError as e:
        ap.error(f"--scan-config: {e}")
    return args, scan_overrides


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, scan_overrides = parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.time_budget - 10.0
    smoke = args.smoke
    preset = args.preset or ("tiny" if smoke else "1.4b")
    rows = args.rows or (2 if smoke else 8)
    seq_len = args.seq_len or (64 if smoke else 2048)
    steps = args.steps or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    model_text = args.model if args.model is not None else (SMOKE_MODEL if smoke else "")
    variants = [v for v in args.variants.split(",") if v]

    if scan_overrides:
        override_scan_config(scan_overrides)
    if args.norm_impl != "auto":
        override_norm_impl(args.norm_impl)
    from train import step as step_lib
    from train.metrics import peak_flops

    dev = jax.devices()[0]
    info = harness.device_info(dev)
    backend = info.backend
    out = harness.result_path("breakdown", info.slug, "smoke" if smoke else None, out_dir=args.out)
    model_overrides = workloads.parse_overrides(model_text)
    mc = workloads.model_config(
        preset,
        backend=backend,
        dtype=args.dtype,
        scan_impl=args.scan_impl,
        conv_impl=args.conv_impl,
        remat=args.remat,
        scan_layers=args.scan_layers,
        overrides=model_overrides,
    )
    print(
        f"breakdown: {preset} packed {rows} x {seq_len} on {info.kind} ({backend}), jax "
        f"{jax.__version__}; variants {variants}; -> {out}",
        flush=True,
    )

    batch_np = workloads.packed_batch(rows=rows, seq_len=seq_len)
    real_tokens = batch_np["real"]
    setup = workloads.train_setup(mc, dev)
    compiled = setup.compiled
    batch = setup.put_batch(batch_np["arrays"])
    micro = {k: v[0] for k, v in batch.items()}
    state = compiled.init(0)
    tx = step_lib.make_optimizer(setup.optim, setup.schedule_steps)
    graphdef = compiled.graphdef

    def loss_fn(params, mb):
        ce, n = step_lib.token_losses(
            graphdef, params, mb["tokens"], mb["segment_ids"], mb["targets"], mb["loss_mask"]
        )
        return ce / jnp.maximum(n, 1)

    def opt_only(st, grads):
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        return step_lib.TrainState(
            step=st.step + 1,
            params=optax.apply_updates(st.params, updates),
            opt_state=opt_state,
            rng=st.rng,
        )

    result = dict(
        preset=preset,
        mode="packed",
        rows=rows,
        seq_len=seq_len,
        real_tokens=real_tokens,
        n_layer=mc.n_layer,
        d_model=mc.d_model,
        d_inner=mc.d_inner,
        vocab_size=mc.vocab_size,
        compute_dtype=mc.dtype,
        scan_impl=mc.scan_impl,
        conv_impl=mc.conv_impl,
        norm_impl=args.norm_impl,
        remat=mc.remat,
        scan_layers=mc.scan_layers,
        model_overrides=model_overrides,
        flops_per_token=mc.flops_per_token(),
        **harness.header(info, script=__file__, argv=argv),
        peak_flops_per_device=peak_flops(dev.device_kind) if backend != "cpu" else None,
        scan_config_overrides=scan_overrides,
        variants={},
    )
    key = (
        f"{preset}/packed/{rows}x{seq_len}"
        + (f"/scan:{args.scan_config}" if scan_overrides else "")
        + (f"/model:{model_text}" if model_text else "")
        + (f"/conv:{args.conv_impl}" if args.conv_impl != "auto" else "")
        + (f"/norm:{args.norm_impl}" if args.norm_impl != "auto" else "")
        + ("/scan_layers" if args.scan_layers else "")
        + (f"/remat:{mc.remat}" if mc.remat != "none" else "")
    )
    existing = json.loads(out.read_text()) if out.exists() else {}
    if key in existing:  # keep variants measured by an earlier call
        result["variants"] = {**existing[key].get("variants", {}), **result["variants"]}

    def save():
        result["parts"] = parts(result["variants"])
        existing[key] = result
        harness.write_json(out, existing)

    last_compile = 5.0 if smoke else 60.0
    grads = None
    for name in variants:
        if time.time() + last_compile + 10.0 > deadline:
            result["variants"][name] = dict(status="skipped", reason="time budget")
            print(f"  {name:12s} skipped (time budget)", flush=True)
            save()
            continue
        t0 = time.perf_counter()
        carried = None  # the donated state the step and opt variants thread from call to call
        with patched(scan="noscan" in name, conv="noconv" in name, norm="nonorm" in name):
            if name == "step":
                lowered = compiled.train_step.lower(state, batch)
                carried, call_args = state, (batch,)
            elif name.startswith("grad"):
                # A fresh function object each time: jit caches traces by function, and the
                # stand-ins only act when tracing.
                lowered = jax.jit(jax.value_and_grad(lambda p, mb: loss_fn(p, mb))).lower(
                    state.params, micro
                )
                call_args = (state.params, micro)
            elif name.startswith("fwd"):
                lowered = jax.jit(lambda p, mb: loss_fn(p, mb)).lower(state.params, micro)
                call_args = (state.params, micro)
            elif name == "opt":
                if grads is None:
                    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
                lowered = jax.jit(opt_only, donate_argnums=0).lower(state, grads)
                carried, call_args = state, (grads,)
            elif name == "matmul":
                fn, call_args = matmul_bench(mc, rows * seq_len)
                lowered = jax.jit(fn).lower(*call_args)
        t1 = time.perf_counter()
        # The stand-ins must have replaced the ops: the scan's name (the Pallas kernels' names,
        # or the reference's jit) appears in the lowered module exactly when it should.
        has_scan = "selective_scan" in lowered.as_text()
        if has_scan == ("noscan" in name) and name not in ("opt", "matmul"):
            print(
                f"  WARNING {name}: selective_scan {'still' if has_scan else 'not'} in the "
                f"lowered module",
                flush=True,
            )
        exe = lowered.compile()
        t2 = time.perf_counter()
        last_compile = t2 - t0
        if name == "opt":  # returns the state alone

            def call(st, g, exe=exe):
                return exe(st, g), None
        else:
            call = exe
        timing = harness.time_calls(
            call, [call_args], state=carried, warmup=warmup, groups=steps, per_group=1
        )
        if carried is not None:
            state = timing.state  # the one passed in was donated
        result["variants"][name] = dict(
            status="ok",
            ms=1e3 * timing.median_s,
            times_ms=[1e3 * t for t in timing.group_s],
            trace_s=t1 - t0,
            compile_s=t2 - t1,
            scan_in_module=has_scan,
            # The process's peak so far (JAX has no reset): the step's own when it runs first.
            peak_gib_so_far=(harness.device_memory(jax.devices()[0])[0] or 0) / 2**30,
            # XLA's scratch memory for this program (known before it runs).
            memory_analysis=_memory_analysis(exe),
        )
        rec = result["variants"][name]
        temp = (rec["memory_analysis"] or {}).get("temp_size_in_bytes")
        memory = "".join(
            f", {label} {v:.2f} GiB"
            for label, v in (
                ("temp", None if temp is None else temp / 2**30),
                ("peak", rec["peak_gib_so_far"]),
            )
            if v
        )
        print(
            f"  {name:12s} {1e3 * timing.median_s:9.2f} ms   (compile {t2 - t1:.1f}s{memory})",
            flush=True,
        )
        del exe, lowered
        save()

    if args.trace and time.time() + 30 < deadline:
        trace_dir = args.trace
        exe = compiled.train_step.lower(state, batch).compile()
        for _ in range(2):
            state, _m = exe(state, batch)
        jax.block_until_ready(state)
        n_trace = 3
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(n_trace):
                state, _m = exe(state, batch)
            jax.block_until_ready(state)
        hlo_text = exe.as_text()
        (trace_dir / "step_hlo.txt").write_text(hlo_text)
        result["trace"] = trace_summary(trace_dir, n_trace, hlo_sources(hlo_text))
        print(f"  trace: {json.dumps(result['trace'])[:1500]}", flush=True)
        for src, ms in result["trace"].get("by_source_ms_per_step", [])[:40]:
            print(f"  {ms:8.2f} ms  {src}", flush=True)
        save()

    save()
    print_parts(result)
    print(f"breakdown: wrote {out} ({time.time() - t_start:.0f}s)", flush=True)
    return 0


def matmul_bench(mc, tokens: int):
    """(fn, args): fn runs the projections of n_layer layers at `tokens` rows, forward and
    backward (dX and dW), and the tied lm_head; bf16 operands, float32 weights cast as
    nnx.Linear does. Each layer's input is the previous layer's input gradient (no common
    subexpressions, nothing dead); weights are scaled so these chains keep their magnitude."""
    d, e, r, n, v = mc.d_model, mc.d_inner, mc.dt_rank_resolved, mc.d_state, mc.padded_vocab_size
    dt = mc.compute_dtype
    ks = jax.random.split(jax.random.key(0), 16)
    shapes = dict(in_proj=(d, 2 * e), x_proj=(e, r + 2 * n), dt_proj=(r, e), out_proj=(e, d))
    xs = {
        k: jax.random.normal(ks[i], (tokens, s[0]), jnp.float32).astype(dt)
        for i, (k, s) in enumerate(shapes.items())
    }
    ws = {
        k: (s[0] * s[1]) ** -0.25 * jax.random.normal(ks[4 + i], s, jnp.float32)
        for i, (k, s) in enumerate(shapes.items())
    }
    xs["lm_head"] = jax.random.normal(ks[8], (tokens, d), jnp.float32).astype(dt)
    ws["lm_head"] = (v * d) ** -0.25 * jax.random.normal(ks[9], (v, d), jnp.float32)

    def layer(w, x):
        return {k: x[k] @ w[k].astype(dt) for k in shapes}

    def head(w, x):
        return x @ w.astype(dt).T

    def fn(w, x):
        wl = {k: w[k] for k in shapes}
        h = {k: x[k] for k in shapes}
        dws = []
        for _ in range(mc.n_layer):
            y, vjp = jax.vjp(layer, wl, h)
            dw, h = vjp(y)
            dws.append(dw)
        y, vjp = jax.vjp(head, w["lm_head"], x["lm_head"])
        return dws, h, vjp(y)

    return fn, (ws, xs)


def parts(v: dict) -> dict:
    def ms(name):
        r = v.get(name)
        return r["ms"] if r and r.get("status") == "ok" else None

    step, grad, fwd = ms("step"), ms("grad"), ms("fwd")
    out = {}
    if fwd is not None and ms("fwd_noscan") is not None:
        out["scan_forward"] = fwd - ms("fwd_noscan")
        if grad is not None and ms("grad_noscan") is not None:
            out["scan_backward"] = (grad - ms("grad_noscan")) - out["scan_forward"]
    if grad is not None and ms("grad_noconv") is not None:
        out["conv"] = grad - ms("grad_noconv")
    if grad is not None and ms("grad_nonorm") is not None:
        out["norms"] = grad - ms("grad_nonorm")
    if ms("matmul") is not None:
        out["matmuls"] = ms("matmul")
    if step is not None and grad is not None:
        out["optimizer"] = step - grad
    if ms("opt") is not None:
        out["optimizer_alone"] = ms("opt")
    complete = all(
        k in out for k in ("scan_forward", "scan_backward", "conv", "norms", "matmuls", "optimizer")
    )
    if step is not None and complete:
        out["other"] = step - sum(
            out[k]
            for k in ("scan_forward", "scan_backward", "conv", "norms", "matmuls", "optimizer")
        )
    if step is not None:
        out["step"] = step
    return out


def print_parts(result):
    p = result.get("parts", {})
    step = p.get("step")
    tok = result["real_tokens"]
    print(
        f"\n{result['preset']} packed {result['rows']} x {result['seq_len']} ({tok} real tokens) on "
        f"{result['device']}:"
    )
    if step:
        print(f"  step {step:.2f} ms = {tok / step * 1e3:,.0f} real tokens/s")
    print("| part | ms | share of step |\n|---|---|---|")
    for k in (
        "scan_forward",
        "scan_backward",
        "matmuls",
        "conv",
        "norms",
        "optimizer",
        "other",
        "optimizer_alone",
    ):
        if k in p:
            share = f"{100 * p[k] / step:.1f}%" if step else "—"
            print(f"| {k} | {p[k]:.2f} | {share} |")


if __name__ == "__main__":
    sys.exit(main())
