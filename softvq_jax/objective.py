"""The full training objective of spec 5: which networks it needs, their state, and its losses.

Terms (each switched off by a zero weight, which also skips loading its network):
  reconstruction  pixel L2/L1                                  (always)
  entropy         SoftVQ entropy term                          (always)
  perceptual      LPIPS-VGG(x, x_hat), warmed up linearly      (`loss.perceptual_weight`)
  repa            -cos(DINOv2 teacher tokens, projector(z_q))  (`loss.repa_weight`)
  adversarial     -mean D(DiffAugment(x_hat)), from `disc_start` (`loss.gan_weight`)
and the discriminator's own loss: hinge + LeCam (+ consistency regularisation), stepped in the
same jitted call right after the generator's update, on the detached reconstruction, with its
own optimizer (the generator's settings and schedule, as the reference).

State, by who owns it:
  * trainable, in the TrainState and the generator optimizer: tokenizer params; the REPA projector
    (`proj_params`);
  * trainable, with its own optimizer: the discriminator heads (`disc_params`);
  * mutable, checkpointed: BatchNorm running statistics and spectral-norm u/v (`disc_state`),
    the LeCam EMAs (`lecam`);
  * frozen, loaded from `config.pretrained` files at every start and never checkpointed
    (`TrainState.frozen`): LPIPS VGG, the DINO backbone, the REPA teacher. They are arguments of
    the jitted step (not closed-over constants, which XLA would fold into the program), sharded
    replicated or FSDP by `config.frozen_sharding`, and no optimizer ever sees them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax import config_lib, losses, pretrained
from softvq_jax.diffaugment import diff_augment
from softvq_jax.models import discriminator as disc_lib
from softvq_jax.models import repa as repa_lib
from softvq_jax.models.vit import shape_only_rngs
from softvq_jax.models.lpips import LPIPS

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static description of the objective (hashable pieces only: graphdefs and settings)."""
  loss_config: Any
  perceptual: bool
  gan: bool
  repa: bool
  lpips_graphdef: Any = None
  disc_graphdef: Any = None
  teacher_graphdef: Any = None
  proj_graphdef: Any = None
  disc_kwargs: Any = None
  proj_kwargs: Any = None
  teacher_kwargs: Any = None
  compute_dtype: Any = jnp.float32

  @property
  def any_network(self) -> bool:
    return self.perceptual or self.gan or self.repa


def _disc_kwargs(config) -> dict:
  d = config.disc
  width, depth, heads = config_lib.VIT_SIZES[d.backbone_size]
  return dict(img_size=d.img_size, patch_size=d.patch_size, width=width, depth=depth,
              num_heads=heads, readout_blocks=tuple(d.readout_blocks),
              head_kernel_size=d.head_kernel_size, dtype=jnp.dtype(config.model.compute_dtype),
              attention_backend=config.model.attention_backend)


def _teacher_kwargs(config) -> dict:
  r = config.repa
  return dict(size=r.teacher_size, img_size=config.image_size, patch_size=r.patch_size,
              depth=r.teacher_depth or None, attention_backend=config.model.attention_backend)


def build_objective(config) -> Objective:
  """Graphdefs (from shape-only models: no memory, no FLOPs) and switches of `config`'s objective."""
  lc = config.loss
  dtype = jnp.dtype(config.model.compute_dtype)
  obj = dict(loss_config=lc, perceptual=lc.perceptual_weight > 0, gan=lc.gan_weight > 0,
             repa=lc.repa_weight > 0, compute_dtype=dtype)
  if obj["perceptual"]:
    obj["lpips_graphdef"] = nnx.split(nnx.eval_shape(lambda: LPIPS(rngs=shape_only_rngs(0),
                                                                   dtype=dtype)))[0]
  if obj["gan"]:
    kw = _disc_kwargs(config)
    abstract = nnx.eval_shape(lambda: disc_lib.DinoDiscriminator(rngs=shape_only_rngs(0), **kw))
    obj["disc_graphdef"] = disc_lib.split_discriminator(abstract)[0]
    obj["disc_kwargs"] = tuple(sorted(kw.items()))
  if obj["repa"]:
    tkw = _teacher_kwargs(config)
    teacher = nnx.eval_shape(lambda: repa_lib.build_repa_teacher(rngs=shape_only_rngs(0), **tkw))
    obj["teacher_graphdef"] = nnx.split(teacher)[0]
    obj["teacher_kwargs"] = tuple(sorted(tkw.items()))
    pkw = dict(in_dim=config.model.codebook_embed_dim, hidden_dim=config.repa.hidden_dim,
               out_dim=teacher.width)
    obj["proj_graphdef"] = nnx.split(nnx.eval_shape(
        lambda: repa_lib.REPAProjector(rngs=shape_only_rngs(0), **pkw)))[0]
    obj["proj_kwargs"] = tuple(sorted(pkw.items()))
  return Objective(**obj)


def init_trainable(obj: Objective, seed: int) -> dict[str, Any]:
  """Fresh trainable/mutable state of the objective (jit-able): projector params, discriminator
  head params and state, LeCam EMAs. Parts of terms that are off are None."""
  out = {"proj_params": None, "disc_params": None, "disc_state": None, "lecam": None}
  if obj.repa:
    proj = repa_lib.REPAProjector(rngs=nnx.Rngs(seed + 1), **dict(obj.proj_kwargs))
    out["proj_params"] = nnx.state(proj, nnx.Param)
  if obj.gan:
    disc = disc_lib.DinoDiscriminator(rngs=nnx.Rngs(seed + 2), **dict(obj.disc_kwargs))
    _, _, params, state = disc_lib.split_discriminator(disc)  # the backbone's init is dropped
    out["disc_params"], out["disc_state"] = params, state
    out["lecam"] = losses.lecam_init()
  return out


def load_frozen(obj: Objective, config) -> tuple[dict[str, Any] | None, dict[str, bool]]:
  """Frozen network weights (host arrays) from `config.pretrained`, and which are random."""
  if not obj.any_network:
    return None, {}
  frozen, random = {}, {}
  pc = config.pretrained
  if obj.perceptual:
    lp, random["lpips"] = pretrained.load_lpips(pc, seed=config.seed, dtype=obj.compute_dtype)
    frozen["lpips"] = nnx.state(lp)
  if obj.gan:
    disc, random["dino"] = pretrained.load_dino_discriminator(pc, dict(obj.disc_kwargs),
                                                              seed=config.seed)
    frozen["dino"] = disc_lib.split_discriminator(disc)[1]
  if obj.repa:
    teacher, random["repa_teacher"] = pretrained.load_repa_teacher(
        pc, dict(obj.teacher_kwargs), seed=config.seed)
    frozen["teacher"] = nnx.state(teacher)
  return frozen, random


def abstract_frozen(obj: Objective) -> dict[str, Any] | None:
  """ShapeDtypeStructs of `load_frozen`'s result (for shardings and AOT compilation)."""
  if not obj.any_network:
    return None
  out = {}
  if obj.perceptual:
    out["lpips"] = nnx.state(nnx.eval_shape(lambda: LPIPS(rngs=shape_only_rngs(0),
                                                          dtype=obj.compute_dtype)))
  if obj.gan:
    out["dino"] = disc_lib.split_discriminator(nnx.eval_shape(
        lambda: disc_lib.DinoDiscriminator(rngs=shape_only_rngs(0), **dict(obj.disc_kwargs))))[1]
  if obj.repa:
    out["teacher"] = nnx.state(nnx.eval_shape(
        lambda: repa_lib.build_repa_teacher(rngs=shape_only_rngs(0), **dict(obj.teacher_kwargs))))
  return out


# ------------------------------------------------------------------------------------------------
# Loss pieces used by steps.py (pure functions of arrays and graphdefs).
# ------------------------------------------------------------------------------------------------


def perceptual_loss(obj: Objective, frozen, images: Array, reconstruction: Array,
                    key: Array) -> Array:
  """Batch mean of LPIPS(x, x_hat), with the heads' dropout as the official training runs it
  (`loss.perceptual_dropout`, 0.5 in the released recipe; `key` draws its masks)."""
  lp = nnx.merge(obj.lpips_graphdef, frozen["lpips"])
  return jnp.mean(lp(images, reconstruction, dropout_rate=obj.loss_config.perceptual_dropout,
                     dropout_key=key))


def repa_term(obj: Objective, frozen, proj_params, images: Array, tokens: Array) -> Array:
  teacher = nnx.merge(obj.teacher_graphdef, jax.lax.stop_gradient(frozen["teacher"]))
  target = repa_lib.teacher_features(teacher, images, obj.compute_dtype)
  proj = nnx.merge(obj.proj_graphdef, proj_params)
  return repa_lib.repa_loss(target, proj(tokens.astype(obj.compute_dtype)).astype(jnp.float32))


def discriminate(obj: Objective, frozen, disc_params, disc_state, images: Array, key: Array, *,
                 policy: str, prob: float):
  """D(DiffAugment(images)) in train mode: (logits [B, L] float32, new disc_state)."""
  k_aug, k_resize = jax.random.split(key)
  x = diff_augment(images, k_aug, policy=policy, prob=prob)
  return disc_lib.apply_discriminator(obj.disc_graphdef, frozen["dino"], disc_params, disc_state,
                                      x, k_resize, train=True)


def discriminator_loss(obj: Objective, frozen, disc_params, disc_state, lecam, images: Array,
                       reconstruction: Array, key: Array, weight: Array, active: Array):
  """L_D of spec 5 on (x, detached x_hat). Returns (loss, (disc_state, lecam, metrics))."""
  lc = obj.loss_config
  k_real, k_fake, k_real_s, k_fake_s = jax.random.split(key, 4)
  fake = jax.lax.stop_gradient(reconstruction)
  real_logits, st = discriminate(obj, frozen, disc_params, disc_state, images, k_real,
                                 policy=lc.disc_aug, prob=lc.disc_aug_prob)
  fake_logits, st = discriminate(obj, frozen, disc_params, st, fake, k_fake,
                                 policy=lc.disc_aug, prob=lc.disc_aug_prob)
  ema = losses.lecam_update(lecam, real_logits, fake_logits, lc.lecam_decay)
  d = losses.discriminator_loss(real_logits, fake_logits, lc.disc_loss)
  lecam_reg = losses.lecam_regularizer(real_logits, fake_logits, ema["real"], ema["fake"])
  loss = weight * (d + lc.lecam_weight * lecam_reg)
  metrics = {"disc/loss": d, "disc/lecam": lecam_reg, "disc/logits_real": jnp.mean(real_logits),
             "disc/logits_fake": jnp.mean(fake_logits), "disc/lecam_ema_real": ema["real"],
             "disc/lecam_ema_fake": ema["fake"]}
  if lc.cr_weight > 0:
    real_s, st = discriminate(obj, frozen, disc_params, st, images, k_real_s,
                              policy=lc.cr_aug, prob=lc.cr_aug_prob)
    fake_s, st = discriminate(obj, frozen, disc_params, st, fake, k_fake_s,
                              policy=lc.cr_aug, prob=lc.cr_aug_prob)
    cr = losses.consistency_loss(real_logits, fake_logits, real_s, fake_s, lc.cr_weight)
    loss = loss + jnp.where(active, cr, 0.0)
    metrics["disc/consistency"] = cr
  metrics["disc/total"] = loss
  return loss, (st, ema, metrics)
