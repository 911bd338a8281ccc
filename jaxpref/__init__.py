"""jaxpref: accelerator-native preference learning for language models in JAX/Flax."""

__version__ = "0.1.0"
