"""One compile per test-side program, shared by every test and parametrization that runs it.

Eager JAX compiles each primitive of a forward and backward pass on its own, again for every new
shape (the reference ops' gradients at a handful of lengths cost tens of seconds that way), and
an interpreted Pallas kernel recompiles wherever its jaxpr is traced anew. `compiled` jits a
function once per key and argument shapes instead; segment layouts, perturbations and
cotangents are its arguments, so tests that vary only data share one program.
"""

import os
import pathlib
import subprocess
import sys

import jax

_COMPILED = {}


def compiled(key, fn, *args):
    """jit(fn) compiled for args' shapes and dtypes, once per (key, shapes). `key` names what fn
    computes (fn itself is a fresh closure per call). On CPU XLA's backend optimisations are
    off: the programs here run for milliseconds either way, and that halves their compile
    time."""
    leaves, tree = jax.tree.flatten(args)
    full_key = (key, tree, tuple((jax.numpy.shape(x), jax.numpy.result_type(x)) for x in leaves))
    if full_key not in _COMPILED:
        opts = dict(xla_backend_optimization_level=0) if jax.default_backend() == "cpu" else None
        _COMPILED[full_key] = jax.jit(fn).lower(*args).compile(compiler_options=opts)
    return _COMPILED[full_key]


def compiled_vjp(key, f, primals, cts):
    """(f(*primals), gradients of every primal under the cotangents cts), compiled once per
    key and shapes: f must depend on nothing else that changes under the same key."""

    def run(primals, cts):
        out, vjp = jax.vjp(f, *primals)
        return out, vjp(cts)

    return compiled(key, run, primals, cts)(primals, cts)


# For test subprocesses that run on CPU only (JAX_PLATFORMS=cpu): XLA's backend optimisations
# off there too. Their programs (tiny models and smoke shapes) compile for far longer than they
# run; this roughly halves a smoke's time.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"


def cpu_xla_flags(flags: str = "") -> str:
    """XLA_FLAGS for a CPU-only subprocess: `flags`, then FAST_CPU_COMPILE (once)."""
    if FAST_CPU_COMPILE in flags.split():
        return flags
    return f"{flags} {FAST_CPU_COMPILE}".strip()


def run_on_cpu(script, *args: str, xla_flags: str = "", timeout: float = 300) -> None:
    """Runs `python script *args` in a CPU-only process with `xla_flags` (cpu_xla_flags'), the
    repository on its path, and fails with its output unless it exits 0."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=cpu_xla_flags(xla_flags),
        PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_without_fma(script) -> None:
    """run_on_cpu(script) where XLA emits no FMA instructions. XLA on CPU contracts a * b + c
    into one FMA wherever both land in one fusion, so two interpreted kernel variants that do
    the same float ops (a loop body of one step against several) can come out an ulp apart;
    without FMA every op rounds alone, as in the Triton kernels."""
    run_on_cpu(script, xla_flags="--xla_cpu_max_isa=AVX")
