"""--mode=compile (softvq_jax/compile_plan.py): ahead-of-time memory / FLOPs plans of the step.

On 8 fake CPU devices (tiny config, 64 px, 8 images per device so activations dominate):
- the CLI writes compile_<target>.json and exits non-zero with advice when the step does not fit;
- the per-device state it reports is the sharding plan's, and the compiled program's arguments
  are exactly that state + the batch shard (data parallel and FSDP);
- FSDP over 8 (2) devices holds 1/8 (1/2) of the data-parallel state per device;
- the analytic estimate is within stated tolerances of the compiled numbers.
A TPU slice is compiled with libtpu's topology (no TPU needed) when libtpu is installed.
"""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from softvq_jax import compile_plan, sharding
from conftest import tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Tolerances of the analytic estimate vs XLA's numbers, measured on this config (XLA:CPU, float32):
# analytic temporaries (gradients + activations) / compiled temporaries = 0.80-0.85 (XLA:CPU keeps
# float32 copies the formula does not count); FLOPs 0.92 (the formula counts matmuls only).
TEMP_RATIO = (0.7, 1.3)
FLOPS_RATIO = (0.85, 1.1)


def _config(mesh_shape=(-1, 1, 1)):
  config = tiny_config()
  config.image_size = 64
  config.batch_size = 64
  config.mesh_shape = mesh_shape
  return config


def _check_state_and_analytic(report):
  c, a = report["compiled"], report["analytic"]
  # Exact: what the program takes per device is the planned state shard plus the batch shard.
  assert c["argument_bytes"] == a["state_bytes"]["total"] + a["batch_bytes"]
  # Donated: the new state is written over the old one.
  assert c["alias_bytes"] >= a["state_bytes"]["total"] - 64
  ratio = (a["gradient_bytes"] + a["activation_bytes"]) / c["temp_bytes"]
  assert TEMP_RATIO[0] < ratio < TEMP_RATIO[1], ratio
  f = report["flops"]
  ratio = f["per_device_analytic"] / f["compiled_per_device"]
  assert FLOPS_RATIO[0] < ratio < FLOPS_RATIO[1], ratio


def test_parse_target():
  t = compile_plan.parse_target("v4-32")
  assert (t.num_devices, t.topology, t.hbm_bytes, t.chip_config) == (16, "v4:2x2x4", 32 * 2**30,
                                                                     "megacore")
  t = compile_plan.parse_target("v5e-64")
  assert (t.num_devices, t.topology, t.hbm_bytes) == (64, "v5e:8x8", 16 * 2**30)
  assert compile_plan.parse_target("v5p-128").topology == "v5p:4x4x4"
  assert compile_plan.parse_target("v6e-8").topology == "v6e:2x4"
  t = compile_plan.parse_target("2x8xH100")
  assert (t.platform, t.num_devices, t.num_hosts, t.usable_fraction) == ("gpu", 16, 2, 0.75)
  assert compile_plan.parse_target("8xH100@94").hbm_bytes == 94 * 2**30
  with pytest.raises(ValueError, match="v5e-64"):
    compile_plan.parse_target("v5x-64")


def test_cli_compile_reports_plan_and_fails_when_too_big(tmp_path):
  """The CLI on a one-device process (it declares the 8 CPU devices itself) with 1 MiB of
  'device memory': the JSON report is written, the exit code is non-zero with advice."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  flags = ["--config.image_size=64", "--config.model.encoder_size=micro",
           "--config.model.decoder_size=micro", "--config.model.num_latent_tokens=8",
           "--config.model.num_codebooks=2", "--config.model.codebook_size=64",
           "--config.model.codebook_embed_dim=16", "--config.batch_size=64"]
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--mode=compile", "--target=cpu-8@0.001"] + flags,
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "does not fit cpu-8@0.001" in proc.stderr and "grad_accum_steps" in proc.stderr, \
      proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout
  report = json.loads((tmp_path / "compile_cpu-8_0.001.json").read_text())
  assert report["method"] == "cpu-aot" and report["fits"] is False
  assert report["mesh_shape"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert report["per_device_batch"] == 8
  _check_state_and_analytic(report)


def test_fsdp_shards_state_and_matches_compile():
  dp = compile_plan.plan(_config((-1, 1, 1)), "cpu-8", method="analytic")
  fsdp = compile_plan.plan(_config((1, -1, 1)), "cpu-8")
  half = compile_plan.plan(_config((4, 2, 1)), "cpu-8", method="analytic")
  assert fsdp["method"] == "cpu-aot" and fsdp["fits"]
  _check_state_and_analytic(fsdp)
  n_params = dp["model"]["params"]
  for part in ("params", "ema_params"):
    assert dp["state_bytes"][part] == 4 * n_params  # replicated float32
    # The FSDP rule splits every parameter that 8 divides: 1/8 up to the few that it cannot.
    assert 4 * n_params / 8 <= fsdp["state_bytes"][part] <= 1.02 * 4 * n_params / 8
    assert 4 * n_params / 2 <= half["state_bytes"][part] <= 1.02 * 4 * n_params / 2
  assert fsdp["state_bytes"]["opt_state"] <= 1.02 * dp["state_bytes"]["opt_state"] / 8
  # Independent of the module: the sharding plan of the same mesh, byte for byte.
  mesh = sharding.create_mesh((1, 8, 1), devices=jax.devices()[:8])
  from softvq_jax import train
  trainer = train.build_trainer(_config((1, -1, 1)), mesh)
  assert fsdp["state_bytes"]["total"] == sharding.per_device_bytes(trainer.abstract_state,
                                                                   trainer.state_sharding)
  # Same model, same global batch: the per-step FLOPs do not depend on the mesh.
  assert dp["flops"]["per_step_analytic"] == fsdp["flops"]["per_step_analytic"]


def _libtpu_reason():
  if os.environ.get("TPU_LIBRARY_PATH") and os.path.isfile(os.environ["TPU_LIBRARY_PATH"]):
    return None
  try:
    import libtpu  # noqa: F401  # pylint: disable=unused-import,import-outside-toplevel
    return None
  except ImportError:
    return ("libtpu is not installed: `pip install libtpu==<the version jax[tpu] pins>` or set "
            "TPU_LIBRARY_PATH; the CPU tests above check the analytic path instead")


@pytest.mark.skipif(_libtpu_reason() is not None, reason=str(_libtpu_reason()))
def test_tpu_topology_compile():
  """v5e-8 (2x4 chips) compiled by XLA:TPU from this CPU host; FSDP over the 8 chips."""
  report = compile_plan.plan(_config((1, -1, 1)), "v5e-8")
  assert report["method"] == "tpu-aot", report.get("fallback_reason")
  c, a = report["compiled"], report["analytic"]
  # TPU pads small arrays to its tiles: arguments are at least the planned state + batch.
  assert c["argument_bytes"] >= a["state_bytes"]["total"] + a["batch_bytes"]
  ratio = report["flops"]["per_device_analytic"] / report["flops"]["compiled_per_device"]
  assert FLOPS_RATIO[0] < ratio < FLOPS_RATIO[1], ratio
  assert report["fits"] and c["total_bytes"] < 16 * 2**30
  assert math.isclose(report["target"]["peak_flops"], 197e12)
