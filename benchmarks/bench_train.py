"""Training throughput, packed vs padded vs one sequence per step (and the long-document modes),
on the same documents.

    PYTHONPATH=. python3 benchmarks/bench_train.py                      # everything (9 min budget)
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets 1.4b --modes packed,padded
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets 130m,370m --resume
    PYTHONPATH=. python3 benchmarks/bench_train.py --smoke --out DIR     # CPU check, seconds
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets mamba2-1.3b --modes packed
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets hybrid-1b --modes packed --rows 8
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets mamba2-1.3b,1.4b \
        --modes packed,link,link_across_steps --dists corpus    # --data.long_docs' step costs

Results merge into --out/train_<slug>.json (default benchmarks/results/train_nvidia-h200.json on
an H200; --smoke: train_<slug>_smoke.json). On a machine whose output folder is what comes back
from a time-limited call, copy the current result into that folder first and pass it as --out:
the run merges into the copy after every record, so a call cut at its time limit still returns
what it measured; `python -m benchmarks.harness install` puts the file back.

Presets: the Mamba1 ones (130m ... 2.8b, the default set; tiny) and the Mamba2 ones (mamba2-130m
... mamba2-2.7b; mamba2-tiny), train.config's names; Mamba2 trains through the same step. --anchor
(mamba_ssm's Mamba1 train_torch.py) takes Mamba1 presets only: mamba_ssm's Mamba2 step is
benchmarks/anchor_mamba2.py's.

What is measured, per model preset x batching mode x length distribution: steady-state training
throughput in REAL tokens/s (padding never counts), median step time, peak device memory and MFU
(model FLOPs of the real tokens / the device's dense bf16 peak, train/metrics.py).

Workloads (benchmarks/workloads.py; the same token documents in every mode; host-side,
deterministic from --seed):
  corpus    the training program's default corpus (the Python standard library's .py files, byte
            tokens, EOD 256 after each); whole documents in a seeded random order until
            --workload-tokens are reached. (Most of its tokens sit in files longer than 2048
            bytes, so its pieces are mostly full rows.)
  instruct  a long-tailed mix typical of instruction data: lognormal document lengths, median
            300 tokens, sigma 1.0 (p90 ~1,080, p99 ~3,070), clipped to [16, 8192], until
            --workload-tokens are reached; the content is cut from the stdlib byte stream.
  Documents longer than the row length (--seq-len) are cut into pieces of at most --seq-len
  tokens (train.data.cut_pieces), as the trainer does. Histograms of the document lengths (bin
  counts and tokens per bin, log2 bins) go into the JSON; plot_train.py draws them.

Modes (train.data.Batcher, the trainer's own batching; the first three consume the same pieces,
the link modes the same documents whole, as the trainer's --data.long_docs does):
  packed  pieces packed into --rows rows of --seq-len tokens (first-fit-decreasing, segment resets)
  padded  one piece per row, each padded to --seq-len (the row length, not the longest in the
          batch: one compiled shape, as the trainer does; the JSON also gives the real-token
          fraction padding to the longest piece of each batch would have had, for reference)
  single  one piece per step, padded to a multiple of --single-bucket (bounds recompiles)
  link    --data.long_docs=link: the documents laid end to end over the rows, a document that
          crosses a row edge going on from the previous row's end state ("continues"); the
          step is packed's program with the links (JSON: linked_documents, longest_chain)
  link_across_steps
          --data.long_docs=link_across_steps (truncated backprop through time): every row a
          stream of its own, its last document going on in the same row of the next step from
          the state the step carries (TrainState.carry: every layer's conv and SSM end state of
          every row; train.step.carried_losses), as the trainer builds it (train.step.build with
          carry_rows = --rows, stream_groups = --stream-groups: G groups of row streams, step m
          serving group m mod G, the carry holding all G). The streams wrap round the
          documents as the trainer's do (workloads.carried_batches), so no row is ever padded
          (checked: real tokens = slots); its steps are as many as the workload's tokens fill
          (a finite stream's tail, rows emptying one by one, is no training run's). The timed
          steps are its first --warmup + --steps in order, each distribution's from a zero
          carry, the state passed from step to step as in training. JSON: carry_bytes and
          carry_shapes; continuing_rows (rows that start from the carry, over its steps) and
          continuing_rows_timed of rows_timed (over the timed steps); documents_begun,
          longest_document_rows (most micro-batch rows one document has spanned);
          carry_nonzero (the carry after the timing holds end states).

How time is measured (benchmarks/harness.py time_calls, rotating over the workload's batches):
the workload is batched on the host once; every step shape is compiled ahead of time (compile
time recorded separately). After --warmup untimed steps, --steps steps are timed in groups of
--group back-to-back steps, blocking on the new state and the metrics at the group's end;
batches are already on the device; the state is donated, so the steps run in order on the device
while the host dispatches the next, as in the trainer. A step's time is the median over groups
of the group's time / --group. A mode's time for the WHOLE workload is its number of steps x the
median step time of their shape, and tokens/s = the workload's real tokens / that time
(link_across_steps: its steps' real tokens / their time); packed
and padded steps all have one shape. In single mode each length bucket is its own shape (its own
compile): --single-measure of the buckets present in either distribution are measured (the
shortest, the longest, then those with the most steps; 0 = all) and the others interpolated
linearly in length; the JSON says which, and what share of the steps they carry. Real tokens are
counted from the batches' segment_ids and, in packed and link mode, checked against the workload's
token count (link_across_steps: against its slots, at least the workload's tokens).

Processes and memory (why this script times in child processes): each (preset, group) runs in
its own subprocess, so its peak memory is its own (device.memory_stats()["peak_bytes_in_use"];
XLA's compiled memory_analysis is recorded too), a run out of memory cannot take the others with
it, and a child past the time budget can be killed. The parent never touches the accelerator
(it asks a short child for the device). Group "rows" = packed and padded (both distributions):
they run the identical compiled program (same shapes), so they share one compile and their peak
is that program's (run --modes packed and --modes padded in separate invocations to see each
alone; link too). Group "carried" = link_across_steps: another program and another state.
Group "single" = the single mode (both distributions); its peak is that of its largest
bucket. A configuration that runs out of memory is recorded as "oom"; rows mode is then retried
with half the rows (down to 1; --no-oom-retry disables), carried too. The children set
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless set.

Time budget: --time-budget seconds for the whole invocation (default 540: fits a 10-minute
device call with start-up to spare). A child gets the time left; it skips compiles it cannot
fit (a compile is predicted from the last one, the first from --compile-guess) and is killed at
the deadline; whatever did not run is recorded as "skipped" or "timeout". Split a full run over
several calls with --presets, --modes and --dists, or repeat one command with --resume (it skips
what is already ok with the same settings). Each invocation merges its records (keyed
preset/mode/dist) into the result file, whose top level has the harness header of the latest
invocation (device, jax version, date, git commit, command; every record and invocation keeps
its own); --fresh starts a new file instead, the old one (and its plots) moving to history/.
plot_train.py makes the plots and the README table from it. --trace DIR: after each (non-single)
mode's timing, 3 more steps run under jax.profiler (DIR/<preset>_<mode>_<dist>) and the record
gains "trace": the step's GPU kernel ms by part (benchmarks/step_parts.py, as
profile_torch_step.py classifies mamba_ssm's), its top kernels and source lines. --anchor DIR also runs DIR/train_torch.py
(the mamba_ssm side, its full 8-row batches; harness.run_anchor: DIR/train_torch.py FILE
P:8:L,..., with --anchor-pythonpath as its PYTHONPATH) in the same call, its JSON under "anchor".

Defaults: rows of 2048 tokens; rows per step 8 (the mamba_ssm anchors' 8 x 2048) except 2.8b and
mamba2-2.7b: 4 (--rows 2.8b=8 to try more); released vocabulary 50277 (byte ids use the first
257) so FLOPs match mamba_ssm's; bf16 compute, float32 params, AdamW (train/step.py), scan impl
auto (Pallas on GPU); 1M-token workloads; 2 warm-up + 12 timed steps in groups of 2; single
mode: buckets of 256, 4 of them measured, 1 warm-up + 8 timed steps each; one group of row
streams (--stream-groups 1). --smoke: the "tiny"
preset (or --presets mamba2-tiny) with one layer of width 32 (--presets hybrid-tiny: as it is),
rows of 128, 2 rows, 6k-token workloads, buckets of 64 (all measured), 2 timed steps one by one,
1 warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from benchmarks import harness, workloads
from benchmarks.workloads import DISTS, MODES

PRESETS = ("130m", "370m", "790m", "1.4b", "2.8b")
MAMBA2_PRESETS = ("mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b")
# The packed hybrid (HybridConfig: Mamba2 + attention + MLP, Bamba-like) trains through the same
# step: --presets hybrid-1b --modes packed --rows 8 times it at 8 x 2048.
# Mamba-3 (reference scan, no kernel yet): --presets mamba3-1.5b --modes packed --rows 8.
KNOWN_PRESETS = (
    PRESETS
    + ("tiny",)
    + MAMBA2_PRESETS
    + ("mamba2-tiny", "hybrid-1b", "hybrid-tiny", "mamba3-1.5b", "mamba3-tiny")
)
GROUP_OF = {
    "packed": "rows",
    "padded": "rows",
    "single": "single",
    "link": "rows",
    # Its own child: the carried step is another program with another state (the carry), and
    # its peak memory is then its own.
    "link_across_steps": "carried",
}
GROUPS = ("rows", "carried", "single")  # the order the children run in
DEFAULT_MODES = ("packed", "padded", "single", "link")  # link_across_steps when asked for
DEFAULT_ROWS = {
    "130m": 8,
    "370m": 8,
    "790m": 8,
    "1.4b": 8,
    "2.8b": 4,
    "tiny": 2,
    **{p: 8 for p in MAMBA2_PRESETS},
    "mamba2-2.7b": 4,
    "mamba2-tiny": 2,
    "hybrid-1b": 8,
    "hybrid-tiny": 2,
    "mamba3-1.5b": 8,
    "mamba3-tiny": 2,
}
SMOKE_MODEL = "n_layer=1,d_model=32,d_state=4"
# hybrid-tiny is already CPU-sized (and HybridConfig has no n_layer): --smoke runs it as it is.
HYBRID_SMOKE_MODEL = ""
SCHEMA = 1
# The mamba_ssm side (the --anchor folder): its script and the rows of its full batch.
ANCHOR_SCRIPT = "train_torch.py"
ANCHOR_ROWS = 8


# ------------------------------------------------------------------------------------------------
# The child: one preset, one group of modes, in its own process.


def is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return any(
        k in s
        for k in (
            "RESOURCE_EXHAUSTED",
            "Out of memory",
            "out of memory",
            "OutOfMemory",
            "Resource exhausted",
        )
    )


def _memory_analysis(exe):
    try:
        m = exe.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def pick_measured(steps_per_bucket: dict[int, int], k: int) -> list[int]:
    """k buckets to measure, in the order to measure them (what the time budget cuts last
    matters least): the shortest, the longest, then those with the most steps (k <= 0: all).
    The others are interpolated linearly in length between measured ones."""
    buckets = sorted(steps_per_bucket)
    order = (
        buckets[:1]
        + buckets[-1:] * (len(buckets) > 1)
        + sorted(buckets[1:-1], key=lambda b: (-steps_per_bucket[b], b))
    )
    return order if k <= 0 else order[:k]


def child(spec: dict) -> None:
    """Runs spec's (preset, group) and writes records to spec["result_path"] as it goes."""
    import jax

    from train.data import cut_pieces
    from train.metrics import mfu, peak_flops
    from train.step import NEXT_GROUP

    t_proc = time.perf_counter()
    deadline = spec["deadline"]
    result = dict(records={}, info={})
    path = pathlib.Path(spec["result_path"])

    def save():
        harness.write_json(path, result)

    def peak_bytes():
        return harness.device_memory(dev)[0]

    dev = jax.devices()[0]
    backend = jax.default_backend()
    peak = peak_flops(dev.device_kind) if backend != "cpu" else None
    result["info"] = dict(
        device_kind=dev.device_kind,
        backend=backend,
        jax_version=jax.__version__,
        peak_flops_per_device=peak,
    )
    preset, group, rows, seq_len = spec["preset"], spec["group"], spec["rows"], spec["seq_len"]
    modes = [m for m in spec["modes"] if GROUP_OF[m] == group]
    groups = spec["stream_groups"] if group == "carried" else None
    base = dict(
        preset=preset,
        seq_len=seq_len,
        rows=1 if group == "single" else rows,
        single_bucket=spec["single_bucket"] if group == "single" else None,
        **({"stream_groups": groups} if group == "carried" else {}),
        attempt_rows=rows,
        date=harness.now(),
        command=spec["command"],
        git_commit=spec["git_commit"],
    )

    def put(mode, dist, **rec):
        result["records"][f"{preset}/{mode}/{dist}"] = {**base, "mode": mode, "dist": dist, **rec}
        save()

    def put_all(status, **rec):
        for mode in modes:
            for dist in spec["dists"]:
                key = f"{preset}/{mode}/{dist}"
                if key not in result["records"] or result["records"][key]["status"] != "ok":
                    put(mode, dist, status=status, **rec)

    try:
        model_config = workloads.model_config(
            preset,
            backend=backend,
            dtype=spec["dtype"],
            scan_impl=spec["scan_impl"],
            conv_impl=spec["conv_impl"],
            remat=spec["remat"],
            scan_layers=spec["scan_layers"],
            overrides=spec["model_overrides"],
        )
        flops = model_config.flops_per_token()
        base.update(
            num_params=model_config.num_params(),
            flops_per_token=flops,
            compute_dtype=model_config.dtype,
            scan_impl=model_config.scan_impl,
            conv_impl=model_config.conv_impl,
            remat=model_config.remat,
            scan_layers=model_config.scan_layers,
            model_overrides=spec["model_overrides"],
            n_layer=model_config.n_layer,
            d_model=model_config.d_model,
            vocab_size=model_config.vocab_size,
        )
        corpus = workloads.stdlib_corpus()
        work = {}
        for dist in spec["dists"]:
            w = workloads.make_workload(
                dist, tokens=spec["workload_tokens"], seed=spec["seed"], corpus=corpus
            )
            pieces = cut_pieces(w["docs"], seq_len)
            work[dist] = dict(
                tokens=w["info"]["num_tokens"],
                pieces=pieces,
                batches={
                    m: workloads.batches_for(
                        m,
                        w["docs"] if m == "link" else pieces,
                        seq_len=seq_len,
                        rows=rows,
                        single_bucket=spec["single_bucket"],
                        seed=spec["seed"],
                    )
                    for m in modes
                    if m != "link_across_steps"
                },
            )
            if "link_across_steps" in modes:
                # Whole documents, one stream per row, wrapping round as in training: the steps
                # that serve the workload's tokens (it times the first `calls` of them, in
                # order: more if the workload is shorter than that).
                per = spec["steps_per_group"]
                calls = spec["warmup"] + max(1, -(-spec["steps"] // per)) * per
                steps = -(-w["info"]["num_tokens"] // (rows * seq_len))
                carried = workloads.carried_batches(
                    w["docs"],
                    seq_len=seq_len,
                    rows=rows,
                    seed=spec["seed"],
                    groups=groups,
                    steps=max(steps, calls),
                )
                work[dist]["batches"]["link_across_steps"] = carried[:steps]
                work[dist]["timed_batches"] = carried[:calls]
        print(
            f"[{preset} {group}] workloads batched in {time.perf_counter() - t_proc:.1f}s",
            flush=True,
        )

        setup = workloads.train_setup(
            model_config,
            dev,
            carry_rows=rows if group == "carried" else None,
            stream_groups=groups or 1,
        )
        compiled = setup.compiled
        t0 = time.perf_counter()
        state = compiled.init(spec["seed"])
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        if group == "carried":
            carry = compiled.abstract_state.carry
            base.update(
                carry_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry)),
                carry_shapes={k: [list(v.shape), str(v.dtype)] for k, v in carry.items()},
            )
        execs: dict[tuple, dict] = {}
        last_compile = [spec["compile_guess_s"]]

        def executable(shape_batch):
            # link batches also hold "continues": another program for the same shape.
            shape = (*shape_batch["tokens"].shape, *sorted(shape_batch))
            if shape not in execs:
                t0 = time.perf_counter()
                lowered = compiled.train_step.lower(state, shape_batch)
                t1 = time.perf_counter()
                exe = lowered.compile()
                t2 = time.perf_counter()
                execs[shape] = dict(
                    exe=exe,
                    lower_s=t1 - t0,
                    compile_s=t2 - t1,
                    memory_analysis=_memory_analysis(exe),
                )
                last_compile[0] = t2 - t0
                print(
                    f"[{preset} {group}] compiled {shape}: trace {t1 - t0:.1f}s, compile "
                    f"{t2 - t1:.1f}s",
                    flush=True,
                )
            return execs[shape]

        def time_steps(exe, batches, n_warm, n_timed, group):
            """Per-step seconds of each group of `group` back-to-back steps (blocking at the
            group's end, so host dispatch overlaps the device as in the trainer), and losses;
            the steps rotate over the workload's first batches (on the device beforehand)."""
            nonlocal state
            n_groups = max(1, -(-n_timed // group))
            dev_batches = [
                (setup.put_batch(b["arrays"]),)
                for b in batches[: max(1, min(len(batches), n_warm + n_groups * group))]
            ]
            if state.carry is not None:
                # Row streams start empty, as a training run's: a zero carry, group 0 next
                # (another distribution's steps may have run before).
                state = dataclasses.replace(
                    state, carry=jax.tree.map(jax.numpy.zeros_like, state.carry)
                )
            timing = harness.time_calls(
                exe,
                dev_batches,
                state=state,
                warmup=n_warm,
                groups=n_groups,
                per_group=group,
                keep_outputs=True,
            )
            state = timing.state
            return timing, [float(m["loss"]) for m in timing.outputs]

        def trace_steps(exe, batches, trace_dir, n=3):
            """The step's GPU kernel time by part (benchmarks/step_parts.py) and its top
            kernels and source lines, from a jax.profiler trace of n steps after the timing."""
            nonlocal state
            from benchmarks.breakdown import hlo_sources, trace_summary

            dev_batches = [setup.put_batch(b["arrays"]) for b in batches[:n]]
            dev_batches += dev_batches[:1] * (n - len(dev_batches))
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                for b in dev_batches:
                    state, _ = exe(state, b)
                jax.block_until_ready(state)
            summary = trace_summary(trace_dir, n, hlo_sources(exe.as_text()))
            summary.pop("top_kernel_args", None)
            summary["by_source_ms_per_step"] = summary.get("by_source_ms_per_step", [])[:30]
            print(
                f"[{preset}] trace {trace_dir.name}: "
                + json.dumps(summary.get("parts_ms_per_step", summary.get("error")))[:600],
                flush=True,
            )
            return summary

        want_all = None

        def fits(extra_s):
            return time.time() + extra_s < deadline

        for mode in modes:
            for dist in spec["dists"]:
                batches = work[dist]["batches"][mode]
                real = sum(b["real"] for b in batches)
                slots = sum(b["slots"] for b in batches)
                stats = dict(
                    workload_tokens=work[dist]["tokens"],
                    real_tokens=real,
                    slots=slots,
                    steps=len(batches),
                    pieces=len(work[dist]["pieces"]),
                    real_fraction=real / slots,
                    padding_fraction=1 - real / slots,
                    init_s=init_s,
                )
                if mode == "link":
                    stats.update(
                        linked_documents=sum(b["linked"] for b in batches),
                        longest_chain=max(b["longest_chain"] for b in batches),
                    )
                if mode == "link_across_steps":
                    # The rows, over the steps and over the timed ones, whose state the step
                    # carries in from the previous micro-batch (of the row's group).
                    timed = work[dist]["timed_batches"][spec["warmup"] :]
                    stats.update(
                        documents_begun=sum(b["sequences"] for b in batches),
                        continuing_rows=sum(b["continuing"] for b in batches),
                        continuing_rows_timed=sum(b["continuing"] for b in timed),
                        rows_timed=rows * len(timed),
                        longest_document_rows=batches[-1]["longest_document_rows"],
                    )
                    if real != slots or real < work[dist]["tokens"]:
                        raise AssertionError(
                            f"row streams hold {real} real tokens in {slots} slots, the "
                            f"workload {work[dist]['tokens']}: a wrapping stream never pads"
                        )
                if mode in ("packed", "link") and real != work[dist]["tokens"]:
                    raise AssertionError(
                        f"packed batches hold {real} real tokens, the workload "
                        f"{work[dist]['tokens']}"
                    )
                if mode == "padded":
                    longest = sum(rows * b["longest"] for b in batches)
                    stats["real_fraction_pad_to_longest"] = real / longest
                if mode != "single":
                    if not execs and not fits(last_compile[0]) or not fits(5.0):
                        put(mode, dist, status="skipped", reason="time budget", **stats)
                        continue
                    e = executable(batches[0]["arrays"])
                    timing, losses = time_steps(
                        e["exe"],
                        work[dist]["timed_batches"] if mode == "link_across_steps" else batches,
                        spec["warmup"],
                        spec["steps"],
                        spec["steps_per_group"],
                    )
                    med, times = timing.median_s, timing.group_s
                    total = len(batches) * med
                    step_shape = list(batches[0]["arrays"]["tokens"].shape)
                    rec = dict(
                        status="ok",
                        step_shape=step_shape,
                        step_time_s_median=med,
                        step_times_s=times,
                        steps_per_group=spec["steps_per_group"],
                        timed_steps=len(times) * spec["steps_per_group"],
                        warmup_steps=spec["warmup"],
                        est_total_s=total,
                        compile_s=e["compile_s"],
                        lower_s=e["lower_s"],
                        memory_analysis=e["memory_analysis"],
                    )
                    if spec["trace"] and fits(60.0):
                        rec["trace"] = trace_steps(
                            e["exe"],
                            work[dist]["timed_batches"] if mode == "link_across_steps" else batches,
                            pathlib.Path(spec["trace"]) / f"{preset}_{mode}_{dist}",
                        )
                    if mode == "link_across_steps":  # the end states did come back
                        rec["carry_nonzero"] = all(
                            bool(jax.numpy.any(v != 0))
                            for k, v in state.carry.items()
                            if k != NEXT_GROUP
                        )
                else:
                    by_bucket: dict[int, list] = {}
                    for b in batches:
                        by_bucket.setdefault(int(b["arrays"]["tokens"].shape[-1]), []).append(b)
                    buckets = sorted(by_bucket)
                    if want_all is None:  # one choice for every distribution: shared compiles
                        counts: dict[int, int] = {}
                        for d in spec["dists"]:
                            for b in work[d]["batches"]["single"]:
                                L = int(b["arrays"]["tokens"].shape[-1])
                                counts[L] = counts.get(L, 0) + 1
                        want_all = pick_measured(counts, spec["single_measure"])
                    want = [L for L in want_all if L in by_bucket] or [
                        max(by_bucket, key=lambda L: len(by_bucket[L]))
                    ]
                    meas = {}
                    for L in want:
                        if (1, 1, L) not in execs and not fits(last_compile[0] + 5.0):
                            continue
                        e = executable(by_bucket[L][0]["arrays"])
                        timing, losses = time_steps(
                            e["exe"],
                            by_bucket[L],
                            spec["single_warmup"],
                            spec["single_steps"],
                            spec["steps_per_group"],
                        )
                        meas[L] = dict(
                            step_time_s_median=timing.median_s,
                            step_times_s=timing.group_s,
                            compile_s=e["compile_s"],
                            lower_s=e["lower_s"],
                            memory_analysis=e["memory_analysis"],
                            loss_last=losses[-1],
                        )
                    if not meas:
                        put(mode, dist, status="skipped", reason="time budget", **stats)
                        continue
                    xs = sorted(meas)
                    ys = [meas[x]["step_time_s_median"] for x in xs]
                    per_bucket = {}
                    for L in buckets:
                        t = (
                            meas[L]["step_time_s_median"]
                            if L in meas
                            else float(np.interp(L, xs, ys))
                        )
                        per_bucket[str(L)] = dict(
                            steps=len(by_bucket[L]),
                            step_time_s_median=t,
                            measured=L in meas,
                            real_tokens=sum(b["real"] for b in by_bucket[L]),
                        )
                    total = sum(v["steps"] * v["step_time_s_median"] for v in per_bucket.values())
                    interp_steps = sum(v["steps"] for v in per_bucket.values() if not v["measured"])
                    times = [t for m in meas.values() for t in m["step_times_s"]]
                    losses = [m["loss_last"] for m in meas.values()]
                    rec = dict(
                        status="ok",
                        buckets=per_bucket,
                        measured=meas,
                        interpolated_step_share=interp_steps / len(batches),
                        step_time_s_median=total / len(batches),
                        step_time_note="single: step-weighted mean of the buckets' medians",
                        steps_per_group=spec["steps_per_group"],
                        timed_steps=len(times) * spec["steps_per_group"],
                        warmup_steps=spec["single_warmup"],
                        est_total_s=total,
                        compile_s=sum(m["compile_s"] for m in meas.values()),
                    )
                tps = real / total
                rec.update(
                    tokens_per_s=tps,
                    mfu=mfu(flops, tps, peak, 1),
                    peak_bytes=peak_bytes(),
                    loss_timed=[losses[0], losses[-1]],
                    finite_loss=all(math.isfinite(x) for x in losses),
                    **stats,
                )
                put(mode, dist, **rec)
                interp = rec.get("interpolated_step_share")
                if interp:
                    print(
                        f"[{preset} {mode} {dist}] {100 * interp:.0f}% of the steps are in "
                        f"buckets interpolated, not measured",
                        flush=True,
                    )
                print(
                    f"[{preset} {mode} {dist}] {len(batches)} steps x "
                    f"{1e3 * rec['step_time_s_median']:.2f} ms = {total:.2f}s for {real} real "
                    f"tokens ({100 * real / slots:.1f}% of slots): {tps:,.0f} tok/s, MFU "
                    f"{'n/a' if rec['mfu'] is None else f'{100 * rec["mfu"]:.1f}%'}, peak "
                    f"{'n/a' if rec['peak_bytes'] is None else f'{rec["peak_bytes"] / 2**30:.2f} GiB'}",
                    flush=True,
                )
    except Exception as e:  # noqa: BLE001 - recorded, the parent decides
        status = "oom" if is_oom(e) else "error"
        msg = f"{type(e).__name__}: {e}"
        print(f"[{preset} {group}] {status}: {msg[:2000]}", flush=True)
        if status == "error":
            traceback.print_exc()
        put_all(status, error=msg[:4000], peak_bytes=peak_bytes())
    result["wall_s"] = time.perf_counter() - t_proc
    save()


# ------------------------------------------------------------------------------------------------
# The parent: plan, run children under the budget, merge.


def _child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["PYTHONPATH"] = str(harness.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def probe_device() -> harness.DeviceInfo:
    """The device from a short child (the parent never holds the accelerator)."""
    code = (
        "import dataclasses, json; from benchmarks import harness; "
        "print(json.dumps(dataclasses.asdict(harness.device_info())))"
    )
    env = _child_env()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
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
    return harness.DeviceInfo(**json.loads(out.stdout.strip().splitlines()[-1]))


def run_child(spec: dict, tmpdir: pathlib.Path, timeout: float) -> dict:
    spec_path = tmpdir / f"spec_{spec['preset']}_{spec['group']}_{spec['rows']}.json"
    result, killed, returncode = harness.run_script_child(
        __file__, spec, spec_path, _child_env(), timeout
    )
    result = result or dict(records={}, info={})
    result["killed"] = killed
    result["returncode"] = returncode
    return result


def parse_rows(text: str | None) -> dict:
    rows = dict(DEFAULT_ROWS)
    if not text:
        return rows
    for item in text.split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            rows[k.strip()] = int(v)
        else:
            rows = {k: int(item) for k in rows}
    return rows


def load_results(path: pathlib.Path) -> dict:
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("schema") == SCHEMA:
            return data
        print(f"bench_train: {path} has another schema; starting it afresh", flush=True)
    return dict(schema=SCHEMA, runs={}, workloads={}, invocations=[])


def plot_paths(path: pathlib.Path) -> list[pathlib.Path]:
    """plot_train.py's plots of the result file `path` (they move to history/ with it)."""
    return [
        path.with_name(f"{path.stem}_{name}.png") for name in ("tokens_per_s", "speedup", "lengths")
    ]


def parse_args(argv):
    ap = harness.argument_parser(__doc__)
    ap.add_argument(
        "--presets", default=None, help=f"comma list (default {','.join(PRESETS)}; --smoke: tiny)"
    )
    ap.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma list of {','.join(MODES)} (default {','.join(DEFAULT_MODES)})",
    )
    ap.add_argument("--dists", default=",".join(DISTS))
    ap.add_argument(
        "--seq-len", type=int, default=None, help="row length (default 2048; smoke 128)"
    )
    ap.add_argument(
        "--rows",
        default=None,
        help="rows per packed/padded step: N for all, or preset=N,... (default "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_ROWS.items())
        + ")",
    )
    ap.add_argument(
        "--single-bucket",
        type=int,
        default=None,
        help="single mode pads to a multiple of this (default 256; smoke 64)",
    )
    ap.add_argument(
        "--single-measure",
        type=int,
        default=None,
        help="single-mode buckets to measure, the rest interpolated (default 4; smoke 0 = all)",
    )
    ap.add_argument(
        "--workload-tokens",
        type=int,
        default=None,
        help="tokens per distribution's workload (default 1048576; smoke 6000)",
    )
    ap.add_argument(
        "--stream-groups",
        type=int,
        default=1,
        help="link_across_steps: groups of row streams (--data.stream_groups; default 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps after compile (default 2; smoke 1)"
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps, rounded up to a multiple of --group (default 12; smoke 2)",
    )
    ap.add_argument(
        "--single-steps",
        type=int,
        default=None,
        help="timed steps per single-mode bucket (default 8; smoke 2)",
    )
    ap.add_argument(
        "--group",
        type=int,
        default=None,
        help="timed steps run back to back between blocks; the median is over "
        "groups (default 2; smoke 1; 1 = block after every step)",
    )
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on GPU)")
    ap.add_argument("--scan-impl", default="auto")
    ap.add_argument(
        "--conv-impl", default="auto", help="MambaConfig.conv_impl (e.g. pallas_tile_walk)"
    )
    harness.add_layer_args(ap)
    ap.add_argument(
        "--model",
        default=None,
        help="MambaConfig (or Mamba2Config) overrides for every preset, e.g. "
        "n_layer=1,d_model=32 "
        f"(checks; not for results; smoke: {SMOKE_MODEL})",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=540.0,
        help="seconds for this whole invocation (default 540)",
    )
    ap.add_argument(
        "--compile-guess",
        type=float,
        default=None,
        help="seconds a first compile is assumed to take (default 60; smoke 5)",
    )
    ap.add_argument("--no-oom-retry", action="store_true")
    ap.add_argument(
        "--trace",
        type=pathlib.Path,
        default=None,
        help="after timing each packed/padded/link mode, trace 3 steps with jax.profiler into "
        "DIR/<preset>_<mode>_<dist> and record the step's GPU time by part in the JSON",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="skip (preset, group)s whose records in the result file are already ok "
        "with these settings: repeat one command over several device calls "
        "until done",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="start a new result file instead of merging into the one there (which "
        "moves to history/ with its plots if it was made at another commit)",
    )
    harness.add_anchor_args(ap)
    args = ap.parse_args(argv)
    for name in ("modes", "dists"):
        allowed = MODES if name == "modes" else DISTS
        bad = [g for g in getattr(args, name).split(",") if g and g not in allowed]
        if bad:
            ap.error(f"unknown --{name} {bad}; choose from {list(allowed)}")
    presets = (args.presets or ("tiny" if args.smoke else ",".join(PRESETS))).split(",")
    bad = [p for p in presets if p not in KNOWN_PRESETS]
    if bad:
        ap.error(f"unknown --presets {bad}; choose from {list(KNOWN_PRESETS)}")
    modes = args.modes.split(",")
    if args.stream_groups < 1:
        ap.error(f"--stream-groups must be >= 1, got {args.stream_groups}")
    if args.stream_groups > 1 and "link_across_steps" not in modes:
        ap.error(f"--stream-groups {args.stream_groups} needs --modes link_across_steps")
    linked = [m for m in modes if m in ("link", "link_across_steps")]
    from jax_packmamba.config import config_class
    from train.config import CANNOT_LINK

    unlinkable = [p for p in presets if config_class(p) in CANNOT_LINK]
    if linked and unlinkable:
        ap.error(f"--modes {linked} with {unlinkable}: {CANNOT_LINK[config_class(unlinkable[0])]}")
    if args.anchor is not None and not (args.anchor / ANCHOR_SCRIPT).is_file():
        ap.error(f"--anchor {args.anchor}: no {ANCHOR_SCRIPT} there")
    mamba2 = [p for p in presets if p.startswith("mamba2-")]
    if args.anchor is not None and mamba2:
        ap.error(
            f"--anchor runs mamba_ssm's Mamba1 ({ANCHOR_SCRIPT}); --presets {mamba2} are "
            f"Mamba2: time mamba_ssm's Mamba2 with benchmarks/anchor_mamba2.py"
        )
    return args, presets


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        child(json.loads(pathlib.Path(argv[1]).read_text()))
        return 0
    args, presets = parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.time_budget - 10.0  # leave time to merge and write
    smoke = args.smoke

    def default(value, full, small):
        return value if value is not None else (small if smoke else full)

    modes = [m for m in args.modes.split(",") if m]
    dists = [d for d in args.dists.split(",") if d]
    rows_of = parse_rows(args.rows)
    seq_len = default(args.seq_len, 2048, 128)
    settings = dict(
        seq_len=seq_len,
        single_bucket=default(args.single_bucket, 256, 64),
        single_measure=default(args.single_measure, 4, 0),
        workload_tokens=default(args.workload_tokens, 1 << 20, 6000),
        seed=args.seed,
        warmup=default(args.warmup, 2, 1),
        steps=default(args.steps, 12, 2),
        single_warmup=1,
        single_steps=default(args.single_steps, 8, 2),
        steps_per_group=default(args.group, 2, 1),
        stream_groups=args.stream_groups,
        dtype=args.dtype,
        scan_impl=args.scan_impl,
        conv_impl=args.conv_impl,
        remat=args.remat,
        scan_layers=args.scan_layers,
        trace=str(args.trace) if args.trace else None,
    )
    overrides_of = {
        p: workloads.parse_overrides(
            default(args.model, "", HYBRID_SMOKE_MODEL if p.startswith("hybrid-") else SMOKE_MODEL)
        )
        for p in presets
    }
    commit = harness.git_commit()

    info = probe_device()
    head = harness.header(info, script=__file__, argv=argv, commit=commit)
    command = head["command"]
    out = harness.result_path("train", info.slug, "smoke" if smoke else None, out_dir=args.out)
    print(
        f"bench_train: {info.kind} ({info.backend}), jax {head['jax_version']}; "
        f"presets {presets}, modes {modes}, dists {dists}; budget {args.time_budget:.0f}s; "
        f"-> {out}",
        flush=True,
    )

    # Workload descriptions (histograms) from the parent: cheap, host only.
    from train.data import cut_pieces

    corpus = workloads.stdlib_corpus()
    described = {}
    for dist in dists:
        w = workloads.make_workload(
            dist, tokens=settings["workload_tokens"], seed=args.seed, corpus=corpus
        )
        w["info"]["num_pieces"] = len(cut_pieces(w["docs"], seq_len))
        w["info"]["seq_len"] = seq_len
        described[dist] = w["info"]
        s = w["info"]["stats"]
        print(
            f"workload {dist}: {w['info']['num_documents']} documents, {w['info']['num_tokens']} "
            f"tokens, {w['info']['num_pieces']} pieces of <= {seq_len}; length median "
            f"{s['median']:.0f}, p90 {s['p90']:.0f}, p99 {s['p99']:.0f}, max {s['max']}",
            flush=True,
        )

    if args.fresh:
        for moved in harness.retire(out, commit=commit, companions=plot_paths(out)):
            print(f"bench_train: --fresh: moved {moved}", flush=True)
    results = load_results(out)
    results.update(head)
    for dist, winfo in described.items():
        old = results["workloads"].get(dist)
        if old and (old.get("num_tokens"), old.get("seq_len"), old.get("seed")) != (
            winfo["num_tokens"],
            winfo["seq_len"],
            winfo["seed"],
        ):
            print(
                f"bench_train: note: workload {dist} differs from the one in {out} (records "
                f"made with the old one keep its parameters in their own fields)",
                flush=True,
            )
        results["workloads"][dist] = winfo

    def merge(records: dict):
        for key, rec in records.items():
            rec["workload"] = dict(
                num_tokens=described[rec["dist"]]["num_tokens"], seed=args.seed, seq_len=seq_len
            )
            results["runs"][key] = rec
        harness.write_json(out, results)

    plan = [(p, g) for p in presets for g in GROUPS if any(GROUP_OF[m] == g for m in modes)]
    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_train_"))

    def done(preset, group, rows):
        """--resume: every (mode, dist) of this group is already ok with these settings."""
        for m in (m for m in modes if GROUP_OF[m] == group):
            for d in dists:
                r = results["runs"].get(f"{preset}/{m}/{d}")
                tried = [a["rows"] for a in (r or {}).get("attempts", [])]
                if (
                    not r
                    or r.get("status") != "ok"
                    or r.get("seq_len") != seq_len
                    or r.get("workload", {}).get("num_tokens") != described[d]["num_tokens"]
                    or (group != "single" and rows not in tried)
                    or (group == "single" and r.get("single_bucket") != settings["single_bucket"])
                    or (group == "carried" and r.get("stream_groups") != settings["stream_groups"])
                ):
                    return False
        return True

    for preset, group in plan:
        rows = rows_of.get(preset, 8) if group != "single" else 1
        if args.resume and done(preset, group, rows):
            print(f"[{preset} {group}] already in {out} (--resume): not run again", flush=True)
            continue
        attempts = []
        while True:
            left = deadline - time.time()
            spec = dict(
                settings,
                model_overrides=overrides_of[preset],
                preset=preset,
                group=group,
                rows=rows,
                modes=modes,
                dists=dists,
                deadline=deadline,
                command=command,
                git_commit=commit,
                compile_guess_s=default(args.compile_guess, 60.0, 5.0),
            )
            if left < 20.0:
                recs = {
                    f"{preset}/{m}/{d}": dict(
                        preset=preset,
                        mode=m,
                        dist=d,
                        status="skipped",
                        reason="time budget (not started)",
                        rows=rows,
                        seq_len=seq_len,
                        command=command,
                    )
                    for m in modes
                    if GROUP_OF[m] == group
                    for d in dists
                }
                merge(recs)
                print(f"[{preset} {group}] skipped: {left:.0f}s left", flush=True)
                break
            print(f"[{preset} {group}] start: rows {rows}, {left:.0f}s left", flush=True)
            res = run_child(spec, tmpdir, left)
            recs = res["records"]
            for m in modes:
                if GROUP_OF[m] != group:
                    continue
                for d in dists:
                    key = f"{preset}/{m}/{d}"
                    if key not in recs:
                        recs[key] = dict(
                            preset=preset,
                            mode=m,
                            dist=d,
                            rows=rows,
                            seq_len=seq_len,
                            command=command,
                            status="timeout" if res["killed"] else "error",
                            reason=(
                                "killed at the time budget"
                                if res["killed"]
                                else f"child exited with {res['returncode']} before recording this"
                            ),
                        )
            oom = any(r["status"] == "oom" for r in recs.values())
            attempts.append(dict(rows=rows, status="oom" if oom else "done"))
            for r in recs.values():
                r["attempts"] = list(attempts)
            merge(recs)
            if oom and group != "single" and rows > 1 and not args.no_oom_retry:
                rows //= 2
                print(f"[{preset} {group}] out of memory; retrying with {rows} rows", flush=True)
                continue
            break

    if args.anchor is not None:
        left = deadline - time.time()
        results["anchor"] = harness.run_anchor(
            args.anchor / ANCHOR_SCRIPT,
            pythonpath=args.anchor_pythonpath,
            args=[",".join(f"{p}:{ANCHOR_ROWS}:{seq_len}" for p in presets)],
            timeout=max(left, 1.0),
        )
        print(f"bench_train: anchor {results['anchor']['status']}", flush=True)

    results["invocations"] = (
        results.get("invocations", [])
        + [
            dict(
                date=head["date"],
                command=command,
                git_commit=commit,
                wall_s=time.time() - t_start,
                settings=settings,
                model_overrides=overrides_of,
                presets=presets,
                modes=modes,
                dists=dists,
            )
        ]
    )[-50:]
    harness.write_json(out, results)
    print_summary(results, presets, modes, dists)
    print(f"bench_train: wrote {out} ({time.time() - t_start:.0f}s)", flush=True)
    return 0


def print_summary(results, presets, modes, dists):
    print(
        "\n| preset | dist | mode | status | rows x len | real tok/s | ms/step | real % | MFU | "
        "peak GiB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for p in presets:
        for d in dists:
            for m in modes:
                r = results["runs"].get(f"{p}/{m}/{d}")
                if r is None:
                    continue
                if r["status"] != "ok":
                    print(
                        f"| {p} | {d} | {m} | {r['status']} | {r.get('rows')} x {r.get('seq_len')} "
                        f"| | | | | |"
                    )
                    continue
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                pk = "n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.1f}"
                print(
                    f"| {p} | {d} | {m} | ok | {r['rows']} x {r['seq_len']} | "
                    f"{r['tokens_per_s']:,.0f} | {1e3 * r['step_time_s_median']:.2f} | "
                    f"{100 * r['real_fraction']:.1f} | {mfu} | {pk} |"
                )


if __name__ == "__main__":
    sys.exit(main())
