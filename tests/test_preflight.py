"""The pre-flight (softvq_jax/preflight.py) and main's handling of user errors: every problem of a
real-run command reported together, in seconds, before any compilation; single user errors as one
line with exit status 2; --help exits 0."""
import os
import subprocess
import sys
import time

import pytest

from conftest import config_file, tiny_config, ONE_DEVICE_XLA_FLAGS
from softvq_jax import fetch, preflight

ROOT = os.path.join(os.path.dirname(__file__), "..")


_config = config_file


def _main(*args, env=None, timeout=120):
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "softvq_jax.main", *args], cwd=ROOT,
                        env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                        timeout=timeout)
  return proc, time.time() - start


def test_headline_command_reports_everything_missing_at_once_before_compiling(tmp_path):
  """The released recipe on a machine without ImageNet and without the frozen networks, with an
  unwritable workdir, a batch that does not split over the 8 devices and a bad value."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  proc, seconds = _main(
      "--config=configs/sq64_512.py", f"--workdir={blocker}/run",
      "--config.data.source=folder", f"--config.data.path={tmp_path / 'imagenet'}",
      "--config.batch_size=3", "--config.optim.lr=-1",
      f"--config.pretrained.cache_dir={tmp_path / 'cache'}", "--config.pretrained.auto_fetch=False",
      env={"JAX_LOG_COMPILES": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  err = proc.stderr
  assert proc.returncode == 2, err[-3000:]
  assert "Traceback" not in err
  assert "cannot start, 7 problems:" in err, err
  for expected in (
      "config.optim.lr: must be > 0",
      f"config.data.path={tmp_path / 'imagenet'} does not exist",
      "$IMAGENET/train/<class>/<image>.JPEG",
      f"--workdir={blocker}/run is not writable",
      "config.batch_size=3 is not divisible by the 8 devices",
      "config.pretrained.lpips is empty", "config.pretrained.dino is empty",
      "config.pretrained.repa_teacher is empty",
      "python -m softvq_jax.pretrained fetch --only=repa_teacher"):
    assert expected in err, (expected, err)
  # Nothing heavy happened: no JAX compilation, no model, nothing written.
  assert "Compiling" not in err and "Finished tracing" not in err
  assert not (tmp_path / "cache").exists()
  # Idle 2-core machine: ~4 s, nearly all of it importing jax; generous for a loaded CI runner.
  assert seconds < 30, seconds


def test_imagenet_tfds_message_says_how_to_prepare_it_and_what_will_be_fetched(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  config = _config("sq64_512")
  config.pretrained.cache_dir = str(tmp_path / "cache")
  assert config.data.source == "tfds" and config.pretrained.auto_fetch
  with pytest.raises(preflight.PreflightError) as e:
    preflight.run(config, str(tmp_path / "w"), "train", num_devices=8, num_processes=1)
  msg = str(e.value)
  assert (f"tfds build imagenet2012 --data_dir={tmp_path / 'tfds'} --manual_dir=$MANUAL_DIR "
          "--file_format=array_record") in msg
  assert "--config.data.source=folder" in msg
  # Fetchable networks are not fetched while something else is wrong; the message says they
  # will be, and how to fetch them now.
  assert "python -m softvq_jax.pretrained fetch --only=lpips,dino,repa_teacher" in msg
  assert not (tmp_path / "cache").exists()


def _touch(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"")


def test_tfds_array_record_files_are_found_and_tfrecord_is_named(tmp_path):
  config = tiny_config()
  config.data.source, config.data.path = "tfds", str(tmp_path)
  version = tmp_path / "imagenet2012" / "5.1.0"
  _touch(version / "imagenet2012-train.array_record-00000-of-00002")
  _touch(version / "imagenet2012-validation.tfrecord-00000-of-00001")
  problems = preflight.check_data(config, "train")
  assert len(problems) == 1 and "'validation'" in problems[0], problems
  assert f"tfds convert_format --dataset_dir={version}" in problems[0]
  _touch(version / "imagenet2012-validation.array_record-00000-of-00001")
  assert preflight.check_data(config, "train") == []
  config.latents.split = "train[:1%]"  # a sliced split reads the files of its split
  assert preflight.check_data(config, "stats") == []


def test_image_folder_layouts(tmp_path):
  config = tiny_config()
  config.data.source, config.data.path = "folder", str(tmp_path)
  _touch(tmp_path / "train" / "n01" / "a.JPEG")
  (tmp_path / "val" / "n01").mkdir(parents=True)
  problems = preflight.check_data(config, "train")
  assert len(problems) == 1 and f"no image files in {tmp_path / 'val'}" in problems[0], problems
  _touch(tmp_path / "val" / "n01" / "b.jpg")
  assert preflight.check_data(config, "train") == []
  config.data.path = ""
  assert "needs config.data.path" in preflight.check_data(config, "eval")[0]
  config.data.source = "demo"
  assert preflight.check_data(config, "train") == []


def test_networks_follow_the_loss_weights_and_the_mode(tmp_path):
  config = _config("sq64_256", "B")
  config.pretrained.cache_dir = str(tmp_path)
  config.pretrained.auto_fetch = False
  assert preflight.networks_needed(config, "train") == ["lpips", "dino", "repa_teacher"]
  assert preflight.networks_needed(config, "eval") == ["inception", "lpips"]
  assert preflight.networks_needed(config, "stats") == []
  config.loss.gan_weight = config.loss.repa_weight = 0.0
  config.eval.every_steps = 1000
  assert preflight.networks_needed(config, "train") == ["lpips", "inception"]
  config.loss.perceptual_weight = 0.0
  config.eval.every_steps = 0
  assert preflight.check_pretrained(config, "train") == ([], [])
  # A configured path that does not exist; a cached file; random init.
  config.loss.perceptual_weight = 1.0
  config.pretrained.lpips = str(tmp_path / "nope.safetensors")
  problems, _ = preflight.check_pretrained(config, "train")
  assert problems and "nope.safetensors does not exist" in problems[0]
  config.pretrained.lpips = ""
  (tmp_path / fetch.NETWORKS["lpips"].file).write_bytes(b"x")
  assert preflight.check_pretrained(config, "train") == ([], [])
  config.pretrained.allow_random_init = True
  assert preflight.check_pretrained(config, "eval") == ([], [])


def test_batch_size_vs_devices_names_the_field():
  config = tiny_config()
  assert preflight.check_devices(config, "train", 8, 1) == []
  config.batch_size = 12
  (msg,) = preflight.check_devices(config, "train", 8, 1)
  assert "config.batch_size=12 is not divisible by the 8 devices" in msg
  assert "--config.batch_size=8 or 16" in msg
  config.batch_size, config.mesh_shape = 8, (2, 2, 2)
  assert preflight.check_devices(config, "train", 8, 1) == []  # 4 batch shards
  config.mesh_shape = (3, -1, 1)
  assert "does not fit the 8 devices" in preflight.check_devices(config, "train", 8, 1)[0]
  config.mesh_shape, config.latents.batch_size = (-1, 1, 1), 6
  assert "config.latents.batch_size=6" in preflight.check_devices(config, "stats", 8, 1)[0]
  config.eval.batch_size = 4
  assert "config.eval.batch_size=4" in preflight.check_devices(config, "eval", 8, 1)[0]
  assert preflight.check_devices(config, "compile", 8, 1) == []


def test_workdir_must_be_writable(tmp_path):
  assert preflight.check_workdir(str(tmp_path / "new" / "dir")) == []
  assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())
  (tmp_path / "f").write_text("")
  assert "is not writable" in preflight.check_workdir(str(tmp_path / "f" / "run"))[0]


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
  """A missing config file, a bad config value, missing data, missing --workdir, an unknown
  config field: one line on stderr, status 2, no traceback. --help exits 0."""
  work = f"--workdir={tmp_path / 'w'}"
  cases = {
      "missing config file": (["--config=configs/nope.py", work], "no such file"),
      "bad value": (["--config=configs/demo.py", work, "--config.optim.lr=-1"],
                    "config.optim.lr: must be > 0, got -1.0"),
      "missing data": (["--config=configs/demo.py", work, "--config.data.source=folder",
                        f"--config.data.path={tmp_path / 'nodata'}"],
                       f"config.data.path={tmp_path / 'nodata'} does not exist"),
      "missing workdir": (["--config=configs/demo.py"], "--workdir is required"),
      "unknown field": (["--config=configs/demo.py", work, "--config.optim.lrr=1"],
                        'no field config.optim.lrr (Did you mean "lr"'),
  }
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  procs = {name: subprocess.Popen([sys.executable, "-m", "softvq_jax.main", *args], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
           for name, (args, _) in cases.items()}
  procs["help"] = subprocess.Popen([sys.executable, "-m", "softvq_jax.main", "--help"], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
  results = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
  for name, (_, expected) in cases.items():
    (out, err), rc = results[name]
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, (name, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert expected in lines[0], (name, lines[0])
  (out, err), rc = results["help"]
  assert rc == 0 and "--workdir" in out + err
