"""Import/export of the official SoftVQ hub format: `config.json` + `model.safetensors`.

The official repos (`SoftVQVAE/<name>`) are written by huggingface_hub's PyTorchModelHubMixin: a
flat JSON of the PyTorch `ModelArgs` and the state dict (spec.md §3). We read the
architecture from the JSON — never assume codebook sizes or latent statistics — refuse any
option our model does not implement, and load the weights strictly. Export writes the same
format, so a model trained here loads in the official PyTorch code (and back here).
"""
from __future__ import annotations

import json
import re

import numpy as np

from softvq_jax import paths
from softvq_jax.convert.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from softvq_jax.convert.state_dict import export_state_dict, load_state_dict
from softvq_jax.models.tokenizer import SoftVQTokenizer, TokenizerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Present in official checkpoints, not needed to encode/decode (spec.md §3).
IGNORED_KEYS = (
    r"decoder\.model\.patch_embed\..*",  # owned by the decoder, never used by its forward pass
    r"quantize\.codebook_used",          # usage buffer (codebook_show_usage)
    r"repa_model\..*",                   # frozen DINOv2 teacher (training only)
    r"projection\..*",                   # REPA projector (training only)
)

# `tau` is a field of the official config.json (the reference's example field set, 45 fields, and
# the released files' 37-field Dec-2024 set). A file without it gets the constructor default 0.07.
DEFAULT_TAU = 0.07

_SIZE_BY_NAME = {"micro": "micro", "mini": "mini", "tiny": "T", "small": "S", "base": "B",
                 "large": "L"}
# "vit_micro" / "vit_mini" are ours (the test and CPU demo sizes); the official code only knows
# the timm names.
_NAME_BY_SIZE = {"micro": "vit_micro_softvq", "mini": "vit_mini_softvq",
                 "T": "vit_tiny_patch16_224", "S": "vit_small_patch14_dinov2.lvd142m",
                 "B": "vit_base_patch14_dinov2.lvd142m", "L": "vit_large_patch14_dinov2.lvd142m"}

# The field set of an official config.json (values: the published defaults) for export.
_EXPORT_DEFAULTS = {
    "base_image_size": 256, "codebook_show_usage": False, "commit_loss_beta": 0.25,
    "dec_drop_path_rate": 0.0, "dec_pretrained": False, "dec_tuning_method": "full",
    "dec_type": "vit", "decoder_ch_mult": [1, 1, 2, 2, 4], "dropout_p": 0.0,
    "enc_drop_path_rate": 0.0, "enc_pretrained": False, "enc_token_drop": 0.0,
    "enc_token_drop_max": 0.6, "enc_tuning_method": "full", "enc_type": "vit",
    "encoder_ch_mult": [1, 1, 2, 2, 4], "entropy_loss_ratio": 0.01, "kl_loss_weight": 1e-06,
    "repa": False, "repa_align": "global", "repa_loss_weight": 0.1,
    "repa_model": "vit_base_patch16_224", "repa_patch_size": 16, "repa_proj_dim": 2048,
    "rope_mixed": False, "rope_theta": 10.0, "to_pixel": "linear", "use_ape": True,
    "use_rope": False, "vq_loss_ratio": 1.0, "z_channels": 256,
}


def _vit_size(field: str, name) -> str:
  m = re.match(r"vit_(micro|mini|tiny|small|base|large)_", str(name))
  if not m:
    raise CheckpointError(f"config.json: {field}={name!r} is not a supported encoder/decoder "
                          "(supported: timm vit_tiny/small/base/large_* ViTs)")
  return _SIZE_BY_NAME[m.group(1)]


def config_from_official(cfg: dict, *, source: str = CONFIG_NAME) -> TokenizerConfig:
  """Official `ModelArgs` JSON -> TokenizerConfig; unsupported options fail naming the field."""
  required = ("image_size", "encoder_model", "decoder_model", "num_latent_tokens",
              "codebook_size", "codebook_embed_dim", "codebook_l2_norm", "num_codebooks")
  missing = [f for f in required if f not in cfg]
  if missing:
    raise CheckpointError(f"{source}: missing field(s) {missing}; is this a SoftVQ config.json?")

  def must(field, allowed, default):
    value = cfg.get(field, default)
    if value not in allowed:
      raise CheckpointError(f"{source}: {field}={value!r} is not supported by softvq_jax "
                            f"(supported: {list(allowed)})")

  must("enc_type", ("vit",), "vit")
  must("dec_type", ("vit",), "vit")
  must("to_pixel", ("linear",), "linear")
  must("use_rope", (False,), False)
  must("use_ape", (True,), True)
  # LoRA tuning renames the MLP weights; 'frozen' only affects training.
  must("enc_tuning_method", ("full", "frozen"), "full")
  must("dec_tuning_method", ("full", "frozen"), "full")
  enc_p, dec_p = cfg.get("enc_patch_size", 16), cfg.get("dec_patch_size", 16)
  if enc_p != dec_p:
    raise CheckpointError(f"{source}: enc_patch_size={enc_p} != dec_patch_size={dec_p} is not "
                          "supported")
  return TokenizerConfig(
      image_size=int(cfg["image_size"]), patch_size=int(enc_p),
      encoder_size=_vit_size("encoder_model", cfg["encoder_model"]),
      decoder_size=_vit_size("decoder_model", cfg["decoder_model"]),
      num_latent_tokens=int(cfg["num_latent_tokens"]), codebook_size=int(cfg["codebook_size"]),
      codebook_embed_dim=int(cfg["codebook_embed_dim"]), num_codebooks=int(cfg["num_codebooks"]),
      codebook_l2_norm=bool(cfg["codebook_l2_norm"]),
      tau=float(cfg.get("tau", DEFAULT_TAU)),
      dec_cls_token=bool(cfg.get("dec_cls_token", True)),
      vq_mean=float(cfg.get("vq_mean", 0.0)), vq_std=float(cfg.get("vq_std", 1.0)))


def config_to_official(cfg: TokenizerConfig) -> dict:
  out = dict(_EXPORT_DEFAULTS)
  out.update(
      image_size=cfg.image_size, enc_patch_size=cfg.patch_size, dec_patch_size=cfg.patch_size,
      encoder_model=_NAME_BY_SIZE[cfg.encoder_size], decoder_model=_NAME_BY_SIZE[cfg.decoder_size],
      num_latent_tokens=cfg.num_latent_tokens, codebook_size=cfg.codebook_size,
      codebook_embed_dim=cfg.codebook_embed_dim, codebook_l2_norm=cfg.codebook_l2_norm,
      num_codebooks=cfg.num_codebooks, dec_cls_token=cfg.dec_cls_token,
      vq_mean=cfg.vq_mean, vq_std=cfg.vq_std)
  out["tau"] = cfg.tau
  return dict(sorted(out.items()))


def is_official_dir(path) -> bool:
  """Whether `path` (local or URL) holds config.json + model.safetensors."""
  path = paths.resolve(path)
  return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_official_config(directory) -> TokenizerConfig:
  path = paths.resolve(directory) / CONFIG_NAME
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read the config ({e})") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return config_from_official(raw, source=str(path))


def load_official_weights(model: SoftVQTokenizer, directory) -> None:
  """Strictly loads `model.safetensors` of an official-format directory (local or URL) into
  `model`."""
  path = paths.resolve(directory) / WEIGHTS_NAME
  load_state_dict(model, read_safetensors(path), source=str(path), ignore=IGNORED_KEYS)


def export_official(model: SoftVQTokenizer, directory) -> None:
  """Writes `config.json` + `model.safetensors` (to a local folder or a URL) loadable by the
  official PyTorch code. The weights are written first: a directory with a config.json is one
  whose weights are complete."""
  directory = paths.resolve(directory)
  directory.mkdir(parents=True, exist_ok=True)
  cfg = model.cfg
  sd = export_state_dict(model)
  dd = sd["decoder.model.norm.weight"].shape[0]
  p = cfg.patch_size
  # The official decoder owns an unused patch embedding; PyTorch's strict load wants it present.
  sd["decoder.model.patch_embed.proj.weight"] = np.zeros((dd, 3, p, p), np.float32)
  sd["decoder.model.patch_embed.proj.bias"] = np.zeros((dd,), np.float32)
  write_safetensors(directory / WEIGHTS_NAME, sd, metadata={"format": "pt"})
  paths.write_json(directory / CONFIG_NAME, config_to_official(cfg))
