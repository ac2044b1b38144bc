"""SiT-XL/1 on SoftVQ tokens (spec.md §8.1-8.2): the paper's generator, trained with the same loop
as the tokenizers (`--mode=train`; softvq_jax/generator_task.py).

Usage: --config=configs/sit_xl_sq64_256.py:TOKENIZER[,SIZE]
  TOKENIZER  the tokenizer whose tokens are modelled, by its hub name (softvq_jax/variants.py):
             b-64 (default; the paper's gFID 1.78), bl-64, l-64 (64 tokens x 32, 256 px),
             b-32, bl-32, l-32 (32 tokens x 64), bl-64-512, l-32-512 (512 px)
  SIZE       the SiT: XL (default: 1152 wide, 28 blocks), L, B or S for cheaper runs

    # data path (a): tokens extracted once (+ flips) with the same tokenizer
    python -m softvq_jax.main --mode=extract --config=configs/sq64_256.py:B \\
        --workdir=$TOK --checkpoint=SoftVQVAE/softvq-b-64 --config.latents.flip=True \\
        --config.data.path=$TFDS_DATA_DIR
    python -m softvq_jax.main --config=configs/sit_xl_sq64_256.py:b-64 --workdir=$OUT \\
        --config.generator_data.tokens_dir=$TOK/tokens
    # data path (b): ImageNet encoded inside the step (centre crop + flip)
    python -m softvq_jax.main --config=configs/sit_xl_sq64_256.py:b-64 --workdir=$OUT \\
        --config.generator_data.source=images --config.data.path=$TFDS_DATA_DIR

Recipe (spec.md §8.2): AdamW lr 1e-4 constant, betas (0.9, 0.999), no weight decay, clip 1.0,
EMA 0.9999, global batch 256, 400k steps, lognormal t on the linear path, label dropout 0.1,
bfloat16 activations. The tokenizer defaults to the released one (its hub id); `--tokenizer=`
takes your own (a workdir after `--mode=stats`, or an official-format directory). Tokenizers
without measured latent statistics (b-32, bl-32, bl-64-512, l-32-512: config.json has none) are
refused until `--mode=stats` has measured them (or allow_unnormalised_latents=True).
"""
from softvq_jax import config_lib


def get_config(arg: str = ""):
  return config_lib.generator_variant_config("sit", arg)
