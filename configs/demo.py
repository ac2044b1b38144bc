"""Tiny SoftVQ on the embedded demo photographs: runs on a 2-core CPU in minutes.

A 'mini' ViT (width 128, 4 blocks, 4 heads) encoder and decoder, 64 px images, 16 tokens.
"""
from softvq_jax import config_lib


def get_config():
  config = config_lib.base_config("B", num_latent_tokens=16, image_size=64)
  m = config.model
  m.encoder_size = m.decoder_size = "mini"
  m.patch_size = 8
  m.codebook_size = 256
  m.num_codebooks = 1
  m.compute_dtype = "float32"
  config.data.source = "demo"
  config.batch_size = 16
  return config
