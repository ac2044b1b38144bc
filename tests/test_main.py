"""The README's main command, run as a user would (subprocess, demo config, fresh workdir):
reconstruction, training, kill -9 + resume, SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ONE_DEVICE_XLA_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_main_reconstruct_on_demo_data(tmp_path):
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)  # one CPU device, as a user's plain run
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--mode=reconstruct", "--num_images=4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "reconstruct.json").read_text())
  assert result["num_images"] == 4 and result["tokens_shape"] == [32, 32]
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


# ------------------------------------------------------------------------------------------------
# Training through the CLI: the README command, kill -9 + resume, SIGTERM.
# ------------------------------------------------------------------------------------------------

_TRAIN_FLAGS = [
    "--config.image_size=32", "--config.model.encoder_size=micro",
    "--config.model.decoder_size=micro", "--config.model.num_latent_tokens=8",
    "--config.model.codebook_size=64", "--config.batch_size=8", "--config.optim.warmup_steps=2",
    "--config.log_every_steps=2", "--config.checkpoint_every_steps=4",
    "--config.image_every_steps=8", "--config.num_grid_images=2", "--config.data.num_threads=2",
    # the demo's full objective (LPIPS, REPA, GAN + LeCam + CR), the GAN active from step 2
    "--config.loss.disc_start=2", "--config.loss.perceptual_warmup_steps=4",
    "--config.loss.perceptual_weight=1.0", "--config.loss.perceptual_dropout=0.0",
    "--config.optim.lr=0.002", "--config.optim.ema_decay=0.99",
    "--config.eval.every_steps=0",
]


def _train_cmd(workdir, steps):
  return [sys.executable, "-m", "softvq_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--config.num_train_steps={steps}"] + _TRAIN_FLAGS


def _train(workdir, steps, *extra_flags):
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.run(_train_cmd(workdir, steps) + list(extra_flags), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _logged(workdir):
  """step -> the last logged training metrics of that step (perf/* excluded)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    out[m["step"]] = {k: v for k, v in m.items() if not k.startswith("perf/")}
  return out


def _final_state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as c:
    return c.restore(workdir / "checkpoints" / str(step) / "state")


def _wait_for(path, proc, timeout=900):
  start = time.time()
  while not path.exists():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() - start < timeout, f"{path} never appeared"
    time.sleep(0.02)


def test_main_trains_and_loads_as_tokenizer(tmp_path):
  # The CPU has no entry in the peak-FLOPs table; give one so that MFU is reported.
  proc = _train(tmp_path, 8, "--config.peak_flops_per_device=1e12")
  assert "starting from scratch" in proc.stderr
  assert "compiled the train step" in proc.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
  assert list((tmp_path).glob("events.out.tfevents.*")), "no TensorBoard event file"
  assert (tmp_path / "images" / "recon_00000008.png").exists()
  logged = _logged(tmp_path)
  assert sorted(logged) == [2, 4, 6, 8]
  assert all(np.isfinite(m["loss/total"]) for m in logged.values())
  perf = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert perf["perf/images_per_s"] > 0 and 0 < perf["perf/mfu"] < 1
  import softvq_jax  # pylint: disable=import-outside-toplevel
  tok = softvq_jax.load_tokenizer(str(tmp_path))  # the newest checkpoint's EMA weights
  tokens = tok.encode(np.zeros((1, 32, 32, 3), np.float32))
  assert tokens.shape == (1, 8, 32)
  ema = _final_state(tmp_path, 8)["ema_params"]
  np.testing.assert_array_equal(np.asarray(tok._state["quantize"]["embedding"][...]),  # pylint: disable=protected-access
                                ema["quantize"]["embedding"]["value"])
  # The README's evaluation command on the same workdir (the demo's random Inception / VGG).
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.run(_train_cmd(tmp_path, 8)[:5] + _TRAIN_FLAGS + [
      "--mode=eval", "--config.eval.num_images=6", "--config.data.demo_eval_size=8"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "eval" / "eval_validation_6.json").read_text())
  assert result["num_images"] == 6 and 0 < result["ssim"] < 1 and np.isfinite(result["psnr"])
  assert np.isfinite(result["rfid_random_inception"]) and result["lpips_random_vgg"] > 0
  assert 0 < result["codebook_usage"] <= 1
  grid = np.asarray(Image.open(tmp_path / "eval" / "eval_validation_6.png"))
  assert grid.shape == (2 * (32 + 2) + 2, 6 * (32 + 2) + 2, 3)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
  steps = 16
  ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
  _train(ref_dir, steps)
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.Popen(_train_cmd(dir_, steps), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(dir_ / "checkpoints" / "8", proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_logged(dir_))
  assert killed_at < steps
  resumed = _train(dir_, steps)
  assert "resuming from step" in resumed.stderr
  assert _logged(dir_) == _logged(ref_dir)  # bitwise-equal logged losses at every step
  ref_state, state = _final_state(ref_dir, steps), _final_state(dir_, steps)
  # the whole objective's state is checkpointed and resumed (frozen networks are not saved)
  for part in ("proj_params", "disc_params", "disc_state", "disc_opt_state", "lecam"):
    assert jax_leaves(ref_state[part]), part
  assert "frozen" not in ref_state or not jax_leaves(ref_state["frozen"])
  assert abs(float(ref_state["lecam"]["real"])) > 0  # the LeCam EMA did move
  for a, b in zip(jax_leaves(ref_state), jax_leaves(state)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_and_stops_then_resumes(tmp_path):
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  proc = subprocess.Popen(_train_cmd(tmp_path, 400), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(tmp_path / "checkpoints" / "4", proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "preemption notice: saved step" in err
  stopped = int(err.split("preemption notice: saved step ")[1].split()[0])
  assert 4 <= stopped < 400
  assert str(stopped) in os.listdir(tmp_path / "checkpoints")
  resumed = _train(tmp_path, stopped + 2)
  assert f"resuming from step {stopped}" in resumed.stderr


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)
