"""Shared test setup: a persistent XLA compilation cache so that the same program compiled
by several tests (or pytest-xdist workers) is compiled once per machine."""

import os
import pathlib

import jax

CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_CACHE_DIR", str(CACHE)))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
