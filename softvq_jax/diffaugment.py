"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of discriminator inputs (spec.md §5).

The reference augments both real and reconstructed images before the discriminator with the
policy 'color,translation,cutout_0.2' applied with probability 0.5, and for the consistency
regulariser with 'color,translation,cutout_0.5' and probability 1. Semantics kept here:
  * one coin per policy item per call: the whole batch gets that item or not;
  * within an item the parameters are drawn per example;
  * 'color' = brightness (+U(-0.5, 0.5)), then saturation (x U(0, 2) around the per-pixel channel
    mean), then contrast (x U(0.5, 1.5) around the per-image mean);
  * 'translation' = shift by an integer in [-round(S/8), round(S/8)] per axis with zero fill;
  * 'cutout[_r]' = zero a square of round(r * S) pixels centred at a random position (clipped at
    the border); r defaults to `cutout_ratio`.
All functions are pure and differentiable w.r.t. the images. Images are NHWC.

Randomness (deterministic per key): the key is split into one key per policy item; each item key
is split into (coin, params). The explicit-parameter functions (`brightness`, `saturation`,
`contrast`, `translation`, `cutout`) are public so tests can compare them with a port of the
published code for fixed parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_ITEMS = ("color", "translation", "cutout")


def parse_policy(policy: str, cutout_ratio: float = 0.2) -> tuple[tuple[str, float | None], ...]:
  """'color,translation,cutout_0.2' -> (('color', None), ('translation', None), ('cutout', 0.2))."""
  out = []
  for raw in policy.split(","):
    item = raw.strip()
    if not item:
      continue
    name, _, arg = item.partition("_")
    if name not in _ITEMS:
      raise ValueError(f"unknown DiffAugment policy item {item!r} in {policy!r}; use "
                       "color, translation, cutout or cutout_<fraction>")
    if name == "cutout":
      try:
        ratio = float(arg) if arg else float(cutout_ratio)
      except ValueError:
        raise ValueError(f"cannot read the cutout fraction in {item!r}; write e.g. cutout_0.2"
                         ) from None
      if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"cutout fraction {ratio} in {policy!r} must lie in [0, 1]")
      out.append((name, ratio))
    elif arg:
      raise ValueError(f"policy item {item!r} takes no argument")
    else:
      out.append((name, None))
  return tuple(out)


def _per_example(v: Array, x: Array) -> Array:
  return v.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def brightness(x: Array, delta: Array) -> Array:
  """x + delta[b] (delta ~ U(-0.5, 0.5) in the policy)."""
  return x + _per_example(delta, x)


def saturation(x: Array, factor: Array) -> Array:
  """(x - m) * factor[b] + m with m the per-pixel mean over channels (factor ~ U(0, 2))."""
  m = jnp.mean(x, axis=-1, keepdims=True)
  return (x - m) * _per_example(factor, x) + m


def contrast(x: Array, factor: Array) -> Array:
  """(x - m) * factor[b] + m with m the per-image mean over H, W, C (factor ~ U(0.5, 1.5))."""
  m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - m) * _per_example(factor, x) + m


def translation_max_shift(height: int, width: int, ratio: float = 0.125) -> tuple[int, int]:
  return int(height * ratio + 0.5), int(width * ratio + 0.5)


def _shift_axis(x: Array, shift: Array, axis: int) -> Array:
  """out[b, ..., i, ...] = x[b, ..., i + shift[b], ...] if in range else 0."""
  n = x.shape[axis]
  idx = jnp.arange(n)[None, :] + shift[:, None].astype(jnp.int32)  # [B, n]
  valid = (idx >= 0) & (idx < n)
  shape = [x.shape[0]] + [1] * (x.ndim - 1)
  shape[axis] = n
  idx_b = jnp.clip(idx, 0, n - 1).reshape(shape)
  valid_b = valid.reshape(shape)
  out = jnp.take_along_axis(x, idx_b, axis=axis, mode="clip")  # index broadcast over other axes
  return jnp.where(valid_b, out, jnp.zeros((), x.dtype))


def translation(x: Array, shift: Array) -> Array:
  """Shift each image by shift[b] = (dy, dx) pixels: out[i, j] = x[i + dy, j + dx], zero outside.

  (Zhao et al.'s `rand_translation` with translation_x on H and translation_y on W.)
  """
  shift = jnp.asarray(shift)
  x = _shift_axis(x, shift[:, 0], 1)
  return _shift_axis(x, shift[:, 1], 2)


def cutout_size(height: int, width: int, ratio: float) -> tuple[int, int]:
  return int(height * ratio + 0.5), int(width * ratio + 0.5)


def cutout(x: Array, offset: Array, size: tuple[int, int]) -> Array:
  """Zero rows offset[b,0] - size[0]//2 ... + size[0]-1 and the same for columns (clipped).

  offset[b] ~ U{0 .. H - (size % 2)} per axis in the policy (Zhao et al.'s `rand_cutout`).
  """
  b, h, w = x.shape[:3]
  offset = jnp.asarray(offset).astype(jnp.int32)
  top = (offset[:, 0] - size[0] // 2)[:, None]
  left = (offset[:, 1] - size[1] // 2)[:, None]
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_r = (rows >= top) & (rows < top + size[0])  # [B, H]
  in_c = (cols >= left) & (cols < left + size[1])  # [B, W]
  keep = ~(in_r[:, :, None] & in_c[:, None, :])  # [B, H, W]
  return x * keep[..., None].astype(x.dtype)


def _apply_item(name: str, arg, x: Array, key: Array) -> Array:
  b, h, w = x.shape[:3]
  if name == "color":
    kb, ks, kc = jax.random.split(key, 3)
    x = brightness(x, jax.random.uniform(kb, (b,)) - 0.5)
    x = saturation(x, jax.random.uniform(ks, (b,)) * 2.0)
    return contrast(x, jax.random.uniform(kc, (b,)) + 0.5)
  if name == "translation":
    sy, sx = translation_max_shift(h, w)
    ky, kx = jax.random.split(key)
    shift = jnp.stack([jax.random.randint(ky, (b,), -sy, sy + 1),
                       jax.random.randint(kx, (b,), -sx, sx + 1)], axis=1)
    return translation(x, shift)
  if name == "cutout":
    size = cutout_size(h, w, arg)
    ky, kx = jax.random.split(key)
    offset = jnp.stack([jax.random.randint(ky, (b,), 0, h + (1 - size[0] % 2)),
                        jax.random.randint(kx, (b,), 0, w + (1 - size[1] % 2))], axis=1)
    return cutout(x, offset, size)
  raise ValueError(f"unknown policy item {name!r}")


def diff_augment(x: Array, key: Array, policy: str = "color,translation,cutout",
                 cutout_ratio: float = 0.2, prob: float = 0.5) -> Array:
  """Augments x [B, H, W, C] (values in [-1, 1]); each policy item applied to the whole batch
  with probability `prob` (one coin per item per call), parameters drawn per example.

  policy: comma-separated items; 'cutout_<r>' sets the cutout fraction (else `cutout_ratio`).
  Deterministic for a given key; jit-able (coins are traced; both branches are cheap and
  `jnp.where` picks one).
  """
  if x.ndim != 4:
    raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}")
  items = parse_policy(policy, cutout_ratio)
  if not items:
    return x
  keys = jax.random.split(key, len(items))
  for (name, arg), k in zip(items, keys):
    k_coin, k_param = jax.random.split(k)
    y = _apply_item(name, arg, x, k_param)
    if prob >= 1.0:
      x = y
    elif prob > 0.0:
      x = jnp.where(jax.random.uniform(k_coin) < prob, y, x)
  return x
