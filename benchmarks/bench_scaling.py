"""Training throughput on 1, 2, 4 ... GPUs of one host: per-GPU efficiency of data parallelism.

    PYTHONPATH=. python3 benchmarks/bench_scaling.py --presets 130m --out DIR
    PYTHONPATH=. python3 benchmarks/bench_scaling.py --presets 1.4b --grad-reduce auto,bfloat16 --overlap off,on
    PYTHONPATH=. python3 benchmarks/bench_scaling.py --presets 2.8b --counts 4 --layouts fsdp
    PYTHONPATH=. python3 benchmarks/bench_scaling.py --presets 130m --counts 1,2 --profile
    PYTHONPATH=. python3 benchmarks/bench_scaling.py --smoke --out DIR     # CPU, 4 host devices

What is measured, per model preset x device count n x gradient-communication setting: the
packed training step (train/step.py, as bench_train times it) with --rows rows of --seq-len
tokens PER DEVICE (default 8 x 2048: the global batch grows with n, as in the trainer's data
parallelism), on the first n local devices:
  tokens_per_s          real tokens of the timed steps / their time (padding never counts)
  efficiency            tokens_per_s on n / (n x tokens_per_s on 1 device), the 1-device run
                        of the same preset and overlap setting from the same invocation when it
                        has one (the record's "baseline" says which run it used)
  step_time_s_median    harness.time_calls: --warmup steps, then groups of --group
                        back-to-back steps (blocking at a group's end; the state is donated),
                        the median over groups of the group's time / --group
  peak_bytes_per_device device.memory_stats() peak of each of the n devices; XLA's
                        memory_analysis of the compiled step beside it
  compile_s, lower_s    the step's first compile (no persistent cache unless --cache-dir)
  collectives           bytes per step of each collective in the compiled program, by op and
                        dtype (train.sharding.collective_bytes): what the gradient reduction
                        moves, in which dtype. In the data layout anything beyond the
                        gradients' all-reduce (an all-gather of activations, say) is XLA
                        replicating an op it cannot partition, such as a Pallas kernel's
                        custom call (the explicit grad_reduce modes run the model per device
                        inside a shard_map, where nothing needs partitioning)
Settings compared (each a list; every combination is run for n > 1):
  --layouts      data: mesh data=n x fsdp=1 (parameters and optimizer state replicated, the
                 gradients all-reduced); fsdp: data=1 x fsdp=n (parameters, gradients and
                 optimizer state sharded, gradients reduce-scattered, parameters all-gathered)
  --grad-reduce  train.config MeshConfig.grad_reduce: auto (XLA's SPMD partitioner, float32),
                 float32 or bfloat16 (an explicit shard_map reduction in that dtype)
  --overlap      off / on: MeshConfig.overlap_collectives, XLA's latency-hiding scheduler flags
                 (train.sharding.OVERLAP_XLA_FLAGS), set in the child's XLA_FLAGS
The 1-device run (layout "single", grad_reduce auto: the baseline) is done once per preset and
overlap setting; an explicit grad_reduce in the list also runs on one device, where it moves
nothing: the cost of the explicit formulation itself.

Processes: every configuration runs in its own child process (the parent never touches the
accelerator), so its peak memory is its own, XLA flags can differ between runs of one
invocation, a configuration that runs out of memory (recorded "oom") cannot take the others
with it, and one past the time budget is killed ("timeout"). Children keep NCCL_NVLS_ENABLE=0
(NVLink multicast off) and set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless set.

--profile: the configurations with n in --profile-counts (default 2) also run --profile-steps
steps under jax.profiler.trace after the timing; the record gets a summary of the device trace
(per device and step: kernel time, collective (NCCL) time, how much of it overlapped compute,
the top kernels) and the Perfetto trace is copied beside the result as
<result stem>_profile_<configuration>.json.gz (open it in ui.perfetto.dev).

Results merge into --out/scaling_<slug>_<host devices>dev.json (records keyed
preset/layout/grad_reduce/overlap/n; the harness header of the latest invocation on top; each
record keeps its own date and commit; --fresh starts anew, the old file moving to history/),
after every configuration, so a call cut at its time limit keeps what it measured; --resume
skips configurations already ok with the same settings. A plot of efficiency and step time
against n goes beside it (_scaling.png). --time-budget: seconds for the invocation (default
540); a configuration that cannot start in time is recorded "skipped".

--smoke: the tiny preset (one layer of width 32), 2 rows of 64 tokens a device, 4 host CPU
devices (XLA_FLAGS --xla_force_host_platform_device_count=4 unless a count is set), counts
1,2,4, 1 warm-up + 2 timed steps: a check of the script that measures nothing.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from benchmarks import harness, workloads
from benchmarks.bench_train import SMOKE_MODEL, _memory_analysis, is_oom

PRESETS = ("130m", "370m", "790m", "1.4b", "2.8b")
DEFAULT_PRESETS = ("130m", "1.4b")
LAYOUTS = ("data", "fsdp")
GRAD_REDUCE = ("auto", "float32", "bfloat16")  # train.sharding.GRAD_REDUCE
OVERLAP = ("off", "on")
# The targets: per-GPU efficiency at 2 and 4 GPUs (drawn on the plot).
TARGETS = {"1.4b": 0.90, "130m": 0.85}
SMOKE_DEVICES = 4
SCHEMA = 1
COLLECTIVE_WORDS = (
    "nccl",
    "all-reduce",
    "allreduce",
    "reduce-scatter",
    "reducescatter",
    "all-gather",
    "allgather",
    "collective-permute",
    "sendrecv",
    "all-to-all",
    "alltoall",
)


# ------------------------------------------------------------------------------------------------
# Trace summary (the --profile part): where a step's device time goes.


def _merge(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(merged) -> float:
    return sum(e - s for s, e in merged)


def _intersection(a, b) -> float:
    """Total length where two merged interval lists overlap."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def is_collective(kernel_name: str) -> bool:
    name = kernel_name.lower()
    return any(w in name for w in COLLECTIVE_WORDS)


def summarize_trace(trace, steps: int, top: int = 12) -> dict:
    """Per device (a trace process named /device:...), over its stream threads' kernels, per
    step in ms: span (first kernel start to last end), compute (kernels not NCCL, their union),
    collective (NCCL kernels, their union), overlapped (collective time during compute),
    exposed_collective (collective - overlapped: what the step waits for), and the top kernels
    by total time. Derived rows (threads "XLA Ops", "XLA Modules", "Steps", ...) are skipped:
    they repeat the streams' kernels."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    proc, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            proc[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    kernels: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        device = proc.get(e.get("pid"), "")
        if (
            not device.startswith("/device:")
            or "stream" not in thread.get((e["pid"], e.get("tid")), "").lower()
        ):
            continue
        kernels.setdefault(device, []).append(
            (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", ""))
        )
    steps = max(1, steps)
    devices = {}
    for device, ks in sorted(kernels.items()):
        comp = _merge([(s, e) for s, e, n in ks if not is_collective(n)])
        coll = _merge([(s, e) for s, e, n in ks if is_collective(n)])
        both = _intersection(comp, coll)
        by_name: dict[str, float] = {}
        for s, e, n in ks:
            by_name[n] = by_name.get(n, 0.0) + (e - s)
        per_step = lambda us: us / 1e3 / steps  # noqa: E731 - us over the trace -> ms a step
        devices[device] = dict(
            kernels=len(ks),
            span_ms=per_step(max(e for _, e, _ in ks) - min(s for s, _, _ in ks)),
            compute_ms=per_step(_length(comp)),
            collective_ms=per_step(_length(coll)),
            overlapped_ms=per_step(both),
            exposed_collective_ms=per_step(_length(coll) - both),
            top_kernels=[
                dict(name=n[:200], ms=per_step(t), collective=is_collective(n))
                for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
            ],
        )
    return dict(
        steps=steps,
        devices=devices,
        note=None
        if devices
        else "no device stream threads in the trace (CPU: the host "
        "runs the program; nothing to attribute)",
    )


def find_trace(log_dir: pathlib.Path) -> pathlib.Path | None:
    found = sorted(log_dir.rglob("*.trace.json.gz")) or sorted(
        log_dir.rglob("perfetto_trace.json.gz")
    )
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------
# The child: one configuration in its own process.


def mesh_shape(layout: str, n: int) -> tuple[int, int]:
    """(data, fsdp) of a layout over n devices."""
    if layout in ("single", "data"):
        return n, 1
    if layout == "fsdp":
        return 1, n
    raise ValueError(f"unknown layout {layout!r}; choose from {('single',) + LAYOUTS}")


def scaling_batches(*, rows: int, seq_len: int, count: int, dist: str, seed: int) -> list[dict]:
    """count packed batches of `rows` rows (the trainer's Batcher over a workload of whole
    documents, benchmarks/workloads.py); [{"arrays", "real", ...}]."""
    from train.data import cut_pieces

    tokens = int(1.1 * (count + 1) * rows * seq_len)
    for _ in range(4):
        w = workloads.make_workload(dist, tokens=tokens, seed=seed)
        batches = workloads.batches_for(
            "packed",
            cut_pieces(w["docs"], seq_len),
            seq_len=seq_len,
            rows=rows,
            single_bucket=64,
            seed=seed,
        )
        full = batches[:-1]  # the last one holds what was left
        if len(full) >= count:
            return full[:count]
        tokens *= 2
    raise RuntimeError(f"could not make {count} batches of {rows} x {seq_len}")


def child(spec: dict) -> None:
    import jax

    from train import sharding
    from train.config import MeshConfig

    t_proc = time.perf_counter()
    path = pathlib.Path(spec["result_path"])
    n, layout, preset = spec["n"], spec["layout"], spec["preset"]
    rec = dict(
        status="running",
        preset=preset,
        n=n,
        layout=layout,
        grad_reduce=spec["grad_reduce"],
        overlap=spec["overlap"],
        rows_per_device=spec["rows"],
        seq_len=spec["seq_len"],
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        date=harness.now(),
        git_commit=spec["git_commit"],
        command=spec["command"],
    )

    def save():
        harness.write_json(path, rec)

    devices = jax.devices()[:n]
    save()
    try:
        data, fsdp = mesh_shape(layout, n)
        mesh = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp), devices=devices)
        config = workloads.model_config(
            preset,
            backend=jax.default_backend(),
            dtype=spec["dtype"],
            scan_impl=spec["scan_impl"],
            remat=spec["remat"],
            overrides=spec["model_overrides"],
        )
        rec.update(
            mesh=dict(data=data, fsdp=fsdp),
            num_params=config.num_params(),
            compute_dtype=config.dtype,
            scan_impl=config.scan_impl,
            remat=config.remat,
            model_overrides=spec["model_overrides"],
            device_kind=devices[0].device_kind,
        )
        count = spec["warmup"] + spec["groups"] * spec["group"]
        batches = scaling_batches(
            rows=spec["rows"] * n,
            seq_len=spec["seq_len"],
            count=count,
            dist=spec["dist"],
            seed=spec["seed"],
        )
        setup = workloads.mesh_train_setup(config, mesh, grad_reduce=spec["grad_reduce"])
        state = setup.compiled.init(spec["seed"])
        dev_batches = [(setup.put_batch(b["arrays"]),) for b in batches]
        jax.block_until_ready((state, dev_batches))
        t0 = time.perf_counter()
        lowered = setup.compiled.train_step.lower(state, dev_batches[0][0])
        t1 = time.perf_counter()
        exe = lowered.compile()
        t2 = time.perf_counter()
        rec.update(
            lower_s=t1 - t0,
            compile_s=t2 - t1,
            memory_analysis=_memory_analysis(exe),
            collectives=sharding.collective_bytes(exe.as_text()),
        )
        save()
        print(f"[{spec['key']}] compiled: trace {t1 - t0:.1f}s, compile {t2 - t1:.1f}s", flush=True)
        timing = harness.time_calls(
            exe,
            dev_batches,
            state=state,
            warmup=spec["warmup"],
            groups=spec["groups"],
            per_group=spec["group"],
            keep_outputs=True,
        )
        state = timing.state
        losses = [float(m["loss"]) for m in timing.outputs]
        timed = [batches[i % len(batches)] for i in range(spec["warmup"], count)]
        real = sum(b["real"] for b in timed) / len(timed)
        slots = spec["rows"] * n * spec["seq_len"]
        med = timing.median_s
        peaks = [harness.device_memory(d)[0] for d in devices]
        rec.update(
            status="ok",
            step_time_s_median=med,
            step_times_s=timing.group_s,
            steps_per_group=spec["group"],
            timed_steps=spec["groups"] * spec["group"],
            warmup_steps=spec["warmup"],
            real_tokens_per_step=real,
            real_fraction=real / slots,
            tokens_per_s=real / med,
            tokens_per_s_per_device=real / med / n,
            peak_bytes_per_device=peaks,
            peak_bytes=max(peaks) if all(p is not None for p in peaks) else None,
            loss_timed=[losses[0], losses[-1]],
            finite_loss=all(math.isfinite(x) for x in losses),
        )
        save()
        print(
            f"[{spec['key']}] {1e3 * med:.2f} ms/step, {real / med:,.0f} tok/s "
            f"({real / med / n:,.0f} a device), peak "
            f"{'n/a' if rec['peak_bytes'] is None else f'{rec["peak_bytes"] / 2**30:.2f} GiB'}",
            flush=True,
        )
        if spec["profile"]:
            log_dir = pathlib.Path(tempfile.mkdtemp(prefix="scaling_profile_"))
            with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
                for i in range(spec["profile_steps"]):
                    state, metrics = exe(state, *dev_batches[i % len(dev_batches)])
                jax.block_until_ready((state, metrics))
            trace_file = find_trace(log_dir)
            if trace_file is None:
                rec["profile"] = dict(error=f"no trace file under {log_dir}")
            else:
                with gzip.open(trace_file, "rt") as f:
                    rec["profile"] = summarize_trace(json.load(f), spec["profile_steps"])
                shutil.copyfile(trace_file, spec["profile_copy"])
                rec["profile"]["trace_file"] = pathlib.Path(spec["profile_copy"]).name
                rec["profile"]["trace_bytes"] = trace_file.stat().st_size
            shutil.rmtree(log_dir, ignore_errors=True)
            save()
    except Exception as e:  # noqa: BLE001 - recorded, the parent goes on
        status = "oom" if is_oom(e) else "error"
        msg = f"{type(e).__name__}: {e}"
        print(f"[{spec['key']}] {status}: {msg[:2000]}", flush=True)
        if status == "error":
            traceback.print_exc()
        peaks = [harness.device_memory(d)[0] for d in devices]
        rec.update(status=status, error=msg[:4000], peak_bytes_per_device=peaks)
    rec["wall_s"] = time.perf_counter() - t_proc
    save()


# ------------------------------------------------------------------------------------------------
# The parent: plan, run children under the budget, merge, plot.


def child_env(*, overlap: bool, extra_flags: str, smoke: bool) -> dict:
    from train import sharding

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on shared hosts
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["PYTHONPATH"] = str(harness.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    flags = list(extra_flags.split())
    if smoke and "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        flags.append(f"--xla_force_host_platform_device_count={SMOKE_DEVICES}")
    if overlap:
        flags += sharding.OVERLAP_XLA_FLAGS
    sharding.add_xla_flags(flags, env)
    return env


def probe(env: dict) -> tuple[harness.DeviceInfo, int]:
    """The device and the local device count, from a short child."""
    code = (
        "import dataclasses, json, jax; from benchmarks import harness; "
        "print(json.dumps(dict(info=dataclasses.asdict(harness.device_info()), "
        "count=jax.local_device_count())))"
    )
    env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=harness.REPO,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"device probe failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return harness.DeviceInfo(**got["info"]), got["count"]


def run_child(spec: dict, env: dict, tmpdir: pathlib.Path, timeout: float) -> dict:
    spec_path = tmpdir / f"spec_{len(list(tmpdir.iterdir()))}.json"
    rec, killed, returncode = harness.run_script_child(__file__, spec, spec_path, env, timeout)
    rec = rec or {}
    if rec.get("status") in (None, "running"):
        rec.update(
            status="timeout" if killed else "error",
            reason="killed at the time budget"
            if killed
            else f"child exited with {returncode} before finishing",
        )
    return rec


def record_key(preset: str, layout: str, grad_reduce: str, overlap: str, n: int) -> str:
    return f"{preset}/{layout}/{grad_reduce}/overlap-{overlap}/{n}"


def plan(presets, counts, layouts, reduces, overlaps) -> list[dict]:
    """Configurations in the order run: per preset and overlap setting, the 1-device baseline
    first (layout "single", grad_reduce auto; an explicit grad_reduce asked for also runs on
    one device: its cost without communication), then each n > 1 with every layout x
    grad_reduce."""
    out = []
    for preset, overlap in itertools.product(presets, overlaps):
        for n in counts:
            if n == 1:
                combos = [("single", r) for r in ("auto", *(r for r in reduces if r != "auto"))]
            else:
                combos = itertools.product(layouts, reduces)
            for layout, reduce in combos:
                out.append(
                    dict(
                        preset=preset,
                        n=n,
                        layout=layout,
                        grad_reduce=reduce,
                        overlap=overlap,
                        key=record_key(preset, layout, reduce, overlap, n),
                    )
                )
    return out


def settings_match(rec: dict, settings: dict) -> bool:
    return all(rec.get("settings", {}).get(k) == v for k, v in settings.items())


def add_efficiency(records: dict) -> None:
    """efficiency = tokens_per_s / (n x the 1-device tokens_per_s) for every ok record with a
    1-device record of the same preset, overlap and settings; prefers one of the same
    invocation. The record's "baseline" names the one used."""
    for _key, rec in records.items():
        rec.pop("efficiency", None)
        rec.pop("baseline", None)
        if rec.get("status") != "ok":
            continue
        base_key = record_key(rec["preset"], "single", "auto", rec["overlap"], 1)
        base = records.get(base_key)
        if not base or base.get("status") != "ok" or base.get("settings") != rec.get("settings"):
            continue
        rec["efficiency"] = rec["tokens_per_s"] / (rec["n"] * base["tokens_per_s"])
        rec["baseline"] = dict(
            key=base_key,
            tokens_per_s=base["tokens_per_s"],
            same_invocation=base.get("invocation") == rec.get("invocation"),
            date=base.get("date"),
            git_commit=base.get("git_commit"),
        )


def plot(results: dict, path: pathlib.Path, *, dpi: int = 110) -> pathlib.Path | None:
    """Efficiency and step time against the device count, a column per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["records"].values() if r.get("status") == "ok"]
    presets = [p for p in (*PRESETS, "tiny") if any(r["preset"] == p for r in ok)]
    if not presets:
        return None
    fig, axes = plt.subplots(2, len(presets), figsize=(4.8 * len(presets), 7), squeeze=False)
    for col, preset in enumerate(presets):
        mine = [r for r in ok if r["preset"] == preset]
        single = {(r["grad_reduce"], r["overlap"]): r for r in mine if r["n"] == 1}
        lines = sorted({(r["layout"], r["grad_reduce"], r["overlap"]) for r in mine if r["n"] > 1})
        ax_e, ax_t = axes[0][col], axes[1][col]
        for layout, reduce, overlap in lines:
            pts = sorted(
                [
                    (r["n"], r)
                    for r in mine
                    if (r["layout"], r["grad_reduce"], r["overlap"]) == (layout, reduce, overlap)
                ],
                key=lambda t: t[0],
            )
            first = single.get((reduce, overlap)) or single.get(("auto", overlap))
            if first is not None:  # the line starts from its own mode on one device
                pts = [(1, first)] + pts
            label = f"{layout}, {reduce}, overlap {overlap}"
            xs = [n for n, _ in pts]
            ax_e.plot(
                xs,
                [100 * (r.get("efficiency") or (1.0 if n == 1 else float("nan"))) for n, r in pts],
                marker="o",
                label=label,
            )
            ax_t.plot(xs, [1e3 * r["step_time_s_median"] for _, r in pts], marker="o", label=label)
        if preset in TARGETS:
            ax_e.axhline(
                100 * TARGETS[preset],
                color="gray",
                ls="--",
                lw=1,
                label=f"target {100 * TARGETS[preset]:.0f}%",
            )
        rows, seq = (mine[0]["rows_per_device"], mine[0]["seq_len"])
        ax_e.set_title(f"{preset}: {rows} x {seq} rows a device")
        ax_e.set_ylabel("per-device efficiency (%)")
        ax_e.set_ylim(0, 110)
        ax_t.set_ylabel("step time (ms, median)")
        for ax in (ax_e, ax_t):
            ax.set_xlabel("devices")
            ax.set_xticks(sorted({r["n"] for r in mine}))
            ax.grid(alpha=0.3)
        ax_e.legend(fontsize=7)
    dev = results.get("device") or "?"
    fig.suptitle(f"Training scaling on {dev} (commit {str(results.get('git_commit'))[:7]})")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def print_summary(results: dict, keys: list[str]) -> None:
    print(
        "\n| preset | layout | grad_reduce | overlap | n | status | ms/step | tok/s | tok/s/dev "
        "| efficiency | peak GiB/dev | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for key in keys:
        r = results["records"].get(key)
        if r is None:
            continue
        if r.get("status") != "ok":
            print(
                f"| {r['preset']} | {r['layout']} | {r['grad_reduce']} | {r['overlap']} | {r['n']} "
                f"| {r.get('status')} | | | | | | |"
            )
            continue
        eff = "n/a" if r.get("efficiency") is None else f"{100 * r['efficiency']:.1f}%"
        peak = "n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.1f}"
        print(
            f"| {r['preset']} | {r['layout']} | {r['grad_reduce']} | {r['overlap']} | {r['n']} | ok "
            f"| {1e3 * r['step_time_s_median']:.1f} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s_per_device']:,.0f} | {eff} | {peak} | {r['compile_s']:.1f} |"
        )


def parse_list(ap, name: str, text: str, allowed) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        ap.error(f"--{name}: {bad or 'none given'}; choose from {list(allowed)}")
    return items


def parse_args(argv):
    ap = harness.argument_parser(__doc__)
    ap.add_argument(
        "--presets",
        default=None,
        help=f"comma list (default {','.join(DEFAULT_PRESETS)}; smoke: tiny)",
    )
    ap.add_argument(
        "--counts",
        default=None,
        help="device counts, comma list (default 1, 2, 4, ... up to the local "
        "device count, and the count itself)",
    )
    ap.add_argument(
        "--layouts", default="data", help=f"comma list of {list(LAYOUTS)} (default data)"
    )
    ap.add_argument(
        "--grad-reduce", default="auto", help=f"comma list of {list(GRAD_REDUCE)} (default auto)"
    )
    ap.add_argument("--overlap", default="off", help=f"comma list of {list(OVERLAP)} (default off)")
    ap.add_argument(
        "--xla-flags",
        default="",
        help="more XLA flags for every child (added to XLA_FLAGS; a flag already "
        "there keeps its value)",
    )
    ap.add_argument("--rows", type=int, default=None, help="rows a device (default 8; smoke 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="row length (default 2048; smoke 64)")
    ap.add_argument(
        "--dist",
        default="corpus",
        choices=workloads.DISTS,
        help="workload the packed rows come from (default corpus)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; smoke 1)")
    ap.add_argument("--groups", type=int, default=None, help="timed groups (default 5; smoke 2)")
    ap.add_argument(
        "--group", type=int, default=None, help="back-to-back steps a group (default 2; smoke 1)"
    )
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on GPU)")
    ap.add_argument("--scan-impl", default="auto")
    harness.add_layer_args(ap, scan_layers=False)
    ap.add_argument(
        "--model",
        default=None,
        help=f"MambaConfig overrides for every preset (smoke: {SMOKE_MODEL})",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="trace --profile-steps steps of the configurations with n in "
        "--profile-counts (jax.profiler) and summarize the device time",
    )
    ap.add_argument("--profile-counts", default="2")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="persistent compilation cache for the children (default none: "
        "compile_s is a first compile)",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=540.0,
        help="seconds for this whole invocation (default 540)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="skip configurations already ok in the result file with these settings",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="start a new result file (the old one moves to history/ if it was "
        "made at another commit)",
    )
    args = ap.parse_args(argv)
    presets = parse_list(
        ap,
        "presets",
        args.presets or ("tiny" if args.smoke else ",".join(DEFAULT_PRESETS)),
        PRESETS + ("tiny",),
    )
    layouts = parse_list(ap, "layouts", args.layouts, LAYOUTS)
    reduces = parse_list(ap, "grad-reduce", args.grad_reduce, GRAD_REDUCE)
    overlaps = parse_list(ap, "overlap", args.overlap, OVERLAP)
    counts = None
    for name in ("counts", "profile_counts"):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            value = sorted({int(t) for t in text.split(",") if t})
        except ValueError:
            value = []
        if not value or value[0] < 1:
            ap.error(
                f"--{name.replace('_', '-')}: expected a comma list of positive ints, got {text!r}"
            )
        setattr(args, name, value)
    counts = args.counts
    for name in ("rows", "seq_len", "groups", "group", "profile_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup is not None and args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    return ap, args, presets, counts, layouts, reduces, overlaps


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_child"]:
        child(json.loads(pathlib.Path(argv[1]).read_text()))
        return 0
    ap, args, presets, counts, layouts, reduces, overlaps = parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.time_budget - 10.0  # leave time to merge, plot and write
    smoke = args.smoke

    def default(value, full, small):
        return value if value is not None else (small if smoke else full)

    base_env = child_env(overlap=False, extra_flags=args.xla_flags, smoke=smoke)
    if args.cache_dir:
        base_env.update(
            JAX_COMPILATION_CACHE_DIR=args.cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
    info, host_devices = probe(base_env)
    if counts is None:
        counts = sorted(
            {2**k for k in range(host_devices.bit_length()) if 2**k <= host_devices}
            | {host_devices}
        )
    elif counts[-1] > host_devices:
        ap.error(f"--counts {','.join(map(str, counts))}: this host has {host_devices} devices")
    settings = dict(
        rows=default(args.rows, 8, 2),
        seq_len=default(args.seq_len, 2048, 64),
        dist=args.dist,
        seed=args.seed,
        warmup=default(args.warmup, 2, 1),
        groups=default(args.groups, 5, 2),
        group=default(args.group, 2, 1),
        dtype=args.dtype,
        scan_impl=args.scan_impl,
        remat=args.remat,
        model_overrides=workloads.parse_overrides(default(args.model, "", SMOKE_MODEL)),
        xla_flags=args.xla_flags,
    )
    commit = harness.git_commit()
    head = harness.header(info, script=__file__, argv=argv, commit=commit)
    out = harness.result_path(
        "scaling", info.slug, f"{host_devices}dev" + ("_smoke" if smoke else ""), out_dir=args.out
    )
    png = out.with_name(out.stem + "_scaling.png")
    if args.fresh:
        for moved in harness.retire(out, commit=commit, companions=[png]):
            print(f"bench_scaling: --fresh: moved {moved}", flush=True)
    results = dict(schema=SCHEMA, records={}, invocations=[])
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("schema") == SCHEMA:
            results = old
        else:
            print(f"bench_scaling: {out} has another schema; starting it afresh", flush=True)
    results.update(head, host_devices=host_devices)
    invocation = head["date"]
    configs = plan(presets, counts, layouts, reduces, overlaps)
    print(
        f"bench_scaling: {host_devices} x {info.kind}; {len(configs)} configurations "
        f"(presets {presets}, counts {counts}, layouts {layouts}, grad_reduce {reduces}, "
        f"overlap {overlaps}); budget {args.time_budget:.0f}s; -> {out}",
        flush=True,
    )

    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    for cfg in configs:
        key = cfg["key"]
        old = results["records"].get(key)
        if args.resume and old and old.get("status") == "ok" and settings_match(old, settings):
            print(f"[{key}] already ok in {out} (--resume): not run again", flush=True)
            continue
        left = deadline - time.time()
        if left < 20.0:
            results["records"][key] = dict(
                cfg,
                status="skipped",
                reason="time budget (not started)",
                settings=settings,
                invocation=invocation,
            )
            print(f"[{key}] skipped: {left:.0f}s left", flush=True)
            continue
        slug = key.replace("/", "_").replace(".", "p")
        spec = dict(
            settings,
            **cfg,
            rows=settings["rows"],
            command=head["command"],
            git_commit=commit,
            profile=args.profile and cfg["n"] in args.profile_counts,
            profile_steps=args.profile_steps,
            profile_copy=str(out.with_name(f"{out.stem}_profile_{slug}.json.gz")),
        )
        env = child_env(overlap=cfg["overlap"] == "on", extra_flags=args.xla_flags, smoke=smoke)
        if args.cache_dir:
            env.update({k: base_env[k] for k in base_env if k.startswith("JAX_")})
        print(f"[{key}] start ({left:.0f}s left)", flush=True)
        rec = run_child(spec, env, tmpdir, left)
        rec.update(
            key=key,
            preset=cfg["preset"],
            n=cfg["n"],
            layout=cfg["layout"],
            grad_reduce=cfg["grad_reduce"],
            overlap=cfg["overlap"],
            settings=settings,
            invocation=invocation,
        )
        rec.setdefault("rows_per_device", settings["rows"])
        rec.setdefault("seq_len", settings["seq_len"])
        results["records"][key] = rec
        add_efficiency(results["records"])
        harness.write_json(out, results)
    shutil.rmtree(tmpdir, ignore_errors=True)
    add_efficiency(results["records"])
    results["invocations"] = (
        results.get("invocations", [])
        + [
            dict(
                date=head["date"],
                command=head["command"],
                git_commit=commit,
                wall_s=time.time() - t_start,
                settings=settings,
                configurations=[c["key"] for c in configs],
            )
        ]
    )[-50:]
    harness.write_json(out, results)
    drawn = plot(results, png, dpi=60 if smoke else 110)
    print_summary(results, [c["key"] for c in configs])
    print(
        f"bench_scaling: wrote {out}"
        + (f" and {drawn}" if drawn else "")
        + f" ({time.time() - t_start:.0f}s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
