"""Evaluation protocol: PSNR/SSIM equal scikit-image's, FID math, and the sharded evaluator."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import tiny_config
from softvq_jax import data, evaluate, metrics, pixels, sharding
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer


def _image_pairs():
  rng = np.random.default_rng(0)
  a = skdata.astronaut()[100:164, 150:230]                     # real photo, 64 x 80
  b = np.clip(a.astype(int) + rng.integers(-25, 26, a.shape), 0, 255).astype(np.uint8)
  c = rng.integers(0, 256, a.shape, dtype=np.uint8)              # noise
  d = skdata.chelsea()[:64, :80]
  return np.stack([a, a, c, d, a]), np.stack([b, c, b, a, a])    # last pair identical


def test_psnr_ssim_equal_scikit_image_on_uint8():
  x, y = _image_pairs()
  ours_p = np.asarray(metrics.psnr(jnp.asarray(x), jnp.asarray(y)))
  ours_s = np.asarray(metrics.ssim(jnp.asarray(x), jnp.asarray(y)))
  for i in range(len(x)):
    ref_s = structural_similarity(x[i], y[i], channel_axis=-1, data_range=255)
    assert abs(ours_s[i] - ref_s) < 2e-6, (i, ours_s[i], ref_s)
    if i == len(x) - 1:
      assert np.isinf(ours_p[i]) and abs(ours_s[i] - 1.0) < 1e-6
    else:
      ref_p = peak_signal_noise_ratio(x[i], y[i], data_range=255)
      assert abs(ours_p[i] - ref_p) < 1e-4, (i, ours_p[i], ref_p)


def test_ssim_is_not_the_official_scripts_float_range_variant():
  # The official script passes [0, 1] floats with data_range=255: C1/C2 shrink by 255^2 and the
  # value differs. Ours must equal the uint8 protocol, so the two must differ measurably here.
  x, y = _image_pairs()
  wrong = structural_similarity(x[0] / 255.0, y[0] / 255.0, channel_axis=-1, data_range=255)
  ours = float(metrics.ssim(jnp.asarray(x[:1]), jnp.asarray(y[:1]))[0])
  assert abs(ours - wrong) > 1e-3


def test_metrics_under_batch_sharding_equal_unsharded():
  x, y = _image_pairs()
  x, y = np.concatenate([x, x[:3]]), np.concatenate([y, y[:3]])  # 8 images, one per device
  mesh = sharding.create_mesh((-1, 1, 1))
  gx = data.make_global_batch({"image": x}, mesh)["image"]
  gy = data.make_global_batch({"image": y}, mesh)["image"]
  f = jax.jit(lambda a, b: (metrics.psnr(a, b), metrics.ssim(a, b)))
  sharded = f(gx, gy)
  plain = f(jnp.asarray(x), jnp.asarray(y))
  for s, p in zip(sharded, plain):
    np.testing.assert_allclose(np.asarray(s), np.asarray(p), rtol=1e-6)


def test_fid_of_identical_features_is_zero_and_gaussians_match_closed_form():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(500, 16))
  stats = metrics.FeatureStats(16)
  for chunk in np.array_split(feats, 7):
    stats.update(chunk.astype(np.float32))
  mu, sigma = stats.mean_cov()
  f64 = feats.astype(np.float32).astype(np.float64)  # what the float64 accumulation sees
  np.testing.assert_allclose(mu, f64.mean(0), atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False), atol=1e-10)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6

  # Closed form: FID(N(m1, S1), N(m2, S2)) with S1 = diag(a), S2 = Q diag(b) Q^T is
  # |m1 - m2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2) (computed here by eigh).
  d = 6
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  a = rng.uniform(0.5, 2.0, d)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  s1, s2 = np.diag(a), q @ np.diag(rng.uniform(0.5, 2.0, d)) @ q.T
  r = np.diag(np.sqrt(a))
  ev = np.linalg.eigvalsh(r @ s2 @ r)
  expected = np.sum((m1 - m2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev))
  assert abs(metrics.frechet_distance(m1, s1, m2, s2) - expected) < 1e-9
  # and the 1-D textbook case
  assert abs(metrics.frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) - (1 + (2 - 1)**2)) < 1e-12


def test_fid_equals_pytorch_fid_sqrtm_formula():
  # pytorch-fid: diff.diff + tr S1 + tr S2 - 2 tr(sqrtm(S1 @ S2)), with scipy's sqrtm
  from scipy import linalg  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3
  mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = np.real(linalg.sqrtm(s1 @ s2))
  ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert abs(metrics.frechet_distance(mu1, s1, mu2, s2) - ref) < 1e-6 * abs(ref)
  # singular covariances (fewer samples than dims, as in small evaluations) stay finite and >= 0
  c = rng.normal(size=(10, 64))
  fid = metrics.frechet_distance(c.mean(0), np.cov(c, rowvar=False), c.mean(0) + 0.1,
                                 np.cov(c[::-1] * 1.1, rowvar=False))
  assert np.isfinite(fid) and fid > 0


def test_feature_stats_mask_and_file_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  f = rng.normal(size=(10, 4))
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], bool)
  st = metrics.FeatureStats(4)
  st.update(f, mask)
  assert st.n == 7
  np.testing.assert_allclose(st.mean_cov()[1], np.cov(f[mask], rowvar=False), atol=1e-12)
  st.save(str(tmp_path / "s.npz"))
  mu, sigma = metrics.load_stats(str(tmp_path / "s.npz"))
  np.testing.assert_allclose(mu, f[mask].mean(0), atol=1e-12)
  np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
  with pytest.raises(ValueError, match="mu.*sigma"):
    metrics.load_stats(str(tmp_path / "bad.npz"))


def test_inception_score_uniform_and_confident():
  k = 1008
  assert abs(metrics.inception_score(np.zeros((20, k)), splits=2)[0] - 1.0) < 1e-9
  confident = np.full((20, k), -50.0)
  confident[np.arange(20), np.arange(20)] = 50.0  # 20 distinct, certain classes
  assert abs(metrics.inception_score(confident, splits=1)[0] - 20.0) < 1e-6


# ------------------------------------------------------------------------------------------------
# The evaluator (random Inception / LPIPS networks: allow_random_init, as the demo).
# ------------------------------------------------------------------------------------------------


def _eval_config():
  config = tiny_config()
  config.data.demo_eval_size = 11      # not a multiple of the batch: exercises the padding mask
  config.eval.batch_size = 8
  config.eval.num_grid_images = 3
  config.pretrained.allow_random_init = True
  return config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  config = _eval_config()
  cfg = TokenizerConfig.from_config(config)
  model = build_tokenizer(cfg, seed=3)
  graphdef, _ = nnx.split(model)
  mesh = sharding.create_mesh((-1, 1, 1))
  workdir = str(tmp_path_factory.mktemp("eval"))
  ev = evaluate.Evaluator(config, mesh, graphdef, workdir)
  params = evaluate.replicated_params(model, mesh)
  first = ev(params)
  second = ev(params)  # real statistics now come from the cache
  return config, model, ev, first, second, workdir


def test_evaluator_metrics_equal_direct_computation(evaluated):
  config, model, ev, result, _, _ = evaluated
  assert result["num_images"] == 11
  it = data.build_eval_pipeline(config.data, image_size=config.image_size, global_batch_size=16)
  batch = next(iter(it))
  real = batch["image"][batch["mask"]]
  assert real.shape[0] == 11
  recon = pixels.to_uint8(np.asarray(model(jnp.asarray(pixels.to_model_range(real))).reconstruction))
  psnr = np.mean([peak_signal_noise_ratio(real[i], recon[i], data_range=255) for i in range(11)])
  ssim = np.mean([structural_similarity(real[i], recon[i], channel_axis=-1, data_range=255)
                  for i in range(11)])
  assert abs(result["psnr"] - psnr) < 1e-3
  assert abs(result["ssim"] - ssim) < 1e-4
  # random networks are labelled as such, never reported as rFID / LPIPS
  assert "rfid" not in result and "lpips" not in result
  assert np.isfinite(result["rfid_random_inception"]) and result["rfid_random_inception"] > 0
  assert result["lpips_random_vgg"] > 0
  assert 0 < result["codebook_usage"] <= 1 and result["codebook_perplexity"] >= 1
  assert ev.last_grid.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2, 3)


def test_evaluator_cached_real_stats_give_the_same_result(evaluated):
  _, _, _, first, second, workdir = evaluated
  import os  # pylint: disable=import-outside-toplevel
  assert len(os.listdir(os.path.join(workdir, "fid_stats"))) == 1
  for k in ("rfid_random_inception", "psnr", "ssim", "lpips_random_vgg", "codebook_usage"):
    assert abs(first[k] - second[k]) <= 1e-9 * max(1.0, abs(first[k])), k


def test_evaluator_subset_counts_exactly(evaluated):
  _, model, ev, _, _, _ = evaluated
  result = ev(evaluate.replicated_params(model, ev.mesh), num_images=5)
  assert result["num_images"] == 5


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
  config = _eval_config()
  config.pretrained.allow_random_init = False
  with pytest.raises(ValueError, match="config.pretrained.inception"):
    evaluate.Evaluator(config, sharding.create_mesh((-1, 1, 1)), None, str(tmp_path))
  config.pretrained.inception = str(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match="pt_inception"):
    evaluate.Evaluator(config, sharding.create_mesh((-1, 1, 1)), None, str(tmp_path))
