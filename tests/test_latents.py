"""The latent contract: --mode=stats equals NumPy and reaches encode(normalize=True); --mode=extract
equals encode and resumes after a kill."""
import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from softvq_jax import api, data, latents, pixels, train


def _config():
  config = tiny_config()
  config.num_train_steps = 2
  config.optim.warmup_steps = 1
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.image_every_steps = 2
  config.data.demo_eval_size = 12     # the stats/extract split below: 12 images, batch 8
  config.latents.split = "validation"
  config.latents.batch_size = 8
  config.latents.num_images = 0
  config.latents.chunk_batches = 1
  config.eval.every_steps = 2         # the in-loop evaluation runs once, at the end
  config.eval.in_loop_num_images = 4
  config.pretrained.allow_random_init = True
  # pixel + entropy training: the latent contract does not depend on the objective
  config.loss.perceptual_weight = config.loss.repa_weight = config.loss.gan_weight = 0.0
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with a 2-step checkpoint of the tiny model, and the centre crops it will see."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp("lat"))
  train.train_and_evaluate(config, workdir)
  it = data.build_eval_pipeline(config.data, image_size=config.image_size, global_batch_size=16,
                                split="validation")
  batch = next(iter(it))
  crops = batch["image"][batch["mask"]]
  return config, workdir, crops


def test_in_loop_evaluation_is_logged(trained):
  _, workdir, _ = trained
  lines = open(os.path.join(workdir, "eval_metrics.jsonl")).read().splitlines()
  assert len(lines) == 1
  m = json.loads(lines[0])
  assert m["step"] == 2 and m["num_images"] == 4
  assert np.isfinite(m["rfid_random_inception"]) and 0 < m["ssim"] < 1


def test_stats_equal_numpy_and_reach_normalized_encode(trained):
  config, workdir, crops = trained
  tok = api.load_tokenizer(workdir)
  tokens = np.asarray(tok.encode(pixels.to_model_range(crops)), np.float64)  # [12, N, D]
  result = latents.compute_latent_stats(config, workdir)
  assert result["num_images"] == 12 and result["num_tokens"] == 12 * tokens.shape[1]
  assert abs(result["vq_mean"] - tokens.mean()) < 1e-6
  assert abs(result["vq_std"] - tokens.std()) < 1e-6
  np.testing.assert_allclose(result["channel_mean"], tokens.mean(axis=(0, 1)), atol=1e-6)
  np.testing.assert_allclose(result["channel_std"], tokens.std(axis=(0, 1)), atol=1e-6)
  assert json.load(open(os.path.join(workdir, "latent_stats.json")))["vq_std"] == result["vq_std"]
  # The checkpoint now carries them: normalize=True uses them, as for official checkpoints.
  tok2 = api.load_tokenizer(workdir)
  assert tok2.config.vq_mean == result["vq_mean"] and tok2.config.vq_std == result["vq_std"]
  x = pixels.to_model_range(crops[:2])
  z = np.asarray(tok2.encode(x, normalize=True))
  np.testing.assert_allclose(z, (np.asarray(tok2.encode(x)) - result["vq_mean"]) / result["vq_std"],
                             rtol=1e-5, atol=1e-5)
  assert abs(z.std() - tokens[:2].std() / result["vq_std"]) < 0.5  # roughly unit scale


def test_stats_limit_counts_exactly(trained):
  config, workdir, crops = trained
  config = _config()
  config.latents.num_images = 5
  result = latents.compute_latent_stats(config, workdir, checkpoint=workdir)
  tok = api.load_tokenizer(workdir)
  tokens = np.asarray(tok.encode(pixels.to_model_range(crops[:5])), np.float64)
  assert result["num_images"] == 5
  assert abs(result["vq_mean"] - tokens.mean()) < 1e-6


def test_extract_equals_encode_and_resumes(trained, tmp_path):
  config, workdir, crops = trained
  config = _config()
  config.latents.flip = True
  out = str(tmp_path / "tok")
  manifest = latents.extract_tokens(config, workdir, out_dir=out)
  assert manifest["num_examples"] == 12 and manifest["complete"]
  full = latents.load_extracted(out)
  tok = api.load_tokenizer(workdir)
  x = pixels.to_model_range(crops)
  np.testing.assert_allclose(full["tokens"], np.asarray(tok.encode(x)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(full["tokens_flip"], np.asarray(tok.encode(x[:, :, ::-1])),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(full["index"], np.arange(12))
  chunks = sorted(os.listdir(os.path.join(out, "p000")))
  assert chunks == ["chunk_000000.npz", "chunk_000001.npz"]
  # A killed run: the last chunk is missing and a torn temporary file lies around.
  first_mtime = os.path.getmtime(os.path.join(out, "p000", chunks[0]))
  os.remove(os.path.join(out, "p000", chunks[1]))
  open(os.path.join(out, "p000", "chunk_000001.npz.tmp.npz"), "wb").write(b"torn")
  os.remove(os.path.join(out, "manifest.json"))
  latents.extract_tokens(config, workdir, out_dir=out)
  assert os.path.getmtime(os.path.join(out, "p000", chunks[0])) == first_mtime  # not redone
  again = latents.load_extracted(out)
  for k in full:
    np.testing.assert_array_equal(again[k], full[k])
  assert json.load(open(os.path.join(out, "manifest.json")))["num_examples"] == 12
