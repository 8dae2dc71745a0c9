"""bench_train.py --tiny end to end on CPU: the records count real tokens, merge, and plot."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from jax_packmamba.corpus import stdlib_documents

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import plot_train  # noqa: E402


def test_bench_train_tiny_counts_real_tokens_merges_and_plots(tmp_path):
    out = tmp_path / "train_cpu_tiny.json"
    # A record from an earlier invocation: a merge must keep it.
    earlier = {"preset": "130m", "mode": "single", "dist": "corpus", "status": "skipped"}
    out.write_text(json.dumps(dict(schema=1, runs={"130m/single/corpus": earlier}, workloads={},
                                   invocations=[{"command": "earlier"}])))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    steps, group, rows, seq_len = 4, 2, 2, 128
    cmd = [sys.executable, "benchmarks/bench_train.py", "--tiny", "--modes", "packed",
           "--dists", "corpus,instruct", "--model", "n_layer=1,d_model=32,d_state=4",
           "--seq-len", str(seq_len), "--rows", str(rows), "--workload-tokens", "6000",
           "--steps", str(steps), "--group", str(group), "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0

    data = json.loads(out.read_text())
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

    png_dir = tmp_path / "png"
    assert plot_train.main([str(out), "--out-dir", str(png_dir)]) == 0
    for name in ("tokens_per_s", "speedup", "lengths"):
        png = png_dir / f"{out.stem}_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = plot_train.table(data)
    assert "| tiny | instruct |" in table and "| 130m | corpus | — | — | skipped |" in table


def test_plot_labels_presets_measured_at_another_commit():
    runs = {f"{p}/{m}/instruct": dict(preset=p, git_commit=c + "0" * 33)
            for p, c in (("130m", "aaaaaaa"), ("370m", "bbbbbbb"), ("1.4b", "aaaaaaa"))
            for m in ("packed", "single")}
    labels = plot_train.tick_labels(dict(runs=runs), ["130m", "370m", "1.4b"])
    assert labels == ["130m", "370m\n(bbbbbbb)", "1.4b"]


def test_breakdown_attributes_hlo_instructions_to_source_lines():
    """The trace attribution names the user source line (and fwd/bwd) of a fused kernel."""
    import breakdown
    import jax
    import jax.numpy as jnp

    def f(x):
        y = jnp.sin(x) * 3.0  # the line the fusions must point at
        return jnp.sum(y * y)

    body = {f"test_bench_train.py:{f.__code__.co_firstlineno + i} " for i in (1, 2)}
    text = jax.jit(jax.grad(f)).lower(jnp.ones(64)).compile().as_text()
    sources = breakdown.hlo_sources(text)
    entry = text[text.index("ENTRY"):]
    fused = [name for name in sources if name in entry.replace(".", "_") and "fusion" in name]
    assert fused, sources
    for name in fused:
        for part in sources[name].split(" | "):
            assert any(part.startswith(b) for b in body) and "<locals>.f " in part, sources[name]
    assert any(" bwd" in sources[name] for name in fused), sources


def test_register_probe_dumps_each_scan_kernel_as_triton_ir(tmp_path):
    """The dump half of register_probe.py (the compile half needs the pip triton package)."""
    import register_probe

    meta = register_probe.dump(tmp_path, {"window": 2}, shape=(2, 64, 64, 16))
    assert meta["config"]["window"] == 2
    assert sorted(meta["kernels"]) == sorted(
        ["selective_scan_fwd_chunk_states", "selective_scan_fwd_chunk_outputs",
         "selective_scan_bwd_chunk_dstates", "selective_scan_bwd_chunk_grads"])
    for name, launch in meta["kernels"].items():
        assert launch["num_warps"] >= 1 and len(launch["grid"]) == 3
        assert f"tt.func public @{name}" in (tmp_path / f"{name}.ttir").read_text()


def test_ncu_summarize_shares_stalls_and_opcodes(tmp_path):
    import ncu_scan

    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [["0x0", "      LDG.E.U16 R1, desc[UR4][R2.64]", "10", "100", "0", "10", "0"],
            ["0x10", "      SHF.L.U32 R3, R1, 0x10, RZ", "30", "100", "30", "0", "30"],
            ["0x20", "@P0   FFMA R4, R3, R3, R4", "0", "200", "0", "0", "0"]]
    path = tmp_path / "sass.csv"
    path.write_text('"Kernel Name","k",\n' + "\n".join(
        ",".join(f'"{v}"' for v in r) for r in [header] + rows) + "\n")
    result = ncu_scan.summarize(path)
    assert result["stalls"] == {"long_sb": 0.75, "wait": 0.25}
    assert result["opcodes"] == {"FFMA": (0.5, 0.0), "LDG": (0.25, 0.25), "SHF": (0.25, 0.75)}


def test_bench_dispatch_layouts_run_the_same_step():
    """The A/B's premise: the Variables layout is the old one (every parameter and moment a
    Variable) and the step computes bitwise the same from either."""
    import functools

    import bench_dispatch
    import jax
    from flax import nnx

    from train import step as step_lib
    from train.config import ModelConfig, OptimConfig

    mc = ModelConfig(preset="tiny").mamba_config(vocab_size=257, backend="cpu")
    tx = step_lib.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    graphdef, _ = step_lib.model_graphdef(mc)
    plain = jax.jit(lambda: step_lib.init_state(mc, tx, 0))()
    variables = bench_dispatch.as_variables(plain, mc)

    def is_var(x):
        return isinstance(x, nnx.Variable)

    n_params = len(jax.tree.leaves(plain.params))
    assert not any(map(is_var, jax.tree.leaves(plain, is_leaf=is_var)))
    assert sum(map(is_var, jax.tree.leaves(variables, is_leaf=is_var))) == 3 * n_params
    ids = np.random.default_rng(0).integers(1, 257, (1, 2, 32), dtype=np.int32)
    batch = dict(tokens=ids, segment_ids=np.ones_like(ids), targets=np.roll(ids, -1, -1),
                 loss_mask=np.ones(ids.shape, bool))
    step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx))
    (s1, m1), (s2, m2) = step(plain, batch), step(variables, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
