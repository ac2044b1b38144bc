"""benchmarks/train_step.py end to end on a micro model: both frameworks are timed, and their first
training steps from the same weights agree — which is what makes its speed comparison honest.

The benchmark runs in a subprocess: in one process, importing timm (torch._dynamo -> triton) after
TensorFlow (which clu's writers load in the training tests) crashes with a segfault, and a fresh
process is also what a user's command line gets.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import require, ONE_DEVICE_XLA_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")

# tests/conftest.py::tiny_config() as flags, with an optimizer whose one step is visible above
# float32 rounding: weight_decay 0.5 (a wrong decay mask moves LayerNorm scales by ~0.5 lr), a
# first learning rate of 1e-3 and EMA decay 0.9 (an EMA step of 1e-4, not 1e-7).
TINY = ("--config=configs/demo.py", "--config.image_size=32", "--config.model.encoder_size=micro",
        "--config.model.decoder_size=micro", "--config.model.num_latent_tokens=8",
        "--config.model.num_codebooks=2", "--config.model.codebook_size=64",
        "--config.model.codebook_embed_dim=16", "--config.batch_size=8",
        "--config.num_train_steps=100", "--config.optim.warmup_steps=2",
        "--config.optim.weight_decay=0.5", "--config.optim.warmup_init_lr=1e-3",
        "--config.optim.ema_decay=0.9")


def test_train_step_benchmark_runs_and_both_steps_agree():
  require("torch")
  if importlib.util.find_spec("timm") is None:  # not imported here: see the module docstring
    if os.environ.get("SOFTVQ_REQUIRE_TORCH") == "1":
      pytest.fail("timm is required (SOFTVQ_REQUIRE_TORCH=1) but is not installed")
    pytest.skip("timm not installed")
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)  # one CPU device, as a user's plain run
  proc = subprocess.run(
      [sys.executable, "benchmarks/train_step.py", *TINY, "--repeats=1", "--warmup_steps=1",
       "--framework=both", "--check_update"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  r = json.loads(lines[0])

  assert r["batch_size"] == 8 and r["compute_dtype"] == "float32"
  assert r["model"] == "SoftVQ-micro/micro-8"
  for fw in ("jax", "torch"):
    assert r[fw]["images_per_s"] > 0 and r[fw]["step_time_s"] > 0, r
    assert r[fw]["gflop_per_s"] > 0, r
  assert r["step_gflop"] > 0 and r["ratio_jax_over_torch"] > 0
  assert r["peak_flops_per_device"] is None and "mfu" not in r["jax"]  # no CPU peak in the table

  # Same weights, same batch: the same loss and gradient norm (forward and backward) ...
  p = r["parity_first_step"]
  assert p["checked"]
  assert p["loss_rel_diff"] <= 1e-4, p
  assert p["grad_norm_rel_diff"] <= 1e-4, p
  assert abs(p["jax_loss"] - p["torch_loss"]) <= 1e-4 * abs(p["torch_loss"]), p
  # ... and the same update: AdamW (decay mask, betas, eps), clipping, schedule and EMA. Adam's
  # first update moves every parameter by ~lr (the EMA by 0.1 of that): a tenth of an update
  # apart means the optimizers agree.
  u = p["update"]
  assert u["lr"] == pytest.approx(1e-3) and u["ema_decay"] == pytest.approx(0.9), u
  assert u["params_max_abs_diff_over_update"] < 0.1, u
  assert u["ema_max_abs_diff_over_update"] < 0.1, u
