"""Evaluation throughput: images/s of `evaluate.Evaluator` (the `--mode=eval` / in-loop pass).

  python benchmarks/eval.py --config=configs/demo.py --batch_size=32 --num_images=128
  python benchmarks/eval.py --config=configs/sq64_256.py:B --config.model.compute_dtype=float32 \
      --batch_size=8 --num_images=24

(BENCHMARKS.md, "Evaluation", has the numbers and the exact commands behind them.)

Prints ONE JSON line for the config's model on the configured mesh (`config.mesh_shape`):
  * compile: ahead-of-time compile seconds of the evaluation step (encode + decode + uint8 round
    trip + PSNR/SSIM/LPIPS + codebook statistics) and of the FID Inception, apart from any timing;
  * first calls: the jitted step and Inception called once each before any timing (jit compiles
    again there: the AOT executables do not fill jit's cache), so no timed pass compiles;
  * steady state, the evaluation exactly as `Evaluator.__call__` runs it (demo data pipeline built,
    batches to the mesh, the step, Inception, gathers to the host, FID from float64 statistics):
      - `uncached`: the first evaluation of a run — the real images' Inception statistics are
        computed too (2 Inception passes per batch), the statistics file is written;
      - `cached`: every later evaluation — the real statistics come from `<workdir>/fid_stats`
        (1 Inception pass per batch);
    both interleaved (uncached, cached, cached, uncached, ...), medians over `--repeats`;
  * parts, each timed alone on one batch already on the mesh (medians of `--part_repeats` calls):
    `Evaluator._inception` (what the FID costs), `Evaluator._step` (the rest of the device work)
    and the host data pipeline (one pass over the demo eval split, no device work); and, timed
    inside the passes, the host's `metrics.frechet_distance` (scipy `sqrtm` of a 2048 x 2048
    float64 product; a fixed cost per evaluation, twice when the covariances are singular, i.e.
    with fewer than 2048 images). Shares: `inception_share_*` = Inception calls of a pass x its
    time alone / the pass's median; `frechet_share_*` = the Frechet distance / the pass's median.

The weights are random (`config.pretrained.allow_random_init=True` for the Inception and LPIPS-VGG,
a freshly initialised tokenizer): speed does not depend on them. The data are the demo photographs
(`config.data.source="demo"`, `demo_eval_size` = `--num_images`), so this runs anywhere. The
1-minute load average is recorded before every timed pass (shared machines are noisy).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_model, model_name  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "global evaluation batch (0: config.eval.batch_size,"
                              " else config.batch_size)")
_NUM = flags.DEFINE_integer("num_images", 0, "images per evaluation pass = demo_eval_size (0: 4 "
                            "batches)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed passes of each kind (uncached / cached, "
                                "interleaved); the median is reported")
_PART_REPEATS = flags.DEFINE_integer("part_repeats", 5, "timed calls of each part (Inception, "
                                     "step) on one batch")
_WORKDIR = flags.DEFINE_string("workdir", "", "where the FID statistics are cached (default: a "
                               "temporary directory, removed at the end)")
_SEED = flags.DEFINE_integer("seed", 0, "tokenizer weights")


def _loadavg() -> float:
  return round(os.getloadavg()[0], 2)


def _median_call(fn, repeats: int) -> tuple[float, list[float]]:
  """Median seconds of `fn()` (which waits for its result) after one untimed call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def prepare_config(config, *, batch_size: int = 0, num_images: int = 0):
  """A copy of `config` set up for the benchmark: demo data, random frozen networks allowed,
  `eval.batch_size` and `demo_eval_size` = the images of one pass."""
  import copy  # pylint: disable=import-outside-toplevel
  config = copy.deepcopy(config)
  gbs = int(batch_size or config.eval.batch_size or config.batch_size)
  n = int(num_images or 4 * gbs)
  if n < 2:
    raise ValueError(f"--num_images={n}: the evaluation needs at least 2 images")
  config.data.source = "demo"
  config.data.demo_eval_size = n
  config.eval.batch_size = gbs
  config.eval.num_images = n
  config.eval.reference_stats = ""
  config.pretrained.allow_random_init = True
  config.pretrained.inception = ""
  config.pretrained.lpips = ""
  return config


def run(config, *, batch_size: int = 0, num_images: int = 0, repeats: int = 3,
        part_repeats: int = 5, workdir: str = "", seed: int = 0, config_name: str = "") -> dict:
  """Builds the Evaluator for `config` and times it (see the module docstring): a JSON dict."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from softvq_jax import config_lib, data, evaluate, metrics, pixels, sharding  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  if repeats < 1 or part_repeats < 1:
    raise ValueError("repeats and part_repeats must be >= 1")
  config = prepare_config(config, batch_size=batch_size, num_images=num_images)
  config_lib.validate(config)
  gbs, n = int(config.eval.batch_size), int(config.eval.num_images)
  s = int(config.image_size)
  own_workdir = not workdir
  workdir = workdir or tempfile.mkdtemp(prefix="softvq_eval_bench_")

  mesh = sharding.create_mesh(config.mesh_shape)
  if gbs % mesh.size:
    raise ValueError(f"--batch_size={gbs} must be a multiple of the mesh's {mesh.size} devices")
  cfg = tokenizer_lib.TokenizerConfig.from_config(config)
  t0 = time.perf_counter()
  model = tokenizer_lib.build_tokenizer(cfg, seed=seed)
  graphdef, _ = nnx.split(model)
  params = evaluate.replicated_params(model, mesh)
  del model
  evaluator = evaluate.Evaluator(config, mesh, graphdef, workdir)
  build_s = time.perf_counter() - t0

  # --- compile, ahead of time and apart from every timing ------------------------------------
  bsh = evaluator.batch_sharding
  images_sds = jax.ShapeDtypeStruct((gbs, s, s, 3), jnp.uint8, sharding=bsh)
  mask_sds = jax.ShapeDtypeStruct((gbs,), jnp.bool_, sharding=bsh)
  float_sds = jax.ShapeDtypeStruct((gbs, s, s, 3), jnp.float32, sharding=bsh)
  t0 = time.perf_counter()
  evaluator._step.lower(params, evaluator.nets.lpips_state, images_sds,  # pylint: disable=protected-access
                        mask_sds).compile()
  compile_step_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  evaluator._inception.lower(evaluator.nets.inception_state, float_sds).compile()  # pylint: disable=protected-access
  compile_inception_s = time.perf_counter() - t0

  # --- the parts, alone, on one batch already on the mesh -------------------------------------
  rng = np.random.RandomState(seed)
  batch_u8 = rng.randint(0, 256, (gbs, s, s, 3)).astype(np.uint8)
  images = jax.device_put(batch_u8, bsh)
  mask = jax.device_put(np.ones((gbs,), bool), bsh)
  x = jax.device_put(np.asarray(pixels.to_model_range(batch_u8)), bsh)
  inc_state, lp_state = evaluator.nets.inception_state, evaluator.nets.lpips_state
  # First calls: jit compiles here (again: the AOT executables above do not fill jit's cache), so
  # that no pass below includes a compilation. The Inception also sees the step's output, whose
  # sharding is what the passes give it.
  t0 = time.perf_counter()
  out = jax.block_until_ready(evaluator._step(params, lp_state, images, mask))  # pylint: disable=protected-access
  first_step_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(evaluator._inception(inc_state, out["fake"]))  # pylint: disable=protected-access
  first_inception_s = time.perf_counter() - t0
  del out
  load_parts = _loadavg()
  inception_s, inception_times = _median_call(
      lambda: jax.block_until_ready(evaluator._inception(inc_state, x)), part_repeats)  # pylint: disable=protected-access
  step_s, step_times = _median_call(
      lambda: jax.block_until_ready(evaluator._step(params, lp_state, images, mask)),  # pylint: disable=protected-access
      part_repeats)

  stats_path = evaluator._stats_path(config.data.eval_split, n)  # pylint: disable=protected-access

  # The host-side Frechet distance (scipy sqrtm of a 2048 x 2048 product, float64) is timed inside
  # the passes by wrapping the function `evaluate` calls: a fixed cost per evaluation.
  fid_times: list[float] = []
  frechet = metrics.frechet_distance

  def timed_frechet(*args, **kwargs):
    t = time.perf_counter()
    out = frechet(*args, **kwargs)
    fid_times.append(time.perf_counter() - t)
    return out

  metrics.frechet_distance = timed_frechet

  def one_pass(cached: bool) -> tuple[float, dict]:
    if not cached and os.path.exists(stats_path):
      os.remove(stats_path)
    if cached and not os.path.exists(stats_path):
      raise AssertionError(f"no cached statistics at {stats_path}")
    t = time.perf_counter()
    r = evaluator(params, num_images=n)
    return time.perf_counter() - t, r

  try:
    # --- steady-state passes (jit's cache was filled by the parts' warm-up calls) --------------
    passes = {"uncached": [], "cached": []}
    loads = {"uncached": [], "cached": []}
    eval_seconds = {"uncached": [], "cached": []}
    results = {}
    for r in range(repeats):
      order = ("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")
      for kind in order:
        loads[kind].append(_loadavg())
        sec, res = one_pass(cached=kind == "cached")
        passes[kind].append(sec)
        eval_seconds[kind].append(res["eval_seconds"])
        results[kind] = res
    if results["uncached"]["num_images"] != n or results["cached"]["num_images"] != n:
      raise AssertionError(f"a pass evaluated {results['uncached']['num_images']} / "
                           f"{results['cached']['num_images']} images, not {n}")
  finally:
    metrics.frechet_distance = frechet
  fid_s = statistics.median(fid_times)

  def data_pass():
    it = data.build_eval_pipeline(config.data, image_size=s, global_batch_size=gbs,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(),
                                  split=config.data.eval_split)
    for _ in range(it.num_batches):
      next(it)

  data_s, data_times = _median_call(data_pass, max(1, min(part_repeats, 3)))
  num_batches = -(-n // gbs)
  med = {k: statistics.median(v) for k, v in passes.items()}

  if own_workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  metric_keys = ("psnr", "ssim", "lpips_random_vgg", "rfid_random_inception", "codebook_usage")
  return {
      "benchmark": "eval", "config": config_name, "model": model_name(config),
      "image_size": s, "num_latent_tokens": cfg.num_latent_tokens,
      "compute_dtype": cfg.compute_dtype, "batch_size": gbs, "num_images": n,
      "num_batches": num_batches, "mesh_shape": dict(mesh.shape),
      "device": {"jax": f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
                 "num_devices": jax.device_count(), "cpu": cpu_model(),
                 "cpus": os.cpu_count()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "random_networks": {"inception": evaluator.nets.random_inception,
                          "lpips": evaluator.nets.random_lpips, "tokenizer": True},
      "build_s": round(build_s, 2),
      "compile_s": {"step": round(compile_step_s, 2), "inception": round(compile_inception_s, 2),
                    "total": round(compile_step_s + compile_inception_s, 2)},
      "first_call_s": {"step": round(first_step_s, 2), "inception": round(first_inception_s, 2)},
      "uncached": {"images_per_s": round(n / med["uncached"], 4),
                   "seconds": round(med["uncached"], 4),
                   "seconds_windows": [round(v, 4) for v in passes["uncached"]],
                   "evaluator_eval_seconds": [round(v, 4) for v in eval_seconds["uncached"]],
                   "loadavg_1m": loads["uncached"]},
      "cached": {"images_per_s": round(n / med["cached"], 4), "seconds": round(med["cached"], 4),
                 "seconds_windows": [round(v, 4) for v in passes["cached"]],
                 "evaluator_eval_seconds": [round(v, 4) for v in eval_seconds["cached"]],
                 "loadavg_1m": loads["cached"]},
      "parts": {
          "loadavg_1m": load_parts,
          "inception_batch_s": round(inception_s, 5),
          "inception_images_per_s": round(gbs / inception_s, 4),
          "inception_batch_s_windows": [round(v, 5) for v in inception_times],
          "step_batch_s": round(step_s, 5),
          "step_images_per_s": round(gbs / step_s, 4),
          "step_batch_s_windows": [round(v, 5) for v in step_times],
          "data_pass_s": round(data_s, 4),
          "data_pass_s_windows": [round(v, 4) for v in data_times],
          "frechet_distance_s": round(fid_s, 4),
          "frechet_distance_s_windows": [round(v, 4) for v in fid_times],
      },
      # Inception calls per pass x their time alone / the pass's median time.
      "inception_share_uncached": round(2 * num_batches * inception_s / med["uncached"], 4),
      "inception_share_cached": round(num_batches * inception_s / med["cached"], 4),
      "frechet_share_uncached": round(fid_s / med["uncached"], 4),
      "frechet_share_cached": round(fid_s / med["cached"], 4),
      "metrics_last_pass": {k: round(float(results["uncached"][k]), 6)
                            for k in metric_keys if k in results["uncached"]},
      "repeats": repeats, "part_repeats": part_repeats,
      "loadavg_1m_end": _loadavg(),
      # Same weights and images: the cached pass must reproduce the uncached one's metrics (its
      # real statistics come from the file the uncached pass wrote).
      "cached_equals_uncached": {
          k: bool(np.isclose(results["cached"][k], results["uncached"][k], rtol=1e-6, atol=1e-6))
          for k in ("psnr", "ssim", "rfid_random_inception")},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  result = run(_CONFIG.value, batch_size=_BATCH.value, num_images=_NUM.value,
               repeats=_REPEATS.value, part_repeats=_PART_REPEATS.value, workdir=_WORKDIR.value,
               seed=_SEED.value, config_name=name)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
