"""SoftVQ-BL-64 at 512 px, exactly as released (softvq-bl-64-512): B encoder / L decoder,
64 tokens of dim e = 32.

Usage: --config=configs/sq64_512.py   (the argument, if given, must be BL)

The table behind it (parameters, latent statistics) is softvq_jax/variants.py.
"""
from softvq_jax import config_lib


def get_config(size: str = "BL"):
  return config_lib.variant_config("sq64_512", size or "BL")
