"""The README's main command, run as a user would (subprocess, demo config, fresh workdir)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_main_reconstruct_on_demo_data(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's plain run
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--mode=reconstruct", "--num_images=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "reconstruct.json").read_text())
  assert result["num_images"] == 4 and result["tokens_shape"] == [16, 32]
  assert np.isfinite(result["psnr"])
  grid = np.asarray(Image.open(tmp_path / "reconstructions.png"))
  assert grid.shape == (2 * (64 + 2) + 2, 4 * (64 + 2) + 2, 3)
  # the input row holds real photographs, not a blank canvas
  assert grid[2:66, 2:66].std() > 10


def test_main_rejects_bad_config_value(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.model.num_codebooks=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.model.num_codebooks" in proc.stderr
