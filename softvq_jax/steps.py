"""The train step: gradients, optimizer, EMA. No I/O, no Python state.

`make_train_step(...)` returns `train_step(state, frozen, batch) -> (state, metrics)`, which the
loop jits with explicit in/out shardings, donating `state` (the TrainState: exactly what is
checkpointed) and not `frozen` (the objective's pretrained networks, softvq_jax/objective.py).
One call = one optimizer step on one global batch, optionally as `grad_accum_steps` sequential
micro-batches (gradients averaged). What the loss is lives in softvq_jax/objective.py.

The generator's (SiT / DiT) step, `make_generator_train_step`, shares the optimizer update and the
per-step bookkeeping (`_apply_gradients`, `_step_metrics`, `_microbatches`) over the loss of
softvq_jax/generator_objective.py; its metric window weights each time bucket's loss by the
bucket's share of the batch (`accumulate_generator_metrics`, `summarize_generator_window`).

Metrics are device arrays (no host transfer inside the step); the loop folds them into a running
window with `accumulate_metrics` (also jitted) and reads them only when it logs. A non-finite loss
or gradient is recorded with its step number (`nonfinite`, `first_nonfinite_step`) so the loop can
stop before it saves a checkpoint of a broken state.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softvq_jax import optim, pixels
from softvq_jax import objective as objective_lib
from softvq_jax.train_state import TrainState

Array = jax.Array

_NO_STEP = jnp.iinfo(jnp.int32).max


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


def _summed_over_microbatches(fn: Callable, micro, n: int):
  """sum over i of fn(micro_i, i) for n sequential micro-batches (a lax.scan: one micro-batch's
  activations live at a time). micro: a pytree of [n, B/n, ...] arrays (`_microbatches`);
  fn returns a pytree of arrays. Used by both train steps' gradient accumulation."""

  def body(carry, xi):
    return jax.tree.map(jnp.add, carry, fn(*xi)), None

  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), jnp.int32(0))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
  return total


def _accumulated_grads(grad_fn, gen_params, frozen, images, n, batch_sharding, step1, key,
                       adv_scale):
  """grad_fn's (loss, metrics, code_hist, grads) averaged (summed for the histogram) over n
  sequential micro-batches, each drawing its own random numbers (LPIPS dropout masks)."""

  def one(x, i):
    (loss, (m, h, _, _)), g = grad_fn(gen_params, frozen, None, x, step1,
                                      jax.random.fold_in(key, i), adv_scale)
    return loss, m, h, g

  loss, m, hist, grads = _summed_over_microbatches(
      one, _microbatches(images, n, batch_sharding), n)
  inv = 1.0 / n
  loss, m, grads = jax.tree.map(lambda x: x * inv, (loss, m, grads))
  return loss, m, hist, grads


def _apply_gradients(tx: optax.GradientTransformation, grads, opt_state, params):
  """One optimizer update: (new params, new optimizer state, global gradient norm). Shared by
  the tokenizer's and the generator's steps."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, grad_norm


def _step_metrics(grad_norm, lr, bad, step1) -> dict[str, Array]:
  """The per-step bookkeeping both steps log: gradient norm, learning rate, non-finite flags."""
  return {"grad_norm": grad_norm, "lr": lr, "nonfinite": bad.astype(jnp.float32),
          "first_nonfinite_step": jnp.where(bad, step1, _NO_STEP).astype(jnp.int32)}


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, *,
                    objective: objective_lib.Objective, ema_decay: float,
                    grad_accum_steps: int = 1, batch_sharding=None,
                    disc_tx: optax.GradientTransformation | None = None) -> Callable:
  """Builds `train_step(state, frozen, batch) -> (state, metrics)` (pure; jit it in the caller).

  frozen: `objective.load_frozen`'s networks (None without them).
  batch: {"image": [B, S, S, 3] uint8 (or float32 in [-1, 1])} as global arrays.
  batch_sharding: the NamedSharding of the batch (keeps micro-batches spread over the mesh).
  objective: `objective.build_objective(config)`. With the GAN on, one call = one generator update
  followed by one discriminator update on the same batch (the reference's alternation), the
  discriminator seeing the detached reconstruction of the generator's forward pass.
  """
  obj = objective
  loss_fn = functools.partial(objective_lib.generator_loss, obj, graphdef)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if obj.gan and grad_accum_steps > 1:
    raise ValueError("gradient accumulation is not supported with the GAN term (config."
                     "loss.gan_weight > 0); see config_lib.validate")

  def train_step(state: TrainState, frozen, batch: dict[str, Array]):
    images = pixels.to_model_range(batch["image"])  # uint8 -> float32 [-1, 1] on the device
    step1 = state.step + 1  # the reference counts steps from 1 for its weight schedules
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_gen, k_disc = jax.random.split(key)
    gen_params = (state.params, state.proj_params)
    disc = (state.disc_params, state.disc_state) if obj.gan else None
    metrics = {}

    # 1. The generator's gradients (the adaptive GAN weight first, if on).
    adv_scale = jnp.float32(1.0)
    if obj.gan and obj.loss_config.adaptive_weight:
      adv_scale = objective_lib.adaptive_weight(obj, graphdef, gen_params, frozen, disc, images,
                                                step1, k_gen)
      metrics["loss/adaptive_weight"] = adv_scale
    if grad_accum_steps == 1:
      (loss, (m, hist, recon, disc_state)), grads = grad_fn(gen_params, frozen, disc, images,
                                                            step1, k_gen, adv_scale)
    else:
      loss, m, hist, grads = _accumulated_grads(grad_fn, gen_params, frozen, images,
                                                grad_accum_steps, batch_sharding, step1, k_gen,
                                                adv_scale)
      recon = disc_state = None
    metrics.update(m)

    # 2. The generator's optimizer step and the EMA of its parameters.
    (params, proj_params), opt_state, grad_norm = _apply_gradients(tx, grads, state.opt_state,
                                                                   gen_params)
    new_state = state.replace(step=step1, params=params, proj_params=proj_params,
                              opt_state=opt_state,
                              ema_params=optim.ema_update(state.ema_params, params, ema_decay))
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))

    # 3. The discriminator's step, on the detached reconstruction.
    if obj.gan:
      disc_fields, dm = objective_lib.discriminator_update(obj, disc_tx, new_state, frozen,
                                                           disc_state, images, recon, step1,
                                                           k_disc)
      new_state = new_state.replace(**disc_fields)
      metrics.update(dm)
      bad = bad | jnp.logical_not(jnp.isfinite(dm["disc/total"]) &
                                  jnp.isfinite(dm["disc/grad_norm"]))
    metrics.update(_step_metrics(grad_norm, schedule(state.step), bad, step1))
    metrics["code_hist"] = hist
    return new_state, metrics

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
  if "code_hist" in acc:
    out["codebook/usage_window"] = float(np.mean(np.asarray(acc["code_hist"]) > 0))
  return out


def nonfinite_step(acc: dict[str, Any]) -> int | None:
  """The first step in the window whose loss or gradient norm was NaN/Inf, else None."""
  s = int(acc["first_nonfinite_step"])
  return None if s == int(_NO_STEP) else s


# ------------------------------------------------------------------------------------------------
# The generator's (SiT / DiT) train step: the same gradients -> optimizer -> EMA -> non-finite
# flags, over softvq_jax/generator_objective.py's loss.
# ------------------------------------------------------------------------------------------------


def make_generator_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                              schedule: Callable, *, ema_decay: float, grad_accum_steps: int = 1,
                              batch_sharding=None) -> Callable:
  """`train_step(state, frozen, batch) -> (state, metrics)` of a generator (pure; jit it).

  loss_fn: `generator_objective.make_loss_fn(objective, graphdef[, encode=...])`:
  (params, frozen, batch, key) -> (loss, metrics). state: train_state.GeneratorTrainState.
  frozen: {"fixed": the network's pos_embed, "tokenizer": the tokenizer's params or None}.
  batch: {"latents": [B, N, e], "label": [B]} (data path a) or {"image": [B, S, S, 3],
  "label": [B]} (path b), global arrays.

  The step key is fold_in(state.rng, step) as the tokenizer's; with grad_accum_steps = n the
  batch is split into n strided micro-batches (`_microbatches`), micro-batch i drawing from
  fold_in(key, i), their losses, metrics and gradients averaged.

  Metrics: "loss/total" and every metric of loss_fn under "loss/" (per time bucket: the masked
  mean "loss/t<lo>-<hi>" and the fraction of the batch "frac/t<lo>-<hi>" in it; the window
  weights the first by the second: `summarize_generator_window`), grad_norm, lr, the non-finite
  flags.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, frozen, batch: dict[str, Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    step1 = state.step + 1
    if grad_accum_steps == 1:
      (loss, m), grads = grad_fn(state.params, frozen, batch, key)
    else:
      n = grad_accum_steps

      def one(b, i):
        (l, mi), g = grad_fn(state.params, frozen, b, jax.random.fold_in(key, i))
        return l, mi, g

      micro = {k: _microbatches(v, n, batch_sharding) for k, v in batch.items()}
      loss, m, grads = _summed_over_microbatches(one, micro, n)
      loss, m, grads = jax.tree.map(lambda x: x / n, (loss, m, grads))
    params, opt_state, grad_norm = _apply_gradients(tx, grads, state.opt_state, state.params)
    new_state = state.replace(step=step1, params=params, opt_state=opt_state,
                              ema_params=optim.ema_update(state.ema_params, params, ema_decay))
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    metrics = {"loss/total": loss}
    for k, v in m.items():
      if k == "loss":
        continue
      if k.startswith("frac_"):
        metrics["frac/" + k[len("frac_"):]] = v
      elif k.startswith("loss_"):
        metrics["loss/" + k[len("loss_"):]] = v
      else:
        metrics["loss/" + k] = v
    metrics.update(_step_metrics(grad_norm, schedule(state.step), bad, step1))
    return new_state, metrics

  return train_step


def accumulate_generator_metrics(acc: dict[str, Array],
                                 metrics: dict[str, Array]) -> dict[str, Array]:
  """`accumulate_metrics`, with each time bucket's loss summed weighted by its batch fraction
  (so the window's bucket mean is exact whatever the buckets' occupancy per step)."""
  weighted = dict(metrics)
  for k, v in metrics.items():
    if k.startswith("frac/"):
      name = "loss/" + k[len("frac/"):]
      weighted[name] = metrics[name] * v
  return accumulate_metrics(acc, weighted)


def summarize_generator_window(acc: dict[str, Any]) -> dict[str, float]:
  """Window means; a time bucket's loss = sum(loss_b * frac_b) / sum(frac_b) over the window's
  steps (the mean over the window's examples whose t fell in it; 0 when none did)."""
  out = summarize_window(acc)
  for k in list(out):
    if k.startswith("frac/"):
      name = "loss/" + k[len("frac/"):]
      frac_sum = float(acc[k])
      out[name] = float(acc[name]) / frac_sum if frac_sum > 0 else 0.0
  return out
