"""The official SiT / DiT generators (spec.md §8.1, 8.4) in PyTorch, for parity tests and benchmarks.

Written from the spec and from reading the official module structure (Hhhhhhao/continuous_tokenizer
`modelling/sit.py` / `modelling/dit.py`, themselves from willisma/SiT and facebookresearch/DiT):
the same module tree, so `state_dict()` has exactly the released keys, and the same constructor
arguments, so `PyTorchModelHubMixin.save_pretrained` writes the released `config.json` field set
(what softvq_jax.convert.generator_official reads) and `from_pretrained` builds a model from ours.
Behaviour kept from the official code because an exported file must survive it:
  - `SiT(**block_kwargs)` requires `qk_norm` among the keyword arguments (the official block reads
    `block_kwargs["qk_norm"]`; the published training scripts always pass it), and
    `from_pretrained` feeds every config.json field into those keyword arguments;
  - the label table has a null row only when class_dropout_prob > 0;
  - the 1-D form (vae_1d) ignores patch_size (forced to 1).
Differences: `SiT.forward` returns the output tensor only (the official one returns (x, zs) with
zs always empty); qk_norm=True is implemented (q/k LayerNorms) only so that the refusal of such
files by our importer can be tested.

Attention: the official fp32 path is the explicit softmax(q k^T * scale) v (`fused_attn` off,
flash-attn only for 16-bit inputs); `fused_attn=True` (an official block option) uses PyTorch's
fused scaled_dot_product_attention, which the benchmark uses to time the fastest official path.

Tests and benchmarks only: softvq_jax itself never imports torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

try:
  from huggingface_hub import PyTorchModelHubMixin
except ImportError:  # save_pretrained / from_pretrained are then unavailable
  class PyTorchModelHubMixin:  # pylint: disable=too-few-public-methods
    pass

TAGS = ["arxiv:2412.10958", "image-generation", "32 tokens"]
REPO_URL = "https://github.com/Hhhhhhao/continuous_tokenizer"


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
  """Sinusoid features [cos | sin] of t as given (not x1000), then Linear-SiLU-Linear."""

  def __init__(self, hidden_size, frequency_embedding_size=256):
    super().__init__()
    self.frequency_embedding_size = frequency_embedding_size
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))

  @staticmethod
  def features(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
      emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb

  def forward(self, t):
    feats = self.features(t, self.frequency_embedding_size)
    if t.is_floating_point():  # SiT casts the features to t's dtype; DiT's integer t keeps fp32
      feats = feats.to(t.dtype)
    return self.mlp(feats)


class LabelEmbedder(nn.Module):
  """Table [num_classes (+1 null row if dropout > 0), D]; label dropout in training."""

  def __init__(self, num_classes, hidden_size, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob

  def forward(self, labels, train, force_drop_ids=None):
    if (train and self.dropout_prob > 0) or force_drop_ids is not None:
      if force_drop_ids is None:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
      else:
        drop = force_drop_ids == 1
      labels = torch.where(drop, self.num_classes, labels)
    return self.embedding_table(labels)


class Attention(nn.Module):
  """Fused qkv (bias), split [3][heads][head_dim], softmax attention, proj."""

  def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False, fused_attn=False):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.fused_attn = fused_attn
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
    self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
      out = F.scaled_dot_product_attention(q, k, v)
    else:
      out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  """timm Mlp with tanh-approximate GELU: fc1 -> GELU -> fc2."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
  """timm PatchEmbed: conv kernel = stride = p (`proj`), flattened to [B, T, D] row-major."""

  def __init__(self, img_size, patch_size, in_chans, embed_dim):
    super().__init__()
    self.patch_size = (patch_size, patch_size)
    self.num_patches = (img_size // patch_size) ** 2
    self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=True)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
  """adaLN-Zero block (the official SiTBlock / DiTBlock)."""

  def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=False):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm,
                          fused_attn=fused_attn)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

  def forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.adaLN_modulation(c).chunk(6, dim=-1))
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
  def __init__(self, hidden_size, patch_size, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


def pos_embed_1d(dim, length):
  """Interleaved sinusoid [length, dim] (float32 as the official `positionalencoding1d`)."""
  pe = torch.zeros(length, dim)
  position = torch.arange(0, length).unsqueeze(1).float()
  div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * -(math.log(10000.0) / dim))
  pe[:, 0::2] = torch.sin(position * div)
  pe[:, 1::2] = torch.cos(position * div)
  return pe.numpy()


def _sincos_from_positions(dim, pos):
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(dim, grid_size):
  """MAE/DiT 2-D sin-cos [grid^2, dim]: first half from the column plane of meshgrid(w, h)."""
  grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                              np.arange(grid_size, dtype=np.float32)), axis=0)
  return np.concatenate([_sincos_from_positions(dim // 2, grid[0]),
                         _sincos_from_positions(dim // 2, grid[1])], axis=1)


class _Generator(nn.Module):
  """What SiT and DiT share: embedders, blocks, final layer, init, unpatchify."""

  def _build(self, input_size, patch_size, in_channels, hidden_size, final_hidden_size, depth,
             num_heads, mlp_ratio, class_dropout_prob, num_classes, vae_1d, qk_norm=False,
             fused_attn=False):
    self.in_channels = in_channels
    self.vae_1d = vae_1d
    if vae_1d:
      self.x_embedder = nn.Linear(in_channels, hidden_size)
      num_patches = input_size
      self.patch_size = 1
    else:
      self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
      num_patches = self.x_embedder.num_patches
      self.patch_size = patch_size
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
    self.blocks = nn.ModuleList([
        Block(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
        for _ in range(depth)])
    self.final_layer = FinalLayer(final_hidden_size, self.patch_size, self.out_channels)
    self._init_weights()

  def _init_weights(self):
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
    d = self.pos_embed.shape[-1]
    if self.vae_1d:
      pe = pos_embed_1d(d, self.pos_embed.shape[1])
    else:
      pe = pos_embed_2d(d, int(round(self.x_embedder.num_patches ** 0.5)))
    self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
    if not self.vae_1d:
      w = self.x_embedder.proj.weight.data
      nn.init.xavier_uniform_(w.view(w.shape[0], -1))
      nn.init.zeros_(self.x_embedder.proj.bias)
    nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
    for block in self.blocks:
      nn.init.zeros_(block.adaLN_modulation[-1].weight)
      nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for p in (self.final_layer.adaLN_modulation[-1].weight,
              self.final_layer.adaLN_modulation[-1].bias, self.final_layer.linear.weight,
              self.final_layer.linear.bias):
      nn.init.zeros_(p)

  def unpatchify(self, x):  # [B, T, p*p*C] -> [B, C, H, W]
    c, p = self.out_channels, self.patch_size
    h = w = int(round(x.shape[1] ** 0.5))
    x = x.reshape(x.shape[0], h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x, t, y):
    """x: [B, N, e] (vae_1d) or [B, C, H, W]; t [B]; y [B] -> same layout, out_channels."""
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y, self.training)
    for block in self.blocks:
      x = block(x, c)
    x = self.final_layer(x, c)
    return x if self.vae_1d else self.unpatchify(x)


class SiT(_Generator, PyTorchModelHubMixin):
  """Official SiT constructor (flow matching; output channels = in_channels)."""

  def __init__(self, path_type="edm", input_size=32, patch_size=2, in_channels=4,
               hidden_size=1152, decoder_hidden_size=768, depth=28, num_heads=16, mlp_ratio=4.0,
               class_dropout_prob=0.1, num_classes=1000, use_cfg=False, vae_1d=False,
               tags=TAGS + ["SiT"], repo_url=REPO_URL, license="apache-2.0",
               **block_kwargs):
    # pylint: disable=redefined-builtin,dangerous-default-value,unused-argument
    super().__init__()
    self.path_type = path_type
    self.out_channels = in_channels
    self.num_classes = num_classes
    self.use_cfg = use_cfg
    self._build(input_size, patch_size, in_channels, hidden_size, decoder_hidden_size, depth,
                num_heads, mlp_ratio, class_dropout_prob, num_classes, vae_1d,
                qk_norm=block_kwargs["qk_norm"],  # required, as in the official SiTBlock
                fused_attn=block_kwargs.get("fused_attn", False))


class DiT(_Generator, PyTorchModelHubMixin):
  """Official DiT constructor (Gaussian diffusion; learn_sigma doubles the output channels)."""

  def __init__(self, input_size=32, in_channels=128, hidden_size=1152, depth=28, num_heads=16,
               mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
               patch_size=2, vae_1d=False, tags=TAGS + ["DiT"], repo_url=REPO_URL,
               license="apache-2.0"):
    # pylint: disable=redefined-builtin,dangerous-default-value,unused-argument
    # The official DiT always takes the explicit attention path in fp32; `use_fused_attention`
    # switches this copy to PyTorch's fused kernel (benchmarks).
    super().__init__()
    self.learn_sigma = learn_sigma
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self._build(input_size, patch_size, in_channels, hidden_size, hidden_size, depth, num_heads,
                mlp_ratio, class_dropout_prob, num_classes, vae_1d)

  def forward_with_cfg(self, x, t, y, cfg_scale):
    """Official CFG on the epsilon channels: the first half of the batch is conditional, the
    second the null class; both halves get the guided epsilon."""
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half], dim=0), t, y)
    axis = -1 if self.vae_1d else 1
    eps, rest = out.split([self.in_channels, out.shape[axis] - self.in_channels], dim=axis)
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=axis)


def use_fused_attention(model: nn.Module, fused: bool = True) -> nn.Module:
  """Switches every block to PyTorch's fused scaled_dot_product_attention (or back)."""
  for block in model.blocks:
    block.attn.fused_attn = fused
  return model


def perturb_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
  """Adds N(0, std) to every trainable parameter (not pos_embed), in place: the zero-initialised
  adaLN and final layers would otherwise hide any error in what they gate."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.add_(torch.randn(p.shape, generator=gen) * std)
  return model
