"""What linking rows costs a mixer layer's gradient program, measured on any backend (CPU).

    PYTHONPATH=. python3 benchmarks/probes/link_cost.py [--rows 8] [--length 512]

One layer (conv + scan, fwd+bwd; benchmarks/bench_links.layer) at a mid-size shape, packed
(continues None) against link: the gradient jaxpr's kernel and scan calls (pallas_call, the
scan and while loops, dot_general), for the reference and the Pallas-interpreter impls, and
XLA's temp bytes of the compiled reference program (`memory_analysis()`). Run it with another
checkout first on PYTHONPATH to compare before and after. Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import bench_links

COUNTED = ("pallas_call", "scan", "while", "dot_general", "cumsum")


def count_primitives(jaxpr, counts=None):
    """{primitive name: count} over a closed jaxpr and every jaxpr nested in its equations."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count_primitives(sub.jaxpr, counts)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count_primitives(sub, counts)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--d-inner", type=int, default=1024)
    parser.add_argument("--families", default="mamba1,mamba2")
    parser.add_argument("--no-compile", action="store_true", help="jaxpr counts only")
    args = parser.parse_args(argv)
    seg, continues, _ = bench_links.batch_layout(args.rows, args.length)
    shapes = {
        "mamba1": (args.rows, args.length, args.d_inner, None, 16, 1),
        "mamba2": (args.rows, args.length, args.d_inner, args.d_inner // 64, 64, 1),
    }
    for family in args.families.split(","):
        for impl in ("reference", "pallas_interpret"):
            step, params, data, _ = bench_links.layer(shapes[family], impl)
            for mode, links in (("packed", None), ("link", continues)):
                jaxpr = jax.make_jaxpr(step)(params, data, seg, links)
                counts = count_primitives(jaxpr.jaxpr)
                row = dict(family=family, impl=impl, mode=mode, linked_rows=int(jnp.sum(continues)))
                row.update({k: counts.get(k, 0) for k in COUNTED})
                if impl == "reference" and not args.no_compile:
                    mem = step.lower(params, data, seg, links).compile().memory_analysis()
                    row["temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 1)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
