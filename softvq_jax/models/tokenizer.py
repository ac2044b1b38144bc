"""The SoftVQ-VAE tokenizer: image -> N continuous 1-D tokens -> image (spec.md §1.2-1.4).

    images [B, S, S, 3] --encoder ViT (+ N learnable latent tokens)--> [B, N, De]
      --quant_conv--> z [B, N, e] --SoftVQ--> z_q [B, N, e]          (the tokens)
      --post_quant_conv--> [B, N, Dd] --decoder ViT (P mask tokens + N latents)--> [B, P, Dd]
      --to_pixel--> [B, P, p*p*3] --unpatchify--> reconstruction [B, S, S, 3]

Module and parameter names follow the official PyTorch state dict (`encoder.model.blocks.3...`,
`quantize.embedding`, `decoder.to_pixel...`) so the importer in `softvq_jax/convert/` is a rename
plus transpose. The official decoder also owns a `patch_embed` that its forward pass never uses;
ours does not have it (the importer accepts and drops those keys, the exporter writes zeros).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models import quantizer as quantizer_lib
from softvq_jax.models.vit import (VIT_SIZES, Dense, VisionTransformer, make_param, normal_02,
                                   shape_only_rngs, trunc_normal_02, unpatchify)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Plain, hashable model description (built from `config.model` + `config.image_size`)."""
  image_size: int = 256
  patch_size: int = 16
  encoder_size: str = "B"
  decoder_size: str = "B"
  num_latent_tokens: int = 64
  codebook_size: int = 8192
  codebook_embed_dim: int = 32
  num_codebooks: int = 4
  codebook_l2_norm: bool = True
  tau: float = 0.07
  dec_cls_token: bool = True
  layer_scale_init: float = 1e-5
  compute_dtype: str = "float32"
  attention_backend: str = "auto"
  remat: bool = False
  platform: str = "auto"   # what the graph is built for (models/vit.py resolve_platform)
  vq_mean: float = 0.0
  vq_std: float = 1.0

  @classmethod
  def from_config(cls, config) -> "TokenizerConfig":
    """From a full run config (uses `config.model` and `config.image_size`)."""
    return cls.from_dict(dict(config.model.to_dict(), image_size=config.image_size))

  @classmethod
  def from_dict(cls, d) -> "TokenizerConfig":
    """From a mapping of field values (e.g. a checkpoint's metadata "model"); keys that are not
    fields (other config.model entries, fields of newer versions) are ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in fields})

  def replace(self, **kw) -> "TokenizerConfig":
    return dataclasses.replace(self, **kw)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)


@dataclasses.dataclass
class TokenizerOutput:
  """Everything a training step needs from one forward pass."""
  tokens: Array          # [B, N, e] float32 z_q
  reconstruction: Array  # [B, S, S, 3] float32, unclamped
  entropy_loss: Array    # [] float32, unweighted
  stats: dict            # quantizer statistics (see quantizer.usage_stats)


jax.tree_util.register_dataclass(
    TokenizerOutput, data_fields=["tokens", "reconstruction", "entropy_loss", "stats"],
    meta_fields=[])


def _vit(cfg: TokenizerConfig, size: str, *, class_token: bool, with_patch_embed: bool,
         rngs: nnx.Rngs) -> VisionTransformer:
  width, depth, heads = VIT_SIZES[size]
  return VisionTransformer(
      img_size=cfg.image_size, patch_size=cfg.patch_size, width=width, depth=depth,
      num_heads=heads, class_token=class_token, layer_scale_init=cfg.layer_scale_init,
      with_patch_embed=with_patch_embed, attention_backend=cfg.attention_backend,
      remat=cfg.remat, platform=cfg.platform, rngs=rngs)


class Encoder(nnx.Module):
  """ViT over [cls, image patches, latent tokens]; returns the latent tokens after the norm."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.model = _vit(cfg, cfg.encoder_size, class_token=True, with_patch_embed=True, rngs=rngs)
    n, d = cfg.num_latent_tokens, self.model.width
    self.latent_tokens = make_param(rngs, normal_02, (1, n, d), (None, None, "embed"))
    self.latent_pos_embed = make_param(rngs, trunc_normal_02, (1, n, d), (None, None, "embed"))

  def __call__(self, images: Array, dtype) -> Array:  # [B, S, S, 3] -> [B, N, De]
    x = self.model.embed(images, dtype)
    latents = (self.latent_tokens[...] + self.latent_pos_embed[...]).astype(dtype)
    n = latents.shape[1]
    x = jnp.concatenate([x, jnp.broadcast_to(latents, (x.shape[0],) + latents.shape[1:])], axis=1)
    return self.model.forward_tokens(x)[:, -n:]


class Decoder(nnx.Module):
  """ViT over [cls, P mask tokens, N latents]; pixel head on the image positions."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = _vit(cfg, cfg.decoder_size, class_token=cfg.dec_cls_token,
                      with_patch_embed=False, rngs=rngs)
    n, d = cfg.num_latent_tokens, self.model.width
    self.mask_token = make_param(rngs, normal_02, (1, 1, d), (None, None, "embed"))
    self.latent_pos_embed = make_param(rngs, trunc_normal_02, (1, n, d), (None, None, "embed"))
    self.to_pixel = Dense(d, 3 * cfg.patch_size ** 2, axes=("embed", None), rngs=rngs)

  def __call__(self, z: Array) -> Array:  # [B, N, Dd] (compute dtype) -> [B, S, S, 3] float32
    b, dtype, g = z.shape[0], z.dtype, self.cfg.grid
    mask = jnp.broadcast_to(self.mask_token[...].astype(dtype), (b, g * g, z.shape[-1]))
    x = self.model.add_pos_embed(mask)
    x = jnp.concatenate([x, z + self.latent_pos_embed[...].astype(dtype)], axis=1)
    x = self.model.forward_tokens(x)
    p0 = self.model.num_prefix_tokens
    pixels = self.to_pixel(x[:, p0:p0 + g * g])
    return unpatchify(pixels, self.cfg.patch_size, (g, g)).astype(jnp.float32)


class SoftVQTokenizer(nnx.Module):
  """SoftVQ-VAE. `__call__` for training; `encode` / `decode` for inference and generators."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    de = self.encoder.model.width
    dd = VIT_SIZES[cfg.decoder_size][0]
    e = cfg.codebook_embed_dim
    self.quant_conv = Dense(de, e, axes=("embed", None), rngs=rngs)
    self.quantize = quantizer_lib.SoftVectorQuantizer(
        cfg.codebook_size, e, cfg.num_codebooks, tau=cfg.tau, l2_norm=cfg.codebook_l2_norm,
        rngs=rngs)
    self.post_quant_conv = Dense(e, dd, axes=(None, "embed"), rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def _check_images(self, images: Array):
    s = self.cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise ValueError(f"expected NHWC images [B, {s}, {s}, 3] in [-1, 1], got shape "
                       f"{tuple(images.shape)}; resize/crop to {s}x{s} (and transpose NCHW->NHWC)")

  def pre_quant(self, images: Array) -> Array:
    """[B, S, S, 3] -> z [B, N, e] in the compute dtype: the encoder's tokens before the codebook."""
    self._check_images(images)
    return self.quant_conv(self.encoder(images, self.cfg.dtype))

  def quantize_tokens(self, images: Array, *, with_stats: bool = True):
    """[B, S, S, 3] -> QuantizerOutput with z_q [B, N, e] float32."""
    return self.quantize(self.pre_quant(images), with_stats=with_stats)

  def encode(self, images: Array) -> Array:
    """[B, S, S, 3] in [-1, 1] -> tokens z_q [B, N, e] float32."""
    return self.quantize_tokens(images, with_stats=False).z_q

  def decode(self, tokens: Array) -> Array:
    """tokens [B, N, e] -> reconstruction [B, S, S, 3] float32 (not clamped)."""
    n, e = self.cfg.num_latent_tokens, self.cfg.codebook_embed_dim
    if tokens.ndim != 3 or tokens.shape[1:] != (n, e):
      raise ValueError(f"expected tokens [B, {n}, {e}], got shape {tuple(tokens.shape)}")
    return self.decoder(self.post_quant_conv(tokens.astype(self.cfg.dtype)))

  def __call__(self, images: Array) -> TokenizerOutput:
    q = self.quantize_tokens(images)
    return TokenizerOutput(tokens=q.z_q, reconstruction=self.decode(q.z_q),
                           entropy_loss=q.entropy_loss, stats=q.stats)


def build_tokenizer(cfg: TokenizerConfig, seed: int = 0) -> SoftVQTokenizer:
  return SoftVQTokenizer(cfg, rngs=nnx.Rngs(seed))


def abstract_tokenizer(cfg: TokenizerConfig) -> SoftVQTokenizer:
  """Shape-only model (no memory, no FLOPs): for parameter counts and sharding plans."""
  return nnx.eval_shape(lambda: SoftVQTokenizer(cfg, rngs=shape_only_rngs(0)))


def split_model(model: SoftVQTokenizer):
  """(graphdef, params): the tokenizer must hold nothing but parameters (no mutable state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the tokenizer has non-parameter state, which TrainState does not carry: "
                     f"{jax.tree.map(jnp.shape, rest)}")
  return graphdef, params


def count_params(module: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
