"""dreamer-jax: DreamerV2 as a pure-functional JAX/Flax system.

`dreamer_jax.load(logdir)` gives a run's agent, state, config and step (`dreamer_jax.api`).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def train_cli() -> int:
    """The `dreamer-train` command: re-executes itself with glibc's huge-page tunable
    (`dreamer_jax.hugepages`) before jax is imported, then runs `dreamer_jax.train.main`."""
    from dreamer_jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()
    from dreamer_jax.train import main

    return main()


def __getattr__(name: str) -> Any:
    # Imported on first use, so that importing a light module (dreamer_jax.config) does not
    # import jax, flax and envpool with the package.
    if name == "load":
        from dreamer_jax.api import load

        return load
    raise AttributeError(f"module 'dreamer_jax' has no attribute '{name}'")
