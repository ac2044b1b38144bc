"""Acceptance of the demo (the README's main command, configs/demo.py): it learns the photographs.

A short run of the demo configuration itself — shortened by the one flag a user would pass,
`num_train_steps` (the schedules are fractions of it) — must reconstruct its evaluation crops
clearly better than the best constant-colour image per crop (each crop's own mean colour), the
baseline a tokenizer that learned only colours would reach. The tokenizer is loaded back from the
workdir through the public API, as the run's closing log line tells a user to do.
"""
import json
import os

import numpy as np
import pytest

import softvq_jax
from conftest import config_file
from softvq_jax import data, metrics, pixels, train

STEPS = 40
NUM_EVAL = 32
MARGIN_DB = 2.0


class OnlyColours(AssertionError):
  """The demo's tokenizer did not reconstruct more than each crop's mean colour."""


def _demo_config():
  return config_file("demo")


def _psnr(a_u8: np.ndarray, b_u8: np.ndarray) -> float:
  return float(np.mean(np.asarray(metrics.psnr(a_u8, b_u8))))


# Known open (issue 16): measured 12.8 dB vs 17.1 dB for the mean colour after 40 steps (and 15.3
# vs 16.7 dB after 200 pixel-only steps; the whole 600-step demo ends at 17.4 dB, barely above the
# mean colour; what was tried and measured is in configs/demo.py's docstring). Strict: the day the
# demo learns, this XPASS fails and the marker must go. Only the PSNR comparison is expected to
# fail (raises=OnlyColours): a crash or a missing output fails the test as usual.
@pytest.mark.xfail(raises=OnlyColours, strict=True,
                   reason="issue 16: the demo does not yet learn more than colours in minutes")
@pytest.mark.slow
def test_short_demo_run_beats_the_mean_colour_baseline(tmp_path):
  config = _demo_config()
  config.num_train_steps = STEPS
  # The in-loop evaluation compiles the Inception (rFID) and LPIPS; the PSNR is measured below on
  # the same eval crops, through the public API.
  config.eval.every_steps = 0
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)

  it = data.build_eval_pipeline(config.data, image_size=config.image_size,
                                global_batch_size=NUM_EVAL)
  images = np.asarray(next(iter(it))["image"])                       # uint8 [N, 64, 64, 3]
  tok = softvq_jax.load_tokenizer(workdir)                           # EMA weights, newest step
  recon = np.asarray(tok.reconstruct(np.asarray(pixels.to_model_range(images))))
  recon_u8 = np.clip(np.round((recon + 1.0) * 127.5), 0, 255).astype(np.uint8)
  mean_colour = np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)
  mean_u8 = np.round(mean_colour).astype(np.uint8)

  # What the run shows a person: the "before" grid, the final grid, the config as a file.
  assert os.path.exists(os.path.join(workdir, "images", "recon_00000000.png"))
  assert os.path.exists(os.path.join(workdir, "images", f"recon_{STEPS:08d}.png"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_train_steps"] == STEPS

  psnr_model, psnr_mean = _psnr(images, recon_u8), _psnr(images, mean_u8)
  if not psnr_model > psnr_mean + MARGIN_DB:
    raise OnlyColours(
        f"after {STEPS} steps the demo tokenizer reconstructs its eval crops at {psnr_model:.2f} dB, "
        f"the per-crop mean colour at {psnr_mean:.2f} dB: it has not learned more than colours")
