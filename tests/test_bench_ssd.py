"""benchmarks/bench_ssd.py --smoke end to end on CPU (the interpreter), in this process: the
timing of the default config and a variant, and the per-kernel profile's entry, land in the
JSON with the fields a reader needs."""

from __future__ import annotations

import json

from benchmarks import bench_ssd, harness
from tests.test_benchmarks import check_header


def test_smoke_times_and_profiles(tmp_path, capsys):
    assert (
        bench_ssd.main(
            ["--smoke", "--profile", "--variants", "xla:state_passing=xla", "--out", str(tmp_path)]
        )
        == 0
    )
    assert "BAD" not in capsys.readouterr().out
    data = json.loads((tmp_path / "ssd_cpu_smoke.json").read_text())
    check_header(data, "bench_ssd")
    assert data["command"].startswith("PYTHONPATH=. python3 benchmarks/bench_ssd.py --smoke")
    assert data["errors"] == []
    assert [(t["variant"], t["segments"]) for t in data["timings"]] == [
        ("default", "seg64"),
        ("xla", "seg64"),
    ]
    assert data["timings"][1]["config"]["state_passing"] == "xla"
    for t in data["timings"]:
        assert t["fwd_ms"]["median_ms"] > 0 and t["fwdbwd_ms"]["median_ms"] > 0
        assert t["compile_s_fwd"] > 0 and t["compile_s_fwdbwd"] > 0
    # No GPU kernels on CPU: the profile says so rather than inventing a split.
    [prof] = data["profiles"]
    assert "no GPU kernels" in prof["error"] and prof["config"]["chunk"] == bench_ssd.SMOKE_CHUNK


def test_kernel_times_group_by_kernel_name():
    ns = 1000
    events = [
        ("ssd_chunk_scan", 0, 10 * ns),
        ("ssd_chunk_scan_1", 20 * ns, 30 * ns),
        ("loop_add_fusion", 5 * ns, 10 * ns),
        ("ssd_bwd_dx", 60 * ns, 20 * ns),
        ("selective_scan_bwd_chunk_grads_maxnreg128", 90 * ns, 10 * ns),
    ]
    t = harness.kernel_times(events, 2, prefixes=("ssd_",))
    assert list(t["kernels"]) == ["ssd_chunk_scan", "xla", "ssd_bwd_dx"]
    assert t["kernels"]["ssd_chunk_scan"] == dict(us_per_call=20.0, launches_per_call=1.0)
    assert t["kernels"]["xla"]["launches_per_call"] == 1.0
    assert t["kernel_us_per_call"] == 40.0 and t["busy_us_per_call"] == 37.5  # 0-15, 20-50, ...
    # A register cap's suffix is part of the kernel's name.
    t = harness.kernel_times(events, 1, prefixes=("selective_scan_",))
    assert "selective_scan_bwd_chunk_grads_maxnreg128" in t["kernels"]
