"""Reconstruction metrics with one pinned protocol: PSNR, SSIM, FID statistics, Inception Score.

Why a module of its own: peers' numbers disagree because their protocols differ (SSIM window and
data range, float vs uint8 reconstructions, FID statistics precision). Everything here is pinned
and tested against the reference implementations:

* PSNR and SSIM are computed on uint8 images ([0, 255], data_range = 255) exactly as
  `skimage.metrics.peak_signal_noise_ratio` / `structural_similarity(..., channel_axis=-1,
  data_range=255)` compute them (SSIM: 7x7 uniform window, K1 0.01, K2 0.03, sample covariance,
  the (win-1)/2 border excluded, mean over channels). The official SoftVQ script passes float
  images in [0, 1] with data_range 255, which shrinks C1/C2 by 255^2 — we do not.
  Both run on the device, per image, jit-able and batch-sharded ([B, H, W, 3] uint8 -> [B]).
* FID statistics are accumulated on the host in float64 (`FeatureStats`); the Frechet distance is
  pytorch-fid's, with the trace of the matrix square root from symmetric eigendecompositions
  (`frechet_distance`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softvq_jax import paths

Array = jax.Array

SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def psnr(x_u8: Array, y_u8: Array) -> Array:
  """Per-image PSNR in dB of uint8 images [B, H, W, C] -> [B] float32 (inf where identical)."""
  d = x_u8.astype(jnp.float32) - y_u8.astype(jnp.float32)
  mse = jnp.mean(jnp.square(d), axis=(1, 2, 3))
  return jnp.where(mse > 0, 10.0 * jnp.log10(DATA_RANGE**2 / jnp.maximum(mse, 1e-30)), jnp.inf)


def _box_mean(x: Array, win: int) -> Array:
  """Mean over every valid win x win window: [B, H, W, C] -> [B, H-win+1, W-win+1, C].

  Equals scipy's `uniform_filter(size=win)` on the interior, which is all SSIM keeps after
  cropping the border. Separable cumulative sums keep it O(HW) and exact in float32 for uint8 data.
  """
  c = jnp.cumsum(x, axis=1)
  c = jnp.concatenate([c[:, win - 1:win], c[:, win:] - c[:, :-win]], axis=1)
  c = jnp.cumsum(c, axis=2)
  c = jnp.concatenate([c[:, :, win - 1:win], c[:, :, win:] - c[:, :, :-win]], axis=2)
  return c / float(win * win)


def ssim(x_u8: Array, y_u8: Array) -> Array:
  """Per-image SSIM of uint8 images [B, H, W, C] -> [B] float32 (scikit-image's definition).

  Values are shifted by 128 before the window moments: SSIM is shift-invariant in exact
  arithmetic, and the smaller magnitudes keep E[x^2] - E[x]^2 accurate in float32.
  """
  win = SSIM_WINDOW
  if min(x_u8.shape[1], x_u8.shape[2]) < win:
    raise ValueError(f"SSIM needs images of at least {win}x{win}, got {x_u8.shape[1:3]}")
  x = x_u8.astype(jnp.float32) - 128.0
  y = y_u8.astype(jnp.float32) - 128.0
  n = win * win
  cov_norm = n / (n - 1.0)  # sample covariance, as skimage's default use_sample_covariance=True
  ux, uy = _box_mean(x, win), _box_mean(y, win)
  vx = cov_norm * (_box_mean(x * x, win) - ux * ux)
  vy = cov_norm * (_box_mean(y * y, win) - uy * uy)
  vxy = cov_norm * (_box_mean(x * y, win) - ux * uy)
  c1 = (SSIM_K1 * DATA_RANGE)**2
  c2 = (SSIM_K2 * DATA_RANGE)**2
  # The shift leaves the variances alone but moves the means: use the unshifted means for l(x, y).
  mx, my = ux + 128.0, uy + 128.0
  s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


class FeatureStats:
  """Streaming mean and covariance of feature vectors in float64 (host memory).

  `update(features [B, D], mask [B] | None)` adds rows; `mean_cov()` returns (mu [D], sigma [D, D])
  with the unbiased covariance (numpy.cov's, as pytorch-fid uses). Sums are float64, so the order
  and size of batches does not change the statistics beyond float64 rounding.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.n = 0
    self._sum = np.zeros((dim,), np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features, mask=None) -> None:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"expected features [B, {self.dim}], got {f.shape}")
    if mask is not None:
      f = f[np.asarray(mask, bool)]
    self.n += f.shape[0]
    self._sum += f.sum(axis=0)
    self._outer += f.T @ f

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
    mu = self._sum / self.n
    sigma = (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, sigma

  def save(self, path: str) -> None:
    mu, sigma = self.mean_cov()
    save_stats(path, mu, sigma, self.n)


def save_stats(path, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
  """Writes pytorch-fid/ADM-compatible statistics (`mu`, `sigma`) plus the image count to a local
  path or a URL (gs://...), atomically."""
  paths.save_npz(path, mu=mu, sigma=sigma, num_images=np.int64(n))


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an .npz (local path or URL) with `mu` and `sigma` (ours, pytorch-fid's, or
  ADM's reference batches such as VIRTUAL_imagenet256_labeled.npz)."""
  try:
    f = paths.load_npz(path, keys=("mu", "sigma"))
  except KeyError as e:
    raise ValueError(f"FID statistics need arrays 'mu' and 'sigma': {e.args[0]} (for an ADM "
                     "reference batch pass the .npz that contains them)") from None
  return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a (numerically) PSD matrix via eigh; tiny negative eigenvalues
  from rounding are clipped to 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)), in float64.

  Tr(sqrt(S1 S2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
  PSD matrix S1^1/2 S2 S1^1/2, which has the same eigenvalues as S1 S2. This is the quantity
  pytorch-fid gets from scipy's `sqrtm(S1 @ S2)` (tested equal to 1e-6), without sqrtm's
  non-symmetric Schur iteration: two `eigh` of 2048 x 2048 instead of a ~9 s `sqrtm` per
  evaluation on a CPU (measured in benchmarks/eval.py), no imaginary parts, and no eps fallback for
  singular covariances (fewer images than feature dimensions is fine).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
  diff = mu1 - mu2
  r = _psd_sqrt((s1 + s1.T) / 2)
  m = r @ ((s2 + s2.T) / 2) @ r
  ev = np.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over `splits`) from FID-Inception logits [N, 1008] (the
  torch-fidelity / original protocol: softmax, KL(p(y|x) || p(y)) per split)."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    py = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
