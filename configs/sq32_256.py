"""SoftVQ-{size}-32 at 256 px: 32 tokens of dim 32; size B, BL or L (all released at 256 px).

Usage: --config=configs/sq32_256.py:SIZE   (SIZE defaults to L)
"""
from softvq_jax import config_lib


def get_config(size: str = "L"):
  return config_lib.base_config(size or "L", num_latent_tokens=32, image_size=256)
