"""Shared test setup: a persistent XLA compilation cache so that the same program compiled
by several tests (or pytest-xdist workers) is compiled once per machine, and the CLI
subprocesses start with the huge-page tunable the CLI would re-execute itself to get."""

import os
import pathlib

import jax

from dreamer_jax.hugepages import with_huge_pages

CACHE = os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
# Exported too, so the CLI subprocesses that tests start share the cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
# Set for the CLI subprocesses tests start, so they do not each re-execute (and re-import
# jax); tests/test_hugepages.py runs the re-execution itself.
os.environ.update(with_huge_pages(dict(os.environ)) or {})
