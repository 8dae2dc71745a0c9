"""Keeps the tests out of the user's persistent compilation cache.

The trainer and the generate CLI turn on jax_packmamba's persistent XLA cache by default
(jax_packmamba/compilation_cache.py), and a test that runs them in-process would turn it on for
every later test in its worker, in ~/.cache/jax_packmamba/xla, shared with the other worker and
any other process: a worker once crashed reading an entry there while others wrote. Each worker
gets its own cache folder, and every test leaves jax's cache settings as it found them.

Every program a test compiles in-process is compiled with XLA's optimisations mostly off
(`jax_disable_most_optimizations`, as the CPU subprocesses' FAST_CPU_COMPILE and
tests/compiled.py do for theirs), except in the tests of XLA_OPTIMIZED.
"""

import gc

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from jax_packmamba import compilation_cache

CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


class _TrainerJax:
    """jax for train/step.py, whose jax.jit compiles at XLA:CPU's backend optimisation level 0
    (on CPU): the trainer's init, step and eval programs, as its subprocess runs compile them
    (tests/compiled.py's FAST_CPU_COMPILE). An in-process run's train_step took 5.9 s to
    compile at the default level and 3.7 s at 0, init_state 2.4 s and under 1."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def jit(*args, **kwargs):
        if jax.default_backend() == "cpu":
            kwargs.setdefault("compiler_options", dict(xla_backend_optimization_level=0))
        return jax.jit(*args, **kwargs)


# Tests that compile as a user's process does (XLA's default optimisation): bit-for-bit
# comparisons of two programs that come out an ulp apart without XLA's optimisations, and a
# tolerance that the resulting ulp-level change of the inputs exceeds. An entry is a test (all
# its parametrizations) or a module (all its tests).
XLA_OPTIMIZED = (
    # The tile_walk kernels' channel groups against their ungrouped output, bit for bit.
    "tests/test_causal_conv1d_impls.py::test_channel_groups_are_the_split_output_and_its_gradient",
    # The kernels' bf16 state against the XLA step's, bit for bit (one element rounded apart).
    "tests/test_decode_kernels.py::test_kernels_store_a_bfloat16_state_in_bfloat16",
    # The embedding's gradient, packed against alone at atol 1e-5 (2.1e-5 off at one entry).
    "tests/test_hybrid.py::test_packed_batch_gives_each_sequence_its_alone_logits_and_grads",
)


# The test modules that take longest (seconds of one worker's time at -n 2, measured with
# --durations=0 at 055a5fd), longest first. `make test` hands each module whole to one worker
# (--dist loadfile: the module's compiled programs and module fixtures made once, not once a
# worker) in this order (--no-loadscope-reorder), so that the last modules a worker takes,
# while the other finishes, are short ones. Unlisted modules follow, in their usual order.
SLOW_MODULES = (
    "test_links.py",  # 217
    "test_benchmarks.py",  # 211
    "test_mamba3_pallas.py",  # 160
    "test_causal_conv1d_impls.py",  # 138
    "test_selective_scan_impls.py",  # 120
    "test_generation_state_dtype.py",  # 104
    "test_model.py",  # 102
    "test_decode_kernels.py",  # 97
    "test_generate.py",  # 88
    "test_hybrid.py",  # 84
    "test_ssd_impls.py",  # 57
    "test_train.py",  # 51
    "test_mamba3_mimo.py",  # 44
    "test_mamba3_reference.py",  # 43
    "test_reference_ops.py",  # 42
    "test_generation_mamba2.py",  # 42
    "test_loss.py",  # 41
    "test_train_run_dir.py",  # 41
    "test_pretrained.py",  # 37
    "test_scaling.py",  # 28
    "test_train_mamba2.py",  # 26
    "test_mamba3_model.py",  # 25
    "test_ssd_mosaic.py",  # 24
    "test_ssd_reference.py",  # 21
)


def pytest_collection_modifyitems(items):
    """Runs the modules of SLOW_MODULES first, longest first: xdist hands out modules in
    collection order under --no-loadscope-reorder. Each module's tests keep their order, but
    for its tests of XLA_OPTIMIZED, which go last: the module switches XLA's optimisations on
    once (xla_optimized_test), rather than on and off around each."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), _optimized(item.nodeid)))


def _optimized(nodeid: str) -> bool:
    """Whether nodeid is, or is a test (any parametrization) of, an entry of XLA_OPTIMIZED."""
    return any(nodeid == p or nodeid.startswith((p + "::", p + "[")) for p in XLA_OPTIMIZED)


def _release_compiled_programs(module=None):
    from tests import compiled

    compiled._COMPILED.clear()
    getattr(module, "_COMPILED", {}).clear()
    jax.clear_caches()
    gc.collect()


def _set_optimizations_off(off: bool, module=None, release=True):
    """Sets jax_disable_most_optimizations; where that changes it, first frees the programs
    compiled under the other setting (unless release=False: none are held): the jit caches hold
    no executable of the setting (not part of their key)."""
    if release and off != jax.config.read("jax_disable_most_optimizations"):
        _release_compiled_programs(module)
    jax.config.update("jax_disable_most_optimizations", off)


@pytest.fixture(scope="module", autouse=True)
def xla_optimizations_mostly_off(request):
    """On CPU, XLA compiles the suite's programs (tiny models, interpreted kernels, random
    initialisers) for far longer than they run: with its optimisations off the suite took 18%
    less CPU time, the generation tests 44% less. Set per module, before its module fixtures
    compile anything; release_compiled_programs frees what a module compiled when it ends, so
    the next module's setting compiles its programs anew."""
    _set_optimizations_off(not _optimized(request.node.nodeid), release=False)
    yield
    _set_optimizations_off(False, release=False)


@pytest.fixture(autouse=True)
def xla_optimized_test(request):
    """A test of XLA_OPTIMIZED in a module compiled without the optimisations compiles its
    programs anew, with them (and the module's next test without them, anew again). Its
    module runs such tests last (pytest_collection_modifyitems), so the programs compiled
    for one of them serve the next, and the module's others are compiled once."""
    _set_optimizations_off(not _optimized(request.node.nodeid), request.module)
    yield


@pytest.fixture(scope="session", autouse=True)
def trainer_compiles_fast():
    """For the whole session, so that every in-process run (module fixtures included) compiles
    the same programs: runs that a test compares bit for bit."""
    from train import step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "jax", _TrainerJax())
        yield


@pytest.fixture(scope="session", autouse=True)
def worker_cache_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(compilation_cache.ENV_VAR, str(tmp_path_factory.mktemp("xla_cache")))
        yield


@pytest.fixture(autouse=True)
def restore_cache_settings():
    before = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
    yield
    for name, value in before.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
    # A module fixture that ran the trainer in-process turned the cache on before `before` was
    # read: off after every test, so that later tests do not write into its folder. Clearing
    # the folder setting is not enough: jax decides once per process that the cache is in use
    # and keeps writing to the folder it opened until reset_cache().
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs(request):
    """Frees each test module's compiled programs when it ends. XLA:CPU maps memory for every
    executable it keeps; a worker holding all of a run's programs (tests/compiled.py keeps them
    for reuse) reached 55,000 of the kernel's 65,530 maps (vm.max_map_count) and segfaulted
    inside XLA when the next compile could not map more (CI at stops 35 and 36)."""
    yield
    _release_compiled_programs(request.module)


@pytest.fixture
def decode_rule(monkeypatch):
    """set_rule(name, value): a pallas_kernels.decode.config rule for one test. The rules are
    read when a decode step is traced, and the jitted layer step keeps its traces across tests
    (same model shapes, same trace): the caches are cleared when a rule is set and after the
    test, so that no test reuses a trace made under another rule."""

    def set_rule(name, value):
        monkeypatch.setattr(f"pallas_kernels.decode.config.{name}", value)
        jax.clear_caches()

    yield set_rule
    jax.clear_caches()
