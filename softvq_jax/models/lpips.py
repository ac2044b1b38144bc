"""LPIPS-VGG perceptual distance, numerically `lpips.LPIPS(net="vgg", version="0.1")`.

SoftVQ's perceptual loss (spec.md §5) and the LPIPS evaluation metric are this network:
  1. ScalingLayer: (x - shift) / scale per RGB channel (x in [-1, 1]);
  2. torchvision VGG16 `features` up to relu5_3, read out after relu1_2, relu2_2, relu3_3, relu4_3
     and relu5_3 (3x3 convolutions, padding 1, ReLU; 2x2 / stride 2 max-pool in floor mode);
  3. per layer: unit-normalise each spatial feature vector over channels, f / (||f|| + 1e-10), take
     the squared difference of the two images' normalised features, apply the learned 1x1 linear
     head (no bias), average over space;
  4. sum the five layer values: one distance per image.

Dropout: lpips' NetLinLayer puts a Dropout(p=0.5) before each head. The official SoftVQ training
runs LPIPS in train mode, so in its loss that dropout is active (spec.md §5): each element of
the per-position squared difference [B, h, w, C] is zeroed with probability p and the survivors
scaled by 1 / (1 - p) before the head — same expected value, more noise. `dropout_rate` with a
`dropout_key` reproduces it for the training loss; evaluation metrics call without a key (off).

Precision: convolutions run in `dtype` (bfloat16 for the training loss on accelerators) with the
float32 parameters cast to it; the scaling layer, normalisation, differences, heads and averages
run in float32 whatever `dtype` is.

Frozen by construction: parameters are read through `stop_gradient`, so a loss that closes over or
passes in this module never produces (or spends compute on) gradients for VGG or the heads, while
the gradient w.r.t. the images flows normally. The two images go through VGG separately (not as
one concatenated batch) so that, in training, the target image's features need no backward pass.

Sharding: every parameter has logical axes (None, ...), which the repo's rules map to no mesh axis,
so the module works with batch-sharded inputs under `jax.jit` with its state replicated
(`sharding.replicated(mesh)`, 58 MB in float32). `sharding.state_shardings` also accepts it; under
FSDP it then splits each parameter's largest divisible dimension over `fsdp` like every other
parameter, which is numerically the same.

Parameters are loaded from torchvision / lpips files by `softvq_jax/convert/lpips_weights.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models.vit import make_param

Array = jax.Array

# torchvision vgg16().features up to relu5_3: output channels of the 13 convolutions per stage; a
# 2x2 max-pool precedes every stage but the first, and each stage ends at one LPIPS read-out.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CHANNELS = tuple(stage[-1] for stage in VGG16_STAGES)  # (64, 128, 256, 512, 512)
# lpips.ScalingLayer buffers (ImageNet statistics expressed for inputs in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor: added to the norm, not inside the square root
MIN_SIZE = 16  # four max-pools before relu5_3 need at least 16 pixels per side

_he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's VGG init


class Conv3x3(nnx.Module):
  """3x3 convolution, stride 1, padding 1, with bias; kernel [3, 3, in, out] (HWIO)."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.kernel = make_param(rngs, _he_fan_out, (3, 3, din, dout), (None, None, None, None))
    self.bias = make_param(rngs, nnx.initializers.zeros_init(), (dout,), (None,))

  def __call__(self, x: Array) -> Array:  # [B, H, W, in] -> [B, H, W, out] in x.dtype
    kernel = jax.lax.stop_gradient(self.kernel[...]).astype(x.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + jax.lax.stop_gradient(self.bias[...]).astype(x.dtype)


class LinearHead(nnx.Module):
  """lpips NetLinLayer: a bias-free 1x1 convolution to one channel; weight [C] ([1, C, 1, 1])."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    # Non-negative like the trained heads, so an unloaded model is still a (random) distance.
    init = nnx.initializers.uniform(scale=1.0 / channels)
    self.weight = make_param(rngs, init, (channels,), (None,))

  def __call__(self, d: Array) -> Array:  # [B, C] float32 -> [B] float32
    return d @ jax.lax.stop_gradient(self.weight[...]).astype(jnp.float32)


def max_pool_2x2(x: Array) -> Array:
  """torch MaxPool2d(2, 2) (floor mode: an odd last row/column is dropped). [B, H, W, C].

  Written as a reshape + max rather than `reduce_window`: same values, and its gradient avoids
  XLA's select-and-scatter, which is slow on CPU. Ties (only exact equal maxima) split the
  gradient where torch sends it to one element; after ReLU, ties are zeros whose gradient the ReLU
  masks anyway.
  """
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, :2 * h2, :2 * w2]
  return jnp.max(x.reshape(b, h2, 2, w2, 2, c), axis=(2, 4))


def normalize_channels(f: Array) -> Array:
  """lpips.normalize_tensor over the channel axis in float32: f / (sqrt(sum f^2) + 1e-10).

  Where a feature vector is all zero (common after ReLU) the square root's gradient is infinite;
  the double `where` keeps the value exact and the gradient finite.
  """
  f = f.astype(jnp.float32)
  sumsq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sumsq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1.0)), 0.0)
  return f / (norm + NORM_EPS)


class LPIPS(nnx.Module):
  """LPIPS(net="vgg", version="0.1"). x, y: [B, H, W, 3] in [-1, 1] (H, W >= 16) -> [B] float32.

  Attributes (converter names): `convs[0..12]` (torchvision `features.{0,2,5,7,10,12,14,17,19,
  21,24,26,28}`), `lins[0..4]` (lpips `lin{k}.model.1`). Random initialisation is only useful
  for shapes and tests (first construction compiles ~13 random ops, seconds on CPU); the loaders
  in `convert/lpips_weights.py` build it with `nnx.eval_shape` and fill every parameter.
  """

  def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.dtype = jnp.dtype(dtype)
    convs, din = [], 3
    for stage in VGG16_STAGES:
      for dout in stage:
        convs.append(Conv3x3(din, dout, rngs=rngs))
        din = dout
    self.convs = nnx.List(convs)
    self.lins = nnx.List([LinearHead(c, rngs=rngs) for c in CHANNELS])

  def _check(self, x: Array, name: str) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS {name}: expected NHWC RGB images [B, H, W, 3], got shape "
                       f"{x.shape}; transpose NCHW inputs with x.transpose(0, 2, 3, 1)")
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"LPIPS {name}: images of {x.shape[1]}x{x.shape[2]} px are too small; "
                       f"VGG16's relu5_3 needs at least {MIN_SIZE} px per side (upsample first)")

  def features(self, x: Array) -> list[Array]:
    """The five VGG read-outs [B, H/2^k, W/2^k, C_k] in `dtype` (before normalisation)."""
    self._check(x, "input")
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    h = ((x.astype(jnp.float32) - shift) / scale).astype(self.dtype)
    feats, i = [], 0
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        h = max_pool_2x2(h)
      for _ in stage:
        h = jax.nn.relu(self.convs[i](h))
        i += 1
      feats.append(h)
    return feats

  def layer_distances(self, x: Array, y: Array, *, dropout_rate: float = 0.0,
                      dropout_key: Array | None = None) -> Array:
    """Per-layer LPIPS terms [B, 5] float32 (their sum over the last axis is the distance).

    With `dropout_key` and `dropout_rate` > 0, the heads' train-mode dropout (module docstring).
    """
    if x.shape != y.shape:
      raise ValueError(f"LPIPS: the two image batches differ in shape, {x.shape} vs {y.shape}")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"LPIPS dropout_rate must be in [0, 1), got {dropout_rate}")
    drop = dropout_key is not None and dropout_rate > 0
    keys = jax.random.split(dropout_key, len(CHANNELS)) if drop else [None] * len(CHANNELS)
    out = []
    for fx, fy, lin, key in zip(self.features(x), self.features(y), self.lins, keys):
      d = jnp.square(normalize_channels(fx) - normalize_channels(fy))  # [B, h, w, C] float32
      if drop:
        keep = jax.random.bernoulli(key, 1.0 - dropout_rate, d.shape)
        d = jnp.where(keep, d / (1.0 - dropout_rate), 0.0)
      out.append(lin(jnp.mean(d, axis=(1, 2))))  # the head is linear: average first, then project
    return jnp.stack(out, axis=-1)

  def __call__(self, x: Array, y: Array, *, dropout_rate: float = 0.0,
               dropout_key: Array | None = None) -> Array:
    """Per-image LPIPS distance [B] float32 (dropout: see `layer_distances`)."""
    return jnp.sum(self.layer_distances(x, y, dropout_rate=dropout_rate, dropout_key=dropout_key),
                   axis=-1)
