"""The training objective of spec.md §5, in one file: its networks, its state, the generator loss and
the discriminator update.

Generator terms (each switched off by a zero weight, which also skips loading its network):
  reconstruction  pixel L2/L1                                  (always)
  entropy         SoftVQ entropy term                          (always)
  perceptual      LPIPS-VGG(x, x_hat), warmed up linearly      (`loss.perceptual_weight`)
  repa            -cos(DINOv2 teacher tokens, projector(z_q))  (`loss.repa_weight`)
  adversarial     -mean D(DiffAugment(x_hat)), from `disc_start` (`loss.gan_weight`)
`generator_weights` says which term has which weight at which step; `generator_loss` is the
weighted sum that the train step (softvq_jax/steps.py) differentiates. The discriminator's own
loss (hinge + LeCam (+ consistency regularisation)) and its optimizer step are
`discriminator_update`, run in the same jitted call right after the generator's update, on the
detached reconstruction, with its own optimizer (the generator's settings and schedule, as the
reference). The formulas of the individual terms are softvq_jax/losses.py.

State, by who owns it:
  * trainable, in the TrainState and the generator optimizer: tokenizer params; the REPA projector
    (`proj_params`);
  * trainable, with its own optimizer: the discriminator heads (`disc_params`);
  * mutable, checkpointed: BatchNorm running statistics and spectral-norm u/v (`disc_state`),
    the LeCam EMAs (`lecam`);
  * frozen, loaded from `config.pretrained` files at every start and never checkpointed: LPIPS
    VGG, the DINO backbone, the REPA teacher (`load_frozen` -> {"lpips", "dino", "teacher"}). They
    are not part of the TrainState: the step takes them as its own argument,
    `p_step(state, frozen, batch)` (not closed-over constants, which XLA would fold into the
    program; not donated), sharded replicated or FSDP by `config.frozen_sharding`, and no
    optimizer ever sees them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from softvq_jax import losses, pretrained
from softvq_jax.diffaugment import diff_augment
from softvq_jax.models import discriminator as disc_lib
from softvq_jax.models import repa as repa_lib
from softvq_jax.models.lpips import LPIPS
from softvq_jax.models.vit import VIT_SIZES, shape_only_rngs

Array = jax.Array

# Quantizer statistics that are averaged into the logged metrics ([C] arrays are averaged over C).
_STAT_KEYS = ("perplexity", "usage", "cos_sim", "max_prob", "mean_prob")
_PIXEL_HEAD = ("decoder", "to_pixel", "kernel")  # "the last layer" of the adaptive GAN weight


@dataclasses.dataclass(frozen=True)
class Objective:
  """Static description of the objective: settings, graphdefs and the frozen networks' shapes.

  Built once per config by `build_objective` (every network is shape-evaluated there, once).
  """
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
  # ShapeDtypeStructs of `load_frozen`'s result (None: no frozen network), for shardings and AOT.
  frozen_shapes: Any = dataclasses.field(default=None, compare=False, hash=False)

  @property
  def any_network(self) -> bool:
    return self.perceptual or self.gan or self.repa


def _disc_kwargs(config) -> dict:
  d = config.disc
  width, depth, heads = VIT_SIZES[d.backbone_size]
  return dict(img_size=d.img_size, patch_size=d.patch_size, width=width, depth=depth,
              num_heads=heads, readout_blocks=tuple(d.readout_blocks),
              head_kernel_size=d.head_kernel_size, dtype=jnp.dtype(config.model.compute_dtype),
              attention_backend=config.model.attention_backend, platform=config.model.platform)


def _teacher_kwargs(config) -> dict:
  r = config.repa
  return dict(size=r.teacher_size, img_size=config.image_size, patch_size=r.patch_size,
              depth=r.teacher_depth or None, attention_backend=config.model.attention_backend,
              platform=config.model.platform)


def build_objective(config) -> Objective:
  """Switches, graphdefs and frozen-network shapes of `config`'s objective (shape-only models: no
  memory, no FLOPs). A pixel + entropy objective has no network: `any_network` is False."""
  lc = config.loss
  dtype = jnp.dtype(config.model.compute_dtype)
  obj = dict(loss_config=lc, perceptual=lc.perceptual_weight > 0, gan=lc.gan_weight > 0,
             repa=lc.repa_weight > 0, compute_dtype=dtype)
  frozen = {}
  if obj["perceptual"]:
    obj["lpips_graphdef"], frozen["lpips"] = nnx.split(
        nnx.eval_shape(lambda: LPIPS(rngs=shape_only_rngs(0), dtype=dtype)))
  if obj["gan"]:
    kw = _disc_kwargs(config)
    abstract = nnx.eval_shape(lambda: disc_lib.DinoDiscriminator(rngs=shape_only_rngs(0), **kw))
    obj["disc_graphdef"], frozen["dino"] = disc_lib.split_discriminator(abstract)[:2]
    obj["disc_kwargs"] = tuple(sorted(kw.items()))
  if obj["repa"]:
    tkw = _teacher_kwargs(config)
    teacher = nnx.eval_shape(lambda: repa_lib.build_repa_teacher(rngs=shape_only_rngs(0), **tkw))
    obj["teacher_graphdef"], frozen["teacher"] = nnx.split(teacher)
    obj["teacher_kwargs"] = tuple(sorted(tkw.items()))
    pkw = dict(in_dim=config.model.codebook_embed_dim, hidden_dim=config.repa.hidden_dim,
               out_dim=teacher.width)
    obj["proj_graphdef"] = nnx.split(nnx.eval_shape(
        lambda: repa_lib.REPAProjector(rngs=shape_only_rngs(0), **pkw)))[0]
    obj["proj_kwargs"] = tuple(sorted(pkw.items()))
  return Objective(**obj, frozen_shapes=frozen or None)


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
  return obj.frozen_shapes


# ------------------------------------------------------------------------------------------------
# The generator loss.
# ------------------------------------------------------------------------------------------------


def generator_weights(loss_config, step: Array, terms=None) -> dict[str, Array]:
  """Weight of every generator term at `step` (1-based, as the reference counts), spec.md §5:

    reconstruction  loss.reconstruction_weight                       (1.0)
    entropy         loss.entropy_weight                              (0.01)
    perceptual      loss.perceptual_weight * min(1, step / warmup)   (1.0, warm-up 10k steps)
    repa            loss.repa_weight                                 (0.1)
    adversarial     loss.gan_weight if step >= disc_start else 0     (0.2 from step 20k)

  `terms`: the names present (default: all with a non-zero configured weight).
  """
  lc = loss_config
  step = jnp.asarray(step, jnp.float32)
  warm = lc.perceptual_warmup_steps
  all_weights = {
      "reconstruction": jnp.float32(lc.reconstruction_weight),
      "entropy": jnp.float32(lc.entropy_weight),
      "perceptual": lc.perceptual_weight * (jnp.minimum(1.0, step / warm) if warm > 0
                                            else jnp.float32(1.0)),
      "repa": jnp.float32(lc.repa_weight),
      "adversarial": jnp.where(step >= lc.disc_start, jnp.float32(lc.gan_weight), 0.0),
  }
  if terms is None:
    terms = [k for k in all_weights
             if k in ("reconstruction", "entropy") or lc[_WEIGHT_FIELDS[k]] > 0]
  return {k: all_weights[k] for k in terms}


_WEIGHT_FIELDS = {"perceptual": "perceptual_weight", "repa": "repa_weight",
                  "adversarial": "gan_weight"}


def weighted_sum(terms: dict[str, Array], weights: dict[str, Array]) -> tuple[Array, dict]:
  """sum_k weights[k] * terms[k]; every term must have a weight (and vice versa).

  Returns (total, metrics) with metrics "loss/<k>" (unweighted) and "loss/<k>_weighted".
  """
  if set(terms) != set(weights):
    raise ValueError(f"loss terms {sorted(terms)} and weights {sorted(weights)} differ")
  total = jnp.float32(0.0)
  metrics = {}
  for k in sorted(terms):
    value = terms[k].astype(jnp.float32)
    metrics[f"loss/{k}"] = value
    metrics[f"loss/{k}_weighted"] = weights[k] * value
    total = total + weights[k] * value
  metrics["loss/total"] = total
  return total, metrics


def generator_terms(obj: Objective, graphdef, gen_params, frozen, disc, images: Array, key: Array):
  """The unweighted generator terms: (terms {name: scalar}, tokenizer output, new disc_state).

  gen_params = (tokenizer params, projector params or None); disc = (disc_params, disc_state) or
  None; images [B, S, S, 3] float32 in [-1, 1].
  """
  params, proj_params = gen_params
  lc = obj.loss_config
  out = nnx.merge(graphdef, params)(images)
  terms = {"reconstruction": losses.reconstruction_loss(images, out.reconstruction,
                                                        lc.reconstruction),
           "entropy": out.entropy_loss}
  disc_state = None
  if obj.perceptual:
    # its own stream, so the discriminator's draws do not depend on the LPIPS dropout
    terms["perceptual"] = _perceptual_loss(obj, frozen, images, out.reconstruction,
                                           jax.random.fold_in(key, 1))
  if obj.repa:
    terms["repa"] = _repa_term(obj, frozen, proj_params, images, out.tokens)
  if obj.gan:
    logits, disc_state = _discriminate(obj, frozen, disc[0], disc[1], out.reconstruction, key,
                                       policy=lc.disc_aug, prob=lc.disc_aug_prob)
    terms["adversarial"] = losses.generator_adversarial_loss(logits, lc.gen_adv_loss)
  return terms, out, disc_state


def generator_loss(obj: Objective, graphdef, gen_params, frozen, disc, images: Array, step: Array,
                   key: Array, adv_scale: Array):
  """The generator's total loss at `step` (1-based) and what the step needs besides:
  (total, (metrics, code_hist [C, K] int32, reconstruction, new disc_state)).

  `adv_scale` multiplies the adversarial weight (the adaptive weight, else 1).
  """
  terms, out, disc_state = generator_terms(obj, graphdef, gen_params, frozen, disc, images, key)
  weights = generator_weights(obj.loss_config, step, terms)
  if "adversarial" in weights:
    weights["adversarial"] = weights["adversarial"] * adv_scale
  total, metrics = weighted_sum(terms, weights)
  for k in _STAT_KEYS:
    metrics[f"codebook/{k}"] = jnp.mean(out.stats[k].astype(jnp.float32))
  return total, (metrics, out.stats["code_hist"], out.reconstruction, disc_state)


def adaptive_weight(obj: Objective, graphdef, gen_params, frozen, disc, images: Array,
                    step: Array, key: Array) -> Array:
  """lambda = ||grad_W (L_rec + w_p L_p)|| / (||grad_W L_adv|| + 1e-4), clipped to [0, 1e4], at
  the pixel head's kernel W (taming's calculate_adaptive_weight). Gradients w.r.t. W only: XLA
  prunes the rest of both backward passes."""
  flat = dict(nnx.to_flat_state(gen_params[0]))
  head = flat[_PIXEL_HEAD]

  def head_grad(select):
    def f(w):
      params = nnx.from_flat_state({**flat, _PIXEL_HEAD: head.replace(w)})
      terms, _, _ = generator_terms(obj, graphdef, (params, gen_params[1]), frozen, disc, images,
                                    key)
      return select(terms, generator_weights(obj.loss_config, step, terms))
    return jax.grad(f)(head[...])

  rec = head_grad(lambda t, w: w["reconstruction"] * t["reconstruction"]
                  + w.get("perceptual", 0.0) * t.get("perceptual", 0.0))
  adv = head_grad(lambda t, w: t["adversarial"])
  return losses.adaptive_generator_weight(optax.tree.norm(rec), optax.tree.norm(adv))


def _perceptual_loss(obj: Objective, frozen, images: Array, reconstruction: Array,
                     key: Array) -> Array:
  """Batch mean of LPIPS(x, x_hat), with the heads' dropout as the official training runs it
  (`loss.perceptual_dropout`, 0.5 in the released recipe; `key` draws its masks)."""
  lp = nnx.merge(obj.lpips_graphdef, frozen["lpips"])
  return jnp.mean(lp(images, reconstruction, dropout_rate=obj.loss_config.perceptual_dropout,
                     dropout_key=key))


def _repa_term(obj: Objective, frozen, proj_params, images: Array, tokens: Array) -> Array:
  teacher = nnx.merge(obj.teacher_graphdef, jax.lax.stop_gradient(frozen["teacher"]))
  target = repa_lib.teacher_features(teacher, images, obj.compute_dtype)
  proj = nnx.merge(obj.proj_graphdef, proj_params)
  return repa_lib.repa_loss(target, proj(tokens.astype(obj.compute_dtype)).astype(jnp.float32))


def _discriminate(obj: Objective, frozen, disc_params, disc_state, images: Array, key: Array, *,
                  policy: str, prob: float):
  """D(DiffAugment(images)) in train mode: (logits [B, L] float32, new disc_state)."""
  k_aug, k_resize = jax.random.split(key)
  x = diff_augment(images, k_aug, policy=policy, prob=prob)
  return disc_lib.apply_discriminator(obj.disc_graphdef, frozen["dino"], disc_params, disc_state,
                                      x, k_resize, train=True)


# ------------------------------------------------------------------------------------------------
# The discriminator update.
# ------------------------------------------------------------------------------------------------


def _discriminator_objective(obj: Objective, frozen, disc_params, disc_state, lecam,
                             images: Array, reconstruction: Array, key: Array, weight: Array,
                             active: Array):
  """L_D of spec.md §5 on (x, detached x_hat). Returns (loss, (disc_state, lecam, metrics))."""
  lc = obj.loss_config
  k_real, k_fake, k_real_s, k_fake_s = jax.random.split(key, 4)
  fake = jax.lax.stop_gradient(reconstruction)
  real_logits, st = _discriminate(obj, frozen, disc_params, disc_state, images, k_real,
                                  policy=lc.disc_aug, prob=lc.disc_aug_prob)
  fake_logits, st = _discriminate(obj, frozen, disc_params, st, fake, k_fake,
                                  policy=lc.disc_aug, prob=lc.disc_aug_prob)
  ema = losses.lecam_update(lecam, real_logits, fake_logits, lc.lecam_decay)
  d = losses.discriminator_loss(real_logits, fake_logits, lc.disc_loss)
  lecam_reg = losses.lecam_regularizer(real_logits, fake_logits, ema["real"], ema["fake"])
  loss = weight * (d + lc.lecam_weight * lecam_reg)
  metrics = {"disc/loss": d, "disc/lecam": lecam_reg, "disc/logits_real": jnp.mean(real_logits),
             "disc/logits_fake": jnp.mean(fake_logits), "disc/lecam_ema_real": ema["real"],
             "disc/lecam_ema_fake": ema["fake"]}
  if lc.cr_weight > 0:
    real_s, st = _discriminate(obj, frozen, disc_params, st, images, k_real_s,
                               policy=lc.cr_aug, prob=lc.cr_aug_prob)
    fake_s, st = _discriminate(obj, frozen, disc_params, st, fake, k_fake_s,
                               policy=lc.cr_aug, prob=lc.cr_aug_prob)
    cr = losses.consistency_loss(real_logits, fake_logits, real_s, fake_s, lc.cr_weight)
    loss = loss + jnp.where(active, cr, 0.0)
    metrics["disc/consistency"] = cr
  metrics["disc/total"] = loss
  return loss, (st, ema, metrics)


def discriminator_update(obj: Objective, disc_tx: optax.GradientTransformation, state, frozen,
                         disc_state, images: Array, reconstruction: Array, step: Array,
                         key: Array) -> tuple[dict[str, Any], dict[str, Array]]:
  """One discriminator step (spec.md §5) on the detached reconstruction.

  state: the TrainState after the generator's update (its disc_params, disc_opt_state, lecam);
  disc_state: the discriminator statistics after the generator's forward pass. Returns the new
  {disc_params, disc_opt_state, disc_state, lecam} (TrainState fields) and metrics. Before
  `disc_start` its weight is 0 and nothing of the discriminator changes (parameters, optimizer,
  statistics).
  """
  lc = obj.loss_config
  active = step >= lc.disc_start
  weight = jnp.where(active, jnp.float32(lc.gan_weight), 0.0)
  grad_fn = jax.value_and_grad(_discriminator_objective, argnums=2, has_aux=True)
  (d_loss, (new_disc_state, lecam, dm)), d_grads = grad_fn(
      obj, frozen, state.disc_params, disc_state, state.lecam, images, reconstruction, key,
      weight, active)
  d_updates, d_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
  d_params = optax.apply_updates(state.disc_params, d_updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)  # noqa: E731
  dm = dict(dm)
  dm["disc/total"] = d_loss
  dm["disc/grad_norm"] = optax.tree.norm(d_grads)
  dm["disc/active"] = active.astype(jnp.float32)
  return dict(disc_params=keep(d_params, state.disc_params),
              disc_opt_state=keep(d_opt_state, state.disc_opt_state),
              disc_state=keep(new_disc_state, state.disc_state),
              lecam=keep(lecam, state.lecam)), dm
