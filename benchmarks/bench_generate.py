"""Generation speed and memory: prompt 1024, generate 1024, batch 1, 2, 4, ... 128.

The measurement published Mamba inference studies make (e.g. the ROCm blog's mamba-2.8b on an
MI210): for each batch size, the time of the packed prefill (all prompts in one pass, each
sequence's final state taken from the scan), of the decode loop (one jitted while_loop of
recurrent steps), their total, and the device's peak memory. Weights are random (speed does not
depend on them); compute in --dtype (bfloat16) with the residual stream, norms and scan state in
float32, as in training.

    python benchmarks/bench_generate.py benchmarks/results/generate_h200      # GPU, 2.8b
    python benchmarks/bench_generate.py /tmp/out --preset tiny --max-batch 4 \
        --prompt-len 32 --new-tokens 16                                       # CPU smoke test

Writes OUT/generate.json (device, jax version, date, shapes, per batch size the medians and
every repeat) and OUT/generate.png.

Method: random weights are made on the device layer by layer directly in the inference layout
(layers stacked, projection weights in --dtype; see `jax_packmamba.generate.prepare`), so the
float32 training copy never exists whole in device memory (the JSON records the peak after
initialisation too). Batch sizes run in increasing order in one process; `peak_bytes_in_use` is a high-water mark over the process, and since every buffer grows
with the batch, the peak read after a batch size's runs is that batch size's peak (the JSON also
records bytes in use before each batch size). Each batch size is compiled and run once
(reported as first_call_s), then timed --repeats times with block_until_ready; medians are
reported. A batch size is skipped when the time left in --time-budget cannot cover it
(estimated from the previous one), so the run ends in bounded time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jax_packmamba import MambaBlock, MambaConfig, MambaLM  # noqa: E402
from jax_packmamba import generation as gen  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--preset", default="2.8b")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--scan-impl", default="auto",
                   help="selective scan for the prefill (auto: the Pallas kernel on GPU)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=128, help="batch sizes 1, 2, 4, ... up to this")
    p.add_argument("--batches", help="comma-separated batch sizes instead (e.g. 64,128)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (after one untimed)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--time-budget", type=float, default=440.0,
                   help="seconds; batch sizes that would not fit are skipped")
    return p.parse_args(argv)


def device_memory(device):
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use"), stats.get("bytes_in_use")


def build_model(config, device):
    """Random weights made on the device directly in the inference layout.

    Each layer is initialised (float32, as MambaLM does) and cast in its own jitted call and
    written into preallocated stacked buffers (donated, so in place): the float32 model never
    exists whole on the device, and the init peak stays near the inference weights' size.
    """
    dtype = config.compute_dtype
    with jax.default_device(device):
        # Embedding, final norm and head: from a one-layer model, whose layer is dropped.
        shell = jax.jit(lambda: gen.prepare(MambaLM(dataclasses.replace(config, n_layer=1),
                                                    rngs=nnx.Rngs(0))))()
        init_layer = jax.jit(lambda key: gen.inference_state(
            MambaBlock(config, rngs=nnx.Rngs(key)), "layers", dtype))
        key = jax.random.key(1)
        block_graph = nnx.split(nnx.eval_shape(lambda: MambaBlock(config, rngs=nnx.Rngs(0))))[0]
        abstract = jax.eval_shape(init_layer, key)
        stacked = jax.jit(lambda: jax.tree.map(
            lambda x: jnp.zeros((config.n_layer, *x.shape), x.dtype), abstract))()

        @functools.partial(jax.jit, donate_argnums=0)
        def put(stacked, layer, i):
            return jax.tree.map(lambda s, x: s.at[i].set(x), stacked, layer)

        for i in range(config.n_layer):
            stacked = put(stacked, init_layer(jax.random.fold_in(key, i)), i)
    params = {**shell.params, "layers": stacked}
    return gen.PreparedModel(config=config, graphs=(block_graph, *shell.graphs[1:]), params=params)


def time_batch(prepared, prompts, args):
    """(first call seconds, list of (prefill, decode) seconds)."""
    sampling = dict(temperature=args.temperature, seed=0)

    def run():
        start = time.perf_counter()
        logits, state = gen.prefill(prepared, prompts)
        jax.block_until_ready((logits, state))
        mid = time.perf_counter()
        tokens, count = gen.decode(prepared, logits, state, args.new_tokens, **sampling)
        jax.block_until_ready((tokens, count))
        end = time.perf_counter()
        assert int(np.min(count)) == args.new_tokens, np.asarray(count)
        return mid - start, end - mid

    first = sum(run())
    return first, [run() for _ in range(args.repeats)]


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    device = jax.devices()[0]
    scan_impl = args.scan_impl
    if scan_impl == "auto" and device.platform == "gpu":
        try:
            import pallas_kernels.selective_scan  # noqa: F401
        except ImportError as e:
            print(f"Pallas scan unavailable ({e}); prefill uses the reference scan", file=sys.stderr)
            scan_impl = "reference"
    config = MambaConfig.preset(args.preset, dtype=args.dtype, scan_impl=scan_impl)

    start = time.perf_counter()
    prepared = build_model(config, device)
    jax.block_until_ready(prepared)
    init_s = time.perf_counter() - start
    init_peak, weights_bytes = device_memory(device)
    print(f"{args.preset} on {device.device_kind}: init {init_s:.1f} s, weights in use "
          f"{(weights_bytes or 0) / 2**30:.2f} GiB", file=sys.stderr)

    rng = np.random.default_rng(0)
    if args.batches:
        batches = sorted(int(b) for b in args.batches.split(","))
    else:
        batches = [1 << i for i in range(args.max_batch.bit_length()) if 1 << i <= args.max_batch]
    results, skipped, previous = [], [], None
    for batch in batches:
        elapsed = time.perf_counter() - wall
        if previous is not None:
            # Cost grows at most linearly with the batch; compile time is ~constant.
            estimate = previous["first_call_s"] + 2 * sum(previous["total_s"])
            if elapsed + estimate > args.time_budget:
                skipped.append(batch)
                continue
        _, in_use_before = device_memory(device)
        prompts = [rng.integers(0, config.vocab_size, args.prompt_len).astype(np.int32) for _ in range(batch)]
        first, runs = time_batch(prepared, prompts, args)
        peak, _ = device_memory(device)
        prefill = [r[0] for r in runs]
        decode = [r[1] for r in runs]
        total = [a + b for a, b in runs]
        row = dict(
            batch=batch,
            prefill_s_median=statistics.median(prefill),
            decode_s_median=statistics.median(decode),
            total_s_median=statistics.median(total),
            decode_ms_per_step=1e3 * statistics.median(decode) / max(args.new_tokens - 1, 1),
            decode_tokens_per_s=batch * args.new_tokens / statistics.median(decode),
            total_tokens_per_s=batch * args.new_tokens / statistics.median(total),
            prefill_tokens_per_s=batch * args.prompt_len / statistics.median(prefill),
            peak_bytes_in_use=peak,
            peak_gib=None if peak is None else peak / 2**30,
            bytes_in_use_before=in_use_before,
            first_call_s=first,
            prefill_s=prefill,
            decode_s=decode,
            total_s=total,
        )
        results.append(row)
        previous = row
        print(f"batch {batch:4d}: prefill {row['prefill_s_median']:.3f} s, decode "
              f"{row['decode_s_median']:.3f} s ({row['decode_ms_per_step']:.2f} ms/step, "
              f"{row['decode_tokens_per_s']:.0f} tok/s), total {row['total_s_median']:.3f} s, peak "
              f"{row['peak_gib'] if peak is None else round(row['peak_gib'], 2)} GiB, first call "
              f"{first:.1f} s", file=sys.stderr)

    report = dict(
        benchmark="generate: packed prefill + recurrent decode",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=str(device), device_kind=device.device_kind, platform=device.platform,
        jax_version=jax.__version__, jaxlib_version=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        python=platform.python_version(),
        preset=args.preset, config=dataclasses.asdict(config),
        num_params=config.num_params(),
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
        temperature=args.temperature, scan_impl=scan_impl,
        weights_bytes_in_use=weights_bytes, peak_bytes_after_init=init_peak, init_s=init_s,
        notes=("prefill: all prompts packed into rows and run in one pass; decode: new_tokens - 1 "
               "recurrent steps in one while_loop (the first token comes from the prefill "
               "logits); times are medians of `repeats` runs after one untimed run; peak memory "
               "is the device's peak_bytes_in_use after the batch size's runs, batch sizes in "
               "increasing order"),
        results=results, skipped_batches=skipped,
        wall_s=time.perf_counter() - wall,
    )
    (args.out / "generate.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "generate.png")
    print(f"wrote {args.out / 'generate.json'} and generate.png in {report['wall_s']:.0f} s", file=sys.stderr)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    if not rows:
        return
    b = [r["batch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(b, [r["total_s_median"] for r in rows], "o-", label="total")
    ax.plot(b, [r["prefill_s_median"] for r in rows], "s--", label="prefill")
    ax.plot(b, [r["decode_s_median"] for r in rows], "^--", label="decode")
    ax.set_ylabel("seconds")
    ax.set_title(f"time: prompt {report['prompt_len']}, generate {report['new_tokens']}")
    ax.legend()
    ax = axes[1]
    ax.plot(b, [r["decode_tokens_per_s"] for r in rows], "o-", label="decode")
    ax.plot(b, [r["total_tokens_per_s"] for r in rows], "s--", label="generated / total time")
    ax.set_ylabel("generated tokens / s")
    ax.set_yscale("log")
    ax.set_title("throughput")
    ax.legend()
    ax = axes[2]
    if all(r["peak_gib"] is not None for r in rows):
        ax.plot(b, [r["peak_gib"] for r in rows], "o-")
    else:
        ax.text(0.5, 0.5, "not reported by this device", ha="center", transform=ax.transAxes)
    ax.set_ylabel("GiB")
    ax.set_title("peak device memory")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"mamba-{report['preset']} ({report['config']['dtype']}, random weights) on "
                 f"{report['device_kind']}, jax {report['jax_version']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
