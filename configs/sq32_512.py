"""SoftVQ-L-32 at 512 px, exactly as released (softvq-l-32-512): 32 tokens of dim e = 64, and —
despite the name — a **B encoder with an L decoder** (its config.json names a ViT-B encoder).

Usage: --config=configs/sq32_512.py:SIZE   (SIZE: L, default; LL = a true L/L network, not
released)

The table behind it (parameters, latent statistics) is softvq_jax/variants.py.
"""
from softvq_jax import config_lib


def get_config(size: str = "L"):
  return config_lib.variant_config("sq32_512", size or "L")
