"""SoftVQ-{size}-64 at 512 px: 64 tokens of dim 32; size BL (released) or B / L.

Usage: --config=configs/sq64_512.py:SIZE   (SIZE defaults to BL)
"""
from softvq_jax import config_lib


def get_config(size: str = "BL"):
  return config_lib.base_config(size or "BL", num_latent_tokens=64, image_size=512)
