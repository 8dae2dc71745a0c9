"""One Mamba2 training step on a packed batch, timed per SSD implementation (the baseline run of
issue 14 before bench_train knew the Mamba2 presets).

    PYTHONPATH=. python3 benchmarks/probes/mamba2_step.py --preset 1.3b --impls reference,pallas
    PYTHONPATH=. python3 benchmarks/probes/mamba2_step.py --smoke

The step is train/step.py's loss and optimizer (masked cross-entropy over real targets, AdamW
with clipping) on `rows` x `seq_len` packed rows of the "instruct" workload (benchmarks/
workloads.py), bf16 compute with float32 parameters, the released vocabulary. For each impl:
compile time (lower + compile, apart), then harness.time_calls with the donated state (groups
of 2 back-to-back steps, median), real tokens/s and the device's peak memory.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import harness, workloads
from jax_packmamba import Mamba2Config, Mamba2LM, masked_cross_entropy


def step_fn(graphdef, tx):
    def loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch["tokens"], batch["segment_ids"])
        ce, n = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return ce / jnp.maximum(n, 1)

    def step(state, batch):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return step


def run(preset, impl, *, rows, seq_len, dtype, smoke) -> dict:
    from train.step import make_optimizer

    vocab = 257 if smoke else workloads.RELEASED_VOCAB
    config = Mamba2Config.preset(preset, dtype=dtype, scan_impl=impl, vocab_size=vocab)
    model = Mamba2LM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    del model
    tx = make_optimizer(workloads.optim_config(), 1000)
    state = (params, tx.init(params))
    batch = workloads.packed_batch(rows=rows, seq_len=seq_len)["arrays"]  # (1, rows, seq_len)
    arrays = {k: jnp.asarray(batch[k][0]) for k in ("tokens", "segment_ids", "targets", "loss_mask")}
    real = int((batch["segment_ids"] > 0).sum())
    step = jax.jit(step_fn(graphdef, tx), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, arrays)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    timing = harness.time_calls(compiled, [(arrays,)], state=state, warmup=2,
                                groups=2 if smoke else 5, per_group=2)
    peak, _ = harness.device_memory(jax.devices()[0])
    return dict(preset=preset, impl=impl, rows=rows, seq_len=seq_len, dtype=dtype,
                params=config.num_params(), real_tokens=real, lower_s=t1 - t0,
                compile_s=t2 - t1, step_ms=timing.median_s * 1e3,
                step_ms_groups=[g * 1e3 for g in timing.group_s],
                tokens_per_s=real / timing.median_s, peak_gib=None if peak is None else peak / 2**30)


def main(argv=None) -> int:
    ap = harness.argument_parser(__doc__)
    ap.add_argument("--preset", default="1.3b", help="Mamba2 preset (default 1.3b)")
    ap.add_argument("--impls", default="reference,pallas",
                    help="comma-separated ssd_scan impls to time, in order")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    if args.smoke:
        args.preset, args.rows, args.seq_len, args.dtype = "tiny", 2, 64, "float32"
        impls = ["reference"]
    new = harness.new_result("mamba2_step", script=__file__, argv=sys.argv[1:], out_dir=args.out,
                             smoke=args.smoke)
    result = dict(**new.header, runs=[])
    for impl in impls:
        try:
            r = run(args.preset, impl, rows=args.rows, seq_len=args.seq_len, dtype=args.dtype,
                    smoke=args.smoke)
        except Exception as e:  # an OOM or a kernel failure must not lose the other impls
            r = dict(preset=args.preset, impl=impl, error=f"{type(e).__name__}: {e}"[:2000])
        result["runs"].append(r)
        harness.write_json(new.path, result)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in r.items() if k != "step_ms_groups"), flush=True)
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
