"""Pure loss functions and the weighted-sum objective (spec 5).

The generator objective is a sum of named terms, each with a weight that may depend on the step
(the reference warms the perceptual weight up over 10k steps and switches the GAN term on at step
20k). `generator_weights(loss_config, step)` is the single place that says which term has which
weight at which step; the train step multiplies and sums, and logs every term unweighted and
weighted. All losses are float32 whatever the compute dtype.
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


def generator_weights(loss_config, step: Array) -> dict[str, Array]:
  """Weight of every generator term at `step` (1-based, as the reference counts).

  Terms present now: the pixel reconstruction loss and the SoftVQ entropy loss (constant weights).
  """
  del step  # the constant terms do not depend on it; scheduled terms will
  return {
      "reconstruction": jnp.float32(loss_config.reconstruction_weight),
      "entropy": jnp.float32(loss_config.entropy_weight),
  }


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
