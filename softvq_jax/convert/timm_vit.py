"""Import timm ViT / DINOv2 / DINO state dicts into `models.vit.VisionTransformer`.

Used for the tokenizer encoder's DINOv2 initialisation, the DINO discriminator backbone and the
REPA teacher. A pretrained DINOv2 is a patch-14 model at 518 px (37x37 grid) while the tokenizer
builds patch-16 models at 256/512 px, so, as timm does when it loads such a checkpoint into a
differently built model, the position-embedding grid is resampled (bicubic, antialiased, prefix
tokens kept) and the patch kernel is PI-resized (`convert/resample.py`).

Accepted files: `.safetensors` (NumPy only), `.npz`, or a PyTorch `.pth`/`.bin` (needs torch,
imported only here). DINO's original checkpoint (`dino_deitsmall16_pretrain.pth`) already uses
timm's key names.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from softvq_jax.convert.safetensors_io import CheckpointError, read_safetensors
from softvq_jax.convert.state_dict import load_state_dict
from softvq_jax.convert.resample import resample_patch_kernel, resample_pos_embed
from softvq_jax.models.vit import VisionTransformer

# Parts of timm checkpoints that the trunk does not use: classifier heads and their norms, the
# DINOv2 mask token (masked-image-modelling only).
TIMM_IGNORED = (r"head\..*", r"fc_norm\..*", r"head_drop\..*", r"mask_token")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: float array} from .safetensors / .npz / .pth / .bin."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"{path}: reading PyTorch files needs torch (pip install torch), or "
                          "convert the file to .safetensors once elsewhere") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("model", "state_dict", "teacher"):  # common training-checkpoint wrappers
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  return {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def load_timm_vit(model: VisionTransformer, state_dict: Mapping[str, np.ndarray], *,
                  source: str = "state dict", zero_qk_bias: bool = False,
                  ignore=TIMM_IGNORED) -> None:
  """Loads a timm ViT state dict into `model`, resampling pos_embed / patch kernel if needed.

  zero_qk_bias: zero the key part of every qkv bias after loading (the DINO discriminator does
  this; the key bias only shifts logits per query, so this is a pure re-parameterisation there).
  """
  sd = dict(state_dict)
  if "reg_token" in sd:
    raise CheckpointError(f"{source}: register tokens (reg_token) are not supported; use a "
                          "DINOv2 model without registers")

  def adapt(key, arr, shape):
    if key.endswith("pos_embed") and arr.ndim == 3 and arr.shape[-1] == shape[-1]:
      return resample_pos_embed(arr, (model.grid, model.grid), model.num_prefix_tokens)
    if key.endswith("patch_embed.proj.weight") and arr.shape[2:] == shape[2:]:
      return resample_patch_kernel(arr, shape[:2])
    return arr

  load_state_dict(model, sd, source=source, ignore=ignore, adapt=adapt)
  if zero_qk_bias:
    for block in model.blocks:
      bias = np.array(block.attn.qkv.bias[...])  # q | k | v
      d = bias.shape[0] // 3
      bias[d:2 * d] = 0.0
      block.attn.qkv.bias[...] = bias


def load_timm_vit_file(model: VisionTransformer, path: str, **kw) -> None:
  load_timm_vit(model, read_state_dict(path), source=path, **kw)
