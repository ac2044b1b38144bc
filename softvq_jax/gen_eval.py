"""Generation evaluation: gFID, Inception Score, precision / recall of a generator's samples.

    python -m softvq_jax.main --mode=eval --config=configs/demo_sit.py --workdir=DIR \
        --checkpoint=<generator> --tokenizer=<tokenizer> --config.sample.num_images=50000 \
        --config.gen_eval.reference=VIRTUAL_imagenet256_labeled.npz

(`--mode=eval` of a config with a `generator` section, `config_lib.is_generator_config`; a
tokenizer config still evaluates reconstructions, softvq_jax/evaluate.py.)

The protocol, pinned so numbers compare with the paper's (spec.md §8.3) and run to run:
1. Samples: `sample.num_images` images (50k = 50 per class) drawn by `--mode=sample`'s sharded,
   resumable chunk writer (softvq_jax/generate.py) with the sampler of `config.sample`; uint8, as
   every saved image. A rerun finishes missing chunks and re-uses the others.
2. Features: pool (2048-d) features of the same FID Inception-v3 port as the tokenizer evaluation
   (pytorch-fid numerics), computed chunk by chunk on each process's devices and saved next to
   the chunk (`p<process>/features_<k>.npz`, with a fingerprint of the Inception weights): a
   crash re-uses finished chunks' features, another Inception's are recomputed.
3. FID: float64 mean / covariance of the samples' features (`metrics.FeatureStats`) against the
   reference `mu` / `sigma`, `metrics.frechet_distance` (pytorch-fid's formula).
   The reference is either an ADM-format .npz (`mu`, `sigma`, and the reference batch's images
   `arr_0`, e.g. VIRTUAL_imagenet256_labeled.npz: ADM's statistics come from TensorFlow's
   Inception graph, whose resize differs slightly from pytorch-fid's; that is the published
   protocol and the paper's numbers use it), or statistics computed here over a data split,
   cached in `<workdir>/fid_stats/` under the tokenizer evaluation's naming
   (`evaluate.fid_stats_name`).
4. Inception Score as the ADM evaluator computes it (`metrics.adm_inception_score`): softmax of
   the classifier's logits without its bias (pool @ W), splits of 5000 consecutive samples.
5. Precision / recall (Kynkaenniemi et al. 2019, k = 3) as the ADM evaluator computes them
   (`metrics.precision_recall`), samples vs the reference images' features (arr_0's, computed
   once and cached in `<workdir>/fid_stats/`).
6. The JSON (`<workdir>/gen_eval/gen_eval_<N>.json`) holds the numbers and what produced them:
   sampler (mode, steps, Heun, cfg_scale, guidance interval, path / DiT schedule), seed, labels,
   generator checkpoint, tokenizer, reference, Inception, k.

Multi-process: each process draws its chunks and computes their features on its own devices (no
collective); process 0 then reads every process's feature files (so the sample folder must be
shared, e.g. gs://, as for `generate.load_samples`) and writes the result.
Without pretrained Inception weights the network is randomly initialised only with
`config.pretrained.allow_random_init`, and every metric name then ends in `_random_inception`.

In the training loop: `GenerationEvaluator(config, tokenizer, gen_cfg, workdir)(state)` samples
`gen_eval.in_loop_num_images` images in memory from the generator weights `state` and returns
the same metrics (the trainer integration calls it every N steps; see its docstring).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from softvq_jax import config_lib, data, evaluate, generate, metrics, paths, pretrained

FEATURES_PATTERN = "features{suffix}_{:06d}.npz"
OUT_DIR = "gen_eval"


class GenEvalError(generate.SampleError):
  """A user error of the generation evaluation (a missing reference, no samples asked for)."""


def gen_eval_settings(config):
  """config.gen_eval, or the defaults for a generator config written before the section existed."""
  return config.gen_eval if "gen_eval" in config else config_lib.gen_eval_config()


def validate(config) -> None:
  """Fail fast, naming the field, on values the evaluation cannot run with."""
  try:
    config_lib.validate_generation(config)  # the generator / sample sections
  except ValueError as e:
    raise GenEvalError(str(e)) from None
  ge = gen_eval_settings(config)
  if int(config.sample.num_images) < 2:
    raise GenEvalError(
        f"config.sample.num_images={config.sample.num_images}: --mode=eval of a generator needs "
        "the number of samples to draw and score, e.g. --config.sample.num_images=50000 (the "
        "paper's gFID: 50 per class)")
  for f in ("inception_batch_size", "nearest_k", "in_loop_num_images"):
    if int(ge[f]) <= 0:
      raise GenEvalError(f"config.gen_eval.{f} must be positive, got {ge[f]}")
  for f in ("reference_num_images", "precision_recall_reference_images"):
    if int(ge[f]) < 0:
      raise GenEvalError(f"config.gen_eval.{f} must be >= 0, got {ge[f]}")
  if ge.reference and not paths.is_url(ge.reference) and not paths.resolve(ge.reference).exists():
    raise GenEvalError(f"config.gen_eval.reference={ge.reference}: no such file; pass an "
                       "ADM-format reference batch (.npz with mu, sigma and arr_0, e.g. "
                       "VIRTUAL_imagenet256_labeled.npz), or --config.gen_eval.reference= "
                       "(empty) for statistics of config.data's gen_eval.reference_split")


# ------------------------------------------------------------------------------------------------
# Inception features.
# ------------------------------------------------------------------------------------------------


class InceptionFeatures:
  """uint8 images [N, S, S, 3] -> pool features [N, 2048] float32, jitted on this process's
  devices (batch sharded over them, the network replicated), `batch_size` images per call."""

  def __init__(self, inception: nnx.Module, batch_size: int, *, random_init: bool):
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh,
                                                      jax.sharding.PartitionSpec("data"))
    graphdef, state = nnx.split(inception)
    self._state = jax.device_put(state, rep)
    inception_fn = evaluate.make_inception_fn(graphdef)
    self._fn = jax.jit(lambda s, x: inception_fn(s, x)["pool"], in_shardings=(
        rep, self._batch_sharding), out_shardings=self._batch_sharding)
    self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    # The classifier's weight [2048, 1008]: the Inception Score's logits are pool @ W (no bias).
    self.fc_kernel = np.asarray(inception.fc.kernel[...], np.float64)
    # Which weights made a saved feature file: features of another Inception are recomputed,
    # never mixed (the classifier's weight stands for the network: it differs between files).
    self.fingerprint = hashlib.sha256(
        np.asarray(inception.fc.kernel[...], np.float32).tobytes()).hexdigest()[:16]
    self.random_init = random_init

  @property
  def suffix(self) -> str:
    """'_random_inception' on every metric (and cache) a random network produced."""
    return "_random_inception" if self.random_init else ""

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    out = []
    for start in range(0, len(images), self.batch_size):
      part = images[start:start + self.batch_size]
      n = len(part)
      if n < self.batch_size:  # one compiled shape
        part = np.concatenate([part, np.repeat(part[-1:], self.batch_size - n, axis=0)])
      pool = self._fn(self._state, jax.device_put(jnp.asarray(part), self._batch_sharding))
      out.append(np.asarray(pool, np.float32)[:n])
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def load_inception_features(config) -> InceptionFeatures:
  net, random_init = pretrained.load_inception(config.pretrained, seed=int(config.seed))
  return InceptionFeatures(net, int(gen_eval_settings(config).inception_batch_size),
                           random_init=random_init)


# ------------------------------------------------------------------------------------------------
# The reference.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
  """The real side: FID statistics (mu [2048], sigma [2048, 2048]) and, for precision / recall,
  pool features [M, 2048] of real images (None when the reference has no images)."""
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None
  record: dict  # what the JSON says about it


def _cache_dir(workdir) -> Any:
  return paths.resolve(workdir) / "fid_stats"


def _load_features_cache(path, fingerprint: str) -> np.ndarray | None:
  """Cached pool features made by the Inception `fingerprint`, else None (recomputed)."""
  try:
    if paths.resolve(path).exists():
      f = paths.load_npz(path, keys=("pool", "inception"))
      if str(f["inception"]) == fingerprint:
        return f["pool"]
      logging.warning("%s holds features of another Inception; recomputing them", path)
  except (OSError, ValueError, KeyError) as e:
    logging.warning("ignoring the feature cache %s (%s); recomputing it", path, e)
  return None


def adm_reference(path: str, workdir, features: InceptionFeatures, *, precision_recall: bool,
                  pr_images: int) -> Reference:
  """An ADM-format reference batch: FID against its `mu` / `sigma`; precision / recall against
  our Inception's features of its first `pr_images` images `arr_0` ([M, H, W, 3] uint8, cached
  in `<workdir>/fid_stats/`)."""
  try:
    mu, sigma = metrics.load_stats(path)
  except ValueError as e:
    raise GenEvalError(f"config.gen_eval.reference={path}: {e}") from None
  record = {"kind": "adm_npz", "path": paths.resolve_str(path), "fid_statistics": "mu, sigma of "
            "the file", "precision_recall_images": 0}
  if not precision_recall:
    return Reference(mu, sigma, None, record)
  name = paths.resolve(path).name.removesuffix(".npz")
  cache = _cache_dir(workdir) / f"adm_{name}_{pr_images}_pool{features.suffix}.npz"
  feats = _load_features_cache(cache, features.fingerprint)
  if feats is None:
    try:
      images = paths.load_npz(path, keys=("arr_0",))["arr_0"]
    except KeyError:
      logging.warning("%s has no arr_0 (reference images): no precision / recall", path)
      return Reference(mu, sigma, None, record)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise GenEvalError(f"config.gen_eval.reference={path}: arr_0 should be uint8 images [N, H, "
                         f"W, 3] (the ADM reference batch format), got {images.dtype} "
                         f"{images.shape}")
    images = images[:pr_images] if pr_images else images
    t0 = time.perf_counter()
    feats = features(images)
    logging.info("reference features of %d images of %s: %.1f s", len(feats), path,
                 time.perf_counter() - t0)
    paths.save_npz(cache, pool=feats, inception=np.str_(features.fingerprint))
  record["precision_recall_images"] = int(len(feats))
  return Reference(mu, sigma, feats, record)


def split_reference(config, workdir, features: InceptionFeatures, *, image_size: int,
                    precision_recall: bool) -> Reference:
  """Statistics of `gen_eval.reference_num_images` centre-cropped images of
  `data.<gen_eval.reference_split>` (the first ones, the eval pipeline's order; 0 = all), cached
  under the tokenizer evaluation's name (`evaluate.fid_stats_name`), plus the features of the
  first `precision_recall_reference_images` of them (0 = all) for precision / recall."""
  ge = gen_eval_settings(config)
  split, count = str(ge.reference_split), int(ge.reference_num_images)
  pr_images = int(ge.precision_recall_reference_images)  # 0 = all the statistics' images
  name = evaluate.fid_stats_name(config.data, split=split, image_size=image_size,
                                 num_images=count, random_inception=features.random_init)
  stats_path = _cache_dir(workdir) / name
  feats_path = _cache_dir(workdir) / name.replace(".npz", f"_pool{pr_images or count}.npz")
  record = {"kind": "split", "data": str(config.data.source), "split": split,
            "image_size": image_size, "statistics_file": str(stats_path)}
  cached = None
  if stats_path.exists():
    try:
      cached = metrics.load_stats(stats_path)
    except (OSError, ValueError, KeyError):
      cached = None
  feats = _load_features_cache(feats_path, features.fingerprint) if precision_recall else None
  if cached is not None and (feats is not None or not precision_recall):
    mu, sigma = cached
    n = int(paths.load_npz(stats_path).get("num_images", -1))
  else:
    stats, kept, n = metrics.FeatureStats(2048), [], 0
    it = data.build_eval_pipeline(config.data, image_size=image_size,
                                  global_batch_size=features.batch_size, split=split)
    t0 = time.perf_counter()
    for _ in range(it.num_batches):
      batch = next(it)
      images = np.asarray(batch["image"])[np.asarray(batch["mask"], bool)]
      if count:
        images = images[:count - n]
      if not len(images):
        break
      f = features(images)
      stats.update(f)
      if precision_recall and (not pr_images or sum(len(k) for k in kept) < pr_images):
        kept.append(f)
      n += len(images)
      if count and n >= count:
        break
    logging.info("reference statistics of %d images of %s: %.1f s", n, split,
                 time.perf_counter() - t0)
    mu, sigma = stats.mean_cov()
    metrics.save_stats(stats_path, mu, sigma, n)
    if precision_recall:
      feats = np.concatenate(kept)[:pr_images or None]
      paths.save_npz(feats_path, pool=feats, inception=np.str_(features.fingerprint))
  record.update(num_images=n, precision_recall_images=0 if feats is None else int(len(feats)))
  return Reference(mu, sigma, feats, record)


def load_reference(config, workdir, features: InceptionFeatures, *, image_size: int) -> Reference:
  ge = gen_eval_settings(config)
  if ge.reference:
    return adm_reference(str(ge.reference), workdir, features,
                         precision_recall=bool(ge.precision_recall),
                         pr_images=int(ge.precision_recall_reference_images))
  return split_reference(config, workdir, features, image_size=image_size,
                         precision_recall=bool(ge.precision_recall))


# ------------------------------------------------------------------------------------------------
# Metrics.
# ------------------------------------------------------------------------------------------------


def generation_metrics(pool: np.ndarray, reference: Reference, fc_kernel: np.ndarray, *,
                       nearest_k: int = metrics.PR_NEAREST_K, suffix: str = "") -> dict[str, Any]:
  """gFID, Inception Score (ADM) and precision / recall of samples' pool features [N, 2048]."""
  pool = np.asarray(pool, np.float32)
  stats = metrics.FeatureStats(pool.shape[1])
  stats.update(pool)
  mu, sigma = stats.mean_cov()
  is_mean, is_std = metrics.adm_inception_score(metrics.unbiased_logits(pool, fc_kernel))
  out: dict[str, Any] = {
      "num_images": int(len(pool)),
      f"fid{suffix}": metrics.frechet_distance(reference.mu, reference.sigma, mu, sigma),
      f"inception_score{suffix}": is_mean,
      f"inception_score_std{suffix}": is_std,
  }
  if reference.features is not None:
    p, r = metrics.precision_recall(reference.features, pool, k=nearest_k)
    out[f"precision{suffix}"], out[f"recall{suffix}"] = p, r
  else:
    out[f"precision{suffix}"] = out[f"recall{suffix}"] = None
  return out


# ------------------------------------------------------------------------------------------------
# Features of the sample chunks (resumable).
# ------------------------------------------------------------------------------------------------


def features_path(out_dir, process: int, chunk: int, suffix: str):
  return paths.resolve(out_dir) / f"p{process}" / FEATURES_PATTERN.format(chunk, suffix=suffix)


def _find(out_dir, pattern: str) -> dict[int, Any]:
  """{chunk index: file} of `pattern` ('chunk_*.npz') in every p<process>/ folder."""
  found = {}
  root = paths.resolve(out_dir)
  prefix = pattern.split("*")[0]
  if root.exists():
    for f in sorted(root.glob(f"p*/{pattern}")):
      try:
        found.setdefault(int(f.name[len(prefix):-len(".npz")]), f)
      except ValueError:
        continue
  return found


def chunk_features(out_dir, features: InceptionFeatures, *, num_images: int, chunk_size: int,
                   process: int, num_processes: int) -> tuple[int, int]:
  """Pool features of this process's chunks, each saved beside its images; a chunk whose
  features exist (for the same image indices) is skipped. Returns (computed, re-used)."""
  suffix = features.suffix
  chunks = _find(out_dir, "chunk_*.npz")
  done = _find(out_dir, FEATURES_PATTERN.format(0, suffix=suffix).replace("000000", "*"))
  computed = reused = 0
  for k in generate.process_chunks(num_images, chunk_size, process, num_processes):
    if k in done and _load_features_cache(done[k], features.fingerprint) is not None:
      reused += 1
      continue
    if k not in chunks:
      raise GenEvalError(f"{out_dir}: chunk {k} is missing after sampling; rerun the command")
    sample = paths.load_npz(chunks[k])
    t0 = time.perf_counter()
    pool = features(sample["images"])
    paths.save_npz(features_path(out_dir, process, k, suffix), pool=pool,
                   indices=sample["indices"], inception=np.str_(features.fingerprint))
    computed += 1
    logging.info("features of chunk %d (%d images): %.1f s", k, len(pool),
                 time.perf_counter() - t0)
  return computed, reused


def load_chunk_features(out_dir, *, num_images: int, chunk_size: int, suffix: str,
                        fingerprint: str | None = None) -> np.ndarray:
  """All chunks' pool features [N, 2048] in image order (every image once), all made by the
  Inception `fingerprint` when given."""
  found = _find(out_dir, FEATURES_PATTERN.format(0, suffix=suffix).replace("000000", "*"))
  expected = -(-num_images // chunk_size)
  missing = [k for k in range(expected) if k not in found]
  if missing:
    raise GenEvalError(f"{out_dir}: features of {len(missing)} of {expected} chunks missing (e.g. "
                       f"chunk {missing[0]}); rerun the same --mode=eval command")
  parts = [paths.load_npz(found[k]) for k in range(expected)]
  if fingerprint is not None and any(str(p["inception"]) != fingerprint for p in parts):
    raise GenEvalError(f"{out_dir}: feature files of another Inception; rerun the same "
                       "--mode=eval command on every process (they are recomputed)")
  indices = np.concatenate([p["indices"] for p in parts])
  if indices.tolist() != list(range(num_images)):
    raise GenEvalError(f"{out_dir}: the feature files do not cover images 0..{num_images - 1} "
                       "in order; delete the features_*.npz files to recompute them")
  return np.concatenate([p["pool"] for p in parts])


# ------------------------------------------------------------------------------------------------
# --mode=eval of a generator.
# ------------------------------------------------------------------------------------------------


def _sampler_record(meta: dict) -> dict:
  """The sampler settings of a `--mode=sample` run record, as the result JSON names them."""
  options = dict(meta["options"])
  out = {"sampler": meta["sampler"], **options}
  if "guidance_interval" in out:
    out["guidance_interval"] = list(out["guidance_interval"])
  return out


def run(config, workdir: str, *, checkpoint: str | None = None,
        tokenizer: str | None = None) -> dict[str, Any]:
  """`--mode=eval` of a generator config: sample (resumably), features (resumably), metrics.
  Returns the result (process 0; the others return the sampling summary) and writes
  `<workdir>/gen_eval/gen_eval_<N>.json`."""
  validate(config)
  ge = gen_eval_settings(config)
  t0 = time.perf_counter()
  summary = generate.run(config, workdir, checkpoint=checkpoint, tokenizer=tokenizer)
  sample_seconds = time.perf_counter() - t0
  out_dir = summary["out_dir"]
  meta = paths.read_json(paths.resolve(out_dir) / generate.META_NAME)
  s = config.sample
  total, size = int(s.num_images), int(s.chunk_size)
  features = load_inception_features(config)
  t1 = time.perf_counter()
  computed, reused = chunk_features(out_dir, features, num_images=total, chunk_size=size,
                                    process=jax.process_index(),
                                    num_processes=jax.process_count())
  feature_seconds = time.perf_counter() - t1
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("gen_eval: every chunk's features written")
  if jax.process_index() != 0:
    return summary
  pool = load_chunk_features(out_dir, num_images=total, chunk_size=size, suffix=features.suffix,
                             fingerprint=features.fingerprint)
  first = paths.load_npz(_find(out_dir, "chunk_*.npz")[0], keys=("images",))["images"]
  t2 = time.perf_counter()
  reference = load_reference(config, workdir, features, image_size=int(first.shape[1]))
  reference_seconds = time.perf_counter() - t2
  t3 = time.perf_counter()
  result = generation_metrics(pool, reference, features.fc_kernel, nearest_k=int(ge.nearest_k),
                              suffix=features.suffix)
  result.update({
      "mode": "eval", "task": "generator",
      **_sampler_record(meta),
      "seed": meta["seed"], "labels": meta["labels"] or "class-balanced",
      "num_classes": meta["num_classes"],
      "checkpoint": meta["generator"], "tokenizer": meta["tokenizer"],
      "reference": reference.record, "nearest_k": int(ge.nearest_k),
      "inception": ("RANDOMLY INITIALISED (allow_random_init): not comparable" if
                    features.random_init else "pytorch-fid FID Inception-v3 (pool 2048; IS from "
                    "the classifier logits without bias)"),
      "image_size": int(first.shape[1]), "samples": str(out_dir),
      "chunks_written": summary.get("chunks_written", 0),
      "chunks_skipped": summary.get("chunks_skipped", 0),
      "features_computed": computed, "features_reused": reused,
      "seconds": {"sampling": round(sample_seconds, 2), "features": round(feature_seconds, 2),
                  "reference": round(reference_seconds, 2),
                  "metrics": round(time.perf_counter() - t3, 2)},
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "processes": jax.process_count(),
  })
  path = paths.resolve(workdir) / OUT_DIR / f"gen_eval_{total}.json"
  paths.write_json(path, result)
  logging.info("generation evaluation -> %s: %s", path, json.dumps(
      {k: v for k, v in result.items() if not isinstance(v, dict)}))
  return result


# ------------------------------------------------------------------------------------------------
# In the training loop.
# ------------------------------------------------------------------------------------------------


class GenerationEvaluator:
  """The in-loop generation evaluation: `evaluator(generator_state) -> dict` of gFID / IS /
  precision / recall (+ seconds) of `gen_eval.in_loop_num_images` samples drawn in memory (no
  files) with `config.sample`'s sampler, seed and labels.

  Built once (Inception, reference statistics, the compiled sampler); every call takes new
  weights of the same generator — the trainer passes its EMA state (`nnx.split(model)[1]`, any
  sharding: it is replicated over this process's devices) every N steps. Every process draws
  the same images (no collective); in a multi-process run call it on every process and log
  process 0's result. A few thousand samples give a biased but trend-faithful FID: compare
  in-loop numbers with each other, not with 50k-sample gFIDs.
  """

  def __init__(self, config, tokenizer, gen_cfg, generator: nnx.Module, workdir: str):
    self.config = config
    ge = gen_eval_settings(config)
    self.num_images = int(ge.in_loop_num_images)
    self.nearest_k = int(ge.nearest_k)
    options = generate.sampler_options(config.sample, gen_cfg.kind)
    self.sampler = generate.ImageSampler(gen_cfg, generator, tokenizer, options)
    self.num_classes = int(gen_cfg.num_classes)
    self.features = load_inception_features(config)
    self.reference = load_reference(config, workdir, self.features,
                                    image_size=int(tokenizer.config.image_size))

  def __call__(self, generator_state=None, *, num_images: int | None = None) -> dict[str, Any]:
    if generator_state is not None:
      self.sampler.set_generator_state(generator_state)
    s = self.config.sample
    n = int(num_images or self.num_images)
    idx = np.arange(n)
    batch = -(-int(s.batch_size) // self.sampler.num_devices) * self.sampler.num_devices
    t0 = time.perf_counter()
    images = generate.draw(self.sampler, idx, generate.class_labels(idx, self.num_classes,
                                                                    s.labels),
                           int(s.seed), batch)
    t1 = time.perf_counter()
    pool = self.features(images)
    t2 = time.perf_counter()
    out = generation_metrics(pool, self.reference, self.features.fc_kernel,
                             nearest_k=self.nearest_k, suffix=self.features.suffix)
    out.update(sample_seconds=t1 - t0, feature_seconds=t2 - t1,
               metric_seconds=time.perf_counter() - t2)
    return out
