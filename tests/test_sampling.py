"""softvq_jax/sampling.py against an independent float64 NumPy transcription of the reference.

The `_ref_*` functions below are written from spec.md §8.3 / 8.4 and from reading the reference's
samplers (SoftVQ's modelling/samplers.py, which follows REPA) and DiT's diffusion package, loop for
loop as the reference runs them (float64, doubled batches concatenated and split, CFG on the
drift, the Heun corrector guided by the step's t): they share no code with the module under test.
The model is a small random MLP velocity / eps field evaluated in float64 here and float32 there,
with a label embedding so that guidance changes the result.
"""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from softvq_jax import sampling

N_TOK, CH, HID = 6, 3, 16


# ------------------------------------------------------------------------------------------------
# A small random field, in float64 NumPy and in float32 JAX with the same weights.
# ------------------------------------------------------------------------------------------------


def _field_params(seed=0, out_channels=CH):
  r = np.random.default_rng(seed)
  return dict(w1=r.normal(0, 0.5, (CH, HID)), emb=r.normal(0, 0.5, (1001, HID)),
              wt=r.normal(0, 1.0, (HID,)), w2=r.normal(0, 0.5, (HID, out_channels)),
              decay=0.3)


def _field_np(p, scale_t=1.0):
  def f(x, t, y):
    h = np.tanh(x @ p["w1"] + p["emb"][y][:, None, :] + (t / scale_t)[:, None, None] * p["wt"])
    out = h @ p["w2"]
    out[..., :CH] -= p["decay"] * x
    return out
  return f


def _field_jax(p, scale_t=1.0):
  q = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}

  def f(x, t, y):
    tt = t.astype(jnp.float32) / scale_t
    h = jnp.tanh(x @ q["w1"] + q["emb"][y][:, None, :] + tt[:, None, None] * q["wt"])
    out = h @ q["w2"]
    return out.at[..., :CH].add(-q["decay"] * x)
  return f


def _inputs(batch=4, seed=1):
  r = np.random.default_rng(seed)
  noise = r.normal(size=(batch, N_TOK, CH)).astype(np.float32)
  labels = np.array([3, 7, 1000, 42, 5, 9, 11, 13][:batch])
  return noise, labels


# ------------------------------------------------------------------------------------------------
# The reference, transcribed (float64).
# ------------------------------------------------------------------------------------------------


def _ref_alpha_sigma(t, path):
  if path == "linear":
    return 1 - t, -np.ones_like(t), t, np.ones_like(t)
  return (np.cos(t * np.pi / 2), -np.pi / 2 * np.sin(t * np.pi / 2), np.sin(t * np.pi / 2),
          np.pi / 2 * np.cos(t * np.pi / 2))


def _ref_score(v, x, t, path):
  t = t.reshape(-1, *([1] * (x.ndim - 1)))
  alpha_t, d_alpha_t, sigma_t, d_sigma_t = _ref_alpha_sigma(t, path)
  reverse_alpha_ratio = alpha_t / d_alpha_t
  var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
  return (reverse_alpha_ratio * v - x) / var


def _ref_euler(model, latents, y, num_steps, heun, cfg_scale, low, high):
  t_steps = np.linspace(1, 0, num_steps + 1, dtype=np.float64)
  x_next = latents.astype(np.float64)
  y_null = np.full_like(y, 1000)
  for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
    x_cur = x_next
    guided = cfg_scale > 1.0 and low <= t_cur <= high
    inp, yy = (np.concatenate([x_cur] * 2), np.concatenate([y, y_null])) if guided else (x_cur, y)
    d_cur = model(inp, np.full(len(inp), t_cur), yy)
    if guided:
      c, u = np.split(d_cur, 2)
      d_cur = u + cfg_scale * (c - u)
    x_next = x_cur + (t_next - t_cur) * d_cur
    if heun and i < num_steps - 1:
      inp = np.concatenate([x_next] * 2) if guided else x_next
      d_prime = model(inp, np.full(len(inp), t_next), yy)
      if guided:
        c, u = np.split(d_prime, 2)
        d_prime = u + cfg_scale * (c - u)
      x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
  return x_next


def _ref_euler_maruyama(model, latents, y, num_steps, cfg_scale, low, high, path, noises):
  t_steps = np.concatenate([np.linspace(1.0, 0.04, num_steps, dtype=np.float64), [0.0]])
  x_next = latents.astype(np.float64)
  y_null = np.full_like(y, 1000)
  for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
    last = i == num_steps - 1
    dt = t_next - t_cur
    x_cur = x_next
    guided = cfg_scale > 1.0 and low <= t_cur <= high
    inp, yy = (np.concatenate([x_cur] * 2), np.concatenate([y, y_null])) if guided else (x_cur, y)
    time_input = np.full(len(inp), t_cur)
    diffusion = 2 * t_cur
    v_cur = model(inp, time_input, yy)
    s_cur = _ref_score(v_cur, inp, time_input, path)
    d_cur = v_cur - 0.5 * diffusion * s_cur
    if guided:
      c, u = np.split(d_cur, 2)
      d_cur = u + cfg_scale * (c - u)
    if last:
      x_next = x_cur + dt * d_cur
    else:
      x_next = x_cur + d_cur * dt + np.sqrt(diffusion) * noises[i] * np.sqrt(abs(dt))
  return x_next


def _ref_named_betas(name, n=1000):
  if name == "linear":
    s = 1000 / n
    return np.linspace(s * 0.0001, s * 0.02, n, dtype=np.float64)
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])


def _ref_space_timesteps(num_timesteps, counts):
  size_per = num_timesteps // len(counts)
  extra = num_timesteps % len(counts)
  start_idx, all_steps = 0, []
  for i, section_count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
    cur_idx, taken = 0.0, []
    for _ in range(section_count):
      taken.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    all_steps += taken
    start_idx += size
  return set(all_steps)


class _RefDiffusion:
  """GaussianDiffusion + SpacedDiffusion constants and p_sample (LEARNED_RANGE, EPSILON)."""

  def __init__(self, betas, use_timesteps=None):
    if use_timesteps is not None:
      base = _RefDiffusion(betas)
      last, new_betas, self.timestep_map = 1.0, [], []
      for i, ac in enumerate(base.alphas_cumprod):
        if i in use_timesteps:
          new_betas.append(1 - ac / last)
          last = ac
          self.timestep_map.append(i)
      betas = np.array(new_betas)
    else:
      self.timestep_map = list(range(len(betas)))
    self.betas = betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = (betas * np.sqrt(self.alphas_cumprod_prev)
                                 / (1.0 - self.alphas_cumprod))
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))

  def p_mean_variance(self, model_output, x, t):
    c = x.shape[-1]
    eps, var_values = model_output[..., :c], model_output[..., c:]
    min_log = self.posterior_log_variance_clipped[t][:, None, None]
    max_log = np.log(self.betas)[t][:, None, None]
    frac = (var_values + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    pred_x0 = (self.sqrt_recip_alphas_cumprod[t][:, None, None] * x
               - self.sqrt_recipm1_alphas_cumprod[t][:, None, None] * eps)
    mean = (self.posterior_mean_coef1[t][:, None, None] * pred_x0
            + self.posterior_mean_coef2[t][:, None, None] * x)
    return mean, log_var, pred_x0

  def forward_with_cfg(self, model, x, t_model, y, cfg_scale):
    """DiT.forward_with_cfg on a doubled batch [x, x] with labels [y, 1000]."""
    half = x[: len(x) // 2]
    out = model(np.concatenate([half, half]), t_model, y)
    c = x.shape[-1]
    eps, rest = out[..., :c], out[..., c:]
    cond, uncond = np.split(eps, 2)
    half_eps = uncond + cfg_scale * (cond - uncond)
    return np.concatenate([np.concatenate([half_eps, half_eps]), rest], -1)

  def p_sample_loop(self, model, noise, y, cfg_scale, noises, forward_with_cfg=None):
    using_cfg = cfg_scale > 1.0
    if forward_with_cfg is None:
      forward_with_cfg = lambda x, t, y, s: self.forward_with_cfg(model, x, t, y, s)  # noqa: E731
    x = noise.astype(np.float64)
    if using_cfg:
      x, y = np.concatenate([x, x]), np.concatenate([y, np.full_like(y, 1000)])
    for j, i in enumerate(range(len(self.betas))[::-1]):
      t = np.full(len(x), i)
      t_model = np.array(self.timestep_map)[t]
      out = forward_with_cfg(x, t_model, y, cfg_scale) if using_cfg else model(x, t_model, y)
      mean, log_var, _ = self.p_mean_variance(out, x, t)
      z = noises[j]
      if using_cfg:
        z = np.concatenate([z, z])
      x = mean + (i != 0) * np.exp(0.5 * log_var) * z
    return x[: len(noise)]


# ------------------------------------------------------------------------------------------------
# Paths, score, drift.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_path_coefficients_and_velocity_target(path):
  t = np.linspace(0.0, 1.0, 11)
  a, s, da, ds = (np.asarray(v, np.float64) for v in sampling.path_coefficients(t, path, np))
  ra, rda, rs, rds = _ref_alpha_sigma(t, path)
  np.testing.assert_allclose(np.stack([a, da, s, ds]), np.stack([ra, rda, rs, rds]), atol=1e-12)
  # derivatives are the derivatives (central differences)
  h = 1e-6
  tp, tm = t[1:-1] + h, t[1:-1] - h
  for val, der in ((0, 2), (1, 3)):
    fd = (sampling.path_coefficients(tp, path, np)[val] -
          sampling.path_coefficients(tm, path, np)[val]) / (2 * h)
    np.testing.assert_allclose(fd, sampling.path_coefficients(t[1:-1], path, np)[der], atol=1e-6)
  # interpolant (training): x_t and the target v in float32 JAX
  r = np.random.default_rng(0)
  x, eps, tt = r.normal(size=(5, 4, 3)), r.normal(size=(5, 4, 3)), r.uniform(size=5)
  xt, v = sampling.interpolant(jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32),
                               jnp.asarray(tt, jnp.float32), path)
  ra, rda, rs, rds = (c[:, None, None] for c in _ref_alpha_sigma(tt, path))
  np.testing.assert_allclose(xt, ra * x + rs * eps, atol=1e-5)
  np.testing.assert_allclose(v, rda * x + rds * eps, atol=1e-5)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_and_drift_match_reference(path):
  r = np.random.default_rng(1)
  x, v = r.normal(size=(7, 4, 3)), r.normal(size=(7, 4, 3))
  t = np.array([1.0, 0.9, 0.5, 0.3, 0.1, 0.04, 0.2])
  ref_score = _ref_score(v, x, t, path)
  got = sampling.score_from_velocity(jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32),
                                     jnp.asarray(t, jnp.float32), path)
  np.testing.assert_allclose(got, ref_score, rtol=1e-5, atol=1e-5)
  # spec.md §8.3's closed forms: linear a = -(1 - t), var = t; cosine a = -(2/pi) cot(pi t / 2), var = 1
  tb = t[:, None, None]
  if path == "linear":
    closed = (-(1 - tb) * v - x) / tb
  else:
    closed = -(2 / np.pi) / np.tan(np.pi * tb / 2) * v - x
  np.testing.assert_allclose(ref_score, closed, rtol=1e-10, atol=1e-10)
  drift = sampling.sde_drift(jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32),
                             jnp.asarray(t, jnp.float32), path)
  np.testing.assert_allclose(drift, v - 0.5 * (2 * tb) * ref_score, rtol=1e-5, atol=1e-5)


def test_time_grids_and_training_times():
  np.testing.assert_array_equal(sampling.ode_time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
  g = sampling.sde_time_grid(5)
  np.testing.assert_allclose(g, [1.0, 0.76, 0.52, 0.28, 0.04, 0.0])
  assert sampling.sde_time_grid(1).tolist() == [1.0, 0.0]
  key = jax.random.key(0)
  for path in ("linear", "cosine"):
    t = np.asarray(sampling.sample_train_time(key, (20000,), kind="lognormal", path=path))
    assert 0 < t.min() and t.max() < 1
    # median of s = e^n is 1: t = 1/2 on both paths
    assert abs(np.median(t) - 0.5) < 0.02
  u = np.asarray(sampling.sample_train_time(key, (20000,)))
  assert abs(u.mean() - 0.5) < 0.01
  with pytest.raises(ValueError, match="kind"):
    sampling.sample_train_time(key, (2,), kind="beta")


# ------------------------------------------------------------------------------------------------
# Trajectories vs the transcription.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heun,cfg,interval,steps", [
    (False, 1.0, (0.0, 1.0), 12),
    (True, 1.0, (0.0, 1.0), 12),
    (True, 1.75, (0.0, 1.0), 10),
    (True, 1.75, (0.0, 0.7), 10),   # the published interval: guided on part of the grid (cond)
    (False, 1.5, (0.3, 0.6), 9),
])
def test_ode_trajectory_matches_reference(heun, cfg, interval, steps):
  p = _field_params()
  noise, labels = _inputs()
  ref = _ref_euler(_field_np(p), noise, labels, steps, heun, cfg, *interval)
  run = jax.jit(lambda n, y: sampling.sample_flow(
      _field_jax(p), y, n, mode="ode", steps=steps, heun=heun, cfg_scale=cfg,
      guidance_interval=interval))
  got = np.asarray(run(noise, labels))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  # guidance / Heun actually changed something (the test would notice their loss)
  plain = _ref_euler(_field_np(p), noise, labels, steps, False, 1.0, 0.0, 1.0)
  if heun or cfg > 1:
    assert np.abs(plain - ref).max() > 1e-3


def _sde_noises(key, steps, shape):
  return [np.asarray(sampling.step_noise(key, i, shape), np.float64) for i in range(steps)]


@pytest.mark.parametrize("path,cfg,interval", [
    ("linear", 1.0, (0.0, 1.0)),
    ("cosine", 1.75, (0.0, 0.7)),
    ("linear", 1.5, (0.0, 1.0)),
])
def test_sde_trajectory_matches_reference_with_same_noise(path, cfg, interval):
  p = _field_params(2)
  noise, labels = _inputs()
  steps = 8
  key = jax.random.key(5)
  ref = _ref_euler_maruyama(_field_np(p), noise, labels, steps, cfg, *interval, path,
                            _sde_noises(key, steps, noise.shape))
  got = sampling.sample_flow(_field_jax(p), labels, noise, key, mode="sde", steps=steps,
                             cfg_scale=cfg, guidance_interval=interval, path=path)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=0)


def test_sde_per_sample_keys_do_not_depend_on_the_batch():
  p = _field_params(3)
  noise, labels = _inputs(batch=4)
  keys = jax.random.split(jax.random.key(9), 4)
  kw = dict(mode="sde", steps=6, cfg_scale=1.5, path="linear")
  full = np.asarray(sampling.sample_flow(_field_jax(p), labels, noise, keys, **kw))
  part = np.asarray(sampling.sample_flow(_field_jax(p), labels[2:], noise[2:], keys[2:], **kw))
  np.testing.assert_allclose(full[2:], part, atol=1e-6)
  again = np.asarray(sampling.sample_flow(_field_jax(p), labels, noise, keys, **kw))
  np.testing.assert_array_equal(full, again)
  other = np.asarray(sampling.sample_flow(_field_jax(p), labels, noise,
                                          jax.random.split(jax.random.key(10), 4), **kw))
  assert np.abs(other - full).max() > 1e-2


def test_guidance_uses_one_doubled_batch_only_inside_the_interval():
  """The model sees 2B rows exactly at the guided steps (recorded through a host callback)."""
  calls = []

  def model(x, t, y):
    jax.debug.callback(lambda tt, n: calls.append((float(tt[0]), int(n))), t, jnp.int32(x.shape[0]))
    return -x

  noise, labels = _inputs(batch=2)
  jax.block_until_ready(sampling.sample_flow(model, labels, noise, mode="ode", steps=10,
                                             cfg_scale=2.0, guidance_interval=(0.0, 0.55)))
  jax.effects_barrier()
  assert len(calls) == 10
  for t, n in calls:
    assert n == (4 if t <= 0.55 else 2), (t, n)
  calls.clear()
  jax.block_until_ready(sampling.sample_flow(model, labels, noise, mode="ode", steps=4))
  jax.effects_barrier()
  assert [n for _, n in calls] == [2] * 4


def test_flow_argument_errors():
  f = _field_jax(_field_params())
  noise, labels = _inputs()
  for kw, msg in [(dict(mode="ddim"), "mode"), (dict(steps=0), "steps"),
                  (dict(path="vp"), "path"), (dict(cfg_scale=0.5), "cfg_scale"),
                  (dict(guidance_interval=(0.8, 0.2)), "guidance_interval"),
                  (dict(heun=True, mode="sde"), "heun"), (dict(mode="sde"), "key")]:
    with pytest.raises(ValueError, match=msg):
      sampling.sample_flow(f, labels, noise, None, **kw)
  with pytest.raises(ValueError, match="labels"):
    sampling.sample_flow(f, labels[:2], noise, mode="ode", steps=2)


# ------------------------------------------------------------------------------------------------
# The sampled distribution: the exact velocity of a Gaussian target.
# ------------------------------------------------------------------------------------------------


def _gaussian_velocity(mu_per_class, s, path):
  """Exact E[v | x_t] for data x ~ N(mu_y, s^2 I) and the path's interpolant."""
  mus = jnp.asarray(mu_per_class, jnp.float32)

  def f(x, t, y):
    mu = mus[y][:, None, :]
    a, sg, da, ds = (c[:, None, None] for c in sampling.path_coefficients(t, path))
    var = a ** 2 * s ** 2 + sg ** 2
    r = x - a * mu
    x0 = mu + a * s ** 2 / var * r
    eps = sg / var * r
    return da * x0 + ds * eps
  return f


@pytest.mark.parametrize("mode,path,heun,steps", [
    ("ode", "linear", False, 100), ("ode", "cosine", True, 30),
    ("sde", "linear", False, 100), ("sde", "cosine", False, 100)])
def test_samples_follow_a_known_gaussian_target(mode, path, heun, steps):
  mus = np.array([[2.0, -1.0], [-3.0, 0.5]])
  s = 0.5
  b = 1024
  labels = np.arange(b) % 2
  noise = np.asarray(jax.random.normal(jax.random.key(0), (b, 8, 2)))
  out = np.asarray(sampling.sample_flow(_gaussian_velocity(mus, s, path), labels, noise,
                                        jax.random.key(1), mode=mode, steps=steps, heun=heun,
                                        path=path))
  for c in (0, 1):
    x = out[labels == c]
    np.testing.assert_allclose(x.mean(axis=(0, 1)), mus[c], atol=0.05)
    np.testing.assert_allclose(x.std(axis=(0, 1)), [s, s], atol=0.05)


# ------------------------------------------------------------------------------------------------
# DiT: Gaussian diffusion.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [250, 100, 37, "10,15,20", 1000])
def test_respaced_betas_match_reference(schedule, steps):
  betas = _ref_named_betas(schedule)
  counts = [int(c) for c in str(steps).split(",")]
  ref = _RefDiffusion(betas, _ref_space_timesteps(1000, counts))
  got = sampling.diffusion_schedule(steps, noise_schedule=schedule)
  np.testing.assert_allclose(sampling.beta_schedule(schedule), betas, rtol=1e-14)
  assert got.timesteps.tolist() == ref.timestep_map
  assert got.num_steps == sum(counts)
  np.testing.assert_allclose(got.betas, ref.betas, rtol=1e-12)
  for name in ("alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
               "posterior_mean_coef2", "sqrt_recipm1_alphas_cumprod"):
    np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-10, err_msg=name)
  # respacing keeps the original alpha-bar at the kept timesteps
  base = np.cumprod(1 - betas)
  np.testing.assert_allclose(got.alphas_cumprod, base[got.timesteps], rtol=1e-9)


def test_space_timesteps_rounds_half_to_even_and_rejects_too_many():
  # 250 of 1000: stride 999/249 = 4.012...; a few positions land on .5 boundaries elsewhere.
  assert sampling.space_timesteps(1000, 250) == sorted(_ref_space_timesteps(1000, [250]))
  assert sampling.space_timesteps(10, 3) == [0, 4, 9]  # 4.5 rounds to 4 (half to even)
  with pytest.raises(ValueError, match="cannot divide"):
    sampling.space_timesteps(10, 11)


def test_one_ddpm_step_learned_sigma_matches_reference():
  ref = _RefDiffusion(_ref_named_betas("cosine"), _ref_space_timesteps(1000, [50]))
  sched = sampling.diffusion_schedule(50, noise_schedule="cosine")
  r = np.random.default_rng(3)
  x = r.normal(size=(4, N_TOK, CH))
  out = np.concatenate([r.normal(size=(4, N_TOK, CH)), r.uniform(-1, 1, (4, N_TOK, CH))], -1)
  for k in (49, 20, 1, 0):
    mean, log_var, x0 = sampling.p_mean_variance(sched, jnp.asarray(out, jnp.float32),
                                                 jnp.asarray(x, jnp.float32), k)
    rmean, rlog, rx0 = ref.p_mean_variance(out, x, np.full(4, k))
    np.testing.assert_allclose(mean, rmean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(log_var, rlog, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x0, rx0, rtol=2e-5, atol=2e-4)


def _eps_fields(p, schedule="linear"):
  """A learn_sigma output that keeps the loop bounded: eps = sqrt(1 - abar_t) x (the exact eps
  for data at 0) + 0.3 x a random label-dependent field; variance channels tanh(field) in [-1, 1].
  (A raw random field as eps makes x_0 = x / sqrt(abar) - ... grow to ~1e3 and the float32
  comparison ill-conditioned.)"""
  scale = np.sqrt(1 - np.cumprod(1 - _ref_named_betas(schedule)))
  f_np, f_jax = _field_np(p, 1000.0), _field_jax(p, 1000.0)
  scale_j = jnp.asarray(scale, jnp.float32)

  def g_np(x, t, y):
    out = f_np(x, t, y)
    s = scale[np.asarray(t)][:, None, None]
    return np.concatenate([s * x + 0.3 * out[..., :CH], np.tanh(out[..., CH:])], -1)

  def g_jax(x, t, y):
    out = f_jax(x, t, y)
    s = scale_j[t][:, None, None]
    return jnp.concatenate([s * x + 0.3 * out[..., :CH], jnp.tanh(out[..., CH:])], -1)
  return g_np, g_jax


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ddpm_loop_matches_reference_with_same_noise(cfg):
  g_np, g_jax = _eps_fields(_field_params(4, out_channels=2 * CH))
  noise, labels = _inputs()
  steps = 10
  key = jax.random.key(2)
  ref = _RefDiffusion(_ref_named_betas("linear"), _ref_space_timesteps(1000, [steps]))
  noises = _sde_noises(key, steps, noise.shape)
  want = ref.p_sample_loop(g_np, noise, labels, cfg, noises)
  run = jax.jit(lambda n, y, k: sampling.sample_ddpm(g_jax, y, n, k, steps=steps, cfg_scale=cfg))
  got = np.asarray(run(noise, labels, key))
  assert got.shape == noise.shape and got.dtype == np.float32
  assert 0.1 < np.abs(want).max() < 20  # bounded, and not collapsed to 0
  if cfg > 1:  # guidance changed the result
    assert np.abs(ref.p_sample_loop(g_np, noise, labels, 1.0, noises) - want).max() > 1e-2
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(got, np.asarray(run(noise, labels, key)))  # deterministic
  assert np.abs(np.asarray(run(noise, labels, jax.random.key(3))) - got).max() > 1e-2


def test_ddpm_model_sees_original_timesteps_and_eps_only_guidance():
  seen = []

  def model(x, t, y):
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t)
    return jnp.concatenate([x * 0, jnp.zeros_like(x)], -1)

  noise, labels = _inputs(batch=2)
  jax.block_until_ready(sampling.sample_ddpm(model, labels, noise, jax.random.key(0), steps=4))
  jax.effects_barrier()
  assert seen == sampling.space_timesteps(1000, 4)[::-1] == [999, 666, 333, 0]
  # learn_sigma=True needs twice the channels
  with pytest.raises(ValueError, match="twice"):
    sampling.sample_ddpm(lambda x, t, y: x, labels, noise, jax.random.key(0), steps=2)


# ------------------------------------------------------------------------------------------------
# Acceptance (issue 18): our SiT / DiT through our samplers vs the PyTorch construction of the
# official networks (benchmarks/torch_sit_reference.py) through the transcribed reference loops.
# ------------------------------------------------------------------------------------------------


def _torch_network(kind, seed=0):
  """A small official-structure network, every weight perturbed, and ours with its weights."""
  torch = require("torch")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
  import torch_sit_reference as ref  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import generator_official  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  small = dict(input_size=N_TOK, in_channels=CH, patch_size=1, vae_1d=True, hidden_size=64,
               depth=2, num_heads=4, class_dropout_prob=0.1)
  if kind == "sit":
    model = ref.SiT(decoder_hidden_size=64, qk_norm=False, **small)
  else:
    model = ref.DiT(learn_sigma=True, **small)
  ref.perturb_(model, std=0.05, seed=seed).eval()
  cfg = sit_lib.SiTConfig(kind=kind, learn_sigma=kind == "dit", attention_backend="xla", **small)
  ours = sit_lib.build_sit(cfg, seed=7)
  generator_official.load_generator_state_dict(
      ours, {k: v.detach().numpy() for k, v in model.state_dict().items()}, source="torch")
  return torch, model, ours


def _as_model_fn(module):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(module)
  return lambda x, t, y: nnx.merge(graphdef, state)(x, t, y)


def test_sit_ode_heun_cfg_interval_trajectory_matches_official_pytorch():
  """The issue's acceptance: a full ODE Heun + CFG-interval trajectory from the same noise,
  float32, within 1e-4 (the reference's loop with its float64 state, the network in float32)."""
  torch, model, ours = _torch_network("sit")

  def torch_velocity(x, t, y):
    with torch.no_grad():
      out = model(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(t.astype(np.float32)),
                  torch.from_numpy(y.astype(np.int64)))
    return out.numpy().astype(np.float64)

  noise, labels = _inputs()
  steps, cfg, interval = 10, 1.75, (0.0, 0.7)
  want = _ref_euler(torch_velocity, noise, labels, steps, True, cfg, *interval)
  run = jax.jit(lambda n, y: sampling.sample_flow(
      _as_model_fn(ours), y, n, mode="ode", steps=steps, heun=True, cfg_scale=cfg,
      guidance_interval=interval))
  got = np.asarray(run(noise, labels))
  unguided = _ref_euler(torch_velocity, noise, labels, steps, True, 1.0, 0.0, 1.0)
  assert np.abs(want - unguided).max() > 1e-2  # the network and the guidance both matter
  assert np.abs(want - noise).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_dit_ddpm_matches_official_pytorch():
  """DiT: one DDPM step (p_mean_variance of the official network's learned-range output, CFG
  through the official forward_with_cfg) and a 4-step respaced loop from the same noise."""
  torch, model, ours = _torch_network("dit", seed=1)

  def torch_fn(fn):
    def f(x, t, y, *rest):
      with torch.no_grad():
        out = fn(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(t.astype(np.int64)),
                 torch.from_numpy(y.astype(np.int64)), *rest)
      return out.numpy().astype(np.float64)
    return f

  noise, labels = _inputs()
  ref = _RefDiffusion(_ref_named_betas("cosine"), _ref_space_timesteps(1000, [4]))
  sched = sampling.diffusion_schedule(4, noise_schedule="cosine")
  # one step at respaced k = 2 (original timestep 666) with CFG 3
  k, cfg = 2, 3.0
  doubled = np.concatenate([noise, noise]).astype(np.float64)
  t_model = np.full(8, ref.timestep_map[k])
  out_ref = torch_fn(model.forward_with_cfg)(doubled, t_model,
                                            np.concatenate([labels, np.full(4, 1000)]), cfg)
  mean_ref, logvar_ref, _ = ref.p_mean_variance(out_ref, doubled, np.full(8, k))
  out = sampling.guided_output(_as_model_fn(ours), jnp.asarray(noise),
                               jnp.full((4,), ref.timestep_map[k], jnp.int32),
                               jnp.asarray(labels, jnp.int32), cfg, True, guide_channels=CH)
  mean, logvar, _ = sampling.p_mean_variance(sched, out, jnp.asarray(noise), k)
  np.testing.assert_allclose(out, out_ref[:4], atol=1e-4)
  np.testing.assert_allclose(mean, mean_ref[:4], atol=1e-4)
  np.testing.assert_allclose(logvar, logvar_ref[:4], atol=1e-4)
  # The whole respaced loop, with our per-step noise fed to the reference. A random network is no
  # denoiser (x_0 = x / sqrt(abar) - ... would grow to ~1e4), so both sides' eps become
  # sqrt(1 - abar_t) x + 0.1 eps_net: bounded, and it commutes with CFG (an affine combination
  # with weights summing to 1), so the official forward_with_cfg still does the guiding.
  scale = np.sqrt(1 - np.cumprod(1 - _ref_named_betas("linear")))
  loop_ref = _RefDiffusion(_ref_named_betas("linear"), _ref_space_timesteps(1000, [4]))

  def bounded_np(fn):
    def f(x, t, y, *rest):
      out = fn(x, t, y, *rest)
      return np.concatenate([scale[t][:, None, None] * x + 0.1 * out[..., :CH],
                             out[..., CH:]], -1)
    return f

  net, scale_j = _as_model_fn(ours), jnp.asarray(scale, jnp.float32)

  def bounded_jax(x, t, y):
    out = net(x, t, y)
    return jnp.concatenate([scale_j[t][:, None, None] * x + 0.1 * out[..., :CH], out[..., CH:]],
                           -1)

  key = jax.random.key(4)
  noises = _sde_noises(key, 4, noise.shape)
  want = loop_ref.p_sample_loop(bounded_np(torch_fn(model.forward)), noise, labels, cfg, noises,
                                forward_with_cfg=bounded_np(torch_fn(model.forward_with_cfg)))
  got = sampling.sample_ddpm(bounded_jax, labels, noise, key, steps=4, cfg_scale=cfg,
                             noise_schedule="linear")
  assert 0.1 < np.abs(want).max() < 50
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
