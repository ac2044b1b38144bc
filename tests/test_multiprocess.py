"""Multi-process training on one machine: 2 processes x 4 fake CPU devices joined by
jax.distributed on 127.0.0.1 (launch/local_cpu.sh, exactly as a user runs it), against a
single-process 8-device run of the same global batches.

Why a reference with the *same global batches*: each process reads its own shard of the data
(records p, p+2, p+4, ... shuffled per shard), so a plain one-process run would see other batches.
The reference (this file run as a script, `--reference`) builds the two per-process pipelines and
concatenates their batches in process order, which is how `make_array_from_process_local_data`
lays the 2 x 4 local rows onto the 8-device mesh.

Tolerance vs the reference (not bitwise): the gradient all-reduce over 8 devices is summed in a
different order when it crosses processes (gloo: per-process partial sums, then across processes)
than inside one process, so results differ in the last float32 bits: at the first logged step
by <= 2e-7 relative, then growing as Adam amplifies them (measured over 12 steps: loss/total <= 5e-5,
loss/entropy <= 5.4e-4, grad_norm <= 5e-3 relative; parameters <= 1.1e-4 absolute). A wrong shard order or a
missing cross-process reduction changes the very first loss by far more than 1e-5.
The resume check below is bitwise: it compares two multi-process runs with the same reduction order.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STEPS, CKPT_EVERY, LOG_EVERY, NPROC, DEVICES_PER_PROC = 12, 4, 2, 2, 4

# conftest.tiny_config() fields passed as --config overrides of configs/demo.py (as test_main.py).
_TINY_KEYS = ("image_size", "model.encoder_size", "model.decoder_size", "model.num_latent_tokens",
              "model.num_codebooks", "model.codebook_size", "model.codebook_embed_dim",
              "batch_size", "optim.warmup_steps", "num_grid_images", "data.demo_train_size",
              "data.demo_eval_size", "data.num_threads", "eval.every_steps")


def _config_flags():
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  out = ["--config=configs/demo.py"]
  for key in _TINY_KEYS:
    value = config
    for part in key.split("."):
      value = value[part]
    out.append(f"--config.{key}={value}")
  # The objective and optimizer of the tests' configuration, pinned (the demo's own schedule is
  # sized for its run): LPIPS on without dropout, GAN computed but not yet active.
  out += ["--config.optim.lr=0.002", "--config.optim.ema_decay=0.99",
          "--config.loss.perceptual_weight=1.0", "--config.loss.perceptual_dropout=0.0",
          "--config.loss.perceptual_warmup_steps=100", "--config.loss.disc_start=300"]
  return out + [f"--config.num_train_steps={STEPS}", f"--config.log_every_steps={LOG_EVERY}",
                f"--config.checkpoint_every_steps={CKPT_EVERY}",
                f"--config.image_every_steps={CKPT_EVERY}", "--config.keep_checkpoints=3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_cmd(workdir, log_dir):
  return (["bash", os.path.join(ROOT, "launch", "local_cpu.sh"), f"--num-processes={NPROC}",
           f"--devices-per-process={DEVICES_PER_PROC}", f"--port={_free_port()}",
           f"--log-dir={log_dir}", f"--python={sys.executable}", "--", f"--workdir={workdir}",
           # --v=1: every process also gets clu's logging writer ("Got images" when it receives a
           # grid), which the quiet default leaves out; the image checks below read it.
           "--v=1"]
          + _config_flags())


def _metrics_lines(workdir):
  out = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    out.append((m.pop("step"), {k: v for k, v in m.items() if not k.startswith("perf/")}))
  return out


def _state(step_dir):
  """(key path, numpy array) of every TrainState leaf, restored onto one CPU device (a checkpoint
  written by 2 processes needs an explicit target sharding to be read by one)."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(step_dir / "state").item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    tree = c.restore(step_dir / "state", target)
  return [(k, np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _group_gone(pgid, timeout=30.0) -> bool:
  start = time.time()
  while time.time() - start < timeout:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return True
    time.sleep(0.1)
  return False


@pytest.mark.slow
def test_two_process_cpu_training_matches_one_process_and_resumes_after_kill_9(tmp_path):
  wd, ref_wd = tmp_path / "run", tmp_path / "reference"
  ref_log = open(tmp_path / "reference.log", "w")  # pylint: disable=consider-using-with
  ref = subprocess.Popen(  # runs alongside the first multi-process run (they mostly wait on I/O)
      [sys.executable, os.path.abspath(__file__), "--reference", f"--workdir={ref_wd}"]
      + _config_flags(), cwd=ROOT, stdout=ref_log, stderr=subprocess.STDOUT,
      env=dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}",
               JAX_PLATFORMS="cpu"))
  try:
    # 1. Two processes; kill -9 the whole launch (launcher + both trainers) once step 8's
    #    checkpoint is complete.
    run = subprocess.Popen(_launch_cmd(wd, tmp_path / "logs_a"), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    start = time.time()
    while not (wd / "checkpoints" / "8").exists():
      assert run.poll() is None, (tmp_path / "logs_a" / "process_0.log").read_text()[-3000:]
      assert time.time() - start < 600, "no checkpoint at step 8 within 10 minutes"
      time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert _group_gone(run.pid), "a training process survived kill -9 of its process group"
    logs_a = {p: (tmp_path / "logs_a" / f"process_{p}.log").read_text() for p in range(NPROC)}
    for p in range(NPROC):
      assert f"jax.distributed: process {p} of {NPROC}, {DEVICES_PER_PROC} local / " \
             f"{NPROC * DEVICES_PER_PROC} global devices" in logs_a[p]
    for p in range(NPROC):  # conftest sets a cache dir: main._no_one_sided_compilation_cache
      assert "persistent compilation cache" in logs_a[p] and "turned off" in logs_a[p]
    first = _metrics_lines(wd)
    first_steps = [s for s, _ in first]
    assert first_steps == sorted(set(first_steps)), f"a step was logged twice: {first_steps}"
    assert 8 in first_steps and STEPS not in first_steps, first_steps

    # Keep the uninterrupted run's step-8 checkpoint aside, so the restart resumes from step 4
    # and recomputes steps 5-8: both must give bitwise the same state and logged metrics.
    shutil.move(wd / "checkpoints" / "8", tmp_path / "uninterrupted_8")
    assert sorted(os.listdir(wd / "checkpoints")) == ["4"]

    # 2. The same command again: it resumes from the newest checkpoint by itself.
    proc = subprocess.run(_launch_cmd(wd, tmp_path / "logs_b"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    logs_b = {p: (tmp_path / "logs_b" / f"process_{p}.log").read_text() for p in range(NPROC)}
    assert proc.returncode == 0, proc.stderr[-2000:] + logs_b[0][-3000:] + logs_b[1][-3000:]
    assert "resuming from step 4" in logs_b[0]
    lines = _metrics_lines(wd)
    second = lines[len(first):]
    assert [s for s, _ in second] == list(range(CKPT_EVERY + LOG_EVERY, STEPS + 1, LOG_EVERY))
    redone = [s for s, _ in second if s in first_steps]
    assert redone == [6, 8]
    for s in redone:  # resumed == uninterrupted, bitwise, every logged metric
      assert dict(second)[s] == dict(first)[s], s
    resumed_8, uninterrupted_8 = _state(wd / "checkpoints" / "8"), _state(tmp_path / "uninterrupted_8")
    assert [k for k, _ in resumed_8] == [k for k, _ in uninterrupted_8]
    for (key, a), (_, b) in zip(resumed_8, uninterrupted_8):
      np.testing.assert_array_equal(a, b, err_msg=str(key))

    # Only process 0 writes logs, metrics and images: one TensorBoard file per launch (process 1
    # would add its own), each step once per launch in metrics.jsonl (checked above), and only
    # process 0's writer received the image grids. The "before" grid is written by the fresh launch
    # only (step 0), not again by the resumed one.
    assert len(list(wd.glob("events.out.tfevents.*"))) == 2
    assert sorted(os.listdir(wd / "images")) == [f"recon_{s:08d}.png" for s in (0, 4, 8, 12)]
    assert "Got images" in logs_b[0] and "Got images" not in logs_b[1]
    assert "Got images" not in logs_a[1]

    # One data-iterator state per process in the checkpoint, each at its own shard position
    # (step * local batch: every process consumed exactly its 4 images per step).
    data_dir = wd / "checkpoints" / str(STEPS) / "data"
    states = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
    assert states == [f"process_{p}-of-{NPROC}.json" for p in range(NPROC)]
    for f in states:
      state = json.loads((data_dir / f).read_text())
      assert state["grain"]["next_index"] == STEPS * 8 // NPROC, (f, state)

    # 3. Two processes == one process over the same global batches (see the module docstring).
    assert ref.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    reference = dict(_metrics_lines(ref_wd))
    merged = dict(first)
    merged.update(dict(second))
    assert sorted(merged) == sorted(reference) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for s in reference:
      # (the reference's hand-made iterator has no skipped-file counter: no "data/skipped")
      assert set(reference[s]) == set(merged[s]) - {"data/skipped"}, s
      for k, v in reference[s].items():
        # Tolerances (see the module docstring): the first window only differs by the reduction
        # order; later steps carry Adam-amplified rounding differences (measured max rel. diff over
        # 12 steps: loss/total 5e-5, loss/entropy 5.4e-4, grad_norm 5e-3; params 1.1e-4 abs.).
        rtol = 1e-5 if s == LOG_EVERY else 5e-4 if k == "loss/total" else 5e-2
        np.testing.assert_allclose(merged[s][k], v, rtol=rtol, atol=1e-7, err_msg=f"step {s} {k}")
    final, ref_final = _state(wd / "checkpoints" / str(STEPS)), _state(ref_wd / "checkpoints" / str(STEPS))
    assert [k for k, _ in final] == [k for k, _ in ref_final]
    for (key, a), (_, b) in zip(final, ref_final):
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-3, err_msg=str(key))
  finally:
    if ref.poll() is None:
      ref.kill()
    ref_log.close()


def test_two_process_eval_with_a_fid_cache_only_process_0_sees(tmp_path):
  """Hosts that share no file system: the workdir is gs://bucket/run, which each process reads
  from a folder of its own (tests/fake_gcs.py), and only process 0's holds the cached real FID
  statistics. Process 0 must decide for all: when each process decided by itself, process 1 ran
  the real images' Inception pass that process 0 skipped, and the mismatched collectives hung.
  Both processes must report the same numbers, computed with process 0's cache."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from softvq_jax import evaluate, metrics  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import official  # pylint: disable=import-outside-toplevel
  from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  tokenizer_dir = tmp_path / "tokenizer"  # a random tiny tokenizer, on a disk both processes see
  official.export_official(build_tokenizer(TokenizerConfig.from_config(config), seed=0),
                           str(tokenizer_dir))
  gcs = tmp_path / "gcs"  # gs://bucket/x is gcs/p<process>/bucket/x
  name = evaluate.fid_stats_name(config.data, split=config.data.eval_split,
                                 image_size=config.image_size, num_images=8, random_inception=True)
  cache = gcs / "p0" / "bucket" / "run" / "fid_stats" / name
  # Far from any Inception features (mean 100 in every dimension), so its use shows in the rFID.
  metrics.save_stats(str(cache), np.full((2048,), 100.0), np.eye(2048), 8)
  cache_bytes = cache.read_bytes()
  python = tmp_path / "python_with_fake_gcs"
  python.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} "
                    f"{os.path.join(ROOT, 'tests', 'fake_gcs.py')} \"$@\"\n")
  python.chmod(0o755)
  cmd = (["bash", os.path.join(ROOT, "launch", "local_cpu.sh"), f"--num-processes={NPROC}",
          f"--devices-per-process={DEVICES_PER_PROC}", f"--port={_free_port()}",
          f"--log-dir={tmp_path / 'logs'}", f"--python={python}", "--",
          "--workdir=gs://bucket/run", "--mode=eval", f"--checkpoint={tokenizer_dir}"]
         # (the config by absolute path: the processes run in tmp_path, where a stray local
         # `gs:` directory would show)
         + [f"--config={os.path.join(ROOT, 'configs', 'demo.py')}"] + _config_flags()[1:]
         + ["--config.eval.batch_size=8", "--config.eval.num_images=8",
            "--config.pretrained.allow_random_init=True"])
  proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, FAKE_GCS_ROOT=str(gcs)),
                        capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / "logs" / f"process_{p}.log").read_text() for p in range(NPROC)]
  assert proc.returncode == 0, proc.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
  results = []
  for log in logs:
    result = json.loads([l for l in log.splitlines() if l.startswith("{")][-1])
    for timing in ("eval_seconds", "images_per_s"):
      del result[timing]
    results.append(result)
  assert results[0] == results[1], "the processes report different numbers"
  assert results[0]["num_images"] == 8
  assert results[0]["rfid_random_inception"] > 1e6, "process 0's cached statistics were not used"
  assert cache.read_bytes() == cache_bytes
  assert not (gcs / "p1" / "bucket" / "run" / "fid_stats").exists()
  assert sorted(os.listdir(gcs / "p0" / "bucket" / "run" / "eval")) == [
      "eval_validation_8.json", "eval_validation_8.png"]  # written by process 0 only
  assert not (gcs / "p1" / "bucket" / "run" / "eval").exists()
  assert not (tmp_path / "gs:").exists()


def test_each_process_reads_a_disjoint_shard():
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from softvq_jax import data  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  n = config.data.demo_train_size
  seen = []
  for p in range(NPROC):
    it = data.build_train_pipeline(config.data, image_size=config.image_size,
                                   global_batch_size=config.batch_size, seed=config.seed,
                                   process_index=p, process_count=NPROC)
    # one epoch of this process's shard: n / NPROC records in batches of batch_size / NPROC
    idx = np.concatenate([next(it)["index"] for _ in range(n // config.batch_size)])
    assert len(set(idx.tolist())) == n // NPROC, f"process {p} repeated records within an epoch"
    seen.append(set(idx.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(n))


# ------------------------------------------------------------------------------------------------
# The single-process reference run (python tests/test_multiprocess.py --reference ...).
# ------------------------------------------------------------------------------------------------


def _reference_main(argv):
  """Trains on 8 devices in one process, fed the concatenated batches of the NPROC per-process
  pipelines (process order = device order of the mesh)."""
  del argv
  import grain  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from softvq_jax import data, train  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_threefry_partitionable", True)  # as softvq_jax.main does
  config = flags.FLAGS.config
  assert jax.device_count() == NPROC * DEVICES_PER_PROC

  class ConcatIterator(grain.DatasetIterator):
    def __init__(self, its):
      super().__init__(its[0])
      self._its = its

    def __next__(self):
      return {"image": np.concatenate([next(i)["image"] for i in self._its])}

    def get_state(self):
      return {"processes": [i.get_state() for i in self._its]}

    def set_state(self, state):
      for i, s in zip(self._its, state["processes"]):
        i.set_state(s)

  its = [data.build_train_pipeline(config.data, image_size=config.image_size,
                                   global_batch_size=config.batch_size, seed=config.seed,
                                   process_index=p, process_count=NPROC) for p in range(NPROC)]
  train.train_and_evaluate(config, flags.FLAGS.workdir, train_iter=ConcatIterator(its))


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  from absl import app, flags as absl_flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "ml_collections config file")
  absl_flags.DEFINE_string("workdir", None, "output directory")
  absl_flags.DEFINE_bool("reference", False, "run the single-process reference")
  app.run(_reference_main)
