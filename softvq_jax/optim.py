"""Optimizers for the tokenizer: the reference's learning-rate schedule, AdamW/Adam, clipping.

Why a hand-written schedule: the reference uses timm's `create_scheduler_v2(sched="cosine")`
stepped per update, whose cosine is measured from step 0 (not from the end of the warm-up) and
whose warm-up starts at an absolute 1e-5 (spec.md §5). optax's `warmup_cosine_decay_schedule` does
neither, so matching it needs these few lines. `schedule(t)` is the learning rate of the update
made after `t` completed steps — the value timm's scheduler holds when step t+1 runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def peak_lr(optim_config, batch_size: int) -> float:
  """The reference's linear scaling: lr x global_batch / 256 (when lr_batch_scaling)."""
  scale = batch_size / 256.0 if optim_config.lr_batch_scaling else 1.0
  return float(optim_config.lr) * scale


def learning_rate_schedule(*, lr: float, total_steps: int, warmup_steps: int,
                           warmup_init_lr: float = 1e-5, min_lr_ratio: float = 0.1):
  """timm cosine with warm-up, per step (spec.md §5). Returns t -> lr(t), jit-able."""
  min_lr = lr * min_lr_ratio

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    warm = warmup_init_lr + t * (lr - warmup_init_lr) / max(warmup_steps, 1)
    cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
    return jnp.where(t < warmup_steps, warm, cos)

  return schedule


def decay_mask(params):
  """Weight decay only on parameters with >= 2 dims (kernels, embeddings, tokens, codebook)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(optim_config, *, batch_size: int, total_steps: int):
  """(optax transformation, schedule) for the generator (and later the discriminator).

  Order: global-norm clip of the raw gradient -> Adam(W) with the schedule. AdamW's decay is
  decoupled (p -= lr * wd * p), as torch.optim.AdamW.
  """
  schedule = learning_rate_schedule(
      lr=peak_lr(optim_config, batch_size), total_steps=total_steps,
      warmup_steps=optim_config.warmup_steps, warmup_init_lr=optim_config.warmup_init_lr,
      min_lr_ratio=optim_config.min_lr_ratio)
  common = dict(learning_rate=schedule, b1=optim_config.b1, b2=optim_config.b2,
                eps=optim_config.eps)
  if optim_config.name == "adamw":
    opt = optax.adamw(weight_decay=optim_config.weight_decay, mask=decay_mask, **common)
  elif optim_config.name == "adam":
    opt = optax.adam(**common)
  else:
    raise ValueError(f"config.optim.name={optim_config.name!r} is not 'adamw' or 'adam'")
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(opt)
  return optax.chain(*parts), schedule


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (float32)."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)
