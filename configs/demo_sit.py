"""A tiny SiT on the demo tokenizer's tokens (32 tokens x 32 channels): trained, then sampled, on a CPU.

The chain (README "Train a generator on the tokens"), on the README main command's tokenizer:

    python -m softvq_jax.main --config=configs/demo.py --workdir=/tmp/softvq_demo --mode=stats
    python -m softvq_jax.main --config=configs/demo.py --workdir=/tmp/softvq_demo --mode=extract \
        --config.latents.flip=True                                  # -> /tmp/softvq_demo/tokens
    python -m softvq_jax.main --config=configs/demo_sit.py --workdir=/tmp/demo_sit \
        --tokenizer=/tmp/softvq_demo                                # trains: --mode=train
    python -m softvq_jax.main --mode=sample --config=configs/demo_sit.py \
        --workdir=/tmp/demo_sit/sample --checkpoint=/tmp/demo_sit/generator \
        --tokenizer=/tmp/softvq_demo

Everything of configs/demo.py (the tokenizer: its sections describe the tokens, and a missing
--tokenizer in --mode=sample builds the same architecture randomly), plus the generator: a SiT of
width 128, 4 blocks, 4 heads (the demo ViT's 'mini' size) in the 1-D form over the tokenizer's
tokens, trained on the extracted tokens of the embedded photographs' crops (and their flips),
class = the photograph (0..8: astronaut, coffee, chelsea, rocket, cat, immunohistochemistry,
hubble_deep_field, retina, camera). Recipe: spec.md §8.2's (AdamW without weight decay, betas
(0.9, 0.999), clip 1.0, lognormal t, linear path, label dropout 0.1) at CPU scale: batch 64, a
constant lr of 1e-3 after a 100-step warm-up (1e-4 is for batch 256 over 400k steps), 1200
steps, EMA 0.995 (0.9999 averages over 10k steps, longer than the run: measured, with 0.999 the
step-500 samples still carried 61% of the random initialisation). Sampler: SDE, 25 steps, CFG 1.5 on
[0, 1], the labels cycling over the 9 photographs.

`--mode=sample` without --checkpoint samples a randomly initialised SiT (noise images);
`--mode=eval` with --config.sample.num_images=N scores N samples (gFID / IS /
precision-recall) against the demo's eval crops.
"""
from softvq_jax import config_lib

def get_config():
  config = _demo_config()
  config_lib.generator_train_config(config, kind="sit", size="S")
  g = config.generator
  g.hidden_size, g.depth, g.num_heads = 128, 4, 4
  g.compute_dtype = "float32"
  # input_size / in_channels 0: the tokenizer's num_latent_tokens (32) and token dim (32).
  config.generator_data.source = "tokens"   # "" tokens_dir = <--tokenizer>/tokens
  config.generator_objective.path = "linear"
  config.generator_objective.time_sampling = "lognormal"
  config.batch_size = 64
  config.num_train_steps = 1200
  o = config.optim
  o.lr, o.warmup_steps, o.warmup_init_lr = 1e-3, 100, 1e-5
  o.ema_decay = 0.995
  config.log_every_steps = 100
  config.image_every_steps = 300
  config.checkpoint_every_steps = 300
  config.keep_every_steps = 0
  config.num_grid_images = 16
  config.eval.every_steps = 0  # in-loop gFID: --config.eval.every_steps=N (the FID Inception)
  config.sample = config_lib.sample_config()
  s = config.sample
  s.mode = "sde"
  s.steps = 25
  s.cfg_scale = 1.5
  s.guidance_interval = (0.0, 1.0)
  s.path = "linear"
  s.batch_size = 16
  s.chunk_size = 64
  s.labels = "0,1,2,3,4,5,6,7,8"  # the photographs
  # --mode=eval (softvq_jax/gen_eval.py): --config.sample.num_images=N samples against the
  # statistics of the demo's eval crops (all of them; the FID Inception runs at 299 px, ~4
  # images/s on a 2-core CPU), precision / recall against their features.
  ge = config.gen_eval
  ge.reference_split = config.data.eval_split
  ge.reference_num_images = 0
  ge.precision_recall_reference_images = 0  # all of them
  ge.inception_batch_size = 16
  ge.in_loop_num_images = 64
  return config


def _demo_config():
  """configs/demo.py's get_config (a sibling file; configs/ is not a package)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  spec = importlib.util.spec_from_file_location("softvq_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
