"""Host cost of the train state's layout: the same jitted step with the parameters and Adam
moments as nnx Variables (the layout before train/step.py stored plain dicts) and as plain dicts.

    PYTHONPATH=. python3 benchmarks/probes/bench_dispatch.py --cases 130m:256,790m:256,790m:2048
    PYTHONPATH=. python3 benchmarks/probes/bench_dispatch.py --smoke --out DIR   # CPU check

For each case (preset:tokens, one row, as bench_train.py's single mode) and each layout:
  call_ms  a jitted function that returns the donated state unchanged but for its step counter,
           called and blocked on 30 times (median): the per-call host work for the state's
           leaves (flatten the arguments, rebuild the returned state), plus one launch;
  step_ms  the train step (train/step.py, bench_train.py's model and optimizer from
           benchmarks/workloads.py) timed exactly as bench_train.py times it (harness.time_calls):
           groups of 2 back-to-back calls, blocking at the group's end, median over 6 groups
           after 2 warm-up calls.
Both layouts run the same traced program (nnx.merge accepts either), so what differs is only the
host side. Writes --out/dispatch_<slug>.json (default benchmarks/results/; --smoke: the case
tiny:64 with one layer of width 32, dispatch_<slug>_smoke.json) after every case; a result there
from another commit moves to history/ first.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import harness, workloads
from jax_packmamba import MambaLM


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


SMOKE_MODEL = dict(n_layer=1, d_model=32, d_state=4)


def run_case(preset: str, tokens: int, overrides: dict | None = None) -> dict:
    from train import step as step_lib

    dev = jax.devices()[0]
    mc = workloads.model_config(preset, backend=jax.default_backend(), overrides=overrides)
    setup = workloads.train_setup(mc, dev)
    compiled = setup.compiled
    tx = step_lib.make_optimizer(setup.optim, setup.schedule_steps)
    schedule = step_lib.learning_rate_schedule(setup.optim, setup.schedule_steps)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 257, (1, 1, tokens), dtype=np.int32)
    batch = setup.put_batch(dict(tokens=ids, segment_ids=np.ones_like(ids),
                                 targets=np.roll(ids, -1, -1), loss_mask=np.ones(ids.shape, bool)))
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
        steps = harness.time_calls(step, [(batch,)], state=state, warmup=2, groups=6, per_group=2)
        calls = harness.time_calls(lambda s: (bump(s), None), [()], state=steps.state, warmup=0,
                                   groups=30, per_group=1)
        state = calls.state
        out["layouts"][layout] = dict(leaves=leaves, call_ms=calls.median_s * 1e3,
                                      step_ms=steps.median_s * 1e3, first_call_s=compile_s)
        print(f"{preset} {tokens} tokens, {layout:9s}: {leaves} leaves, call "
              f"{out['layouts'][layout]['call_ms']:.2f} ms, step {steps.median_s * 1e3:.2f} ms",
              flush=True)
        del state
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = harness.argument_parser(__doc__)
    ap.add_argument("--cases", default="130m:256,790m:256,790m:2048",
                    help="preset:tokens,... (one row each)")
    args = ap.parse_args(argv)
    cases = []
    for case in ["tiny:64"] if args.smoke else args.cases.split(","):
        preset, _, tokens = case.partition(":")
        if not tokens.isdigit():
            ap.error(f"--cases: expected preset:tokens, got {case!r}")
        cases.append((preset, int(tokens)))
    new = harness.new_result("dispatch", script=__file__, argv=argv, out_dir=args.out,
                             smoke=args.smoke)
    result = dict(**new.header, cases=[])
    for preset, tokens in cases:
        result["cases"].append(run_case(preset, tokens, SMOKE_MODEL if args.smoke else None))
        harness.write_json(new.path, result)
    print("\n| case | leaves | call ms (Variables / plain) | step ms (Variables / plain) |\n"
          "|---|---|---|---|")
    for c in result["cases"]:
        v, p = c["layouts"]["variables"], c["layouts"]["plain"]
        print(f"| {c['preset']} x {c['tokens']} | {p['leaves']} | {v['call_ms']:.2f} / "
              f"{p['call_ms']:.2f} | {v['step_ms']:.2f} / {p['step_ms']:.2f} |")
    print(f"wrote {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
