"""Tiny SoftVQ on the embedded demo photographs, with the whole objective: ~10 min on a 2-core CPU.

A 'mini' ViT (width 128, 4 blocks, 4 heads) encoder and decoder, 64 px images, patch 8,
32 tokens on one 4096-code codebook; the published recipe otherwise (AdamW, warm-up + cosine,
clipping, EMA, entropy loss), with a learning rate, LayerScale init and EMA decay sized for a run
of minutes from scratch instead of days from DINOv2-sized models (LayerScale 1e-5 leaves a
from-scratch ViT near the identity for hundreds of steps; measured: reconstruction MSE 0.105 vs
0.115 after 1000 steps).
"""
from softvq_jax import config_lib, variants


def get_config():
  config = config_lib.base_config(variants.by_name("b-32"))
  config.image_size = 64
  m = config.model
  m.encoder_size = m.decoder_size = "mini"
  m.patch_size = 8
  m.codebook_size = 4096
  m.codebook_embed_dim = 32
  m.layer_scale_init = 0.1
  m.num_codebooks = 1
  m.compute_dtype = "float32"
  config.data.source = "demo"
  config.batch_size = 16
  config.num_train_steps = 600
  config.optim.lr = 2e-3
  config.optim.lr_batch_scaling = False
  config.optim.warmup_steps = 50
  config.optim.ema_decay = 0.99
  config.log_every_steps = 50
  config.image_every_steps = 200
  config.checkpoint_every_steps = 200
  config.keep_every_steps = 0
  # The whole objective of spec 5, switched on early and shrunk to the demo's scale: LPIPS-VGG,
  # REPA with a small ViT teacher, the DINO-style discriminator with a small backbone reading the
  # 64-px image directly (4 readouts), LeCam and consistency regularisation. No pretrained files
  # can be downloaded here, so the frozen networks are randomly initialised (set
  # config.pretrained.* to real files for real runs, see README "The training objective").
  config.pretrained.allow_random_init = True
  config.loss.perceptual_warmup_steps = 100
  config.loss.disc_start = 300
  config.disc.backbone_size = "micro"
  config.disc.img_size = 64
  config.disc.patch_size = 8
  config.disc.readout_blocks = (0, 1)
  config.repa.teacher_size = "micro"
  config.repa.patch_size = 8
  config.repa.hidden_dim = 128
  # Evaluation (--mode=eval, and once in the loop at the end): the first 128 / 64 eval crops
  # (the Inception runs at 299 px: ~4 images/s on a 2-core CPU).
  config.eval.num_images = 128
  config.eval.every_steps = config.num_train_steps
  config.eval.in_loop_num_images = 64
  return config
