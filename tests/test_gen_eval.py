"""Generation evaluation (softvq_jax/gen_eval.py, metrics.py): gFID, Inception Score and
precision / recall against the reference implementations on the same features, the ADM reference
batch format, and `--mode=eval` of a generator end to end with resume.

The references are float64 NumPy transcriptions written here from reading the ADM evaluator
(openai/guided-diffusion evaluations/evaluator.py: `ManifoldEstimator`, `DistanceBlock`,
`compute_inception_score`) and torch-fidelity's `isc_features_to_metric`; the Frechet distance is
pytorch-fid's own `calculate_frechet_distance` (test extra).
"""
import json
import os

import numpy as np
import pytest

from conftest import require, tiny_config
from softvq_jax import metrics

# ------------------------------------------------------------------------------------------------
# Reference transcriptions (float64).
# ------------------------------------------------------------------------------------------------


def _ref_sq_dist(u, v):
  """ADM DistanceBlock: squared distances from squared norms and one product, floored at 0."""
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  nu = (u * u).sum(1).reshape(-1, 1)
  nv = (v * v).sum(1).reshape(1, -1)
  return np.maximum(nu - 2 * u @ v.T + nv, 0.0)


def _ref_radii(feats, k=3):
  """ADM manifold_radii, nhood_sizes=(k,): partition each row's distances (self included) and
  take the entry of rank k."""
  d = _ref_sq_dist(feats, feats)
  return np.partition(d, np.arange(k + 1), axis=1)[:, k]


def _ref_precision_recall(ref, sample, k=3):
  """ADM compute_prec_recall -> evaluate_pr: a reference vector counts for recall if it lies in
  some sample's ball; a sample counts for precision if it lies in some reference ball."""
  r_ref, r_sample = _ref_radii(ref, k), _ref_radii(sample, k)
  d = _ref_sq_dist(ref, sample)                      # [N_ref, N_sample]
  ref_in = (d <= r_sample[None, :]).any(axis=1)      # recall status of each reference vector
  sample_in = (d <= r_ref[:, None]).any(axis=0)      # precision status of each sample
  return sample_in.astype(np.float64).mean(), ref_in.astype(np.float64).mean()


def _softmax64(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def _ref_adm_is(logits, split_size=5000):
  """ADM compute_inception_score: consecutive splits, exp(mean_x sum_y p (log p - log mean p))."""
  preds = _softmax64(logits)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return float(np.mean(scores))


def _ref_torch_fidelity_is(logits, splits=10):
  """torch-fidelity isc_features_to_metric with shuffle=False: splits [iN/s, (i+1)N/s)."""
  n = len(logits)
  p = _softmax64(logits)
  z = np.asarray(logits, np.float64)
  log_p = z - z.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
  scores = []
  for i in range(splits):
    pc, lpc = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
    q = pc.mean(0, keepdims=True)
    scores.append(np.exp((pc * (lpc - np.log(q))).sum(1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _features(seed=0, n_real=300, n_fake=260, dim=64):
  """Two overlapping clouds (precision and recall strictly between 0 and 1), Inception-like
  non-negative magnitudes."""
  rng = np.random.default_rng(seed)
  real = np.abs(rng.normal(0.5, 0.3, (n_real, dim)))
  fake = np.abs(rng.normal(0.53, 0.3, (n_fake, dim)))
  return real.astype(np.float32), fake.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Metrics vs the references.
# ------------------------------------------------------------------------------------------------


def test_fid_equals_pytorch_fid_on_the_same_features():
  fid_score = require("pytorch_fid.fid_score")
  real, fake = _features()
  stats = {}
  for name, f in (("real", real), ("fake", fake)):
    st = metrics.FeatureStats(f.shape[1])
    for part in np.array_split(f, 3):  # streamed in chunks as gen_eval does
      st.update(part)
    stats[name] = st.mean_cov()
  ref = fid_score.calculate_frechet_distance(
      real.astype(np.float64).mean(0), np.cov(real.astype(np.float64), rowvar=False),
      fake.astype(np.float64).mean(0), np.cov(fake.astype(np.float64), rowvar=False))
  ours = metrics.frechet_distance(*stats["real"], *stats["fake"])
  assert ref > 0.1
  assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref))


@pytest.mark.parametrize("n", [23, 200, 12_000])
def test_inception_scores_equal_the_reference_formulas(n):
  rng = np.random.default_rng(n)
  logits = rng.normal(0, 3, (n, 1008))
  logits[np.arange(n), rng.integers(0, 1008, n)] += 8.0  # confident-ish, IS well above 1
  ours = metrics.adm_inception_score(logits)
  ref = _ref_adm_is(logits)
  assert abs(ours[0] - ref) <= 1e-6 * ref and ref > 2
  mean, std = metrics.inception_score(logits, splits=10)
  ref_mean, ref_std = _ref_torch_fidelity_is(logits, 10)
  assert abs(mean - ref_mean) <= 1e-6 * ref_mean and abs(std - ref_std) <= 1e-6 * max(ref_std, 1)


def test_unbiased_logits_drop_the_classifier_bias():
  rng = np.random.default_rng(0)
  pool, w = rng.normal(size=(5, 2048)).astype(np.float32), rng.normal(size=(2048, 1008))
  np.testing.assert_allclose(metrics.unbiased_logits(pool, w), pool.astype(np.float64) @ w,
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_rows", [1024, 64])
def test_precision_recall_equal_the_adm_manifold_estimator(block_rows):
  real, fake = _features()
  p, r = metrics.precision_recall(real, fake, k=3, block_rows=block_rows)
  ref_p, ref_r = _ref_precision_recall(real, fake, k=3)
  assert 0.05 < ref_p < 0.95 and 0.05 < ref_r < 0.95  # a non-trivial case
  assert abs(p - ref_p) <= 1e-6 and abs(r - ref_r) <= 1e-6
  radii = metrics.manifold_radii(real, k=3, block_rows=block_rows)
  centred = real.astype(np.float64) - real.astype(np.float64).mean(0)
  np.testing.assert_allclose(radii, _ref_radii(centred, 3), rtol=1e-4)
  # swapping the sets swaps the roles (same balls, same comparisons)
  p2, r2 = metrics.precision_recall(fake, real, k=3, block_rows=block_rows)
  ref_p2, ref_r2 = _ref_precision_recall(fake, real, k=3)
  assert abs(p2 - ref_p2) <= 1e-6 and abs(r2 - ref_r2) <= 1e-6


def test_precision_recall_of_a_set_with_itself_is_one():
  real, _ = _features(n_real=50)
  assert metrics.precision_recall(real, real) == (1.0, 1.0)
  with pytest.raises(ValueError, match="same D"):
    metrics.precision_recall(real, real[:, :10])
