"""Resampling pretrained ViT weights to another grid or patch size, in NumPy, as timm does.

A pretrained DINOv2 is a patch-14 model at 518 px (37x37 grid) while the tokenizer, the REPA
teacher and the discriminator build patch-16 models at other sizes. When timm loads such a
checkpoint into a differently built model it resamples the position-embedding grid (bicubic,
antialiased, prefix tokens kept) and PI-resizes the patch kernel (FlexiViT); these functions do
the same without torch, so the loaded weights equal timm's (tests/test_vit.py, tests/test_repa.py).
Weight conversion only: nothing here runs in a model's forward pass.
"""
from __future__ import annotations

import numpy as np


def resize_weight_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch's `F.interpolate(mode="bicubic", antialias=True)` in 1-D.

  This is the PIL-style separable filter that torch's anti-aliased bicubic uses (Keys cubic with
  a = -0.5, support widened by the downscale factor, weights renormalised at the borders, pixel
  centres at half-integers). It is what timm applies when it resamples pos_embed / patch kernels,
  so applying it in NumPy reproduces timm's loaded weights without torch.
  """
  def cubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
      return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
      return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0

  scale = n_in / n_out
  support_scale = max(scale, 1.0)
  support = 2.0 * support_scale
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    taps = np.array([cubic((j - center + 0.5) / support_scale) for j in range(lo, hi)])
    total = taps.sum()
    if total != 0.0:
      taps = taps / total
    w[i, lo:hi] = taps
  return w


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int],
                       num_prefix_tokens: int = 1,
                       old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """[1, prefix + gh*gw, D] -> [1, prefix + new_h*new_w, D]; bicubic with antialias, prefix kept.

  Matches timm's `resample_abs_pos_embed` (used e.g. when DINOv2's 37x37 grid becomes 16x16).
  """
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  if old_grid is None:
    side = int(round(np.sqrt(grid.shape[1])))
    if side * side != grid.shape[1]:
      raise ValueError(f"pos_embed has {grid.shape[1]} grid tokens, not a square; pass old_grid")
    old_grid = (side, side)
  if tuple(old_grid) == tuple(new_grid):
    return pos_embed
  d = grid.shape[-1]
  g = grid.reshape(old_grid[0], old_grid[1], d).astype(np.float32)
  wh = resize_weight_matrix(old_grid[0], new_grid[0]).astype(np.float32)
  ww = resize_weight_matrix(old_grid[1], new_grid[1]).astype(np.float32)
  out = np.einsum("ih,jw,hwd->ijd", wh, ww, g).reshape(1, -1, d)
  return np.concatenate([prefix, out.astype(pos_embed.dtype)], axis=1)


def resample_patch_kernel(kernel: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
  """Resize a patch-embedding kernel [kh, kw, C, D] to new_size with FlexiViT's PI-resize.

  Same as timm's `resample_patch_embed`: the kernel is multiplied by the pseudo-inverse of the
  bicubic (antialiased) resize matrix, so <resize(x), new_kernel> ~= <x, old_kernel>; this is how
  a patch-14 DINOv2 becomes the patch-16 ViT of the official tokenizer.
  """
  kh, kw = kernel.shape[:2]
  if (kh, kw) == tuple(new_size):
    return kernel
  m = np.kron(resize_weight_matrix(kh, new_size[0]), resize_weight_matrix(kw, new_size[1]))
  pinv = np.linalg.pinv(m.astype(np.float32))  # [kh*kw, nh*nw]
  flat = kernel.reshape(kh * kw, -1).astype(np.float32)  # [(kh kw), C*D]
  out = pinv.T @ flat
  return out.reshape(new_size[0], new_size[1], *kernel.shape[2:]).astype(kernel.dtype)
