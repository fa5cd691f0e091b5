"""dreamer-jax: DreamerV2 as a pure-functional JAX/Flax system."""

__version__ = "0.1.0"
