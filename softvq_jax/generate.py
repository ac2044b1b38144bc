"""`--mode=sample`: class-conditional images from a generator (SiT / DiT) and a tokenizer.

    python -m softvq_jax.main --mode=sample --config=configs/demo_sit.py --workdir=DIR \
        --checkpoint=<generator> --tokenizer=<tokenizer> [--config.sample.num_images=50000]

Writes `<workdir>/samples.png` (a grid of the first `sample.grid_images` images) and, with
`sample.num_images = N > 0`, all N images as uint8 .npz chunks ready for gFID (issue 18 part 2):

    <out_dir>/p<process>/chunk_<k>.npz   images uint8 [n, S, S, 3], labels int32 [n], indices [n]
    <out_dir>/sample_config.json         what the images were drawn with (checked on resume)

Why it is built this way:
* Image i is a pure function of (sample.seed, i, its label): its initial noise and every SDE /
  DDPM step's noise come from `fold_in(key(seed), i)` (softvq_jax/sampling.py per-sample keys).
  So the result does not depend on the batch size, the number of devices or processes, or which
  run of a resumed job drew it.
* Chunk k holds images [k * chunk_size, (k + 1) * chunk_size) and belongs to process
  k % process_count; each process writes its chunks into its own folder (hosts need not share a
  file system), each file atomically, and a rerun skips the chunks that exist. `load_samples`
  gathers all chunks (de-duplicated by chunk index) in image order.
* Labels are class-balanced: image i gets class i % num_classes (50 per class for 50k), or
  `sample.labels` cycled.
* Each process samples on its own devices (batch sharded over a mesh of its local devices,
  parameters replicated): generating is embarrassingly parallel, so no cross-process collective
  is ever needed, and a slow host cannot stall the others. Noise -> sampler -> denormalise
  (vq_std, vq_mean) -> tokenizer decode -> uint8 is one jitted program; only uint8 images leave
  the device.
* uint8 = round(127.5 (clip(x, -1, 1) + 1)). The reference truncates 255 (x + 1) / 2 (spec.md §8.3);
  rounding is unbiased (truncation darkens every pixel by half a level on average).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import api, config_lib, paths, sampling, visualize
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.generator import to_uint8  # the one definition (Generator.generate uses it too)
from softvq_jax.models import sit as sit_lib

CHUNK_PATTERN = "chunk_{:06d}.npz"
META_NAME = "sample_config.json"
GRID_NAME = "samples.png"
GRID_COLUMNS = 8


class SampleError(Exception):
  """A user error of --mode=sample (bad flags, a resumed output folder with other settings)."""


# ------------------------------------------------------------------------------------------------
# Labels, keys, options.
# ------------------------------------------------------------------------------------------------


def class_labels(indices, num_classes: int = 1000, labels: str | tuple = "") -> np.ndarray:
  """Labels of images `indices`: i % num_classes (class-balanced), or the given ids cycled."""
  indices = np.asarray(indices, np.int64)
  ids = ([int(v) for v in labels.split(",") if v.strip()] if isinstance(labels, str)
         else [int(v) for v in labels])
  if ids:
    return np.asarray(ids, np.int32)[indices % len(ids)]
  return (indices % num_classes).astype(np.int32)


def image_keys(seed: int, indices) -> jax.Array:
  """One PRNG key per image index: fold_in(key(seed), i) (the per-sample keys of sampling.py)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def sampler_options(sample_cfg, kind: str) -> dict[str, Any]:
  """The keyword options of sampling.sample_flow (SiT) or sample_ddpm (DiT) from config.sample."""
  s = sample_cfg
  interval = tuple(float(v) for v in s.guidance_interval)
  if kind == "dit":
    return dict(steps=int(s.steps), cfg_scale=float(s.cfg_scale), guidance_interval=interval,
                noise_schedule=str(s.noise_schedule))
  return dict(mode=str(s.mode), steps=int(s.steps), heun=bool(s.heun),
              cfg_scale=float(s.cfg_scale), guidance_interval=interval, path=str(s.path))


def sample_latents(model_fn, cfg: sit_lib.SiTConfig, labels, keys, options: dict):
  """Initial noise from each image's key, then the sampler of cfg.kind: latents [B, *shape]."""
  split = jax.vmap(jax.random.split)(keys)  # [B, 2]: noise key, step-noise key
  shape = (labels.shape[0],) + tuple(cfg.input_shape)
  noise = sampling.initial_noise(split[:, 0], shape)
  if cfg.kind == "dit":
    return sampling.sample_ddpm(model_fn, labels, noise, split[:, 1],
                                learn_sigma=cfg.learn_sigma, **options)
  return sampling.sample_flow(model_fn, labels, noise, split[:, 1], **options)


# ------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------


def generator_network_config(config, tokenizer_cfg) -> sit_lib.SiTConfig:
  """The SiTConfig of config.generator, with input_size / in_channels from the tokenizer."""
  g = config.generator
  kw = dict(input_size=int(g.input_size or tokenizer_cfg.num_latent_tokens),
            in_channels=int(g.in_channels or tokenizer_cfg.codebook_embed_dim),
            mlp_ratio=float(g.mlp_ratio), num_classes=int(g.num_classes),
            class_dropout_prob=float(g.class_dropout_prob), learn_sigma=g.kind == "dit",
            kind=str(g.kind), compute_dtype=str(g.compute_dtype),
            attention_backend=str(g.attention_backend), vae_1d=True, patch_size=1)
  if g.hidden_size:
    return sit_lib.SiTConfig(hidden_size=int(g.hidden_size), depth=int(g.depth),
                             num_heads=int(g.num_heads), **kw)
  return sit_lib.SiTConfig.named(str(g.size), **kw)


def load_generator_network(checkpoint: str, compute_dtype: str | None = None):
  """(SiTConfig, SiT) of a generator checkpoint: what `softvq_jax.load_generator` accepts."""
  from softvq_jax import generator as generator_lib  # pylint: disable=import-outside-toplevel
  gen = generator_lib.load_generator(checkpoint, compute_dtype=compute_dtype or None)
  return gen.config, gen.model


def random_generator(cfg: sit_lib.SiTConfig, seed: int = 0) -> sit_lib.SiT:
  """A randomly initialised network, initialised inside one jitted program (eager initialisation
  compiles every initializer op by op: measured 10+ s for a 4-block SiT on a 2-core CPU)."""
  graphdef, _ = nnx.split(sit_lib.abstract_sit(cfg))
  state = jax.jit(lambda: nnx.split(sit_lib.build_sit(cfg, seed))[1])()
  return nnx.merge(graphdef, state)


def _load_tokenizer(config, tokenizer: str | None) -> api.Tokenizer:
  if tokenizer:
    return api.load_tokenizer(tokenizer, compute_dtype=config.model.compute_dtype)
  from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer  # pylint: disable=import-outside-toplevel
  cfg = TokenizerConfig.from_config(config)
  logging.warning("no --tokenizer: a randomly initialised tokenizer from the config decodes the "
                  "tokens; the images are noise")
  return api.Tokenizer(cfg, build_tokenizer(cfg, seed=config.seed))


# ------------------------------------------------------------------------------------------------
# The sampling program.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageSampler:
  """labels [B] + keys [B] -> uint8 images [B, S, S, 3], one jitted program on this process's
  devices (batch sharded over them, both networks' parameters replicated)."""
  gen_cfg: sit_lib.SiTConfig
  generator: nnx.Module
  tokenizer: api.Tokenizer
  options: dict

  def __post_init__(self):
    self.mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    g_def, g_state = nnx.split(self.generator)
    t_def, t_state = nnx.split(self.tokenizer.model)
    self._replicated = rep
    self._g_state = jax.device_put(g_state, rep)
    self._t_state = jax.device_put(t_state, rep)
    vq_mean, vq_std = float(self.tokenizer.config.vq_mean), float(self.tokenizer.config.vq_std)
    gen_cfg, options = self.gen_cfg, dict(self.options)

    def run(g_state, t_state, labels, keys):
      net = nnx.merge(g_def, g_state)
      latents = sample_latents(lambda x, t, y: net(x, t, y), gen_cfg, labels, keys, options)
      images = nnx.merge(t_def, t_state).decode(latents * vq_std + vq_mean)
      return to_uint8(images)

    def latents(g_state, labels, keys):
      net = nnx.merge(g_def, g_state)
      return sample_latents(lambda x, t, y: net(x, t, y), gen_cfg, labels, keys, options)

    shardings = dict(out_shardings=self.batch_sharding)
    self._run = jax.jit(run, in_shardings=(rep, rep, self.batch_sharding, self.batch_sharding),
                        **shardings)
    self._latents = jax.jit(latents, in_shardings=(rep, self.batch_sharding, self.batch_sharding),
                            **shardings)

  def set_generator_state(self, state) -> None:
    """New weights of the same generator (e.g. a training run's EMA, `nnx.split(model)[1]`)
    for the already compiled program: the in-loop evaluation samples every N steps without
    recompiling."""
    self._g_state = jax.device_put(state, self._replicated)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def _put(self, labels, keys):
    return (jax.device_put(jnp.asarray(labels, jnp.int32), self.batch_sharding),
            jax.device_put(keys, self.batch_sharding))

  def __call__(self, labels, keys) -> np.ndarray:
    """uint8 images [B, S, S, 3]."""
    return np.asarray(self._run(self._g_state, self._t_state, *self._put(labels, keys)))

  def latents(self, labels, keys) -> np.ndarray:
    """The generator's normalised latents [B, ...] float32 alone (no decode): what the images
    are decoded from, for tests and inspection."""
    return np.asarray(self._latents(self._g_state, *self._put(labels, keys)))


def draw(sampler: ImageSampler, indices, labels, seed: int, batch_size: int) -> np.ndarray:
  """uint8 images of `indices` in batches of batch_size (the last one padded, then cut)."""
  indices, labels = np.asarray(indices), np.asarray(labels)
  out = []
  for start in range(0, len(indices), batch_size):
    idx, lab = indices[start:start + batch_size], labels[start:start + batch_size]
    n = len(idx)
    if n < batch_size:  # a fixed batch shape: one compiled program
      idx = np.concatenate([idx, np.repeat(idx[-1:], batch_size - n)])
      lab = np.concatenate([lab, np.repeat(lab[-1:], batch_size - n)])
    out.append(sampler(lab, image_keys(seed, idx))[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.uint8)


# ------------------------------------------------------------------------------------------------
# Chunks.
# ------------------------------------------------------------------------------------------------


def chunk_path(out_dir, process: int, chunk: int) -> epath.Path:
  return paths.resolve(out_dir) / f"p{process}" / CHUNK_PATTERN.format(chunk)


def _existing_chunks(out_dir) -> dict[int, epath.Path]:
  found = {}
  root = paths.resolve(out_dir)
  if root.exists():
    for f in sorted(root.glob("p*/chunk_*.npz")):
      try:
        found.setdefault(int(f.name[len("chunk_"):-len(".npz")]), f)
      except ValueError:
        continue
  return found


def process_chunks(num_images: int, chunk_size: int, process: int, num_processes: int) -> list:
  """The chunks process `process` of `num_processes` draws: k = process, process + P, ..."""
  return list(range(process, -(-num_images // chunk_size), num_processes))


def load_samples(out_dir) -> dict[str, np.ndarray]:
  """All chunks of a `--mode=sample` run, in image order: images uint8 [N, S, S, 3], labels [N],
  indices [N]. Fails naming the missing chunks if the run is incomplete."""
  meta = paths.read_json(paths.resolve(out_dir) / META_NAME)
  found = _existing_chunks(out_dir)
  total, size = int(meta["num_images"]), int(meta["chunk_size"])
  expected = -(-total // size)
  missing = [k for k in range(expected) if k not in found]
  if missing:
    raise SampleError(f"{out_dir}: {len(missing)} of {expected} chunks missing (e.g. chunk "
                      f"{missing[0]}); rerun the same --mode=sample command to finish them")
  parts = [paths.load_npz(found[k]) for k in range(expected)]
  return {name: np.concatenate([p[name] for p in parts]) for name in ("images", "labels",
                                                                       "indices")}


def _source(path: str | None, seed: int) -> str:
  """How a run record names a model: an absolute path, a hub id, or the random initialisation."""
  if not path:
    return f"random init (seed {seed})"
  return paths.resolve_str(path) if paths.is_url(path) or paths.resolve(path).exists() else path


def _run_record(config, gen_cfg, checkpoint, tokenizer, options) -> dict:
  s = config.sample
  return {"num_images": int(s.num_images), "chunk_size": int(s.chunk_size), "seed": int(s.seed),
          "labels": str(s.labels), "num_classes": int(gen_cfg.num_classes),
          "sampler": "ddpm" if gen_cfg.kind == "dit" else "flow",
          "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
          "generator": _source(checkpoint, int(config.seed)),
          "tokenizer": _source(tokenizer, int(config.seed))}


def _check_or_write_record(out_dir, record: dict) -> None:
  """The first run records its settings; a resumed run must use the same ones (else its chunks
  would mix images of two settings)."""
  path = paths.resolve(out_dir) / META_NAME
  if path.exists():
    old = paths.read_json(path)
    diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if diff:
      raise SampleError(
          f"{path.parent} holds samples drawn with other settings ({', '.join(diff)}: "
          + "; ".join(f"{k} was {old.get(k)!r}, now {record.get(k)!r}" for k in diff)
          + "); use another --config.sample.out_dir (or --workdir), or delete that folder")
    return
  if jax.process_index() == 0:
    paths.write_json(path, record)


# ------------------------------------------------------------------------------------------------
# --mode=sample.
# ------------------------------------------------------------------------------------------------


def run(config, workdir: str, *, checkpoint: str | None = None,
        tokenizer: str | None = None) -> dict[str, Any]:
  """The whole job: load / build, grid, chunks. Returns (and writes <workdir>/sample.json) a
  summary: images written / skipped, seconds, images per second."""
  try:
    config_lib.validate_generation(config)
  except ValueError as e:
    raise SampleError(str(e)) from None
  s = config.sample
  batch, devices = int(s.batch_size), jax.local_device_count()
  if batch % devices:
    raise SampleError(f"config.sample.batch_size={batch} is not a multiple of this process's "
                      f"{devices} devices (the batch is split over them); use e.g. "
                      f"--config.sample.batch_size={-(-batch // devices) * devices}")
  try:  # a wrong path / hub id is the user's mistake: one line, exit 2 (main.py)
    tok = _load_tokenizer(config, tokenizer)
    loaded = (load_generator_network(checkpoint, config.generator.compute_dtype) if checkpoint
              else None)
  except CheckpointError as e:
    raise SampleError(str(e)) from None
  if loaded:
    gen_cfg, generator = loaded
    logging.info("generator %s: %s", checkpoint, gen_cfg)
  else:
    gen_cfg = generator_network_config(config, tok.config)
    generator = None  # built below, once the configuration is known to fit the tokenizer
    logging.warning("no --checkpoint: randomly initialised %s (width %d, depth %d): the "
                    "images are noise — train a generator (issue 19) or pass --checkpoint",
                    gen_cfg.kind.upper(), gen_cfg.hidden_size,
                    gen_cfg.depth)
  want = (tok.config.num_latent_tokens, tok.config.codebook_embed_dim)
  if not gen_cfg.vae_1d:
    raise SampleError(f"{checkpoint} is a 2-D generator (latents {gen_cfg.input_shape}, e.g. on "
                      "SD-VAE latents); --mode=sample decodes 1-D SoftVQ tokens only")
  if (gen_cfg.input_size, gen_cfg.in_channels) != want:
    raise SampleError(f"the generator samples {gen_cfg.input_size} tokens x {gen_cfg.in_channels} "
                      f"channels but the tokenizer decodes {want[0]} x {want[1]}: pass the "
                      "tokenizer the generator was trained on (--tokenizer)")
  if generator is None:
    generator = random_generator(gen_cfg, seed=int(config.seed))
  options = sampler_options(s, gen_cfg.kind)
  ids = [int(v) for v in str(s.labels).split(",") if v.strip()]
  if any(v > gen_cfg.num_classes for v in ids):
    raise SampleError(f"config.sample.labels={s.labels!r}: the generator has "
                      f"{gen_cfg.num_classes} classes")
  if gen_cfg.class_dropout_prob <= 0 and (s.cfg_scale > 1 or gen_cfg.num_classes in ids):
    # its label table has no null row: JAX would clamp label 1000 to another class silently
    raise SampleError("this generator was trained without label dropout (class_dropout_prob = "
                      "0), so it has no null class: use --config.sample.cfg_scale=1 and class "
                      f"labels below {gen_cfg.num_classes}")
  if s.cfg_scale > 1 and gen_cfg.num_classes != sampling.NULL_CLASS:
    # the samplers' unconditional label is 1000, this network's null row is num_classes
    raise SampleError(f"the generator has {gen_cfg.num_classes} classes, so its null class is "
                      f"{gen_cfg.num_classes}, not the samplers' {sampling.NULL_CLASS}: "
                      "classifier-free guidance needs num_classes=1000; use "
                      "--config.sample.cfg_scale=1")
  sampler = ImageSampler(gen_cfg, generator, tok, options)
  proc, nproc = jax.process_index(), jax.process_count()
  workdir_path = paths.resolve(workdir)
  summary: dict[str, Any] = {"mode": "sample", "kind": gen_cfg.kind, "options": options,
                             "random_generator": not checkpoint, "random_tokenizer": not tokenizer,
                             "devices_per_process": sampler.num_devices, "processes": nproc}
  start = time.perf_counter()
  drawn = 0
  grid_n = int(s.grid_images)
  total = int(s.num_images)
  if total > 0:
    out_dir = s.out_dir or str(workdir_path / "samples")
    _check_or_write_record(out_dir, _run_record(config, gen_cfg, checkpoint, tokenizer, options))
    size = int(s.chunk_size)
    chunks = process_chunks(total, size, proc, nproc)
    existing = _existing_chunks(out_dir)
    todo = [k for k in chunks if k not in existing]
    logging.info("sampling %d images in %d chunks of %d (this process: %d chunks, %d done "
                 "before) into %s", total, -(-total // size), size, len(chunks),
                 len(chunks) - len(todo), out_dir)
    for n, k in enumerate(todo):
      idx = np.arange(k * size, min((k + 1) * size, total))
      labels = class_labels(idx, gen_cfg.num_classes, s.labels)
      images = draw(sampler, idx, labels, int(s.seed), batch)
      paths.save_npz(chunk_path(out_dir, proc, k), images=images, labels=labels,
                     indices=idx.astype(np.int64))
      drawn += len(idx)
      elapsed = time.perf_counter() - start
      logging.info("chunk %d written (%d/%d on this process): %d images, %.2f images/s",
                   k, n + 1, len(todo), len(idx), drawn / max(elapsed, 1e-9))
    summary.update(out_dir=out_dir, num_images=total, chunks_written=len(todo),
                   chunks_skipped=len(chunks) - len(todo))
  if proc == 0 and grid_n > 0:
    idx = np.arange(grid_n)
    if total >= grid_n and int(s.chunk_size) >= grid_n:  # the first chunk holds the grid's images
      first = paths.load_npz(_existing_chunks(summary["out_dir"])[0])
      grid_images = first["images"][:grid_n]
    else:
      grid_images = draw(sampler, idx, class_labels(idx, gen_cfg.num_classes, s.labels),
                         int(s.seed), batch)
      drawn += grid_n
    rows = [grid_images[r:r + GRID_COLUMNS] for r in range(0, grid_n, GRID_COLUMNS)]
    if len(rows) > 1 and len(rows[-1]) < GRID_COLUMNS:  # pad the last row with white images
      pad = np.full((GRID_COLUMNS - len(rows[-1]),) + rows[-1].shape[1:], 255, np.uint8)
      rows[-1] = np.concatenate([rows[-1], pad])
    grid_path = workdir_path / GRID_NAME
    visualize.save_png(grid_path, visualize.image_grid(rows))
    summary["grid"] = str(grid_path)
    logging.info("wrote %s (%d images)%s", grid_path, grid_n,
                 "; the generator is randomly initialised, so they are noise" if not checkpoint
                 else "")
  seconds = time.perf_counter() - start
  summary.update(images_drawn=drawn, seconds=round(seconds, 2),
                 images_per_second=round(drawn / seconds, 3) if drawn else None)
  if proc == 0:
    paths.write_json(workdir_path / "sample.json", summary)
  return summary
