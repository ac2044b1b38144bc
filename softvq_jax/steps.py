"""Pure training-step functions: no I/O, no Python state, everything a function of its inputs.

`make_train_step(...)` returns `train_step(state, batch) -> (state, metrics)`, which the loop jits
with explicit in/out shardings and donates the state to. One call = one optimizer step on one
global batch, optionally as `grad_accum_steps` sequential micro-batches (gradients averaged).

Metrics are device arrays (no host transfer inside the step); the loop folds them into a running
window with `accumulate_metrics` (also jitted) and reads them only when it logs. A non-finite loss
or gradient is recorded with its step number (`nonfinite`, `first_nonfinite_step`) so the loop can
stop before it saves a checkpoint of a broken state.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from softvq_jax import data, losses, optim
from softvq_jax import objective as objective_lib
from softvq_jax.train_state import TrainState, generator_trainable

Array = jax.Array

# Quantizer statistics that are averaged into the logged metrics ([C] arrays are averaged over C).
_STAT_KEYS = ("perplexity", "usage", "cos_sim", "max_prob", "mean_prob")
_NO_STEP = jnp.iinfo(jnp.int32).max
_PIXEL_HEAD = ("decoder", "to_pixel", "kernel")  # "the last layer" of the adaptive GAN weight


def make_loss_fn(graphdef, loss_config, objective=None) -> Callable:
  """(gen_params, frozen, disc, images [B, S, S, 3] float32, step, key, adv_scale) ->
  (total, (metrics, code_hist [C, K] int32, reconstruction, new disc_state)).

  gen_params = (tokenizer params, projector params or None); disc = (disc_params, disc_state) or
  None. `adv_scale` multiplies the adversarial weight (the adaptive weight, else 1).
  """

  def terms_fn(gen_params, frozen, disc, images, key):
    params, proj_params = gen_params
    model = nnx.merge(graphdef, params)
    out = model(images)
    terms = {
        "reconstruction": losses.reconstruction_loss(images, out.reconstruction,
                                                     loss_config.reconstruction),
        "entropy": out.entropy_loss,
    }
    disc_state = None
    if objective is not None:
      if objective.perceptual:
        # its own stream, so the discriminator's draws do not depend on the LPIPS dropout
        terms["perceptual"] = objective_lib.perceptual_loss(
            objective, frozen, images, out.reconstruction, jax.random.fold_in(key, 1))
      if objective.repa:
        terms["repa"] = objective_lib.repa_term(objective, frozen, proj_params, images, out.tokens)
      if objective.gan:
        logits, disc_state = objective_lib.discriminate(
            objective, frozen, disc[0], disc[1], out.reconstruction, key,
            policy=loss_config.disc_aug, prob=loss_config.disc_aug_prob)
        terms["adversarial"] = losses.generator_adversarial_loss(logits, loss_config.gen_adv_loss)
    return terms, out, disc_state

  def loss_fn(gen_params, frozen, disc, images, step, key, adv_scale):
    terms, out, disc_state = terms_fn(gen_params, frozen, disc, images, key)
    weights = losses.generator_weights(loss_config, step, terms)
    if "adversarial" in weights:
      weights["adversarial"] = weights["adversarial"] * adv_scale
    total, metrics = losses.weighted_sum(terms, weights)
    for k in _STAT_KEYS:
      metrics[f"codebook/{k}"] = jnp.mean(out.stats[k].astype(jnp.float32))
    return total, (metrics, out.stats["code_hist"], out.reconstruction, disc_state)

  loss_fn.terms_fn = terms_fn
  return loss_fn


def _adaptive_scale(loss_fn, loss_config, gen_params, frozen, disc, images, step, key) -> Array:
  """lambda = ||grad_W (L_rec + w_p L_p)|| / (||grad_W L_adv|| + 1e-4), clipped to [0, 1e4], at
  the pixel head's kernel W (taming's calculate_adaptive_weight). Gradients w.r.t. W only: XLA
  prunes the rest of both backward passes."""

  flat = dict(nnx.to_flat_state(gen_params[0]))
  head = flat[_PIXEL_HEAD]

  def head_grad(select):
    def f(w):
      params = nnx.from_flat_state({**flat, _PIXEL_HEAD: head.replace(w)})
      terms, _, _ = loss_fn.terms_fn((params, gen_params[1]), frozen, disc, images, key)
      return select(terms, losses.generator_weights(loss_config, step, terms))
    return jax.grad(f)(head[...])

  rec = head_grad(lambda t, w: w["reconstruction"] * t["reconstruction"]
                  + w.get("perceptual", 0.0) * t.get("perceptual", 0.0))
  adv = head_grad(lambda t, w: t["adversarial"])
  return losses.adaptive_generator_weight(optax.tree.norm(rec), optax.tree.norm(adv))


def _microbatches(images: Array, n: int, batch_sharding) -> Array:
  """[B, ...] -> [n, B/n, ...] where micro-batch i takes rows i, i+n, i+2n, ...

  Strided rows keep every micro-batch spread over all devices of the batch axes (contiguous
  slices would put a micro-batch on 1/n of the devices).
  """
  b = images.shape[0]
  x = images.reshape((b // n, n) + images.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  if batch_sharding is not None:
    spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
    x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
  return x


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, *,
                    loss_config, ema_decay: float, grad_accum_steps: int = 1,
                    batch_sharding=None, objective=None,
                    disc_tx: optax.GradientTransformation | None = None) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` (pure; jit it in the caller).

  batch: {"image": [B, S, S, 3] uint8 (or float32 in [-1, 1])} as global arrays.
  batch_sharding: the NamedSharding of the batch (keeps micro-batches spread over the mesh).
  objective: `objective.Objective` for the perceptual / REPA / GAN terms (None: pixel + entropy).
  With the GAN on, one call = one generator update followed by one discriminator update on the
  same batch (the reference's alternation), the discriminator seeing the detached reconstruction
  of the generator's forward pass.
  """
  loss_fn = make_loss_fn(graphdef, loss_config, objective)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  gan = objective is not None and objective.gan
  adaptive = gan and loss_config.adaptive_weight
  if gan and grad_accum_steps > 1:
    raise ValueError("gradient accumulation is not supported with the GAN term (config."
                     "loss.gan_weight > 0); see config_lib.validate")

  def train_step(state: TrainState, batch: dict[str, Array]):
    images = data.to_model_range(batch["image"])  # uint8 -> float32 [-1, 1] on the device
    step1 = state.step + 1  # the reference counts steps from 1 for its weight schedules
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_gen, k_disc = jax.random.split(key)
    gen_params = generator_trainable(state)
    disc = (state.disc_params, state.disc_state) if gan else None
    metrics = {}
    adv_scale = jnp.float32(1.0)
    if adaptive:
      adv_scale = _adaptive_scale(loss_fn, loss_config, gen_params, state.frozen, disc, images,
                                  step1, k_gen)
      metrics["loss/adaptive_weight"] = adv_scale
    if grad_accum_steps == 1:
      (loss, (m, hist, recon, disc_state)), grads = grad_fn(
          gen_params, state.frozen, disc, images, step1, k_gen, adv_scale)
    else:
      micro = _microbatches(images, grad_accum_steps, batch_sharding)

      def body(carry, xi):
        x, i = xi  # each micro-batch draws its own random numbers (LPIPS dropout masks)
        (loss, (m, h, _, _)), g = grad_fn(gen_params, state.frozen, None, x, step1,
                                          jax.random.fold_in(k_gen, i), adv_scale)
        return jax.tree.map(jnp.add, carry, (loss, m, h, g)), None

      (_, (m0, h0, _, _)), g0 = jax.eval_shape(grad_fn, gen_params, state.frozen, None, micro[0],
                                               step1, k_gen, adv_scale)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           (jax.ShapeDtypeStruct((), jnp.float32), m0, h0, g0))
      (loss, m, hist, grads), _ = jax.lax.scan(body, zeros,
                                               (micro, jnp.arange(grad_accum_steps)))
      inv = 1.0 / grad_accum_steps
      loss, m, grads = jax.tree.map(lambda x: x * inv, (loss, m, grads))
      disc_state = None
    metrics.update(m)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, gen_params)
    params, proj_params = optax.apply_updates(gen_params, updates)
    new_state = state.replace(step=step1, params=params, proj_params=proj_params,
                              opt_state=opt_state,
                              ema_params=optim.ema_update(state.ema_params, params, ema_decay))
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    if gan:
      new_state, dm = _discriminator_update(new_state, disc_state, images, recon, step1, k_disc)
      metrics.update(dm)
      bad = bad | jnp.logical_not(jnp.isfinite(dm["disc/total"]) &
                                  jnp.isfinite(dm["disc/grad_norm"]))
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = schedule(state.step)
    metrics["nonfinite"] = bad.astype(jnp.float32)
    metrics["first_nonfinite_step"] = jnp.where(bad, step1, _NO_STEP).astype(jnp.int32)
    metrics["code_hist"] = hist
    return new_state, metrics

  def _discriminator_update(state: TrainState, disc_state, images, recon, step1, key):
    """One discriminator step (spec 5) on the detached reconstruction; before `disc_start` its
    weight is 0 and nothing of the discriminator changes (parameters, optimizer, statistics)."""
    lc = loss_config
    active = step1 >= lc.disc_start
    weight = jnp.where(active, jnp.float32(lc.gan_weight), 0.0)
    d_grad_fn = jax.value_and_grad(objective_lib.discriminator_loss, argnums=2, has_aux=True)
    (d_loss, (new_disc_state, lecam, dm)), d_grads = d_grad_fn(
        objective, state.frozen, state.disc_params, disc_state, state.lecam, images, recon, key,
        weight, active)
    d_updates, d_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    d_params = optax.apply_updates(state.disc_params, d_updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)  # noqa: E731
    dm = dict(dm)
    dm["disc/total"] = d_loss
    dm["disc/grad_norm"] = optax.tree.norm(d_grads)
    dm["disc/active"] = active.astype(jnp.float32)
    return state.replace(
        disc_params=keep(d_params, state.disc_params),
        disc_opt_state=keep(d_opt_state, state.disc_opt_state),
        disc_state=keep(new_disc_state, state.disc_state),
        lecam=keep(lecam, state.lecam)), dm

  return train_step


def init_accumulator(metrics_shape: dict[str, Any]) -> dict[str, Array]:
  """Zeros shaped like one step's metrics (+ a step counter) for `accumulate_metrics`."""
  acc = {k: jnp.zeros(v.shape, v.dtype) for k, v in metrics_shape.items()}
  acc["first_nonfinite_step"] = jnp.full((), _NO_STEP, jnp.int32)
  acc["steps"] = jnp.zeros((), jnp.int32)
  return acc


def accumulate_metrics(acc: dict[str, Array], metrics: dict[str, Array]) -> dict[str, Array]:
  """Running sums over a logging window (the first non-finite step is a running minimum)."""
  out = {k: acc[k] + metrics[k] for k in metrics if k != "first_nonfinite_step"}
  out["first_nonfinite_step"] = jnp.minimum(acc["first_nonfinite_step"],
                                            metrics["first_nonfinite_step"])
  out["steps"] = acc["steps"] + 1
  return out


def summarize_window(acc: dict[str, Any]) -> dict[str, float]:
  """Host-side: window means of the scalars, and codebook usage over the whole window.

  `codebook/usage_window`: fraction of codes that were some token's argmax at least once during
  the window (mean over codebooks) — the usage statistic the reference meant to report.
  """
  n = max(int(acc["steps"]), 1)
  out = {}
  for k, v in acc.items():
    if k in ("steps", "first_nonfinite_step", "code_hist", "nonfinite"):
      continue
    out[k] = float(v) / n
  out["codebook/usage_window"] = float(np.mean(np.asarray(acc["code_hist"]) > 0))
  return out


def nonfinite_step(acc: dict[str, Any]) -> int | None:
  """The first step in the window whose loss or gradient norm was NaN/Inf, else None."""
  s = int(acc["first_nonfinite_step"])
  return None if s == int(_NO_STEP) else s
