"""Every released SoftVQ model reproducible by name (spec.md §2).

The expected values below are copied from the spec (the hub config.json files are its authority),
not from softvq_jax/variants.py: that table, the configs built from it and the README's model
table are what is checked here.
"""
import os

import numpy as np
import pytest

from conftest import config_file, require
from softvq_jax import config_lib, variants
from softvq_jax.convert.state_dict import expected_keys, to_torch
from softvq_jax.models.tokenizer import TokenizerConfig, abstract_tokenizer, count_params

ROOT = os.path.join(os.path.dirname(__file__), "..")

# spec.md §2: hub name -> (encoder, decoder, N, e, S, parameters as released, vq_mean, vq_std)
SPEC = {
    "b-32": ("B", "B", 32, 64, 256, 173_997_120, None, None),
    "b-64": ("B", "B", 64, 32, 256, 172_973_088, -0.003192751, 0.07235257),
    "bl-32": ("B", "L", 32, 64, 256, 391_571_008, None, None),
    "bl-64": ("B", "L", 64, 32, 256, 390_546_976, -0.00077168207, 0.07157949),
    "l-32": ("B", "L", 32, 64, 256, 391_571_008, 0.00060894643, 0.029030401),
    "l-64": ("L", "L", 64, 32, 256, 608_136_992, 0.0009714666, 0.07259091),
    "bl-64-512": ("B", "L", 64, 32, 512, 391_923_232, None, None),
    "l-32-512": ("B", "L", 32, 64, 512, 392_947_264, None, None),
}
# The config each released model is trained from (issue 13: configs named after the hub models).
CONFIG_OF = {"b-32": "sq32_256:B", "bl-32": "sq32_256:BL", "l-32": "sq32_256:L",
             "b-64": "sq64_256:B", "bl-64": "sq64_256:BL", "l-64": "sq64_256:L",
             "bl-64-512": "sq64_512:BL", "l-32-512": "sq32_512:L"}
TIMM_NAMES = {"B": "vit_base_patch14_dinov2.lvd142m", "L": "vit_large_patch14_dinov2.lvd142m"}


def _config(file_arg: str):
  return config_file(*file_arg.split(":"))


def test_variant_table_is_the_spec():
  released = {v.name: v for v in variants.VARIANTS if v.released}
  assert set(released) == set(SPEC)
  for name, (enc, dec, n, e, s, params, mean, std) in SPEC.items():
    v = released[name]
    assert (v.encoder_size, v.decoder_size, v.num_latent_tokens, v.codebook_embed_dim,
            v.image_size, v.num_params, v.vq_mean, v.vq_std) == (enc, dec, n, e, s, params, mean,
                                                                 std), name
    assert f"{v.config_file}:{v.config_arg}" == CONFIG_OF[name]
    assert v.hub_id == f"SoftVQVAE/softvq-{name}"
  for v in variants.VARIANTS:  # unreleased networks never carry a released name
    if not v.released:
      assert v.name not in SPEC and v.hub_id is None and "not released" in v.note


def _official_shapes(enc: str, dec: str, n: int, e: int, s: int) -> dict:
  """The official model's state dict, key -> shape, built as the official code builds it (timm
  DINOv2 ViTs at patch 16 and the image size; spec.md §1.2-1.4) on torch's meta device (no memory),
  minus the decoder's unused patch_embed that the released files lack."""
  torch = require("torch")
  timm = require("timm")
  with torch.device("meta"):
    vits = {part: timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=0,
                                    img_size=s, patch_size=16)
            for part, size in (("encoder", enc), ("decoder", dec))}
  de, dd = vits["encoder"].embed_dim, vits["decoder"].embed_dim
  out = {f"{part}.model.{k}": tuple(t.shape) for part, m in vits.items()
         for k, t in m.state_dict().items()
         if not (part == "decoder" and k.startswith("patch_embed."))}
  out.update({
      "encoder.latent_tokens": (1, n, de), "encoder.latent_pos_embed": (1, n, de),
      "quant_conv.weight": (e, de), "quant_conv.bias": (e,),
      "quantize.embedding": (variants.NUM_CODEBOOKS, variants.CODEBOOK_SIZE, e),
      "post_quant_conv.weight": (dd, e), "post_quant_conv.bias": (dd,),
      "decoder.mask_token": (1, 1, dd), "decoder.latent_pos_embed": (1, n, dd),
      "decoder.to_pixel.model.weight": (3 * 16 * 16, dd), "decoder.to_pixel.model.bias": (768,),
  })
  return out


@pytest.mark.parametrize("name", list(SPEC))
def test_config_builds_the_released_network(name):
  """config -> model: the parameter count of spec.md §2, and exactly the released state dict's keys
  and shapes (every key of the official structure, nothing else)."""
  enc, dec, n, e, s, params, mean, std = SPEC[name]
  config = _config(CONFIG_OF[name])
  config_lib.validate(config)
  m = config.model
  assert (m.encoder_size, m.decoder_size, m.num_latent_tokens, m.codebook_embed_dim,
          config.image_size) == (enc, dec, n, e, s)
  assert (m.num_codebooks, m.codebook_size, m.tau, m.codebook_l2_norm) == (4, 8192, 0.07, True)
  # The released latent statistics are the defaults where the spec knows them.
  assert (m.vq_mean, m.vq_std) == ((0.0, 1.0) if mean is None else (mean, std))
  model = abstract_tokenizer(TokenizerConfig.from_config(config))
  assert count_params(model) == params
  ours = {k: tuple(to_torch(np.zeros(shape, np.int8), kind).shape)
          for k, (_, kind, shape) in expected_keys(model).items()}
  assert ours == _official_shapes(enc, dec, n, e, s)


@pytest.mark.parametrize("file_arg", ["sq32_256:LL", "sq32_512:LL"])
def test_unreleased_ll_networks_have_their_own_name(file_arg):
  config = _config(file_arg)
  v = variants.find(*file_arg.split(":"))
  assert not v.released
  assert (config.model.encoder_size, config.model.decoder_size) == ("L", "L")
  assert count_params(abstract_tokenizer(TokenizerConfig.from_config(config))) == v.num_params


def test_unknown_config_argument_names_the_choices():
  with pytest.raises(ValueError, match=r"sq64_512\.py:BL"):
    _config("sq64_512:L")


def test_readme_model_table_is_the_variant_table():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert variants.markdown_table() in readme
