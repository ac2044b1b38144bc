"""benchmarks/eval.py end to end on a micro model, so BENCHMARKS.md's evaluation commands keep
working and the JSON they print means what it says.

Runs in a subprocess with one CPU device (a user's plain command line; conftest's 8 fake devices
would change the mesh). A pass is dominated by the host's 2048 x 2048 sqrtm of the Frechet distance
(~9 s on 2 quiet cores, whatever the image count), so one timed pass of each kind is all this test
can afford.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ONE_DEVICE_XLA_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")

# tests/conftest.py::tiny_config()'s model as flags: 32 px, micro ViTs, 8 tokens.
TINY = ("--config=configs/demo.py", "--config.image_size=32", "--config.model.encoder_size=micro",
        "--config.model.decoder_size=micro", "--config.model.num_latent_tokens=8",
        "--config.model.num_codebooks=2", "--config.model.codebook_size=64",
        "--config.model.codebook_embed_dim=16")


@pytest.mark.slow
def test_eval_benchmark_runs_and_reports_consistent_numbers():
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.run(
      [sys.executable, "benchmarks/eval.py", *TINY, "--batch_size=4", "--num_images=6",
       "--repeats=1", "--part_repeats=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  r = json.loads(lines[0])

  assert r["benchmark"] == "eval" and r["model"] == "SoftVQ-micro/micro-8"
  assert r["image_size"] == 32 and r["compute_dtype"] == "float32"
  # 6 images in batches of 4: two batches, the second padded; exactly 6 evaluated.
  assert r["batch_size"] == 4 and r["num_images"] == 6 and r["num_batches"] == 2
  assert r["mesh_shape"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert r["random_networks"] == {"inception": True, "lpips": True, "tokenizer": True}
  assert r["compile_s"]["step"] > 0 and r["compile_s"]["inception"] > 0
  assert r["compile_s"]["total"] >= max(r["compile_s"]["step"], r["compile_s"]["inception"])
  assert r["first_call_s"]["step"] > 0 and r["first_call_s"]["inception"] > 0

  for kind in ("uncached", "cached"):
    k = r[kind]
    assert len(k["seconds_windows"]) == 1 and k["seconds"] > 0, k
    # images/s is the pass's image count over its wall time
    assert abs(k["images_per_s"] - 6 / k["seconds"]) <= 1e-3 * k["images_per_s"] + 1e-4, k
    # the wall time includes the Evaluator's own timed loop
    assert k["evaluator_eval_seconds"][0] <= k["seconds"] + 1e-3, k

  p = r["parts"]
  assert p["inception_batch_s"] > 0 and p["step_batch_s"] > 0 and p["data_pass_s"] > 0
  assert abs(p["inception_images_per_s"] - 4 / p["inception_batch_s"]) <= 1e-2 * p[
      "inception_images_per_s"]
  # each timed pass (uncached, cached) computed one Frechet distance
  assert len(p["frechet_distance_s_windows"]) == 2 and p["frechet_distance_s"] > 0
  # the Inception shares: uncached runs it twice per batch, cached once
  for kind, calls in (("uncached", 2), ("cached", 1)):
    share = r[f"inception_share_{kind}"]
    want = calls * r["num_batches"] * p["inception_batch_s"] / r[kind]["seconds"]
    assert 0 < share < 1.5 and abs(share - want) <= 1e-3, (kind, share, want)
    assert 0 < r[f"frechet_share_{kind}"] < 1.5

  m = r["metrics_last_pass"]
  assert 0 <= m["ssim"] <= 1 and m["psnr"] > 0 and m["rfid_random_inception"] >= 0, m
  assert 0 < m["codebook_usage"] <= 1, m
  # the cached pass read the statistics the uncached one wrote: the same PSNR, SSIM and rFID
  assert r["cached_equals_uncached"] == {"psnr": True, "ssim": True,
                                         "rfid_random_inception": True}, r["cached_equals_uncached"]
