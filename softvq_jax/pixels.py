"""The one map between stored images (uint8 in [0, 255]) and model images (float32 in [-1, 1]).

Forward (`to_model_range`): the reference's ToTensor + Normalize((0.5,), (0.5,)) with its exact op
order, x / 255 then (x - 0.5) / 0.5, in float32. (x / 127.5 - 1 is the same number mathematically
but not always bit for bit; every caller uses this one so that training, evaluation, latents and
the public API see identical inputs.)

Backward (`to_uint8`): clip to [0, 255] of round((x + 1) * 127.5), what images are saved as and
what the metrics are computed on (softvq_jax/evaluate.py).

Both work on NumPy arrays (host) and on JAX arrays (jit-able, device), returning the same kind.
"""
from __future__ import annotations

import numpy as np


def _xp(x):
  """jax.numpy for JAX arrays and tracers, NumPy otherwise (NumPy stays importable without JAX)."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jnp


def to_model_range(images):
  """uint8 [..., H, W, 3] -> float32 in [-1, 1]: x / 255, then (x - 0.5) / 0.5.

  Floating-point input is returned unchanged (already in the model's range: pipelines with
  output_dtype="float32" scaled it), so callers can apply it unconditionally.
  """
  xp = _xp(images)
  if xp.issubdtype(images.dtype, xp.floating):
    return images
  x = images.astype(xp.float32) / xp.float32(255.0)
  return (x - xp.float32(0.5)) / xp.float32(0.5)


def to_uint8(images):
  """float [..., H, W, 3] in [-1, 1] -> uint8: clip(round((x + 1) * 127.5), 0, 255)."""
  xp = _xp(images)
  x = images.astype(xp.float32) if hasattr(images, "astype") else xp.asarray(images, xp.float32)
  return xp.clip(xp.round((x + 1.0) * 127.5), 0, 255).astype(xp.uint8)
