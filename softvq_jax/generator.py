"""The public generator API: `load_generator(...)` -> `Generator` (SiT / DiT on SoftVQ tokens).

    gen = softvq_jax.load_generator("SoftVQVAE/sit-xl_softvq-b-64")   # hub id or local directory
    tok = softvq_jax.load_tokenizer("SoftVQVAE/softvq-b-64")
    v = gen.velocity(x, t, y)              # the network output (velocity for SiT)
    z = gen.sample(labels, mode="sde", steps=250, cfg_scale=1.75, guidance_interval=(0, 0.7),
                   path="cosine")          # normalised latents [B, N, e]
    images = gen.generate(tok, labels, cfg_scale=1.75)  # uint8 [B, S, S, 3]
    gen.save("/tmp/my_sit")               # the official hub format again

Sources: a directory (local or a URL such as gs://..., read through etils.epath) in the official
hub format (`config.json` + `model.safetensors` of `SiT/DiT.save_pretrained`, which is also what
`Generator.save` writes), or a Hugging Face hub id (`huggingface_hub`, through the same download
helper as `load_tokenizer`). A training workdir of ours is not a generator source yet (generator
training is issue 19); `load_generator` says so instead of guessing.

Sampling (softvq_jax/sampling.py): SiT generators use `sampling.sample_flow` (SDE Euler-Maruyama
or ODE Euler/Heun, CFG with a guidance interval in one doubled batch), DiT generators
`sampling.sample_ddpm` (respaced ancestral DDPM, CFG on the epsilon channels). The whole sampler is
one jitted program per option set; with several local devices the batch is sharded over them
(parameters replicated; a batch that does not divide is padded and cut). Randomness: sample b of a
call draws everything from `fold_in(key(seed), b)` (its initial noise from the first half of
that key's split, its step noise from the second), the per-image keys of `--mode=sample`
(softvq_jax/generate.py), so a sample does not depend on the batch size or the device count,
and `gen.sample(labels, seed=s)` reproduces images 0..B-1 of a `--mode=sample` run with seed s
and the same labels.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softvq_jax import paths, sampling
from softvq_jax.convert import generator_official
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.models import sit as sit_lib

# The published DiT command samples with the cosine beta schedule (spec.md §8.4; the official README's
# `generate_dit.py --noise-schedule cosine`); the official script's own default is linear.
DEFAULT_DIT_NOISE_SCHEDULE = "cosine"


def _per_sample_keys(seed: int, batch: int) -> jax.Array:
  """[B, 2] keys (noise, step noise) of samples 0..B-1: split(fold_in(key(seed), b))."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch, dtype=jnp.uint32))
  return jax.vmap(jax.random.split)(keys)


def to_uint8(images) -> jax.Array:
  """Decoder output in [-1, 1] (unclamped) -> uint8 = round(127.5 (clip(x, -1, 1) + 1)).

  The reference truncates 255 (x + 1) / 2 instead (spec.md §8.3); rounding is the unbiased choice
  (truncation darkens every pixel by half a level on average), so uint8 values may differ from
  the reference's by one level.
  """
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


@dataclasses.dataclass
class Generator:
  """A loaded SiT / DiT generator: config, network (parameters on device), jitted sampling.

  config.kind says which sampler `sample` uses ("sit": flow matching, "dit": DDPM).
  """
  config: sit_lib.SiTConfig
  model: sit_lib.SiT

  def __post_init__(self):
    graphdef, state = nnx.split(self.model)
    self._graphdef = graphdef
    self._state = jax.device_put(state)  # once: see api.Tokenizer
    self._velocity = jax.jit(functools.partial(sit_lib.sit_apply, graphdef))
    self._samplers = {}
    self._replicated_state = None

  # ------------------------------------------------------------------------------ network

  def velocity(self, x, t, y) -> jax.Array:
    """The network output. x: [B, N, e] (1-D) or [B, H, W, C] (2-D, NHWC); t: [B] float in
    [0, 1] for SiT (t = 1 is noise), integer timesteps 0..999 for DiT; y: [B] int class labels,
    `config.null_class` (1000) = unconditional. Returns x's shape (twice the channels for a
    learn_sigma DiT: epsilon then the variance interpolation), float32."""
    t = jnp.asarray(t)
    t = t.astype(jnp.int32) if self.config.kind == "dit" else t.astype(jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if t.ndim == 0:
      t = jnp.full(x.shape[:1], t)
    return self._velocity(self._state, x, t, jnp.asarray(y, jnp.int32))

  # ------------------------------------------------------------------------------ sampling

  def sample(self, labels, *, noise=None, seed: int = 0, mode: str = "sde", steps: int = 250,
             heun: bool = False, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
             path: str = "linear", noise_schedule: str | None = None) -> jax.Array:
    """Class-conditional samples: normalised latents [B, N, e] (or [B, H, W, C]) float32.

    labels: [B] ints (config.null_class = unconditional). noise: the initial x at t = 1 (SiT) /
    x_T (DiT) of shape [B, *config.input_shape], to compare across frameworks; default: drawn
    from `seed` per sample (module docstring). SiT: mode "sde" (Euler-Maruyama on the reference's
    grid; `path` "linear" | "cosine" sets the score it derives from the velocity) or "ode"
    (Euler, `heun` adds the correction); CFG `cfg_scale` where low <= t <= high of
    `guidance_interval`. DiT: `steps` respaced DDPM steps of the 1000-step diffusion with
    `noise_schedule` (default cosine, the published command), CFG on the epsilon channels; mode,
    heun and path do not apply (mode="ode" or heun=True is refused).
    Published SiT setting (spec.md §8.3): mode="sde", steps=250, cfg_scale=1.75,
    guidance_interval=(0, 0.7), path="cosine".
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a 1-D array of integer class ids, got {labels.dtype} "
                       f"{labels.shape}")
    n = self.config.num_classes
    if labels.size and (labels.min() < 0 or labels.max() > n):
      raise ValueError(f"labels must lie in 0..{n} ({n} = unconditional), got "
                       f"{labels.min()}..{labels.max()}")
    if self.config.class_dropout_prob <= 0 and (labels == n).any():
      raise ValueError("this generator was built without label dropout: it has no null class, "
                       "so neither label 1000 nor cfg_scale > 1 can be used")
    if self.config.class_dropout_prob <= 0 and cfg_scale > 1:
      raise ValueError("cfg_scale > 1 needs the null class, which this generator does not have "
                       "(class_dropout_prob = 0)")
    if cfg_scale > 1 and self.config.null_class != sampling.NULL_CLASS:
      raise ValueError(f"cfg_scale > 1: the samplers guide with class {sampling.NULL_CLASS} as the "
                       f"null class, this generator's is {self.config.null_class} "
                       f"(num_classes={n}); sample with cfg_scale=1")
    batch = labels.shape[0]
    shape = (batch,) + tuple(self.config.input_shape)
    if noise is not None:
      noise = np.asarray(noise, np.float32)
      if noise.shape != shape:
        raise ValueError(f"noise must have shape {shape} ([B, *config.input_shape]), got "
                         f"{noise.shape}")
    options = self._options(mode=mode, steps=steps, heun=heun, cfg_scale=cfg_scale,
                            guidance_interval=guidance_interval, path=path,
                            noise_schedule=noise_schedule)
    keys = _per_sample_keys(seed, batch)
    pad = (-batch) % self._num_devices()
    if pad:  # padded samples are independent (per-sample keys) and dropped
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      keys = jnp.concatenate([keys, _per_sample_keys(seed + 1, pad)])
      if noise is not None:
        noise = np.concatenate([noise, np.zeros((pad,) + shape[1:], np.float32)])
    fn = self._sampler(options, noise is not None)
    args = (self._state_for_sampling(), jnp.asarray(labels, jnp.int32), keys)
    if noise is not None:
      args += (jnp.asarray(noise),)
    return fn(*args)[:batch]

  def _options(self, *, mode, steps, heun, cfg_scale, guidance_interval, path,
               noise_schedule) -> tuple:
    interval = tuple(float(v) for v in guidance_interval)
    if self.config.kind == "dit":
      if mode == "ode" or heun:
        raise ValueError("a DiT generator samples with DDPM: mode='ode' / heun=True are SiT "
                         "options (use the default mode)")
      schedule = noise_schedule or DEFAULT_DIT_NOISE_SCHEDULE
      if schedule not in sampling.BETA_SCHEDULES:
        raise ValueError(f"noise_schedule={schedule!r} is not one of {sampling.BETA_SCHEDULES}")
      return (("steps", int(steps)), ("cfg_scale", float(cfg_scale)),
              ("guidance_interval", interval), ("noise_schedule", schedule))
    if noise_schedule is not None:
      raise ValueError("noise_schedule is a DiT option; a SiT generator's path is `path`")
    if mode not in sampling.FLOW_MODES:
      raise ValueError(f"mode={mode!r} is not one of {sampling.FLOW_MODES}")
    return (("mode", mode), ("steps", int(steps)), ("heun", bool(heun)),
            ("cfg_scale", float(cfg_scale)), ("guidance_interval", interval), ("path", path))

  def _num_devices(self) -> int:
    return len(jax.local_devices())

  def _mesh(self) -> Mesh | None:
    devices = jax.local_devices()
    return Mesh(np.asarray(devices), ("data",)) if len(devices) > 1 else None

  def _state_for_sampling(self):
    mesh = self._mesh()
    if mesh is None:
      return self._state
    if self._replicated_state is None:
      self._replicated_state = jax.device_put(self._state, NamedSharding(mesh, PartitionSpec()))
    return self._replicated_state

  def _sampler(self, options: tuple, with_noise: bool):
    cache_key = (options, with_noise)
    if cache_key in self._samplers:
      return self._samplers[cache_key]
    cfg, graphdef, kw = self.config, self._graphdef, dict(options)

    def run(state, labels, keys, noise=None):
      def model_fn(x, t, y):
        return sit_lib.sit_apply(graphdef, state, x, t, y)
      if noise is None:
        noise = sampling.initial_noise(keys[:, 0], (labels.shape[0],) + cfg.input_shape)
      if cfg.kind == "dit":
        return sampling.sample_ddpm(model_fn, labels, noise, keys[:, 1],
                                    learn_sigma=cfg.learn_sigma, **kw)
      return sampling.sample_flow(model_fn, labels, noise, keys[:, 1], **kw)

    mesh = self._mesh()
    if mesh is None:
      fn = jax.jit(run)
    else:
      batch, rep = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
      in_shardings = (rep, batch, batch) + ((batch,) if with_noise else ())
      fn = jax.jit(run, in_shardings=in_shardings, out_shardings=batch)
    self._samplers[cache_key] = fn
    return fn

  # ------------------------------------------------------------------------------ images

  def generate(self, tokenizer, labels, **sample_options) -> np.ndarray:
    """uint8 images [B, S, S, 3]: `sample(labels, **sample_options)`, denormalised with the
    tokenizer's vq_mean / vq_std (z_q = z * vq_std + vq_mean, no re-quantisation), decoded,
    clamped to [-1, 1] and rounded (see `to_uint8`: the reference truncates)."""
    tcfg = tokenizer.config
    want = (tcfg.num_latent_tokens, tcfg.codebook_embed_dim)
    if not self.config.vae_1d or tuple(self.config.input_shape) != want:
      raise ValueError(f"this generator makes latents of shape {self.config.input_shape}; the "
                       f"tokenizer decodes tokens of shape {want}: they were not trained together")
    if (tcfg.vq_mean, tcfg.vq_std) == (0.0, 1.0):
      logging.warning("generate: the tokenizer's latent statistics are the defaults (vq_mean=0, "
                      "vq_std=1); a generator trained on normalised latents then decodes at the "
                      "wrong scale. Use the tokenizer the generator was trained with.")
    latents = self.sample(labels, **sample_options)
    return np.asarray(to_uint8(tokenizer.decode(latents, denormalize=True)))

  def save(self, directory) -> None:
    """Writes the official hub format (config.json + model.safetensors) to `directory`, a local
    folder or a URL; the official SiT/DiT.from_pretrained loads it (strict included)."""
    generator_official.export_generator(nnx.merge(self._graphdef, self._state), directory)


def _with_overrides(cfg: sit_lib.SiTConfig, compute_dtype, attention_backend):
  kw = {}
  if compute_dtype is not None:
    kw["compute_dtype"] = jnp.dtype(compute_dtype).name
  if attention_backend is not None:
    kw["attention_backend"] = attention_backend
  return cfg.replace(**kw)


def _empty_model(cfg: sit_lib.SiTConfig) -> sit_lib.SiT:
  """A network with zero-filled arrays of the right shapes, filled by the strict loader (random
  initialisation of 675M parameters would cost seconds for nothing)."""
  graphdef, state = nnx.split(sit_lib.abstract_sit(cfg))
  return nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state))


def from_official_dir(directory, *, compute_dtype=None, attention_backend=None) -> Generator:
  cfg = _with_overrides(generator_official.read_generator_config(directory), compute_dtype,
                        attention_backend)
  model = _empty_model(cfg)
  generator_official.load_generator_weights(model, directory)
  return Generator(cfg, model)


def from_training_checkpoint(step_dir, *, compute_dtype=None, attention_backend=None) -> Generator:
  """The EMA generator of one of our generator-training step directories (`--mode=train` with a
  generator config; `checkpoint.resolve_step_dir`). The checkpoint holds the parameters; the
  fixed position table is recomputed from the config (`sit.fixed_pos_embed`)."""
  from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel  # imports Orbax
  meta = checkpoint.read_json_item(step_dir, "metadata")
  if meta.get("task") != "generator":
    raise CheckpointError(f"{step_dir} is a tokenizer's training checkpoint, not a generator's: "
                          "load it with softvq_jax.load_tokenizer")
  known = {f.name for f in dataclasses.fields(sit_lib.SiTConfig)}
  cfg = _with_overrides(sit_lib.SiTConfig(**{k: v for k, v in meta["generator"].items()
                                             if k in known}), compute_dtype, attention_backend)
  model = _empty_model(cfg)
  model.pos_embed.value = jnp.asarray(sit_lib.fixed_pos_embed(cfg))
  graphdef, params, fixed = nnx.split(model, nnx.Param, sit_lib.FixedPosEmbed)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params)
  return Generator(cfg, nnx.merge(graphdef, checkpoint.restore_ema(step_dir, target), fixed))


def load_generator(path_or_hub_id, *, compute_dtype=None, attention_backend=None,
                   revision: str | None = None) -> Generator:
  """Loads a SiT / DiT generator from an official-format directory (local or URL), a generator
  training workdir / step directory of ours (EMA weights of the newest complete checkpoint; a
  workdir without checkpoints but with the final export `<workdir>/generator` loads that), or a
  hub id.

  compute_dtype: the activation dtype (e.g. "bfloat16" on GPU/TPU); parameters stay float32.
  attention_backend: "auto" | "xla" | "cudnn" | "jax".
  """
  from softvq_jax import api  # pylint: disable=import-outside-toplevel  # its hub download helper
  source = os.fspath(path_or_hub_id)
  kw = dict(compute_dtype=compute_dtype, attention_backend=attention_backend)
  path = paths.resolve(source)
  if paths.is_url(source) or path.exists():
    if not path.is_dir():
      if path.exists():
        raise CheckpointError(f"{path}: expected a directory, got a file")
      raise CheckpointError(f"{path}: no such directory (an official-format generator directory "
                            "was expected)")
    if generator_official.is_official_dir(path):
      return from_official_dir(path, **kw)
    from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel  # imports Orbax
    step_dir = checkpoint.resolve_step_dir(path)
    if step_dir is not None:
      return from_training_checkpoint(step_dir, **kw)
    if generator_official.is_official_dir(path / "generator"):  # a finished run's export
      return from_official_dir(path / "generator", **kw)
    raise CheckpointError(
        f"{path}: neither an official-format generator directory (needs "
        f"{generator_official.CONFIG_NAME} + {generator_official.WEIGHTS_NAME}; write one with "
        "Generator.save(directory)) nor a generator training workdir / checkpoint of ours "
        "(<workdir>/checkpoints/<step>/state)")
  if source.count("/") != 1 or source.startswith((".", "/", "~")):
    raise CheckpointError(f"{path}: no such directory, and not a hub id of the form 'owner/name'")
  download = api._download  # pylint: disable=protected-access  # the tokenizer's hub helper
  return from_official_dir(download(source, revision), **kw)
