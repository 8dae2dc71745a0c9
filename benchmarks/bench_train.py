"""Training throughput, packed vs padded vs one sequence per step, on the same documents.

    PYTHONPATH=. python3 benchmarks/bench_train.py                      # everything (9 min budget)
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets 1.4b --modes packed,padded
    PYTHONPATH=. python3 benchmarks/bench_train.py --presets 130m,370m --resume
    PYTHONPATH=. python3 benchmarks/bench_train.py --tiny --out /tmp/t.json   # CPU check, ~1 min

On a device machine whose $OUT folder is what comes back, merge into a copy there (so a call cut
at its time limit still returns what it measured) and copy it back into benchmarks/results/:

    cp -f benchmarks/results/train_nvidia-h200.json "$OUT"/ 2>/dev/null; PYTHONPATH=. python3 \
      benchmarks/bench_train.py --presets 1.4b --resume --out "$OUT/train_nvidia-h200.json"

What is measured, per model preset x batching mode x length distribution: steady-state training
throughput in REAL tokens/s (padding never counts), median step time, peak device memory and MFU
(model FLOPs of the real tokens / the device's dense bf16 peak, train/metrics.py).

Workloads (the same token documents in every mode; host-side, deterministic from --seed):
  corpus    the training program's default corpus (train.data.load_corpus, source "stdlib": the
            Python standard library's .py files, byte tokens, each document ends with EOD 256);
            whole documents in a seeded random order until --workload-tokens are reached. (Most
            of its tokens sit in files longer than 2048 bytes, so its pieces are mostly full rows.)
  instruct  a long-tailed mix typical of instruction data: document lengths (EOD included) drawn
            from a lognormal with median 300 tokens and sigma 1.0 (p90 ~1,080, p99 ~3,070),
            rounded and clipped to [16, 8192], until --workload-tokens are reached; the content is
            consecutive cuts of the stdlib byte stream (each cut ends with EOD 256).
  Documents longer than the row length (--seq-len) are cut into pieces of at most --seq-len
  tokens (train.data.cut_pieces), as the trainer does. Histograms of the document lengths (bin
  counts and tokens per bin, log2 bins) go into the JSON; plot_train.py draws them.

Modes (train.data.Batcher, the trainer's own batching; all three consume the same pieces):
  packed  pieces packed into --rows rows of --seq-len tokens (first-fit-decreasing, segment resets)
  padded  one piece per row, each padded to --seq-len (the row length, not the longest in the
          batch: one compiled shape, as the trainer does; the JSON also gives the real-token
          fraction padding to the longest piece of each batch would have had, for reference)
  single  one piece per step, padded to a multiple of --single-bucket (bounds recompiles)

How time is measured: the workload is batched on the host once; every step shape is compiled
ahead of time (compile time recorded separately). After --warmup untimed steps, --steps steps
are timed in groups of --group back-to-back steps: perf_counter around the group, then
jax.block_until_ready on the new state and the metrics; batches are already on the device; the
state is donated, so the steps run in order on the device while the host dispatches the next,
as in the trainer. A step's time is the median over groups of the group's time / --group. A
mode's time for the WHOLE workload is its number of steps x the median step time of their
shape, and tokens/s = the workload's real tokens / that time; packed and padded steps all have
one shape. In single mode each length bucket is its own shape (its own compile): --single-measure
of the buckets present in either distribution are measured (the shortest, the longest, then
those with the most steps; 0 = all) and the others interpolated linearly in length; the JSON
says which, and what share of the steps they carry. Real tokens are counted from the batches'
segment_ids and, in packed mode, checked against the workload's token count.

Processes and memory: each (preset, group) runs in its own subprocess, so its peak is its own
(device.memory_stats()["peak_bytes_in_use"]; XLA's compiled memory_analysis is recorded too).
Group "rows" = packed and padded (both distributions): they run the identical compiled program
(same shapes), so they share one compile and their peak is that program's (run --modes packed
and --modes padded in separate invocations to see each alone). Group "single" = the single mode
(both distributions); its peak is that of its largest bucket. A configuration that runs out of
memory is recorded as "oom"; rows mode is then retried with half the rows (down to 1;
--no-oom-retry disables). The children set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 unless set.

Time budget: --time-budget seconds for the whole invocation (default 540: fits a 10-minute
device call with start-up to spare). A child gets the time left; it skips compiles it cannot
fit (a compile is predicted from the last one, the first from --compile-guess) and is killed at
the deadline; whatever did not run is recorded as "skipped" or "timeout". Split a full run over
several calls with --presets, --modes and --dists, or repeat one command with --resume (it skips
what is already ok with the same settings). Each invocation merges its records (keyed
preset/mode/dist) into --out (default benchmarks/results/train_<kind>.json, e.g.
train_nvidia-h200.json; --tiny: train_<kind>_tiny.json), with device, jax version, date, command
and git commit; plot_train.py makes the plots and the README table from it.

Defaults: rows of 2048 tokens; rows per step 8 (the mamba_ssm anchors' 8 x 2048) except 2.8b: 4
(--rows 2.8b=8 to try more); released vocabulary 50277 (byte ids use the first 257) so FLOPs
match mamba_ssm's; bf16 compute, float32 params, AdamW (train/step.py), scan impl auto (Pallas
on GPU); 1M-token workloads; 2 warm-up + 12 timed steps in groups of 2; single mode: buckets of
256, 4 of them measured, 1 warm-up + 8 timed steps each. --tiny: the "tiny" preset, rows of 256,
2 rows, 16k-token workloads, buckets of 64 (all measured), 3 timed steps one by one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRESETS = ("130m", "370m", "790m", "1.4b", "2.8b")
MODES = ("packed", "padded", "single")
DISTS = ("corpus", "instruct")
GROUP_OF = {"packed": "rows", "padded": "rows", "single": "single"}
DEFAULT_ROWS = {"130m": 8, "370m": 8, "790m": 8, "1.4b": 8, "2.8b": 4, "tiny": 2}
RELEASED_VOCAB = 50277
# The long-tailed "instruct" mix: lognormal document lengths (tokens, EOD included).
INSTRUCT = dict(median=300, sigma=1.0, min_len=16, max_len=8192)
HIST_EDGES = [2 ** k for k in range(3, 21)]  # 8 .. 1M tokens, log2 bins
SCHEMA = 1


# ------------------------------------------------------------------------------------------------
# Workloads (host only; no jax).


def _stdlib_corpus():
    from train.config import DataConfig
    from train.data import load_corpus

    return load_corpus(DataConfig(source="stdlib"))


def make_workload(dist: str, *, tokens: int, seed: int, corpus=None) -> dict:
    """{"docs": [int32 arrays, each ending with EOD 256], "info": JSON-able description}."""
    corpus = corpus if corpus is not None else _stdlib_corpus()
    if dist == "corpus":
        order = np.random.default_rng([seed, 0xC0]).permutation(len(corpus.documents))
        picked, total = [], 0
        for i in order:
            if total >= tokens:
                break
            picked.append(int(i))
            total += len(corpus.documents[i])
        docs = [corpus.documents[i] for i in picked]
        every = np.array([len(d) for d in corpus.documents], np.int64)
        info = dict(description=f"{corpus.description}: whole documents (EOD appended) in a seeded "
                                f"random order until {tokens} tokens",
                    source="stdlib", doc_indices=picked,
                    population=dict(num_documents=len(every), num_tokens=int(every.sum()),
                                    stats=length_stats(every), histogram=histogram(every)))
    elif dist == "instruct":
        p = INSTRUCT
        rng = np.random.default_rng([seed, 0x1A57])
        lengths, total = [], 0
        while total < tokens:
            n = int(np.clip(np.rint(rng.lognormal(math.log(p["median"]), p["sigma"])),
                            p["min_len"], p["max_len"]))
            lengths.append(n)
            total += n
        stream = np.concatenate([d[:-1] for d in corpus.documents])  # stdlib bytes, no EOD
        pos = int(rng.integers(0, len(stream)))
        docs = []
        for n in lengths:
            if pos + n - 1 > len(stream):
                pos = 0
            docs.append(np.concatenate([stream[pos:pos + n - 1],
                                        np.array([corpus.eod_id], np.int32)]).astype(np.int32))
            pos += n - 1
        info = dict(description=f"long-tailed instruction-like mix: lognormal lengths median "
                                f"{p['median']} sigma {p['sigma']} clipped to [{p['min_len']}, "
                                f"{p['max_len']}] tokens, content cut from the stdlib byte stream",
                    source="synthetic", params=dict(p))
    else:
        raise ValueError(f"unknown distribution {dist!r}; choose from {DISTS}")
    lengths = np.array([len(d) for d in docs], np.int64)
    info.update(dist=dist, seed=seed, workload_tokens=tokens, num_documents=len(docs),
                num_tokens=int(lengths.sum()), doc_lengths=lengths.tolist(),
                stats=length_stats(lengths), histogram=histogram(lengths))
    return dict(docs=docs, info=info)


def length_stats(lengths: np.ndarray) -> dict:
    q = np.percentile(lengths, [10, 50, 90, 99])
    return dict(min=int(lengths.min()), p10=float(q[0]), median=float(q[1]), mean=float(lengths.mean()),
                p90=float(q[2]), p99=float(q[3]), max=int(lengths.max()))


def histogram(lengths: np.ndarray) -> dict:
    edges = list(HIST_EDGES)
    top = int(lengths.max()) + 1
    if top > edges[-1]:
        edges.append(1 << (top - 1).bit_length())
    idx = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    toks = np.bincount(idx, weights=lengths, minlength=len(edges) - 1)
    below = int((lengths < edges[0]).sum())
    return dict(edges=edges, counts=counts.tolist(), tokens=[int(t) for t in toks],
                note=f"bin i holds lengths in [edges[i], edges[i+1]); {below} below edges[0] "
                     f"are counted in bin 0")


def batches_for(mode: str, pieces: list, *, seq_len: int, rows: int, single_bucket: int,
                seed: int) -> list[dict]:
    """The whole workload as the trainer's Batcher makes it: [{"arrays", "real", "slots"}]."""
    from train.data import Batcher

    n = len(pieces)
    if mode == "packed":
        b = Batcher(pieces, mode="packed", seq_len=seq_len, batch_size=rows, seed=seed, wrap=False)
        out = []
        while b.consumed < n or b.carry:
            x = next(b)
            out.append(dict(arrays=x["arrays"], real=x["stats"]["real_tokens"],
                            slots=x["stats"]["slots"], sequences=x["stats"]["sequences"]))
        return out
    if mode == "padded":
        b = Batcher(pieces, mode="padded", seq_len=seq_len, batch_size=rows, seed=seed)
        out = []
        for s in range(-(-n // rows)):
            x = next(b)
            fresh = min(rows, n - s * rows)  # the last batch wraps round: count new pieces only
            seg = x["arrays"]["segment_ids"][0, :fresh]
            longest = int((seg > 0).sum(axis=1).max())
            out.append(dict(arrays=x["arrays"], real=int((seg > 0).sum()), slots=x["stats"]["slots"],
                            sequences=fresh, longest=longest))
        return out
    if mode == "single":
        b = Batcher(pieces, mode="single", seq_len=seq_len, batch_size=1, seed=seed,
                    single_bucket=single_bucket)
        out = []
        for _ in range(n):
            x = next(b)
            out.append(dict(arrays=x["arrays"], real=x["stats"]["real_tokens"],
                            slots=x["stats"]["slots"], sequences=1))
        return out
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------------------------------------
# The child: one preset, one group of modes, in its own process.


def is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return any(k in s for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                "OutOfMemory", "Resource exhausted"))


def _peak_bytes(dev):
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _memory_analysis(exe):
    try:
        m = exe.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def pick_measured(steps_per_bucket: dict[int, int], k: int) -> list[int]:
    """k buckets to measure, in the order to measure them (what the time budget cuts last
    matters least): the shortest, the longest, then those with the most steps (k <= 0: all).
    The others are interpolated linearly in length between measured ones."""
    buckets = sorted(steps_per_bucket)
    order = buckets[:1] + buckets[-1:] * (len(buckets) > 1) + sorted(
        buckets[1:-1], key=lambda b: (-steps_per_bucket[b], b))
    return order if k <= 0 else order[:k]


def child(spec: dict) -> None:
    """Runs spec's (preset, group) and writes records to spec["result_path"] as it goes."""
    import jax

    from train import sharding
    from train import step as step_lib
    from train.config import MeshConfig, ModelConfig, OptimConfig
    from train.data import cut_pieces
    from train.metrics import mfu, peak_flops

    t_proc = time.perf_counter()
    deadline = spec["deadline"]
    result = dict(records={}, info={})
    path = pathlib.Path(spec["result_path"])

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)

    dev = jax.devices()[0]
    backend = jax.default_backend()
    peak = peak_flops(dev.device_kind) if backend != "cpu" else None
    result["info"] = dict(device_kind=dev.device_kind, backend=backend, jax_version=jax.__version__,
                          peak_flops_per_device=peak)
    preset, group, rows, seq_len = spec["preset"], spec["group"], spec["rows"], spec["seq_len"]
    modes = [m for m in spec["modes"] if GROUP_OF[m] == group]
    base = dict(preset=preset, seq_len=seq_len, rows=1 if group == "single" else rows,
                single_bucket=spec["single_bucket"] if group == "single" else None,
                attempt_rows=rows, date=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), command=spec["command"], git_commit=spec["git_commit"])

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
        overrides = {} if preset == "tiny" else {"vocab_size": RELEASED_VOCAB}
        overrides.update(spec["model_overrides"])
        model_config = ModelConfig(preset=preset, dtype=spec["dtype"], scan_impl=spec["scan_impl"],
                                   remat=spec["remat"], overrides=overrides).mamba_config(
            vocab_size=257, backend=backend)
        flops = model_config.flops_per_token()
        base.update(num_params=model_config.num_params(), flops_per_token=flops,
                    compute_dtype=model_config.dtype, scan_impl=model_config.scan_impl,
                    remat=model_config.remat, model_overrides=spec["model_overrides"],
                    n_layer=model_config.n_layer,
                    d_model=model_config.d_model, vocab_size=model_config.vocab_size)
        corpus = _stdlib_corpus()
        work = {}
        for dist in spec["dists"]:
            w = make_workload(dist, tokens=spec["workload_tokens"], seed=spec["seed"], corpus=corpus)
            pieces = cut_pieces(w["docs"], seq_len)
            work[dist] = dict(tokens=w["info"]["num_tokens"], pieces=pieces,
                              batches={m: batches_for(m, pieces, seq_len=seq_len, rows=rows,
                                                      single_bucket=spec["single_bucket"],
                                                      seed=spec["seed"]) for m in modes})
        print(f"[{preset} {group}] workloads batched in {time.perf_counter() - t_proc:.1f}s",
              flush=True)

        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1), devices=[dev])
        compiled = step_lib.build(model_config, OptimConfig(lr=1e-4, warmup_steps=10), 1000, mesh)
        batch_sh = sharding.batch_sharding(mesh)
        t0 = time.perf_counter()
        state = compiled.init(spec["seed"])
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        execs: dict[tuple, dict] = {}
        last_compile = [spec["compile_guess_s"]]

        def executable(shape_batch):
            shape = tuple(shape_batch["tokens"].shape)
            if shape not in execs:
                t0 = time.perf_counter()
                lowered = compiled.train_step.lower(state, shape_batch)
                t1 = time.perf_counter()
                exe = lowered.compile()
                t2 = time.perf_counter()
                execs[shape] = dict(exe=exe, lower_s=t1 - t0, compile_s=t2 - t1,
                                    memory_analysis=_memory_analysis(exe))
                last_compile[0] = t2 - t0
                print(f"[{preset} {group}] compiled {shape}: trace {t1 - t0:.1f}s, compile "
                      f"{t2 - t1:.1f}s", flush=True)
            return execs[shape]

        def time_steps(exe, batches, n_warm, n_timed, group):
            """Per-step seconds of each group of `group` back-to-back steps (blocking at the
            group's end, so host dispatch overlaps the device as in the trainer), and losses."""
            nonlocal state
            n_groups = max(1, -(-n_timed // group))
            dev_batches = [sharding.put_batch(b["arrays"], batch_sh)
                           for b in batches[:max(1, min(len(batches), n_warm + n_groups * group))]]
            times, losses = [], []
            i = 0
            for _ in range(n_warm):
                state, m = exe(state, dev_batches[i % len(dev_batches)])
                jax.block_until_ready((state, m))
                i += 1
            for _ in range(n_groups):
                ms = []
                t0 = time.perf_counter()
                for _ in range(group):
                    state, m = exe(state, dev_batches[i % len(dev_batches)])
                    ms.append(m)
                    i += 1
                jax.block_until_ready((state, ms))
                times.append((time.perf_counter() - t0) / group)
                losses += [float(x["loss"]) for x in ms]
            return times, losses

        want_all = None

        def fits(extra_s):
            return time.time() + extra_s < deadline

        for mode in modes:
            for dist in spec["dists"]:
                batches = work[dist]["batches"][mode]
                real = sum(b["real"] for b in batches)
                slots = sum(b["slots"] for b in batches)
                stats = dict(workload_tokens=work[dist]["tokens"], real_tokens=real, slots=slots,
                             steps=len(batches), pieces=len(work[dist]["pieces"]),
                             real_fraction=real / slots, padding_fraction=1 - real / slots,
                             init_s=init_s)
                if mode == "packed" and real != work[dist]["tokens"]:
                    raise AssertionError(f"packed batches hold {real} real tokens, the workload "
                                         f"{work[dist]['tokens']}")
                if mode == "padded":
                    longest = sum(rows * b["longest"] for b in batches)
                    stats["real_fraction_pad_to_longest"] = real / longest
                if mode != "single":
                    if not execs and not fits(last_compile[0]) or not fits(5.0):
                        put(mode, dist, status="skipped", reason="time budget", **stats)
                        continue
                    e = executable(batches[0]["arrays"])
                    times, losses = time_steps(e["exe"], batches, spec["warmup"], spec["steps"],
                                               spec["steps_per_group"])
                    med = statistics.median(times)
                    total = len(batches) * med
                    step_shape = list(batches[0]["arrays"]["tokens"].shape)
                    rec = dict(status="ok", step_shape=step_shape, step_time_s_median=med,
                               step_times_s=times, steps_per_group=spec["steps_per_group"],
                               timed_steps=len(times) * spec["steps_per_group"],
                               warmup_steps=spec["warmup"],
                               est_total_s=total, compile_s=e["compile_s"], lower_s=e["lower_s"],
                               memory_analysis=e["memory_analysis"])
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
                        max(by_bucket, key=lambda L: len(by_bucket[L]))]
                    meas = {}
                    for L in want:
                        if (1, 1, L) not in execs and not fits(last_compile[0] + 5.0):
                            continue
                        e = executable(by_bucket[L][0]["arrays"])
                        times, losses = time_steps(e["exe"], by_bucket[L], spec["single_warmup"],
                                                   spec["single_steps"], spec["steps_per_group"])
                        meas[L] = dict(step_time_s_median=statistics.median(times),
                                       step_times_s=times, compile_s=e["compile_s"],
                                       lower_s=e["lower_s"], memory_analysis=e["memory_analysis"],
                                       loss_last=losses[-1])
                    if not meas:
                        put(mode, dist, status="skipped", reason="time budget", **stats)
                        continue
                    xs = sorted(meas)
                    ys = [meas[x]["step_time_s_median"] for x in xs]
                    per_bucket = {}
                    for L in buckets:
                        t = meas[L]["step_time_s_median"] if L in meas else float(np.interp(L, xs, ys))
                        per_bucket[str(L)] = dict(steps=len(by_bucket[L]), step_time_s_median=t,
                                                  measured=L in meas,
                                                  real_tokens=sum(b["real"] for b in by_bucket[L]))
                    total = sum(v["steps"] * v["step_time_s_median"] for v in per_bucket.values())
                    interp_steps = sum(v["steps"] for v in per_bucket.values() if not v["measured"])
                    times = [t for m in meas.values() for t in m["step_times_s"]]
                    losses = [m["loss_last"] for m in meas.values()]
                    rec = dict(status="ok", buckets=per_bucket, measured=meas,
                               interpolated_step_share=interp_steps / len(batches),
                               step_time_s_median=total / len(batches),
                               step_time_note="single: step-weighted mean of the buckets' medians",
                               steps_per_group=spec["steps_per_group"],
                               timed_steps=len(times) * spec["steps_per_group"],
                               warmup_steps=spec["single_warmup"],
                               est_total_s=total,
                               compile_s=sum(m["compile_s"] for m in meas.values()))
                tps = real / total
                rec.update(tokens_per_s=tps, mfu=mfu(flops, tps, peak, 1),
                           peak_bytes=_peak_bytes(dev), loss_timed=[losses[0], losses[-1]],
                           finite_loss=all(math.isfinite(x) for x in losses), **stats)
                put(mode, dist, **rec)
                interp = rec.get("interpolated_step_share")
                if interp:
                    print(f"[{preset} {mode} {dist}] {100 * interp:.0f}% of the steps are in "
                          f"buckets interpolated, not measured", flush=True)
                print(f"[{preset} {mode} {dist}] {len(batches)} steps x "
                      f"{1e3 * rec['step_time_s_median']:.2f} ms = {total:.2f}s for {real} real "
                      f"tokens ({100 * real / slots:.1f}% of slots): {tps:,.0f} tok/s, MFU "
                      f"{'n/a' if rec['mfu'] is None else f'{100 * rec['mfu']:.1f}%'}, peak "
                      f"{'n/a' if rec['peak_bytes'] is None else f'{rec['peak_bytes'] / 2**30:.2f} GiB'}",
                      flush=True)
    except Exception as e:  # noqa: BLE001 - recorded, the parent decides
        status = "oom" if is_oom(e) else "error"
        msg = f"{type(e).__name__}: {e}"
        print(f"[{preset} {group}] {status}: {msg[:2000]}", flush=True)
        if status == "error":
            traceback.print_exc()
        put_all(status, error=msg[:4000], peak_bytes=_peak_bytes(dev))
    result["wall_s"] = time.perf_counter() - t_proc
    save()


# ------------------------------------------------------------------------------------------------
# The parent: plan, run children under the budget, merge.


def _git_commit():
    # A device machine gets a copy of the working tree without its history: the caller names it.
    if os.environ.get("PACKMAMBA_GIT_COMMIT"):
        return os.environ["PACKMAMBA_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def probe_device() -> dict:
    """Device kind and backend from a short child (the parent never holds the accelerator)."""
    code = ("import jax, json; d = jax.devices()[0]; print(json.dumps(dict(device_kind=d.device_kind,"
            " backend=jax.default_backend(), jax_version=jax.__version__)))")
    env = _child_env()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"device probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kind_slug(device_kind: str, backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    k = device_kind.lower()
    for name in ("h200", "h100", "a100", "b200"):
        if name in k:
            return f"nvidia-{name}"
    return "".join(c if c.isalnum() else "-" for c in k).strip("-")


def run_child(spec: dict, tmpdir: pathlib.Path, timeout: float) -> dict:
    spec_path = tmpdir / f"spec_{spec['preset']}_{spec['group']}_{spec['rows']}.json"
    spec["result_path"] = str(spec_path.with_suffix(".result.json"))
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, __file__, "--_child", str(spec_path)], cwd=REPO,
                            env=_child_env(), start_new_session=True)
    killed = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        killed = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    res_path = pathlib.Path(spec["result_path"])
    result = json.loads(res_path.read_text()) if res_path.exists() else dict(records={}, info={})
    result["killed"] = killed
    result["returncode"] = proc.returncode
    return result


def parse_rows(text: str | None, tiny: bool) -> dict:
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


def parse_overrides(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = item.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def load_results(path: pathlib.Path) -> dict:
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("schema") == SCHEMA:
            return data
        print(f"bench_train: {path} has another schema; starting it afresh", flush=True)
    return dict(schema=SCHEMA, runs={}, workloads={}, invocations=[])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        child(json.loads(pathlib.Path(argv[1]).read_text()))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None, help=f"comma list (default {','.join(PRESETS)}; "
                                                    f"--tiny: tiny)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dists", default=",".join(DISTS))
    ap.add_argument("--seq-len", type=int, default=None, help="row length (default 2048; tiny 256)")
    ap.add_argument("--rows", default=None,
                    help="rows per packed/padded step: N for all, or preset=N,... (default "
                         + ", ".join(f"{k}={v}" for k, v in DEFAULT_ROWS.items()) + ")")
    ap.add_argument("--single-bucket", type=int, default=None,
                    help="single mode pads to a multiple of this (default 256; tiny 64)")
    ap.add_argument("--single-measure", type=int, default=None,
                    help="single-mode buckets to measure, the rest interpolated (default 4; "
                         "tiny 0 = all)")
    ap.add_argument("--workload-tokens", type=int, default=None,
                    help="tokens per distribution's workload (default 1048576; tiny 16384)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps, rounded up to a multiple of --group (default 12; tiny 3)")
    ap.add_argument("--single-steps", type=int, default=None,
                    help="timed steps per single-mode bucket (default 8; tiny 2)")
    ap.add_argument("--group", type=int, default=None,
                    help="timed steps run back to back between blocks; the median is over "
                         "groups (default 2; tiny 1; 1 = block after every step)")
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on GPU)")
    ap.add_argument("--scan-impl", default="auto")
    ap.add_argument("--remat", action="store_true", help="recompute block activations (less memory)")
    ap.add_argument("--model", default="", help="MambaConfig overrides for every preset, "
                                                "e.g. n_layer=1,d_model=32 (checks; not for results)")
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="seconds for this whole invocation (default 540)")
    ap.add_argument("--compile-guess", type=float, default=None,
                    help="seconds a first compile is assumed to take (default 60; tiny 5)")
    ap.add_argument("--no-oom-retry", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="skip (preset, group)s whose records in --out are already ok with these "
                         "settings: repeat one command over several device calls until done")
    ap.add_argument("--out", default=None, help="results JSON to merge into")
    ap.add_argument("--tiny", action="store_true", help="tiny model and workloads: a CPU check")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.time_budget - 10.0  # leave time to merge and write
    tiny = args.tiny

    def default(value, full, small):
        return value if value is not None else (small if tiny else full)

    presets = (args.presets or ("tiny" if tiny else ",".join(PRESETS))).split(",")
    modes = [m for m in args.modes.split(",") if m]
    dists = [d for d in args.dists.split(",") if d]
    for name, given, allowed in (("preset", presets, PRESETS + ("tiny",)), ("mode", modes, MODES),
                                 ("dist", dists, DISTS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            ap.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    rows_of = parse_rows(args.rows, tiny)
    seq_len = default(args.seq_len, 2048, 256)
    settings = dict(seq_len=seq_len, single_bucket=default(args.single_bucket, 256, 64),
                    single_measure=default(args.single_measure, 4, 0),
                    workload_tokens=default(args.workload_tokens, 1 << 20, 1 << 14),
                    seed=args.seed, warmup=args.warmup, steps=default(args.steps, 12, 3),
                    single_warmup=1, single_steps=default(args.single_steps, 8, 2),
                    steps_per_group=default(args.group, 2, 1),
                    dtype=args.dtype, scan_impl=args.scan_impl, remat=args.remat,
                    model_overrides=parse_overrides(args.model))
    command = "PYTHONPATH=. python3 benchmarks/bench_train.py " + " ".join(argv)
    commit = _git_commit()

    info = probe_device()
    kind = kind_slug(info["device_kind"], info["backend"])
    out = pathlib.Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"train_{kind}{'_tiny' if tiny else ''}.json")
    print(f"bench_train: {info['device_kind']} ({info['backend']}), jax {info['jax_version']}; "
          f"presets {presets}, modes {modes}, dists {dists}; budget {args.time_budget:.0f}s; "
          f"-> {out}", flush=True)

    # Workload descriptions (histograms) from the parent: cheap, host only.
    corpus = _stdlib_corpus()
    workloads = {}
    for dist in dists:
        w = make_workload(dist, tokens=settings["workload_tokens"], seed=args.seed, corpus=corpus)
        from train.data import cut_pieces

        w["info"]["num_pieces"] = len(cut_pieces(w["docs"], seq_len))
        w["info"]["seq_len"] = seq_len
        workloads[dist] = w["info"]
        s = w["info"]["stats"]
        print(f"workload {dist}: {w['info']['num_documents']} documents, {w['info']['num_tokens']} "
              f"tokens, {w['info']['num_pieces']} pieces of <= {seq_len}; length median "
              f"{s['median']:.0f}, p90 {s['p90']:.0f}, p99 {s['p99']:.0f}, max {s['max']}",
              flush=True)

    results = load_results(out)
    results.update(device=info["device_kind"], kind=kind, backend=info["backend"],
                   jax_version=info["jax_version"])
    for dist, winfo in workloads.items():
        old = results["workloads"].get(dist)
        if old and (old.get("num_tokens"), old.get("seq_len"), old.get("seed")) != (
                winfo["num_tokens"], winfo["seq_len"], winfo["seed"]):
            print(f"bench_train: note: workload {dist} differs from the one in {out} (records "
                  f"made with the old one keep its parameters in their own fields)", flush=True)
        results["workloads"][dist] = winfo

    def merge(records: dict):
        for key, rec in records.items():
            rec["workload"] = dict(num_tokens=workloads[rec["dist"]]["num_tokens"],
                                   seed=args.seed, seq_len=seq_len)
            results["runs"][key] = rec
        write(out, results)

    plan = [(p, g) for p in presets for g in ("rows", "single")
            if any(GROUP_OF[m] == g for m in modes)]
    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_train_"))
    def done(preset, group, rows):
        """--resume: every (mode, dist) of this group is already ok with these settings."""
        for m in (m for m in modes if GROUP_OF[m] == group):
            for d in dists:
                r = results["runs"].get(f"{preset}/{m}/{d}")
                tried = [a["rows"] for a in (r or {}).get("attempts", [])]
                if not r or r.get("status") != "ok" or r.get("seq_len") != seq_len or \
                        r.get("workload", {}).get("num_tokens") != workloads[d]["num_tokens"] or \
                        (group == "rows" and rows not in tried) or \
                        (group == "single" and r.get("single_bucket") != settings["single_bucket"]):
                    return False
        return True

    for preset, group in plan:
        rows = rows_of.get(preset, 8) if group == "rows" else 1
        if args.resume and done(preset, group, rows):
            print(f"[{preset} {group}] already in {out} (--resume): not run again", flush=True)
            continue
        attempts = []
        while True:
            left = deadline - time.time()
            spec = dict(settings, preset=preset, group=group, rows=rows, modes=modes, dists=dists,
                        deadline=deadline, command=command, git_commit=commit,
                        compile_guess_s=default(args.compile_guess, 60.0, 5.0))
            if left < 20.0:
                recs = {f"{preset}/{m}/{d}": dict(preset=preset, mode=m, dist=d, status="skipped",
                                                  reason="time budget (not started)", rows=rows,
                                                  seq_len=seq_len, command=command)
                        for m in modes if GROUP_OF[m] == group for d in dists}
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
                        recs[key] = dict(preset=preset, mode=m, dist=d, rows=rows, seq_len=seq_len,
                                         command=command,
                                         status="timeout" if res["killed"] else "error",
                                         reason=("killed at the time budget" if res["killed"] else
                                                 f"child exited with {res['returncode']} before "
                                                 f"recording this"))
            oom = any(r["status"] == "oom" for r in recs.values())
            attempts.append(dict(rows=rows, status="oom" if oom else "done"))
            for r in recs.values():
                r["attempts"] = list(attempts)
            merge(recs)
            if oom and group == "rows" and rows > 1 and not args.no_oom_retry:
                rows //= 2
                print(f"[{preset} {group}] out of memory; retrying with {rows} rows", flush=True)
                continue
            break

    results["invocations"] = (results.get("invocations", []) + [dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command, git_commit=commit, wall_s=time.time() - t_start, settings=settings,
        presets=presets, modes=modes, dists=dists)])[-50:]
    write(out, results)
    print_summary(results, presets, modes, dists)
    print(f"bench_train: wrote {out} ({time.time() - t_start:.0f}s)", flush=True)
    return 0


def write(path: pathlib.Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def print_summary(results, presets, modes, dists):
    print("\n| preset | dist | mode | status | rows x len | real tok/s | ms/step | real % | MFU | "
          "peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for p in presets:
        for d in dists:
            for m in modes:
                r = results["runs"].get(f"{p}/{m}/{d}")
                if r is None:
                    continue
                if r["status"] != "ok":
                    print(f"| {p} | {d} | {m} | {r['status']} | {r.get('rows')} x {r.get('seq_len')} "
                          f"| | | | | |")
                    continue
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                pk = "n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.1f}"
                print(f"| {p} | {d} | {m} | ok | {r['rows']} x {r['seq_len']} | "
                      f"{r['tokens_per_s']:,.0f} | {1e3 * r['step_time_s_median']:.2f} | "
                      f"{100 * r['real_fraction']:.1f} | {mfu} | {pk} |")


if __name__ == "__main__":
    sys.exit(main())
