"""Everything GPU/TPU-specific about softvq_jax, measured by one bounded command (issue 20).

  bash benchmarks/accelerator_check.sh                         # on the accelerator machine
  bash benchmarks/accelerator_check.sh --budget 540 --out /tmp/acc --steps numerics,train_step
  bash benchmarks/accelerator_check.sh --cpu-smoke --out /tmp/acc_smoke   # toy sizes, CPU, CI

Why it exists: accelerator time comes in short windows (minutes, start-up included) with no time
to improvise, so every measurement is prepared, tested on the CPU (`--cpu-smoke`, in the test
suite) and bounded by a total time budget. Steps, in order, each skipped with a recorded reason
when too little budget is left, and each recorded even when it fails:

  0. install      what the check imports and is missing (online: pip at setup.py's pins, and
                  `jax[cudaNN]` when jax does not see the GPU; offline: the wheels of --wheels
                  DIR, which accelerator_wheels.sh makes); never in --cpu-smoke
  1. environment  jax/jaxlib/CUDA/cuDNN/torch versions, devices, memory, a bf16 matmul's rate
  2. numerics     a random official-format checkpoint through `load_tokenizer` on the device vs
                  the float32 CPU result: fp32 (default and highest matmul precision) and bf16,
                  attention backends xla and cudnn (cudnn: GPU and 16-bit only)
  3. encode_decode  benchmarks/encode_decode.py: ours vs PyTorch (autocast, SDPA), bf16,
                  SoftVQ-B-64 / L-64 at 256 px, batch 64 / 128
  4. train_step   benchmarks/train_step.py: pixel objective ours vs PyTorch, full objective ours
                  (random frozen networks), bf16, the largest batch of a short list that fits
                  (out of memory -> the next smaller one), MFU, peak memory
  5. generator    SiT-XL/1 on 64 tokens vs SiT-XL/2 on 32x32x4, when softvq_jax/models/sit.py
                  exists (else skipped: "generator not built")

Output (`--out`, else $OUT, else /tmp/accelerator_check): one JSON per step
(00_install.json ... 05_generator.json), summary.md, and accelerator_check.log (every
subprocess's output) — 8 files, what the device tool brings back.

--cpu-smoke compiles with XLA's backend optimisation level 0 and a lighter GAN (see PLANS): its
numbers test the code paths, not speed.

Design: the driver imports nothing heavy (it must report a broken jax, not die of it). Each
measurement ("unit") runs in its own Python subprocess with a hard timeout: an OOM or a crash
cannot poison the next unit's allocator, the device's peak memory belongs to one measurement,
and a hang costs no more than its step's share of the budget. Units reuse the benchmark
modules (encode_decode.run, train_step.run / run_objective); this file adds orchestration,
numerics and the environment record only.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

STEPS = ("environment", "numerics", "encode_decode", "train_step", "generator")
LOG_NAME = "accelerator_check.log"
SIT_PATH = os.path.join(ROOT, "softvq_jax", "models", "sit.py")
# Distributions the check itself imports (the rest of `.[test]` — TensorFlow, clu, lpips, ... — is
# not needed to measure and is not worth carrying to an offline machine).
NEEDED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections",
          "absl-py", "numpy", "ml-dtypes", "pillow", "etils", "torch", "timm")

# What each mode measures. GPU sizes are the released SoftVQ-{B,L}-64 at 256 px; the smoke sizes
# are the tests' micro model (tests/conftest.py::tiny_config), which exercises the same code.
SMOKE_OVERRIDES = {
    "image_size": 32, "model.encoder_size": "micro", "model.decoder_size": "micro",
    "model.num_latent_tokens": 8, "model.num_codebooks": 2, "model.codebook_size": 64,
    "model.codebook_embed_dim": 16, "disc.img_size": 32, "num_train_steps": 100,
    "optim.warmup_steps": 2,
}
# The released recipe's weights of the three network terms (spec.md §5), set explicitly: "full" must
# mean all three whatever a config file does for its own reasons (the demo turns LPIPS off).
FULL_OBJECTIVE = {"loss.perceptual_weight": 1.0, "loss.repa_weight": 0.1, "loss.gan_weight": 0.2}
PLANS = {
    "gpu": {
        "models": {"B-64": {"file": "sq64_256", "arg": "B"},
                   "L-64": {"file": "sq64_256", "arg": "L"}},
        # the official-format export needs a released (or 'mini') size: B-64, the real shapes
        "numerics": {"model": {"file": "sq64_256", "arg": "B"}, "batch": 8},
        "encode_decode": {"cases": [("B-64", 64), ("L-64", 64), ("B-64", 128), ("L-64", 128)],
                          "repeats": 3, "window_s": 0.5, "case_min_s": 25},
        # (model, objective, batches to try (largest first), config overrides)
        "train_step": {"cases": [("B-64", "pixel", (256, 128, 64), {}),
                                 ("L-64", "pixel", (128, 64, 32), {}),
                                 ("B-64", "full", (128, 64, 32), FULL_OBJECTIVE),
                                 ("L-64", "full", (64, 32, 16), FULL_OBJECTIVE)],
                       "repeats": 3, "steps_per_window": 3, "warmup_steps": 2, "unit_min_s": 45},
        "generator": {"batch": 64, "sampling_steps": 250, "repeats": 3, "calls_per_window": 3,
                      "sit": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
                      "tokens": (64, 32), "latent_2d": (32, 4)},
        # seconds a step needs to produce anything, and its share of the budget
        "min_s": {"environment": 15, "numerics": 40, "encode_decode": 45, "train_step": 60,
                  "generator": 45},
        "share": {"environment": 0.08, "numerics": 0.15, "encode_decode": 0.25},
    },
    "cpu-smoke": {
        "models": {"micro": {"file": "demo", "overrides": SMOKE_OVERRIDES}},
        "numerics": {"model": {"file": "demo", "overrides": dict(
            SMOKE_OVERRIDES, **{"model.encoder_size": "mini", "model.decoder_size": "mini"})},
                     "batch": 2},
        "encode_decode": {"cases": [("micro", 2)], "repeats": 1, "window_s": 0.0,
                          "case_min_s": 5},
        # All three network terms stay on; the GAN's consistency regularisation, colour/cutout
        # augmentation and 3 of its 4 readouts are off: they add no code path the smoke needs
        # and cost 1.7x in compile time (measured: 54 vs 31 CPU-s, the smoke's largest part).
        "train_step": {"cases": [("micro", "pixel", (4, 2), {}),
                                 ("micro", "full", (4, 2), dict(
                                     FULL_OBJECTIVE, **{"loss.cr_weight": 0.0,
                                                        "disc.readout_blocks": [1],
                                                        "loss.disc_aug": "translation"}))],
                       "repeats": 1, "steps_per_window": 1, "warmup_steps": 1, "unit_min_s": 10},
        "generator": {"batch": 2, "sampling_steps": 4, "repeats": 1, "calls_per_window": 1,
                      "sit": {"hidden_size": 64, "depth": 2, "num_heads": 2},
                      "tokens": (8, 16), "latent_2d": (8, 4)},
        "min_s": {"environment": 5, "numerics": 10, "encode_decode": 10, "train_step": 10,
                  "generator": 5},
        "share": {"environment": 0.15, "numerics": 0.2, "encode_decode": 0.2},
    },
}
# XLA's share of GPU memory per kind of unit: where PyTorch runs in the same process it needs
# the rest (the default 75 % would starve it); JAX-only units may take nearly all of it.
MEM_FRACTION = {"numerics": "0.75", "encode_decode": "0.5", "train_pixel": "0.55",
                "train_full": "0.92", "generator": "0.9"}
SUMMARY_RESERVE_S = 3.0


# ------------------------------------------------------------------------------------------
# Small helpers shared by the driver and the units
# ------------------------------------------------------------------------------------------

def _json_default(o):
  """numpy scalars/arrays and other strays -> JSON (a unit's dict must never fail to write)."""
  if hasattr(o, "item") and getattr(o, "ndim", 1) == 0:
    return o.item()
  if hasattr(o, "tolist"):
    return o.tolist()
  return str(o)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_json_default, allow_nan=False)
  os.replace(tmp, path)


def _clean(obj):
  """NaN/inf -> None (strict JSON); recorded as such rather than silently dropped."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  return obj


def is_oom(e: BaseException) -> bool:
  """XLA (RESOURCE_EXHAUSTED) and PyTorch (torch.OutOfMemoryError) out-of-memory errors."""
  text = f"{type(e).__name__}: {e}".lower()
  return ("resource_exhausted" in text or "out of memory" in text
          or "outofmemoryerror" in text or "oom when allocating" in text)


def error_record(e: BaseException) -> dict:
  return {"status": "oom" if is_oom(e) else "error",
          "error": {"type": type(e).__name__, "message": str(e)[-2000:],
                    "traceback_tail": traceback.format_exc()[-4000:]}}


_RESULT_PATH = {"path": ""}  # the running unit's result file (set by unit_main)


def save_partial(result: dict) -> None:
  """Multi-part units save what they have after each part: a unit killed at the step's deadline
  still leaves its finished parts (the driver marks it "timeout" and keeps them)."""
  if _RESULT_PATH["path"]:
    _write_json(_RESULT_PATH["path"], _clean(dict(result, status="running")))


def _no_time_for(deadline: float, min_s: float, last_s: float) -> str | None:
  """A skip reason when the next part would likely not finish: less left than its minimum or
  than 1.3x the previous part's time (parts of one unit cost alike)."""
  left = deadline - time.time()
  need = max(min_s, 1.3 * last_s)
  if left < need:
    return f"budget: {max(left, 0):.0f} s left in the step, the next part needs ~{need:.0f} s"
  return None


def build_config(spec: dict, **overrides):
  """configs/<file>.py's get_config(arg), then dotted overrides ("model.compute_dtype": ...).

  The config files are the stable interface (the CLI's --config=configs/sq64_256.py:B); the
  config_lib functions behind them change more often.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(ROOT, "configs", spec["file"] + ".py")
  mod_spec = importlib.util.spec_from_file_location(f"config_{spec['file']}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config(spec["arg"]) if "arg" in spec else mod.get_config()
  for key, value in {**spec.get("overrides", {}), **overrides}.items():
    *path_, leaf = key.split(".")
    parent = config
    for part in path_:
      parent = parent[part]
    if leaf not in parent:  # a typo must not silently add a field nobody reads
      raise KeyError(f"config has no field {key!r}")
    parent[leaf] = tuple(value) if isinstance(parent[leaf], tuple) else value  # JSON: lists
  return config


def _config_name(spec: dict) -> str:
  return f"configs/{spec['file']}.py" + (f":{spec['arg']}" if "arg" in spec else "")


def _set_mem_fraction(kind: str, smoke: bool) -> dict:
  return {} if smoke else {"XLA_PYTHON_CLIENT_MEM_FRACTION": MEM_FRACTION[kind]}


def _free_accelerator_memory():
  """Between cases of one unit: drop what the last case left (jit caches, torch's cache)."""
  import gc  # pylint: disable=import-outside-toplevel
  gc.collect()
  try:
    import jax  # pylint: disable=import-outside-toplevel
    jax.clear_caches()
  except Exception:  # pylint: disable=broad-except
    pass
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    if torch.cuda.is_available():
      torch.cuda.empty_cache()


def _device_memory() -> dict:
  """The device's allocator statistics (peak = high-water mark of this process, i.e. of this one
  unit, which is why each unit is its own process); the CPU backend keeps none."""
  import jax  # pylint: disable=import-outside-toplevel
  out = {}
  stats = jax.devices()[0].memory_stats()
  if stats:
    for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size"):
      if k in stats:
        out[k] = int(stats[k])
  else:
    out["reason"] = f"jax's {jax.default_backend()} backend reports no memory statistics"
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    out["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    out["torch_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
  import resource  # pylint: disable=import-outside-toplevel
  out["host_peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  return out


# ------------------------------------------------------------------------------------------
# Units: each runs in its own subprocess (`--unit NAME`) and returns a JSON-able dict
# ------------------------------------------------------------------------------------------

def unit_environment(params: dict, deadline: float, smoke: bool) -> dict:
  """Versions, devices and memory; a bf16 matmul's achieved rate (the ceiling MFU is read
  against, measured rather than taken from a datasheet)."""
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from bench_util import cpu_model  # pylint: disable=import-outside-toplevel

  def version(dist):
    try:
      return md.version(dist)
    except md.PackageNotFoundError:
      return None

  out = {"name": "environment", "python": platform.python_version(),
         "platform": platform.platform(),
         "versions": {d: version(d) for d in (
             "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "grain", "ml-collections", "numpy", "torch", "timm")},
         "jax_backend": jax.default_backend(),
         "devices": [{"id": d.id, "kind": d.device_kind, "platform": d.platform}
                     for d in jax.devices()],
         "device_count": jax.device_count(),
         "cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
         "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "CUDA_"))}}
  try:
    with open("/proc/meminfo") as f:
      kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    out["host_memory_bytes"] = kb * 1024
  except (OSError, AttributeError):
    out["host_memory_bytes"] = None
  out["device_memory"] = _device_memory()
  # CUDA / cuDNN as JAX sees them (the plugin's _versions module; absent on CPU/TPU builds).
  from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
  if cuda_versions is None:
    out["jax_cuda"] = {"reason": "no CUDA plugin in this jaxlib"}
  else:
    cv = {}
    for name in sorted(dir(cuda_versions)):
      if name.endswith("_version") and callable(getattr(cuda_versions, name)):
        try:
          cv[name] = getattr(cuda_versions, name)()
        except Exception as e:  # pylint: disable=broad-except  # e.g. no device for a runtime call
          cv[name] = f"error: {e}"[:200]
    out["jax_cuda"] = cv
  out["jax_environment_info"] = jax.print_environment_info(return_string=True)
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                          "clocks.max.sm,power.limit", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    out["nvidia_smi"] = f"unavailable: {e}"
  # torch only where it sees a GPU (its import costs ~8 s on a 2-core CPU, the smoke's budget).
  if jax.default_backend() == "gpu":
    import torch  # pylint: disable=import-outside-toplevel
    out["torch_cuda"] = {
        "available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "total_memory_bytes": (torch.cuda.get_device_properties(0).total_memory
                               if torch.cuda.is_available() else None)}
  else:
    out["torch_cuda"] = {"reason": f"jax backend is {jax.default_backend()}; torch not imported"}
  # Peak FLOP/s that train.py divides by for MFU (None: no MFU reported on this device). The
  # import also checks that the whole training stack imports; if it does not, the versions above
  # are still worth recording, so the error is kept beside them.
  try:
    import ml_collections  # pylint: disable=import-outside-toplevel
    from softvq_jax import train  # pylint: disable=import-outside-toplevel
    out["peak_flops_per_device"] = train.peak_flops_per_device(
        ml_collections.ConfigDict({"peak_flops_per_device": 0.0}))
    out["training_stack_imports"] = True
  except Exception as e:  # pylint: disable=broad-except
    out["peak_flops_per_device"] = None
    out["training_stack_imports"] = False
    out.update(status="partial", error=error_record(e)["error"])
  # Achieved bf16 matmul rate (n^3 * 2 FLOPs per product).
  n = 512 if smoke or jax.default_backend() == "cpu" else 8192
  a = jnp.asarray(np.random.RandomState(0).standard_normal((n, n)), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a))
    times.append(time.perf_counter() - t0)
  best = min(times)
  out["matmul_bf16"] = {"n": n, "best_s": best, "tflop_per_s": 2 * n ** 3 / best / 1e12}
  return out


def unit_numerics(params: dict, deadline: float, smoke: bool) -> dict:
  """A random official-format checkpoint through `load_tokenizer` on the device, against the
  float32 CPU result of the same checkpoint, per compute dtype x attention backend x precision.

  LayerScale is 0.3 (not DINOv2's 1e-5) so that every attention and MLP branch matters: with
  1e-5 the blocks are near-identities and a broken attention kernel would pass. Tokens are
  compared by max |error| and per-token cosine similarity; the decoder is fed the reference
  tokens (its own error, not the encoder's compounded) and also the device's own tokens
  (end to end).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import softvq_jax  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import official  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from bench_util import model_name  # pylint: disable=import-outside-toplevel

  config = build_config(params["model"])
  cfg = tokenizer_lib.TokenizerConfig.from_config(config).replace(
      compute_dtype="float32", layer_scale_init=0.3)
  ckpt = tempfile.mkdtemp(prefix="acc_numerics_")
  official.export_official(tokenizer_lib.build_tokenizer(cfg, seed=0), ckpt)
  b, s = int(params["batch"]), cfg.image_size
  images = np.random.RandomState(0).uniform(-1, 1, (b, s, s, 3)).astype(np.float32)  # NHWC

  cpu = jax.devices("cpu")[0]
  t0 = time.perf_counter()
  with jax.default_device(cpu), jax.default_matmul_precision("highest"):
    ref = softvq_jax.load_tokenizer(ckpt, compute_dtype="float32", attention_backend="xla")
    z_ref = np.asarray(ref.encode(images))     # [B, N, e]
    img_ref = np.asarray(ref.decode(z_ref))    # [B, S, S, 3]
  ref_s = time.perf_counter() - t0
  del ref

  def cosine(a, b_):  # per token: [B, N]
    num = np.sum(a * b_, -1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b_, axis=-1), 1e-30)

  on_gpu = jax.default_backend() == "gpu"
  results = []
  out = {"name": f"{model_name(config)} at {s} px, batch {b}", "model": model_name(config),
         "image_size": s, "batch": b, "checkpoint": "random official format (LayerScale 0.3)",
         "reference": "float32 on the CPU, matmul precision highest, xla attention",
         "reference_s": ref_s, "results": results}
  last_s = 0.0
  for dtype, backend, precision in (("float32", "xla", "default"), ("float32", "xla", "highest"),
                                    ("bfloat16", "xla", "default"),
                                    ("bfloat16", "cudnn", "default")):
    row = {"compute_dtype": dtype, "attention_backend": backend, "matmul_precision": precision,
           "tolerance": dict(TOLERANCES[(dtype, precision)])}
    if backend == "cudnn" and not on_gpu:
      row.update(status="skipped", reason=f"cuDNN attention needs a GPU (backend: "
                 f"{jax.default_backend()})")
      results.append(row)
      continue
    why = _no_time_for(deadline, 5, last_s)
    if why:
      row.update(status="skipped", reason=why)
      results.append(row)
      continue
    t_row = time.time()
    try:
      tok = softvq_jax.load_tokenizer(ckpt, compute_dtype=dtype, attention_backend=backend)
      with jax.default_matmul_precision(None if precision == "default" else precision):
        z = np.asarray(tok.encode(jax.device_put(images)))
        img = np.asarray(tok.decode(jax.device_put(z_ref)))
        img_e2e = np.asarray(tok.decode(jax.device_put(z)))
      cos = cosine(z.astype(np.float64), z_ref.astype(np.float64))
      scale = float(np.max(np.abs(img_ref)))
      row.update(
          status="ok", device=jax.devices()[0].device_kind,
          tokens_max_abs_err=float(np.max(np.abs(z - z_ref))),
          tokens_max_abs_ref=float(np.max(np.abs(z_ref))),
          token_cosine_min=float(np.min(cos)), token_cosine_mean=float(np.mean(cos)),
          decode_max_abs_err=float(np.max(np.abs(img - img_ref))),
          decode_mean_abs_err=float(np.mean(np.abs(img - img_ref))),
          decode_max_abs_ref=scale,
          decode_rel_err=float(np.max(np.abs(img - img_ref))) / max(scale, 1e-30),
          end_to_end_max_abs_err=float(np.max(np.abs(img_e2e - img_ref))),
          finite=bool(np.all(np.isfinite(z)) and np.all(np.isfinite(img))))
      tol = row["tolerance"]
      row["within_tolerance"] = bool(
          row["finite"] and row["token_cosine_min"] >= tol["token_cosine_min"]
          and row["decode_rel_err"] <= tol["decode_rel_err"])
      if not row["within_tolerance"]:
        row["status"] = "fail"
      del tok
    except Exception as e:  # pylint: disable=broad-except  # recorded, the next combo still runs
      row.update(error_record(e))
    last_s = time.time() - t_row
    row["wall_s"] = last_s
    results.append(row)
    save_partial(out)
  return out


# Numerics tolerances: the CPU float32 reference vs the device. fp32 'highest' must agree to
# rounding; fp32 'default' may use TF32 matmuls on GPUs (10-bit mantissa); bf16 has 8 bits.
TOLERANCES = {
    ("float32", "highest"): {"token_cosine_min": 0.99999, "decode_rel_err": 1e-4},
    ("float32", "default"): {"token_cosine_min": 0.999, "decode_rel_err": 2e-2},
    ("bfloat16", "default"): {"token_cosine_min": 0.98, "decode_rel_err": 0.1},
}


def unit_encode_decode(params: dict, deadline: float, smoke: bool) -> dict:
  """benchmarks/encode_decode.py's `run` per (model, batch), in bf16, ours vs PyTorch; one
  process for all cases (no per-case memory figure is needed), each case guarded."""
  import encode_decode  # pylint: disable=import-outside-toplevel

  cases = []
  last_s = 0.0
  for model, batch in params["cases"]:
    spec = params["models"][model]
    case = {"model_key": model, "batch_size": batch, "config": _config_name(spec)}
    # an L case after a B case costs ~2x: scale the previous case's time by the model
    why = _no_time_for(deadline, params["case_min_s"], last_s * (2 if "L" in model else 1))
    if why:
      case.update(status="skipped", reason=why)
      cases.append(case)
      continue
    t0 = time.time()
    try:
      r = encode_decode.run(build_config(spec), batch_size=batch, repeats=params["repeats"],
                            window_s=params["window_s"], framework="both",
                            compute_dtype="bfloat16", atol=1e-3, seed=0,
                            config_name=_config_name(spec))
      case.update(status="ok", **r)
    except Exception as e:  # pylint: disable=broad-except
      case.update(error_record(e))
    case["wall_s"] = last_s = time.time() - t0
    cases.append(case)
    save_partial({"name": "encode/decode", "cases": cases})
    _free_accelerator_memory()
  return {"name": "encode/decode", "cases": cases,
          "status": _combined_status([c["status"] for c in cases])}


def unit_train(params: dict, deadline: float, smoke: bool) -> dict:
  """One train-step measurement at one batch: benchmarks/train_step.py's `run` (pixel
  objective, ours vs PyTorch) or `run_objective` (the full objective, ours), plus the device's
  peak memory of this process."""
  import train_step  # pylint: disable=import-outside-toplevel

  spec = params["model"]
  config = build_config(spec, batch_size=int(params["batch"]),
                        **{"model.compute_dtype": "bfloat16"})
  if params["objective"] == "pixel":
    r = train_step.run(config, repeats=params["repeats"],
                       steps_per_window=params["steps_per_window"],
                       warmup_steps=params["warmup_steps"], framework="both",
                       config_name=_config_name(spec))
  else:
    # Offline accelerator machines cannot fetch frozen networks: random ones, never a download
    # (`auto_fetch` is absent from older configs).
    if "auto_fetch" in config.pretrained:
      config.pretrained.auto_fetch = False
    r = train_step.run_objective(config, variants=("full",), repeats=params["repeats"],
                                 steps_per_window=params["steps_per_window"],
                                 warmup_steps=params["warmup_steps"],
                                 config_name=_config_name(spec))
  import jax  # pylint: disable=import-outside-toplevel
  jax_row = r["jax"] if params["objective"] == "pixel" else r["variants"]["full"]
  if "mfu" not in jax_row:
    jax_row["mfu"] = None
    jax_row["mfu_reason"] = (f"no peak FLOP/s known for device kind "
                             f"{jax.devices()[0].device_kind!r} (softvq_jax/hardware.py CHIPS)"
                             if r.get("peak_flops_per_device") is None
                             else "XLA's cost analysis gave no FLOP count")
  out = {"name": f"{r['model']} {params['objective']} batch {params['batch']}",
         "objective": params["objective"], "batch_size": int(params["batch"]),
         "device_memory": _device_memory(), "benchmark": r}
  if params["objective"] == "full":
    off = [k for k, on in jax_row["terms"].items() if not on]
    if off:  # a "full" number without all its networks would be mislabelled
      out.update(status="fail", reason=f"the full objective ran without {off}")
  return out


def _find_sit_builder(module):
  """The generator's constructor: `build_sit(**fields)` or class `SiT(**fields, rngs=...)`.

  The contract (README-level, for whoever adds softvq_jax/models/sit.py): keyword arguments
  named as the released SiT config.json fields (input_size, patch_size, in_channels,
  hidden_size, depth, num_heads, vae_1d, ...), a model called as model(x, t, y) with x
  [B, N, C] (1-D tokens) or [B, H, W, C] (2-D latents, NHWC), t [B] in [0, 1], y [B] int labels
  (1000 = null), returning the velocity in x's shape.
  """
  for name in ("build_sit", "SiT"):
    if callable(getattr(module, name, None)):
      return getattr(module, name)
  raise AttributeError("softvq_jax.models.sit has neither build_sit(...) nor SiT(...); "
                       "see accelerator_check._find_sit_builder for the expected contract")


def unit_generator(params: dict, deadline: float, smoke: bool) -> dict:
  """Sampling images/s of SiT on 64 1-D tokens (patch 1) vs SiT/2 on 32x32x4 2-D latents.

  Generator only (no tokenizer/VAE decode; step 3 has the decode rate): one network evaluation
  on the CFG-doubled batch is timed, and images/s = batch / (sampling_steps x that time) — what
  a fixed-step sampler with classifier-free guidance at every step costs (the published SDE:
  250 steps).
  """
  import importlib  # pylint: disable=import-outside-toplevel
  import inspect  # pylint: disable=import-outside-toplevel
  import statistics  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  builder = _find_sit_builder(importlib.import_module("softvq_jax.models.sit"))
  sig = inspect.signature(builder)
  takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
  b, steps = int(params["batch"]), int(params["sampling_steps"])
  n_tok, c_tok = params["tokens"]
  g2d, c2d = params["latent_2d"]
  cases = (("SiT/1 on 1-D tokens", dict(input_size=n_tok, patch_size=1, in_channels=c_tok,
                                        vae_1d=True), (n_tok, c_tok)),
           ("SiT/2 on 2-D latents", dict(input_size=g2d, patch_size=2, in_channels=c2d,
                                         vae_1d=False), (g2d, g2d, c2d)))
  out = []
  for label, fields, x_shape in cases:
    fields = dict(fields, **params["sit"], mlp_ratio=4.0, num_classes=1000,
                  class_dropout_prob=0.1, learn_sigma=False, qk_norm=False)
    kw = {k: v for k, v in fields.items() if takes_any or k in sig.parameters}
    for k in ("compute_dtype", "dtype"):
      if k in sig.parameters:
        kw[k] = "bfloat16"
    if "rngs" in sig.parameters:
      kw["rngs"] = nnx.Rngs(0)
    row = {"name": label, "fields": {k: v for k, v in kw.items() if k != "rngs"},
           "batch": b, "cfg_batch": 2 * b, "sampling_steps": steps}
    try:
      model = builder(**kw)
      graphdef, state = nnx.split(model)
      fwd = jax.jit(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y))
      rng = np.random.RandomState(0)
      x = jnp.asarray(rng.standard_normal((2 * b, *x_shape)), jnp.float32)
      t = jnp.asarray(rng.uniform(0, 1, (2 * b,)), jnp.float32)
      y = jnp.asarray(np.concatenate([rng.randint(0, 1000, b), np.full(b, 1000)]), jnp.int32)
      t0 = time.perf_counter()
      v = jax.block_until_ready(fwd(state, x, t, y))
      row["compile_s"] = time.perf_counter() - t0
      if tuple(v.shape) != tuple(x.shape):
        raise ValueError(f"the generator returned {v.shape} for input {x.shape}: the velocity "
                         "must have x's shape (see _find_sit_builder's contract)")
      times = []
      for _ in range(params["repeats"]):
        t0 = time.perf_counter()
        for _ in range(params["calls_per_window"]):
          v = fwd(state, x, t, y)
        jax.block_until_ready(v)
        times.append((time.perf_counter() - t0) / params["calls_per_window"])
      fwd_s = statistics.median(times)
      row.update(status="ok", forward_s=fwd_s, forward_s_windows=times,
                 params=int(sum(p.size for p in jax.tree.leaves(state))),
                 sequence_length=int(np.prod(x_shape[:-1]) // (fields["patch_size"] ** (
                     len(x_shape) - 1))),
                 images_per_s=b / (steps * fwd_s))
    except Exception as e:  # pylint: disable=broad-except
      row.update(error_record(e))
    out.append(row)
    save_partial({"name": "generator sampling", "cases": out})
    _free_accelerator_memory()
  res = {"name": "generator sampling", "cases": out}
  if all(r["status"] == "ok" for r in out):
    res["ratio_1d_over_2d"] = out[0]["images_per_s"] / out[1]["images_per_s"]
  res["status"] = _combined_status([r["status"] for r in out])
  return res


UNITS = {"environment": unit_environment, "numerics": unit_numerics,
         "encode_decode": unit_encode_decode, "train": unit_train, "generator": unit_generator}


def unit_main(args) -> int:
  """Subprocess side: run one unit, always leave a result file (errors included)."""
  import resource  # pylint: disable=import-outside-toplevel
  _RESULT_PATH["path"] = args.result
  t0, load0 = time.time(), os.getloadavg()[0]
  try:
    result = UNITS[args.unit](json.loads(args.params), args.deadline, args.cpu_smoke)
    result.setdefault("status", "ok")
  except BaseException as e:  # pylint: disable=broad-except  # KeyboardInterrupt/SystemExit too
    result = error_record(e)
  result["unit_wall_s"] = time.time() - t0
  # CPU seconds and the machine's load: on a shared machine, wall time alone misleads.
  ru = resource.getrusage(resource.RUSAGE_SELF)
  result["unit_cpu_s"] = ru.ru_utime + ru.ru_stime
  result["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
  _write_json(args.result, _clean(result))
  return 0


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

class Driver:
  """Runs the steps within the budget, one subprocess per unit, and writes the records."""

  def __init__(self, args):
    self.args = args
    self.smoke = bool(args.cpu_smoke)
    self.mode = "cpu-smoke" if self.smoke else "gpu"
    self.plan = PLANS[self.mode]
    self.out = os.path.abspath(args.out)
    os.makedirs(self.out, exist_ok=True)
    self.started = args.started_at or time.time()
    self.deadline = self.started + args.budget
    self.log_path = os.path.join(self.out, LOG_NAME)
    self.records: dict[str, dict] = {}

  def left(self) -> float:
    return self.deadline - time.time()

  def log(self, text: str) -> None:
    with open(self.log_path, "a") as f:
      f.write(text if text.endswith("\n") else text + "\n")

  # --- one unit in a subprocess ------------------------------------------------------------
  def run_unit(self, unit: str, params: dict, *, deadline: float, min_s: float,
               env: dict | None = None) -> dict:
    left = deadline - time.time()
    if left < min_s:
      return {"status": "skipped",
              "reason": f"budget: {max(left, 0):.0f} s left for this step, the unit needs "
                        f">= {min_s:.0f} s"}
    fd, result_path = tempfile.mkstemp(prefix=f"acc_{unit}_", suffix=".json")
    os.close(fd)
    os.unlink(result_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--unit", unit, "--params",
           json.dumps(params), "--result", result_path, "--deadline", str(deadline)
           ] + (["--cpu-smoke"] if self.smoke else [])
    penv = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    penv["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in penv.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    penv.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if self.smoke:
      penv["JAX_PLATFORMS"] = "cpu"
      # LLVM -O0: the smoke tests code paths, not speed, and compiling is most of its time
      # (measured: the pixel train step's compile 16.4 -> 9.7 CPU-s, its init 8.7 -> 3.7).
      penv["XLA_FLAGS"] = (penv.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           ).strip()
    log = tempfile.TemporaryFile(mode="w+")
    t0 = time.time()
    self.log(f"\n===== unit {unit} {json.dumps(params)[:300]} (timeout {left:.0f} s) =====")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=penv, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = False
    try:
      rc = proc.wait(timeout=max(left, 1))
    except subprocess.TimeoutExpired:
      timed_out = True
      os.killpg(proc.pid, signal.SIGKILL)  # its own session: this unit and its children only
      rc = proc.wait()
    wall = time.time() - t0
    log.seek(0)
    text = log.read()
    log.close()
    self.log(text[-200_000:])
    self.log(f"===== unit {unit}: rc {rc}, {wall:.1f} s =====")
    if timed_out:
      result = {}
      if os.path.exists(result_path):  # the parts it finished (save_partial)
        with open(result_path) as f:
          result = json.load(f)
        os.unlink(result_path)
      result.update(status="timeout", reason=f"killed after {wall:.0f} s: the step's budget ran "
                    "out" + (" (finished parts kept)" if result else ""),
                    output_tail=text[-3000:])
    elif not os.path.exists(result_path):
      result = {"status": "error", "error": {"type": "crash", "message": f"the unit process "
                f"exited with {rc} without a result (signal, abort or OOM kill)",
                "traceback_tail": text[-4000:]}}
    else:
      with open(result_path) as f:
        result = json.load(f)
      os.unlink(result_path)
    result["wall_s"] = round(wall, 2)
    result["rc"] = rc
    return result

  # --- steps ---------------------------------------------------------------------------------
  def step_deadline(self, step: str, later: list[str]) -> float:
    """Leaves later steps their minimum; the first three steps are also capped at a share."""
    reserve = sum(self.min_s(s) for s in later) + SUMMARY_RESERVE_S
    end = self.deadline - reserve
    share = self.plan["share"].get(step)
    if share is not None:
      end = min(end, time.time() + max(share * self.args.budget, self.min_s(step)))
    return end

  def min_s(self, step: str) -> float:
    if step == "generator" and not os.path.exists(SIT_PATH):
      return 0.0  # skipped at once
    return self.plan["min_s"][step]

  def step_environment(self, deadline: float) -> dict:
    r = self.run_unit("environment", {}, deadline=deadline, min_s=self.min_s("environment"))
    return {"results": [r], "status": r["status"], **({"reason": r["reason"]}
                                                       if "reason" in r else {})}

  def step_numerics(self, deadline: float) -> dict:
    r = self.run_unit("numerics", dict(self.plan["numerics"]), deadline=deadline,
                      min_s=self.min_s("numerics"), env=_set_mem_fraction("numerics", self.smoke))
    status = r["status"]
    if status == "ok":
      rows = [x["status"] for x in r["results"]]
      status = ("fail" if "fail" in rows else "ok" if all(s in ("ok", "skipped") for s in rows)
                else "partial")
    return {"results": [r], "status": status}

  def step_encode_decode(self, deadline: float) -> dict:
    p = dict(self.plan["encode_decode"], models=self.plan["models"])
    r = self.run_unit("encode_decode", p, deadline=deadline, min_s=self.min_s("encode_decode"),
                      env=_set_mem_fraction("encode_decode", self.smoke))
    return {"results": [r], "status": r["status"]}

  def step_train_step(self, deadline: float) -> dict:
    p = self.plan["train_step"]
    results = []
    for model, objective, batches, overrides in p["cases"]:
      attempts = []
      final = None
      for batch in batches:
        spec = dict(self.plan["models"][model])
        spec["overrides"] = {**spec.get("overrides", {}), **overrides}
        params = {"model": spec, "model_key": model,
                  "objective": objective, "batch": batch, "repeats": p["repeats"],
                  "steps_per_window": p["steps_per_window"], "warmup_steps": p["warmup_steps"]}
        r = self.run_unit("train", params, deadline=deadline, min_s=p["unit_min_s"],
                          env=_set_mem_fraction(f"train_{objective}", self.smoke))
        attempts.append({"batch": batch, "status": r["status"], "wall_s": r.get("wall_s"),
                         **({"error": r["error"]["message"][-500:]} if "error" in r else {})})
        final = r
        if r["status"] != "oom":
          break  # a fit, a real error, a timeout or a skip: smaller batches would not help
      final = dict(final, model_key=model, objective=objective, batches_tried=attempts)
      if final["status"] == "oom":
        final["reason"] = f"out of memory at every batch of {list(batches)}"
      results.append(final)
    return {"results": results, "status": _combined_status([r["status"] for r in results])}

  def step_generator(self, deadline: float) -> dict:
    if not os.path.exists(SIT_PATH):
      return {"status": "skipped", "reason": "generator not built: softvq_jax/models/sit.py "
              "does not exist", "results": []}
    r = self.run_unit("generator", dict(self.plan["generator"]), deadline=deadline,
                      min_s=self.min_s("generator"), env=_set_mem_fraction("generator",
                                                                           self.smoke))
    return {"results": [r], "status": r["status"]}

  def run(self, steps: list[str]) -> int:
    self.install()
    for i, step in enumerate(STEPS, start=1):
      name = f"{i:02d}_{step}.json"
      rec = {"step": step, "mode": self.mode,
             "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "budget_left_s_at_start": round(self.left(), 1)}
      t0 = time.time()
      if step not in steps:
        rec.update(status="skipped", reason="not selected (--steps)", results=[])
      else:
        later = [s for s in STEPS[i:] if s in steps]
        deadline = self.step_deadline(step, later)
        try:
          rec.update(getattr(self, f"step_{step}")(deadline))
        except Exception as e:  # pylint: disable=broad-except  # the driver's own bug: recorded
          rec.update(error_record(e), results=rec.get("results", []))
      if rec.get("status") != "ok" and not rec.get("reason"):
        rec["reason"] = _unit_reasons(rec.get("results", []))
      rec["wall_s"] = round(time.time() - t0, 2)
      self.records[step] = rec
      _write_json(os.path.join(self.out, name), _clean(rec))
      self.write_summary()
    return 0

  # --- install -------------------------------------------------------------------------------
  def install(self) -> None:
    t0 = time.time()
    rec = {"step": "install", "mode": self.mode,
           "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
      rec.update(install(self))
    except Exception as e:  # pylint: disable=broad-except
      rec.update(error_record(e))
    rec["wall_s"] = round(time.time() - t0, 2)
    self.records["install"] = rec
    _write_json(os.path.join(self.out, "00_install.json"), _clean(rec))

  # --- summary -------------------------------------------------------------------------------
  def write_summary(self) -> None:
    """After every step, so that a run killed from outside still leaves its summary."""
    try:
      text = summary_markdown(self.records, mode=self.mode, budget=self.args.budget,
                              used=time.time() - self.started)
    except Exception:  # pylint: disable=broad-except  # a formatting bug must not lose the run
      text = (f"# Accelerator check ({self.mode})\n\nThe summary could not be formatted; the "
              "step JSONs beside it hold every result.\n\n" + "".join(
                  f"- {k}: {r.get('status')}\n" for k, r in self.records.items())
              + "\n```\n" + traceback.format_exc()[-3000:] + "```\n")
    with open(os.path.join(self.out, "summary.md"), "w") as f:
      f.write(text)


def _combined_status(statuses: list[str]) -> str:
  """ok if all are; partial if some are; else the common status (skipped, oom, ...) or error."""
  ok = sum(st == "ok" for st in statuses)
  if statuses and ok == len(statuses):
    return "ok"
  if ok:
    return "partial"
  return statuses[0] if statuses and len(set(statuses)) == 1 else "error"


def _unit_reasons(results: list) -> str:
  """The step's note when it is not ok: each unit's (or case's) reason or error, deduplicated."""
  seen = []
  for r in results:
    for item in [r] + list(r.get("cases", [])) + list(r.get("results", [])):
      if item.get("status") not in (None, "ok"):
        why = _why(item) or item["status"]
        if why not in seen:
          seen.append(why)
  return "; ".join(seen)[:600]


def _requirements() -> dict[str, str]:
  """{distribution: specifier} of setup.py's install_requires + the test extra (parsed, not run:
  running setup.py would need setuptools' build machinery)."""
  with open(os.path.join(ROOT, "setup.py")) as f:
    tree = ast.parse(f.read())
  reqs: list[str] = []
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
      reqs += ast.literal_eval(node.value)
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      reqs += ast.literal_eval(node.value).get("test", [])
  out = {}
  for r in reqs:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", r)
    out[_norm(m.group(1))] = m.group(2).strip()
  return out


def _norm(dist: str) -> str:
  return re.sub(r"[-_.]+", "-", dist).lower()


def _satisfies(version: str, spec: str) -> bool | None:
  try:
    from packaging.specifiers import SpecifierSet  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return SpecifierSet(spec).contains(version, prereleases=True) if spec else True


def _nvidia() -> dict | None:
  """GPUs nvidia-smi lists, and the CUDA version its driver supports (picks jax[cudaNN])."""
  try:
    lst = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  gpus = [l for l in lst.stdout.splitlines() if l.startswith("GPU ")]
  if lst.returncode != 0 or not gpus:
    return None
  m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", head.stdout)
  return {"gpus": gpus, "driver_cuda": f"{m.group(1)}.{m.group(2)}" if m else None,
          "cuda_major": int(m.group(1)) if m else None}


def install(driver: Driver) -> dict:
  """What the check needs vs what is installed; installs the difference unless told not to.

  Online: `pip install` of the needed distributions that are missing or outside setup.py's pins
  (`.[test]`'s subset that the check imports), plus `jax[cudaNN]` at setup.py's jax pin when a
  GPU is present and jax does not see it (NN from the CUDA version nvidia-smi reports: the
  current jax packaging offers cuda12 and cuda13 extras). Offline (--wheels DIR): the wheels in
  DIR with --no-index --no-deps (the accelerator machines reach no registry;
  accelerator_wheels.sh prepares DIR). The package itself needs no install: PYTHONPATH has the
  checkout.
  """
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  reqs = _requirements()

  def check():
    rows = {}
    for dist in NEEDED:
      try:
        v = md.version(dist)
      except md.PackageNotFoundError:
        v = None
      spec = reqs.get(_norm(dist), "")
      rows[dist] = {"installed": v, "required": spec,
                    "ok": v is not None and _satisfies(v, spec) is not False}
    return rows

  rows = check()
  out = {"python": sys.executable, "python_version": platform.python_version(),
         "requirements": rows, "missing": [d for d, r in rows.items() if not r["ok"]]}
  gpu = None if driver.smoke else _nvidia()
  out["gpu"] = gpu
  need_cuda_jax = False
  if gpu and rows["jax"]["installed"]:
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True, timeout=180)
    out["jax_backend_before"] = (probe.stdout.strip().splitlines() or ["?"])[-1]
    need_cuda_jax = out["jax_backend_before"] != "gpu"
  elif gpu:
    need_cuda_jax = True
  cuda_extra = f"cuda{gpu['cuda_major'] if gpu and gpu['cuda_major'] else 12}"
  out["jax_cuda_extra"] = cuda_extra if gpu else None
  if driver.smoke or driver.args.no_install:
    out.update(status="skipped", reason="--cpu-smoke: never installs" if driver.smoke
               else "--no-install")
    return out
  if not out["missing"] and not need_cuda_jax:
    out.update(status="ok", reason="nothing to install")
    return out
  budget = max(30.0, min(300.0, driver.left() - 120))
  if driver.args.wheels:
    want = {_norm(d) for d in out["missing"]}

    def wanted(wheel: str) -> bool:
      # A wheel in DIR is installed when its distribution is needed and missing / outside the
      # pins, or not installed at all (a dependency of one: DIR holds what the image lacks).
      dist = _norm(wheel.split("-")[0])
      try:
        md.version(dist)
      except md.PackageNotFoundError:
        return True
      return dist in want or (need_cuda_jax and dist.startswith("jax"))

    wheels = sorted(os.path.join(driver.args.wheels, w) for w in os.listdir(driver.args.wheels)
                    if w.endswith(".whl") and wanted(w))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", *wheels]
    if not wheels:
      out.update(status="error", reason=f"{out['missing']} missing and no matching wheel in "
                 f"{driver.args.wheels}")
      return out
  else:
    # Only what the check imports, at setup.py's pins: all of `.[test]` would add TensorFlow,
    # clu, lpips, ... (hundreds of MB, minutes) that nothing here uses, inside a short window.
    specs = [f"{d}{reqs.get(_norm(d), '')}" for d in out["missing"]
             if not (need_cuda_jax and d in ("jax", "jaxlib"))]
    if need_cuda_jax:
      specs.append(f"jax[{cuda_extra}]{reqs.get('jax', '')}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--retries", "0", "--timeout", "20",
           *specs]
  t0 = time.time()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    action = {"cmd": cmd, "rc": p.returncode, "output_tail": (p.stdout + p.stderr)[-3000:]}
  except subprocess.TimeoutExpired:
    action = {"cmd": cmd, "rc": None, "output_tail": f"timed out after {budget:.0f} s"}
  action["wall_s"] = round(time.time() - t0, 1)
  out["action"] = action
  out["requirements_after"] = check()
  out["missing_after"] = [d for d, r in out["requirements_after"].items() if not r["ok"]]
  out["status"] = "ok" if action["rc"] == 0 and not out["missing_after"] else "error"
  if out["status"] == "error":
    out["reason"] = (f"still missing {out['missing_after']} (steps needing them will fail)"
                     if out["missing_after"] else "pip failed")
  return out


# ------------------------------------------------------------------------------------------
# summary.md
# ------------------------------------------------------------------------------------------

def _f(v, nd=3) -> str:
  """Fixed point with nd decimals; scientific for errors/rates too small or large for that."""
  if v is None:
    return "—"
  if isinstance(v, float):
    if v != 0 and (abs(v) < 0.5 * 10 ** -nd or abs(v) >= 1e6):
      return f"{v:.2e}"
    return f"{v:.{nd}f}"
  return str(v)


def _gib(v) -> str:
  return "—" if v is None else f"{v / 2 ** 30:.2f}"


def _why(r: dict) -> str:
  """One line: a skip's reason, or an error's type and first message line."""
  if r.get("reason"):
    return r["reason"]
  if r.get("error"):
    lines_ = (r["error"].get("message") or "").strip().splitlines()
    return f"{r['error']['type']}: {lines_[0][:160] if lines_ else ''}".replace("|", "/")
  return ""


def summary_markdown(records: dict, *, mode: str, budget: float, used: float) -> str:
  """One page a person reads first; every number comes from the step JSONs beside it."""
  lines = [f"# Accelerator check ({mode})", ""]
  env = records.get("environment", {}).get("results", [{}])
  env = env[0] if env else {}
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  dev = env.get("devices", [{}])[0].get("kind") if env.get("devices") else None
  v = env.get("versions", {})
  cuda = env.get("jax_cuda", {})
  lines += [f"{when}. Device: {dev or '—'} ({env.get('jax_backend', '—')}, "
            f"{env.get('device_count', '—')} device(s)); CPU: {env.get('cpu', '—')} "
            f"x {env.get('cpus', '—')}. Budget {budget:.0f} s, used {used:.0f} s.", "",
            f"jax {v.get('jax') or '—'}, jaxlib {v.get('jaxlib') or '—'}, flax {v.get('flax') or '—'}, "
            f"torch {v.get('torch') or '—'}, timm {v.get('timm') or '—'}; CUDA runtime "
            f"{cuda.get('cuda_runtime_get_version', '—')}, cuDNN {cuda.get('cudnn_get_version', '—')}"
            f"; device memory limit {_gib(env.get('device_memory', {}).get('bytes_limit'))} GiB; "
            f"bf16 matmul {_f(env.get('matmul_bf16', {}).get('tflop_per_s'), 1)} TFLOP/s "
            f"(n={env.get('matmul_bf16', {}).get('n', '—')}); MFU peak "
            f"{_f(env.get('peak_flops_per_device'))} FLOP/s.", "",
            "| step | status | wall (s) | note |", "| --- | --- | ---: | --- |"]
  for step in ("install",) + STEPS:
    r = records.get(step)
    if r is None:
      lines.append(f"| {step} | not run | — | the check stopped before this step |")
      continue
    lines.append(f"| {step} | {r.get('status')} | {_f(r.get('wall_s'), 1)} | {_why(r)} |")

  num = records.get("numerics", {}).get("results") or []
  if num and num[0].get("results"):
    n = num[0]
    lines += ["", f"## Numerics: {n['name']} vs {n['reference']}", "",
              "| dtype | attention | precision | status | token max abs err | token cos min / "
              "mean | decode max abs err (rel) | end-to-end max abs err | tolerance (cos min, "
              "rel) |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in n["results"]:
      tol = r.get("tolerance", {})
      if r["status"] in ("ok", "fail"):
        lines.append(
            f"| {r['compute_dtype']} | {r['attention_backend']} | {r['matmul_precision']} | "
            f"{r['status']} | {_f(r['tokens_max_abs_err'])} | {_f(r['token_cosine_min'], 6)} / "
            f"{_f(r['token_cosine_mean'], 6)} | {_f(r['decode_max_abs_err'])} "
            f"({_f(r['decode_rel_err'])}) | {_f(r['end_to_end_max_abs_err'])} | "
            f"{tol.get('token_cosine_min')}, {tol.get('decode_rel_err')} |")
      else:
        lines.append(f"| {r['compute_dtype']} | {r['attention_backend']} | "
                     f"{r['matmul_precision']} | {r['status']} | {_why(r)} | | | | |")

  ed = records.get("encode_decode", {}).get("results") or []
  if ed and ed[0].get("cases"):
    lines += ["", "## Encode / decode (bf16; ours jitted vs PyTorch autocast + SDPA)", "",
              "| model | batch | status | ours enc img/s | ours dec img/s | torch enc img/s | "
              "torch dec img/s | ours/torch enc, dec | attention | fp32 parity enc, dec |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for c in ed[0]["cases"]:
      if c["status"] == "ok":
        j, t, ra, p = c["jax"], c["torch"], c.get("ratio_jax_over_torch", {}), c.get(
            "parity_float32") or {}
        lines.append(
            f"| {c['model']} | {c['batch_size']} | ok | {_f(j['encode_img_s'], 1)} | "
            f"{_f(j['decode_img_s'], 1)} | {_f(t['encode_img_s'], 1)} | {_f(t['decode_img_s'], 1)}"
            f" | {_f(ra.get('encode'), 2)}, {_f(ra.get('decode'), 2)} | "
            f"{c.get('attention_backend')} | {_f(p.get('encode_max_abs_diff'))}, "
            f"{_f(p.get('decode_max_abs_diff'))} |")
      else:
        lines.append(f"| {c['model_key']} | {c['batch_size']} | {c['status']} | {_why(c)} "
                     "| | | | | | |")

  tr = records.get("train_step", {}).get("results") or []
  if tr:
    lines += ["", "## Train step (bf16, 1 device; pixel = MSE + entropy, full = + LPIPS, REPA, "
              "GAN with random frozen networks)", "",
              "| model | objective | status | batch (tried) | ours img/s | step (s) | GFLOP/step "
              "| MFU | compile (s) | peak device mem (GiB) | torch img/s | ours/torch |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in tr:
      tried = ", ".join(f"{a['batch']}:{a['status']}" for a in r.get("batches_tried", []))
      if r["status"] == "ok":
        b = r["benchmark"]
        row = b["jax"] if r["objective"] == "pixel" else b["variants"]["full"]
        compile_s = b.get("jax_compile_s") if r["objective"] == "pixel" else row.get("compile_s")
        gflop = b.get("step_gflop") if r["objective"] == "pixel" else row.get("step_gflop")
        mem = r["device_memory"].get("peak_bytes_in_use")
        torch_r = b.get("torch", {}) if r["objective"] == "pixel" else {}
        mfu = row.get("mfu")
        lines.append(
            f"| {b['model']} | {r['objective']} | ok | {r['batch_size']} ({tried}) | "
            f"{_f(row['images_per_s'], 2)} | {_f(row['step_time_s'], 4)} | {_f(gflop, 1)} | "
            f"{_f(mfu * 100, 1) + ' %' if mfu is not None else '— (' + row.get('mfu_reason', '') + ')'} | "
            f"{_f(compile_s, 1)} | {_gib(mem) if mem is not None else '— (CPU)'} | "
            f"{_f(torch_r.get('images_per_s'), 2)} | {_f(b.get('ratio_jax_over_torch'), 2)} |")
      else:
        lines.append(f"| {r.get('model_key')} | {r.get('objective')} | {r['status']} | "
                     f"{tried} | {_why(r)} | | | | | | | |")

  gen = records.get("generator", {})
  lines += ["", "## Generator sampling (generator only; CFG batch; images/s = batch / (steps x "
            "one network evaluation))", ""]
  if gen.get("results") and gen["results"][0].get("cases"):
    lines += ["| model | status | batch | steps | sequence | forward (s) | images/s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in gen["results"][0]["cases"]:
      if c["status"] == "ok":
        lines.append(f"| {c['name']} | ok | {c['batch']} | {c['sampling_steps']} | "
                     f"{c['sequence_length']} | {_f(c['forward_s'], 4)} | "
                     f"{_f(c['images_per_s'], 2)} |")
      else:
        lines.append(f"| {c['name']} | {c['status']} | {_why(c)} | | | | |")
    if "ratio_1d_over_2d" in gen["results"][0]:
      lines += ["", f"1-D / 2-D sampling speed: {gen['results'][0]['ratio_1d_over_2d']:.2f}x"]
  else:
    lines.append(f"{gen.get('status', 'not run')}: {_why(gen) or _why((gen.get('results') or [{}])[0])}")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--budget", type=float, default=420.0, help="total seconds, install included "
                 "(default 420)")
  p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/accelerator_check",
                 help="output directory (default $OUT, else /tmp/accelerator_check)")
  p.add_argument("--cpu-smoke", action="store_true", help="every step at toy sizes on the CPU "
                 "(the test); never installs")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
  p.add_argument("--wheels", default="", help="offline install from this wheel directory "
                 "(benchmarks/accelerator_wheels.sh)")
  p.add_argument("--no-install", action="store_true", help="check what is missing, install "
                 "nothing")
  p.add_argument("--started-at", type=float, default=0.0, help=argparse.SUPPRESS)
  # subprocess side
  p.add_argument("--unit", choices=sorted(UNITS), help=argparse.SUPPRESS)
  p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
  p.add_argument("--result", default="", help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.unit:
    return unit_main(args)
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  unknown = sorted(set(steps) - set(STEPS))
  if unknown:
    print(f"accelerator_check: unknown --steps {unknown}; use some of {', '.join(STEPS)}",
          file=sys.stderr)
    return 2
  if args.wheels and not os.path.isdir(args.wheels):
    print(f"accelerator_check: --wheels {args.wheels}: not a directory", file=sys.stderr)
    return 2
  driver = Driver(args)
  rc = driver.run(steps)
  print(f"accelerator_check: {driver.out}/summary.md "
        f"({time.time() - driver.started:.0f} s of {args.budget:.0f})", flush=True)
  return rc


if __name__ == "__main__":
  sys.exit(main())
