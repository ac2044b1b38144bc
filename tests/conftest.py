"""Test-wide setup: 8 fake CPU devices (set before jax is imported) and the torch requirement.

`SOFTVQ_REQUIRE_TORCH=1` (set by CI) turns a missing torch/timm into a failure instead of a skip,
so parity tests can never silently stop running.
"""
import os
import tempfile

# LLVM -O0 for every test program, here and in the subprocesses the tests start (pass
# ONE_DEVICE_XLA_FLAGS where a test wants a plain one-device run): the tests check code paths and
# numerics, not speed, and most of their time is compilation (measured, 2-core CPU: the tiny pixel
# train step compiles in 9.7 instead of 16.4 CPU-s, the full objective's in 103 instead of ~125).
# XLA's HLO passes are unchanged; only the machine code is less optimised.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
ONE_DEVICE_XLA_FLAGS = TEST_XLA_FLAGS
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, inherited by the subprocess tests:
# the same train step / Inception / LPIPS programs are compiled by many tests (measured: most of
# a CLI test's time is compilation on a 2-core CPU).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="softvq_test_jax_cache_")

# Fetched pretrained networks are looked up in the user's cache when a config field is empty
# (softvq_jax/fetch.py): tests must not see whatever this machine's user has fetched.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="softvq_test_cache_home_")

import importlib  # noqa: E402

import pytest  # noqa: E402

# timm must be imported before TensorFlow (which the trainer's clu metric writers import): in the
# other order the process segfaults at timm's import (measured with tensorflow-cpu 2.21, torch
# 2.14.1, timm 1.0.31). Tests of both kinds share one pytest process, so import it first here.
try:
  import timm  # noqa: E402,F401  # pylint: disable=unused-import
except ImportError:
  pass


def require(module_name: str):
  """Imports an optional test dependency; skips (or fails under SOFTVQ_REQUIRE_TORCH=1) if absent."""
  try:
    return importlib.import_module(module_name)
  except ImportError as e:
    if os.environ.get("SOFTVQ_REQUIRE_TORCH") == "1":
      pytest.fail(f"{module_name} is required (SOFTVQ_REQUIRE_TORCH=1) but cannot be imported: {e}")
    pytest.skip(f"{module_name} not installed")


def config_file(name: str, *args):
  """configs/<name>.py's get_config(*args): what --config=configs/<name>.py[:arg] builds."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"{name}_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(*args)


def tiny_config():
  """configs/demo.py shrunk for fast CPU tests: 32 px, 2-block ViTs, batch 8 (one per device)."""
  config = config_file("demo")
  config.image_size = 32
  config.model.encoder_size = config.model.decoder_size = "micro"
  config.model.num_latent_tokens = 8
  config.model.num_codebooks = 2
  config.model.codebook_size = 64
  config.model.codebook_embed_dim = 16
  config.batch_size = 8
  config.num_train_steps = 100
  config.log_every_steps = 50
  config.optim.warmup_steps = 2
  config.optim.lr = 2e-3
  config.optim.ema_decay = 0.99
  config.num_grid_images = 2
  config.data.demo_train_size = 64
  config.data.demo_eval_size = 8
  config.data.num_threads = 2
  # the full objective, active from the first steps (GAN from step 2)
  config.disc.img_size = 32
  config.loss.disc_start = 2
  config.loss.perceptual_weight = 1.0  # the demo turns LPIPS off; the tests keep all terms
  config.loss.perceptual_warmup_steps = 4
  # LPIPS head dropout off: the exactness tests (meshes, accumulation) compare deterministic
  # losses at fp32 rounding; the dropout itself is tested in tests/test_lpips.py.
  config.loss.perceptual_dropout = 0.0
  config.eval.every_steps = 0  # the in-loop evaluation has its own tests
  return config


# Costliest files first (measured CPU time, most first). Under `pytest -n 2 --dist loadfile` (the
# README's command) each file runs whole on one worker and workers take files in collection order,
# so starting with the long ones keeps one worker from finishing a long file alone at the end.
_COSTLIEST_FIRST = ("test_multiprocess.py", "test_main.py", "test_train.py", "test_accelerator_check.py",
                    "test_objective.py", "test_demo.py", "test_gen_eval.py", "test_gcs.py",
                    "test_generator_train.py", "test_compile.py", "test_tokenizer.py",
                    "test_evaluate.py", "test_latents.py", "test_generate.py")


def pytest_configure(config):
  # Two tiers. The README's test command runs everything but `slow`; CI (.ci/run) runs it and then
  # `-m slow`: the end-to-end tests that each cost one to five CPU-minutes (measured per test,
  # SOFTVQ_TEST_CPU_JSON): kill -9 / SIGTERM resume through the CLI (tokenizer and generator), two
  # processes, mesh equivalence, restore onto another mesh, FSDP bytes, gradient accumulation
  # with LPIPS, the adaptive weight, the generator-eval and eval-benchmark CLIs, the accelerator
  # smoke and the demo run. The default tier keeps a cheaper test of most of these behaviours
  # (in-process resume, FSDP compile and sharding, accumulation without LPIPS, 2-process eval).
  config.addinivalue_line("markers", "slow: minutes each on 2 CPU cores; CI runs them after the "
                          "README's test command (pytest -m slow)")
  # xdist (>= 3.6) reorders files by their number of tests unless told not to; keep ours.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _COSTLIEST_FIRST.index(name) if name in _COSTLIEST_FIRST else len(_COSTLIEST_FIRST)
  items.sort(key=rank)  # stable: the order within a file is kept


# CPU seconds per test (this process + the subprocesses it waited for), printed beside pytest's
# wall-clock --durations: wall time on a shared 2-core machine says more about the load than about
# the test, CPU time says what a test costs. Sent back as a user property, so it works under xdist.
def _cpu_seconds() -> float:
  import resource  # pylint: disable=import-outside-toplevel
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_CPU_START = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  item.stash[_CPU_START] = _cpu_seconds()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
  if call.when == "teardown" and _CPU_START in item.stash:
    item.user_properties.append(("cpu_seconds", _cpu_seconds() - item.stash[_CPU_START]))


_CPU_BY_TEST: dict[str, float] = {}


def pytest_runtest_logreport(report):
  for name, value in report.user_properties:
    if name == "cpu_seconds" and report.when == "teardown":
      _CPU_BY_TEST[report.nodeid] = value


def pytest_terminal_summary(terminalreporter):
  if not _CPU_BY_TEST:
    return
  if os.environ.get("SOFTVQ_TEST_CPU_JSON"):  # every test's CPU seconds, for planning the suite
    import json  # pylint: disable=import-outside-toplevel
    with open(os.environ["SOFTVQ_TEST_CPU_JSON"], "w", encoding="utf-8") as f:
      json.dump(_CPU_BY_TEST, f, indent=1, sort_keys=True)
  top = sorted(_CPU_BY_TEST.items(), key=lambda kv: -kv[1])[:15]
  terminalreporter.section(f"CPU seconds: {sum(_CPU_BY_TEST.values()):.0f} in all; the 15 costliest")
  for nodeid, seconds in top:
    terminalreporter.write_line(f"{seconds:8.1f}s  {nodeid}")
