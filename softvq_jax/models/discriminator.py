"""DINO-ViT discriminator of the GAN loss (spec.md §5.1, the `dino` discriminator from VAR).

A frozen DINO ViT-S/16 at 224 px reads the image; five small trainable 1-D convolutional heads
read its tokens after the position embedding and after blocks 2, 5, 8 and 11 (each readout is the
196 patch tokens with the class token added to every one of them) and give one logit per token:
logits [B, 5 * 196 = 980].

Head = Block(k=1) -> Residual(Block(k=9)) -> SpectralConv1d(D -> 1, k=1), where
Block(k) = SpectralConv1d(D -> D, kernel k, circular padding k//2) -> BatchNorm -> LeakyReLU(0.2)
and Residual(f)(x) = (f(x) + x) / sqrt(2). Activations are channels-last [B, L, D] here (the
reference is channels-first [B, D, L]; the convolution is the same).

State design (what the train step threads through `jax.jit`):
  * frozen  -- the backbone's nnx.Param weights (path contains "backbone"): never updated, and
               `apply_discriminator` stops their gradient, so an optimizer never sees them;
  * params  -- the heads' nnx.Param weights (conv kernels/biases, BatchNorm scale/bias): trainable;
  * state   -- everything else: BatchNorm running statistics (nnx.BatchStat) and the
               spectral-norm power-iteration vectors u, v (`SpectralVector`). They change on every
               train-mode call, so they must be carried in the TrainState and checkpointed.
`split_discriminator` returns (graphdef, frozen, params, state); `apply_discriminator` is the pure
function of those. Gradients flow to the input image (the generator's adversarial loss) and to
`params`, never to `frozen`.

Numerics that matter (torch semantics reproduced exactly):
  * spectral norm = `torch.nn.utils.spectral_norm` in train mode: the Conv1d weight [out, in, k]
    is flattened to W [out, in*k] (in-major, then kernel tap); one power iteration per call,
    v = normalize(W^T u), u = normalize(W v) with normalize(x) = x / max(|x|, 1e-12); u and v are
    stored and carry no gradient; sigma = u . (W v); the conv uses W / sigma. In eval mode the
    stored u, v are used without iterating (as torch does).
  * BatchNorm in train mode normalises with the biased variance of the batch over (batch, tokens)
    and updates running_mean/var with momentum 0.1 and the *unbiased* variance (torch's rule).
    The reference synchronises it over all GPUs (SyncBatchNorm). Here the batch axis of a global
    array is the whole global batch: under `jax.jit` with the batch sharded over devices, the
    plain mean over axis 0 compiles to a cross-device reduction, so every device sees the same
    global statistics without a collective written by hand (tested: 8 sharded devices == 1).
    With gradient accumulation the statistics are those of each micro-batch.
  * Input: x in [-1, 1] -> x * (0.5 / std) + (0.5 - mean) / std (ImageNet stats), in float32, then
    to 224 x 224 (`to_backbone_input`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax.models import vit

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The variables that are frozen: backbone parameters. Everything else that is an nnx.Param is
# trainable; everything that is not an nnx.Param is mutable state.
FROZEN = nnx.All(nnx.Param, nnx.PathContains("backbone"))
STATE = nnx.Not(nnx.Param)


class SpectralVector(nnx.Variable):
  """Spectral-norm power-iteration vector (u or v): state, not a parameter (torch buffer)."""


# --------------------------------------------------------------------------------------------
# Resizing to the backbone's resolution (torch F.interpolate semantics as NumPy matrices).
# --------------------------------------------------------------------------------------------

def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch `F.interpolate(mode="area")` (= adaptive average pooling) in 1-D.

  Output i averages inputs floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1; the 2-D area resize
  is this applied along H and along W (the mean over a rectangle is separable).
  """
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)
    w[i, lo:hi] = 1.0 / (hi - lo)
  return w


def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch `F.interpolate(mode="bicubic", align_corners=False)` in 1-D.

  torch's upsample_bicubic2d: Keys cubic with A = -0.75, source coordinate (i + 0.5) * n_in / n_out
  - 0.5 (not clamped for cubic), taps at floor(src) - 1 .. floor(src) + 2 with indices clamped to
  the border, no antialiasing; the same size is an exact copy.
  """
  if n_in == n_out:
    return np.eye(n_in)
  a = -0.75

  def cc1(t):  # |t| <= 1
    return ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0

  def cc2(t):  # 1 < |t| < 2
    return ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a

  scale = n_in / n_out
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5
    i0 = math.floor(src)
    t = src - i0
    taps = (cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t))
    for off, tap in zip((-1, 0, 1, 2), taps):
      w[i, min(max(i0 + off, 0), n_in - 1)] += tap
  return w


def resize(x: Array, size: tuple[int, int], method: str) -> Array:
  """[B, H, W, C] -> [B, size[0], size[1], C] with torch's "area" or "bicubic" interpolation."""
  make = {"area": area_resize_matrix, "bicubic": bicubic_resize_matrix}.get(method)
  if make is None:
    raise ValueError(f"unknown resize method {method!r}; use 'area' or 'bicubic'")
  b, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(make(h, size[0]), x.dtype)
  mw = jnp.asarray(make(w, size[1]), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", mh, x)
  return jnp.einsum("pw,bowc->bopc", mw, x)


def crop_or_resize_choice(key: Array, height: int, width: int, size: int = 224):
  """(crop?, (top, left)) exactly as `to_backbone_input` draws them from `key`.

  k_coin, k_crop = split(key); crop iff uniform(k_coin) < 0.5 (the reference's
  `random.random() <= 0.5`, one draw per call for the whole batch); top ~ U{0..H-size},
  left ~ U{0..W-size} (torchvision RandomCrop), also one per call.
  """
  k_coin, k_crop = jax.random.split(key)
  crop = jax.random.uniform(k_coin) < 0.5
  offsets = jax.random.randint(k_crop, (2,), 0, jnp.array([height - size + 1, width - size + 1]))
  return crop, offsets


def to_backbone_input(images: Array, key: Array | None, size: int = 224) -> Array:
  """[B, H, W, 3] in [-1, 1] -> [B, size, size, 3] float32, ImageNet-normalised (spec.md §5.1).

  Both sides > size: with probability 0.5 a random size x size crop, else an area resize (one
  choice and one crop position per call for the whole batch, from `key`). Otherwise (a side
  <= size): bicubic resize, which is the identity for size x size inputs (then `key` may be None).
  The choice is a `lax.cond` on a traced coin, so shapes are static under jit and only the taken
  branch runs.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images [B, H, W, 3] (NHWC), got shape {images.shape}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  x = images.astype(jnp.float32) * (0.5 / std) + (0.5 - mean) / std
  b, h, w, c = x.shape
  if h > size and w > size:
    if key is None:
      raise ValueError(f"images of {h}x{w} > {size} need a PRNG key for the random crop/resize; "
                       "pass key=jax.random.key(...)")
    crop, offsets = crop_or_resize_choice(key, h, w, size)

    def do_crop(y):
      return jax.lax.dynamic_slice(y, (0, offsets[0], offsets[1], 0), (b, size, size, c))

    return jax.lax.cond(crop, do_crop, lambda y: resize(y, (size, size), "area"), x)
  return resize(x, (size, size), "bicubic")


# --------------------------------------------------------------------------------------------
# Head modules.
# --------------------------------------------------------------------------------------------

class SpectralConv1d(nnx.Module):
  """Conv1d (channels-last) with torch's spectral norm and circular padding k // 2.

  kernel [k, in, out] (Flax layout; torch weight [out, in, k] = kernel.transpose(2, 1, 0)),
  bias [out]; state u [out], v [in * k] in torch's flattening order.
  """

  def __init__(self, din: int, dout: int, kernel_size: int, *, eps: float = 1e-12,
               rngs: nnx.Rngs):
    self.kernel_size = kernel_size
    self.eps = eps
    # The reference initialises head convs with xavier_normal_(gain=0.5) and zero bias.
    init = nnx.initializers.variance_scaling(0.25, "fan_avg", "normal", in_axis=-2, out_axis=-1)
    self.kernel = vit.make_param(rngs, init, (kernel_size, din, dout), (None, "embed", None))
    self.bias = vit.make_param(rngs, vit.zeros, (dout,), ("norm",))
    u = jax.random.normal(rngs.params(), (dout,), jnp.float32)
    v = jax.random.normal(rngs.params(), (din * kernel_size,), jnp.float32)
    self.u = SpectralVector(vit.l2_normalize(u, None, eps), out_sharding=(None,),
                            eager_sharding=False)
    self.v = SpectralVector(vit.l2_normalize(v, None, eps), out_sharding=(None,),
                            eager_sharding=False)

  def weight_matrix(self) -> Array:
    """The torch-flattened weight [out, in * k] (float32)."""
    k = self.kernel[...]
    return jnp.transpose(k, (2, 1, 0)).reshape(k.shape[2], -1)

  def normalized_kernel(self, train: bool) -> Array:
    """kernel / sigma; in train mode runs one power iteration and stores u, v."""
    w = self.weight_matrix()
    u, v = self.u[...], self.v[...]
    if train:
      wd = jax.lax.stop_gradient(w)
      v = vit.l2_normalize(wd.T @ u, None, self.eps)
      u = vit.l2_normalize(wd @ v, None, self.eps)
      self.u[...] = u
      self.v[...] = v
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, w @ v)
    return self.kernel[...] / sigma

  def __call__(self, x: Array, *, train: bool) -> Array:  # [B, L, in] -> [B, L, out]
    kernel = self.normalized_kernel(train).astype(x.dtype)
    pad = self.kernel_size // 2
    if self.kernel_size == 1:
      y = jnp.einsum("bli,io->blo", x, kernel[0])
    else:
      xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="wrap")  # circular padding
      y = jax.lax.conv_general_dilated(xp, kernel, window_strides=(1,), padding="VALID",
                                       dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.bias[...].astype(x.dtype)


class BatchNorm(nnx.Module):
  """BatchNorm1d over [B, L, C] (statistics over B and L), torch train/eval semantics.

  Statistics in float32. In train mode the batch is the global batch (see the module docstring).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, momentum: float = 0.1, rngs: nnx.Rngs):
    self.eps = eps
    self.momentum = momentum
    self.scale = vit.make_param(rngs, vit.ones, (dim,), ("norm",))
    self.bias = vit.make_param(rngs, vit.zeros, (dim,), ("norm",))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), out_sharding=("norm",),
                              eager_sharding=False)
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), out_sharding=("norm",),
                             eager_sharding=False)

  def __call__(self, x: Array, *, train: bool) -> Array:
    x32 = x.astype(jnp.float32)
    if train:
      mean = jnp.mean(x32, axis=(0, 1))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1))
      n = x.shape[0] * x.shape[1]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean)
      self.var[...] = jax.lax.stop_gradient((1 - m) * self.var[...] + m * unbiased)
    else:
      mean, var = self.mean[...], self.var[...]
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class ConvBlock(nnx.Module):
  """SpectralConv1d(k, circular) -> BatchNorm -> LeakyReLU(0.2)."""

  def __init__(self, dim: int, kernel_size: int, *, bn_eps: float, bn_momentum: float,
               rngs: nnx.Rngs):
    self.conv = SpectralConv1d(dim, dim, kernel_size, rngs=rngs)
    self.norm = BatchNorm(dim, eps=bn_eps, momentum=bn_momentum, rngs=rngs)

  def __call__(self, x: Array, *, train: bool) -> Array:
    return jax.nn.leaky_relu(self.norm(self.conv(x, train=train), train=train), 0.2)


class Head(nnx.Module):
  """Block(k=1) -> Residual(Block(k)) -> SpectralConv1d(D -> 1, k=1): [B, L, D] -> [B, L]."""

  def __init__(self, dim: int, kernel_size: int = 9, *, bn_eps: float = 1e-6,
               bn_momentum: float = 0.1, rngs: nnx.Rngs):
    kw = dict(bn_eps=bn_eps, bn_momentum=bn_momentum, rngs=rngs)
    self.block1 = ConvBlock(dim, 1, **kw)
    self.block2 = ConvBlock(dim, kernel_size, **kw)
    self.out = SpectralConv1d(dim, 1, 1, rngs=rngs)

  def __call__(self, x: Array, *, train: bool) -> Array:
    x = self.block1(x, train=train)
    x = (self.block2(x, train=train) + x) * (1.0 / math.sqrt(2.0))
    return self.out(x, train=train)[..., 0]


class DinoDiscriminator(nnx.Module):
  """Frozen DINO ViT + five spectral-norm conv heads -> logits [B, 5 * P] (float32).

  Defaults are the reference's ViT-S/16 at 224 px (P = 196, logits [B, 980]); smaller backbones
  are for tests. `dtype` is the compute dtype of the backbone and heads (BatchNorm statistics,
  input normalisation/resizing and the logits stay float32).
  """

  def __init__(self, *, img_size: int = 224, patch_size: int = 16, width: int = 384,
               depth: int = 12, num_heads: int = 6, readout_blocks: Sequence[int] = (2, 5, 8, 11),
               head_kernel_size: int = 9, bn_eps: float = 1e-6, bn_momentum: float = 0.1,
               dtype=jnp.float32, attention_backend: str = "auto", platform: str = "auto",
               rngs: nnx.Rngs):
    if any(not 0 <= i < depth for i in readout_blocks):
      raise ValueError(f"readout_blocks {tuple(readout_blocks)} must lie in 0..{depth - 1}")
    self.img_size = img_size
    self.readout_blocks = tuple(int(i) for i in readout_blocks)
    self.dtype = dtype
    # DINO ViT-S/16: tanh-GELU MLP, no LayerScale, class token, pos_embed for img_size.
    self.backbone = vit.VisionTransformer(
        img_size=img_size, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
        layer_scale_init=None, gelu_approximate=True, attention_backend=attention_backend,
        platform=platform, rngs=rngs)
    self.heads = nnx.List([
        Head(width, head_kernel_size, bn_eps=bn_eps, bn_momentum=bn_momentum, rngs=rngs)
        for _ in range(1 + len(self.readout_blocks))])

  def readouts(self, x: Array) -> list[Array]:
    """Backbone input [B, S, S, 3] -> 1 + len(readout_blocks) tensors [B, P, D] (patch + cls)."""
    vt = self.backbone
    tokens = vt.embed(x, self.dtype)
    feats = [tokens]
    last = max(self.readout_blocks)
    for i, block in enumerate(vt.blocks):  # blocks after the last readout are not needed
      if i > last:
        break
      tokens = block(tokens)
      if i in self.readout_blocks:
        feats.append(tokens)
    p = vt.num_prefix_tokens
    return [f[:, p:] + f[:, :1] for f in feats]

  def __call__(self, images: Array, key: Array | None = None, *, train: bool = True) -> Array:
    """images [B, H, W, 3] in [-1, 1] -> logits [B, 5 * P] float32 (updates state if train)."""
    x = to_backbone_input(images, key, self.img_size)
    outs = [head(f, train=train) for head, f in zip(self.heads, self.readouts(x))]
    return jnp.concatenate(outs, axis=1).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Functional interface for the jitted train step.
# --------------------------------------------------------------------------------------------

def split_discriminator(disc: DinoDiscriminator):
  """(graphdef, frozen, params, state): backbone weights, head weights, BN stats + u/v vectors."""
  return nnx.split(disc, FROZEN, nnx.Param, STATE)


def apply_discriminator(graphdef, frozen, params, state, images: Array, key: Array | None, *,
                        train: bool = True) -> tuple[Array, object]:
  """Pure call: (logits [B, 5 * P] float32, new_state). Jit-, grad- and shard-friendly.

  Differentiate w.r.t. `params` (discriminator step) and/or `images` (generator step); `frozen`
  gets a stop_gradient. With train=False the state is returned unchanged (running statistics,
  stored u/v). `key` picks the crop/resize when the images are larger than 224 (may be None for
  224 x 224 inputs).
  """
  frozen = jax.lax.stop_gradient(frozen)
  disc = nnx.merge(graphdef, frozen, params, state, copy=True)
  logits = disc(images, key, train=train)
  return logits, nnx.state(disc, STATE)
