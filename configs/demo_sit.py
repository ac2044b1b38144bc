"""A tiny SiT on the demo tokenizer's tokens (32 tokens x 32 channels): `--mode=sample` on a CPU.

    python -m softvq_jax.main --mode=sample --config=configs/demo_sit.py --workdir=/tmp/demo_sit \
        --tokenizer=/tmp/softvq_demo            # the README main command's workdir
        [--checkpoint=<generator>]              # else a randomly initialised SiT: noise images

Everything of configs/demo.py (the tokenizer, so that its sections describe the tokens and a
missing --tokenizer builds the same architecture randomly), plus the generator: a SiT of width
128, 4 blocks, 4 heads (the demo ViT's 'mini' size) in the 1-D form over the tokenizer's tokens,
and a short sampler (SDE, 25 steps, CFG 1.5 on [0, 1], linear path: the reference script's
setting with fewer steps) writing a 16-image grid. Training this SiT is issue 19. `--mode=eval`
with --config.sample.num_images=N scores N samples (gFID / IS / precision-recall) against the
demo's eval crops.
"""
from softvq_jax import config_lib


def get_config():
  config = _demo_config()
  config.generator = config_lib.generator_config(size="S", kind="sit")
  g = config.generator
  g.hidden_size, g.depth, g.num_heads = 128, 4, 4
  g.compute_dtype = "float32"
  # input_size / in_channels 0: the tokenizer's num_latent_tokens (32) and token dim (32).
  config.sample = config_lib.sample_config()
  s = config.sample
  s.mode = "sde"
  s.steps = 25
  s.cfg_scale = 1.5
  s.guidance_interval = (0.0, 1.0)
  s.path = "linear"
  s.batch_size = 16
  s.chunk_size = 64
  # --mode=eval (softvq_jax/gen_eval.py): --config.sample.num_images=N samples against the
  # statistics of the demo's eval crops (all of them; the FID Inception runs at 299 px, ~4
  # images/s on a 2-core CPU), precision / recall against their features.
  config.gen_eval = config_lib.gen_eval_config()
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
