"""resflax: the networks of "Deep Residual Learning for Image Recognition" in JAX/Flax."""

__version__ = "0.1.0"
