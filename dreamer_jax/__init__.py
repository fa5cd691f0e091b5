"""dreamer-jax: DreamerV2 as a pure-functional JAX/Flax system.

`dreamer_jax.load(logdir)` gives a run's agent, state, config and step (`dreamer_jax.api`).
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def train_cli() -> int:
    """The `dreamer-train` command (`dreamer_jax.train.main`)."""
    return _program("dreamer_jax.train")


def eval_cli() -> int:
    """The `dreamer-eval` command (`dreamer_jax.eval.main`)."""
    return _program("dreamer_jax.eval")


def _program(module: str) -> int:
    # Sets up the process for XLA:CPU's speed (`dreamer_jax.startup`) before jax is imported,
    # so that training and evaluation compute alike.
    from dreamer_jax.startup import prepare, quit_on_signals

    quit_on_signals()
    prepare()
    return importlib.import_module(module).main()


def __getattr__(name: str) -> Any:
    # Imported on first use, so that importing a light module (dreamer_jax.config) does not
    # import jax, flax and envpool with the package.
    if name == "load":
        from dreamer_jax.api import load

        return load
    raise AttributeError(f"module 'dreamer_jax' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
