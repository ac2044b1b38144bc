"""REPA representation alignment (spec.md §5, REPA bullet): teacher, projector, loss.

The reference (official `VQModel.encode` with `repa_align='repeat'`) aligns the soft tokens with
a frozen DINOv2 teacher:

    teacher tokens  t = DINOv2.forward_features(imagenet_norm(x))[:, 1:]   [B, P, D]  (final norm on)
    projection      h = projection(z_q)                                    [B, N, D]
    L_REPA = mean_{b, j} -cos(t[b, j], h[b, j // (P/N)])                   (raster order)

Only the projector is trained; the teacher is frozen and its features are stop-gradient. The
reference multiplies the loss by `repa_loss_weight` (0.1) inside the model; here `repa_loss` is
unweighted and the objective applies the weight, like every other term (softvq_jax/objective.py).

Official checkpoints saved with REPA on carry `projection.{0,2,4}.{weight,bias}` (REPA's
`build_mlp`: Sequential(Linear, SiLU, Linear, SiLU, Linear)) and `repa_model.*` (the teacher).
`REPAProjector` names its layers `0`, `2`, `4`, so `convert.state_dict.load_state_dict(proj, sd,
prefix="projection.")` / `export_state_dict(proj, "projection.")` read and write exactly those keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models.vit import VIT_SIZES, Dense, VisionTransformer, l2_normalize, make_param

Array = jax.Array

# ImageNet statistics (the reference's `Normalize(mean=..., std=...)` applied after mapping
# [-1, 1] -> [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.nn.Linear's default init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) for the weight,
# U(+-1/sqrt(fan_in)) for the bias): the reference's projector keeps PyTorch's defaults.
_torch_linear_kernel = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_linear(din: int, dout: int, axes, rngs: nnx.Rngs) -> Dense:
  layer = Dense(din, dout, axes=axes, kernel_init=_torch_linear_kernel, rngs=rngs)
  layer.bias = make_param(rngs, _torch_linear_bias(din), (dout,), (axes[1],))
  return layer


class REPAProjector(nnx.Module):
  """MLP on the soft tokens: e -> hidden -> SiLU -> hidden -> SiLU -> out_dim (per token).

  [B, N, e] -> [B, N, out_dim] in the input's dtype (parameters float32). Layer attributes are
  `0`, `2`, `4` (the official `projection.0/2/4` keys; 1 and 3 are the parameter-free SiLUs).
  Defaults follow the published SoftVQ-L recipe (spec.md §5); the official `ModelArgs` default for
  the hidden width (`repa_proj_dim`) is 2048, so when importing a projector take the widths from
  the checkpoint's shapes.
  """

  def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024, *,
               rngs: nnx.Rngs):
    self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
    # The token dim e (32) is too small to be worth splitting; the wide dims use the MLP axes.
    setattr(self, "0", _torch_linear(in_dim, hidden_dim, (None, "mlp"), rngs))
    setattr(self, "2", _torch_linear(hidden_dim, hidden_dim, ("embed", "mlp"), rngs))
    setattr(self, "4", _torch_linear(hidden_dim, out_dim, ("mlp", "embed"), rngs))

  def __call__(self, z: Array) -> Array:  # [B, N, e] -> [B, N, out_dim]
    if z.shape[-1] != self.in_dim:
      raise ValueError(f"REPAProjector expects tokens with last dim {self.in_dim} "
                       f"(codebook_embed_dim), got shape {z.shape}")
    x = jax.nn.silu(getattr(self, "0")(z))
    x = jax.nn.silu(getattr(self, "2")(x))
    return getattr(self, "4")(x)


def build_repa_teacher(size: str = "L", img_size: int = 256, patch_size: int = 16, *,
                       rngs: nnx.Rngs, depth: int | None = None,
                       attention_backend: str = "auto", remat: bool = False,
                       platform: str = "auto") -> VisionTransformer:
  """timm's `vit_{small,base,large}_patch14_dinov2` built at `patch_size` / `img_size` (random init).

  That is what the reference's `create_model(repa_model, pretrained=True, img_size=S,
  patch_size=16)` builds: class token, no register tokens, LayerScale, final LayerNorm, exact GELU.
  size: a `models.vit.VIT_SIZES` key ("S", "B", "L"; the recipe uses "L"). depth overrides the
  number of blocks (tests only). Load weights with `pretrained.repa_teacher_from_weights`
  (softvq_jax/pretrained.py).
  """
  if size not in VIT_SIZES:
    raise ValueError(f"REPA teacher size {size!r} is not one of {sorted(VIT_SIZES)}")
  width, default_depth, heads = VIT_SIZES[size]
  return VisionTransformer(
      img_size=img_size, patch_size=patch_size, width=width,
      depth=default_depth if depth is None else depth, num_heads=heads, class_token=True,
      layer_scale_init=1e-5, attention_backend=attention_backend, remat=remat, platform=platform,
      rngs=rngs)


def imagenet_normalize(images: Array) -> Array:
  """[-1, 1] -> ImageNet mean/std normalised, float32 (the reference's scale(de_scale(x)))."""
  x = images.astype(jnp.float32) * 0.5 + 0.5
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def teacher_features(teacher: VisionTransformer, images: Array, dtype=jnp.float32) -> Array:
  """Frozen teacher tokens: images [B, S, S, 3] in [-1, 1] -> [B, P, D] float32, stop-gradient.

  The reference reads `forward_features` (after the final LayerNorm) and drops the class token.
  dtype: the teacher's matmul dtype (the reference runs it under bf16 autocast); LayerNorm
  statistics and the returned features are float32.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"teacher_features expects NHWC RGB images [B, H, W, 3] in [-1, 1], "
                     f"got shape {images.shape}")
  x = jax.lax.stop_gradient(imagenet_normalize(images))
  feats = teacher.forward_features(x, dtype)[:, teacher.num_prefix_tokens:]
  return jax.lax.stop_gradient(feats.astype(jnp.float32))


def repa_loss(teacher_tokens: Array, projected: Array) -> Array:
  """L_REPA with 'repeat' alignment: scalar float32, mean over batch and teacher tokens of -cos.

  teacher_tokens [B, P, D] (from `teacher_features`), projected [B, N, D] (`REPAProjector` of
  z_q). Latent i is aligned with teacher tokens i*P/N ... (i+1)*P/N - 1 (raster order), as the
  reference's `unsqueeze(2).expand(..., P // N, ...)` does. Computed on the [B, N, P/N, D] view of
  the teacher tokens, which is the same sum without materialising the repeated projections.
  Unweighted (the recipe's weight is 0.1).
  """
  if teacher_tokens.ndim != 3 or projected.ndim != 3:
    raise ValueError(f"repa_loss expects teacher_tokens [B, P, D] and projected [B, N, D], got "
                     f"{teacher_tokens.shape} and {projected.shape}")
  b, p, d = teacher_tokens.shape
  bn, n, dn = projected.shape
  if (b, d) != (bn, dn):
    raise ValueError(f"repa_loss: batch/feature dims differ: teacher {teacher_tokens.shape} vs "
                     f"projected {projected.shape}; the projector's out_dim must equal the "
                     "teacher width")
  if p % n:
    raise ValueError(f"repa_loss ('repeat' alignment) needs the {p} teacher tokens to be a "
                     f"multiple of the {n} latent tokens; choose num_latent_tokens dividing "
                     f"(image_size / patch_size)^2 = {p}")
  t = l2_normalize(teacher_tokens.astype(jnp.float32)).reshape(b, n, p // n, d)
  h = l2_normalize(projected.astype(jnp.float32))[:, :, None, :]
  return -jnp.mean(jnp.sum(t * h, axis=-1))
