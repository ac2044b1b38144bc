"""Load the public DINO ViT-S/16 weights into the discriminator's frozen backbone (spec.md §5.1).

The checkpoint `dino_deitsmall16_pretrain.pth` (facebookresearch/dino) is a plain state dict with
timm `vit_small_patch16_224` key names, so this is `timm_vit.load_timm_vit` plus what the
reference does at load time: the key part of every block's qkv bias is zeroed. A DINO *training*
checkpoint (`teacher`/`student` dicts with `module.` / `backbone.` prefixes) is unwrapped too.
A `.safetensors` copy loads without torch; `.pth` needs torch (imported only when reading it).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from softvq_jax.convert import timm_vit
from softvq_jax.convert.safetensors_io import CheckpointError

# DINO's projection head (`head.mlp...`, `head.last_layer...`) and a classifier head if present.
DINO_IGNORED = timm_vit.TIMM_IGNORED + (r"head\..*",)


def _strip_prefixes(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = dict(sd)
  for prefix in ("module.", "backbone."):
    if out and all(k.startswith(prefix) or k.startswith("head.") for k in out) and any(
        k.startswith(prefix) for k in out):
      out = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in out.items()}
  return out


def load_dino_backbone(disc, state_dict: Mapping[str, np.ndarray], *,
                       source: str = "DINO state dict") -> None:
  """Loads DINO ViT weights into `disc.backbone` in place (strict; key bias zeroed).

  disc: a `models.discriminator.DinoDiscriminator` (or anything with a `.backbone` ViT).
  Raises CheckpointError naming missing / unexpected / mis-shaped keys.
  """
  backbone = getattr(disc, "backbone", None)
  if backbone is None:
    raise TypeError(f"{type(disc).__name__} has no .backbone; pass a DinoDiscriminator")
  sd = _strip_prefixes(state_dict)
  if "pos_embed" in sd and np.shape(sd["pos_embed"])[1] != backbone.grid ** 2 + 1:
    raise CheckpointError(
        f"{source}: pos_embed has {np.shape(sd['pos_embed'])[1]} tokens but the discriminator's "
        f"backbone is built for {backbone.img_size} px ({backbone.grid ** 2 + 1} tokens); the "
        "reference uses the 224-px DINO ViT-S/16 unchanged; build the discriminator at "
        "img_size=224")
  timm_vit.load_timm_vit(backbone, sd, source=source, zero_qk_bias=True, ignore=DINO_IGNORED)


def load_dino_backbone_file(disc, path: str) -> None:
  """Same from a file: .pth/.bin (needs torch), .safetensors or .npz (no torch)."""
  sd = timm_vit.read_state_dict(path)
  load_dino_backbone(disc, sd, source=path)
