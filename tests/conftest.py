"""Gives the command-line programs the tests start a persistent compilation cache per worker,
kept between runs, and keeps every test's hands off the user's own cache.

The trainer and the generate CLI turn on jax_packmamba's persistent XLA cache by default
(jax_packmamba/compilation_cache.py, `~/.cache/jax_packmamba/xla` unless
`$JAX_PACKMAMBA_CACHE_DIR` says otherwise). Here each pytest-xdist worker points them at its own
folder, `$JAX_PACKMAMBA_TEST_CACHE_DIR/<worker>` (default `~/.cache/jax_packmamba/tests/<worker>`),
so a rerun of the suite loads the trainer's and generate's programs instead of compiling them
again, and no test writes into the user's folder. One folder a worker: a worker once crashed
reading an entry another process was writing; the size limit also makes jax lock every read
and write. `JAX_PACKMAMBA_TEST_CACHE_DIR=off`: a fresh temporary folder instead.

The tests' own programs are not cached: jax 0.11.2 segfaulted serialising the executables of
interpreted Pallas kernels for the cache (tests/test_rms_norm_impls.py, test_ssd_mosaic.py;
2026-12-06). A test that runs the trainer or generate in-process turns the cache on for its
duration; every test leaves jax's cache settings as it found them.
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
    folder = _worker_folder() or tmp_path_factory.mktemp("xla_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(compilation_cache.ENV_VAR, str(folder))
        # Read at import by the programs' subprocesses; set here for the in-process runs.
        patch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES_A_WORKER))
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES_A_WORKER)
        yield


@pytest.fixture(autouse=True)
def restore_cache_settings():
    before = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
    yield
    for name, value in before.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
