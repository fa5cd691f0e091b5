"""Shared test setup: a persistent XLA compilation cache so that the same program compiled
by several tests (or pytest-xdist workers) is compiled once per machine."""

import os
import pathlib

import jax

CACHE = os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache")
)
# Exported too, so the CLI subprocesses that tests start share the cache.
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
