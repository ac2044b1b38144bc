"""The benchmarks run end to end (on the tiny demo config), so BENCHMARKS.md's commands keep working."""
import json
import os
import subprocess
import sys

from conftest import require, ONE_DEVICE_XLA_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_encode_decode_benchmark_runs():
  """Both frameworks timed after the float32 parity guard passed; one JSON line on stdout."""
  require("torch")
  require("timm")
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)  # one CPU device, as a user's plain run
  proc = subprocess.run(
      [sys.executable, "benchmarks/encode_decode.py", "--config=configs/demo.py",
       "--batch_size=2", "--repeats=1", "--window_s=0", "--framework=both"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  assert result["batch_size"] == 2 and result["compute_dtype"] == "float32"
  assert result["parity_float32"]["encode_max_abs_diff"] <= 1e-3
  assert result["parity_float32"]["decode_max_abs_diff"] <= 1e-3
  for fw in ("jax", "torch"):
    assert result[fw]["encode_img_s"] > 0 and result[fw]["decode_img_s"] > 0, result
  assert result["ratio_jax_over_torch"]["encode"] > 0
