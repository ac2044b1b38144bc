"""Encode / decode throughput: ours (JAX, jitted public API) vs the official PyTorch model (eager).

  python benchmarks/encode_decode.py --config=configs/sq64_256.py:B --batch_size=4
  python benchmarks/encode_decode.py --config=configs/sq64_256.py:L --batch_size=2
  python benchmarks/encode_decode.py --config=configs/sq64_256.py:L --compute_dtype=bfloat16  # GPU

Prints ONE JSON line: images/s of encode (images -> tokens) and decode (tokens -> images) for
  jax:   `softvq_jax.api.Tokenizer.encode/decode` (jitted) on the model of `--config`
         (`build_tokenizer(TokenizerConfig.from_config(config))`), NHWC inputs on the device;
  torch: the same architecture in PyTorch eager as the official code builds it (timm DINOv2 ViTs,
         `benchmarks/torch_reference.py`), NCHW inputs, under `torch.inference_mode()`.

Fairness, because the machines this runs on are often shared (noisy):
  - both models hold the same weights: the torch model's state dict is loaded into ours with the
    strict official-format loader, and the float32 outputs are checked to agree (max abs diff
    <= --atol) before anything is timed, so both sides provably compute the same function;
  - everything is warmed up first (JAX compiles, torch/oneDNN caches fill); compile time is
    reported separately, never inside a timing window;
  - timing windows of the two frameworks are interleaved (ABBA order: jax, torch, torch, jax, ...)
    so that load from other processes hits both alike; the median window is reported and every
    window is listed to show the spread;
  - torch uses as many intra-op threads as there are CPUs (`torch.set_num_threads`), as XLA:CPU
    does by default; JAX results are waited for with `jax.block_until_ready`, CUDA with
    `torch.cuda.synchronize`.

Batch size: `--batch_size`, else `config.batch_size` on an accelerator; on a CPU the default is 4
(the config's global training batch would take minutes per call). `--compute_dtype` overrides
`config.model.compute_dtype` (default float32; the configs' bfloat16 is for accelerators, and
torch then runs under `torch.autocast` in that dtype, as the official training does).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_model, model_name, timed_windows  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", None,
                              "images per call (default: 4 on CPU, config.batch_size otherwise)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timing windows per framework and direction "
                                "(interleaved; the median is reported)")
_WINDOW_S = flags.DEFINE_float("window_s", 2.0, "minimum length of one timing window in seconds "
                               "(a window is at least one call)")
_FRAMEWORK = flags.DEFINE_enum("framework", "both", ["both", "jax", "torch"], "what to time")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "float16"],
                           "activation dtype of both models (parameters stay float32)")
_ATOL = flags.DEFINE_float("atol", 1e-3, "parity guard: max abs diff allowed between the float32 "
                           "outputs of ours and torch (negative: skip the guard)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and inputs")



def run(config, *, batch_size: int | None, repeats: int, window_s: float, framework: str,
        compute_dtype: str, atol: float, seed: int, config_name: str = "") -> dict:
  """Builds both models with the same weights, checks parity, times them; returns the JSON dict."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import torch_reference  # pylint: disable=import-outside-toplevel
  from softvq_jax import api, config_lib  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import official, state_dict  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import vit  # pylint: disable=import-outside-toplevel

  config_lib.validate(config)
  backend = jax.default_backend()
  if batch_size is None:
    batch_size = 4 if backend == "cpu" else int(config.batch_size)
  cpus = os.cpu_count() or 1
  torch.set_num_threads(cpus)
  torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  cfg = tokenizer_lib.TokenizerConfig.from_config(config).replace(compute_dtype=compute_dtype)
  cfg32 = cfg.replace(compute_dtype="float32")

  # --- the same weights on both sides -------------------------------------------------------
  # LayerScale gammas are drawn in [0.1, 0.5] instead of DINOv2's 1e-5 so that the parity check
  # sees the attention and MLP branches (FLOPs are unchanged).
  tmodel = torch_reference.build_torch_tokenizer(cfg32, seed=seed, layer_scale=(0.1, 0.5))
  ours = tokenizer_lib.build_tokenizer(cfg32, seed=seed)
  state_dict.load_state_dict(ours, torch_reference.numpy_state_dict(tmodel),
                             source="torch reference", ignore=official.IGNORED_KEYS)
  # The loader leaves host NumPy arrays, many of them transposed views (Linear [out, in] -> [in,
  # out]); jit would re-copy all of them on every call (measured: SoftVQ-L encode 1.17 instead of
  # 1.49 img/s). `load_tokenizer` moves them to the device once; do the same.
  graphdef, params = nnx.split(ours)
  ours = nnx.merge(graphdef, jax.device_put(params))
  tok32 = api.Tokenizer(cfg32, ours)

  rng = np.random.RandomState(seed)
  s = cfg.image_size
  images = rng.uniform(-1, 1, (batch_size, s, s, 3)).astype(np.float32)  # NHWC
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch_device)  # NCHW

  # --- the timed model; compile first so compile time stays out of every measurement --------
  if compute_dtype == "float32":
    tok = tok32
  else:  # same parameters, the graph of a model whose activations are in compute_dtype
    graphdef, _ = nnx.split(tokenizer_lib.abstract_tokenizer(cfg))
    tok = api.Tokenizer(cfg, nnx.merge(graphdef, nnx.state(ours)))
  x_dev = jax.device_put(images)
  compile_s = {}
  t0 = time.perf_counter()
  tokens_np = np.array(tok.encode(x_dev))  # [B, N, e] float32 (a writable copy for torch)
  compile_s["encode"] = time.perf_counter() - t0
  z_dev = jax.device_put(tokens_np)
  t0 = time.perf_counter()
  jax.block_until_ready(tok.decode(z_dev))
  compile_s["decode"] = time.perf_counter() - t0
  z_torch = torch.from_numpy(tokens_np).to(torch_device)
  tmodel.to(torch_device)

  # --- parity guard in float32, before any timing --------------------------------------------
  # XLA:CPU computes float32 matmuls in float32 whatever the precision setting, so on a CPU this
  # checks the very executables that are timed. GPUs default to TF32 in some places (JAX matmuls,
  # torch convolutions), so there both sides are forced to full float32 for the check.
  parity = None
  if atol >= 0:
    on_gpu = torch_device == "cuda"
    precision = jax.default_matmul_precision("highest" if on_gpu else None)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if on_gpu:
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
      with torch.inference_mode():
        ref_z = tmodel.encode(timages)
        ref_img = tmodel.decode(ref_z).permute(0, 2, 3, 1).cpu().numpy()  # NHWC
      ref_z = ref_z.cpu().numpy()
      with precision:
        z = np.asarray(tok32.encode(images))
        img = np.asarray(tok32.decode(ref_z))
    finally:
      torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    parity = {"encode_max_abs_diff": float(np.max(np.abs(z - ref_z))),
              "decode_max_abs_diff": float(np.max(np.abs(img - ref_img))),
              "decode_max_abs_ref": float(np.max(np.abs(ref_img))), "atol": atol}
    if not (parity["encode_max_abs_diff"] <= atol and parity["decode_max_abs_diff"] <= atol):
      raise AssertionError(f"ours and the torch reference disagree in float32: {parity}")

  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

  def torch_call(fn, arg):
    def call():
      amp = (torch.autocast(torch_device, dtype=getattr(torch, compute_dtype))
             if compute_dtype != "float32" else contextlib.nullcontext())
      with torch.inference_mode(), amp:
        fn(arg)
      sync()
    return call

  fns = {}
  if framework in ("both", "jax"):
    fns["jax_encode"] = lambda: jax.block_until_ready(tok.encode(x_dev))
    fns["jax_decode"] = lambda: jax.block_until_ready(tok.decode(z_dev))
  if framework in ("both", "torch"):
    fns["torch_encode"] = torch_call(tmodel.encode, timages)
    fns["torch_decode"] = torch_call(tmodel.decode, z_torch)
  for f in fns.values():  # warm-up: caches, allocators, thread pools
    f()
    f()

  result = {
      "benchmark": "encode_decode", "config": config_name, "model": model_name(config),
      "image_size": s, "num_latent_tokens": cfg.num_latent_tokens, "batch_size": batch_size,
      "compute_dtype": compute_dtype,
      "attention_backend": (vit._default_backend(  # pylint: disable=protected-access
                                cfg.dtype, vit.resolve_platform(cfg.platform))
                            if cfg.attention_backend == "auto" else cfg.attention_backend),
      "device": {"jax": f"{backend}:{jax.devices()[0].device_kind}", "torch": torch_device,
                 "cpu": cpu_model(), "cpus": cpus},
      "threads": {"torch": torch.get_num_threads(), "xla_cpu": cpus},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "torch": torch.__version__,
                   "timm": timm.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "parity_float32": parity, "jax_compile_s": {k: round(v, 2) for k, v in compile_s.items()},
      "repeats": repeats, "window_s": window_s,
  }
  load_before = os.getloadavg()[0]
  for direction in ("encode", "decode"):
    # One direction at a time so each window measures one program; frameworks interleave.
    sub = {k: f for k, f in fns.items() if k.endswith(direction)}
    if not sub:
      continue
    rates = timed_windows(sub, batch_size, repeats, window_s)
    for name, r in rates.items():
      fw = name.split("_")[0]
      result.setdefault(fw, {})[f"{direction}_img_s"] = round(statistics.median(r), 3)
      # Load from other processes only ever slows a window down: the best one is the least
      # disturbed estimate, reported beside the median.
      result[fw][f"{direction}_img_s_best"] = round(max(r), 3)
      result[fw][f"{direction}_windows"] = [round(v, 3) for v in r]
  # 1-minute load average (this process counts ~1-2): shows whether other processes competed.
  result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
  if "jax" in result and "torch" in result:
    result["ratio_jax_over_torch"] = {
        d: round(result["jax"][f"{d}_img_s"] / result["torch"][f"{d}_img_s"], 3)
        for d in ("encode", "decode")}
    result["ratio_jax_over_torch_best"] = {
        d: round(result["jax"][f"{d}_img_s_best"] / result["torch"][f"{d}_img_s_best"], 3)
        for d in ("encode", "decode")}
    # Window i of jax and window i of torch ran back to back, under about the same load: the
    # median of these paired ratios is the estimate least moved by load that comes and goes.
    result["ratio_jax_over_torch_paired"] = {
        d: round(statistics.median(
            j / t for j, t in zip(result["jax"][f"{d}_windows"], result["torch"][f"{d}_windows"])),
            3) for d in ("encode", "decode")}
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/sq64_256.py:B")
  result = run(_CONFIG.value, batch_size=_BATCH.value, repeats=_REPEATS.value,
               window_s=_WINDOW_S.value, framework=_FRAMEWORK.value, compute_dtype=_DTYPE.value,
               atol=_ATOL.value, seed=_SEED.value,
               config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
