"""The persistent XLA compilation cache that the trainer and the generate CLI turn on.

A rerun of the same program (same shapes, same jax version, same flags) then loads its compiled
executables from disk instead of compiling them again: the 1.4b training step goes from about a
minute to seconds. The folder is `$JAX_PACKMAMBA_CACHE_DIR` when set, else
`~/.cache/jax_packmamba/xla`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

ENV_VAR = "JAX_PACKMAMBA_CACHE_DIR"


def default_directory() -> pathlib.Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path.home() / ".cache" / "jax_packmamba" / "xla"


def enable(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Turns the cache on for this process and returns its folder (created if missing).

    Every compiled program is cached, however short its compile: the decode loops and training
    steps worth caching dominate, and the small ones cost only disk.
    """
    path = pathlib.Path(directory).expanduser() if directory is not None else default_directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"compilation cache folder {str(path)!r} cannot be created: {err.strerror}"
        ) from None
    if jax.config.jax_compilation_cache_dir != str(path):
        # jax opens the folder at the first compile and keeps it for the process: a second
        # enable() with another folder would otherwise go on writing to the first.
        jax_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@dataclasses.dataclass
class CompileStats:
    """What jax compiled inside a `compile_stats()` block: XLA compilations (executables loaded
    from a persistent compilation cache are counted apart, as cache_hits) and the seconds spent
    tracing, lowering and compiling (or loading)."""

    compiles: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    backend: list = dataclasses.field(default_factory=list)  # (function name, seconds)


# jax.monitoring's events for tracing, lowering and compiling (a backend compile also marks an
# executable loaded from the persistent cache) and for a cache hit.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def compile_stats():
    """Counts the XLA compilations (and their seconds) of the code inside the block."""
    stats = CompileStats()
    # A backend-compile event also marks an executable loaded from the persistent cache.

    def durations(event, duration, **kwargs):
        if event in _COMPILE_EVENTS:
            stats.seconds += duration
        if event == _COMPILE_EVENTS[-1]:
            stats.backend.append((kwargs.get("fun_name"), duration))
            stats.compiles = len(stats.backend) - stats.cache_hits

    def events(event, **kwargs):
        if event == _CACHE_HIT_EVENT:
            stats.cache_hits += 1
            stats.compiles = len(stats.backend) - stats.cache_hits

    jax.monitoring.register_event_duration_secs_listener(durations)
    jax.monitoring.register_event_listener(events)
    try:
        yield stats
    finally:
        jax.monitoring.unregister_event_duration_listener(durations)
        jax.monitoring.unregister_event_listener(events)
