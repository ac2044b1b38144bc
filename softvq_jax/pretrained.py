"""The one place that turns `config.pretrained` into frozen networks.

Evaluation needs the FID Inception and LPIPS-VGG; the training objective needs LPIPS-VGG, the DINO
discriminator backbone and the REPA teacher. Each is loaded from the file named in
`config.pretrained.<name>`, or, when that field is empty, from the cache that
`python -m softvq_jax.pretrained fetch` (and `main`'s first run, `config.pretrained.auto_fetch`)
fills with the verified, converted public weights (`softvq_jax/fetch.py`;
`config.pretrained.cache_dir`). Neither there: the run fails at start-up with the field, the file
to get and the command to run — unless `config.pretrained.allow_random_init` is set (demo and
tests: no weights can be downloaded there), in which case the network is randomly initialised and
the caller is told (`is_random`) so that it labels what it reports.

Returns NNX modules; callers split them (`nnx.split`) and keep their state out of the optimizer.

Command line: `python -m softvq_jax.pretrained fetch [--cache_dir=DIR|gs://...] [--only=lpips,dino,
repa_teacher,inception]` (see `fetch.main`).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

from absl import logging
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import fetch

_HOW = {
    "inception": "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (from its GitHub releases), "
                 "or its .safetensors conversion: python -m softvq_jax.convert.inception_weights "
                 "--pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.safetensors",
    "lpips": "one .safetensors made by python -m softvq_jax.convert.lpips_weights "
             "--vgg=vgg16-397923af.pth --out=lpips_vgg.safetensors (torchvision's VGG16 weights + "
             "the lpips package's heads)",
    "dino": "the DINO ViT-S/16 checkpoint dino_deitsmall16_pretrain.pth (facebookresearch/dino), "
            "or timm's vit_small_patch16_224.dino model.safetensors",
    "repa_teacher": "timm DINOv2 weights, e.g. the model.safetensors of "
                    "timm/vit_large_patch14_dinov2.lvd142m",
}


def _path(pretrained_config, name: str) -> str | None:
  """The network's file: the configured one, else the fetched one in the cache; None when neither
  exists and random init is allowed; else an error naming the field and the fix."""
  path = str(pretrained_config[name] or "")
  if path:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.pretrained.{name}={path!r} does not exist; it should be "
                              f"{_HOW[name]}")
    return path
  cache_dir = fetch.cache_dir_of(pretrained_config)
  path = fetch.cached(name, cache_dir)
  if path:
    logging.info("config.pretrained.%s: using the fetched %s", name, path)
    return path
  if pretrained_config.allow_random_init:
    logging.warning("config.pretrained.%s is empty: using a RANDOMLY INITIALISED network "
                    "(allow_random_init=True); numbers that depend on it are not comparable", name)
    return None
  raise ValueError(f"config.pretrained.{name} is empty and the cache has no "
                   f"{fetch.cache_file(name, cache_dir)}, but this run needs it: fetch it with "
                   f"`python -m softvq_jax.pretrained fetch --only={name}`, or set "
                   f"--config.pretrained.{name}=PATH to {_HOW[name]}. (For a smoke test without "
                   "weights: --config.pretrained.allow_random_init=True.)")


def random_init(make_module, seed: int):
  """A module of `make_module()`'s structure with fast host-side random weights (demo/tests).

  Building the real initialisers of a 24M-parameter convnet costs ~30 s of compilation on a CPU;
  a frozen, randomly initialised network only has to be well scaled: kernels (>= 2-D)
  ~ N(0, 2 / fan_in) (He, so ReLU activations keep their scale), 1-D scales / weights / running
  variances / LayerScale gammas ones, biases and running means zeros.
  """
  abstract = nnx.eval_shape(make_module)
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape, name = tuple(var.shape), str(path[-1])
    if len(shape) >= 2:
      value = rng.normal(0.0, np.sqrt(2.0 / max(int(np.prod(shape[:-1])), 1)), shape)
    elif name in ("scale", "weight", "var", "gamma"):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_inception(pretrained_config, *, seed: int = 0, dtype=jnp.float32):
  """(FIDInception, is_random)."""
  from softvq_jax.models.inception import FIDInception  # pylint: disable=import-outside-toplevel
  path = _path(pretrained_config, "inception")
  if path is None:
    return random_init(lambda: FIDInception(dtype=dtype), seed), True
  from softvq_jax.convert import inception_weights  # pylint: disable=import-outside-toplevel
  return inception_weights.load_inception(path, dtype=dtype), False


def load_lpips(pretrained_config, *, seed: int = 0, dtype=jnp.float32):
  """(LPIPS, is_random). The file is our single .safetensors; a torchvision VGG16 .pth also
  works (heads then come from the installed lpips package; needs torch)."""
  from softvq_jax.models.lpips import LPIPS  # pylint: disable=import-outside-toplevel
  path = _path(pretrained_config, "lpips")
  if path is None:
    return random_init(lambda: LPIPS(rngs=nnx.Rngs(0), dtype=dtype), seed), True
  from softvq_jax.convert import lpips_weights  # pylint: disable=import-outside-toplevel
  if path.endswith(".safetensors"):
    return lpips_weights.load_lpips_file(path, dtype=dtype), False
  return lpips_weights.load_lpips(path, dtype=dtype), False


def load_dino_discriminator(pretrained_config, disc_kwargs: dict, *, seed: int = 0):
  """(DinoDiscriminator whose backbone holds the DINO weights, is_random). Only the backbone
  (the frozen part) is meant to be used from it: the heads start from the TrainState's init."""
  from softvq_jax.models.discriminator import DinoDiscriminator  # pylint: disable=import-outside-toplevel
  make = lambda: DinoDiscriminator(rngs=nnx.Rngs(seed), **disc_kwargs)  # noqa: E731
  path = _path(pretrained_config, "dino")
  if path is None:
    return random_init(make, seed), True
  from softvq_jax.convert import dino_weights  # pylint: disable=import-outside-toplevel
  disc = random_init(make, seed)  # placeholders of the right shapes; the backbone is replaced
  dino_weights.load_dino_backbone_file(disc, path)
  return disc, False


def load_repa_teacher(pretrained_config, teacher_kwargs: dict, *, seed: int = 0):
  """(DINOv2 teacher ViT, is_random) built as `models.repa.build_repa_teacher(**teacher_kwargs)`."""
  from softvq_jax.models import repa  # pylint: disable=import-outside-toplevel
  path = _path(pretrained_config, "repa_teacher")
  if path is None:
    return random_init(lambda: repa.build_repa_teacher(rngs=nnx.Rngs(seed), **teacher_kwargs),
                       seed), True
  kw = {k: v for k, v in teacher_kwargs.items()}
  return repa_teacher_from_weights(path, kw.pop("size"), kw.pop("img_size"), kw.pop("patch_size"),
                                   **kw), False


def repa_teacher_from_weights(path_or_state_dict: str | Mapping, size: str = "L",
                              img_size: int = 256, patch_size: int = 16, *,
                              depth: int | None = None, attention_backend: str = "auto",
                              rngs: nnx.Rngs | None = None):
  """The REPA teacher (`models.repa.build_repa_teacher`) with timm DINOv2 weights
  (.safetensors / .npz / .pth or a state dict).

  A pretrained DINOv2 (patch 14, 518 px) is adapted as timm does when the reference creates it at
  patch 16 / img_size S: pos_embed grid resampled bicubic-antialiased (class token kept apart),
  patch kernel PI-resized (softvq_jax/convert/resample.py; equality with timm's
  `checkpoint_filter_fn` is tested in tests/test_repa.py and tests/test_vit.py). Loading is
  strict: a checkpoint of another size, or one with register tokens, fails with a
  `CheckpointError` listing the keys.
  """
  from softvq_jax.convert import timm_vit  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import repa  # pylint: disable=import-outside-toplevel
  model = repa.build_repa_teacher(size, img_size, patch_size, depth=depth,
                                  attention_backend=attention_backend,
                                  rngs=rngs if rngs is not None else nnx.Rngs(0))
  if isinstance(path_or_state_dict, Mapping):
    timm_vit.load_timm_vit(model, path_or_state_dict, source="REPA teacher state dict")
  else:
    timm_vit.load_timm_vit_file(model, str(path_or_state_dict))
  return model


if __name__ == "__main__":
  # `python -m softvq_jax.pretrained fetch [--cache_dir=...] [--only=lpips,dino,...]`
  sys.exit(fetch.main())
