"""Image metrics with one pinned protocol: PSNR, SSIM, FID statistics, Inception Score, and the
improved precision / recall of generated images.

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

import functools

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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise log-softmax in float64 (exact where a softmax probability underflows to 0)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def _split_scores(log_p: np.ndarray, bounds) -> list[float]:
  """exp(mean_x KL(p(y|x) || p(y))) of each [start, end) slice of the rows (float64)."""
  scores = []
  for start, end in bounds:
    lp = log_p[start:end]
    p = np.exp(lp)
    log_py = np.log(p.mean(axis=0, keepdims=True))
    scores.append(float(np.exp(np.mean(np.sum(p * (lp - log_py), axis=1)))))
  return scores


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over `splits`) from Inception logits [N, 1008] in float64.

  torch-fidelity's formula without its shuffle: split i holds rows [i N // splits, (i + 1) N //
  splits), and each split scores exp(mean_x KL(p(y|x) || mean_x p(y|x))) with an exact
  log-softmax. (torch-fidelity and the ADM evaluator feed the classifier's logits WITHOUT its
  bias, `pool @ W`: see `unbiased_logits`.)
  """
  log_p = _log_softmax(logits)
  n = log_p.shape[0]
  splits = max(1, min(int(splits), n))
  scores = _split_scores(log_p, [(i * n // splits, (i + 1) * n // splits) for i in range(splits)])
  return float(np.mean(scores)), float(np.std(scores))


ADM_IS_SPLIT_SIZE = 5000


def adm_inception_score(logits: np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE
                        ) -> tuple[float, float]:
  """Inception Score as the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py)
  reports it: consecutive splits of `split_size` images (10 splits for 50k samples; the last
  one shorter if N is not a multiple), exp(mean KL) per split, the mean over splits (and their
  std, which ADM does not print). `logits` [N, 1008] should be `unbiased_logits(pool, W)` as
  ADM's softmax graph computes them. Float64, exact log-softmax (ADM's float32 softmax would
  give NaN where a probability underflows to 0; otherwise the same formula)."""
  log_p = _log_softmax(logits)
  n = log_p.shape[0]
  scores = _split_scores(log_p, [(s, min(s + split_size, n)) for s in range(0, n, split_size)])
  return float(np.mean(scores)), float(np.std(scores))


def unbiased_logits(pool: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """pool [N, 2048] @ kernel [2048, 1008] in float64: the FID Inception's classifier logits
  without its bias, what the ADM evaluator (`softmax/logits/MatMul`) and torch-fidelity
  (`logits_unbiased`) compute the Inception Score from."""
  return np.asarray(pool, np.float64) @ np.asarray(kernel, np.float64)


# ------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkaenniemi et al. 2019), as the ADM evaluator computes them.
# ------------------------------------------------------------------------------------------------

PR_NEAREST_K = 3
PR_BLOCK_ROWS = 1024


def _sq_distances(a: Array, b: Array) -> Array:
  """Squared Euclidean distances [n, m] of rows a [n, D] and b [m, D]: max(|a|^2 - 2 a.b + |b|^2,
  0) (ADM's DistanceBlock), with full-precision matmuls (no TF32/bf16 passes on GPU/TPU)."""
  aa = jnp.sum(a * a, axis=1)[:, None]
  bb = jnp.sum(b * b, axis=1)[None, :]
  ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(aa - 2.0 * ab + bb, 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_smallest(rows: Array, cols: Array, k: int) -> Array:
  """[n] the (k+1)-th smallest squared distance of each row to `cols` (index k, ascending)."""
  d = _sq_distances(rows, cols)
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _pr_block(fake_rows: Array, fake_radii_rows: Array, real: Array, real_radii: Array):
  """For a block of samples: in any real ball (precision flags [n]) and, per real image, inside
  some ball of this block (recall flags [m])."""
  d = _sq_distances(fake_rows, real)  # [n, m]
  in_real = jnp.any(d <= real_radii[None, :], axis=1)
  covers_real = jnp.any(d <= fake_radii_rows[:, None], axis=0)
  return in_real, covers_real


def _blocks(n: int, block: int):
  for start in range(0, n, block):
    yield start, min(start + block, n)


def _padded(x: np.ndarray, start: int, end: int, block: int) -> np.ndarray:
  """Rows [start, end) padded to `block` rows with copies of the last (one program shape)."""
  rows = x[start:end]
  if len(rows) < block:
    rows = np.concatenate([rows, np.repeat(rows[-1:], block - len(rows), axis=0)])
  return rows


def _centred(real, fake) -> tuple[np.ndarray, np.ndarray]:
  """Both sets minus the real features' mean, as float32: distances are translation invariant,
  and smaller norms make |a|^2 - 2 a.b + |b|^2 lose less to cancellation in float32."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision/recall need features [N, D] of the same D, got {real.shape} and "
                     f"{fake.shape}")
  centre = real.mean(axis=0, keepdims=True)
  return (real - centre).astype(np.float32), (fake - centre).astype(np.float32)


def manifold_radii(features, k: int = PR_NEAREST_K, block_rows: int = PR_BLOCK_ROWS) -> np.ndarray:
  """[N] squared distance of each feature vector to its k-th nearest neighbour in the set, the
  vector itself counted as its 0th (ADM's `ManifoldEstimator.manifold_radii`, nhood_sizes=(k,),
  no percentile clamp). Computed on the default device in row blocks of `block_rows` x N."""
  f = np.asarray(features, np.float32)
  n = f.shape[0]
  if k < 1 or n <= k:
    raise ValueError(f"manifold radii with k={k} need k >= 1 and more than k feature vectors, "
                     f"got {n}")
  cols = jnp.asarray(f)
  out = []
  for start, end in _blocks(n, block_rows):
    rows = _padded(f, start, end, min(block_rows, n))
    out.append(np.asarray(_kth_smallest(jnp.asarray(rows), cols, int(k)))[:end - start])
  return np.concatenate(out)


def precision_recall(real_features, fake_features, k: int = PR_NEAREST_K,
                     block_rows: int = PR_BLOCK_ROWS) -> tuple[float, float]:
  """Improved precision and recall (Kynkaenniemi et al. 2019) of samples vs real images, both
  Inception pool features [N, 2048], as the ADM evaluator computes them: each set's manifold is
  the union of balls around its vectors with their k-NN radius (`manifold_radii`); precision =
  fraction of samples inside the real manifold, recall = fraction of real images inside the
  samples' manifold (a point on a ball's surface counts as inside).

  Batched: one block of `block_rows` samples x all real vectors at a time on the default device
  (float32 with full-precision matmuls, features centred; ADM itself computes its distances in
  float16 when finite). Memory ~ block_rows x max(N_real, N_fake) x 4 bytes besides the features.
  """
  real, fake = _centred(real_features, fake_features)
  real_radii = jnp.asarray(manifold_radii(real, k, block_rows))
  fake_radii = manifold_radii(fake, k, block_rows)
  real_dev = jnp.asarray(real)
  n_fake = fake.shape[0]
  block = min(block_rows, n_fake)
  in_real = np.zeros((n_fake,), bool)
  covered = np.zeros((real.shape[0],), bool)
  for start, end in _blocks(n_fake, block):
    rows = jnp.asarray(_padded(fake, start, end, block))
    radii = jnp.asarray(_padded(fake_radii[:, None], start, end, block)[:, 0])
    p, r = _pr_block(rows, radii, real_dev, real_radii)
    in_real[start:end] = np.asarray(p)[:end - start]
    covered |= np.asarray(r)  # padded rows repeat a real row of this block: no new coverage
  return float(in_real.mean()), float(covered.mean())
