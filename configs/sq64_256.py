"""SoftVQ-{B,BL,L}-64 at 256 px, exactly as released: 64 tokens of dim e = 32.

Usage: --config=configs/sq64_256.py:SIZE   (SIZE: B | BL | L, default L)

  :B   softvq-b-64   B encoder / B decoder
  :BL  softvq-bl-64  B encoder / L decoder
  :L   softvq-l-64   L encoder / L decoder

The table behind these (parameters, latent statistics) is softvq_jax/variants.py.
"""
from softvq_jax import config_lib


def get_config(size: str = "L"):
  return config_lib.variant_config("sq64_256", size or "L")
