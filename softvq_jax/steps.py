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
from softvq_jax.train_state import TrainState

Array = jax.Array

# Quantizer statistics that are averaged into the logged metrics ([C] arrays are averaged over C).
_STAT_KEYS = ("perplexity", "usage", "cos_sim", "max_prob", "mean_prob")
_NO_STEP = jnp.iinfo(jnp.int32).max


def make_loss_fn(graphdef, loss_config) -> Callable:
  """(params, images [B, S, S, 3] float32, step) -> (total, (metrics, code_hist [C, K] int32))."""

  def loss_fn(params, images, step):
    model = nnx.merge(graphdef, params)
    out = model(images)
    terms = {
        "reconstruction": losses.reconstruction_loss(images, out.reconstruction,
                                                     loss_config.reconstruction),
        "entropy": out.entropy_loss,
    }
    total, metrics = losses.weighted_sum(terms, losses.generator_weights(loss_config, step))
    for k in _STAT_KEYS:
      metrics[f"codebook/{k}"] = jnp.mean(out.stats[k].astype(jnp.float32))
    return total, (metrics, out.stats["code_hist"])

  return loss_fn


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
                    batch_sharding=None) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` (pure; jit it in the caller).

  batch: {"image": [B, S, S, 3] uint8 (or float32 in [-1, 1])} as global arrays.
  batch_sharding: the NamedSharding of the batch (keeps micro-batches spread over the mesh).
  """
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, loss_config), has_aux=True)

  def train_step(state: TrainState, batch: dict[str, Array]):
    images = data.to_model_range(batch["image"])  # uint8 -> float32 [-1, 1] on the device
    step1 = state.step + 1  # the reference counts steps from 1 for its weight schedules
    if grad_accum_steps == 1:
      (loss, (metrics, hist)), grads = grad_fn(state.params, images, step1)
    else:
      micro = _microbatches(images, grad_accum_steps, batch_sharding)

      def body(carry, x):
        (loss, (m, h)), g = grad_fn(state.params, x, step1)
        return jax.tree.map(jnp.add, carry, (loss, m, h, g)), None

      (_, (m0, h0)), g0 = jax.eval_shape(grad_fn, state.params, micro[0], step1)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           (jax.ShapeDtypeStruct((), jnp.float32), m0, h0, g0))
      (loss, metrics, hist, grads), _ = jax.lax.scan(body, zeros, micro)
      inv = 1.0 / grad_accum_steps
      loss, metrics, grads = jax.tree.map(lambda x: x * inv, (loss, metrics, grads))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=step1, params=params, opt_state=opt_state,
                              ema_params=optim.ema_update(state.ema_params, params, ema_decay))
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = schedule(state.step)
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    metrics["nonfinite"] = bad.astype(jnp.float32)
    metrics["first_nonfinite_step"] = jnp.where(bad, step1, _NO_STEP).astype(jnp.int32)
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
  out["codebook/usage_window"] = float(np.mean(np.asarray(acc["code_hist"]) > 0))
  return out


def nonfinite_step(acc: dict[str, Any]) -> int | None:
  """The first step in the window whose loss or gradient norm was NaN/Inf, else None."""
  s = int(acc["first_nonfinite_step"])
  return None if s == int(_NO_STEP) else s
