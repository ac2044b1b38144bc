"""The generator's training objective (spec.md §8.2, 8.4): pure, jittable loss functions for SiT / DiT.

What the trainer calls (one function for both data paths and both generator kinds)::

  objective = GeneratorObjective.for_network(sit_cfg, path="linear", time_sampling="lognormal")
  graphdef, params, fixed = split_generator(model)        # params: nnx.Param; fixed: pos_embed
  loss_fn = make_loss_fn(objective, graphdef)   # image batches: encode=fns.encode (path b)
  frozen = {"fixed": fixed, "tokenizer": None}             # or the tokenizer's params (path b)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, key)

  params:  nnx.State of the network's nnx.Param variables (what the optimizer and the EMA see).
  frozen:  {"fixed": the network's non-parameter state (the fixed sin-cos `pos_embed`, a
            `sit.FixedPosEmbed` variable: stored, never trained), "tokenizer": the frozen
            tokenizer's parameters or None}. Nothing in it gets a gradient (it is not an argument
            of the differentiation). `fixed` is a pure function of the network config (or what an
            imported checkpoint stored), so a resumed run may rebuild it rather than checkpoint it.
            The EMA covers params only; a network to sample from / export is
            `nnx.merge(graphdef, ema_params, fixed)` (e.g. `Generator(cfg, that).save(dir)`).
            Shard `fixed` like the parameters (`sharding.state_shardings`: its logical axes are
            (None, None, "embed")) or replicate it: both are tested.
  batch:   {"latents": [B, N, e] float32, already normalised ((z_q - vq_mean) / vq_std; data path
            (a), `token_data.TokenSource`), "label": [B] int} or {"image": [B, S, S, 3] uint8 or
            float in [-1, 1], "label": [B] int} (data path (b): the frozen tokenizer encodes with
            normalize=True inside the step, under stop_gradient).
  key:     one PRNG key for the step (e.g. fold_in(state.rng, step)); `draw_training_inputs` says
            how it is split (t, noise, label dropout).
  returns: loss (float32 scalar: batch mean of the per-example loss) and metrics (float32
           scalars): "loss", per time bucket "loss_t<lo>-<hi>" (masked mean over the examples whose
           t falls in [lo, hi); 0 when none does) and "frac_t<lo>-<hi>" (the fraction of the batch
           in it: the weight to average a bucket over steps exactly); DiT adds "mse" and "vb".

SiT (flow matching, v-prediction): t from `sampling.sample_train_time` (uniform, or lognormal as
the published command), x_t = alpha_t x + sigma_t eps and v = alpha'_t x + sigma'_t eps from
`sampling.interpolant` (the single definition of the paths, shared with the samplers), per-example
loss = mean over tokens and channels of (model(x_t, t, y) - v)^2.

DiT (Gaussian diffusion with learned variance, DiT's `training_losses` with LossType.MSE and the
learned-range sigma): integer t uniform in [0, T), x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,
loss = mean (eps - eps_hat)^2 + vb, where vb is the variational-bound term of the variance output
with the mean's prediction held fixed (stop_gradient on eps_hat): KL(q(x_{t-1} | x_t, x_0) ||
p(x_{t-1} | x_t)) in bits per dimension, and at t = 0 the discretised-Gaussian decoder NLL. The
schedule constants (`sampling.diffusion_schedule`) and the learned-range variance
(`sampling.p_mean_variance`) are the samplers' own.

Label dropout (class -> null class 1000 with probability class_dropout_prob, 0.1) lives in the
network (`LabelEmbedder`, called with train=True and the step's dropout key), as in the reference;
the objective does not drop labels itself, so it happens exactly once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import sampling
from softvq_jax.models import sit as sit_lib

KINDS = ("sit", "dit")
TIME_SAMPLINGS = ("uniform", "lognormal")

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GeneratorObjective:
  """Static description of the loss (hashable: it is closed over by the jitted step).

  kind: "sit" (flow matching) or "dit" (Gaussian diffusion). path / time_sampling: SiT's
  interpolant and time distribution (spec.md §8.2). noise_schedule / diffusion_steps / learn_sigma:
  DiT's diffusion (spec.md §8.4; the published DiT command uses the cosine beta schedule).
  num_time_buckets: how many equal bins of t in [0, 1] (DiT: timestep / T) the loss is logged in.
  """
  kind: str = "sit"
  path: str = "linear"
  time_sampling: str = "uniform"
  noise_schedule: str = "linear"
  diffusion_steps: int = 1000
  learn_sigma: bool = True
  num_time_buckets: int = 4

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"generator objective kind={self.kind!r} is not one of {KINDS}")
    if self.path not in sampling.PATHS:
      raise ValueError(f"generator objective path={self.path!r} is not one of {sampling.PATHS}")
    if self.time_sampling not in TIME_SAMPLINGS:
      raise ValueError(f"generator objective time_sampling={self.time_sampling!r} is not one of "
                       f"{TIME_SAMPLINGS}")
    if self.noise_schedule not in sampling.BETA_SCHEDULES:
      raise ValueError(f"generator objective noise_schedule={self.noise_schedule!r} is not one "
                       f"of {sampling.BETA_SCHEDULES}")
    if self.diffusion_steps < 1:
      raise ValueError(f"diffusion_steps={self.diffusion_steps} must be positive")
    if self.num_time_buckets < 1:
      raise ValueError(f"num_time_buckets={self.num_time_buckets} must be positive")

  @classmethod
  def for_network(cls, cfg: sit_lib.SiTConfig, **kw) -> "GeneratorObjective":
    """The objective of a network: kind and learn_sigma from its config, the rest from `kw`."""
    kw.setdefault("kind", cfg.kind)
    kw.setdefault("learn_sigma", cfg.learn_sigma)
    obj = cls(**kw)
    if obj.kind != cfg.kind:
      raise ValueError(f"objective kind={obj.kind!r} does not match the network's "
                       f"kind={cfg.kind!r}")
    if obj.learn_sigma != cfg.learn_sigma:
      raise ValueError(f"objective learn_sigma={obj.learn_sigma} does not match the network's "
                       f"learn_sigma={cfg.learn_sigma}")
    return obj

  def bucket_edges(self) -> np.ndarray:
    """[num_time_buckets + 1] float64 edges in [0, 1]."""
    return np.linspace(0.0, 1.0, self.num_time_buckets + 1)

  def bucket_names(self) -> list[str]:
    e = self.bucket_edges()
    return [f"t{e[i]:.2f}-{e[i + 1]:.2f}" for i in range(self.num_time_buckets)]


# ------------------------------------------------------------------------------------------------
# The network as (graphdef, params, fixed).
# ------------------------------------------------------------------------------------------------


def split_generator(model: sit_lib.SiT):
  """(graphdef, params, fixed): `nnx.split(model, nnx.Param, sit.FixedPosEmbed)`.

  The SiT's `pos_embed` is a stored, never-trained `FixedPosEmbed` variable, so the tokenizer's
  `train_state.split_model` (parameters only) does not apply: params go to the optimizer / EMA,
  `fixed` travels beside them as a frozen argument (`frozen["fixed"]` of `make_loss_fn`). Any
  other kind of state would be silently untrained: refused.
  """
  graphdef, params, fixed, rest = nnx.split(model, nnx.Param, sit_lib.FixedPosEmbed, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the generator network has state that is neither a parameter nor the fixed "
                     f"position table: {jax.tree.map(jnp.shape, rest)}")
  return graphdef, params, fixed


def apply_generator(graphdef, params, fixed, x, t, y, *, train: bool = False, dropout_key=None):
  """The network output from split state (inside jit). train=True applies label dropout."""
  model = nnx.merge(graphdef, params, fixed)
  return model(x, t, y, train=train, dropout_key=dropout_key)


# ------------------------------------------------------------------------------------------------
# Randomness of one step.
# ------------------------------------------------------------------------------------------------


class TrainingDraw(NamedTuple):
  """The random inputs of one loss evaluation."""
  t: Array            # [B] float32 in [0, 1] (SiT) or int32 in [0, T) (DiT)
  noise: Array        # like the latents, float32 N(0, I)
  dropout_key: Array  # the label-dropout key the network gets


def draw_training_inputs(objective: GeneratorObjective, key, shape) -> TrainingDraw:
  """t, eps and the label-dropout key from one step key: split(key, 3) in that order.

  shape: the latents' [B, ...]. SiT: t by `sampling.sample_train_time(kind=time_sampling,
  path=path)`; DiT: randint(0, diffusion_steps) (uniform integer timesteps, DiT's sampler).
  """
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  batch = shape[0]
  if objective.kind == "sit":
    t = sampling.sample_train_time(k_t, (batch,), kind=objective.time_sampling,
                                   path=objective.path)
  else:
    t = jax.random.randint(k_t, (batch,), 0, objective.diffusion_steps, jnp.int32)
  noise = jax.random.normal(k_noise, shape, jnp.float32)
  return TrainingDraw(t, noise, k_drop)


# ------------------------------------------------------------------------------------------------
# Per-example losses.
# ------------------------------------------------------------------------------------------------


def mean_flat(x: Array) -> Array:
  """[B, ...] -> [B]: mean over every axis but the batch (tokens and channels)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def flow_matching_losses(model_fn, latents: Array, labels: Array, draw: TrainingDraw,
                         path: str) -> Array:
  """[B] per-example v-prediction loss mean((model(x_t, t, y) - v)^2) (spec.md §8.2).

  model_fn(x_t, t, y) -> the velocity (x's shape; a learn_sigma network's first half of the
  channels).
  """
  x_t, target = sampling.interpolant(latents, draw.noise, draw.t, path)
  out = model_fn(x_t, draw.t, labels).astype(jnp.float32)
  v = sampling._velocity(out, x_t)  # pylint: disable=protected-access  # the samplers' own split
  return mean_flat(jnp.square(v - target))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of Phi(x) the diffusion reference uses (not erf: same numbers)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) in nats of a Gaussian discretised to 256 bins over [-1, 1] (bin half-width 1/255),
  the edge bins open-ended (x < -0.999 / x > 0.999); probabilities floored at 1e-12."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min,
                                                       log_delta))


def _diffusion_schedule(objective: GeneratorObjective) -> sampling.DiffusionSchedule:
  return sampling.diffusion_schedule(None, noise_schedule=objective.noise_schedule,
                                     diffusion_steps=objective.diffusion_steps)


def _table(a: np.ndarray, t: Array, x: Array) -> Array:
  """a[t] as float32, shaped [B, 1, ..., 1] against x (float64 host table -> float32)."""
  values = jnp.asarray(np.asarray(a, np.float64).astype(np.float32))[t]
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def q_sample(schedule: sampling.DiffusionSchedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (t [B] int)."""
  return (_table(np.sqrt(schedule.alphas_cumprod), t, x0) * x0
          + _table(np.sqrt(1.0 - schedule.alphas_cumprod), t, x0) * noise)


def vb_terms_bits(schedule: sampling.DiffusionSchedule, model_out: Array, x0: Array, x_t: Array,
                  t: Array) -> Array:
  """[B] the variational-bound term in bits per dimension at integer timesteps t [B].

  t > 0: mean over dims of KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2; t = 0: the
  decoder NLL -log P(x_0 | x_1) / ln 2. p's mean and learned-range log variance come from
  `sampling.p_mean_variance` (model_out [B, ..., 2C]: eps then the variance interpolation).
  """
  true_mean = (_table(schedule.posterior_mean_coef1, t, x0) * x0
               + _table(schedule.posterior_mean_coef2, t, x0) * x_t)
  true_log_var = _table(schedule.posterior_log_variance_clipped, t, x0)

  def one(out, x, k):
    mean, log_var, _ = sampling.p_mean_variance(schedule, out[None], x[None], k, learn_sigma=True)
    return mean[0], log_var[0]

  mean, log_var = jax.vmap(one)(model_out, x_t, t)
  kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
  nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def diffusion_losses(model_fn, latents: Array, labels: Array, draw: TrainingDraw,
                     objective: GeneratorObjective) -> dict[str, Array]:
  """{"loss", "mse", "vb"} per example [B] (DiT's training_losses, LossType.MSE).

  mse = mean (eps - eps_hat)^2; with learn_sigma, vb = `vb_terms_bits` of the output whose eps
  half is stop_gradient-ed (the variance learns from the bound, the mean from the MSE alone);
  loss = mse + vb. Without learn_sigma, loss = mse and vb = 0.
  """
  schedule = _diffusion_schedule(objective)
  t = draw.t
  x_t = q_sample(schedule, latents, t, draw.noise)
  out = model_fn(x_t, t, labels).astype(jnp.float32)
  c = latents.shape[-1]
  if objective.learn_sigma:
    if out.shape[-1] != 2 * c:
      raise ValueError(f"learn_sigma: the network returned {out.shape} for latents "
                       f"{latents.shape}; expected twice the channels")
    eps, var_values = out[..., :c], out[..., c:]
    frozen_out = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
    vb = vb_terms_bits(schedule, frozen_out, latents, x_t, t)
  else:
    eps, vb = out, jnp.zeros(latents.shape[:1], jnp.float32)
  mse = mean_flat(jnp.square(draw.noise - eps))
  return {"loss": mse + vb, "mse": mse, "vb": vb}


# ------------------------------------------------------------------------------------------------
# Metrics per time bucket.
# ------------------------------------------------------------------------------------------------


def time_of(objective: GeneratorObjective, t: Array) -> Array:
  """t in [0, 1] for bucketing: SiT's t as is, DiT's timestep / T."""
  if objective.kind == "dit":
    return t.astype(jnp.float32) / objective.diffusion_steps
  return t.astype(jnp.float32)


def time_bucket_metrics(objective: GeneratorObjective, per_example: Array,
                        t01: Array) -> dict[str, Array]:
  """{"loss_<bucket>": masked mean of per_example over the bucket (0 if empty),
  "frac_<bucket>": the fraction of the batch in it}; bucket i = [e_i, e_{i+1}), the last closed."""
  k = objective.num_time_buckets
  idx = jnp.clip(jnp.floor(t01 * k).astype(jnp.int32), 0, k - 1)
  out = {}
  for i, name in enumerate(objective.bucket_names()):
    mask = (idx == i).astype(jnp.float32)
    count = jnp.sum(mask)
    out[f"loss_{name}"] = jnp.sum(per_example * mask) / jnp.maximum(count, 1.0)
    out[f"frac_{name}"] = count / per_example.shape[0]
  return out


# ------------------------------------------------------------------------------------------------
# The loss function the trainer differentiates.
# ------------------------------------------------------------------------------------------------


def batch_latents(batch: dict[str, Any], tokenizer_params=None,
                  encode: Callable | None = None) -> Array:
  """The normalised latents of a batch: batch["latents"] as they are (data path a), or the frozen
  tokenizer's `encode(params, batch["image"], normalize=True)` under stop_gradient (path b)."""
  if "latents" in batch:
    return jnp.asarray(batch["latents"], jnp.float32)
  if "image" not in batch:
    raise KeyError(f"a generator batch needs 'latents' (pre-extracted tokens) or 'image' (online "
                   f"encoding), got {sorted(batch)}")
  if encode is None or tokenizer_params is None:
    raise ValueError("an image batch (online encoding) needs the tokenizer: make_loss_fn(..., "
                     "encode=softvq_jax.tokenizer_functions(tok).encode) and frozen['tokenizer'] "
                     "= its params")
  return jax.lax.stop_gradient(encode(tokenizer_params, batch["image"], normalize=True))


def make_loss_fn(objective: GeneratorObjective, graphdef, *, encode: Callable | None = None):
  """loss_fn(params, frozen, batch, key) -> (loss, metrics); see the module docstring.

  graphdef: from `split_generator`. encode: the pure tokenizer encode
  (`softvq_jax.tokenizer_functions(tok).encode`) for image batches (data path b).
  """

  def loss_fn(params, frozen, batch, key):
    latents = batch_latents(batch, frozen.get("tokenizer"), encode)
    labels = jnp.asarray(batch["label"], jnp.int32)
    draw = draw_training_inputs(objective, key, latents.shape)

    def model_fn(x, t, y):
      return apply_generator(graphdef, params, frozen["fixed"], x, t, y, train=True,
                             dropout_key=draw.dropout_key)

    if objective.kind == "sit":
      terms = {"loss": flow_matching_losses(model_fn, latents, labels, draw, objective.path)}
    else:
      terms = diffusion_losses(model_fn, latents, labels, draw, objective)
    loss = jnp.mean(terms["loss"])
    metrics = {name: jnp.mean(v) for name, v in terms.items()}
    metrics.update(time_bucket_metrics(objective, terms["loss"], time_of(objective, draw.t)))
    return loss, metrics

  return loss_fn
