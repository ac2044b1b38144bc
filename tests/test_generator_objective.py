"""The generator's training objective (softvq_jax/generator_objective.py) against float64 NumPy
transcriptions of the reference formulas, written from reading willisma/SiT `transport/`
(ICPlan / GVPCPlan, `Transport.training_losses`) and facebookresearch/DiT
`diffusion/gaussian_diffusion.py` (`training_losses` with LossType.MSE and learned-range sigma,
`_vb_terms_bpd`, `diffusion_utils.normal_kl` / `discretized_gaussian_log_likelihood`).

Convention note: willisma/SiT's paths run from noise at t = 0 to data at t = 1 (x_t = alpha_t x1 +
sigma_t x0 with alpha = t (linear) or sin(pi t / 2) (GVP)); spec.md §8.2 (SoftVQ's) runs the other way,
t = 1 pure noise. The transcription below is in the SiT convention, and the spec's quantities at
time tau are SiT's at 1 - tau with the velocity's sign flipped (d/dtau = -d/dt) — so the test also
checks that the time reversal is right.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softvq_jax import pixels
from softvq_jax import generator_objective as go
from softvq_jax import sampling, sharding
from softvq_jax.api import Tokenizer, tokenizer_functions
from softvq_jax.models import sit as sit_lib
from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer

# ------------------------------------------------------------------------------------------------
# float64 NumPy transcriptions of the references.
# ------------------------------------------------------------------------------------------------


def ref_sit_plan(t, x0, x1, path):
  """willisma/SiT `path_sampler.plan`: (xt, ut) with x0 noise, x1 data, t [B] (noise at 0)."""
  t = t.reshape(-1, *([1] * (x1.ndim - 1)))
  if path == "linear":  # ICPlan
    alpha, d_alpha, sigma, d_sigma = t, 1.0, 1 - t, -1.0
  else:  # GVPCPlan
    alpha, d_alpha = np.sin(t * np.pi / 2), np.pi / 2 * np.cos(t * np.pi / 2)
    sigma, d_sigma = np.cos(t * np.pi / 2), -np.pi / 2 * np.sin(t * np.pi / 2)
  return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0


def ref_spec_plan(tau, x, noise, path):
  """Spec 8.2 (t = 1 noise) through the SiT transcription: x_tau = xt(1 - tau), v = -ut(1 - tau)."""
  xt, ut = ref_sit_plan(1.0 - tau, noise, x, path)
  return xt, -ut


def ref_betas(name, steps=1000):
  """DiT get_named_beta_schedule."""
  if name == "linear":
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
  fn = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  return np.array([min(1 - fn((i + 1) / steps) / fn(i / steps), 0.999) for i in range(steps)],
                  np.float64)


class RefDiffusion:
  """The float64 constants of DiT's GaussianDiffusion and its training loss pieces."""

  def __init__(self, betas):
    self.betas = betas
    self.ac = np.cumprod(1.0 - betas)
    self.ac_prev = np.append(1.0, self.ac[:-1])
    self.post_var = betas * (1.0 - self.ac_prev) / (1.0 - self.ac)
    self.post_log_var_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
    self.coef1 = betas * np.sqrt(self.ac_prev) / (1.0 - self.ac)
    self.coef2 = (1.0 - self.ac_prev) * np.sqrt(1.0 - betas) / (1.0 - self.ac)

  @staticmethod
  def _e(a, t, x):
    return a[t].reshape(-1, *([1] * (x.ndim - 1)))

  def q_sample(self, x0, t, noise):
    return self._e(np.sqrt(self.ac), t, x0) * x0 + self._e(np.sqrt(1 - self.ac), t, x0) * noise

  def q_posterior(self, x0, xt, t):
    mean = self._e(self.coef1, t, xt) * x0 + self._e(self.coef2, t, xt) * xt
    return mean, self._e(self.post_log_var_clipped, t, xt)

  def p_mean_variance(self, out, xt, t):
    c = xt.shape[-1]
    eps, v = out[..., :c], out[..., c:]
    min_log = self._e(self.post_log_var_clipped, t, xt)
    max_log = self._e(np.log(self.betas), t, xt)
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = self._e(np.sqrt(1 / self.ac), t, xt) * xt - self._e(np.sqrt(1 / self.ac - 1), t, xt) * eps
    mean, _ = self.q_posterior(x0, xt, t)
    return mean, log_var


def ref_normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def ref_cdf(x):
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))


def ref_discretized_ll(x, means, log_scales):
  centered = x - means
  inv = np.exp(-log_scales)
  cdf_plus = ref_cdf(inv * (centered + 1 / 255))
  cdf_min = ref_cdf(inv * (centered - 1 / 255))
  log_cdf_plus = np.log(np.clip(cdf_plus, 1e-12, None))
  log_1m = np.log(np.clip(1 - cdf_min, 1e-12, None))
  delta = np.log(np.clip(cdf_plus - cdf_min, 1e-12, None))
  return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_1m, delta))


def mean_flat(x):
  return x.mean(axis=tuple(range(1, x.ndim)))


def ref_dit_losses(diff, out, x0, t, noise):
  """DiT training_losses (MSE + learned range): per-example mse, vb, loss."""
  xt = diff.q_sample(x0, t, noise)
  c = x0.shape[-1]
  true_mean, true_log_var = diff.q_posterior(x0, xt, t)
  mean, log_var = diff.p_mean_variance(out, xt, t)
  kl = mean_flat(ref_normal_kl(true_mean, true_log_var, mean, log_var)) / np.log(2.0)
  nll = -mean_flat(ref_discretized_ll(x0, mean, 0.5 * log_var)) / np.log(2.0)
  vb = np.where(t == 0, nll, kl)
  mse = mean_flat((noise - out[..., :c]) ** 2)
  return {"mse": mse, "vb": vb, "loss": mse + vb}


def f64(x):
  return np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------------
# Flow matching (SiT).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_matching_targets_and_loss_equal_the_reference(path):
  rng = np.random.default_rng(0)
  b, n, c = 7, 5, 3
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  noise = rng.normal(size=(b, n, c)).astype(np.float32)
  tau = np.array([0.0, 0.01, 0.25, 0.5, 0.77, 0.99, 1.0], np.float32)
  xt_ref, v_ref = ref_spec_plan(f64(tau), f64(x), f64(noise), path)
  xt, v = sampling.interpolant(x, noise, tau, path)
  np.testing.assert_allclose(xt, xt_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)

  # The loss sees x_t and t through the model: a model that depends on both.
  def model_fn(x_t, t, y):
    return 0.5 * x_t + 0.1 * t[:, None, None] + 0.01 * y[:, None, None].astype(jnp.float32)

  labels = np.arange(b, dtype=np.int32)
  draw = go.TrainingDraw(jnp.asarray(tau), jnp.asarray(noise), jax.random.key(0))
  got = go.flow_matching_losses(model_fn, jnp.asarray(x), jnp.asarray(labels), draw, path)
  pred = 0.5 * xt_ref + 0.1 * f64(tau)[:, None, None] + 0.01 * labels[:, None, None]
  want = mean_flat((pred - v_ref) ** 2)  # SiT: mean_flat((model_output - ut) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _ks_distance(samples, cdf):
  s = np.sort(samples)
  n = len(s)
  f = cdf(s)
  return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def _phi(z):
  return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_time_sampling_distributions(path):
  n = 100_000
  shape = (n, 1, 1)
  uni = go.draw_training_inputs(go.GeneratorObjective(path=path), jax.random.key(1), shape).t
  uni = np.asarray(uni, np.float64)
  assert uni.min() >= 0 and uni.max() < 1
  assert _ks_distance(uni, lambda q: q) < 0.01
  obj = go.GeneratorObjective(path=path, time_sampling="lognormal")
  t = np.asarray(go.draw_training_inputs(obj, jax.random.key(2), shape).t, np.float64)
  assert t.min() > 0 and t.max() < 1
  # n ~ N(0, 1), s = e^n: linear t = s / (1 + s) = sigmoid(n), P(t < q) = Phi(logit q);
  # cosine t = (2 / pi) atan(s), P(t < q) = Phi(log tan(pi q / 2)). Both have median 0.5.
  if path == "linear":
    cdf = lambda q: _phi(np.log(q / (1 - q)))  # noqa: E731
  else:
    cdf = lambda q: _phi(np.log(np.tan(np.pi * q / 2)))  # noqa: E731
  assert _ks_distance(t, cdf) < 0.01
  assert abs(np.median(t) - 0.5) < 0.01
  # Not uniform: the lognormal concentrates in the middle (linear: P(0.25 < t < 0.75) = 0.73).
  mid = np.mean((t > 0.25) & (t < 0.75))
  want_mid = cdf(np.array([0.75]))[0] - cdf(np.array([0.25]))[0]
  assert abs(mid - want_mid) < 0.01 and want_mid > 0.6


def test_dit_timesteps_are_uniform_integers():
  obj = go.GeneratorObjective(kind="dit")
  t = np.asarray(go.draw_training_inputs(obj, jax.random.key(3), (50_000, 1)).t)
  assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999
  counts = np.bincount(t // 100, minlength=10)
  assert np.all(np.abs(counts / 50_000 - 0.1) < 0.01)


# ------------------------------------------------------------------------------------------------
# Gaussian diffusion (DiT).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dit_loss_terms_equal_the_reference(schedule):
  rng = np.random.default_rng(1)
  b, n, c = 8, 6, 3
  t = np.array([0, 0, 1, 2, 137, 500, 998, 999], np.int32)
  # Data beyond +-0.999 too, so the decoder NLL's edge bins (t = 0) are exercised.
  x0 = rng.uniform(-1.5, 1.5, size=(b, n, c)).astype(np.float32)
  noise = rng.normal(size=(b, n, c)).astype(np.float32)
  w_eps = rng.normal(size=(n, c)).astype(np.float32)
  w_var = rng.normal(size=(n, c)).astype(np.float32)

  def model_fn(x_t, t_in, y):  # eps and variance depend on x_t: checks q_sample as well
    assert t_in.dtype == jnp.int32
    eps = 0.3 * x_t + w_eps
    var = jnp.tanh(0.5 * w_var + 0.1 * x_t)
    return jnp.concatenate([eps, var], -1)

  obj = go.GeneratorObjective(kind="dit", noise_schedule=schedule)
  draw = go.TrainingDraw(jnp.asarray(t), jnp.asarray(noise), jax.random.key(0))
  got = go.diffusion_losses(model_fn, jnp.asarray(x0), jnp.zeros(b, jnp.int32), draw, obj)

  diff = RefDiffusion(ref_betas(schedule))
  xt = diff.q_sample(f64(x0), t, f64(noise))
  out = np.concatenate([0.3 * xt + w_eps, np.tanh(0.5 * f64(w_var) + 0.1 * xt)], -1)
  want = ref_dit_losses(diff, out, f64(x0), t, f64(noise))
  assert np.all(want["vb"] > 0)
  for k in ("mse", "vb", "loss"):
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_dit_vb_trains_the_variance_only_and_mse_the_mean_only():
  rng = np.random.default_rng(2)
  b, n, c = 4, 3, 2
  x0 = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  out0 = jnp.asarray(rng.uniform(-0.9, 0.9, size=(b, n, 2 * c)), jnp.float32)
  draw = go.TrainingDraw(jnp.array([0, 3, 400, 999], jnp.int32), noise, jax.random.key(0))
  obj = go.GeneratorObjective(kind="dit")

  def term(out, name):
    return jnp.sum(go.diffusion_losses(lambda *_: out, x0, jnp.zeros(b, jnp.int32), draw,
                                       obj)[name])

  g_vb = np.asarray(jax.grad(term)(out0, "vb"))
  g_mse = np.asarray(jax.grad(term)(out0, "mse"))
  assert np.all(g_vb[..., :c] == 0) and np.abs(g_vb[..., c:]).max() > 0  # stop-gradient on eps
  assert np.all(g_mse[..., c:] == 0) and np.abs(g_mse[..., :c]).max() > 0


def test_dit_without_learn_sigma_is_the_mse():
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  draw = go.TrainingDraw(jnp.array([0, 10, 999], jnp.int32), noise, jax.random.key(0))
  obj = go.GeneratorObjective(kind="dit", learn_sigma=False)
  got = go.diffusion_losses(lambda x, t, y: 0.5 * x, x0, jnp.zeros(3, jnp.int32), draw, obj)
  diff = RefDiffusion(ref_betas("linear"))
  xt = diff.q_sample(f64(x0), np.array([0, 10, 999]), f64(noise))
  np.testing.assert_allclose(got["loss"], mean_flat((f64(noise) - 0.5 * xt) ** 2), rtol=1e-5)
  np.testing.assert_array_equal(got["vb"], 0)


# ------------------------------------------------------------------------------------------------
# The loss function the trainer calls, with real (micro) networks.
# ------------------------------------------------------------------------------------------------


def _micro(kind):
  cfg = sit_lib.SiTConfig.named("micro", input_size=8, in_channels=4, kind=kind,
                                learn_sigma=kind == "dit", attention_backend="xla")
  model = sit_lib.build_sit(cfg, seed=0)
  # Perturb every parameter: adaLN-Zero's zero init would make the output ignore the input.
  graphdef, params, fixed = go.split_generator(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return cfg, graphdef, params, fixed


def _batch(b=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"latents": rng.normal(size=(b, 8, 4)).astype(np.float32),
          "label": rng.integers(0, 1000, size=b).astype(np.int32)}


def test_split_generator_keeps_pos_embed_out_of_the_parameters():
  cfg = sit_lib.SiTConfig.named("micro", input_size=8, in_channels=4, attention_backend="xla")
  model = sit_lib.build_sit(cfg, seed=0)
  graphdef, params, fixed = go.split_generator(model)
  assert len(jax.tree.leaves(fixed)) == 1 and "pos_embed" in fixed
  assert "pos_embed" not in params
  assert sum(x.size for x in jax.tree.leaves(params)) == sit_lib.count_params(model)
  x, t, y = jnp.ones((2, 8, 4)), jnp.array([0.1, 0.9]), jnp.array([1, 2])
  np.testing.assert_array_equal(go.apply_generator(graphdef, params, fixed, x, t, y),
                                model(x, t, y))


@pytest.mark.parametrize("path,time_sampling", [("linear", "uniform"), ("cosine", "lognormal")])
def test_sit_loss_fn_equals_the_reference_with_label_dropout_once(path, time_sampling):
  cfg, graphdef, params, fixed = _micro("sit")
  obj = go.GeneratorObjective.for_network(cfg, path=path, time_sampling=time_sampling)
  loss_fn = jax.jit(go.make_loss_fn(obj, graphdef))
  batch, key = _batch(), jax.random.key(11)
  loss, metrics = loss_fn(params, {"fixed": fixed}, batch, key)

  draw = go.draw_training_inputs(obj, key, batch["latents"].shape)
  # Label dropout, the network's rule (spec.md §8.1): each label -> 1000 with probability 0.1.
  drop = np.asarray(jax.random.uniform(draw.dropout_key, (16,)) < 0.1)
  assert drop.any() and not drop.all()  # this key drops some labels: the check below bites
  y = np.where(drop, 1000, batch["label"])
  tau = f64(draw.t)
  xt, v = ref_spec_plan(tau, f64(batch["latents"]), f64(draw.noise), path)
  out = go.apply_generator(graphdef, params, fixed, jnp.asarray(xt, jnp.float32),
                           draw.t, jnp.asarray(y))
  per_example = mean_flat((f64(out) - v) ** 2)
  np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], per_example.mean(), rtol=1e-5)
  # Dropping the labels a second time (or not at all) gives another number.
  out_nodrop = go.apply_generator(graphdef, params, fixed, jnp.asarray(xt, jnp.float32), draw.t,
                                  jnp.asarray(batch["label"]))
  assert abs(mean_flat((f64(out_nodrop) - v) ** 2).mean() - float(loss)) > 1e-5
  # Buckets: masked means over t in [0, .25), [.25, .5), [.5, .75), [.75, 1].
  idx = np.minimum((tau * 4).astype(int), 3)
  for i, name in enumerate(["t0.00-0.25", "t0.25-0.50", "t0.50-0.75", "t0.75-1.00"]):
    m = idx == i
    np.testing.assert_allclose(metrics[f"frac_{name}"], m.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics[f"loss_{name}"],
                               per_example[m].mean() if m.any() else 0.0, rtol=1e-5, atol=1e-7)


def test_dit_loss_fn_equals_the_reference():
  cfg, graphdef, params, fixed = _micro("dit")
  obj = go.GeneratorObjective.for_network(cfg, noise_schedule="cosine")
  batch, key = _batch(seed=1), jax.random.key(12)
  loss, metrics = jax.jit(go.make_loss_fn(obj, graphdef))(params, {"fixed": fixed}, batch, key)
  draw = go.draw_training_inputs(obj, key, batch["latents"].shape)
  t = np.asarray(draw.t)
  drop = np.asarray(jax.random.uniform(draw.dropout_key, (16,)) < 0.1)
  y = np.where(drop, 1000, batch["label"])
  diff = RefDiffusion(ref_betas("cosine"))
  xt = diff.q_sample(f64(batch["latents"]), t, f64(draw.noise))
  out = f64(go.apply_generator(graphdef, params, fixed, jnp.asarray(xt, jnp.float32),
                               draw.t, jnp.asarray(y)))
  want = ref_dit_losses(diff, out, f64(batch["latents"]), t, f64(draw.noise))
  np.testing.assert_allclose(loss, want["loss"].mean(), rtol=2e-5)
  np.testing.assert_allclose(metrics["mse"], want["mse"].mean(), rtol=2e-5)
  np.testing.assert_allclose(metrics["vb"], want["vb"].mean(), rtol=1e-4, atol=1e-7)
  idx = np.minimum(t * 4 // 1000, 3)
  np.testing.assert_allclose(metrics["frac_t0.75-1.00"], np.mean(idx == 3), rtol=1e-6)


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_gradients_are_finite_and_reach_the_parameters(kind):
  cfg, graphdef, params, fixed = _micro(kind)
  obj = go.GeneratorObjective.for_network(cfg, time_sampling="lognormal")
  grad_fn = jax.jit(jax.grad(go.make_loss_fn(obj, graphdef), has_aux=True))
  grads, _ = grad_fn(params, {"fixed": fixed}, _batch(), jax.random.key(3))
  assert jax.tree.structure(grads) == jax.tree.structure(params)  # no pos_embed gradient
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(int((g != 0).any()) for g in leaves) == len(leaves)  # perturbed: every leaf learns


def test_label_dropout_rate_is_ten_percent():
  cfg, graphdef, params, fixed = _micro("sit")
  model = go.nnx.merge(graphdef, params, fixed)
  n = 40_000
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 1000, n), jnp.int32)
  draw = go.draw_training_inputs(go.GeneratorObjective(), jax.random.key(5), (n, 8, 4))
  emb = model.y_embedder(labels, train=True, dropout_key=draw.dropout_key)
  table = model.y_embedder.embedding_table.weight[...]
  is_null = np.all(np.asarray(emb) == np.asarray(table[1000]), axis=-1)
  assert abs(is_null.mean() - 0.1) < 4 * math.sqrt(0.09 / n)
  kept = ~is_null
  np.testing.assert_array_equal(np.asarray(emb)[kept], np.asarray(table)[np.asarray(labels)[kept]])


def test_time_bucket_metrics_masked_means():
  obj = go.GeneratorObjective(num_time_buckets=4)
  per = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  t = jnp.array([0.0, 0.1, 0.3, 0.74, 0.75, 1.0])
  m = go.time_bucket_metrics(obj, per, t)
  assert float(m["loss_t0.00-0.25"]) == 1.5 and float(m["loss_t0.25-0.50"]) == 3.0
  assert float(m["loss_t0.50-0.75"]) == 4.0 and float(m["loss_t0.75-1.00"]) == 5.5
  np.testing.assert_allclose(m["frac_t0.00-0.25"], 2 / 6)
  empty = go.time_bucket_metrics(obj, per[:2], t[:2])
  assert float(empty["loss_t0.75-1.00"]) == 0.0 and float(empty["frac_t0.75-1.00"]) == 0.0


@pytest.mark.parametrize("mesh_shape", [(-1, 1, 1), (1, -1, 1)])
def test_sharded_equals_one_device(mesh_shape):
  """8 devices, data-parallel or FSDP (parameters and pos_embed split by their logical axes, the
  project's rules): loss, metrics and gradients equal the one-device computation."""
  cfg, graphdef, params, fixed = _micro("sit")
  obj = go.GeneratorObjective.for_network(cfg, time_sampling="lognormal")
  value_and_grad = jax.value_and_grad(go.make_loss_fn(obj, graphdef), has_aux=True)
  batch, key = _batch(), jax.random.key(9)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  (want, want_m), want_g = jax.jit(value_and_grad)(
      jax.device_put(params, device), {"fixed": jax.device_put(fixed, device)}, batch, key)
  mesh = sharding.create_mesh(mesh_shape)
  param_sh = sharding.state_shardings(params, mesh)
  frozen_sh = {"fixed": sharding.state_shardings(fixed, mesh)}
  rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  fn = jax.jit(value_and_grad, in_shardings=(param_sh, frozen_sh, rows, rep),
               out_shardings=((rep, rep), param_sh))
  (got, got_m), got_g = fn(jax.device_put(params, param_sh),
                           {"fixed": jax.device_put(fixed, frozen_sh["fixed"])},
                           jax.device_put(batch, rows), key)
  if mesh_shape == (1, -1, 1):  # really split: some parameter is sharded over fsdp
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(param_sh))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_online_encoding_equals_pre_extracted_latents():
  tcfg = TokenizerConfig(image_size=32, patch_size=16, encoder_size="micro", decoder_size="micro",
                         num_latent_tokens=8, codebook_size=16, codebook_embed_dim=4,
                         num_codebooks=2, attention_backend="xla", vq_mean=0.1, vq_std=0.5)
  tok = Tokenizer(tcfg, build_tokenizer(tcfg, seed=0))
  fns = tokenizer_functions(tok)
  cfg, graphdef, params, fixed = _micro("sit")
  obj = go.GeneratorObjective.for_network(cfg)
  images = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  labels = np.arange(8, dtype=np.int32)
  online = jax.jit(go.make_loss_fn(obj, graphdef, encode=fns.encode))
  loss_b, _ = online(params, {"fixed": fixed, "tokenizer": fns.params},
                     {"image": images, "label": labels}, jax.random.key(1))
  latents = (np.asarray(tok.encode(pixels.to_model_range(jnp.asarray(images)))) - 0.1) / 0.5
  loss_a, _ = jax.jit(go.make_loss_fn(obj, graphdef))(
      params, {"fixed": fixed}, {"latents": latents, "label": labels}, jax.random.key(1))
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  with pytest.raises(ValueError, match="needs the tokenizer"):
    go.make_loss_fn(obj, graphdef)(params, {"fixed": fixed}, {"image": images, "label": labels},
                                   jax.random.key(1))


def test_objective_config_errors():
  with pytest.raises(ValueError, match="kind"):
    go.GeneratorObjective(kind="edm")
  with pytest.raises(ValueError, match="time_sampling"):
    go.GeneratorObjective(time_sampling="logit")
  with pytest.raises(ValueError, match="path"):
    go.GeneratorObjective(path="vp")
  cfg = sit_lib.SiTConfig.named("micro", input_size=8, in_channels=4)
  with pytest.raises(ValueError, match="kind"):
    go.GeneratorObjective.for_network(cfg, kind="dit")
