"""Shared test setup: a persistent XLA compilation cache so that the same program compiled
by several tests (or pytest-xdist workers) is compiled once per machine, and the process
set-up of `dreamer_jax.startup` (XLA flags here and in the CLI subprocesses tests start, the
malloc tunables there) so that tests compute as `dreamer-train` does."""

import os
import pathlib

import jax

from dreamer_jax.startup import jaxlib_version, with_eigen_dots, with_malloc_tunables

CACHE = os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
# Exported too, so the CLI subprocesses that tests start share the cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# XLA_FLAGS before any test makes jax's backend: in-process results then match the CLI's
# bit for bit. The tunables are for the CLI subprocesses, so they do not each re-execute (and
# re-import jax); tests/test_startup.py runs the re-execution itself.
os.environ.update(with_eigen_dots(dict(os.environ), jaxlib_version()) or {})
os.environ.update(with_malloc_tunables(dict(os.environ)) or {})


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the slowest (cartpole's learning run, minutes) first of all:
    with pytest-xdist's two workers, a long test collected last would run alone at the end
    while the other worker idles."""
    first = "test_cartpole_learns_beyond_random"
    items.sort(key=lambda item: (item.name != first, item.get_closest_marker("slow") is None))
