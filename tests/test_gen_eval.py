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
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ONE_DEVICE_XLA_FLAGS, require, tiny_config
from softvq_jax import api, config_lib, evaluate, gen_eval, generate, metrics, paths
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")

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


# ------------------------------------------------------------------------------------------------
# The ADM reference batch format.
# ------------------------------------------------------------------------------------------------


class _MeanColourFeatures:
  """Stands in for the Inception (cheap): features = per-image mean colour tiled to 2048."""
  suffix = ""
  random_init = False
  batch_size = 4

  def __init__(self, fingerprint="stub"):
    self.calls = 0
    self.fingerprint = fingerprint

  def __call__(self, images):
    self.calls += 1
    m = np.asarray(images, np.float32).mean(axis=(1, 2))  # [N, 3]
    return np.tile(m, (1, 683))[:, :2048]


def _write_adm_npz(path, n_images=12, size=16, seed=0, with_images=True):
  """A small reference batch in the ADM format: arr_0 uint8 [N, H, W, 3], mu [2048], sigma
  [2048, 2048] (+ ADM's spatial statistics mu_s / sigma_s, which we ignore)."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(64, 2048))
  arrays = {"mu": rng.normal(size=2048), "sigma": a.T @ a / 64, "mu_s": np.zeros(7),
            "sigma_s": np.eye(7)}
  if with_images:
    arrays["arr_0"] = rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
  np.savez(path, **arrays)
  return arrays


def test_adm_reference_batch_is_read(tmp_path):
  arrays = _write_adm_npz(tmp_path / "VIRTUAL_tiny.npz")
  feats = _MeanColourFeatures()
  ref = gen_eval.adm_reference(str(tmp_path / "VIRTUAL_tiny.npz"), tmp_path / "work", feats,
                               precision_recall=True, pr_images=10)
  np.testing.assert_array_equal(ref.mu, arrays["mu"])
  np.testing.assert_array_equal(ref.sigma, arrays["sigma"])
  np.testing.assert_allclose(ref.features, _MeanColourFeatures()(arrays["arr_0"][:10]))
  assert ref.record["kind"] == "adm_npz" and ref.record["precision_recall_images"] == 10
  # the reference images' features are cached: a second evaluation does not recompute them
  again = gen_eval.adm_reference(str(tmp_path / "VIRTUAL_tiny.npz"), tmp_path / "work", feats,
                                 precision_recall=True, pr_images=10)
  assert feats.calls == 1
  np.testing.assert_array_equal(again.features, ref.features)
  other = _MeanColourFeatures("another inception")  # another network: recomputed
  gen_eval.adm_reference(str(tmp_path / "VIRTUAL_tiny.npz"), tmp_path / "work", other,
                         precision_recall=True, pr_images=10)
  assert other.calls == 1
  # statistics without images (a pytorch-fid .npz): FID only
  _write_adm_npz(tmp_path / "stats_only.npz", with_images=False)
  ref = gen_eval.adm_reference(str(tmp_path / "stats_only.npz"), tmp_path / "work", feats,
                               precision_recall=True, pr_images=0)
  assert ref.features is None and ref.mu.shape == (2048,)
  out = gen_eval.generation_metrics(np.random.default_rng(0).normal(size=(6, 2048)), ref,
                                    np.zeros((2048, 1008)))
  assert out["precision"] is None and out["recall"] is None and np.isfinite(out["fid"])
  assert abs(out["inception_score"] - 1.0) < 1e-12  # zero logits: uniform predictions
  # not a reference batch: the error names the field and the arrays
  np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(gen_eval.GenEvalError, match="gen_eval.reference.*mu"):
    gen_eval.adm_reference(str(tmp_path / "bad.npz"), tmp_path / "work", feats,
                           precision_recall=True, pr_images=0)
  np.savez(tmp_path / "floats.npz", mu=np.zeros(2048), sigma=np.eye(2048),
           arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(gen_eval.GenEvalError, match="uint8"):
    gen_eval.adm_reference(str(tmp_path / "floats.npz"), tmp_path / "work2", feats,
                           precision_recall=True, pr_images=0)


def test_chunk_features_resume_and_belong_to_one_inception(tmp_path):
  rng = np.random.default_rng(0)
  for k, idx in enumerate((np.arange(0, 4), np.arange(4, 7))):
    paths.save_npz(tmp_path / "p0" / f"chunk_{k:06d}.npz",
                   images=rng.integers(0, 256, (len(idx), 8, 8, 3), dtype=np.uint8),
                   labels=idx.astype(np.int32), indices=idx)
  a = _MeanColourFeatures("a")
  kw = dict(num_images=7, chunk_size=4, process=0, num_processes=1)
  assert gen_eval.chunk_features(tmp_path, a, **kw) == (2, 0)
  assert gen_eval.chunk_features(tmp_path, a, **kw) == (0, 2) and a.calls == 2
  pool = gen_eval.load_chunk_features(tmp_path, num_images=7, chunk_size=4, suffix="",
                                      fingerprint="a")
  assert pool.shape == (7, 2048)
  # another Inception's features are recomputed, never mixed in
  b = _MeanColourFeatures("b")
  assert gen_eval.chunk_features(tmp_path, b, **kw) == (2, 0)
  with pytest.raises(gen_eval.GenEvalError, match="another Inception"):
    gen_eval.load_chunk_features(tmp_path, num_images=7, chunk_size=4, suffix="", fingerprint="a")
  os.remove(tmp_path / "p0" / "features_000001.npz")
  with pytest.raises(gen_eval.GenEvalError, match="1 of 2 chunks missing"):
    gen_eval.load_chunk_features(tmp_path, num_images=7, chunk_size=4, suffix="")


def test_bad_settings_name_the_field():
  config = tiny_config()
  assert not config_lib.is_generator_config(config)  # a tokenizer config: rFID as before
  config.generator = config_lib.generator_config(size="micro")
  assert config_lib.is_generator_config(config)
  with pytest.raises(gen_eval.GenEvalError, match="config.sample"):
    gen_eval.validate(config)
  config.sample = config_lib.sample_config()
  with pytest.raises(gen_eval.GenEvalError, match="sample.num_images=50000"):
    gen_eval.validate(config)
  config.sample.num_images = 10
  gen_eval.validate(config)  # no gen_eval section: the defaults
  config.gen_eval = config_lib.gen_eval_config()
  config.gen_eval.reference = "/nonexistent/VIRTUAL_imagenet256_labeled.npz"
  with pytest.raises(gen_eval.GenEvalError, match="gen_eval.reference=.*no such file"):
    gen_eval.validate(config)
  config.gen_eval.reference, config.gen_eval.nearest_k = "", 0
  with pytest.raises(gen_eval.GenEvalError, match="gen_eval.nearest_k"):
    gen_eval.validate(config)


def test_preflight_of_a_generator_eval_needs_the_inception_only():
  from conftest import config_file  # pylint: disable=import-outside-toplevel
  from softvq_jax import preflight  # pylint: disable=import-outside-toplevel
  config = config_file("demo_sit")
  assert preflight.networks_needed(config, "eval") == ["inception"]
  assert preflight.splits_read(config, "eval") == [config.data.eval_split]  # the reference split
  assert preflight.batch_sizes(config, "eval") == {}
  config.gen_eval.reference = "VIRTUAL_imagenet256_labeled.npz"
  assert preflight.splits_read(config, "eval") == []
  assert preflight.networks_needed(config_file("demo"), "eval") == ["inception", "lpips"]


# ------------------------------------------------------------------------------------------------
# --mode=eval of a generator, end to end (random tiny SiT, random tiny tokenizer, random Inception).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  cfg = TokenizerConfig.from_config(tiny_config())
  d = tmp_path_factory.mktemp("tok")
  api.Tokenizer(cfg, build_tokenizer(cfg, seed=1)).save(str(d))
  return str(d)


def _cli_eval(workdir, tokenizer_dir, reference, *extra):
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--mode=eval", "--config=configs/demo_sit.py",
       f"--workdir={workdir}", f"--tokenizer={tokenizer_dir}", "--config.sample.num_images=12",
       "--config.sample.chunk_size=8", "--config.sample.steps=2", "--config.sample.batch_size=4",
       "--config.sample.grid_images=4", "--config.sample.cfg_scale=1.75",
       "--config.sample.guidance_interval=(0.0, 0.7)", "--config.sample.seed=3",
       "--config.pretrained.allow_random_init=True", f"--config.gen_eval.reference={reference}",
       "--config.gen_eval.inception_batch_size=4", *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.slow
def test_cli_generator_eval_records_settings_and_resumes(tokenizer_dir, tmp_path):
  """`--mode=eval --config=configs/demo_sit.py` (a generator config): 12 samples in 2 chunks,
  their features, FID / IS / precision / recall vs an ADM-format reference; a rerun re-uses
  every chunk and every chunk's features; a lost chunk + features are redrawn identically."""
  reference = tmp_path / "VIRTUAL_tiny.npz"
  arrays = _write_adm_npz(reference, n_images=10, size=32)
  workdir = tmp_path / "run"
  first, _ = _cli_eval(workdir, tokenizer_dir, reference)
  sfx = "_random_inception"
  for k in ("fid", "inception_score", "precision", "recall"):
    assert np.isfinite(first[k + sfx]), (k, first)
  assert 0 <= first["precision" + sfx] <= 1 and 0 <= first["recall" + sfx] <= 1
  # the settings the numbers were made with
  assert first["task"] == "generator" and first["num_images"] == 12
  assert (first["sampler"], first["mode"], first["steps"], first["heun"]) == ("flow", "sde", 2,
                                                                             False)
  assert first["cfg_scale"] == 1.75 and first["guidance_interval"] == [0.0, 0.7]
  assert first["path"] == "linear" and first["seed"] == 3
  assert first["checkpoint"].startswith("random init") and first["tokenizer"] == tokenizer_dir
  assert first["reference"]["kind"] == "adm_npz"
  assert first["reference"]["path"] == str(reference)
  assert first["reference"]["precision_recall_images"] == 10 and first["nearest_k"] == 3
  assert "RANDOMLY" in first["inception"]
  assert (first["chunks_written"], first["features_computed"]) == (2, 2)
  saved = json.loads((workdir / "gen_eval" / "gen_eval_12.json").read_text())
  assert saved == first
  # the numbers are the metrics of the saved features against the file's statistics
  pool = gen_eval.load_chunk_features(workdir / "samples", num_images=12, chunk_size=8, suffix=sfx)
  assert pool.shape == (12, 2048)
  st = metrics.FeatureStats(2048)
  st.update(pool)
  fid = metrics.frechet_distance(arrays["mu"], arrays["sigma"], *st.mean_cov())
  assert abs(first["fid" + sfx] - fid) <= 1e-9 * fid
  ref_pool = np.load(next((workdir / "fid_stats").glob("adm_VIRTUAL_tiny_*_pool*.npz")))["pool"]
  assert ref_pool.shape == (10, 2048)
  assert metrics.precision_recall(ref_pool, pool) == (first["precision" + sfx],
                                                      first["recall" + sfx])

  # resume: nothing is redrawn or recomputed, the numbers are the same
  second, _ = _cli_eval(workdir, tokenizer_dir, reference)
  assert (second["chunks_written"], second["chunks_skipped"]) == (0, 2)
  assert (second["features_computed"], second["features_reused"]) == (0, 2)
  for k in ("fid", "inception_score", "precision", "recall"):
    assert second[k + sfx] == first[k + sfx]
  # a crash between a chunk and its features: the chunk is kept, its features recomputed; a lost
  # chunk is redrawn (image i depends on (seed, i) only) -> the same numbers
  os.remove(workdir / "samples" / "p0" / "features_random_inception_000001.npz")
  third, _ = _cli_eval(workdir, tokenizer_dir, reference)
  assert (third["chunks_written"], third["features_computed"], third["features_reused"]) == (
      0, 1, 1)
  os.remove(workdir / "samples" / "p0" / "features_random_inception_000000.npz")
  os.remove(workdir / "samples" / "p0" / "chunk_000000.npz")
  fourth, _ = _cli_eval(workdir, tokenizer_dir, reference)
  assert (fourth["chunks_written"], fourth["features_computed"]) == (1, 1)
  for k in ("fid", "inception_score", "precision", "recall"):
    assert abs(fourth[k + sfx] - first[k + sfx]) <= 1e-6 * max(1.0, abs(first[k + sfx])), k

  # a generator config without the number of samples: a one-line error naming the field
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  bad = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--mode=eval", "--config=configs/demo_sit.py",
       f"--workdir={tmp_path / 'none'}", "--config.pretrained.allow_random_init=True"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "config.sample.num_images" in bad.stderr, bad.stderr[-2000:]


def test_in_loop_evaluator_against_split_statistics(tokenizer_dir, tmp_path):
  """The in-loop hook: statistics of the data split computed once (cached under the tokenizer
  evaluation's name), new generator weights for the same compiled sampler change the numbers."""
  config = tiny_config()
  config.generator = config_lib.generator_config(size="micro")
  config.sample = config_lib.sample_config()
  config.sample.steps, config.sample.batch_size = 2, 8
  config.gen_eval = config_lib.gen_eval_config()
  ge = config.gen_eval
  ge.reference_split, ge.reference_num_images = config.data.eval_split, 0
  ge.precision_recall_reference_images, ge.inception_batch_size = 0, 8
  config.pretrained.allow_random_init = True
  tok = api.load_tokenizer(tokenizer_dir)
  gen_cfg = generate.generator_network_config(config, tok.config)
  model = generate.random_generator(gen_cfg, seed=0)
  evaluator = gen_eval.GenerationEvaluator(config, tok, gen_cfg, model, str(tmp_path))
  name = evaluate.fid_stats_name(config.data, split=config.data.eval_split, image_size=32,
                                 num_images=0, random_inception=True)
  assert (tmp_path / "fid_stats" / name).exists()
  assert evaluator.reference.features.shape == (8, 2048)  # demo_eval_size = 8
  out = evaluator(num_images=8)
  assert out["num_images"] == 8 and np.isfinite(out["fid_random_inception"])
  # perturbed weights (a random SiT's zero-initialised output layer would give 0 velocity)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  moved = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)
  out2 = evaluator(nnx.split(moved)[1], num_images=8)
  assert out2["fid_random_inception"] != out["fid_random_inception"]
