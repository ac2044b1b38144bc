"""--mode=compile (softvq_jax/compile_plan.py): ahead-of-time memory / FLOPs plans of the step.

On 8 fake CPU devices (tiny config with the full objective of spec.md §5: LPIPS-VGG, the DINO-style
discriminator with consistency regularisation, REPA; 64 px, 8 images per device so activations
dominate):
- the CLI writes compile_<target>.json and exits non-zero with advice when the step does not fit;
- the per-device state it reports is the sharding plan's, part by part (the frozen networks
  included), and the compiled program's arguments are exactly that state + the batch shard
  (data parallel and FSDP, frozen networks replicated or FSDP-split);
- compiling never loads the pretrained files (`config.pretrained.*` may point nowhere);
- FSDP over 8 (2) devices holds 1/8 (1/2) of the data-parallel state per device;
- the analytic estimate is within stated tolerances of the compiled numbers, and terms whose
  weight is 0 add nothing to it.
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
from conftest import config_file, tiny_config, ONE_DEVICE_XLA_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Tolerances of the analytic estimate vs XLA's numbers, measured on these configs (XLA:CPU,
# float32): analytic temporaries (gradients + activations) / compiled temporaries = 0.85 pixel-only,
# 0.77 full objective (XLA:CPU keeps float32 copies the formulas do not count; LPIPS-VGG at 64 px
# dominates the tiny full objective); FLOPs 0.92 pixel-only, 0.99 full objective.
TEMP_RATIO = (0.65, 1.3)
FLOPS_RATIO = (0.85, 1.1)
_OBJECTIVE_WEIGHTS = ("perceptual_weight", "gan_weight", "repa_weight")


def _config(mesh_shape=(-1, 1, 1), objective=True):
  config = tiny_config()
  config.image_size = 64
  config.batch_size = 64
  config.mesh_shape = mesh_shape
  if not objective:
    for w in _OBJECTIVE_WEIGHTS:
      config.loss[w] = 0.0
  return config


def _check_state_and_analytic(report):
  c, a = report["compiled"], report["analytic"]
  # Exact: what the program takes per device is the planned state shard plus the batch shard.
  assert c["argument_bytes"] == a["state_bytes"]["total"] + a["batch_bytes"]
  # Donated: the new state is written over the old one (the TrainState; the frozen networks are
  # the step's other, non-donated argument).
  assert c["alias_bytes"] >= a["state_bytes"]["total"] - a["state_bytes"].get("frozen", 0) - 64
  ratio = compile_plan._temporaries(a) / c["temp_bytes"]  # pylint: disable=protected-access
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
  'device memory': the JSON report is written, the exit code is non-zero with advice. Pixel +
  entropy objective: the tokenizer's formulas alone against the compiler."""
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, JAX_PLATFORMS="cpu")
  flags = ["--config.image_size=64", "--config.model.encoder_size=micro",
           "--config.model.decoder_size=micro", "--config.model.num_latent_tokens=8",
           "--config.model.num_codebooks=2", "--config.model.codebook_size=64",
           "--config.model.codebook_embed_dim=16", "--config.batch_size=64"] + [
               f"--config.loss.{w}=0" for w in _OBJECTIVE_WEIGHTS]
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
  assert "frozen" not in report["state_bytes"] and "disc_params" not in report["state_bytes"]
  assert set(report["analytic"]["activation_bytes_by_part"]) == {"tokenizer"}
  _check_state_and_analytic(report)


def test_fsdp_full_objective_shards_state_and_matches_compile():
  """The full objective under FSDP (frozen networks FSDP-split too), compiled with pretrained
  files that do not exist: compiling must never load them."""
  dp = compile_plan.plan(_config((-1, 1, 1)), "cpu-8", method="analytic")
  config = _config((1, -1, 1))
  config.frozen_sharding = "fsdp"
  config.pretrained.allow_random_init = False
  for k in ("lpips", "dino", "repa_teacher"):
    config.pretrained[k] = f"/nonexistent/{k}.safetensors"
  fsdp = compile_plan.plan(config, "cpu-8")
  half = compile_plan.plan(_config((4, 2, 1)), "cpu-8", method="analytic")
  assert fsdp["method"] == "cpu-aot" and fsdp["fits"]
  _check_state_and_analytic(fsdp)
  n_params = dp["model"]["params"]
  for part in ("params", "ema_params"):
    assert dp["state_bytes"][part] == 4 * n_params  # replicated float32
    # The FSDP rule splits every parameter that 8 divides: 1/8 up to the few that it cannot.
    assert 4 * n_params / 8 <= fsdp["state_bytes"][part] <= 1.02 * 4 * n_params / 8
    assert 4 * n_params / 2 <= half["state_bytes"][part] <= 1.02 * 4 * n_params / 2
  for part in ("opt_state", "disc_params", "disc_opt_state", "proj_params"):
    assert fsdp["state_bytes"][part] <= 1.05 * dp["state_bytes"][part] / 8, part
  # Frozen networks: replicated by default (exactly the abstract weights' bytes), FSDP on request.
  from softvq_jax import objective, train
  frozen = objective.abstract_frozen(objective.build_objective(_config()))
  frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))
  assert dp["state_bytes"]["frozen"] == half["state_bytes"]["frozen"] == frozen_bytes
  assert frozen_bytes / 8 <= fsdp["state_bytes"]["frozen"] <= 1.05 * frozen_bytes / 8
  # Independent of the module: the sharding plan of the same mesh, byte for byte.
  mesh = sharding.create_mesh((1, 8, 1), devices=jax.devices()[:8])
  trainer = train.build_trainer(config, mesh)
  assert fsdp["state_bytes"]["total"] == (
      sharding.per_device_bytes(trainer.abstract_state, trainer.state_sharding)
      + sharding.per_device_bytes(trainer.abstract_frozen, trainer.frozen_sharding))
  # Same model, same global batch: the per-step FLOPs do not depend on the mesh.
  assert dp["flops"]["per_step_analytic"] == fsdp["flops"]["per_step_analytic"]


def test_objective_terms_in_the_analytic_estimate():
  """Each term adds its networks' part (a zero weight adds nothing), and the formulas' pieces
  agree with independent counts: VGG16 FLOPs with XLA's cost analysis of LPIPS, the
  discriminator step's calls with consistency regularisation on / off."""
  from flax import nnx
  from softvq_jax.models.lpips import LPIPS

  def analytic(**weights):
    config = _config()
    for k, v in weights.items():
      config.loss[k] = v
    return compile_plan.plan(config, "cpu-8", method="analytic")

  pixel = analytic(**{w: 0.0 for w in _OBJECTIVE_WEIGHTS})
  full = analytic()
  a0, a1 = pixel["analytic"], full["analytic"]
  assert set(a0["activation_bytes_by_part"]) == set(a0["train_flops_by_part"]) == {"tokenizer"}
  assert set(a1["activation_bytes_by_part"]) == {"tokenizer", "lpips", "disc", "repa",
                                                 "disc_discriminator_step"}
  assert set(a1["train_flops_by_part"]) == {"tokenizer", "lpips", "disc_generator_step",
                                            "disc_discriminator_step", "repa"}
  assert a1["train_flops_per_image"] == pytest.approx(sum(a1["train_flops_by_part"].values()))
  assert a1["activation_bytes_per_image"] > a0["activation_bytes_per_image"]
  # The optimizer states, gradients and frozen weights of the objective appear only with it.
  assert {"frozen", "disc_params", "disc_opt_state", "proj_params"} <= set(a1["state_bytes"])
  assert a1["gradient_bytes"] == sum(a1["state_bytes"][k] for k in
                                     ("params", "proj_params", "disc_params"))
  for w, part in (("perceptual_weight", "lpips"), ("gan_weight", "disc_generator_step"),
                  ("repa_weight", "repa")):
    off = analytic(**{w: 0.0})["analytic"]
    assert part not in off["train_flops_by_part"]
    assert off["train_flops_per_image"] == pytest.approx(
        a1["train_flops_per_image"] - a1["train_flops_by_part"][part]
        - (a1["train_flops_by_part"]["disc_discriminator_step"] if w == "gan_weight" else 0))
    assert off["state_bytes"]["frozen"] < a1["state_bytes"]["frozen"]
  # Consistency regularisation: 4 discriminator calls per step instead of 2.
  no_cr = analytic(cr_weight=0.0)["analytic"]
  assert 2 * no_cr["train_flops_by_part"]["disc_discriminator_step"] == pytest.approx(
      a1["train_flops_by_part"]["disc_discriminator_step"])
  assert 2 * no_cr["activation_bytes_by_part"]["disc_discriminator_step"] == pytest.approx(
      a1["activation_bytes_by_part"]["disc_discriminator_step"])
  # VGG16: XLA's count of two LPIPS forwards (x, x_hat) at 64 px = 2/3 of the formula's 3 passes.
  lp = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(lp)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jax.numpy.float32)
  cost = jax.jit(lambda st, a, b: nnx.merge(graphdef, st)(a, b)).lower(state, x, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ratio = (2 / 3 * a1["train_flops_by_part"]["lpips"]) / cost["flops"]
  assert 0.97 < ratio < 1.03, ratio


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


def test_released_l32_is_planned_as_the_released_b_encoder_l_decoder():
  """`--mode=compile --config=configs/sq32_256.py:L --target=v5e-8` plans SoftVQ-L-32 as
  released (spec.md §2): a B encoder, an L decoder, 32 tokens of dim e = 64 (analytic method here:
  the cpu-aot fallback of a v5e-8 target without libtpu compiles the full step for minutes)."""
  report = compile_plan.plan(config_file("sq32_256", "L"), "v5e-8", method="analytic")
  m = report["model"]
  assert (m["encoder"], m["decoder"], m["num_latent_tokens"], m["codebook_embed_dim"],
          m["image_size"], m["params"]) == ("B", "L", 32, 64, 256, 391_571_008)
  assert "SoftVQ B/L-32 (token dim 64) at 256 px" in compile_plan.format_report(report)
