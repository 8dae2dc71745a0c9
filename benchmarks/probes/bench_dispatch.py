"""Host cost of the train state's layout: the same jitted step with the parameters and Adam
moments as nnx Variables (the layout before train/step.py stored plain dicts) and as plain dicts.

    PYTHONPATH=. python3 benchmarks/bench_dispatch.py --cases 130m:256,790m:256,790m:2048
    PYTHONPATH=. python3 benchmarks/bench_dispatch.py --tiny            # CPU check

For each case (preset:tokens, one row, as bench_train.py's single mode) and each layout:
  call_ms  a jitted function that returns the donated state unchanged but for its step counter,
           called and blocked on 30 times (median): the per-call host work for the state's
           leaves (flatten the arguments, rebuild the returned state), plus one launch;
  step_ms  the train step (train/step.py, bench_train.py's model and optimizer) timed exactly as
           bench_train.py times it: groups of 2 back-to-back calls, blocking at the group's end,
           median over 6 groups after 2 warm-up calls.
Both layouts run the same traced program (nnx.merge accepts either), so what differs is only the
host side. Results merge into --out (default benchmarks/results/dispatch_<kind>.json).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_packmamba import MambaLM  # noqa: E402

import bench_train  # noqa: E402


def as_variables(state, model_config):
    """The state with params and both Adam moments as nnx.State of Variables (arrays shared)."""
    from train import step as step_lib

    abstract = nnx.split(nnx.eval_shape(lambda: MambaLM(model_config, rngs=nnx.Rngs(0))))[1]

    def is_params(node):
        return isinstance(node, dict) and set(node) == set(state.params)

    def to_state(pure):
        s = jax.tree.map(lambda v: v, abstract)  # a fresh State to fill
        nnx.replace_by_pure_dict(s, pure)
        return s

    opt_state = jax.tree.map(lambda n: to_state(n) if is_params(n) else n, state.opt_state,
                             is_leaf=is_params)
    return step_lib.TrainState(step=state.step, params=to_state(state.params),
                               opt_state=opt_state, rng=state.rng)


def time_calls(fn, state, batch, *, warm: int, groups: int, group: int):
    for _ in range(warm):
        state, m = fn(state, batch)
        jax.block_until_ready((state, m))
    times = []
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(group):
            state, m = fn(state, batch)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - t0) / group)
    return state, statistics.median(times) * 1e3


def run_case(preset: str, tokens: int, tiny: bool) -> dict:
    from train import sharding
    from train import step as step_lib
    from train.config import MeshConfig, ModelConfig, OptimConfig

    backend = jax.default_backend()
    overrides = {} if tiny else {"vocab_size": bench_train.RELEASED_VOCAB}
    mc = ModelConfig(preset=preset, overrides=overrides).mamba_config(vocab_size=257,
                                                                       backend=backend)
    dev = jax.devices()[0]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1), devices=[dev])
    optim = OptimConfig(lr=1e-4, warmup_steps=10)
    compiled = step_lib.build(mc, optim, 1000, mesh)
    tx = step_lib.make_optimizer(optim, 1000)
    schedule = step_lib.learning_rate_schedule(optim, 1000)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 257, (1, 1, tokens), dtype=np.int32)
    arrays = dict(tokens=ids, segment_ids=np.ones_like(ids), targets=np.roll(ids, -1, -1),
                  loss_mask=np.ones(ids.shape, bool))
    batch = sharding.put_batch(arrays, sharding.batch_sharding(mesh))
    bump = jax.jit(lambda s: s.__class__(step=s.step + 1, params=s.params,
                                         opt_state=s.opt_state, rng=s.rng), donate_argnums=0)
    out = dict(preset=preset, tokens=tokens, layouts={})
    for layout in ("variables", "plain"):
        state = compiled.init(0)
        if layout == "variables":
            state = as_variables(state, mc)
        leaves = len(jax.tree.leaves(state))
        # build()'s step without its shardings, which name the plain layout's tree; one device.
        step = jax.jit(functools.partial(step_lib.train_step, graphdef=compiled.graphdef, tx=tx,
                                         schedule=schedule), donate_argnums=0)
        t0 = time.perf_counter()
        state, _ = step(state, batch)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        state, step_ms = time_calls(step, state, batch, warm=2, groups=6, group=2)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            state = bump(state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        out["layouts"][layout] = dict(leaves=leaves, call_ms=statistics.median(times) * 1e3,
                                      step_ms=step_ms, first_call_s=compile_s)
        print(f"{preset} {tokens} tokens, {layout:9s}: {leaves} leaves, call "
              f"{out['layouts'][layout]['call_ms']:.2f} ms, step {step_ms:.2f} ms", flush=True)
        del state
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="130m:256,790m:256,790m:2048",
                    help="preset:tokens,... (one row each)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = ["tiny:64"] if args.tiny else args.cases.split(",")
    dev = jax.devices()[0]
    kind = bench_train.kind_slug(dev.device_kind, jax.default_backend())
    out = pathlib.Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"dispatch_{kind}{'_tiny' if args.tiny else ''}.json")
    result = dict(device=dev.device_kind, kind=kind, jax_version=jax.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="PYTHONPATH=. python3 benchmarks/bench_dispatch.py " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  git_commit=bench_train._git_commit(), cases=[])
    for case in cases:
        preset, tokens = case.split(":")
        result["cases"].append(run_case(preset, int(tokens), args.tiny))
        bench_train.write(out, result)
    print("\n| case | leaves | call ms (Variables / plain) | step ms (Variables / plain) |\n"
          "|---|---|---|---|")
    for c in result["cases"]:
        v, p = c["layouts"]["variables"], c["layouts"]["plain"]
        print(f"| {c['preset']} x {c['tokens']} | {p['leaves']} | {v['call_ms']:.2f} / "
              f"{p['call_ms']:.2f} | {v['step_ms']:.2f} / {p['step_ms']:.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
