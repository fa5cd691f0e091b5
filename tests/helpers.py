"""Small builders shared by the learner tests (not a test module)."""

import jax
import jax.numpy as jnp
import numpy as np

from dreamer_jax.agent import Agent
from dreamer_jax.config import make_config

VECTOR_SIZE, NUM_ACTIONS = 4, 3


def tiny_config(*presets, **overrides):
    return make_config(["classic", "debug", *presets], overrides)


def vector_agent(config=None) -> Agent:
    config = config or tiny_config()
    return Agent(config, {"vector": ((VECTOR_SIZE,), np.float32)}, NUM_ACTIONS, discrete=True)


def structured_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable fixed batch: observations and rewards are smooth functions of a phase
    that the actions advance, so the model loss can fall well below its initial value."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, NUM_ACTIONS, (batch, length))
    phase = np.cumsum(actions, 1) * 0.4 + rng.uniform(0, 6, (batch, 1))
    vector = np.stack([np.sin(phase), np.cos(phase), np.sin(2 * phase), actions / 2], -1)
    is_terminal = np.zeros((batch, length), bool)
    is_terminal[0, -1] = True
    return {
        "vector": vector.astype(np.float32),
        "action": np.eye(NUM_ACTIONS, dtype=np.float32)[actions],
        "reward": np.cos(phase).astype(np.float32),
        "is_first": np.zeros((batch, length), bool),
        "is_last": is_terminal.copy(),
        "is_terminal": is_terminal,
    }


def product_input_dtypes(fn, *args) -> set[jnp.dtype]:
    """The operand dtypes of every matmul and convolution `fn` runs (nested jaxprs too)."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.update(v.aval.dtype for v in eqn.invars)
            for param in eqn.params.values():
                if hasattr(param, "jaxpr"):  # a nested (closed) jaxpr: jit, custom_vjp, ...
                    walk(param.jaxpr if hasattr(param.jaxpr, "eqns") else param.jaxpr.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found
