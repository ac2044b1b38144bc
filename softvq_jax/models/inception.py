"""The FID Inception-v3 of pytorch-fid, in Flax NNX, for rFID / gFID / Inception Score (frozen).

FID numbers are only comparable with published ones when they come from the same network with the
same numerics, so this module mirrors `pytorch_fid.inception.InceptionV3(output_blocks=[3],
resize_input=True, normalize_input=True)` built on `fid_inception_v3()` exactly:

- torchvision's `Inception3` stem (`Conv2d_1a_3x3` ... `Conv2d_4a_3x3`, two 3x3/2 max pools) and
  `Mixed_6a` / `Mixed_7a` (InceptionB / InceptionD) blocks;
- pytorch-fid's patched blocks: `FIDInceptionA` / `FIDInceptionC` / `FIDInceptionE_1` average-pool
  their pool branch with `count_include_pad=False` (TensorFlow's average pool ignores padding) and
  `FIDInceptionE_2` (`Mixed_7c`) max-pools it instead (a quirk of the TF graph the FID weights come
  from);
- every convolution is bias-free and followed by an eval-mode BatchNorm (eps 0.001) and ReLU. The
  running statistics are kept as they are in the file (so export is exact) and folded into a
  per-channel scale/shift in float32 at call time;
- the input is resized to 299x299 like `F.interpolate(mode="bilinear", align_corners=False)`
  (no antialiasing when downsampling, unlike `jax.image.resize`), see `resize_bilinear`;
- the global average pool gives the 2048-d `pool` features (what FID uses), and the 1008-class
  `fc` layer of the FID graph on top of them gives `logits` (what the Inception Score uses).

Input convention: NHWC float images in [-1, 1]. pytorch-fid takes [0, 1] and maps x -> 2x - 1
after resizing; bilinear resizing is an affine combination (weights sum to 1), so it commutes
with that map and resizing our [-1, 1] input directly is the same computation (tested).

Weights: `softvq_jax/convert/inception_weights.py` (`load_inception(path)`) reads pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` or our safetensors export. Parameter names follow the
PyTorch state dict (`Mixed_5b.branch1x1.conv.kernel` <-> `Mixed_5b.branch1x1.conv.weight`).

The network is frozen and small (24M parameters, ~95 MB float32), so parameters are replicated;
jit it with a batch-sharded input and the whole forward pass runs data parallel (no collective
until the caller reduces the features).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

INPUT_SIZE = 299       # pytorch-fid resizes every input to 299x299
POOL_DIM = 2048        # FID features
NUM_CLASSES = 1008     # the FID graph's classifier (1000 ImageNet classes + 8 unused)
BN_EPS = 1e-3          # torchvision BasicConv2d's BatchNorm2d(eps=0.001)


# ------------------------------------------------------------------------------------------------
# Resize: torch's bilinear interpolation with align_corners=False, antialias=False.

def _linear_taps(in_size: int, out_size: int):
  """Source indices and weights of torch's 1-D linear interpolation, align_corners=False:
  src = max((dst + 0.5) * in / out - 0.5, 0); i0 = floor(src); i1 = min(i0 + 1, in - 1);
  weights (1 - (src - i0), src - i0).

  Float32 like torch's kernel, whose compiled `scale * (dst + 0.5) - 0.5` is one fused
  multiply-add (a single rounding; emulated here in float64). Rounding it twice instead moves
  the weights by up to 3e-5 at 300-pixel coordinates (measured against torch 2.14 CPU).
  Unlike `jax.image.resize`, the kernel is never widened when downsampling (torch's default
  antialias=False), which is what pytorch-fid feeds its Inception.
  """
  if in_size == out_size:  # torch copies in this case
    idx = np.arange(out_size)
    return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32) + f32(0.5)
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)  # fma: one rounding
  src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (f32(1) - lam1).astype(f32), lam1


def resize_bilinear(images: Array, size: tuple[int, int]) -> Array:
  """[B, H, W, C] -> [B, h, w, C] as `F.interpolate(x, size, mode="bilinear",
  align_corners=False)` (no antialias) computes it, for up- and downsampling.

  Two gathers and lerps with static indices (computed in NumPy at trace time): exact float32
  arithmetic on every backend, unlike an interpolation matrix, which GPUs/TPUs may multiply in
  TF32/bfloat16 under the default matmul precision.
  """
  b, h, w, c = images.shape
  out_h, out_w = size
  x = images
  if w != out_w:  # width first, then height: torch's order of the two lerps
    i0, i1, l0, l1 = _linear_taps(w, out_w)
    x = (jnp.take(x, i0, axis=2) * l0[None, None, :, None].astype(x.dtype)
         + jnp.take(x, i1, axis=2) * l1[None, None, :, None].astype(x.dtype))
  if h != out_h:
    i0, i1, l0, l1 = _linear_taps(h, out_h)
    x = (jnp.take(x, i0, axis=1) * l0[None, :, None, None].astype(x.dtype)
         + jnp.take(x, i1, axis=1) * l1[None, :, None, None].astype(x.dtype))
  assert x.shape == (b, out_h, out_w, c), x.shape
  return x


# ------------------------------------------------------------------------------------------------
# Pools (NHWC).

def max_pool(x: Array, window: int, stride: int, padding: int = 0) -> Array:
  """torch `max_pool2d` (padding counts as -inf, floor mode)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                               (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: Array) -> Array:
  """torch `avg_pool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)`: border
  windows average only the pixels inside the image (TensorFlow's SAME average pool)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                pad)
  h, w = x.shape[1:3]
  ones = np.pad(np.ones((h, w), np.float32), 1)
  count = sum(ones[i:i + h, j:j + w] for i in range(3) for j in range(3))  # static, [H, W]
  return total / jnp.asarray(count, x.dtype)[None, :, :, None]


# ------------------------------------------------------------------------------------------------
# Layers.

class Conv(nnx.Module):
  """Bias-free Conv2d; kernel [kh, kw, in, out] (PyTorch weight [out, in, kh, kw] transposed)."""

  def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: int,
               padding: tuple[int, int], *, rngs: nnx.Rngs):
    self.stride, self.padding = stride, padding
    fan_in = cin * kernel[0] * kernel[1]
    init = nnx.initializers.normal(stddev=float(np.sqrt(2.0 / fan_in)))
    self.kernel = nnx.Param(init(rngs.params(), (*kernel, cin, cout), jnp.float32))

  def __call__(self, x: Array, precision=None) -> Array:  # [B, H, W, in] -> [B, h, w, out]
    ph, pw = self.padding
    return jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


class BatchNorm(nnx.Module):
  """Eval-mode BatchNorm2d: (x - running_mean) / sqrt(running_var + eps) * weight + bias.

  `scale`/`bias` are Params, `mean`/`var` BatchStats (the file's running statistics, unchanged).
  """

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))

  def scale_shift(self) -> tuple[Array, Array]:
    """The folded per-channel affine map, float32."""
    scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return scale, self.bias[...] - self.mean[...] * scale


class BasicConv2d(nnx.Module):
  """torchvision BasicConv2d: conv -> BatchNorm(eps=0.001) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
               padding: int | tuple[int, int] = 0, *, rngs: nnx.Rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.conv = Conv(cin, cout, kernel, stride, padding, rngs=rngs)
    self.bn = BatchNorm(cout)

  def __call__(self, x: Array, precision=None) -> Array:
    scale, shift = self.bn.scale_shift()
    y = self.conv(x, precision) * scale.astype(x.dtype) + shift.astype(x.dtype)
    return jax.nn.relu(y)


class InceptionA(nnx.Module):
  """pytorch-fid FIDInceptionA (Mixed_5b/c/d): 1x1 | 5x5 | double 3x3 | avg-pool(excl. pad) 1x1."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: Array, p=None) -> Array:
    b1 = self.branch1x1(x, p)
    b5 = self.branch5x5_2(self.branch5x5_1(x, p), p)
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
    bp = self.branch_pool(avg_pool_exclude_pad(x), p)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """torchvision InceptionB (Mixed_6a): strided 3x3 | double 3x3 | 3x3/2 max pool."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array, p=None) -> Array:
    b3 = self.branch3x3(x, p)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
    return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  """pytorch-fid FIDInceptionC (Mixed_6b..e): factorised 7x7 branches, avg-pool excl. pad."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: Array, p=None) -> Array:
    b1 = self.branch1x1(x, p)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x, p), p), p)
    bd = self.branch7x7dbl_1(x, p)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd, p)
    bp = self.branch_pool(avg_pool_exclude_pad(x), p)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """torchvision InceptionD (Mixed_7a): strided 3x3 | 7x7 then strided 3x3 | 3x3/2 max pool."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array, p=None) -> Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x, p), p)
    b7 = self.branch7x7x3_1(x, p)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7, p)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """pytorch-fid FIDInceptionE_1 (pool="avg", Mixed_7b: average pool excluding padding) or
  FIDInceptionE_2 (pool="max", Mixed_7c: 3x3/1 max pool)."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x: Array, p=None) -> Array:
    b1 = self.branch1x1(x, p)
    b3 = self.branch3x3_1(x, p)
    b3 = jnp.concatenate([self.branch3x3_2a(b3, p), self.branch3x3_2b(b3, p)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p)
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd, p), self.branch3x3dbl_3b(bd, p)], axis=-1)
    pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, padding=1)
    bp = self.branch_pool(pooled, p)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out] (PyTorch Linear weight transposed)."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=float(np.sqrt(1.0 / din)))
    self.kernel = nnx.Param(init(rngs.params(), (din, dout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))

  def __call__(self, x: Array, precision=None) -> Array:
    return jnp.dot(x, self.kernel[...].astype(x.dtype), precision=precision) + self.bias[...]


# ------------------------------------------------------------------------------------------------

class FIDInception(nnx.Module):
  """pytorch-fid's FID Inception-v3: images [B, H, W, 3] in [-1, 1] (any H, W) ->
  {"pool": [B, 2048] float32, "logits": [B, 1008] float32}.

  dtype: activation / convolution dtype (float32 default, as pytorch-fid; bfloat16 is faster on
    accelerators but moves FID). The resize, BatchNorm folding, the final average pool and the
    classifier always run in float32.
  precision: `jax.lax.Precision` for convolutions and the classifier (None: the backend default,
    e.g. TF32 convolutions on recent NVIDIA GPUs, which PyTorch also uses there by default).
  rngs: only for the placeholder initialisation; real weights come from
    `softvq_jax.convert.inception_weights.load_inception`.
  """

  def __init__(self, *, dtype=jnp.float32, precision=None, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.dtype = jnp.dtype(dtype)
    self.precision = precision
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
    self.fc = Linear(POOL_DIM, NUM_CLASSES, rngs=rngs)

  def features(self, images: Array) -> Array:
    """[B, H, W, 3] in [-1, 1] -> pool features [B, 2048] float32."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FIDInception expects NHWC RGB images [B, H, W, 3], got shape "
                       f"{tuple(images.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1)")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"FIDInception expects float images in [-1, 1], got {images.dtype}; "
                       "convert uint8 with x / 127.5 - 1")
    p = self.precision
    x = resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE)).astype(self.dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x, p), p), p)
    x = max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x, p), p)
    x = max_pool(x, 3, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x, p)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]

  def __call__(self, images: Array) -> dict[str, Array]:
    pool = self.features(images)
    return {"pool": pool, "logits": self.fc(pool, self.precision).astype(jnp.float32)}


__all__: Sequence[str] = ("FIDInception", "resize_bilinear", "INPUT_SIZE", "POOL_DIM",
                          "NUM_CLASSES")
