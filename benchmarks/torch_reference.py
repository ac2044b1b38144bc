"""The official SoftVQ-VAE architecture in PyTorch eager (timm ViTs), for speed comparisons.

This is what the official code (Hhhhhhao/continuous_tokenizer) runs: timm `VisionTransformer`s
built from the DINOv2 model names at patch 16 / img_size S (spec.md §1.1), the encoder and
decoder forward passes of spec.md §1.2 / 1.4 written against timm's own `patch_embed`, `_pos_embed`,
`blocks` and `norm` (so timm's attention, fused SDPA included, is what gets timed), and the soft
quantizer of spec.md §1.3. Module and parameter names are the official state-dict keys, so
`softvq_jax.convert.state_dict.load_state_dict` loads this model's weights into ours, and the
benchmarks can check that both compute the same thing before timing them.

Benchmarks only: softvq_jax itself never imports torch.
"""
from __future__ import annotations

import numpy as np
import timm
import torch
from torch import nn
from torch.nn import functional as F

from softvq_jax import config_lib
from softvq_jax.models.tokenizer import TokenizerConfig

# The timm names the official code builds (spec.md §1.1); other sizes ("mini", our CPU demo size) are
# built with timm's VisionTransformer class and the same DINOv2 options.
TIMM_NAMES = {"S": "vit_small_patch14_dinov2.lvd142m", "B": "vit_base_patch14_dinov2.lvd142m",
              "L": "vit_large_patch14_dinov2.lvd142m"}


def timm_vit(size: str, img_size: int, patch_size: int, layer_scale_init: float = 1e-5):
  """A randomly initialised timm ViT as the official tokenizer builds it (no download)."""
  if size in TIMM_NAMES and layer_scale_init == 1e-5:
    return timm.create_model(TIMM_NAMES[size], pretrained=False, img_size=img_size,
                             patch_size=patch_size, num_classes=0)
  width, depth, heads = config_lib.VIT_SIZES[size]
  return timm.models.vision_transformer.VisionTransformer(
      img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
      mlp_ratio=4.0, init_values=layer_scale_init, num_classes=0)


class Encoder(nn.Module):
  """Official `TimmViTEncoder` forward: [cls, patches] + pos_embed, then N latents appended."""

  def __init__(self, cfg: TokenizerConfig):
    super().__init__()
    self.model = timm_vit(cfg.encoder_size, cfg.image_size, cfg.patch_size, cfg.layer_scale_init)
    n, d = cfg.num_latent_tokens, self.model.embed_dim
    self.num_latent_tokens = n
    self.latent_tokens = nn.Parameter(torch.randn(1, n, d) * 0.02)
    self.latent_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, n, d), std=0.02))

  def forward(self, x):  # [B, 3, S, S] -> [B, N, De]
    x = self.model._pos_embed(self.model.patch_embed(x))  # pylint: disable=protected-access
    z = self.latent_tokens.expand(x.shape[0], -1, -1)
    x = torch.cat([x, z + self.latent_pos_embed], dim=1)
    x = self.model.blocks(self.model.norm_pre(x))
    return self.model.norm(x)[:, -self.num_latent_tokens:]


class ToPixel(nn.Module):
  """Official linear `ToPixel`: Linear Dd -> 3 p p, then the MAE-style unpatchify (NCHW)."""

  def __init__(self, dim: int, patch_size: int):
    super().__init__()
    self.patch_size = patch_size
    self.model = nn.Linear(dim, 3 * patch_size ** 2)

  def forward(self, x):  # [B, P, Dd] -> [B, 3, S, S]
    p = self.patch_size
    g = int(round(x.shape[1] ** 0.5))
    x = self.model(x).reshape(x.shape[0], g, g, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], 3, g * p, g * p)


class Decoder(nn.Module):
  """Official `TimmViTDecoder` forward: [cls, P mask tokens] + pos_embed, then N latents."""

  def __init__(self, cfg: TokenizerConfig):
    super().__init__()
    if not cfg.dec_cls_token:
      raise ValueError("the torch reference implements dec_cls_token=True (the released models)")
    self.model = timm_vit(cfg.decoder_size, cfg.image_size, cfg.patch_size, cfg.layer_scale_init)
    n, d = cfg.num_latent_tokens, self.model.embed_dim
    self.num_img_tokens = cfg.grid ** 2
    self.mask_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
    self.latent_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, n, d), std=0.02))
    self.to_pixel = ToPixel(d, cfg.patch_size)

  def forward(self, z):  # [B, N, Dd] -> [B, 3, S, S]
    x = self.model._pos_embed(  # pylint: disable=protected-access
        self.mask_token.expand(z.shape[0], self.num_img_tokens, -1))
    x = torch.cat([x, z + self.latent_pos_embed], dim=1)
    x = self.model.norm(self.model.blocks(self.model.norm_pre(x)))
    return self.to_pixel(x[:, 1:1 + self.num_img_tokens])


class SoftVectorQuantizer(nn.Module):
  """Spec 1.3: tokens in contiguous per-codebook segments, cosine logits / tau, soft weighted sum."""

  def __init__(self, cfg: TokenizerConfig):
    super().__init__()
    c, k, e = cfg.num_codebooks, cfg.codebook_size, cfg.codebook_embed_dim
    self.num_codebooks, self.tau, self.l2_norm = c, cfg.tau, cfg.codebook_l2_norm
    emb = torch.empty(c, k, e).uniform_(-1.0 / k, 1.0 / k)
    self.embedding = nn.Parameter(F.normalize(emb, dim=-1) if self.l2_norm else emb)

  def forward(self, z, with_loss: bool = False):
    """z [B, N, e] -> z_q [B, N, e] (and the unweighted entropy loss when with_loss)."""
    b, n, e = z.shape
    c = self.num_codebooks
    zc = z.reshape(b, c, n // c, e).transpose(0, 1).reshape(c, -1, e)  # [C, B*L, e]
    emb = self.embedding
    if self.l2_norm:
      zc, emb = F.normalize(zc, dim=-1), F.normalize(emb, dim=-1)
    logits = torch.einsum("cre,cke->crk", zc, emb.detach())  # [C, B*L, K]
    probs = torch.softmax(logits / self.tau, dim=-1)
    zq = torch.einsum("crk,cke->cre", probs, emb)
    zq = zq.reshape(c, b, n // c, e).transpose(0, 1).reshape(b, n, e)
    if not with_loss:
      return zq
    a = logits.reshape(-1, logits.shape[-1]).float() / 0.01  # spec.md §1.3 step 7
    p, logp = torch.softmax(a, -1), torch.log_softmax(a + 1e-5, -1)
    avg_p = p.mean(0)
    loss = -(p * logp).sum(-1).mean() + (avg_p * torch.log(avg_p + 1e-6)).sum()
    return zq, loss


class SoftVQ(nn.Module):
  """The tokenizer: `encode` NCHW images -> tokens, `decode` tokens -> NCHW images (unclamped)."""

  def __init__(self, cfg: TokenizerConfig):
    super().__init__()
    de = config_lib.VIT_SIZES[cfg.encoder_size][0]
    dd = config_lib.VIT_SIZES[cfg.decoder_size][0]
    e = cfg.codebook_embed_dim
    self.encoder = Encoder(cfg)
    self.quant_conv = nn.Linear(de, e)
    self.quantize = SoftVectorQuantizer(cfg)
    self.post_quant_conv = nn.Linear(e, dd)
    self.decoder = Decoder(cfg)

  def encode(self, x):  # [B, 3, S, S] -> [B, N, e]
    return self.quantize(self.quant_conv(self.encoder(x)))

  def decode(self, z):  # [B, N, e] -> [B, 3, S, S]
    return self.decoder(self.post_quant_conv(z))

  def forward(self, x):
    """Training forward: (reconstruction [B, 3, S, S], tokens [B, N, e], entropy loss [])."""
    zq, loss = self.quantize(self.quant_conv(self.encoder(x)), with_loss=True)
    return self.decode(zq), zq, loss


def build_torch_tokenizer(cfg: TokenizerConfig, *, seed: int = 0,
                          layer_scale: tuple[float, float] | None = None) -> SoftVQ:
  """Random SoftVQ in eval mode. layer_scale=(lo, hi) draws every LayerScale gamma from U(lo, hi):
  DINOv2's 1e-5 init makes each block nearly the identity, which would hide attention/MLP
  mismatches from a parity check (it changes no FLOPs)."""
  torch.manual_seed(seed)
  model = SoftVQ(cfg)
  if layer_scale is not None:
    with torch.no_grad():
      for vit in (model.encoder.model, model.decoder.model):
        for blk in vit.blocks:
          blk.ls1.gamma.uniform_(*layer_scale)
          blk.ls2.gamma.uniform_(*layer_scale)
  return model.eval()


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
  """The official-format state dict as float32 NumPy arrays (what `model.safetensors` holds)."""
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
