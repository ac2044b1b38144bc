"""softvq_jax: SoftVQ-VAE 1-D continuous image tokenizer in JAX/Flax NNX."""
__version__ = "0.1.0"
