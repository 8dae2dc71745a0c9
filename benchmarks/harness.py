"""What every benchmark shares: the device, the commit, timing, result files and their names.

Scripts run from the repository root as `PYTHONPATH=. python3 benchmarks/<name>.py ...` (probes:
benchmarks/probes/<name>.py) and import this module as `from benchmarks import harness`.

Timing (`time_calls`): warm-up calls, each blocked on; then groups of back-to-back calls with
one `jax.block_until_ready` at the group's end (the host dispatches the next call while the
device runs, as in training); a call's time is its group's time / calls per group, and the
figure reported is the median over groups. Calls rotate between input sets (call i takes set
i mod n; `rotation_count` picks n so that the rotated data is not served from the L2 cache).

Per kernel (`trace`, `device_events`, `kernel_times`): a jax.profiler trace of some calls, its
GPU kernels grouped by name. Every Pallas kernel has a `name=`, so this splits a program's time
by kernel from outside; the ops carry no instrumentation.

Result files: `<out>/<benchmark>_<slug>[_<variant>].<ext>` (`result_path`), `<out>` being
benchmarks/results/ unless --out says otherwise; the slug names the device ("nvidia-h200",
"cpu"). A --smoke run (tiny shapes, seconds on CPU: a check of the script) adds the variant
"smoke", so it never replaces a real result. A file that a run at another commit replaces moves
to `<out>/history/` with that commit appended (`retire`); `install` does the same for a result
made elsewhere (a device machine's output folder):

    PYTHONPATH=. python3 -m benchmarks.harness install DIR/scan_nvidia-h200.json [COMPANION ...]

Every JSON result starts with `header()`: device, device_name, kind (the slug), backend,
jax_version, date, git_commit, command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HISTORY = "history"
# The L2 an input set must not be served from. 60 MiB covers the H100 (50 MB) and H200 (60 MB).
L2_BYTES = 60 * 2**20
_KNOWN_GPUS = ("h200", "h100", "a100", "b200")
_COMPRESSED = (".gz", ".bz2", ".xz")


# ------------------------------------------------------------------------------------------------
# Device and commit.


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """The device a benchmark runs on: kind "NVIDIA H200" / "cpu", name "cuda:0", backend
    "gpu" / "cpu", slug "nvidia-h200" / "cpu" (for file names)."""

    kind: str
    name: str
    backend: str
    slug: str


def device_slug(device_kind: str, backend: str) -> str:
    """A file-name slug for a device kind: "cpu" on CPU, "nvidia-h200" for "NVIDIA H200" (and
    for "NVIDIA H100 80GB HBM3" "nvidia-h100"), else the kind in lower case, dashes for the rest."""
    if backend == "cpu":
        return "cpu"
    kind = device_kind.lower()
    for name in _KNOWN_GPUS:
        if name in kind:
            return f"nvidia-{name}"
    return "-".join("".join(c if c.isalnum() else " " for c in kind).split())


def device_info(device=None) -> DeviceInfo:
    """The first device (or `device`); starts jax's backend."""
    import jax

    device = device if device is not None else jax.devices()[0]
    backend = jax.default_backend()
    return DeviceInfo(
        kind=device.device_kind,
        name=str(device),
        backend=backend,
        slug=device_slug(device.device_kind, backend),
    )


def git_commit() -> str | None:
    """HEAD of the checkout, or $PACKMAMBA_GIT_COMMIT when set: a device machine gets a copy of
    the working tree without its history, so the caller names the commit."""
    if os.environ.get("PACKMAMBA_GIT_COMMIT"):
        return os.environ["PACKMAMBA_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def command_line(script: str | os.PathLike, argv: Sequence[str]) -> str:
    """How to repeat this run from the repository root."""
    path = pathlib.Path(script).resolve()
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return " ".join(["PYTHONPATH=. python3", str(rel), shlex.join(list(argv))]).rstrip()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def jax_version() -> str | None:
    """The installed jax's version, without importing it (None: not installed)."""
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return None


def header(
    info: DeviceInfo | None,
    *,
    script: str | os.PathLike,
    argv: Sequence[str],
    commit: str | None = None,
) -> dict:
    """The fields every JSON result starts with (commit: git_commit() unless given; info None:
    a step that runs on no device, whose device fields are None)."""
    return dict(
        device=info and info.kind,
        device_name=info and info.name,
        kind=info and info.slug,
        backend=info and info.backend,
        jax_version=jax_version(),
        date=now(),
        git_commit=commit if commit is not None else git_commit(),
        command=command_line(script, argv),
    )


def device_memory(device) -> tuple[int | None, int | None]:
    """(peak_bytes_in_use, bytes_in_use) of the device, or Nones where it does not say."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = {}
    return stats.get("peak_bytes_in_use"), stats.get("bytes_in_use")


# ------------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Timing:
    """seconds per call: the median, min and max over groups, and each group's (group_s).
    outputs: the timed calls' outputs (keep_outputs=True); state: the last state returned."""

    median_s: float
    min_s: float
    max_s: float
    group_s: list[float]
    outputs: list | None = None
    state: Any = None


def time_calls(
    fn: Callable,
    inputs: Sequence[tuple],
    *,
    warmup: int = 1,
    groups: int = 7,
    per_group: int = 5,
    state: Any = None,
    keep_outputs: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    block: Callable[[Any], Any] | None = None,
) -> Timing:
    """Times fn(*inputs[i % len(inputs)]) for call i = 0, 1, ...

    state None: the calls are stateless. With a `state` (say a donated train state), each call
    is `state, out = fn(state, *inputs[i])` and the next call gets the state returned;
    Timing.state is the last one (the one passed in may be donated: use Timing.state from then
    on).

    warmup calls first, each blocked on; then `groups` groups of `per_group` calls, blocking on
    what the group returned (the state and outputs) at its end.
    """
    if not inputs:
        raise ValueError("inputs must hold at least one argument tuple")
    if warmup < 0 or groups < 1 or per_group < 1:
        raise ValueError(
            f"need warmup >= 0, groups >= 1, per_group >= 1; got {warmup=}, {groups=}, {per_group=}"
        )
    if block is None:
        import jax

        block = jax.block_until_ready
    calls = 0

    def call():
        nonlocal state, calls
        args = inputs[calls % len(inputs)]
        calls += 1
        if state is None:
            return fn(*args)
        state, out = fn(state, *args)
        return out

    for _ in range(warmup):
        out = call()  # first: it replaces `state`, which may be donated
        block((state, out))
    per_call, kept = [], []
    for _ in range(groups):
        t0 = clock()
        outs = [call() for _ in range(per_group)]
        block((state, outs))
        per_call.append((clock() - t0) / per_group)
        if keep_outputs:
            kept += outs
    return Timing(
        median_s=statistics.median(per_call),
        min_s=min(per_call),
        max_s=max(per_call),
        group_s=per_call,
        outputs=kept if keep_outputs else None,
        state=state,
    )


def tree_bytes(tree) -> int:
    """Bytes of the arrays in a pytree (what one input set reads)."""
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def rotation_count(
    bytes_per_set: int, *, backend: str, l2_bytes: int = L2_BYTES, factor: float = 2.0
) -> int:
    """How many input sets to rotate between: 1 on CPU; on a GPU at least 2 (no set follows
    itself) and enough that together they hold factor x l2_bytes, so a set has left the L2 by
    the time it comes round again."""
    if backend == "cpu":
        return 1
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    return max(2, math.ceil(factor * l2_bytes / bytes_per_set))


# ------------------------------------------------------------------------------------------------
# Per-kernel time from a profiler trace: the kernels carry their pallas_call name=, so a trace
# splits a program's time by kernel from outside, without instrumenting the ops.

# Lines of a device plane that repeat its kernels (XLA Ops, XLA Modules, ...) or are not kernels.
_NOT_KERNEL_LINES = (
    "XLA Modules",
    "XLA Ops",
    "Steps",
    "Framework",
    "TensorFlow",
    "Launch",
    "Source",
    "Memory",
    "Async XLA Ops",
    "XLA TraceMe",
)


def trace(fn: Callable, inputs: Sequence[tuple], calls: int, trace_dir: str | os.PathLike):
    """Runs fn(*inputs[i % len(inputs)]) `calls` times under jax.profiler.trace(trace_dir)
    (compile and warm up first), blocking once at the end."""
    import jax

    jax.block_until_ready(fn(*inputs[0]))
    with jax.profiler.trace(str(trace_dir)):
        jax.block_until_ready([fn(*inputs[i % len(inputs)]) for i in range(calls)])


def device_events(trace_dir, *, plane_prefix: str = "/device:GPU"):
    """([(name, start_ns, duration_ns)] sorted by start, {plane | line: event count}) of the
    kernels on the planes named plane_prefix... (a GPU's streams) of the newest trace under
    trace_dir; empty events where there are none (a CPU run)."""
    import jax

    paths = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not paths:
        return [], {}
    data = jax.profiler.ProfileData.from_file(str(paths[-1]))
    events, lines_seen = [], {}
    for plane in data.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            evs = list(line.events)
            lines_seen[f"{plane.name} | {line.name}"] = len(evs)
            if not any(line.name.startswith(x) for x in _NOT_KERNEL_LINES):
                events += [(ev.name, ev.start_ns, ev.duration_ns) for ev in evs]
    return sorted(events, key=lambda e: e[1]), lines_seen


def busy_ns(events) -> float:
    """Length of the union of the events' (name, start, duration) intervals."""
    events = sorted(events, key=lambda e: e[1])
    busy, cursor = 0.0, events[0][1] if events else 0
    for _, start, dur in events:
        if start + dur > cursor:
            busy += start + dur - max(start, cursor)
            cursor = start + dur
    return busy


def kernel_times(events, calls: int, prefixes: Sequence[str]) -> dict:
    """{group: {us_per_call, launches_per_call}}, largest first, and the totals. A kernel named
    by one of `prefixes` (Pallas name=s, or their common start such as "ssd_") is its own group,
    without the numeric suffix XLA may add; anything else is "xla"."""
    groups: dict[str, list] = {}
    for name, _, dur in events:
        own = any(name.startswith(p) for p in prefixes)
        g = groups.setdefault(re.sub(r"([._]\d+)+$", "", name) if own else "xla", [0.0, 0])
        g[0] += dur
        g[1] += 1
    per = {
        k: dict(us_per_call=t / 1e3 / calls, launches_per_call=n / calls)
        for k, (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])
    }
    return dict(
        calls=calls,
        kernels=per,
        kernel_us_per_call=sum(v["us_per_call"] for v in per.values()),
        busy_us_per_call=busy_ns(events) / 1e3 / calls,
    )


# ------------------------------------------------------------------------------------------------
# Result files.


def split_ext(name: str) -> tuple[str, str]:
    """("scan_nvidia-h200", ".json"); a compressed file keeps both suffixes (".csv.gz"); dots
    inside a variant ("1.4b") stay in the stem."""
    path = pathlib.PurePath(name)
    if path.suffix in _COMPRESSED and pathlib.PurePath(path.stem).suffix:
        inner = pathlib.PurePath(path.stem)
        return inner.stem, inner.suffix + path.suffix
    return path.stem, path.suffix


def result_path(
    benchmark: str,
    slug: str,
    variant: str | None = None,
    *,
    ext: str = ".json",
    out_dir: str | os.PathLike = RESULTS,
) -> pathlib.Path:
    """<out_dir>/<benchmark>_<slug>[_<variant>]<ext>."""
    if not benchmark or not slug:
        raise ValueError(f"benchmark and slug must be non-empty, got {benchmark=}, {slug=}")
    stem = f"{benchmark}_{slug}" + (f"_{variant}" if variant else "")
    return pathlib.Path(out_dir) / f"{stem}{ext}"


def history_path(path: str | os.PathLike, tag: str) -> pathlib.Path:
    """Where `path` goes when superseded: <its folder>/history/<stem>_<tag><ext>."""
    path = pathlib.Path(path)
    stem, ext = split_ext(path.name)
    return path.parent / HISTORY / f"{stem}_{tag}{ext}"


def recorded_commit(path: str | os.PathLike) -> str | None:
    """The git_commit a JSON result names (None: not JSON, or none recorded)."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None
    commit = data.get("git_commit") if isinstance(data, dict) else None
    return str(commit) if commit else None


def retire(
    path: str | os.PathLike, *, commit: str | None, companions: Sequence[str | os.PathLike] = ()
) -> list[pathlib.Path]:
    """Before a run at `commit` replaces the JSON result `path`: if the one there was made at
    another commit (or names none), it and its companions (plots, logs) move to history/ with
    its short commit ("previous" if it names none) appended. Returns where they went; nothing
    moves when the file is absent or of the same commit (it is simply overwritten)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    old = recorded_commit(path)
    if old is not None and commit is not None and old == commit:
        return []
    tag = old[:7] if old else "previous"
    moved = []
    for src in [path, *map(pathlib.Path, companions)]:
        if not src.exists():
            continue
        dst = history_path(src, tag)
        stem, ext = split_ext(dst.name)
        n = 2
        while dst.exists():  # never overwrite history
            dst = dst.with_name(f"{stem}-{n}{ext}")
            n += 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        moved.append(dst)
    return moved


def install(
    src: str | os.PathLike,
    companions: Sequence[str | os.PathLike] = (),
    *,
    results_dir: str | os.PathLike = RESULTS,
) -> list[pathlib.Path]:
    """Copies a JSON result made elsewhere (and its companions) into results_dir under the same
    names, retiring what it replaces (see `retire`). Returns the installed paths."""
    src = pathlib.Path(src)
    results_dir = pathlib.Path(results_dir)
    if not src.is_file():
        raise FileNotFoundError(f"src {src} is not a file")
    companions = [pathlib.Path(c) for c in companions]
    for c in companions:
        if not c.is_file():
            raise FileNotFoundError(f"companion {c} is not a file")
    target = results_dir / src.name
    retire(
        target, commit=recorded_commit(src), companions=[results_dir / c.name for c in companions]
    )
    results_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for f in [src, *companions]:
        shutil.copyfile(f, results_dir / f.name)
        installed.append(results_dir / f.name)
    return installed


def run_script_child(
    script: str | os.PathLike, spec: dict, spec_path: pathlib.Path, env: dict, timeout: float
) -> tuple[dict | None, bool, int]:
    """Runs `script --_child SPEC` in its own process group (so a hung child and its workers die
    together at the time budget) and returns (the JSON it wrote to spec["result_path"] or None,
    whether it was killed, its return code). A child per measurement keeps peak memory, XLA
    flags and an out-of-memory crash apart from the other measurements."""
    spec["result_path"] = str(spec_path.with_suffix(".result.json"))
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, str(script), "--_child", str(spec_path)],
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    killed = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        killed = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result_path = pathlib.Path(spec["result_path"])
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return result, killed, proc.returncode


@dataclasses.dataclass(frozen=True)
class NewResult:
    """Where a run writes: its device, header, result file and the companions' paths."""

    info: DeviceInfo
    header: dict
    path: pathlib.Path
    companions: list[pathlib.Path]


def new_result(
    benchmark: str,
    *,
    script: str | os.PathLike,
    argv: Sequence[str],
    out_dir: str | os.PathLike,
    smoke: bool = False,
    variant: str | None = None,
    companions: Sequence[str] = (),
    device=None,
) -> NewResult:
    """The start of a run that replaces its result file: the device, the header, the path
    (result_path; --smoke adds the variant "smoke"), the companions' paths (the file's stem +
    each suffix, e.g. ".png", "_loss.png"), and what was there retired (printed)."""
    info = device_info(device)
    head = header(info, script=script, argv=argv)
    variant = "_".join(v for v in (variant, "smoke" if smoke else None) if v) or None
    path = result_path(benchmark, info.slug, variant, out_dir=out_dir)
    stem, _ = split_ext(path.name)
    others = [path.with_name(stem + suffix) for suffix in companions]
    for moved in retire(path, commit=head["git_commit"], companions=others):
        print(f"{benchmark}: moved the previous result to {moved}", file=sys.stderr)
    return NewResult(info=info, header=head, path=path, companions=others)


def write_json(path: str | os.PathLike, data) -> pathlib.Path:
    """Writes data as indented JSON through a temporary file, so a run killed while writing
    leaves the previous version whole (scripts rewrite their result after every measurement)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Command line.


def common_args(
    *, out_help: str | None = None, out_default=RESULTS, out_required: bool = False
) -> argparse.ArgumentParser:
    """The options every benchmark takes (an argparse parent): --out and --smoke."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=out_default,
        required=out_required,
        help=out_help
        or "folder for the result files (default benchmarks/results/); "
        "a file there made at another commit moves to its history/",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, seconds on CPU: checks the script, measures nothing "
        "(result files get the variant _smoke)",
    )
    return p


def argument_parser(doc: str, **common) -> argparse.ArgumentParser:
    """A parser whose --help prints the script's docstring, with common_args(**common)."""
    return argparse.ArgumentParser(
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_args(**common)],
    )


def add_layer_args(
    parser: argparse.ArgumentParser, *, remat: bool = True, scan_layers: bool = True
) -> None:
    """--remat [POLICY] (config.REMAT; bare --remat: full) and --scan-layers."""
    from jax_packmamba.config import REMAT

    if remat:
        parser.add_argument(
            "--remat",
            nargs="?",
            const="full",
            default="none",
            choices=REMAT,
            help="remat policy per layer (bare --remat: full)",
        )
    if scan_layers:
        parser.add_argument(
            "--scan-layers",
            action="store_true",
            help="run the layers under one lax.scan (config.scan_layers; default: unrolled)",
        )


def add_anchor_args(parser: argparse.ArgumentParser) -> None:
    """--anchor DIR and --anchor-pythonpath PATH: see run_anchor."""
    parser.add_argument(
        "--anchor",
        type=pathlib.Path,
        default=None,
        help="folder of the PyTorch anchor scripts (mamba_ssm side, not in the "
        "repository); its <benchmark>.py runs in the same call and its JSON "
        "goes into the result under 'anchor'",
    )
    parser.add_argument(
        "--anchor-pythonpath",
        default="",
        help="PYTHONPATH for the anchor script (where torch and mamba_ssm are)",
    )


def run_anchor(
    script: str | os.PathLike,
    *,
    pythonpath: str,
    args: Sequence[str] = (),
    timeout: float = 600.0,
    python: str = sys.executable,
) -> dict:
    """Runs a PyTorch anchor script as the anchor scripts take their arguments, `python SCRIPT
    FILE ARGS...` (FILE: the JSON it writes), with PYTHONPATH set to `pythonpath` only, and
    returns {"status": "ok", "result": the JSON it wrote to FILE, ...};
    status "error" (with the return code and the end of its output) or "timeout" otherwise."""
    import tempfile

    script = pathlib.Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"anchor script {script} is not a file")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory(prefix="anchor_") as tmp:
        out = pathlib.Path(tmp) / "anchor.json"
        cmd = [python, str(script), str(out), *args]
        record = dict(script=script.name, args=list(args), pythonpath=pythonpath)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(record, status="timeout", wall_s=time.perf_counter() - t0)
        record.update(wall_s=time.perf_counter() - t0, returncode=proc.returncode)
        if proc.returncode != 0 or not out.exists():
            return dict(record, status="error", output_tail=(proc.stdout + proc.stderr)[-3000:])
        return dict(record, status="ok", result=json.loads(out.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="verb", required=True)
    inst = sub.add_parser(
        "install",
        help="copy a result into benchmarks/results/, retiring the one it replaces to history/",
    )
    inst.add_argument("src", type=pathlib.Path, help="the JSON result")
    inst.add_argument("companions", nargs="*", type=pathlib.Path, help="its plots, logs")
    inst.add_argument(
        "--results",
        type=pathlib.Path,
        default=RESULTS,
        help="results folder (default benchmarks/results/)",
    )
    args = ap.parse_args(argv)
    try:
        for path in install(args.src, args.companions, results_dir=args.results):
            print(f"installed {path}")
    except FileNotFoundError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
