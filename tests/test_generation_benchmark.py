"""Smoke tests of the generation throughput benchmarks at toy sizes (the BENCHMARKS.md commands keep
working and their records mean what the table says): benchmarks/generation.py (spec.md §8.5: SiT on
1-D tokens vs SiT/2 on SD-VAE latents, generator only and end to end) and
benchmarks/generator_train_step.py (SiT train step, ours vs PyTorch, first-step parity)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ONE_DEVICE_XLA_FLAGS, require

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(args, tmp_path, name):
  out = tmp_path / f"{name}.json"
  proc = subprocess.run([sys.executable, *args, f"--out={out}"], cwd=ROOT,
                        env=dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout[-2000:]
  record = json.loads(lines[0])
  assert json.loads(out.read_text()) == record
  return record


def test_generation_benchmark_records(tmp_path):
  require("torch")
  require("diffusers")
  steps = 2
  r = _run(["benchmarks/generation.py", "--plan=toy", "--resolutions=32", f"--steps={steps}",
            "--repeats=1", "--window_s=0", "--project_steps=250"], tmp_path, "gen")
  assert r["sampler"]["steps"] == steps and r["sampler"]["cfg_scale"] == 1.0  # CPU defaults
  assert r["batch_size"] == 1 and r["compute_dtype"] == "float32"
  cases = r["cases"]
  # The toy plan at 32 px: SD-VAE-like latents 4x4x4 -> SiT/2 sees 2x2 = 4 transformer tokens;
  # the 1-D generators 8 x 16 and 16 x 8 tokens.
  assert cases["sit2d_4"]["sequence_length"] == 4 and cases["sit2d_4"]["input_shape"] == [4, 4, 4]
  assert cases["sit1d_8"]["input_shape"] == [8, 16] and cases["sit1d_16"]["input_shape"] == [16, 8]
  assert cases["sdvae_32_torch"]["input_shape"] == [4, 4, 4]
  expected = {"sit2d_4", "sit1d_8", "sit1d_16", "softvq_8_32_jax", "softvq_8_32_torch",
              "softvq_16_32_jax", "softvq_16_32_torch", "sdvae_32_torch"}
  assert set(cases) == expected
  for name, c in cases.items():
    assert c["img_s"] > 0 and c["s_per_call"] > 0 and len(c["windows_s_per_call"]) == 1, name
    assert c["params"] > 0, name
  # Same code for both generator forms: the transformer blocks are shared, so the parameter
  # counts differ only by the input/output layers and position tables.
  assert abs(cases["sit1d_8"]["params"] - cases["sit2d_4"]["params"]) < 5_000
  # Our decoder counts the same parameters in both frameworks (timm's unused patch_embed aside).
  assert cases["softvq_8_32_jax"]["params"] == cases["softvq_8_32_torch"]["params"]

  rows = {row["tokens"]: row for row in r["comparisons"]}
  assert set(rows) == {8, 16}
  g2 = cases["sit2d_4"]["s_per_call"]
  d2 = cases["sdvae_32_torch"]["s_per_call"]
  for n, row in rows.items():
    g1 = cases[f"sit1d_{n}"]["s_per_call"]
    assert row["image_size"] == 32 and row["paper_claim"] is None  # toy sizes: no claim
    assert row["generator_only_ratio"] == pytest.approx(g2 / g1, rel=2e-3)
    for tag, fw in (("both_torch", "torch"), ("softvq_jax_vs_sdvae_torch", "jax")):
      d1 = cases[f"softvq_{n}_32_{fw}"]["s_per_call"]
      # end to end = the generator then the decoder: seconds per image add (batch 1)
      assert row["end_to_end_img_s"][tag]["1d"] == pytest.approx(1 / (g1 + d1), rel=2e-3)
      assert row["end_to_end_ratio"][tag] == pytest.approx((g2 + d2) / (g1 + d1), rel=2e-3)
      # the step-count extrapolation: generator time linear in steps, decode once
      assert row["e2e_ratio_at_steps"][tag]["250"] == pytest.approx(
          (125 * g2 + d2) / (125 * g1 + d1), rel=2e-3)


def test_generation_benchmark_refuses_unknown_resolution(tmp_path):
  proc = subprocess.run([sys.executable, "benchmarks/generation.py", "--plan=toy",
                         "--resolutions=256"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "--resolutions [256]" in proc.stderr


def test_generator_train_step_benchmark_parity_and_rates(tmp_path):
  require("torch")
  r = _run(["benchmarks/generator_train_step.py", "--size=micro", "--tokens=8", "--channels=4",
            "--batch_size=4", "--repeats=1", "--window_s=0"], tmp_path, "train")
  parity = r["parity_float32_first_step"]
  (lj, lt), (gj, gt) = parity["loss"], parity["grad_norm"]
  assert lj == pytest.approx(lt, rel=1e-4) and gj == pytest.approx(gt, rel=1e-4)
  assert lj > 0 and gj > 0
  assert r["model"] == "SiT-micro/1" and r["input_shape"] == [8, 4] and r["batch_size"] == 4
  assert r["jax"]["img_s"] > 0 and r["torch"]["img_s"] > 0 and r["ratio_jax_over_torch"] > 0
