"""benchmarks/bench_ssd.py --smoke end to end on CPU (the interpreter): the check, the timing
and the per-kernel profile all run and land in the JSON with the fields a reader needs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADER = ("device", "device_name", "kind", "backend", "jax_version", "date", "git_commit",
          "command")
# Every kernel of the forward and backward, as the profile names them.
KERNELS = ("fwd.chunk_cumsum", "fwd.chunk_cb", "fwd.chunk_states", "fwd.state_passing",
           "fwd.chunk_scan", "bwd.chunk_cumsum", "bwd.chunk_cb", "bwd.chunk_dstates",
           "bwd.state_passing", "bwd.dx", "bwd.dcb", "bwd.dc", "bwd.db", "bwd.chunk_cumsum_bwd")


def run_script(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "benchmarks/bench_ssd.py", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def test_help():
    proc = run_script("--help", timeout=120)
    assert proc.returncode == 0 and "--variants" in proc.stdout and "--profile" in proc.stdout


def test_smoke_checks_times_and_profiles(tmp_path):
    proc = run_script("--smoke", "--profile", "--variants", "xla:state_passing=xla",
                      "--out", tmp_path)
    assert proc.returncode == 0
    assert "BAD" not in proc.stdout
    data = json.loads((tmp_path / "ssd_cpu_smoke.json").read_text())
    assert [k for k in HEADER if k not in data] == []
    assert data["command"].startswith("PYTHONPATH=. python3 benchmarks/bench_ssd.py --smoke")
    assert data["errors"] == []
    [chk] = data["checks"]
    assert chk["ok"] and set(chk["errors"]) >= {"y", "final_states", "dx", "dinitial_states"}
    assert [(t["variant"], t["segments"]) for t in data["timings"]] == [("default", "seg64"),
                                                                         ("xla", "seg64")]
    assert data["timings"][1]["config"]["state_passing"] == "xla"
    for t in data["timings"]:
        assert t["fwd_ms"]["median_ms"] > 0 and t["fwdbwd_ms"]["median_ms"] > 0
        assert t["compile_s_fwd"] > 0 and t["compile_s_fwdbwd"] > 0
    [prof] = data["profiles"]
    assert set(KERNELS) <= set(prof["pieces_ms"]), sorted(prof["pieces_ms"])
    assert prof["sum_bwd_ms"] > 0
