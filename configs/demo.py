"""Tiny SoftVQ on the embedded demo photographs: trains on a 2-core CPU in a few minutes.

A 'mini' ViT (width 128, 4 blocks, 4 heads) encoder and decoder, 64 px images, patch 8,
16 tokens; the published recipe otherwise (AdamW, warm-up + cosine, clipping, EMA, entropy loss),
with a learning rate and EMA decay sized for a run of minutes instead of days.
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
  config.num_train_steps = 1000
  config.optim.lr = 1e-3
  config.optim.lr_batch_scaling = False
  config.optim.warmup_steps = 50
  config.optim.ema_decay = 0.99
  config.log_every_steps = 50
  config.image_every_steps = 250
  config.checkpoint_every_steps = 250
  config.keep_every_steps = 0
  return config
