"""The public inference API: `load_tokenizer(...)` -> `Tokenizer` with jitted encode / decode.

This is what a Flax app or a generator's data pipeline uses. It loads a trained tokenizer from its
own files only (never a teacher, discriminator or perceptual network), on whatever devices JAX
sees, without the training mesh:

    tok = softvq_jax.load_tokenizer("SoftVQVAE/softvq-l-64")   # hub id, or a local directory
    tokens = tok.encode(images)           # [B, S, S, 3] in [-1, 1] -> [B, N, e] float32
    images = tok.decode(tokens)           # [B, N, e] -> [B, S, S, 3] float32 (not clamped)
    z = tok.encode(images, normalize=True)  # (tokens - vq_mean) / vq_std, for generators

Sources, in the order they are tried: a directory (local, or a URL such as gs://bucket/dir,
read through etils.epath) in the official hub format
(`config.json` + `model.safetensors`, which is also what `Tokenizer.save` writes); a training
workdir of ours, its `checkpoints/` directory or one step directory (the newest complete
checkpoint's EMA weights, restored alone onto one device: no mesh, no optimizer state); else a
Hugging Face hub id (downloaded through `huggingface_hub`, or taken from its local cache when
offline).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import paths, pixels
from softvq_jax.convert import official
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.models.tokenizer import (SoftVQTokenizer, TokenizerConfig, abstract_tokenizer,
                                         split_model)


@dataclasses.dataclass
class Tokenizer:
  """A loaded tokenizer: config, parameters (on device) and jitted encode / decode.

  Any batch size works (each new batch shape compiles once). Inputs may be NumPy or JAX arrays;
  uint8 images in [0, 255] are accepted and scaled to [-1, 1].
  """
  config: TokenizerConfig
  model: SoftVQTokenizer

  def __post_init__(self):
    graphdef, state = nnx.split(self.model)
    self._graphdef = graphdef
    # On the device once: host NumPy weights (often transposed views after a conversion) would
    # otherwise be copied again by every call (measured: L-64 encode 1.17 vs 1.49 img/s on CPU).
    self._state = jax.device_put(state)
    self._encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x))
    self._decode = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))

  @property
  def latent_shape(self) -> tuple[int, int]:
    return (self.config.num_latent_tokens, self.config.codebook_embed_dim)

  def _images(self, images) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
      images = pixels.to_model_range(images)
    elif not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"images must be float in [-1, 1] or uint8 in [0, 255], got {images.dtype}")
    if images.ndim == 3:
      raise ValueError(f"expected a batch [B, H, W, 3], got a single image {images.shape}; "
                       "add a batch axis (images[None])")
    return images

  def encode(self, images, *, normalize: bool = False) -> jax.Array:
    """[B, S, S, 3] NHWC in [-1, 1] -> tokens [B, N, e] float32 (z_q, the soft-quantised tokens).

    normalize=True returns (tokens - vq_mean) / vq_std, the scale generators are trained on.
    """
    z = self._encode(self._state, self._images(images))
    if normalize and (self.config.vq_mean, self.config.vq_std) == (0.0, 1.0) and not getattr(
        self, "_warned_unnormalised", False):
      # The classic silent failure: a generator trained on latents nobody normalised.
      self._warned_unnormalised = True
      logging.warning(
          "encode(normalize=True): this tokenizer's latent statistics are the defaults "
          "(vq_mean=0, vq_std=1), so nothing is normalised. Measure them with `python -m "
          "softvq_jax.main --mode=stats --config=... --workdir=<its workdir>` (they are then "
          "stored in the checkpoint) or load a checkpoint that has them.")
    return self.normalize(z) if normalize else z

  def decode(self, tokens, *, denormalize: bool = False) -> jax.Array:
    """tokens [B, N, e] -> images [B, S, S, 3] float32 (the raw decoder output, not clamped).

    denormalize=True first maps generator-scale latents back: tokens * vq_std + vq_mean.
    """
    tokens = jnp.asarray(tokens, jnp.float32)
    if denormalize:
      tokens = self.denormalize(tokens)
    return self._decode(self._state, tokens)

  def reconstruct(self, images) -> jax.Array:
    """encode then decode, clamped to [-1, 1]."""
    return jnp.clip(self.decode(self.encode(images)), -1.0, 1.0)

  def normalize(self, tokens):
    return (tokens - self.config.vq_mean) / self.config.vq_std

  def denormalize(self, latents):
    return latents * self.config.vq_std + self.config.vq_mean

  def save(self, directory: str) -> None:
    """Writes the official hub format (config.json + model.safetensors) to `directory`, a local
    folder or a URL (gs://...)."""
    official.export_official(nnx.merge(self._graphdef, self._state), directory)

  def functions(self) -> "TokenizerFunctions":
    """The pure-function form of this tokenizer, for use inside another jitted, sharded step
    (see `tokenizer_functions`)."""
    return tokenizer_functions(self)


def _with_overrides(cfg: TokenizerConfig, compute_dtype, attention_backend) -> TokenizerConfig:
  kw = {}
  if compute_dtype is not None:
    kw["compute_dtype"] = jnp.dtype(compute_dtype).name
  if attention_backend is not None:
    kw["attention_backend"] = attention_backend
  return cfg.replace(**kw)


def _empty_model(cfg: TokenizerConfig) -> SoftVQTokenizer:
  """A model whose parameters are zero-size placeholders, filled by a strict loader.

  Random initialisation of a 600M-parameter model would cost seconds for nothing.
  """
  abstract = abstract_tokenizer(cfg)
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
  return nnx.merge(graphdef, state)


def from_official_dir(directory: str, *, compute_dtype=None, attention_backend=None) -> Tokenizer:
  cfg = _with_overrides(official.read_official_config(directory), compute_dtype, attention_backend)
  model = _empty_model(cfg)
  official.load_official_weights(model, directory)
  return Tokenizer(cfg, model)


def from_training_checkpoint(step_dir: str, *, compute_dtype=None,
                             attention_backend=None) -> Tokenizer:
  """EMA weights of one of our step directories (`checkpoint.resolve_step_dir`)."""
  from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel  # imports Orbax
  meta = checkpoint.read_json_item(step_dir, "metadata")
  cfg = TokenizerConfig.from_dict(meta["model"])
  cfg = _with_overrides(cfg, compute_dtype, attention_backend)
  graphdef, abstract = split_model(abstract_tokenizer(cfg))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract)
  params = checkpoint.restore_ema(step_dir, target)
  return Tokenizer(cfg, nnx.merge(graphdef, params))


def load_tokenizer(path_or_hub_id: str, *, compute_dtype=None, attention_backend=None,
                   revision: str | None = None) -> Tokenizer:
  """Loads a tokenizer from an official-format directory, our training workdir/checkpoint
  (EMA weights of the newest complete checkpoint), or a hub id.

  compute_dtype: override the activation dtype (e.g. "bfloat16" on GPU/TPU); parameters stay
  float32. attention_backend: "auto" | "xla" | "cudnn" | "jax".
  """
  source = os.fspath(path_or_hub_id)
  kw = dict(compute_dtype=compute_dtype, attention_backend=attention_backend)
  path = paths.resolve(source)
  # A URL (gs://...) is always a location; a local path is one when it exists. Anything else of
  # the form owner/name is a hub id.
  if paths.is_url(source) or path.exists():
    if not path.is_dir():
      if path.exists():
        raise CheckpointError(f"{path}: expected a directory, got a file")
      raise CheckpointError(f"{path}: no such directory (an official-format directory or a "
                            "training workdir of ours was expected)")
    if official.is_official_dir(path):
      return from_official_dir(path, **kw)
    from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel
    step_dir = checkpoint.resolve_step_dir(path)
    if step_dir is not None:
      return from_training_checkpoint(step_dir, **kw)
    raise CheckpointError(
        f"{path}: neither an official-format directory (needs {official.CONFIG_NAME} + "
        f"{official.WEIGHTS_NAME}; export one with Tokenizer.save(directory)) nor a training "
        "workdir / checkpoint of ours (<workdir>/checkpoints/<step>/state)")
  if source.count("/") != 1 or source.startswith((".", "/", "~")):
    raise CheckpointError(f"{path}: no such directory, and not a hub id of the form 'owner/name'")
  return from_official_dir(_download(source, revision), **kw)



def load_run_tokenizer(config, source: str) -> tuple[Tokenizer, str]:
  """(tokenizer, what was loaded) for `--mode=eval/stats/extract`: `source` (a workdir, a step
  directory, an official-format directory or a hub id) as process 0 resolved it
  (`checkpoint.agreed_source`: every process loads the same step), in
  `config.model.compute_dtype`; its image size must be `config.image_size`."""
  from softvq_jax import checkpoint  # pylint: disable=import-outside-toplevel
  source = checkpoint.agreed_source(source)
  tok = load_tokenizer(source, compute_dtype=config.model.compute_dtype)
  if tok.config.image_size != config.image_size:
    raise ValueError(f"the tokenizer in {source} is for {tok.config.image_size} px but "
                     f"config.image_size is {config.image_size}; pass --config.image_size="
                     f"{tok.config.image_size}")
  return tok, source

def _download(hub_id: str, revision: str | None) -> str:
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError("loading by hub id needs huggingface_hub (pip install huggingface_hub)"
                          ) from None
  files = [official.CONFIG_NAME, official.WEIGHTS_NAME]
  try:
    return huggingface_hub.snapshot_download(hub_id, revision=revision, allow_patterns=files)
  except Exception as e:  # network errors, missing repos, gated repos: one clear message
    raise CheckpointError(
        f"could not get {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline, "
        f"download it once elsewhere (`hf download {hub_id}`, the CLI of huggingface_hub >= 1.0) "
        "and pass the local "
        "directory instead") from None


# ------------------------------------------------------------------------------------------------
# The pure-function form: a tokenizer inside someone else's jitted, sharded step.
# ------------------------------------------------------------------------------------------------

# (Imported here, not at the top, to keep this addition append-only while api.py is edited on a
# branch.)
from typing import Any, Callable, NamedTuple  # noqa: E402  # pylint: disable=wrong-import-position


class TokenizerFunctions(NamedTuple):
  """`tokenizer_functions(tok)`: the tokenizer's weights as a pytree and pure encode / decode.

  params: nnx.State of the tokenizer's weights (float32 jax.Arrays). Pass it as an ordinary
      (frozen: never differentiated, never updated) argument of your jitted function and shard it
      as you like (`jax.device_put(params, shardings)`, or `in_shardings` of `jax.jit`).
  encode(params, images, *, normalize=False) -> tokens [B, N, e] float32. images: [B, S, S, 3]
      NHWC, float in [-1, 1] or uint8 in [0, 255] (scaled as the input pipeline's
      `pixels.to_model_range` does). normalize=True returns (tokens - vq_mean) / vq_std, the scale
      generators train on.
  decode(params, tokens, *, denormalize=False) -> images [B, S, S, 3] float32, the raw decoder
      output (not clamped). denormalize=True first maps tokens * vq_std + vq_mean.
  config: the TokenizerConfig (vq_mean / vq_std are Python floats baked into the functions).

  Both functions are traceable (no host work, no Python state, normalize / denormalize are
  Python bools); they compose with jax.jit, shardings, vmap, remat and jax.grad (through decode,
  e.g. for a pixel-space loss).
  """
  params: Any
  encode: Callable
  decode: Callable
  config: TokenizerConfig


def tokenizer_functions(tok: Tokenizer) -> TokenizerFunctions:
  """(params, encode, decode, config) of a loaded tokenizer as pure functions; e.g.

      fns = softvq_jax.tokenizer_functions(softvq_jax.load_tokenizer(path))
      params = jax.device_put(fns.params, NamedSharding(mesh, P()))      # replicated
      @jax.jit
      def step(params, images):                                          # images sharded
        z = fns.encode(params, images, normalize=True)
        ...
  """
  graphdef, cfg = tok._graphdef, tok.config  # pylint: disable=protected-access
  mean, std = float(cfg.vq_mean), float(cfg.vq_std)

  def encode(params, images, *, normalize: bool = False):
    images = jnp.asarray(images)
    if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
      raise TypeError(f"images must be float in [-1, 1] or uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4:
      raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    tokens = nnx.merge(graphdef, params).encode(pixels.to_model_range(images))
    return (tokens - mean) / std if normalize else tokens

  def decode(params, tokens, *, denormalize: bool = False):
    tokens = jnp.asarray(tokens, jnp.float32)
    if tokens.ndim != 3:
      raise ValueError(f"expected tokens [B, N, e], got shape {tokens.shape}")
    if denormalize:
      tokens = tokens * std + mean
    return nnx.merge(graphdef, params).decode(tokens)

  return TokenizerFunctions(tok._state, encode, decode, cfg)  # pylint: disable=protected-access
