"""SoftVQ-{B,BL,L}-32 at 256 px, exactly as released: 32 tokens of dim e = 64.

Usage: --config=configs/sq32_256.py:SIZE   (SIZE: B | BL | L, default L; LL = not released)

  :B   softvq-b-32   B encoder / B decoder
  :BL  softvq-bl-32  B encoder / L decoder
  :L   softvq-l-32   **B encoder / L decoder** — the released "L-32" is not L/L (its config.json
       names a ViT-B encoder); it is the same network as BL-32. Configured as released, so a
       model trained here compares with the release like for like.
  :LL  a true L/L 32-token network (not released; own name, never "L-32").

The table behind these (parameters, latent statistics) is softvq_jax/variants.py.
"""
from softvq_jax import config_lib


def get_config(size: str = "L"):
  return config_lib.variant_config("sq32_256", size or "L")
