"""DiT-XL/1 on SoftVQ tokens (spec.md §8.4): the paper's second generator, trained with the same
loop as the tokenizers (`--mode=train`; softvq_jax/generator_task.py).

Usage: --config=configs/dit_xl_sq64_256.py:TOKENIZER[,SIZE]   (as configs/sit_xl_sq64_256.py:
TOKENIZER a hub name of softvq_jax/variants.py, default b-64 — the released DiT is on l-64:
`:l-64`; SIZE XL (default), L, B or S)

Recipe (spec.md §8.4): Gaussian diffusion with 1000 steps and the cosine beta schedule (the
published command), learned variance (the loss is MSE + the variational bound), AdamW lr 1e-4
constant, no weight decay, clip 5.0, EMA 0.9999, batch 256; sampling: 250 respaced DDPM steps
with CFG on the epsilon channels (config.sample).
"""
from softvq_jax import config_lib


def get_config(arg: str = ""):
  return config_lib.generator_variant_config("dit", arg)
