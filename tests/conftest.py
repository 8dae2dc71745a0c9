"""Gives each test worker its own persistent compilation cache, kept between runs.

Almost all of the suite's time is XLA compiling small programs on CPU, the same ones run after
run. Each pytest-xdist worker (and each single-process run) compiles into its own folder,
`$JAX_PACKMAMBA_TEST_CACHE_DIR/<worker>` (default `~/.cache/jax_packmamba/tests/<worker>`), so
a rerun loads what did not change; the trainer and generate CLIs the tests start in
subprocesses use the same folder, and the tests never touch the user's own cache
(`~/.cache/jax_packmamba/xla`). One folder a worker, because a worker once crashed reading an
entry that another process was writing; the cache's size limit also makes jax take a file lock
around every read and write. Every test leaves jax's cache settings as it found them.
`JAX_PACKMAMBA_TEST_CACHE_DIR=off` runs the suite without the cache (from a cold start).

XLA's CPU backend optimisations stay on outside tests/compiled.py's programs: off for the whole
run (`--xla_backend_optimization_level=0` in XLA_FLAGS) they took a third off the compiles, but
broke bitwise comparisons between two programs (the conv's channel groups) and crashed a worker
in XLA's compiler on the SSD kernels' interpreter program (2026-12-06).
"""

import os
import pathlib

import jax
import pytest

from jax_packmamba import compilation_cache

CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)
TEST_CACHE_VAR = "JAX_PACKMAMBA_TEST_CACHE_DIR"
# Programs that compile faster than this are not worth a file (and a lock) each.
MIN_COMPILE_SECONDS = 0.2
MAX_BYTES_A_WORKER = 3 << 30


def _worker_folder() -> pathlib.Path | None:
    root = os.environ.get(TEST_CACHE_VAR, "")
    if root == "off":
        return None
    home = pathlib.Path.home() / ".cache" / "jax_packmamba" / "tests"
    base = pathlib.Path(root).expanduser() if root else home
    return base / os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session", autouse=True)
def worker_cache_folder(tmp_path_factory):
    folder = _worker_folder()
    with pytest.MonkeyPatch.context() as patch:
        if folder is None:  # no cache: the CLIs' own default would be the user's folder
            patch.setenv(compilation_cache.ENV_VAR, str(tmp_path_factory.mktemp("xla_cache")))
            yield
            return
        patch.setenv(compilation_cache.ENV_VAR, str(folder))
        # Read at import by the CLIs' subprocesses, so that they lock as this process does.
        patch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES_A_WORKER))
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES_A_WORKER)
        compilation_cache.enable(folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        yield


@pytest.fixture(autouse=True)
def restore_cache_settings():
    before = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
    yield
    for name, value in before.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
