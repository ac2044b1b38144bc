"""benchmarks/accelerator_check.sh end to end at toy sizes on the CPU (`--cpu-smoke`).

The script exists to be run unattended in a short accelerator window, so what it writes must be
right the first time: every step's JSON well formed and holding measured numbers (not
placeholders), skipped steps saying why, failures recorded without stopping the run, and an
out-of-memory batch falling back to the next smaller one. The smoke run is one subprocess (a
user's command line; one CPU device), shared by the tests below through a module fixture.
"""
import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import require

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

RECORDS = ("00_install.json", "01_environment.json", "02_numerics.json",
           "03_encode_decode.json", "04_train_step.json", "05_generator.json")
SIT_EXISTS = os.path.exists(os.path.join(ROOT, "softvq_jax", "models", "sit.py"))


def _pos(x) -> bool:
  """A real measurement: a finite positive number (not None, NaN, a string or a placeholder 0)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _env():
  env = dict(os.environ, XLA_FLAGS="", PYTHON=sys.executable)  # one CPU device, a plain run
  env.pop("OUT", None)
  return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  require("torch")
  require("timm")
  out = tmp_path_factory.mktemp("accelerator_check")
  t0 = time.time()
  # The smoke needs ~130 CPU-s (about 2 minutes on 2 idle cores); the budget is generous so that
  # a machine shared with other test suites (measured: 390 s at load 12-16) does not turn a
  # slow run into skipped steps. The default 420 s is the GPU run's.
  proc = subprocess.run(["bash", "benchmarks/accelerator_check.sh", "--cpu-smoke", "--budget",
                         "900", "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=1200)
  wall = time.time() - t0
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  records = {}
  for name in RECORDS:
    with open(out / name) as f:
      records[name.split("_", 1)[1][:-5]] = json.load(f)
  with open(out / "summary.md") as f:
    summary = f.read()
  print(f"accelerator_check --cpu-smoke: {wall:.0f} s")
  return {"out": out, "records": records, "summary": summary, "wall": wall}


@pytest.mark.slow
def test_smoke_writes_exactly_the_records_the_device_tool_brings_back(smoke):
  # 8 files at most come back from a device run: 6 JSONs, the summary and the log.
  assert sorted(os.listdir(smoke["out"])) == sorted(RECORDS + ("accelerator_check.log",
                                                               "summary.md"))
  for step, rec in smoke["records"].items():
    assert rec["step"] == step and rec["mode"] == "cpu-smoke", rec
    assert rec["wall_s"] >= 0 and rec["status"] in ("ok", "skipped"), (step, rec)
    if rec["status"] == "skipped":
      assert rec["reason"], rec
  assert smoke["records"]["install"]["reason"].startswith("--cpu-smoke")
  # what the check needs is installed here (CI installs .[test]), so nothing is missing
  assert smoke["records"]["install"]["missing"] == [], smoke["records"]["install"]


@pytest.mark.slow
def test_environment_is_recorded(smoke):
  e = smoke["records"]["environment"]["results"][0]
  assert e["status"] == "ok" and e["jax_backend"] == "cpu" and e["device_count"] == 1
  assert e["versions"]["jax"] and e["versions"]["flax"] and e["versions"]["torch"]
  assert e["devices"][0]["kind"] == "cpu"
  assert _pos(e["cpus"]) and _pos(e["host_memory_bytes"])
  assert _pos(e["matmul_bf16"]["tflop_per_s"]) and _pos(e["matmul_bf16"]["best_s"])
  assert "jaxlib" in e["jax_environment_info"]
  # no CUDA here, and that is said, not left blank
  assert e["jax_cuda"]["reason"] and e["torch_cuda"]["reason"]
  assert e["training_stack_imports"] is True
  assert e["peak_flops_per_device"] is None  # the CPU has no entry in hardware.CHIPS


@pytest.mark.slow
def test_numerics_compare_each_dtype_and_backend_with_the_cpu_float32_result(smoke):
  n = smoke["records"]["numerics"]["results"][0]
  assert n["status"] == "ok" and n["batch"] == 2
  rows = {(r["compute_dtype"], r["attention_backend"], r["matmul_precision"]): r
          for r in n["results"]}
  assert set(rows) == {("float32", "xla", "default"), ("float32", "xla", "highest"),
                       ("bfloat16", "xla", "default"), ("bfloat16", "cudnn", "default")}
  cudnn = rows[("bfloat16", "cudnn", "default")]
  assert cudnn["status"] == "skipped" and "GPU" in cudnn["reason"]
  for key in (("float32", "xla", "default"), ("float32", "xla", "highest"),
              ("bfloat16", "xla", "default")):
    r = rows[key]
    assert r["status"] == "ok" and r["within_tolerance"] and r["finite"], r
    for k in ("tokens_max_abs_err", "decode_max_abs_err", "end_to_end_max_abs_err"):
      assert isinstance(r[k], float) and 0 <= r[k] < 1, (key, k, r[k])
    assert _pos(r["tokens_max_abs_ref"]) and _pos(r["decode_max_abs_ref"])
    assert -1 <= r["token_cosine_min"] <= r["token_cosine_mean"] <= 1 + 1e-9, r
  # float32 on the CPU is the reference's own arithmetic; bfloat16 really ran in bfloat16
  assert rows[("float32", "xla", "highest")]["tokens_max_abs_err"] <= 1e-5
  bf16 = rows[("bfloat16", "xla", "default")]
  assert bf16["tokens_max_abs_err"] > 1e-5 and bf16["decode_max_abs_err"] > 1e-5, bf16
  assert bf16["token_cosine_min"] < 1.0


@pytest.mark.slow
def test_encode_decode_ours_vs_pytorch(smoke):
  unit = smoke["records"]["encode_decode"]["results"][0]
  (case,) = unit["cases"]
  assert case["status"] == "ok" and case["compute_dtype"] == "bfloat16", case
  assert case["batch_size"] == 2 and case["model"] == "SoftVQ-micro/micro-8"
  for fw in ("jax", "torch"):
    assert _pos(case[fw]["encode_img_s"]) and _pos(case[fw]["decode_img_s"]), case[fw]
  assert case["parity_float32"]["encode_max_abs_diff"] <= 1e-3
  assert case["parity_float32"]["decode_max_abs_diff"] <= 1e-3
  assert _pos(case["ratio_jax_over_torch"]["encode"])


@pytest.mark.slow
def test_train_step_pixel_vs_pytorch_and_full_objective(smoke):
  results = {r["objective"]: r for r in smoke["records"]["train_step"]["results"]}
  assert set(results) == {"pixel", "full"}
  pixel, full = results["pixel"], results["full"]
  for r in (pixel, full):
    assert r["status"] == "ok", r
    assert r["batches_tried"] == [{"batch": 4, "status": "ok", "wall_s": r["wall_s"]}]
    assert r["batch_size"] == 4 and r["benchmark"]["compute_dtype"] == "bfloat16"
    # no allocator statistics on the CPU: the reason is recorded, and the host's peak is real
    assert r["device_memory"]["reason"] and _pos(r["device_memory"]["host_peak_rss_bytes"])
  b = pixel["benchmark"]
  for fw in ("jax", "torch"):
    assert _pos(b[fw]["images_per_s"]) and _pos(b[fw]["step_time_s"]), b[fw]
    assert abs(b[fw]["images_per_s"] * b[fw]["step_time_s"] - 4) < 1e-2
  assert _pos(b["step_gflop"]) and _pos(b["jax"]["gflop_per_s"]) and _pos(b["jax_compile_s"])
  assert b["jax"]["mfu"] is None and "cpu" in b["jax"]["mfu_reason"]
  assert _pos(b["jax_memory_analysis"]["total_bytes"])
  f = full["benchmark"]["variants"]["full"]
  assert _pos(f["images_per_s"]) and _pos(f["step_time_s"]) and _pos(f["compile_s"])
  assert f["terms"] == {"perceptual": True, "repa": True, "gan": True}
  assert _pos(f["memory_analysis"]["total_bytes"])
  # the networks of the full objective cost FLOPs and memory on top of the pixel step's
  assert f["step_gflop"] > b["step_gflop"]
  assert f["memory_analysis"]["total_bytes"] > b["jax_memory_analysis"]["total_bytes"]


@pytest.mark.slow
def test_generator_step_is_skipped_until_the_generator_exists(smoke):
  g = smoke["records"]["generator"]
  if SIT_EXISTS:
    assert g["status"] != "skipped" or "budget" in g["reason"], g
  else:
    assert g["status"] == "skipped" and g["reason"].startswith("generator not built"), g


@pytest.mark.slow
def test_summary_shows_the_measured_numbers(smoke):
  s = smoke["summary"]
  for step in ("install", "environment", "numerics", "encode_decode", "train_step",
               "generator"):
    assert f"| {step} |" in s
  b = [r for r in smoke["records"]["train_step"]["results"]
       if r["objective"] == "pixel"][0]["benchmark"]
  assert f"{b['jax']['images_per_s']:.2f}" in s and f"{b['torch']['images_per_s']:.2f}" in s
  case = smoke["records"]["encode_decode"]["results"][0]["cases"][0]
  assert f"{case['jax']['encode_img_s']:.1f}" in s
  for bad in ("nan", "None", "TODO", "inf |"):
    assert bad not in s, bad


def test_short_budget_skips_every_step_saying_why(tmp_path):
  """No time left: every step is skipped at once, each record says so, the summary is written."""
  proc = subprocess.run(["bash", "benchmarks/accelerator_check.sh", "--cpu-smoke", "--budget",
                         "2", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in RECORDS[1:]:
    with open(tmp_path / name) as f:
      rec = json.load(f)
    assert rec["status"] == "skipped", rec
    why = rec.get("reason") or rec["results"][0]["reason"]
    assert "budget" in why or "generator not built" in why, rec
  assert "| train_step | skipped |" in (tmp_path / "summary.md").read_text()


def test_a_failing_unit_is_recorded_with_its_traceback(tmp_path):
  """An exception inside a unit's process becomes its record (type, message, traceback)."""
  import accelerator_check as ac
  driver = ac.Driver(ac.parse_args(["--cpu-smoke", "--out", str(tmp_path)]))
  params = {"model": {"file": "demo", "overrides": {"model.no_such_field": 1}},
            "objective": "pixel", "batch": 2, "repeats": 1, "steps_per_window": 1,
            "warmup_steps": 1}
  r = driver.run_unit("train", params, deadline=time.time() + 120, min_s=1)
  assert r["status"] == "error" and r["rc"] == 0, r
  assert r["error"]["type"] == "KeyError" and "no_such_field" in r["error"]["message"]
  assert "build_config" in r["error"]["traceback_tail"]
  assert "no_such_field" in (tmp_path / "accelerator_check.log").read_text()


def test_out_of_memory_falls_back_to_the_next_smaller_batch(tmp_path, monkeypatch):
  import accelerator_check as ac
  driver = ac.Driver(ac.parse_args(["--cpu-smoke", "--out", str(tmp_path)]))
  calls = []

  def fake_run_unit(unit, params, **kw):
    calls.append((params["objective"], params["batch"]))
    if params["objective"] == "pixel" and params["batch"] == 4:
      try:
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
      except RuntimeError as e:
        return ac.error_record(e)
    if params["objective"] == "full":
      try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
      except RuntimeError as e:
        return ac.error_record(e)
    return {"status": "ok", "benchmark": {}, "wall_s": 1.0}

  monkeypatch.setattr(driver, "run_unit", fake_run_unit)
  rec = driver.step_train_step(time.time() + 100)
  assert calls == [("pixel", 4), ("pixel", 2), ("full", 4), ("full", 2)]
  pixel, full = rec["results"]
  assert pixel["status"] == "ok" and [a["status"] for a in pixel["batches_tried"]] == ["oom", "ok"]
  assert full["status"] == "oom" and "every batch" in full["reason"]
  assert rec["status"] == "partial"
  # a plain error is not an OOM: no smaller batch is tried for it
  assert not ac.is_oom(ValueError("shapes do not match"))


def test_generator_unit_measures_a_model_that_follows_the_contract(monkeypatch):
  """The generator step starts working once softvq_jax/models/sit.py exists: here a stand-in
  module with the documented contract (build_sit(**config.json fields), model(x, t, y))."""
  import types
  import jax.numpy as jnp
  from flax import nnx
  import accelerator_check as ac

  class TinySiT(nnx.Module):
    def __init__(self, *, in_channels, hidden_size, rngs, **_):
      self.inp = nnx.Linear(in_channels, hidden_size, rngs=rngs)
      self.out = nnx.Linear(hidden_size, in_channels, rngs=rngs)
      self.emb = nnx.Embed(1001, hidden_size, rngs=rngs)

    def __call__(self, x, t, y):  # [B, ..., C], [B], [B] -> [B, ..., C]
      c = self.emb(y) + t[:, None]
      h = self.inp(x) + c.reshape(c.shape[0], *([1] * (x.ndim - 2)), -1)
      return self.out(jnp.tanh(h))

  def build_sit(*, input_size, patch_size, in_channels, hidden_size, depth, num_heads, vae_1d,
                rngs, **kw):
    assert (patch_size == 1) == vae_1d and depth == 2 and num_heads == 2 and input_size > 0
    return TinySiT(in_channels=in_channels, hidden_size=hidden_size, rngs=rngs)

  monkeypatch.setitem(sys.modules, "softvq_jax.models.sit",
                      types.SimpleNamespace(build_sit=build_sit))
  r = ac.unit_generator(ac.PLANS["cpu-smoke"]["generator"], deadline=time.time() + 120,
                        smoke=True)
  assert r["status"] == "ok", r
  one_d, two_d = r["cases"]
  assert one_d["sequence_length"] == 8 and two_d["sequence_length"] == 16  # 8 tokens; 8x8 / 2^2
  for c in (one_d, two_d):
    assert _pos(c["forward_s"]) and _pos(c["images_per_s"]) and c["cfg_batch"] == 4
    assert abs(c["images_per_s"] - 2 / (4 * c["forward_s"])) < 1e-9 * c["images_per_s"]
  assert _pos(r["ratio_1d_over_2d"])

  # a module without the contract's entry point is an error naming it, not a silent skip
  monkeypatch.setitem(sys.modules, "softvq_jax.models.sit", types.SimpleNamespace())
  with pytest.raises(AttributeError, match="build_sit"):
    ac.unit_generator(ac.PLANS["cpu-smoke"]["generator"], deadline=time.time() + 60, smoke=True)


def test_a_unit_past_its_deadline_is_killed_and_recorded(tmp_path):
  """The budget is enforced from outside: a unit still running at its deadline is killed (its
  own process group only) and recorded as a timeout; the driver goes on."""
  import accelerator_check as ac
  driver = ac.Driver(ac.parse_args(["--cpu-smoke", "--out", str(tmp_path)]))
  t0 = time.time()
  r = driver.run_unit("environment", {}, deadline=time.time() + 1.0, min_s=0.5)
  assert r["status"] == "timeout" and r["reason"].startswith("killed after"), r
  assert time.time() - t0 < 30 and r["rc"] != 0
