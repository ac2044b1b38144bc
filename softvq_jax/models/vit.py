"""Vision Transformer blocks that load timm `VisionTransformer` weights (DINOv2, DINO, ViT) as-is.

The official SoftVQ code builds its encoder and decoder from timm's DINOv2 ViTs, and its
discriminator / REPA teacher from timm ViTs too, so every module here mirrors one timm module and
keeps timm's parameter names (`patch_embed`, `cls_token`, `pos_embed`, `blocks[i].norm1`,
`attn.qkv`, `ls1.gamma`, `mlp.fc1`, ...). That keeps the weight converters a key rename plus a
transpose (see `softvq_jax/convert/`).

Numerics (spec.md §1.1): pre-norm blocks, LayerNorm eps 1e-6 computed in float32, exact
(erf) GELU unless `gelu_approximate` (the DINO discriminator uses tanh), attention scale
head_dim^-0.5, optional LayerScale. Parameters are float32; matmuls run in the input's dtype
(the compute dtype), so bfloat16 activations give bfloat16 matmuls with float32 master weights.

Every parameter carries logical axis names (`embed`, `mlp`, `qkv`, `heads`, ...) as NNX
`out_sharding` metadata; `softvq_jax/sharding.py` maps them to mesh axes with the config's rules.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

# width, depth, heads of the timm/DINOv2 ViTs the official code builds (spec.md §1.1). MLP ratio 4.
VIT_SIZES = {
    "micro": (64, 2, 2),  # not a released size: fast tests
    "mini": (128, 4, 4),  # not a released size: the CPU demo
    "T": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def shape_only_rngs(seed: int = 0) -> nnx.Rngs:
  """An `nnx.Rngs` for `nnx.eval_shape` constructions only (shapes, graphdefs, sharding plans).

  Under `nnx.eval_shape` every `rngs.params()` of a plain `nnx.Rngs` writes a traced counter back
  into a Variable, and flax's write path then asks the tracer for `.sharding`, which JAX answers
  by walking the whole trace to build an error message: quadratic in the number of parameters
  (measured: 22 s of 25 s to shape-evaluate SoftVQ-B on a loaded 2-core CPU; 3 s with this).
  Here the counter is a host (NumPy) array incremented in place while tracing. Never use it under
  `jax.jit` or anywhere values matter: the traced random ops capture that mutable array by
  reference, so every parameter would see the counter's final value (measured: different
  initial weights). Eager construction and jitted initialisation use `nnx.Rngs`.
  """
  rngs = nnx.Rngs(seed)
  rngs.params.count.set_raw_value(np.zeros((), np.uint32))
  return rngs


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter annotated with logical axis names (not sharded eagerly).

  Sharding is decided later from the abstract model (`nnx.eval_shape`) and the config's rules,
  so construction works with or without a mesh.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(axes),
                   eager_sharding=False)


trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0, upper=2.0)
normal_02 = nnx.initializers.normal(stddev=0.02)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


class Dense(nnx.Module):
  """y = x @ kernel + bias with kernel [in, out] (timm Linear weight transposed)."""

  def __init__(self, din: int, dout: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs,
               use_bias: bool = True, kernel_init=trunc_normal_02):
    self.kernel = make_param(rngs, kernel_init, (din, dout), axes)
    self.bias = make_param(rngs, zeros, (dout,), (axes[1],)) if use_bias else None

  def __call__(self, x: Array) -> Array:  # [..., in] -> [..., out] in x.dtype
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias; statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = make_param(rngs, ones, (dim,), ("norm",))
    self.bias = make_param(rngs, zeros, (dim,), ("norm",))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


def l2_normalize(x: Array, axis: int | None = -1, eps: float = 1e-12) -> Array:
  """torch's F.normalize: x / max(||x||, eps) along `axis` (None: the whole array); the eps
  bounds the norm, it is not added.

  The norm of an all-zero x is taken through a `where` so that its gradient is finite (sqrt's
  derivative at 0 is infinite: an all-zero token would give NaN), without changing any value:
  the forward pass is bit for bit sqrt(sum x^2) then the maximum. Used by the quantizer (spec.md
  §1.3), the REPA loss and the discriminator's spectral norm.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / jnp.maximum(norm, eps)


PLATFORMS = ("auto", "cpu", "gpu", "tpu")


def resolve_platform(platform: str = "auto") -> str:
  """The platform a model is built for: "cpu", "gpu" or "tpu"; "auto" = this process's default
  backend, read once when the model is built (not at trace time: softvq_jax/compile_plan.py
  builds TPU programs on a CPU host by passing "tpu" explicitly)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r} is not one of {PLATFORMS}")
  return jax.default_backend() if platform == "auto" else platform


def _default_backend(dtype, platform: str = "auto") -> str:
  """cuDNN flash attention on GPU for 16-bit compute; plain einsum attention everywhere else.

  On XLA:CPU `jax.nn.dot_product_attention` measured ~2x slower than the einsum for ViT-B, and
  cuDNN's fused kernel only takes float16/bfloat16.
  """
  if resolve_platform(platform) == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def attention(q: Array, k: Array, v: Array, backend: str = "auto",
              platform: str = "auto") -> Array:
  """Softmax attention without mask. q, k, v: [B, T, H, Dh] -> [B, T, H, Dh].

  backends: "xla" (einsum, softmax in float32), "cudnn" (fused flash attention on NVIDIA GPUs),
  "jax" (`jax.nn.dot_product_attention`'s default XLA lowering), "auto" (chosen for `platform`
  and the compute dtype).
  """
  if backend == "auto":
    backend = _default_backend(q.dtype, platform)
  scale = q.shape[-1] ** -0.5
  if backend == "xla":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  if backend in ("cudnn", "jax"):
    impl = "cudnn" if backend == "cudnn" else None
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
  raise ValueError(f"unknown attention backend {backend!r}; use auto, xla, cudnn or jax")


class Attention(nnx.Module):
  """timm Attention: fused qkv Linear (output laid out q|k|v, each head-major) and proj."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, backend: str = "auto",
               platform: str = "auto", rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.backend = backend
    self.platform = resolve_platform(platform)
    self.qkv = Dense(dim, 3 * dim, axes=("embed", "qkv"), use_bias=qkv_bias, rngs=rngs)
    self.proj = Dense(dim, dim, axes=("heads", "embed"), rngs=rngs)

  def __call__(self, x: Array) -> Array:  # [B, T, D] -> [B, T, D]
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.backend, self.platform)
    return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  """fc1 -> GELU (exact, or tanh-approximate for the DINO discriminator) -> fc2."""

  def __init__(self, dim: int, hidden: int, *, gelu_approximate: bool = False, rngs: nnx.Rngs):
    self.gelu_approximate = gelu_approximate
    self.fc1 = Dense(dim, hidden, axes=("embed", "mlp"), rngs=rngs)
    self.fc2 = Dense(hidden, dim, axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.gelu_approximate))


class LayerScale(nnx.Module):
  """Per-channel residual-branch scale (DINOv2's `ls1` / `ls2`, parameter `gamma`)."""

  def __init__(self, dim: int, init_value: float, *, rngs: nnx.Rngs):
    self.gamma = make_param(rngs, nnx.initializers.constant(init_value), (dim,), ("norm",))

  def __call__(self, x: Array) -> Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
               layer_scale_init: float | None = 1e-5, gelu_approximate: bool = False,
               attention_backend: str = "auto", platform: str = "auto", rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim, rngs=rngs)
    self.attn = Attention(dim, num_heads, backend=attention_backend, platform=platform, rngs=rngs)
    self.norm2 = LayerNorm(dim, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate=gelu_approximate, rngs=rngs)
    if layer_scale_init is None:
      self.ls1 = self.ls2 = None
    else:
      self.ls1 = LayerScale(dim, layer_scale_init, rngs=rngs)
      self.ls2 = LayerScale(dim, layer_scale_init, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    y = self.attn(self.norm1(x))
    x = x + (self.ls1(y) if self.ls1 is not None else y)
    y = self.mlp(self.norm2(x))
    return x + (self.ls2(y) if self.ls2 is not None else y)


def patchify(images: Array, patch_size: int) -> Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]; patches in raster order, (row, col, channel) inside."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Array:
  """Inverse of `patchify`: [B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C]."""
  b = tokens.shape[0]
  gh, gw = grid
  p = patch_size
  x = tokens.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


class PatchEmbed(nnx.Module):
  """Conv with kernel = stride = patch size, written as patchify + matmul (same result, faster).

  kernel is stored in Flax conv layout [p, p, C, D] so it is a plain transpose of timm's
  `patch_embed.proj.weight` [D, C, p, p].
  """

  def __init__(self, patch_size: int, in_chans: int, dim: int, *, rngs: nnx.Rngs):
    self.patch_size = patch_size
    # torch Conv2d's default init (kaiming-uniform a=sqrt(5) == uniform variance 1/3 over fan_in).
    init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                             in_axis=(0, 1, 2), out_axis=3)
    self.kernel = make_param(rngs, init, (patch_size, patch_size, in_chans, dim),
                             (None, None, None, "embed"))
    self.bias = make_param(rngs, zeros, (dim,), ("embed",))

  def __call__(self, images: Array) -> Array:  # [B, H, W, C] -> [B, P, D]
    k = self.kernel[...]
    x = patchify(images, self.patch_size)
    x = jnp.einsum("bpi,io->bpo", x, k.reshape(-1, k.shape[-1]).astype(x.dtype))
    return x + self.bias[...].astype(x.dtype)


class VisionTransformer(nnx.Module):
  """timm `VisionTransformer` trunk: patch_embed, [cls] + pos_embed, blocks, final norm.

  `embed` and `forward_tokens` are exposed separately because the tokenizer inserts latent /
  mask tokens between them, and the discriminator reads intermediate blocks.
  """

  def __init__(self, *, img_size: int, patch_size: int, width: int, depth: int, num_heads: int,
               mlp_ratio: float = 4.0, class_token: bool = True,
               layer_scale_init: float | None = 1e-5, gelu_approximate: bool = False,
               in_chans: int = 3, with_patch_embed: bool = True, attention_backend: str = "auto",
               remat: bool = False, platform: str = "auto", rngs: nnx.Rngs):
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    self.img_size = img_size
    self.patch_size = patch_size
    self.grid = img_size // patch_size
    self.width = width
    self.remat = remat
    self.platform = resolve_platform(platform)
    self.num_prefix_tokens = 1 if class_token else 0
    self.patch_embed = (PatchEmbed(patch_size, in_chans, width, rngs=rngs)
                        if with_patch_embed else None)
    self.cls_token = (make_param(rngs, nnx.initializers.normal(1e-6), (1, 1, width),
                                 (None, None, "embed")) if class_token else None)
    self.pos_embed = make_param(rngs, trunc_normal_02,
                                (1, self.num_prefix_tokens + self.grid ** 2, width),
                                (None, None, "embed"))
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init,
              gelu_approximate=gelu_approximate, attention_backend=attention_backend,
              platform=self.platform, rngs=rngs)
        for _ in range(depth)])
    self.norm = LayerNorm(width, rngs=rngs)

  def add_pos_embed(self, x: Array) -> Array:
    """[B, P, D] image tokens -> [B, prefix + P, D]: prepend cls, then add pos_embed (timm)."""
    if x.shape[1] != self.grid ** 2:
      raise ValueError(f"got {x.shape[1]} image tokens, the model was built for "
                       f"{self.grid}x{self.grid}={self.grid ** 2} (img_size {self.img_size})")
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)
    return x + self.pos_embed[...].astype(x.dtype)

  def embed(self, images: Array, dtype=jnp.float32) -> Array:
    """[B, H, W, C] -> [B, prefix + P, D] in `dtype`."""
    if self.patch_embed is None:
      raise ValueError("this ViT was built without a patch embedding")
    return self.add_pos_embed(self.patch_embed(images.astype(dtype)))

  def forward_tokens(self, x: Array, *, collect: Sequence[int] = (), final_norm: bool = True):
    """Runs all blocks (and the final norm). Returns x, or (x, [outputs of blocks in collect])."""
    feats = []
    for i, block in enumerate(self.blocks):
      x = _call_block(block, x, self.remat, self.platform)
      if i in collect:
        feats.append(x)
    if final_norm:
      x = self.norm(x)
    return (x, feats) if collect else x

  def forward_features(self, images: Array, dtype=jnp.float32) -> Array:
    """timm's `forward_features`: [B, H, W, C] -> [B, prefix + P, D] after the final norm."""
    return self.forward_tokens(self.embed(images, dtype))


@jax.custom_vjp
def materialize_cotangent(x: Array) -> Array:
  """Identity whose cotangent XLA must compute once instead of re-deriving it in every consumer.

  Why (XLA:CPU, measured on SoftVQ-B at 256 px): XLA:CPU's loop fusion duplicates cheap
  elementwise producers into every consumer that can take them. In a pre-norm residual stack the
  residual stream's cotangent is such a chain through all the blocks above (residual adds,
  LayerScale and LayerNorm backward terms), so each block's weight-gradient transposes and
  reductions recomputed the whole chain from the top: work quadratic in depth, ~1/5 of the train
  step and 3x the compile time for ViT-B. `lax.optimization_barrier` does not help (XLA:CPU
  removes it before fusion); a `lax.cond` is a fusion boundary, so the cotangent is computed once
  per block. The predicate only sends a non-finite cotangent (first element) to all-NaN — a step
  that the trainer rejects either way; any finite cotangent passes through bit for bit.
  """
  return x


def _materialize_fwd(x):
  return x, None


def _materialize_bwd(_, g):
  ok = jnp.isfinite(g[(0,) * g.ndim])
  return (jax.lax.cond(ok, lambda a: a, lambda a: jnp.full_like(a, jnp.nan), g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


def _call_block(block: Block, x: Array, remat: bool, platform: str) -> Array:
  if platform == "cpu":  # GPU/TPU graphs are left as they were (not measured there)
    x = materialize_cotangent(x)
  if not remat:
    return block(x)
  # Rematerialise the block in the backward pass: activations of only one block live at a time.
  return nnx.remat(lambda blk, y: blk(y))(block, x)
