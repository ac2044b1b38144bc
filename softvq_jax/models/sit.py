"""SiT and DiT (adaLN-Zero diffusion transformers) on SoftVQ tokens or 2-D latents (spec.md §8.1, 8.4).

Two input forms, one network:
  1-D (`vae_1d=True`, what the SoftVQ generators use): x [B, N, e] latent tokens; every token is one
      transformer token ("patch size 1"), embedded by a Linear e -> D; fixed interleaved 1-D
      sinusoid position embedding.
  2-D (`vae_1d=False`, the SD-VAE baseline the paper compares against): x [B, H, W, C] NHWC
      latents cut into p x p patches (a conv with kernel = stride = p, timm's PatchEmbed), the
      MAE/DiT 2-D sin-cos embedding, and the output unpatchified back to [B, H, W, C_out].

SiT and DiT differ only outside the network: SiT is fed t in [0, 1] (flow matching, used as is,
not x1000) and predicts a velocity with C channels; DiT (`learn_sigma=True`) is fed integer
timesteps 0..999 through the same sinusoidal embedder and predicts 2C channels (epsilon, then the
variance interpolation). `SiTConfig.kind` records which of the two a checkpoint is, so the
public API knows which sampler to use; the blocks are the same code.

Contract used by softvq_jax/sampling.py and softvq_jax/generator.py (do not change lightly):
  cfg = SiTConfig(...)                    # frozen, hashable
  model = SiT(cfg, rngs=nnx.Rngs(0))
  out = model(x, t, y)                    # x [B, N, e] or [B, H, W, C]; t [B] float (SiT) or int
                                          # (DiT); y [B] int32, cfg.null_class (1000) = no label
                                          # out: x's shape, channels x2 with learn_sigma; float32
  out = model(x, t, y, train=True, dropout_key=key)  # label dropout (class_dropout_prob)
  graphdef, state = nnx.split(model); out = sit_apply(graphdef, state, x, t, y)  # inside jax.jit

Numerics follow the tokenizer's conventions (models/vit.py): float32 parameters, matmul inputs in
`compute_dtype`, LayerNorm statistics and attention softmax in float32, the attention backend
switch of `vit.attention`. In addition the residual stream and the conditioning vector stay
float32 (what torch autocast does to the reference: its residual adds promote to float32), so a
bfloat16 run of a 28-block network does not accumulate its error in the residual.

Parameter names are the official state-dict names (`x_embedder`, `t_embedder.mlp.0`,
`y_embedder.embedding_table`, `blocks.{i}.adaLN_modulation.1`, `final_layer.linear`, ...), so the
converter (softvq_jax/convert/generator_official.py) is a rename plus transpose. `pos_embed` is
an `nnx.Variable` of type `FixedPosEmbed`, not an `nnx.Param`: it is stored (the checkpoints carry
it, and imported files' values are used as they are) but never trained.

Initialisation (spec.md §8.1): xavier-uniform Linear weights (the 2-D patch kernel viewed as
[D, C p p]), zero biases, label table and timestep MLP weights N(0, 0.02), every adaLN modulation
Linear and the final Linear zero.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax.models.vit import (Attention, Dense, Mlp, make_param, normal_02, patchify,
                                   shape_only_rngs, unpatchify, zeros)

Array = jax.Array

# width, depth, heads (spec.md §8.1). MLP ratio 4. "micro" is not a published size: fast tests.
SIT_SIZES = {
    "micro": (64, 2, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
KINDS = ("sit", "dit")
FREQUENCY_EMBEDDING_SIZE = 256  # the timestep embedder's sinusoid features

xavier_uniform = nnx.initializers.xavier_uniform()
# torch's xavier_uniform_ on the conv weight viewed as [D, C*p*p]: fan_in C*p*p, fan_out D.
xavier_uniform_conv = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                        in_axis=(0, 1, 2), out_axis=3)


@dataclasses.dataclass(frozen=True)
class SiTConfig:
  """Plain, hashable description of a SiT / DiT network (the official constructor's arguments).

  input_size: N tokens (1-D) or the latent side H = W (2-D). in_channels: e (1-D) or C (2-D).
  patch_size: 1 in the 1-D form (the official code forces it); p for 2-D.
  kind: "sit" (flow matching, t in [0, 1]) or "dit" (Gaussian diffusion, integer timesteps).
  """
  input_size: int = 64
  in_channels: int = 32
  patch_size: int = 1
  vae_1d: bool = True
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  kind: str = "sit"
  compute_dtype: str = "float32"
  attention_backend: str = "auto"
  remat: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"SiTConfig.kind={self.kind!r}: use one of {KINDS}")
    if self.vae_1d and self.patch_size != 1:
      raise ValueError(f"SiTConfig.patch_size={self.patch_size}: the 1-D form (vae_1d=True) has "
                       "one transformer token per latent token; use patch_size=1")
    if not self.vae_1d and self.input_size % self.patch_size:
      raise ValueError(f"SiTConfig.input_size={self.input_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"SiTConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.hidden_size % 4 and not self.vae_1d or self.hidden_size % 2:
      raise ValueError(f"SiTConfig.hidden_size={self.hidden_size}: the sin-cos position "
                       "embedding needs an even width (a multiple of 4 for the 2-D form)")

  @classmethod
  def named(cls, size: str, **kw) -> "SiTConfig":
    """E.g. `SiTConfig.named("XL", input_size=64, in_channels=32)` (SiT-XL/1 on 64 tokens)."""
    if size not in SIT_SIZES:
      raise ValueError(f"unknown SiT size {size!r}; use one of {list(SIT_SIZES)}")
    width, depth, heads = SIT_SIZES[size]
    return cls(hidden_size=width, depth=depth, num_heads=heads, **kw)

  def replace(self, **kw) -> "SiTConfig":
    return dataclasses.replace(self, **kw)

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def null_class(self) -> int:
    """The label meaning "no class" (classifier-free guidance): num_classes, i.e. 1000."""
    return self.num_classes

  @property
  def grid(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Transformer sequence length: N (1-D) or (H/p)^2 (2-D)."""
    return self.input_size if self.vae_1d else self.grid ** 2

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one sample without the batch axis: (N, e) or (H, W, C)."""
    if self.vae_1d:
      return (self.input_size, self.in_channels)
    return (self.input_size, self.input_size, self.in_channels)


class FixedPosEmbed(nnx.Variable):
  """A stored, never-trained variable (the official `pos_embed` has requires_grad=False)."""


def sincos_1d_interleaved(length: int, dim: int) -> np.ndarray:
  """[length, dim] float32: even channel 2i = sin(n w_i), odd 2i+1 = cos(n w_i),
  w_i = exp(-2i ln(10000) / dim) (spec.md §8.1; the official `positionalencoding1d`, computed as
  it does in float32)."""
  pos = np.arange(length, dtype=np.float32)[:, None]
  omega = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  out = np.zeros((length, dim), np.float32)
  out[:, 0::2] = np.sin(pos * omega)
  out[:, 1::2] = np.cos(pos * omega)
  return out


def _sincos_1d_concat(dim: int, pos: np.ndarray) -> np.ndarray:
  """[M, dim] float64: [sin(p w_j) for j] ++ [cos(p w_j) for j], w_j = 10000^(-2j/dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """[grid*grid, dim] float32, tokens in raster order: MAE/DiT's `get_2d_sincos_pos_embed`.

  The first dim/2 channels encode the column index, the last dim/2 the row index (the reference
  builds `meshgrid(w, h)` and embeds its first plane first), each as [sin ..., cos ...]
  (concatenated, unlike the interleaved 1-D form); computed in float64 as the reference does.
  """
  cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([_sincos_1d_concat(dim // 2, cols), _sincos_1d_concat(dim // 2, rows)],
                       axis=1)
  return emb.astype(np.float32)


def timestep_features(t: Array, dim: int = FREQUENCY_EMBEDDING_SIZE,
                      max_period: float = 10000.0) -> Array:
  """[B] (float t or integer timesteps, used as they are) -> [B, dim] float32 [cos | sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def layer_norm_no_affine(x: Array, eps: float = 1e-6) -> Array:
  """LayerNorm without scale/bias; float32 in, float32 out."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x [B, T, D] float32, shift/scale [B, D] -> x (1 + scale) + shift, float32."""
  return (x * (1.0 + scale.astype(jnp.float32)[:, None])
          + shift.astype(jnp.float32)[:, None])


def _reinit(dense: Dense, init, rngs: nnx.Rngs) -> Dense:
  """Replaces a vit.Dense's kernel by `init` (vit's blocks default to truncated normal 0.02)."""
  dense.kernel.set_value(init(rngs.params(), dense.kernel.shape, jnp.float32))
  return dense


class SiLU(nnx.Module):
  """Parameter-free SiLU, a module so that `nn.Sequential` indices match the state dict."""

  def __call__(self, x: Array) -> Array:
    return jax.nn.silu(x)


class PatchEmbed2D(nnx.Module):
  """timm PatchEmbed (`x_embedder.proj`): [B, H, W, C] -> [B, (H/p)(W/p), D], raster order."""

  def __init__(self, patch_size: int, in_channels: int, dim: int, *, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.proj = _ConvKernel(patch_size, in_channels, dim, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    k = self.proj.kernel[...]
    tokens = patchify(x, self.patch_size)
    y = jnp.einsum("bpi,io->bpo", tokens, k.reshape(-1, k.shape[-1]).astype(tokens.dtype))
    return y + self.proj.bias[...].astype(y.dtype)


class _ConvKernel(nnx.Module):
  """The conv's parameters, kernel in Flax layout [p, p, C, D] (torch [D, C, p, p] transposed)."""

  def __init__(self, patch_size: int, in_channels: int, dim: int, *, rngs: nnx.Rngs):
    self.kernel = make_param(rngs, xavier_uniform_conv, (patch_size, patch_size, in_channels, dim),
                             (None, None, None, "embed"))
    self.bias = make_param(rngs, zeros, (dim,), ("embed",))


class TimestepEmbedder(nnx.Module):
  """256 sinusoid features of t -> Linear -> SiLU -> Linear (`t_embedder.mlp.{0,2}`)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.mlp = nnx.List([
        Dense(FREQUENCY_EMBEDDING_SIZE, dim, axes=(None, "embed"), kernel_init=normal_02,
              rngs=rngs),
        SiLU(),
        Dense(dim, dim, axes=("embed", None), kernel_init=normal_02, rngs=rngs),
    ])

  def __call__(self, t: Array, dtype) -> Array:  # [B] -> [B, D] float32
    h = timestep_features(t).astype(dtype)
    for layer in self.mlp:
      h = layer(h)
    return h.astype(jnp.float32)


class LabelEmbedder(nnx.Module):
  """`y_embedder.embedding_table.weight` [num_classes + 1, D]; the last row is the null class.

  As in the reference, the null row exists only when class_dropout_prob > 0 (it is what
  classifier-free guidance conditions on). Label dropout replaces a label by the null class with
  probability class_dropout_prob when `train=True`.
  """

  def __init__(self, num_classes: int, dim: int, dropout_prob: float, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob
    self.embedding_table = _Table(num_classes + int(dropout_prob > 0), dim, rngs=rngs)

  def __call__(self, labels: Array, *, train: bool = False, dropout_key=None) -> Array:
    if train and self.dropout_prob > 0:
      if dropout_key is None:
        raise ValueError("label dropout (train=True) needs dropout_key, a jax.random key")
      drop = jax.random.uniform(dropout_key, labels.shape) < self.dropout_prob
      labels = jnp.where(drop, self.num_classes, labels)
    return jnp.take(self.embedding_table.weight[...], labels, axis=0)  # [B, D] float32


class _Table(nnx.Module):
  def __init__(self, rows: int, dim: int, *, rngs: nnx.Rngs):
    self.weight = make_param(rngs, normal_02, (rows, dim), (None, "embed"))


class SiTBlock(nnx.Module):
  """adaLN-Zero block: the conditioning c gives shift/scale/gate for attention and MLP.

  x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
  x += gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
  with LN without affine (eps 1e-6), qkv with bias, no qk-norm, tanh-GELU MLP (spec.md §8.1).
  """

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
               attention_backend: str = "auto", rngs: nnx.Rngs):
    self.attn = Attention(dim, num_heads, backend=attention_backend, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate=True, rngs=rngs)
    for dense in (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2):
      _reinit(dense, xavier_uniform, rngs)
    self.adaLN_modulation = nnx.List([  # pylint: disable=invalid-name  # official name
        SiLU(), Dense(dim, 6 * dim, axes=("embed", "mlp"), kernel_init=zeros, rngs=rngs)])

  def __call__(self, x: Array, c: Array, dtype) -> Array:
    """x [B, T, D] float32 residual stream, c [B, D] float32 -> [B, T, D] float32."""
    mod = self.adaLN_modulation[1](jax.nn.silu(c).astype(dtype))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(layer_norm_no_affine(x), shift_msa, scale_msa).astype(dtype)
    x = x + gate_msa.astype(jnp.float32)[:, None] * self.attn(h).astype(jnp.float32)
    h = modulate(layer_norm_no_affine(x), shift_mlp, scale_mlp).astype(dtype)
    return x + gate_mlp.astype(jnp.float32)[:, None] * self.mlp(h).astype(jnp.float32)


class FinalLayer(nnx.Module):
  """(shift, scale) from c; modulate(LN(x)); Linear D -> p*p*C_out (`final_layer.*`)."""

  def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.adaLN_modulation = nnx.List([  # pylint: disable=invalid-name  # official name
        SiLU(), Dense(dim, 2 * dim, axes=("embed", "mlp"), kernel_init=zeros, rngs=rngs)])
    self.linear = Dense(dim, out_dim, axes=("embed", None), kernel_init=zeros, rngs=rngs)

  def __call__(self, x: Array, c: Array, dtype) -> Array:  # -> [B, T, out_dim] float32
    shift, scale = jnp.split(self.adaLN_modulation[1](jax.nn.silu(c).astype(dtype)), 2, axis=-1)
    h = modulate(layer_norm_no_affine(x), shift, scale).astype(dtype)
    return self.linear(h).astype(jnp.float32)


class SiT(nnx.Module):
  """SiT / DiT network. `__call__(x, t, y)`: see the module docstring for shapes."""

  def __init__(self, cfg: SiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    if cfg.vae_1d:
      self.x_embedder = Dense(cfg.in_channels, d, axes=(None, "embed"),
                              kernel_init=xavier_uniform, rngs=rngs)
    else:
      self.x_embedder = PatchEmbed2D(cfg.patch_size, cfg.in_channels, d, rngs=rngs)
    self.pos_embed = FixedPosEmbed(jnp.asarray(fixed_pos_embed(cfg)),
                                   out_sharding=(None, None, "embed"), eager_sharding=False)
    self.t_embedder = TimestepEmbedder(d, rngs=rngs)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, rngs=rngs)
    self.blocks = nnx.List([
        SiTBlock(d, cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                 attention_backend=cfg.attention_backend, rngs=rngs)
        for _ in range(cfg.depth)])
    self.final_layer = FinalLayer(d, cfg.patch_size ** 2 * cfg.out_channels, rngs=rngs)

  def _check(self, x: Array, t: Array, y: Array):
    cfg = self.cfg
    want = cfg.input_shape
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
      form = "[B, N, e] tokens" if cfg.vae_1d else "[B, H, W, C] NHWC latents"
      raise ValueError(f"expected x as {form} of shape [B, {', '.join(map(str, want))}], got "
                       f"{tuple(x.shape)}")
    b = x.shape[0]
    if t.shape != (b,) or y.shape != (b,):
      raise ValueError(f"expected t and y of shape [{b}] (one per sample), got t {tuple(t.shape)}"
                       f", y {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise TypeError(f"y must hold integer class labels ({cfg.null_class} = null class), got "
                      f"{y.dtype}")

  def __call__(self, x: Array, t: Array, y: Array, *, train: bool = False,
               dropout_key=None) -> Array:
    cfg = self.cfg
    x, t, y = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
    self._check(x, t, y)
    dtype = cfg.dtype
    h = self.x_embedder(x.astype(dtype)).astype(jnp.float32) + self.pos_embed[...]
    c = (self.t_embedder(t, dtype)
         + self.y_embedder(y, train=train, dropout_key=dropout_key))  # [B, D] float32
    for block in self.blocks:
      if cfg.remat:
        h = nnx.remat(lambda blk, a, b: blk(a, b, dtype))(block, h, c)
      else:
        h = block(h, c, dtype)
    out = self.final_layer(h, c, dtype)  # [B, T, p*p*C_out]
    if cfg.vae_1d:
      return out
    return unpatchify(out, cfg.patch_size, (cfg.grid, cfg.grid), cfg.out_channels)


def fixed_pos_embed(cfg: SiTConfig) -> np.ndarray:
  """The network's `pos_embed` table [1, T, D] float32: a pure function of the config (1-D
  interleaved or 2-D sin-cos), so our training checkpoints need not store it."""
  if cfg.vae_1d:
    return sincos_1d_interleaved(cfg.input_size, cfg.hidden_size)[None]
  return sincos_2d(cfg.grid, cfg.hidden_size)[None]


def build_sit(cfg: SiTConfig | None = None, seed: int = 0, *, compute_dtype: str | None = None,
              **fields) -> SiT:
  """A randomly initialised network from a SiTConfig, or from the official constructor's
  keyword arguments (config.json names: input_size, patch_size, in_channels, hidden_size, depth,
  num_heads, vae_1d, mlp_ratio, num_classes, class_dropout_prob, learn_sigma, qk_norm=False),
  e.g. `build_sit(input_size=64, in_channels=32, vae_1d=True, patch_size=1, **XL)`.
  A network with learn_sigma=True is a DiT (kind="dit") unless `kind` says otherwise."""
  if cfg is None:
    if fields.pop("qk_norm", False):
      raise ValueError("qk_norm=True is not supported (the released generators have qk_norm=False)")
    known = {f.name for f in dataclasses.fields(SiTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise TypeError(f"build_sit: unknown field(s) {unknown}; SiTConfig has {sorted(known)}")
    fields.setdefault("kind", "dit" if fields.get("learn_sigma") else "sit")
    cfg = SiTConfig(**fields)
  elif fields:
    raise TypeError(f"build_sit: pass either a SiTConfig or fields, not both ({sorted(fields)})")
  if compute_dtype is not None:
    cfg = cfg.replace(compute_dtype=jnp.dtype(compute_dtype).name)
  return SiT(cfg, rngs=nnx.Rngs(seed))


def abstract_sit(cfg: SiTConfig) -> SiT:
  """Shape-only network (no memory, no FLOPs): parameter counts, sharding plans, empty models."""
  return nnx.eval_shape(lambda: SiT(cfg, rngs=shape_only_rngs(0)))


def sit_apply(graphdef, state, x: Array, t: Array, y: Array, *, train: bool = False,
              dropout_key=None) -> Array:
  """The network as a pure function of (graphdef, state) from `nnx.split(model)`: use it inside
  `jax.jit` (graphdef static, closed over or passed with static_argnums)."""
  return nnx.merge(graphdef, state)(x, t, y, train=train, dropout_key=dropout_key)


def count_params(module: SiT, *, include_pos_embed: bool = False) -> int:
  """Trainable parameters; include_pos_embed adds the fixed position table, as PyTorch's
  `sum(p.numel() for p in model.parameters())` does (it is an nn.Parameter there)."""
  n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  if include_pos_embed:
    n += int(module.pos_embed.size)
  return n
