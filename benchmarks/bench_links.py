"""What linking rows (--data.long_docs=link) costs a mixer layer: conv + scan, fwd+bwd.

    PYTHONPATH=. python3 benchmarks/bench_links.py [--out DIR] [--smoke]

One layer's segmented ops at the 1.4b (Mamba1: d_inner 4096, d_state 16) and mamba2-1.3b
(64 heads x 64, d_state 128, one group) training shapes, 8 x 2048, bf16, on a batch of stdlib
documents packed end to end by packing.pack_stream: the same segment ids timed with the links
(`continues`) and without (continues=None: every row starts from zero, as `cut` rows do).
The difference is the link's whole cost (a layer's other ops are untouched by it); times the
layer count, it bounds the step-time cost. A third timing, link_across_steps, adds what
carrying a document into the next step costs: row 0 starts from a given state (the conv's
first_inputs, the scan's first_run_states) and the layer also returns the last row's end
state (the scan's final states by compact ids, links.last_run_inputs). harness.time_calls:
median of 7 groups of 5 calls. Writes --out/links_<slug>.json. --smoke: tiny shapes through
the reference on CPU.

--trace: also a jax.profiler trace of 5 calls of each mode, and per mode the GPU kernels'
time by name (Pallas kernels by their name=, XLA's by their HLO name) and the time the GPU
was busy, so the link's extra time has names: `kernels` in each timing row, largest first.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks import harness, workloads
from jax_packmamba.ops import causal_conv1d
from jax_packmamba.ops.links import compact_ids, last_run_inputs
from jax_packmamba.ops.selective_scan import selective_scan
from jax_packmamba.ops.ssd_scan import ssd_scan
from jax_packmamba.packing import pack_stream

# name -> (rows, length, d_inner, heads or None (Mamba1), d_state, layers)
SHAPES = {"1.4b": (8, 2048, 4096, None, 16, 48), "mamba2-1.3b": (8, 2048, 4096, 64, 128, 48)}
SMOKE = {"mamba1": (2, 64, 32, None, 4, 2), "mamba2": (2, 64, 32, 2, 16, 2)}


def batch_layout(rows, length, seed=0):
    docs = workloads.make_workload("corpus", tokens=rows * length, seed=seed)["docs"]
    # Rows enough for the whole stream (pack_stream refuses to drop any of it); the first
    # `rows` are the batch.
    need = -(-sum(len(d) for d in docs) // length) + len(docs)
    b = pack_stream(docs, length, num_rows=max(rows + 1, need))
    seg, continues = b.segment_ids[:rows], b.continues[:rows].copy()
    continues[0] = False
    return (
        jnp.asarray(seg),
        jnp.asarray(continues),
        dict(
            linked_documents=b.num_linked_sequences,
            longest_chain=b.longest_chain,
            rows_continuing=int(continues.sum()),
        ),
    )


def layer(shape, impl):
    rows, length, d_inner, heads, d_state, _ = shape
    key = iter(jax.random.split(jax.random.PRNGKey(0), 12))
    bf16 = jnp.bfloat16

    def normal(shape_, scale=1.0, dtype=bf16):
        return (scale * jax.random.normal(next(key), shape_)).astype(dtype)

    if heads is None:
        conv_ch = d_inner
        params = dict(
            A=-jnp.exp(normal((d_inner, d_state), 0.5, jnp.float32)),
            D=normal((d_inner,), dtype=jnp.float32),
            bias=normal((d_inner,), 0.3, jnp.float32),
        )
        data = dict(
            B=normal((rows, length, d_state)),
            C=normal((rows, length, d_state)),
            dt=normal((rows, length, d_inner), 0.5),
        )
    else:
        conv_ch = d_inner + 2 * d_state
        params = dict(
            A=-jnp.exp(normal((heads,), 0.5, jnp.float32)),
            D=normal((heads,), dtype=jnp.float32),
            bias=normal((heads,), 0.3, jnp.float32),
        )
        data = dict(
            B=normal((rows, length, 1, d_state)),
            C=normal((rows, length, 1, d_state)),
            dt=normal((rows, length, heads), 0.5),
        )
    params["w"] = normal((conv_ch, 4), 0.5, jnp.float32)
    data.update(x=normal((rows, length, conv_ch)), z=normal((rows, length, d_inner)))
    conv_impl = "xla" if impl == "reference" else "auto"

    def loss(params, data, seg, continues, start=None):
        carry = {}
        if start is not None:  # link_across_steps: a start state in, the end state out
            scan_ids = compact_ids(seg, "last")
            carry = dict(first_run_states=start["ssm"], return_final_states=True, num_segments=3)
        xc = causal_conv1d(
            data["x"],
            params["w"],
            segment_ids=seg,
            activation="silu",
            continues=continues,
            impl=conv_impl,
            **({} if start is None else dict(first_inputs=start["conv"])),
        )[..., :d_inner]
        ids = seg if start is None else scan_ids
        if heads is None:
            y = selective_scan(
                xc,
                data["dt"],
                params["A"],
                data["B"],
                data["C"],
                params["D"],
                data["z"],
                params["bias"],
                delta_softplus=True,
                segment_ids=ids,
                continues=continues,
                impl=impl,
                **carry,
            )
        else:
            split = lambda a: a.reshape(rows, length, heads, -1)  # noqa: E731
            y = ssd_scan(
                split(xc),
                data["dt"],
                params["A"],
                data["B"],
                data["C"],
                params["D"],
                None,  # the Mamba2 model gates in its norm, after the scan
                params["bias"],
                dt_softplus=True,
                segment_ids=ids,
                continues=continues,
                impl=impl,
                **carry,
            )
        if start is None:
            return jnp.sum(y.astype(jnp.float32) ** 2)
        y, final = y
        # The end state leaves the step with its gradient stopped, as the trainer's carry.
        end = (final[-1, 0], last_run_inputs(data["x"], seg, 4)[-1])
        return jnp.sum(y.astype(jnp.float32) ** 2) + sum(
            jnp.sum(jax.lax.stop_gradient(e).astype(jnp.float32)) for e in end
        )

    def start_state():
        ssm = (d_inner, d_state) if heads is None else (heads, d_inner // heads, d_state)
        return dict(
            conv=jnp.zeros((rows, 3, conv_ch), bf16).at[0].set(normal((3, conv_ch))),
            ssm=jnp.zeros((rows, *ssm), jnp.float32).at[0].set(normal(ssm, 0.1, jnp.float32)),
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, data, start_state()


def kernel_table(fn, inputs, calls: int = 5, top: int = 25) -> dict:
    """{busy_us, kernel_us, kernels: {name: us a call}} of fn's GPU kernels over `calls` traced
    calls: every kernel its own name (numeric suffixes kept: each XLA fusion is one), the `top`
    largest and the rest summed."""
    import tempfile

    with tempfile.TemporaryDirectory() as trace_dir:
        harness.trace(fn, [inputs], calls, trace_dir)
        events, _ = harness.device_events(trace_dir)
    per: dict[str, float] = {}
    for name, _, dur in events:
        per[name] = per.get(name, 0.0) + dur / 1e3 / calls
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    kernels = {k: round(v, 1) for k, v in ranked[:top]}
    kernels["(the rest)"] = round(sum(v for _, v in ranked[top:]), 1)
    return dict(
        busy_us=round(harness.busy_ns(events) / 1e3 / calls, 1),
        kernel_us=round(sum(per.values()), 1),
        launches=len(events) / calls,
        kernels=kernels,
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--trace", action="store_true", help="per-kernel times of each mode")
    args = parser.parse_args(argv)
    new = harness.new_result(
        "links", script=__file__, argv=argv, out_dir=args.out, smoke=args.smoke
    )
    impl = "reference" if args.smoke else "auto"
    data = dict(**new.header, impl=impl, timings=[])
    for name, shape in (SMOKE if args.smoke else SHAPES).items():
        fn, params, inputs, start = layer(shape, impl)
        seg, continues, stats = batch_layout(*shape[:2])
        row = dict(shape=name, **stats)
        modes = (("cut", None, None), ("link", continues, None))
        for mode, links, carried in modes + (("link_across_steps", continues, start),):
            t = harness.time_calls(
                fn,
                [(params, inputs, seg, links, carried)],
                groups=1 if args.smoke else 7,
                per_group=1 if args.smoke else 5,
            )
            row[f"{mode}_ms"] = 1e3 * t.median_s
            if args.trace:
                row[f"{mode}_kernels"] = kernel_table(fn, (params, inputs, seg, links, carried))
        row["link_over_cut_ms"] = row["link_ms"] - row["cut_ms"]
        row["per_step_ms_all_layers"] = row["link_over_cut_ms"] * shape[5]
        row["link_across_steps_over_cut_ms"] = row["link_across_steps_ms"] - row["cut_ms"]
        print(
            name, {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()}, flush=True
        )
        data["timings"].append(row)
        harness.write_json(new.path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
