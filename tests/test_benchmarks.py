"""benchmarks/: the shared harness, and every script's --help and CPU smoke path.

Each smoke runs the script as a user would (a subprocess, PYTHONPATH=repository) and checks the
JSON it wrote: the harness header and the fields its consumers read.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import harness, plot_train, workloads
from jax_packmamba.corpus import stdlib_documents
from tests.compiled import cpu_xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADER = (
    "device",
    "device_name",
    "kind",
    "backend",
    "jax_version",
    "date",
    "git_commit",
    "command",
)
SCRIPTS = (
    "bench_scan",
    "bench_ssd",
    "bench_kernels",
    "bench_train",
    "bench_generate",
    "breakdown",
    "plot_train",
    "train_gpu",
    "anchor_mamba2",
    "bench_scaling",
    "probes/psum_bandwidth",
    "probes/compile_time",
    "bench_ssd_chunk_scan",
    "bench_long_docs",
    "bench_loss",
    "bamba_torch",
    "bench_mamba3",
    "mamba3_torch",
)


def run_script(script: str, *args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=cpu_xla_flags(os.environ.get("XLA_FLAGS", "")),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def check_header(data: dict, script: str, *, device=True):
    missing = [k for k in HEADER if k not in data]
    assert not missing, missing
    assert data["command"].startswith(f"PYTHONPATH=. python3 benchmarks/{script}.py")
    assert data["jax_version"] and data["date"] and data["git_commit"]
    if device:
        assert data["backend"] == "cpu" and data["kind"] == "cpu" and data["device"] == "cpu"


# ------------------------------------------------------------------------------------------------
# Harness.


def fake_clock(group_seconds):
    """A clock that advances by the next of group_seconds between a group's start and end."""
    ticks = iter(np.cumsum([0.0] + [x for s in group_seconds for x in (s, 0.0)]))
    return lambda: float(next(ticks))


def test_time_calls_rotates_inputs_blocks_per_group_and_takes_the_median():
    calls, blocked = [], []
    timing = harness.time_calls(
        lambda x: calls.append(x) or x * 10,
        [(1,), (2,), (3,)],
        warmup=2,
        groups=3,
        per_group=4,
        keep_outputs=True,
        clock=fake_clock([0.5, 0.25, 2.0]),
        block=blocked.append,
    )
    assert calls == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]  # 2 warm-up + 3 x 4
    # Each warm-up call alone, then each group's 4 outputs at once.
    assert [len(b[1]) if isinstance(b[1], list) else 1 for b in blocked] == [1, 1, 4, 4, 4]
    assert timing.group_s == [0.125, 0.0625, 0.5]  # group seconds / calls per group
    assert (timing.median_s, timing.min_s, timing.max_s) == (0.125, 0.0625, 0.5)
    assert timing.outputs == [10 * c for c in calls[2:]]


def test_time_calls_threads_a_state_through_the_calls():
    def step(state, x):
        return state + x, f"out{state}"

    timing = harness.time_calls(
        step,
        [(1,), (100,)],
        state=0,
        warmup=1,
        groups=2,
        per_group=2,
        keep_outputs=True,
        clock=fake_clock([1.0, 1.0]),
        block=lambda x: x,
    )
    assert timing.state == 1 + 100 + 1 + 100 + 1  # 5 calls, inputs alternating
    assert timing.outputs == ["out1", "out101", "out102", "out202"]


def test_time_calls_blocks_on_real_arrays_and_rejects_bad_counts():
    import jax.numpy as jnp

    timing = harness.time_calls(lambda x: x + 1, [(jnp.ones(3),)], warmup=1, groups=2, per_group=2)
    assert len(timing.group_s) == 2 and timing.min_s <= timing.median_s <= timing.max_s
    for bad in (dict(groups=0), dict(per_group=0), dict(warmup=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            harness.time_calls(lambda: None, [()], **bad)
    with pytest.raises(ValueError, match="inputs"):
        harness.time_calls(lambda: None, [])


def test_rotation_count_makes_the_rotated_data_exceed_the_l2():
    mib = 2**20
    assert harness.rotation_count(10 * mib, backend="cpu") == 1
    assert harness.rotation_count(268 * mib, backend="gpu") == 2  # never one set on a GPU
    assert harness.rotation_count(50 * mib, backend="gpu", l2_bytes=60 * mib) == 3
    assert harness.rotation_count(1 * mib, backend="gpu", l2_bytes=60 * mib) == 120
    for b in (10 * mib, 50 * mib, 7 * mib):
        n = harness.rotation_count(b, backend="gpu")
        assert n * b >= 2 * harness.L2_BYTES > (n - 1) * b or n == 2
    with pytest.raises(ValueError, match="bytes_per_set"):
        harness.rotation_count(0, backend="gpu")


def test_tree_bytes_sums_the_arrays():
    assert harness.tree_bytes((np.zeros((4, 8), np.float32), {"a": np.zeros(3, np.int8)})) == 131


def test_device_slug_and_info():
    assert harness.device_slug("NVIDIA H200", "gpu") == "nvidia-h200"
    assert harness.device_slug("NVIDIA H100 80GB HBM3", "gpu") == "nvidia-h100"
    assert harness.device_slug("Some GPU (rev 2)", "gpu") == "some-gpu-rev-2"
    assert harness.device_slug("whatever", "cpu") == "cpu"
    info = harness.device_info()
    assert (info.backend, info.slug) == ("cpu", "cpu") and info.name


def test_git_commit_and_header(monkeypatch):
    monkeypatch.setenv("PACKMAMBA_GIT_COMMIT", "c0ffee1234")
    assert harness.git_commit() == "c0ffee1234"
    head = harness.header(
        harness.device_info(),
        script=REPO / "benchmarks" / "bench_scan.py",
        argv=["--shapes", "0,1", "--out", "a b"],
    )
    check_header(head, "bench_scan")
    assert head["git_commit"] == "c0ffee1234"
    assert (
        head["command"] == "PYTHONPATH=. python3 benchmarks/bench_scan.py --shapes 0,1 --out 'a b'"
    )
    monkeypatch.delenv("PACKMAMBA_GIT_COMMIT")
    commit = harness.git_commit()  # the worktree's HEAD
    assert commit and len(commit) == 40
    assert harness.header(None, script="x.py", argv=[])["device"] is None


def test_result_and_history_names():
    out = pathlib.Path("/r")
    assert harness.result_path("scan", "nvidia-h200", out_dir=out) == out / "scan_nvidia-h200.json"
    assert (
        harness.result_path("train_gpu", "cpu", "1dev_smoke", out_dir=out)
        == out / "train_gpu_cpu_1dev_smoke.json"
    )
    assert (
        harness.result_path("ncu_scan", "nvidia-h200", "sass", ext=".csv.gz", out_dir=out)
        == out / "ncu_scan_nvidia-h200_sass.csv.gz"
    )
    assert (
        harness.history_path(out / "ncu_scan_nvidia-h200_sass.csv.gz", "abc1234")
        == out / "history" / "ncu_scan_nvidia-h200_sass_abc1234.csv.gz"
    )
    assert (
        harness.history_path(out / "train_nvidia-h200_1.4b.json", "abc1234")
        == out / "history" / "train_nvidia-h200_1.4b_abc1234.json"
    )
    assert harness.split_ext("a_1.4b.png") == ("a_1.4b", ".png")
    with pytest.raises(ValueError, match="slug"):
        harness.result_path("scan", "")


def test_retire_moves_a_result_of_another_commit_to_history(tmp_path):
    path = harness.write_json(tmp_path / "gen_cpu.json", dict(git_commit="a" * 40, v=1))
    png = tmp_path / "gen_cpu.png"
    png.write_bytes(b"png")
    assert not list(tmp_path.glob("*.tmp"))
    assert harness.retire(path, commit="a" * 40, companions=[png]) == []  # same commit: stays
    moved = harness.retire(path, commit="b" * 40, companions=[png, tmp_path / "absent.txt"])
    assert moved == [
        tmp_path / "history" / "gen_cpu_aaaaaaa.json",
        tmp_path / "history" / "gen_cpu_aaaaaaa.png",
    ]
    assert not path.exists() and not png.exists()
    assert json.loads(moved[0].read_text())["v"] == 1 and moved[1].read_bytes() == b"png"
    harness.write_json(path, dict(git_commit="a" * 40, v=2))  # the same commit again: no overwrite
    assert harness.retire(path, commit="b" * 40) == [
        tmp_path / "history" / "gen_cpu_aaaaaaa-2.json"
    ]
    path.write_text("{}")  # no commit recorded
    assert harness.retire(path, commit="b" * 40) == [tmp_path / "history" / "gen_cpu_previous.json"]
    assert harness.retire(tmp_path / "none.json", commit="b" * 40) == []


def test_new_result_names_the_file_and_retires_what_it_replaces(tmp_path, monkeypatch):
    monkeypatch.setenv("PACKMAMBA_GIT_COMMIT", "b" * 40)
    harness.write_json(tmp_path / "gen_cpu_2dev_smoke.json", dict(git_commit="a" * 40))
    (tmp_path / "gen_cpu_2dev_smoke_loss.png").write_bytes(b"png")
    new = harness.new_result(
        "gen",
        script="benchmarks/x.py",
        argv=["--smoke"],
        out_dir=tmp_path,
        smoke=True,
        variant="2dev",
        companions=["_loss.png", ".txt"],
    )
    assert new.path == tmp_path / "gen_cpu_2dev_smoke.json"
    assert new.companions == [
        tmp_path / "gen_cpu_2dev_smoke_loss.png",
        tmp_path / "gen_cpu_2dev_smoke.txt",
    ]
    assert new.header["git_commit"] == "b" * 40 and new.info.slug == "cpu"
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == [
        "gen_cpu_2dev_smoke_aaaaaaa.json",
        "gen_cpu_2dev_smoke_loss_aaaaaaa.png",
    ]
    assert (
        harness.new_result("gen", script="x.py", argv=[], out_dir=tmp_path).path
        == tmp_path / "gen_cpu.json"
    )


def test_parse_shape():
    assert workloads.parse_shape("8:2048:4096:16") == (8, 2048, 4096, 16)
    for bad in ("1:2", "1:2:3:x", "0:1:1:1"):
        with pytest.raises(ValueError, match="b:l:d:n"):
            workloads.parse_shape(bad)


def test_install_copies_a_result_in_and_retires_the_old_one(tmp_path):
    results, made = tmp_path / "results", tmp_path / "device"
    harness.write_json(results / "scan_x.json", dict(git_commit="1" * 40))
    (results / "scan_x.png").parent.mkdir(exist_ok=True)
    (results / "scan_x.png").write_bytes(b"old")
    harness.write_json(made / "scan_x.json", dict(git_commit="2" * 40))
    (made / "scan_x.png").write_bytes(b"new")
    assert (
        harness.main(
            [
                "install",
                str(made / "scan_x.json"),
                str(made / "scan_x.png"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    assert json.loads((results / "scan_x.json").read_text())["git_commit"] == "2" * 40
    assert (results / "scan_x.png").read_bytes() == b"new"
    assert (results / "history" / "scan_x_1111111.png").read_bytes() == b"old"
    assert (results / "history" / "scan_x_1111111.json").exists()
    with pytest.raises(SystemExit) as e:
        harness.main(["install", str(made / "missing.json"), "--results", str(results)])
    assert e.value.code == 2


def test_common_args_parse_out_and_smoke(tmp_path):
    ap = harness.argument_parser("doc")
    args = ap.parse_args([])
    assert args.out == harness.RESULTS and not args.smoke
    args = ap.parse_args(["--out", str(tmp_path), "--smoke"])
    assert args.out == tmp_path and args.smoke
    harness.add_anchor_args(ap)
    assert ap.parse_args(["--anchor", "x"]).anchor == pathlib.Path("x")


def test_run_anchor_collects_the_json_its_script_writes(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fake_torch.py").write_text("VERSION = '9.9'\n")
    script = tmp_path / "scan.py"
    script.write_text(
        "import json, sys, fake_torch\n"
        "json.dump(dict(torch=fake_torch.VERSION, args=sys.argv[2:]), open(sys.argv[1], 'w'))\n"
    )
    r = harness.run_anchor(script, pythonpath=str(lib), args=["--shapes", "1:2:3:4"])
    assert r["status"] == "ok" and r["returncode"] == 0
    assert r["result"] == dict(torch="9.9", args=["--shapes", "1:2:3:4"])
    r = harness.run_anchor(script, pythonpath="")  # fake_torch is not importable
    assert r["status"] == "error" and "fake_torch" in r["output_tail"]
    with pytest.raises(FileNotFoundError, match="anchor script"):
        harness.run_anchor(tmp_path / "absent.py", pythonpath="")


def test_scan_config_overrides_are_typed_by_the_field():
    assert workloads.scan_config_overrides(
        ["window=2", "prefetch=0", "reduce=tree", "grads_maxnreg=none", "window_rows=true"]
    ) == dict(window=2, prefetch=False, reduce="tree", grads_maxnreg=None, window_rows=True)
    with pytest.raises(ValueError, match="no field 'windw'"):
        workloads.scan_config_overrides(["windw=2"])
    with pytest.raises(ValueError, match="field=value"):
        workloads.scan_config_overrides(["window"])


# ------------------------------------------------------------------------------------------------
# Every script: --help, and its smoke path.


# Runs each script as `python SCRIPT --help` would, all in one process (each would otherwise
# start jax on its own): {script: (exit code, stdout)} as JSON.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
texts = {}
for script in sys.argv[1:]:
    sys.argv, out, code = [script, "--help"], io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
    texts[script] = (code, out.getvalue())
print(json.dumps(texts))
"""


@functools.cache
def help_texts() -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, *(f"benchmarks/{s}.py" for s in SCRIPTS)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    code, text = help_texts()[f"benchmarks/{script}.py"]
    assert code in (0, None) and text.startswith("usage:"), (code, text[:500])
    # The docstring is the help: its first line is there.
    doc = ast.get_docstring(ast.parse((REPO / "benchmarks" / f"{script}.py").read_text()))
    assert doc.splitlines()[0][:60] in " ".join(text.split())


def smoke_bench_scan(out, data):
    impls = {r["impl"].split("[")[0]: r for r in data["timings"]}
    assert sorted(impls) == ["pallas", "xla_reference"]
    for r in impls.values():
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["input_sets"] == 1
    assert impls["pallas"]["ratio_fwd_bwd_vs_mamba"] > 0 and data["anchors_ms"]


def smoke_compile_time_kernels(out, data):
    assert (data["part"], data["remat"], data["preset"]) == ("kernels", "none", "mamba2-1.3b")
    assert [r["run"] for r in data["runs"]] == ["first", "cached"]
    for r in data["runs"]:
        assert r["part"] == "kernels" and r["compile_s"] > 0
        assert r["memory_analysis"]["temp_size_in_bytes"] > 0


def smoke_breakdown(out, data):
    ((key, record),) = data.items()
    assert key == "tiny/packed/2x64/model:n_layer=1,d_model=32,d_state=4"
    check_header(record, "breakdown")
    for name in ("step", "opt", "matmul", "fwd", "fwd_noscan"):
        v = record["variants"][name]
        assert v["status"] == "ok" and v["ms"] > 0 and len(v["times_ms"]) == 2
    assert record["variants"]["fwd"]["scan_in_module"]
    assert not record["variants"]["fwd_noscan"]["scan_in_module"]
    assert record["parts"]["scan_forward"] == pytest.approx(
        record["variants"]["fwd"]["ms"] - record["variants"]["fwd_noscan"]["ms"]
    )
    assert record["real_tokens"] > 0 and record["parts"]["step"] > 0


def smoke_bench_generate(out, data):
    assert list(data["settings"]) == ["blog", "fast"]
    assert data["settings"]["blog"]["sampling"] == dict(
        temperature=0.7, top_p=0.9, repetition_penalty=1.2
    )
    assert "repetition_penalty" not in data["settings"]["fast"]["sampling"]
    for setting in data["settings"].values():
        rows = setting["ours"]["rows"]
        assert [r["batch"] for r in rows] == [1, 2]
        for r in rows:
            assert r["total_s"] == pytest.approx(r["prefill_s"] + r["decode_s"])
            assert r["decode_ms_per_step"] > 0 and r["first_call_s"] > 0 and r["compile_s"] >= 0
        assert [c["batch"] for c in setting["comparison"]] == [1, 2]
    assert data["preset"] == "tiny" and data["new_tokens"] == 8 and data["device"]
    # --state-dtype auto (the default): the bfloat16 model's bfloat16 state, no file variant.
    assert out.name == "generate_cpu_smoke.json" and data["dtype"] == "bfloat16"
    assert data["state_dtype"] == "bfloat16" and data["state_dtype_arg"] == "auto"
    assert all(s["ours"]["state_dtype"] == "bfloat16" for s in data["settings"].values())
    assert set(data["targets"]) == {"blog", "fast"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def smoke_bench_generate_mamba2_f32state(out, data):
    # A Mamba2 preset with the top-p prefilter K and --state-dtype float32 (not the bfloat16
    # model's default) in one run: both recorded, and the files named apart from the default's.
    assert data["preset"] == "mamba2-tiny" and list(data["settings"]) == ["fast"]
    assert data["prefilter"] == 8 and data["dtype"] == "bfloat16"
    assert out.name == "generate_cpu_f32state_smoke.json" and data["state_dtype"] == "float32"
    assert data["state_dtype_arg"] == "float32"
    ours = data["settings"]["fast"]["ours"]
    assert ours["config"]["headdim"] == 16  # a Mamba2Config
    assert ours["state_dtype"] == "float32" and ours["decode_impl"] == "pallas_interpret"
    assert "mamba_ssm" not in data["settings"]["fast"]  # no --anchor given
    (row,) = ours["rows"]
    assert row["batch"] == 1 and row["decode_ms_per_step"] > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def assert_layer_check(data, check):
    """The Pallas layer step against XLA's (max relative differences): within 1e-3, the state
    within a rounding of its dtype (the default bfloat16 state: the two steps may round an
    element differently, 2^-8 relative at most)."""
    assert data["state_dtype"] == "bfloat16"  # the smokes' default: the bfloat16 model's
    assert check["residual"] < 1e-3 and check["conv"] < 1e-3, check
    assert check["ssm"] < 2**-8, check


def smoke_bench_generate_profile(out, data):
    results = {(r["batch"], r["impl"]): r for r in data["results"]}
    assert set(results) == {(1, "xla"), (1, "pallas_interpret")}
    assert all(r["decode_ms_per_step"] > 0 for r in results.values())
    # The kernels through the interpreter match the XLA step on this device.
    assert_layer_check(data, results[(1, "pallas_interpret")]["layer_check_vs_xla"])
    assert "error" in results[(1, "xla")]["kernels"]  # no GPU on CPU
    assert "batch 1, decode_impl xla" in out.with_suffix(".txt").read_text()


def smoke_bench_generate_profile_mamba2(out, data):
    # With --defer-norm: the decode loop's Mamba2 blocks hand their norm's scale to the next
    # add (MAMBA2_DEFER_NORM), through the interpreter; the files are named apart.
    results = {(r["batch"], r["impl"]): r for r in data["results"]}
    assert set(results) == {(1, "xla"), (1, "pallas_interpret")}
    assert all(r["decode_ms_per_step"] > 0 for r in results.values())
    assert data["preset"] == "mamba2-tiny" and data["setting"] == "fast"
    assert out.name == "generate_cpu_profile_defernorm_smoke.json"
    assert data["state_dtype"] == "bfloat16" and "--defer-norm" in data["command"]
    assert_layer_check(data, results[(1, "pallas_interpret")]["layer_check_vs_xla"])


def smoke_bench_kernels(out, data):
    [conv] = data["conv"]
    assert conv["shape"] == [1, 64, 96] and conv["fwdbwd_ms"]["median_ms"] > 0
    assert [d["batch"] for d in data["decode"]] == [2] and data["decode"][0]["step_ms"][
        "median_ms"
    ] > 0
    assert [n["kind"] for n in data["norms"]] == ["add", "stream", "gated"]
    for n in data["norms"]:
        for impl in ("reference", "pallas"):
            assert n[impl]["fwd_ms"]["median_ms"] > 0 and n[impl]["fwdbwd_ms"]["median_ms"] > 0


def smoke_bench_kernels_decode_sweep(out, data):
    # mixer_pallas with in_proj unfused, then fused.
    assert [m["config"]["fuse_in_proj"] for m in data["mixer"]] == [False, True]
    assert [m["batch"] for m in data["mixer_core"]] == [2, 2]
    for m in data["mixer"] + data["mixer_core"]:
        assert m["median_us"] > 0


def smoke_train_gpu(out, data):
    # (was tests/test_train.py's test_gpu_benchmark_script_on_cpu)
    for key in (
        "loss_first",
        "loss_last",
        "tokens_per_s",
        "tokens_per_s_per_device",
        "mfu",
        "device_kind",
        "jax_version",
        "date",
        "command",
    ):
        assert key in data
    assert data["steps"] == 3 and data["num_devices"] == 1
    assert "--model.n_layer=1" in data["command"]
    for name in ("metrics.jsonl", "loss.png"):
        assert (out.parent / f"{out.stem}_{name}").stat().st_size > 0


def smoke_ssd_chunk_scan(out, data):
    (row,) = data["results"]
    assert row["shape"]["length"] == 200 and data["chunk"] == 128
    assert row["triton"]["median_ms"] > 0 and row["triton"]["compile_s"] > 0
    mosaic = row["mosaic"]
    assert mosaic["median_ms"] > 0 and mosaic["over_triton"] > 0
    assert mosaic["max_abs_diff_over_max_abs"] < 1e-2


def smoke_mamba3(out, data):
    rows = {(r["impl"], r["chunk"]): r for r in data["timings"]}
    assert set(rows) == {("pallas", 32), ("reference", 32)}
    for r in rows.values():
        assert r["shape"] == [1, 80] and r["fwd_ms"]["median_ms"] > 0
        assert r["fwdbwd_ms"]["median_ms"] > 0 and r["compile_s_fwdbwd"] > 0
    # bf16 outputs: the kernels' against the reference's, within a few roundings.
    assert rows["pallas", 32]["max_diff_over_max_ref"] < 2e-2


def smoke_mamba3_mimo(out, data):
    rows = {r["impl"]: r for r in data["timings"]}
    assert set(rows) == {"pallas", "reference_fused", "reference"} and data["mimo_rank"] == 4
    for r in rows.values():
        assert r["shape"] == [1, 80] and r["chunk"] == 8 and "error" not in r
        assert r["fwd_ms"]["median_ms"] > 0 and r["fwdbwd_ms"]["median_ms"] > 0
    # The fused forms against the R^2 heads, bf16 outputs: within a few roundings.
    assert rows["pallas"]["max_diff_over_max_ref"] < 2e-2
    assert rows["reference_fused"]["max_diff_over_max_ref"] < 2e-2


def test_bench_mamba3_splits_the_glue_by_source_line():
    from benchmarks import bench_mamba3

    events = [
        ("ssd_chunk_scan", 0, 4000.0),
        ("loop_multiply_fusion.3", 10, 3000.0),
        ("loop_multiply_fusion_3", 20, 1000.0),
        ("input_reduce_fusion", 30, 500.0),
        ("nameless_kernel", 40, 250.0),
    ]
    sources = {
        "loop_multiply_fusion_3": "mamba3.py:190 rotate_pairs fwd",
        "input_reduce_fusion": "mamba3.py:379 _siso bwd",
    }
    got = bench_mamba3.xla_by_source(events, sources, calls=2)
    assert list(got) == [
        "mamba3.py:190 rotate_pairs fwd",
        "mamba3.py:379 _siso bwd",
        "? nameless_kernel",
    ]
    assert got["mamba3.py:190 rotate_pairs fwd"] == dict(
        us_per_call=2.0, kernels=["loop_multiply_fusion.3", "loop_multiply_fusion_3"]
    )
    assert got["? nameless_kernel"]["us_per_call"] == 0.125


def test_mamba3_torch_times_the_same_heads_as_bench_mamba3():
    from benchmarks import bench_mamba3, mamba3_torch

    torch_side = (mamba3_torch.HEADS, mamba3_torch.HEADDIM, mamba3_torch.D_STATE)
    ours = bench_mamba3.HEADS
    assert torch_side + (mamba3_torch.N_ANGLES,) == (
        ours["heads"],
        ours["headdim"],
        ours["d_state"],
        ours["n_angles"],
    )
    assert bench_mamba3.SHAPES == [(1, 16384), (8, 2048)] and bench_mamba3.NUM_SEGMENTS == 64


def smoke_psum_bandwidth(out, data):
    assert data["devices"] == 4  # the smoke's host devices
    rows = {(r["op"], r["dtype"], r["bytes"]) for r in data["rows"]}
    assert len(rows) == 3 * 2 * 3  # ops x dtypes x sizes
    for r in data["rows"]:
        assert r["median_ms"] > 0 and r["busbw_GBps"] == pytest.approx(
            r["algbw_GBps"] * (1.5 if r["op"] == "all_reduce" else 0.75)
        )
    est = data["gradient_estimates"]["130m"]
    assert est["float32"]["bytes"] == 2 * est["bfloat16"]["bytes"] == 4 * est["num_params"]
    assert est["float32"]["how"] == "extrapolated" and est["float32"]["all_reduce_ms"] > 0


def smoke_bench_scaling(out, data):
    recs = data["records"]
    assert data["host_devices"] == 4
    assert sorted(recs) == ["tiny/fsdp/auto/overlap-on/2", "tiny/single/auto/overlap-on/1"]
    for r in recs.values():
        assert r["status"] == "ok" and r["finite_loss"], r
        assert r["tokens_per_s"] > 0 and r["step_time_s_median"] > 0 and r["compile_s"] > 0
        assert r["real_tokens_per_step"] == pytest.approx(r["n"] * 2 * 64 * r["real_fraction"])
        assert r["baseline"]["same_invocation"]
        assert r["efficiency"] == pytest.approx(
            r["tokens_per_s"] / (r["n"] * r["baseline"]["tokens_per_s"])
        )
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in r["xla_flags"].split()
    two = recs["tiny/fsdp/auto/overlap-on/2"]
    assert two["mesh"] == {"data": 1, "fsdp": 2} and two["collectives"]
    assert two["profile"]["steps"] == 2 and (out.parent / two["profile"]["trace_file"]).exists()
    assert "profile" not in recs["tiny/single/auto/overlap-on/1"]
    assert out.with_name(out.stem + "_scaling.png").read_bytes()[:4] == b"\x89PNG"


def smoke_bench_loss(out, data):
    rows = data["results"]
    assert [r["variant"] for r in rows] == ["full", "chunked_16", "chunked_64"]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["grad_ms"] > 0 and r["grad_temp_bytes"] > 0
    # 16-token chunks of 128 tokens hold less than the full logits.
    assert rows[1]["grad_temp_bytes"] < rows[0]["grad_temp_bytes"]


def smoke_bench_long_docs(out, data):
    # Two of the three modes (link trains through the trainer in tests/test_links.py; each mode
    # here is a training run and two evaluation programs).
    assert data["eval_documents"] >= 1 and len(data["results"]) == 4
    # --stream-groups 2: link_across_steps trained with two groups of row streams only.
    labels = ["cut", "link_across_steps_g2"]
    assert data["modes"] == list(data["seconds"]) == list(data["train_loss"]) == labels
    assert all(np.isfinite(x) for x in data["train_loss"].values())
    for name, row in data["results"].items():
        assert np.isfinite(row["mean"]) and row["by_position"], name
    first = [next(iter(r["by_position"].values())) for r in data["results"].values()]
    # Within the first row both readings are the same computation.
    assert first[0] == first[1] and first[2] == first[3]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# case: (script, its arguments given the output folder, the JSON it writes there, the check,
# what header it has: True of this machine, False without a device, None in each record)
SMOKES = {
    "bench_scan": (
        "bench_scan",
        lambda d: ["--smoke", "--out", d],
        "scan_cpu_smoke.json",
        smoke_bench_scan,
        True,
    ),
    "bench_kernels": (
        "bench_kernels",
        lambda d: ["--smoke", "--out", d],
        "kernels_cpu_smoke.json",
        smoke_bench_kernels,
        True,
    ),
    "bench_kernels_decode_sweep": (
        "bench_kernels",
        lambda d: ["--smoke", "--decode-sweep", "--out", d],
        "kernels_decode_sweep_cpu_smoke.json",
        smoke_bench_kernels_decode_sweep,
        True,
    ),
    "breakdown": (
        "breakdown",
        lambda d: ["--smoke", "--variants", "step,opt,matmul,fwd,fwd_noscan", "--out", d],
        "breakdown_cpu_smoke.json",
        smoke_breakdown,
        None,
    ),
    "bench_generate_mamba2_f32state": (
        "bench_generate",
        lambda d: [
            "--smoke",
            "--preset",
            "mamba2-tiny",
            "--settings",
            "fast",
            "--batches",
            "1",
            "--prefilter",
            "8",
            "--state-dtype",
            "float32",
            "--decode-impl",
            "pallas_interpret",
            "--out",
            d,
        ],
        "generate_cpu_f32state_smoke.json",
        smoke_bench_generate_mamba2_f32state,
        True,
    ),
    "bench_generate_profile": (
        "bench_generate",
        lambda d: [
            "--smoke",
            "--profile",
            "--profile-batches",
            "1",
            "--profile-steps",
            "2",
            "--trace-steps",
            "1",
            "--out",
            d,
        ],
        "generate_cpu_profile_smoke.json",
        smoke_bench_generate_profile,
        True,
    ),
    "bench_generate_profile_mamba2": (
        "bench_generate",
        lambda d: [
            "--smoke",
            "--profile",
            "--preset",
            "mamba2-tiny",
            "--settings",
            "fast",
            "--profile-batches",
            "1",
            "--profile-steps",
            "2",
            "--trace-steps",
            "1",
            "--defer-norm",
            "--out",
            d,
        ],
        "generate_cpu_profile_defernorm_smoke.json",
        smoke_bench_generate_profile_mamba2,
        True,
    ),
    "train_gpu": (
        "train_gpu",
        lambda d: [
            "--smoke",
            "--steps=3",
            "--out",
            d,
            "--",
            "--model.n_layer=1",
            "--data.seq_len=64",
        ],
        "train_gpu_cpu_1dev_smoke.json",
        smoke_train_gpu,
        True,
    ),
    "bench_loss": (
        "bench_loss",
        lambda d: ["--smoke", "--out", d],
        "loss_cpu_smoke.json",
        smoke_bench_loss,
        True,
    ),
    "bench_long_docs": (
        "bench_long_docs",
        lambda d: [
            "--smoke",
            "--modes",
            "cut,link_across_steps",
            "--stream-groups",
            "2",
            "--out",
            d,
        ],
        "long_docs_cpu_smoke.json",
        smoke_bench_long_docs,
        True,
    ),
    "bench_mamba3": (
        "bench_mamba3",
        lambda d: ["--smoke", "--out", d],
        "mamba3_cpu_smoke.json",
        smoke_mamba3,
        True,
    ),
    "bench_mamba3_mimo": (
        "bench_mamba3",
        lambda d: ["--smoke", "--mimo-rank", "4", "--out", d],
        "mamba3_cpu_mimo4_smoke.json",
        smoke_mamba3_mimo,
        True,
    ),
    "bench_ssd_chunk_scan": (
        "bench_ssd_chunk_scan",
        lambda d: ["--smoke", "--out", d],
        "ssd_chunk_scan_mosaic_cpu_smoke.json",
        smoke_ssd_chunk_scan,
        True,
    ),
    "compile_time_kernels": (
        "probes/compile_time",
        lambda d: ["--smoke", "--preset", "mamba2-1.3b", "--part", "kernels", "--out", d],
        "compile_time_cpu_smoke.json",
        smoke_compile_time_kernels,
        True,
    ),
    "psum_bandwidth": (
        "probes/psum_bandwidth",
        lambda d: ["--smoke", "--out", d],
        "psum_bandwidth_cpu_4dev_smoke.json",
        smoke_psum_bandwidth,
        True,
    ),
    "bench_scaling": (
        "bench_scaling",
        lambda d: [
            "--smoke",
            "--counts",
            "1,2",
            "--layouts",
            "fsdp",
            "--overlap",
            "on",
            "--profile",
            "--out",
            d,
        ],
        "scaling_cpu_4dev_smoke.json",
        smoke_bench_scaling,
        True,
    ),
}


# bench_scaling: about 25 s (three processes start jax, two compile a step); bench_long_docs:
# about 60 s (two short training runs).
# bench_mamba3: about 50 s (interpreted kernels' fwd+bwd compile); its MIMO smoke about 15 s.
SLOW_SMOKES = (
    "bench_scaling",
    "bench_long_docs",
    "bench_generate_profile_mamba2",
    "bench_mamba3",
    "bench_mamba3_mimo",
)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_SMOKES else c for c in SMOKES]
)
def test_smoke(case, tmp_path):
    script, args, name, check, device_header = SMOKES[case]
    proc = run_script(script, *args(tmp_path))
    assert proc.returncode == 0
    out = tmp_path / name
    data = json.loads(out.read_text())
    if device_header is not None:
        check_header(data, script, device=device_header)
    check(out, data)


def test_plot_train_smoke_reads_the_committed_result(tmp_path):
    """plot_train measures nothing: its smoke draws the committed train result (an older JSON
    than this code's) at low resolution."""
    committed = harness.RESULTS / "train_nvidia-h200.json"
    proc = run_script("plot_train", committed, "--smoke", "--out", tmp_path, timeout=120)
    assert proc.returncode == 0
    for name in ("tokens_per_s", "speedup", "lengths"):
        assert (tmp_path / f"train_nvidia-h200_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1.4b | instruct |" in proc.stdout and "Targets (issue 6)" in proc.stdout


# ------------------------------------------------------------------------------------------------
# bench_scaling and psum_bandwidth: the parts the smokes cannot check on CPU.


def test_scaling_trace_summary_splits_compute_collectives_and_their_overlap():
    """A synthetic two-step device trace: compute 0-60 and 70-100 us, NCCL 50-80 us (10 us under
    each compute kernel, 10 us exposed), a derived "XLA Ops" row and host events ignored."""
    from benchmarks import bench_scaling

    meta = [
        dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
        dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #7(Compute)")),
        dict(ph="M", name="thread_name", pid=1, tid=8, args=dict(name="Stream #8(Nccl)")),
        dict(ph="M", name="thread_name", pid=1, tid=9, args=dict(name="XLA Ops")),
        dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
    ]
    kernels = [
        dict(ph="X", pid=1, tid=7, ts=0, dur=60, name="fusion_1"),
        dict(ph="X", pid=1, tid=7, ts=70, dur=30, name="gemm_2"),
        dict(ph="X", pid=1, tid=8, ts=50, dur=30, name="ncclDevKernel_AllReduce_Sum_f32"),
        dict(ph="X", pid=1, tid=9, ts=0, dur=100, name="all-reduce-start.1"),
        dict(ph="X", pid=2, tid=1, ts=0, dur=500, name="PjitFunction(train_step)"),
    ]
    summary = bench_scaling.summarize_trace(dict(traceEvents=meta + kernels), steps=2)
    ((name, dev),) = summary["devices"].items()
    assert name == "/device:GPU:0" and dev["kernels"] == 3
    assert dev["span_ms"] == pytest.approx(0.05) and dev["compute_ms"] == pytest.approx(0.045)
    assert dev["collective_ms"] == pytest.approx(0.015)
    assert dev["overlapped_ms"] == pytest.approx(0.01)
    assert dev["exposed_collective_ms"] == pytest.approx(0.005)
    assert [k["name"] for k in dev["top_kernels"]][0] == "fusion_1"
    assert dev["top_kernels"][2]["collective"] and not dev["top_kernels"][0]["collective"]
    assert bench_scaling.summarize_trace(dict(traceEvents=meta[-1:]), steps=1)["note"]


def test_scaling_plan_baselines_and_overlap_flags():
    from benchmarks import bench_scaling
    from train import sharding

    keys = [
        c["key"]
        for c in bench_scaling.plan(
            ["130m"], [1, 2], ["data", "fsdp"], ["auto", "bfloat16"], ["off"]
        )
    ]
    assert keys == [
        "130m/single/auto/overlap-off/1",
        "130m/single/bfloat16/overlap-off/1",
        "130m/data/auto/overlap-off/2",
        "130m/data/bfloat16/overlap-off/2",
        "130m/fsdp/auto/overlap-off/2",
        "130m/fsdp/bfloat16/overlap-off/2",
    ]
    settings = dict(rows=8)
    base = dict(
        status="ok",
        preset="130m",
        n=1,
        overlap="off",
        tokens_per_s=100.0,
        settings=settings,
        invocation="a",
    )
    records = {
        keys[0]: base,
        keys[1]: dict(base, tokens_per_s=95.0),
        keys[2]: dict(base, n=2, tokens_per_s=180.0),
        keys[3]: dict(base, n=2, tokens_per_s=190.0, settings=dict(rows=4)),
        keys[4]: dict(base, n=2, status="oom"),
    }
    bench_scaling.add_efficiency(records)
    assert records[keys[1]]["efficiency"] == pytest.approx(0.95)  # against single/auto
    assert records[keys[2]]["efficiency"] == pytest.approx(0.9)
    assert records[keys[2]]["baseline"]["same_invocation"]
    assert "efficiency" not in records[keys[3]]  # other settings: no baseline
    assert "efficiency" not in records[keys[4]]
    for overlap in (False, True):
        env = bench_scaling.child_env(overlap=overlap, extra_flags="--xla_gpu_foo=1", smoke=False)
        flags = env["XLA_FLAGS"].split()
        assert "--xla_gpu_foo=1" in flags and env["NCCL_NVLS_ENABLE"] == "0"
        assert all((f in flags) == overlap for f in sharding.OVERLAP_XLA_FLAGS)


def test_psum_bandwidth_bus_factors_and_interpolation():
    from benchmarks.probes import psum_bandwidth as pb

    assert pb.bus_factor("all_reduce", 2) == 1.0 and pb.bus_factor("all_reduce", 4) == 1.5
    assert pb.bus_factor("reduce_scatter", 4) == pb.bus_factor("all_gather", 4) == 0.75
    assert pb.bus_factor("all_reduce", 1) == 0.0
    rows = [dict(bytes=10**6, median_ms=1.0), dict(bytes=10**8, median_ms=100.0)]
    assert pb.interpolate_ms(rows, 10**7) == (pytest.approx(10.0), "interpolated")
    assert pb.interpolate_ms(rows, 5 * 10**8) == (pytest.approx(500.0), "extrapolated")
    assert pb.interpolate_ms(rows, 10**5)[0] is None


@pytest.mark.parametrize(
    "script,args,flag",
    [
        ("bench_scaling", ["--grad-reduce", "fp8"], "--grad-reduce"),
        ("bench_scaling", ["--counts", "0,2"], "--counts"),
        ("probes/psum_bandwidth", ["--sizes-mb", "1,x"], "--sizes-mb"),
    ],
)
def test_scaling_scripts_reject_bad_arguments(script, args, flag):
    proc = run_script(script, *args, timeout=120)
    assert proc.returncode == 2 and flag in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# bench_train (its smoke) and plot_train on what it wrote.


def test_bench_train_smoke_counts_real_tokens_merges_and_plots(tmp_path):
    out = tmp_path / "train_cpu_smoke.json"
    # A record from an earlier invocation: a merge must keep it.
    earlier = {"preset": "130m", "mode": "single", "dist": "corpus", "status": "skipped"}
    out.write_text(
        json.dumps(
            dict(
                schema=1,
                runs={"130m/single/corpus": earlier},
                workloads={},
                invocations=[{"command": "earlier"}],
            )
        )
    )
    steps, group, rows, seq_len = 4, 2, 2, 128
    proc = run_script(
        "bench_train",
        "--smoke",
        "--modes",
        "packed,link_across_steps",
        "--dists",
        "corpus,instruct",
        "--model",
        "n_layer=1,d_model=32,d_state=4",
        "--seq-len",
        seq_len,
        "--rows",
        rows,
        "--workload-tokens",
        6000,
        "--steps",
        steps,
        "--group",
        group,
        "--warmup",
        1,
        "--out",
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0

    data = json.loads(out.read_text())
    check_header(data, "bench_train")
    assert data["runs"]["130m/single/corpus"] == earlier
    assert [i["command"] for i in data["invocations"]][0] == "earlier"
    assert len(data["invocations"]) == 2 and "--modes packed" in data["invocations"][1]["command"]
    assert data["backend"] == "cpu" and data["jax_version"] and data["device"]

    docs = stdlib_documents()
    wl = data["workloads"]
    # Independent counts: the stdlib files the corpus workload names, plus one EOD each.
    corpus_tokens = sum(len(docs[i]) + 1 for i in wl["corpus"]["doc_indices"])
    assert wl["corpus"]["num_tokens"] == corpus_tokens >= 6000
    lengths = np.array(wl["instruct"]["doc_lengths"])
    assert lengths.min() >= 16 and lengths.max() <= 8192 and lengths.sum() >= 6000
    assert wl["instruct"]["num_tokens"] == lengths.sum()
    for dist, expected in (("corpus", corpus_tokens), ("instruct", int(lengths.sum()))):
        h = wl[dist]["histogram"]
        assert sum(h["counts"]) == wl[dist]["num_documents"] and sum(h["tokens"]) == expected

        r = data["runs"][f"tiny/packed/{dist}"]
        print(dist, {k: r[k] for k in ("real_tokens", "slots", "steps", "tokens_per_s")})
        assert r["status"] == "ok" and r["finite_loss"]
        # Real tokens (counted from the batches' segment_ids in the child) are the documents'.
        assert r["real_tokens"] == expected
        assert r["slots"] == r["steps"] * rows * seq_len
        assert r["steps"] >= -(-expected // (rows * seq_len))  # no more tokens than slots
        assert abs(r["real_fraction"] - expected / r["slots"]) < 1e-12
        assert r["timed_steps"] == steps and len(r["step_times_s"]) == steps // group
        assert r["step_time_s_median"] == float(np.median(r["step_times_s"])) > 0
        assert abs(r["est_total_s"] - r["steps"] * r["step_time_s_median"]) < 1e-9
        assert abs(r["tokens_per_s"] - expected / r["est_total_s"]) < 1e-6 * r["tokens_per_s"]
        assert r["mfu"] is None  # no peak FLOP/s for CPU
        assert r["step_shape"] == [1, rows, seq_len] and r["n_layer"] == 1 and r["d_model"] == 32

        # link_across_steps: the trainer's carried step over per-row streams of the same
        # documents, wrapping round (never padded), as many steps as the tokens fill.
        c = data["runs"][f"tiny/link_across_steps/{dist}"]
        assert c["status"] == "ok" and c["finite_loss"] and c["stream_groups"] == 1
        assert c["steps"] == -(-expected // (rows * seq_len))
        assert c["real_tokens"] == c["slots"] == c["steps"] * rows * seq_len
        assert c["timed_steps"] == steps and c["step_time_s_median"] > 0
        assert (
            abs(c["tokens_per_s"] - rows * seq_len / c["step_time_s_median"])
            < 1e-6 * c["tokens_per_s"]
        )
        # Rows of the timed steps start from the state carried out of the step before.
        assert c["rows_timed"] == steps * rows and 0 < c["continuing_rows_timed"] <= steps * rows
        assert c["continuing_rows"] >= c["continuing_rows_timed"] and c["carry_nonzero"]
        # The carry: every layer's conv window (d_conv - 1 inputs) and SSM state of every row.
        d_inner, layers = 2 * 32, 1
        assert c["carry_shapes"] == {
            "conv": [[layers, rows, 3, d_inner], "float32"],
            "ssm": [[layers, rows, d_inner, 4], "float32"],
        }
        assert c["carry_bytes"] == 4 * layers * rows * d_inner * (3 + 4)

    png_dir = tmp_path / "png"
    assert plot_train.main([str(out), "--out", str(png_dir)]) == 0
    for name in ("tokens_per_s", "speedup", "lengths"):
        png = png_dir / f"{out.stem}_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = plot_train.table(data)
    assert "| tiny | instruct |" in table and "| 130m | corpus | — | — | skipped |" in table


def test_bench_train_smoke_trains_a_mamba2_and_a_hybrid_preset(tmp_path):
    from jax_packmamba import HybridConfig, Mamba2Config

    rows, seq_len = 2, 128
    proc = run_script(
        "bench_train",
        "--smoke",
        "--presets",
        "mamba2-tiny,hybrid-tiny",
        "--modes",
        "packed",
        "--dists",
        "instruct",
        "--workload-tokens",
        3000,
        "--steps",
        2,
        "--group",
        1,
        "--trace",
        tmp_path / "traces",
        "--out",
        tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0
    runs = json.loads((tmp_path / "train_cpu_smoke.json").read_text())["runs"]
    for preset in ("mamba2-tiny", "hybrid-tiny"):
        r = runs[f"{preset}/packed/instruct"]
        assert r["status"] == "ok" and r["finite_loss"] and r["tokens_per_s"] > 0
        assert r["step_shape"] == [1, rows, seq_len]
        # --trace: the steps were traced (on CPU the trace has no device kernels to sum).
        assert (tmp_path / "traces" / f"{preset}_packed_instruct").is_dir()
        assert r["trace"]["error"].startswith("no device kernel events")
    # The smoke model (--model n_layer=1,d_model=32,d_state=4) is a Mamba2 one: its size says so.
    r = runs["mamba2-tiny/packed/instruct"]
    assert (r["n_layer"], r["d_model"]) == (1, 32)
    assert (
        r["num_params"]
        == Mamba2Config.preset(
            "tiny", n_layer=1, d_model=32, d_state=4, vocab_size=257
        ).num_params()
    )
    # hybrid-tiny runs as it is (HybridConfig has no n_layer to shrink).
    r = runs["hybrid-tiny/packed/instruct"]
    assert r["num_params"] == HybridConfig.preset("tiny", vocab_size=257).num_params()
    assert (r["n_layer"], r["d_model"]) == (3, 64)


def test_bamba_torch_builds_our_hybrid_1b_and_says_what_is_missing(tmp_path):
    """The torch side of the hybrid comparison (no torch here): its BambaConfig is our
    hybrid-1b (every field, and the parameter count of the model transformers would build), its
    packed rows hold --segments documents filling each row, and without torch it is one line
    and exit code 2."""
    from benchmarks import bamba_torch
    from jax_packmamba import HybridConfig

    ours = HybridConfig.preset("1b", vocab_size=workloads.RELEASED_VOCAB)
    assert bamba_torch.HYBRID_1B == {k: getattr(ours, k) for k in bamba_torch.HYBRID_1B}
    fields = bamba_torch.bamba_fields(bamba_torch.HYBRID_1B)
    assert bamba_torch.bamba_num_params(fields) == ours.num_params()
    assert fields["attn_layer_indices"] == [5, 11, 17, 23] and fields["vocab_size"] == 50288
    assert fields["mamba_n_heads"] * fields["mamba_d_head"] == 2 * ours.d_model
    # Other shapes count the same way (biases, tying, groups).
    small = dict(
        bamba_torch.HYBRID_1B,
        layers=("*-", "M-", "M-"),
        d_model=96,
        vocab_size=100,
        d_state=16,
        headdim=32,
        ngroups=2,
        num_heads=4,
        num_kv_heads=2,
        rotary_dim=12,
        d_ff=64,
        conv_bias=False,
        proj_bias=True,
        attention_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    )
    config = HybridConfig(**small)
    assert bamba_torch.bamba_num_params(bamba_torch.bamba_fields(small)) == config.num_params()
    with pytest.raises(ValueError, match="ropes half the head dims"):
        bamba_torch.bamba_fields(dict(small, rotary_dim=8))

    lengths = bamba_torch.document_lengths(8, 2048, 64)
    assert [len(r) for r in lengths] == [64] * 8 and {sum(r) for r in lengths} == {2048}
    assert min(min(r) for r in lengths) >= 1 and lengths[0] != lengths[1]

    out = tmp_path / "bamba.json"
    proc = run_script("bamba_torch", out, "--rows", 2, timeout=60)
    if importlib.util.find_spec("torch") is None:
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "bamba_torch: needs torch and transformers (No module named 'torch')"
        ]
        data = json.loads(out.read_text())
        assert data["status"] == "missing" and data["rows"] == 2
    proc = run_script("bamba_torch", out, "--segments", 4096, timeout=60)
    assert proc.returncode == 2 and "--segments 4096 exceeds --seq-len 2048" in proc.stderr


def test_bench_train_refuses_the_mamba1_anchor_for_mamba2_presets(tmp_path, capsys):
    from benchmarks import bench_train

    (tmp_path / bench_train.ANCHOR_SCRIPT).write_text("")
    with pytest.raises(SystemExit) as e:
        bench_train.parse_args(["--presets", "130m,mamba2-1.3b", "--anchor", str(tmp_path)])
    assert e.value.code == 2
    assert "--presets ['mamba2-1.3b'] are Mamba2" in capsys.readouterr().err
    _, presets = bench_train.parse_args(["--presets", ",".join(bench_train.MAMBA2_PRESETS)])
    assert presets == ["mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "link_across_steps", "--stream-groups", "0"], "--stream-groups must be >= 1"),
        (["--modes", "packed,link", "--stream-groups", "2"], "needs --modes link_across_steps"),
        (["--presets", "hybrid-1b", "--modes", "link_across_steps"], "cannot link rows yet"),
    ],
)
def test_bench_train_refuses_link_modes_it_cannot_run(args, message, capsys):
    from benchmarks import bench_train

    with pytest.raises(SystemExit) as e:
        bench_train.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
    _, presets = bench_train.parse_args(["--modes", "link_across_steps", "--stream-groups", "4"])
    assert presets == list(bench_train.PRESETS)


def test_plot_labels_presets_measured_at_another_commit():
    runs = {
        f"{p}/{m}/instruct": dict(preset=p, git_commit=c + "0" * 33)
        for p, c in (("130m", "aaaaaaa"), ("370m", "bbbbbbb"), ("1.4b", "aaaaaaa"))
        for m in ("packed", "single")
    }
    labels = plot_train.tick_labels(dict(runs=runs), ["130m", "370m", "1.4b"])
    assert labels == ["130m", "370m\n(bbbbbbb)", "1.4b"]


# ------------------------------------------------------------------------------------------------
# Pieces of breakdown and the probes.


def test_breakdown_attributes_hlo_instructions_to_source_lines():
    """The trace attribution names the user source line (and fwd/bwd) of a fused kernel."""
    import jax
    import jax.numpy as jnp

    from benchmarks import breakdown

    def f(x):
        y = jnp.sin(x) * 3.0  # the line the fusions must point at
        return jnp.sum(y * y)

    here = pathlib.Path(__file__).name
    body = {f"{here}:{f.__code__.co_firstlineno + i} " for i in (1, 2)}
    # Not from a persistent cache: its key ignores source lines, so an executable compiled
    # from an older version of this file would name that version's lines.
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        text = jax.jit(jax.grad(f)).lower(jnp.ones(64)).compile().as_text()
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    sources = breakdown.hlo_sources(text)
    entry = text[text.index("ENTRY") :]
    fused = [name for name in sources if name in entry.replace(".", "_") and "fusion" in name]
    assert fused, sources
    for name in fused:
        for part in sources[name].split(" | "):
            assert any(part.startswith(b) for b in body) and "<locals>.f " in part, sources[name]
    assert any(" bwd" in sources[name] for name in fused), sources


FAKE_GEN_TORCH = """
import json, os, sys
out, batches, *flags = sys.argv[1:]
rows = [dict(batch=int(b), total_s=0.001 * int(b), peak_gib=1e-3) for b in batches.split(",")]
json.dump(dict(torch="fake", device="fake", rows=rows, flags=flags,
               pythonpath=os.environ.get("PYTHONPATH")), open(out, "w"))
"""


def test_bench_generate_smoke_runs_the_anchor_with_the_same_sampling(tmp_path):
    """bench_generate's smoke (its checks: smoke_bench_generate) with a fake anchor: the anchor
    runs each setting's batches with the same sampling, and the comparison divides by it."""
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    (anchor / "gen_torch.py").write_text(FAKE_GEN_TORCH)
    proc = run_script(
        "bench_generate",
        "--smoke",
        "--out",
        tmp_path,
        "--anchor",
        anchor,
        "--anchor-pythonpath",
        tmp_path / "site",
    )
    assert proc.returncode == 0
    out = tmp_path / "generate_cpu_smoke.json"
    data = json.loads(out.read_text())
    check_header(data, "bench_generate")
    smoke_bench_generate(out, data)
    for name, penalty in (("blog", "1.2"), ("fast", "1.0")):
        theirs = data["settings"][name]["mamba_ssm"]
        assert theirs["status"] == "ok" and [r["batch"] for r in theirs["rows"]] == [1, 2]
        assert f"--temperature 0.7 --top-p 0.9 --repetition-penalty {penalty}" in theirs["command"]
        assert "--preset tiny --prompt-len 16 --new-tokens 8" in theirs["command"]
        for row in data["settings"][name]["comparison"]:
            assert row["total_ratio"] == pytest.approx(row["ours_total_s"] / (0.001 * row["batch"]))
    assert data["targets"]["blog"]["total_ratio_met"] is False  # the fake is far faster


def test_bench_generate_state_dtype_names_the_dtype_that_runs():
    """--state-dtype auto (the default) is generation's default, the compute dtype; the result
    files get a variant only when the state's dtype is not auto's, named after the dtype."""
    from benchmarks import bench_generate

    def ran(*flags):
        args = bench_generate.parse_args(["--smoke", *flags])
        return args.state_dtype, args.state_dtype_ran, bench_generate.state_variant(args)

    assert ran() == ("auto", "bfloat16", None)  # --dtype bfloat16 by default
    assert ran("--state-dtype", "bfloat16") == ("bfloat16", "bfloat16", None)
    assert ran("--state-dtype", "float32") == ("float32", "float32", "f32state")
    assert ran("--dtype", "float32") == ("auto", "float32", None)
    assert ran("--dtype", "float32", "--state-dtype", "bfloat16")[1:] == ("bfloat16", "bf16state")
    assert ran("--preset", "mamba2-tiny")[1:] == ("bfloat16", None)
    args = bench_generate.parse_args(["--smoke", "--state-dtype", "float32"])
    assert bench_generate.state_dtype_arg(args) == "float32"
    assert bench_generate.state_dtype_arg(bench_generate.parse_args(["--smoke"])) is None


def test_bench_generate_fuse_in_proj_rows_sets_the_rule_and_names_the_files(monkeypatch):
    import pallas_kernels.decode.config as decode_config
    from benchmarks import bench_generate

    monkeypatch.setattr(decode_config, "FUSE_IN_PROJ_ROWS", decode_config.FUSE_IN_PROJ_ROWS)
    default = bench_generate.parse_args(["--smoke"])
    bench_generate.set_decode_rules(default)
    assert decode_config.FUSE_IN_PROJ_ROWS == 32 and bench_generate.decode_variant(default) is None
    args = bench_generate.parse_args(["--smoke", "--fuse-in-proj-rows", "0"])
    bench_generate.set_decode_rules(args)
    assert decode_config.FUSE_IN_PROJ_ROWS == 0 and bench_generate.decode_variant(args) == "fuse0"
    assert not decode_config.pick_config(1, 5120, 16, 2560).fuse_in_proj
    monkeypatch.setattr(
        decode_config, "MAMBA2_FUSE_IN_PROJ_ROWS", decode_config.MAMBA2_FUSE_IN_PROJ_ROWS
    )
    args = bench_generate.parse_args(
        ["--smoke", "--preset", "mamba2-tiny", "--fuse-in-proj-rows", "8"]
    )
    bench_generate.set_decode_rules(args)
    assert decode_config.MAMBA2_FUSE_IN_PROJ_ROWS == 8 and decode_config.FUSE_IN_PROJ_ROWS == 0
    monkeypatch.setattr(decode_config, "MAMBA2_DEFER_NORM", decode_config.MAMBA2_DEFER_NORM)
    bench_generate.set_decode_rules(args)
    assert not decode_config.MAMBA2_DEFER_NORM
    args = bench_generate.parse_args(["--smoke", "--preset", "mamba2-tiny", "--defer-norm"])
    bench_generate.set_decode_rules(args)
    assert decode_config.MAMBA2_DEFER_NORM and bench_generate.decode_variant(args) == "defernorm"
    monkeypatch.setattr(decode_config, "ADD_NORM_IN_PROJ_ROWS", decode_config.ADD_NORM_IN_PROJ_ROWS)
    args = bench_generate.parse_args(["--smoke", "--add-norm-in-proj-rows", "16"])
    bench_generate.set_decode_rules(args)
    assert decode_config.ADD_NORM_IN_PROJ_ROWS == 16
    assert bench_generate.decode_variant(args) == "addnorm16"
    monkeypatch.setattr(decode_config, "STATE_SUMS_PARTS_ROWS", decode_config.STATE_SUMS_PARTS_ROWS)
    args = bench_generate.parse_args(["--smoke", "--state-sums-parts-rows", "1"])
    bench_generate.set_decode_rules(args)
    assert decode_config.STATE_SUMS_PARTS_ROWS == 1
    assert bench_generate.decode_variant(args) == "sumparts1"
    import jax_packmamba.sampling as sampling

    monkeypatch.setattr(sampling, "BISECT_ROWS", sampling.BISECT_ROWS)
    args = bench_generate.parse_args(["--smoke", "--bisect-rows", "8"])
    bench_generate.set_decode_rules(args)
    assert sampling.BISECT_ROWS == 8 and bench_generate.decode_variant(args) == "bisect8"
    monkeypatch.setattr(sampling, "BISECT_IMPL", sampling.BISECT_IMPL)
    args = bench_generate.parse_args(["--smoke", "--bisect-rows", "8", "--bisect-impl", "pallas"])
    bench_generate.set_decode_rules(args)
    assert sampling.BISECT_IMPL == "pallas"
    assert bench_generate.decode_variant(args) == "bisect8_bisectkernel"


def test_bench_generate_targets_are_issue_26s():
    # Total at most 0.7x mamba_ssm's at every batch, peak no higher, and the batch-1 step at
    # most 1.3x the weight-read bound (mamba-2.8b's bf16 weights at an H100's 3.35 TB/s).
    from benchmarks import bench_generate
    from jax_packmamba.config import preset_config

    step_ms = bench_generate.step_target_ms(preset_config("2.8b"), "bfloat16", "NVIDIA H100")
    assert step_ms == pytest.approx(1.3 * 2768345600 * 2 / 3.35e12 * 1e3)
    assert bench_generate.step_target_ms(preset_config("2.8b"), "bfloat16", "cpu") is None

    def row(batch, ratio, peak, step):
        return dict(batch=batch, total_ratio=ratio, peak_ratio=peak, ours_decode_ms_per_step=step)

    met = dict(fast=dict(comparison=[row(1, 0.69, 0.9, step_ms - 0.01), row(8, 0.7, 1.0, 3.0)]))
    got = bench_generate.targets(met, step_ms)["fast"]
    assert got["total_ratio_met"] and got["peak_met"] and got["batch1_step_met"]
    missed = dict(fast=dict(comparison=[row(1, 0.69, 1.01, step_ms + 0.01), row(8, 0.71, 1, 3)]))
    got = bench_generate.targets(missed, step_ms)["fast"]
    assert not (got["total_ratio_met"] or got["peak_met"] or got["batch1_step_met"])
    assert got["total_ratio_max"] == 0.71
    assert bench_generate.targets(met, None)["fast"]["batch1_step_met"] is False


def test_bench_generate_kernel_table_and_categories(tmp_path):
    import jax
    import jax.numpy as jnp

    from benchmarks import bench_generate

    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            f(x).block_until_ready()
    # The host's events stand in for a GPU's kernels (the arithmetic is the same).
    t = bench_generate.kernel_table(tmp_path, 3, plane_prefix="/host:CPU")
    assert 0 < t["busy_ms_per_step"] <= t["wall_ms_per_step"] + 1e-9
    assert t["kernels_per_step"] > 0 and t["top"]
    assert sum(c["per_step"] for c in t["categories"].values()) == pytest.approx(
        t["kernels_per_step"]
    )
    assert "error" in bench_generate.kernel_table(tmp_path, 3)  # no GPU planes here
    for kernel in ("decode_ssm_update", "decode_in_proj_conv", "decode_conv_x_proj", "decode_conv"):
        assert bench_generate.category(kernel) == "decode kernels"
    assert bench_generate.category("loop_dynamic_slice_fusion_3") == "copy"
    assert bench_generate.category("nvjet_tst_64x8_64x16_2x1_v_bz_TNT") == "gemm"
    assert (
        bench_generate.category("void cub::DeviceRadixSortOnesweepKernel<>")
        == bench_generate.category("sampling_key_search")
        == "sort/scan/top-k (sampling)"
    )
    assert bench_generate.category("loop_add_fusion") == "other fusions"


def test_step_parts_classify_both_sides_kernels():
    from benchmarks.step_parts import part, table

    assert part("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert part("gemm_fusion_dot_129", "loss.py:20 masked_cross_entropy fwd") == "gemm"
    assert part("_layer_norm_fwd_1pass_kernel") == "norms"
    assert part("loop_add_fusion_3", "rms_norm.py:40 rms_norm_reference fwd") == "norms"
    assert part("ssd_bwd_dx") == part("selective_scan_bwd") == "ssm kernels"
    assert part("causal_conv1d_fwd_kernel") == "conv"
    assert part("input_reduce_fusion", "loss.py:20 masked_cross_entropy bwd") == "loss"
    assert part("multi_tensor_apply_kernel") == "optimizer"
    # AdamW's XLA fusions, as hlo_sources names their optax source lines.
    for source in (
        "update.py:42 apply_updates.<locals>.<lambda> fwd | _adding.py:73 "
        "add_decayed_weights.<locals>.update_fn.<locals>.<lambda> fwd",
        "_tree_math.py:398 tree_update_moment.<locals>.<lambda> fwd",
    ):
        assert part("loop_add_fusion_1", source) == "optimizer"
    assert part("void at::native::vectorized_elementwise_kernel<4>") == "elementwise"
    assert part("some_custom_call") == "other"
    parts = table({"ssd_bwd_dx": 3000.0, "loop_add_fusion": 1500.0}, steps=3)
    assert (
        parts["ssm kernels"] == 1.0 and parts["elementwise"] == 0.5 and sum(parts.values()) == 1.5
    )
