"""The formulas of the loss terms (spec.md §5): pure functions of arrays, float32 whatever the
compute dtype.

Which terms make the objective, with which weight at which step, and the discriminator's update
are softvq_jax/objective.py; this file only says how each term is computed from its inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def reconstruction_loss(images: Array, reconstruction: Array, kind: str = "l2") -> Array:
  """Mean over all pixels and channels of (x - x_hat)^2 ("l2") or |x - x_hat| ("l1")."""
  diff = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
  if kind == "l2":
    return jnp.mean(jnp.square(diff))
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  raise ValueError(f"unknown reconstruction loss {kind!r}; use 'l2' or 'l1'")


# --------------------------------------------------------------------------------------------
# GAN terms (spec.md §5). Logits are the discriminator's [B, 980] outputs; every loss takes the mean
# over all of them, in float32.
# --------------------------------------------------------------------------------------------

def hinge_d_loss(real: Array, fake: Array) -> Array:
  """0.5 * (mean relu(1 - real) + mean relu(1 + fake)): the released discriminator loss."""
  real, fake = real.astype(jnp.float32), fake.astype(jnp.float32)
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(real: Array, fake: Array) -> Array:
  """0.5 * (mean softplus(-real) + mean softplus(fake)) (taming-transformers' 'vanilla')."""
  real, fake = real.astype(jnp.float32), fake.astype(jnp.float32)
  return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def discriminator_loss(real: Array, fake: Array, kind: str = "hinge") -> Array:
  """The reference's discriminator-loss options: 'hinge' (released), 'vanilla', 'non-saturating'.

  'non-saturating' is the binary cross-entropy of real -> 1 and fake -> 0, which equals
  'vanilla'. (The reference's own `non_saturating_d_loss` passes the arguments of
  `F.binary_cross_entropy_with_logits` the other way round, targets as logits; that is a
  different, linear-in-the-logits function which we do not reproduce. It is not used by the
  released configs.)
  """
  if kind == "hinge":
    return hinge_d_loss(real, fake)
  if kind in ("vanilla", "non-saturating", "non_saturating"):
    return vanilla_d_loss(real, fake)
  raise ValueError(f"unknown discriminator loss {kind!r}; use 'hinge', 'vanilla' or "
                   "'non-saturating'")


def generator_adversarial_loss(fake: Array, kind: str = "hinge") -> Array:
  """Generator's GAN term: 'hinge' = -mean(fake) (released), 'non-saturating' =
  mean softplus(-fake).

  (As for the discriminator, the reference's non-saturating generator loss has swapped BCE
  arguments; we implement the standard form.)
  """
  fake = fake.astype(jnp.float32)
  if kind == "hinge":
    return -jnp.mean(fake)
  if kind in ("non-saturating", "non_saturating", "vanilla"):
    return jnp.mean(jax.nn.softplus(-fake))
  raise ValueError(f"unknown generator adversarial loss {kind!r}; use 'hinge' or 'non-saturating'")


def lecam_init() -> dict[str, Array]:
  """LeCam EMA statistics {'real', 'fake'} (float32 scalars, initialised to 0 as the reference)."""
  return {"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)}


def lecam_update(ema: dict[str, Array], real: Array, fake: Array,
                 decay: float = 0.999) -> dict[str, Array]:
  """ema <- decay * ema + (1 - decay) * batch-mean logits, for real and fake (no gradient).

  The reference updates the EMAs *before* computing the regulariser with them. Its mean is over
  each GPU's local batch (so its EMAs differ slightly per GPU); ours is over the global batch,
  identical on every device.
  """
  real = jax.lax.stop_gradient(jnp.mean(real.astype(jnp.float32)))
  fake = jax.lax.stop_gradient(jnp.mean(fake.astype(jnp.float32)))
  return {"real": ema["real"] * decay + real * (1.0 - decay),
          "fake": ema["fake"] * decay + fake * (1.0 - decay)}


def lecam_regularizer(real: Array, fake: Array, ema_real: Array, ema_fake: Array) -> Array:
  """mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2) (Tseng et al. 2021)."""
  real, fake = real.astype(jnp.float32), fake.astype(jnp.float32)
  ema_real = jax.lax.stop_gradient(jnp.asarray(ema_real, jnp.float32))
  ema_fake = jax.lax.stop_gradient(jnp.asarray(ema_fake, jnp.float32))
  return (jnp.mean(jnp.square(jax.nn.relu(real - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake))))


def consistency_loss(real: Array, fake: Array, real_strong: Array, fake_strong: Array,
                     weight: float | Array = 1.0) -> Array:
  """weight * mean((cat[real, fake] - cat[real_strong, fake_strong])^2) (the reference's CR term).

  real/fake: logits of the usual augmentation; *_strong: logits of the strong augmentation
  ('color,translation,cutout_0.5', probability 1). The reference uses weight 4.0 from step 20k.
  Gradients flow into both sides (both are discriminator outputs).
  """
  a = jnp.concatenate([real.astype(jnp.float32), fake.astype(jnp.float32)], axis=0)
  b = jnp.concatenate([real_strong.astype(jnp.float32), fake_strong.astype(jnp.float32)], axis=0)
  if a.shape != b.shape:
    raise ValueError(f"consistency_loss: logits {a.shape} and strong logits {b.shape} differ")
  return jnp.asarray(weight, jnp.float32) * jnp.mean(jnp.square(a - b))


def adaptive_generator_weight(rec_grad_norm: Array, adv_grad_norm: Array, *,
                              max_weight: float = 1e4, eps: float = 1e-4) -> Array:
  """clip(|grad_last L_rec| / (|grad_last L_adv| + eps), 0, max_weight), without gradient.

  The norms are of the gradients w.r.t. the last layer (the pixel head's weight) of the
  reconstruction(+perceptual) loss and of the generator's adversarial loss (taming's
  `calculate_adaptive_weight`; off in the released recipe, where the weight is 1).
  """
  w = jnp.asarray(rec_grad_norm, jnp.float32) / (jnp.asarray(adv_grad_norm, jnp.float32) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
