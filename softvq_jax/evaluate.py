"""Evaluation harness: rFID, PSNR, SSIM, LPIPS, codebook usage — in the loop and `--mode=eval`.

The protocol (pinned, so numbers are comparable run to run and with the paper's table):
1. Real images: the eval split, centre-cropped to the model's size exactly as the model sees them
   (`data.build_eval_pipeline`: ADM `center_crop_arr`), uint8.
2. Reconstructions: EMA weights, encode + decode, then the uint8 round trip every saved image
   goes through (clip to [-1, 1], (x + 1) * 127.5, round) — metrics are computed on those uint8
   images, never on the raw float output.
3. rFID: pool features (2048-d) of the FID Inception-v3 (pytorch-fid numerics: bilinear resize to
   299 inside the network) of the real crops vs of the reconstructions; float64 statistics on the
   host, `metrics.frechet_distance` (pytorch-fid's formula). The real statistics are cached per
   (data, split, size, count) under `<workdir>/fid_stats/` (a local path or a gs:// URL).
   Process 0 alone reads the cache, decides whether the real images' Inception pass runs, and
   computes the FIDs, which it broadcasts: hosts without a shared file system still run the same
   collectives and report the same numbers. Optionally also FID against a user-supplied
   reference `.npz` (`config.eval.reference_stats`, e.g. an ADM reference batch — a different
   protocol, reported as `fid_reference`).
4. PSNR / SSIM on uint8 with data_range 255 (`metrics.py`; scikit-image's definitions), LPIPS-VGG
   on the [-1, 1] images; all as means over images.
5. Codebook usage: fraction of codes that are the argmax of some token over the whole pass, and
   the perplexity of the mean soft assignment, per codebook then averaged.

Everything heavy runs in one jitted, batch-sharded step over the mesh; per-image values and
features are gathered to every host with `process_allgather` and padded slots (mask=False) dropped
there. Without pretrained Inception/LPIPS files the networks are randomly initialised only when
`config.pretrained.allow_random_init` is set, and the metric names then say so
(`rfid_random_inception`, `lpips_random_vgg`) so nobody mistakes them for real rFID/LPIPS.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from softvq_jax import data, metrics, paths, pixels, pretrained, sharding, visualize
from softvq_jax.models import quantizer as quantizer_lib

Array = jax.Array


def make_eval_step(tok_graphdef, lpips_graphdef):
  """(tok_params, lpips_state, images uint8 [B, S, S, 3], mask [B]) -> dict (batch-sharded).

  Outputs: psnr/ssim/lpips [B], the uint8 reconstructions [B, S, S, 3] and their [-1, 1] floats
  `fake` (what the Inception sees), code_hist / prob_sum [C, K] (sums over the valid examples).
  The Inception runs in its own jitted function (`make_inception_fn`), compiled once and shared by
  real and reconstructed images.
  """

  def step(tok_params, lpips_state, images, mask):
    model = nnx.merge(tok_graphdef, tok_params)
    x = pixels.to_model_range(images)
    real_u8 = pixels.to_uint8(x)
    z = model.pre_quant(x)
    z_q = model.quantize(z, with_stats=False).z_q
    recon_u8 = pixels.to_uint8(model.decode(z_q))
    fake = pixels.to_model_range(recon_u8)
    lp = nnx.merge(lpips_graphdef, lpips_state)
    out = {
        "psnr": metrics.psnr(real_u8, recon_u8),
        "ssim": metrics.ssim(real_u8, recon_u8),
        "lpips": lp(x, fake).astype(jnp.float32),
        "reconstruction": recon_u8,
        "fake": fake,
    }
    q = model.quantize
    probs = quantizer_lib.code_probs(z, q.embedding[...], tau=q.tau, l2_norm=q.l2_norm)
    w = mask.astype(jnp.float32)[:, None, None, None]  # [B, 1, 1, 1]
    k = probs.shape[-1]
    onehot = jax.nn.one_hot(jnp.argmax(probs, axis=-1), k, dtype=jnp.float32)
    out["code_hist"] = jnp.sum(onehot * w, axis=(0, 2))   # [C, K]
    out["prob_sum"] = jnp.sum(probs * w, axis=(0, 2))     # [C, K]
    return out

  return step


def make_inception_fn(inception_graphdef):
  """(inception_state, images [B, H, W, 3] float in [-1, 1] or uint8) -> {"pool", "logits"}."""

  def fn(state, images):
    if images.dtype == jnp.uint8:
      images = pixels.to_model_range(images)
    return nnx.merge(inception_graphdef, state)(images)

  return fn


def _gather(x: Array) -> np.ndarray:
  """A global array -> the whole array as NumPy on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class _Networks:
  inception_graphdef: Any
  inception_state: Any
  lpips_graphdef: Any
  lpips_state: Any
  random_inception: bool
  random_lpips: bool


def _load_networks(config, mesh) -> _Networks:
  rep = sharding.replicated(mesh)
  inception, inc_random = pretrained.load_inception(config.pretrained, seed=config.seed)
  lp, lp_random = pretrained.load_lpips(config.pretrained, seed=config.seed)
  ig, ist = nnx.split(inception)
  lg, lst = nnx.split(lp)
  return _Networks(ig, jax.device_put(ist, rep), lg, jax.device_put(lst, rep), inc_random,
                   lp_random)


def fid_stats_name(data_config, *, split: str, image_size: int, num_images: int,
                   random_inception: bool) -> str:
  """The file name of the cached real statistics in `<workdir>/fid_stats/`:
  `<source>_<data>_<split>_<size>px_<count>[_random].npz` (count 0 = the whole split)."""
  d = data_config
  where = "photos" if d.source == "demo" else (paths.resolve(d.path).name if d.path
                                               else d.tfds_name)
  return (f"{d.source}_{where}_{split}_{image_size}px_{num_images}"
          f"{'_random' if random_inception else ''}.npz")


class Evaluator:
  """The compiled evaluation of one config on one mesh; call it with generator parameters.

  `evaluator(params, num_images=None) -> dict` of metrics (floats); `evaluator.last_grid` holds
  the input | reconstruction grid of the first images. `params` may be sharded any way (the
  training state's EMA) or replicated.
  """

  def __init__(self, config, mesh, tok_graphdef, workdir: str):
    self.config = config
    self.mesh = mesh
    self.workdir = workdir
    self.nets = _load_networks(config, mesh)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._step = jax.jit(make_eval_step(tok_graphdef, self.nets.lpips_graphdef))
    self._inception = jax.jit(make_inception_fn(self.nets.inception_graphdef))
    self.last_grid: np.ndarray | None = None

  def _stats_path(self, split: str, num_images: int) -> str:
    return str(paths.resolve(self.workdir) / "fid_stats" / fid_stats_name(
        self.config.data, split=split, image_size=self.config.image_size,
        num_images=num_images, random_inception=self.nets.random_inception))

  def __call__(self, params, *, num_images: int | None = None, split: str | None = None
               ) -> dict[str, float]:
    cfg = self.config
    split = split or cfg.data.eval_split
    gbs = int(cfg.eval.batch_size or cfg.batch_size)
    it = data.build_eval_pipeline(cfg.data, image_size=cfg.image_size, global_batch_size=gbs,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), split=split)
    num_batches = it.num_batches
    if num_images:
      num_batches = min(num_batches, math.ceil(num_images / gbs))
    stats_path = self._stats_path(split, num_images or 0)
    # Process 0 alone looks for (and reads) the cached real statistics and tells the others:
    # every process must run the same collectives (the real images' Inception pass or not), and
    # without a shared file system their own views of the workdir would disagree.
    cached_stats = _load_cached_stats(stats_path) if jax.process_index() == 0 else None
    cached = bool(_from_process_0(np.int32(cached_stats is not None)))
    real_stats = metrics.FeatureStats(2048)
    fake_stats = metrics.FeatureStats(2048)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = 0
    hist = probs = None
    logits = []
    t0 = time.time()
    for i in range(num_batches):
      local = next(it)
      batch = data.make_global_batch({"image": local["image"], "mask": local["mask"]}, self.mesh)
      out = self._step(params, self.nets.lpips_state, batch["image"], batch["mask"])
      fake_out = self._inception(self.nets.inception_state, out["fake"])
      mask = _gather(batch["mask"]).astype(bool)
      if num_images:  # the last batch may run past the requested count
        room = num_images - n
        keep = np.cumsum(mask) <= room
        mask &= keep
      for k in sums:
        v = _gather(out[k])[mask].astype(np.float64)
        sums[k] += float(v.sum())
      fake_stats.update(_gather(fake_out["pool"]), mask)
      logits.append(_gather(fake_out["logits"])[mask])
      if not cached:
        real = self._inception(self.nets.inception_state, pixels.to_model_range(batch["image"]))
        real_stats.update(_gather(real["pool"]), mask)
      h, p = _gather(out["code_hist"]), _gather(out["prob_sum"])
      hist, probs = (h, p) if hist is None else (hist + h, probs + p)
      if i == 0:
        k = min(cfg.eval.num_grid_images, int(mask.sum()))
        rec = _gather(out["reconstruction"])[mask][:k]
        real = _gather(batch["image"])[mask][:k]
        self.last_grid = visualize.image_grid([real, rec])
      n += int(mask.sum())
    if n < 2:
      raise ValueError(f"evaluation saw {n} valid images; it needs at least 2 (check "
                       f"config.data / the {split!r} split)")
    inc_sfx = "_random_inception" if self.nets.random_inception else ""
    fid_names = [f"rfid{inc_sfx}"] + ([f"fid_reference{inc_sfx}"] if cfg.eval.reference_stats
                                      else [])

    def fids() -> list[float]:  # on process 0: it holds the cached statistics
      mu_f, sigma_f = fake_stats.mean_cov()
      if cached_stats is not None:
        mu_r, sigma_r = cached_stats
      else:
        mu_r, sigma_r = real_stats.mean_cov()
        _save_stats(real_stats, stats_path)
      out = [metrics.frechet_distance(mu_r, sigma_r, mu_f, sigma_f)]
      if cfg.eval.reference_stats:
        mu_ref, sigma_ref = metrics.load_stats(cfg.eval.reference_stats)
        out.append(metrics.frechet_distance(mu_ref, sigma_ref, mu_f, sigma_f))
      return out

    fid_values = _computed_on_process_0(fids, len(fid_names), what="the FID")
    avg_p = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-12)
    perplexity = np.exp(-np.sum(avg_p * np.log(avg_p + quantizer_lib.ENTROPY_EPS), axis=-1))
    result = {
        "num_images": n,
        **dict(zip(fid_names, fid_values)),
        "psnr": sums["psnr"] / n,
        "ssim": sums["ssim"] / n,
        f"lpips{'_random_vgg' if self.nets.random_lpips else ''}": sums["lpips"] / n,
        "codebook_usage": float(np.mean(hist > 0)),
        "codebook_perplexity": float(np.mean(perplexity)),
        "eval_seconds": time.time() - t0,
    }
    is_mean, is_std = metrics.inception_score(np.concatenate(logits), splits=min(10, n))
    result[f"inception_score{inc_sfx}"] = is_mean
    result[f"inception_score_std{inc_sfx}"] = is_std
    result["images_per_s"] = n / result["eval_seconds"]
    return result


def replicated_params(model: nnx.Module, mesh) -> Any:
  """An NNX model's parameters, replicated on `mesh` (standalone evaluation of one checkpoint)."""
  _, params = nnx.split(model)
  return jax.device_put(params, sharding.replicated(mesh))


def evaluate_checkpoint(config, workdir: str, checkpoint: str | None) -> dict[str, Any]:
  """`--mode=eval`: evaluate a tokenizer (ours: the workdir's newest EMA, or an official-format
  directory / hub id given as `checkpoint`) on `config.data.eval_split`; writes
  `<workdir>/eval/<name>.json` and `<name>.png` (inputs over reconstructions)."""
  from softvq_jax import api  # pylint: disable=import-outside-toplevel
  mesh = sharding.create_mesh(config.mesh_shape)
  tok, source = api.load_run_tokenizer(config, checkpoint or workdir)
  graphdef, _ = nnx.split(tok.model)
  evaluator = Evaluator(config, mesh, graphdef, workdir)
  num = int(config.eval.num_images) or None
  result = evaluator(replicated_params(tok.model, mesh), num_images=num)
  result.update({"checkpoint": _describe_source(source),
                 "split": config.data.eval_split, "image_size": config.image_size,
                 "data": config.data.source, "device": jax.devices()[0].device_kind,
                 "num_devices": jax.device_count(),
                 "protocol": "centre crop, uint8 reconstructions, pytorch-fid Inception pool "
                             "features, skimage PSNR/SSIM (data_range 255), LPIPS-VGG v0.1"})
  if jax.process_index() == 0:
    out_dir = paths.resolve(workdir) / "eval"
    name = f"eval_{config.data.eval_split}_{result['num_images']}"
    paths.write_json(out_dir / f"{name}.json", result)
    visualize.save_png(out_dir / f"{name}.png", evaluator.last_grid)
    logging.info("evaluation of %s: %s", source, result)
  return result


def _describe_source(source: str) -> str:
  """The evaluated checkpoint as recorded: an absolute path or URL if it is a location, else the
  hub id as given."""
  path = paths.resolve(source)
  return str(path) if paths.is_url(source) or path.exists() else source


# ------------------------------------------------------------------------------------------------
# Decisions taken by process 0 for all processes.
# ------------------------------------------------------------------------------------------------


def _from_process_0(value: np.ndarray) -> np.ndarray:
  """Process 0's `value` (an integer array of the same shape on every process) on every
  process; the value itself in a single-process run."""
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def _computed_on_process_0(fn, size: int, *, what: str) -> list[float]:
  """Runs `fn() -> list[float]` (`size` values) on process 0 only and gives its result, bit for
  bit, to every process.

  Why: the inputs of `fn` may exist on process 0 alone (a cache file on its local disk), and all
  processes must report the same numbers. float64 values travel as pairs of uint32 (a broadcast
  of float64 would pass through float32 when jax_enable_x64 is off). If `fn` fails, process 0
  re-raises its error and the others raise one that points to process 0's log, instead of
  waiting forever for a broadcast that never comes.
  """
  values, error = np.zeros((size,), np.float64), None
  if jax.process_index() == 0:
    try:
      values = np.asarray(fn(), np.float64).reshape(size)
    except Exception as e:  # pylint: disable=broad-except  # re-raised below, after the broadcast
      error = e
  payload = np.concatenate([np.array([error is not None], np.uint32), values.view(np.uint32)])
  payload = _from_process_0(payload).astype(np.uint32)
  if error is not None:
    raise error
  if payload[0]:
    raise RuntimeError(f"process 0 failed to compute {what}; its log has the error")
  return payload[1:].copy().view(np.float64).tolist()


def _load_cached_stats(path: str) -> tuple[np.ndarray, np.ndarray] | None:
  """The cached real statistics, or None when absent or unreadable (recomputed and rewritten)."""
  try:
    if not paths.resolve(path).exists():
      return None
    return metrics.load_stats(path)
  except (OSError, ValueError, KeyError) as e:  # truncated / foreign file: recompute
    logging.warning("ignoring the FID statistics cache %s (%s: %s); recomputing it", path,
                    type(e).__name__, e)
    return None


def _save_stats(stats: metrics.FeatureStats, path: str) -> None:
  """Writes the real statistics cache; a failure costs only the next evaluation's time."""
  try:
    stats.save(path)
  except OSError as e:
    logging.warning("could not write the FID statistics cache %s (%s); the next evaluation "
                    "recomputes the real statistics", path, e)
