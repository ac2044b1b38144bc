"""Samplers of the token generators (spec.md §8.3, 8.4): pure, jittable functions over a model function.

Everything here works on a `model_fn(x, t, y) -> out` and plain arrays, so it composes with any
network (our SiT/DiT, a test's analytic velocity field) and with `jax.jit` + shardings chosen by the
caller (`Generator.sample`, `softvq_jax/generate.py`). No state is held between calls.

* **Flow-matching paths** (spec.md §8.2) — `path_coefficients`, `interpolant`, `sample_train_time`:
  x_t = alpha_t x + sigma_t eps with t = 1 pure noise; the velocity target
  v = alpha'_t x + sigma'_t eps. These are the single definition of the paths: the generator's
  training objective (issue 19) uses them, and the samplers below derive their score from them.
* **ODE / SDE samplers** — `sample_flow(model_fn, labels, noise, key, mode="sde"|"ode", ...)`:
  Euler (optional Heun, no correction on the last step) on linspace(1, 0, steps + 1); Euler-
  Maruyama on the reference's grid linspace(1, 0.04, steps) then 0, diffusion g = 2t, the score
  from the velocity, and a deterministic last interval.
* **Classifier-free guidance with an interval** — `guided_output`: where scale > 1 and
  low <= t <= high, one doubled batch (labels y, then the null class 1000) and
  out = out_u + scale (out_c - out_u); elsewhere the conditional pass alone.
* **DiT's Gaussian diffusion** — `diffusion_schedule` (1000 steps, linear / cosine beta, respaced
  to K steps exactly as the reference's `space_timesteps`), `p_mean_variance` (epsilon
  prediction, learned-range variance) and `sample_ddpm` (the p_sample loop with CFG on the eps
  channels).

Numerics. The reference runs the sampler state in float64; here the state x is float32 (what
accelerators run fast; measured against a float64 transcription in tests/test_sampling.py: ODE
Heun + CFG trajectories agree to ~1e-6). Everything that depends only on time — the grids, step
sizes, score coefficients, beta / alpha-bar tables, which steps are guided — is computed on the
host in float64 (NumPy) and enters the program as float32 tables, so only the x-dependent
arithmetic runs in float32. The model always receives t as float32 (SiT) or int32 timesteps (DiT),
as the reference casts them.

One compiled program. Each sampler is a single `lax.fori_loop` over model evaluations with ONE call
site of the model: Heun's predictor and corrector are alternate iterations of the same loop (the
corrector's input and time are selected with `jnp.where` from per-evaluation tables), and the SDE's
deterministic last interval is the same update with its noise scale 0. The model is therefore
traced once (twice where guidance is on for only part of the grid, see `guided_output`), which keeps
compilation of an XL network to one copy.

Randomness. `key` is either one PRNG key for the batch or a batch of keys, one per sample
(`jax.random.split(key, B)` or `fold_in` per image index): with per-sample keys a sample's result
does not depend on the batch it was drawn in, which is how `--mode=sample` makes its chunks
resumable and independent of the device count. Step i draws `step_noise(key, i, shape)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NULL_CLASS = 1000
"""The label of the unconditional pass (row 1000 of the generators' label table)."""

PATHS = ("linear", "cosine")
FLOW_MODES = ("sde", "ode")
BETA_SCHEDULES = ("linear", "cosine")

SDE_LAST_TIME = 0.04
"""The reference's Euler-Maruyama grid ends its stochastic part here; 0.04 -> 0 is deterministic."""

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ------------------------------------------------------------------------------------------------
# Flow-matching paths (spec.md §8.2). Shared with the generator's training objective.
# ------------------------------------------------------------------------------------------------


def _check_path(path: str) -> None:
  if path not in PATHS:
    raise ValueError(f"path={path!r} is not one of {PATHS}")


def path_coefficients(t, path: str = "linear", xp=jnp):
  """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) of x_t = alpha_t x + sigma_t eps.

  t = 0 is data, t = 1 pure noise. linear: alpha = 1 - t, sigma = t. cosine: alpha = cos(pi t / 2),
  sigma = sin(pi t / 2). `t` broadcasts (reshape it to [B, 1, 1] against x); `xp` = jnp or np
  (the samplers evaluate their time tables with NumPy in float64).
  """
  _check_path(path)
  if path == "linear":
    one = xp.ones_like(t)
    return 1 - t, t, -one, one
  half_pi = math.pi / 2
  return (xp.cos(half_pi * t), xp.sin(half_pi * t), -half_pi * xp.sin(half_pi * t),
          half_pi * xp.cos(half_pi * t))


def _expand_like(t, x):
  """[B] -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolant(x, noise, t, path: str = "linear"):
  """(x_t, v_target) for training: x [B, ...] data (normalised latents), noise ~ N(0, I) like x,
  t [B] in [0, 1]. x_t = alpha_t x + sigma_t noise; v = alpha'_t x + sigma'_t noise (spec.md §8.2)."""
  a, s, da, ds = path_coefficients(_expand_like(t, x), path)
  return a * x + s * noise, da * x + ds * noise


def sample_train_time(key, shape, *, kind: str = "uniform", path: str = "linear"):
  """Training times t in [0, 1] (spec.md §8.2). "uniform": U(0, 1). "lognormal" (the published
  command): n ~ N(0, 1), s = e^n, t = s / (1 + s) on the linear path, (2 / pi) atan(s) on the
  cosine path."""
  _check_path(path)
  if kind == "uniform":
    return jax.random.uniform(key, shape, jnp.float32)
  if kind == "lognormal":
    s = jnp.exp(jax.random.normal(key, shape, jnp.float32))
    return s / (1 + s) if path == "linear" else (2 / math.pi) * jnp.arctan(s)
  raise ValueError(f"time sampling kind={kind!r} is not 'uniform' or 'lognormal'")


def score_coefficients(t, path: str = "linear", xp=np):
  """(c_v, c_x) with score = c_v * v + c_x * x, from the velocity v at x_t (the reference's
  get_score_from_velocity): a = alpha / alpha', var = sigma^2 - a sigma' sigma, score =
  (a v - x) / var. Linear: a = -(1 - t), var = t; cosine: a = -(2/pi) cot(pi t / 2), var = 1.
  Undefined at t = 0 for both paths (the SDE grid stops at 0.04)."""
  a_t, s_t, da_t, ds_t = path_coefficients(t, path, xp)
  a = a_t / da_t
  var = s_t ** 2 - a * ds_t * s_t
  return a / var, -1 / var


def score_from_velocity(v, x, t, path: str = "linear"):
  """The score grad log p_t(x) implied by the velocity v at (x, t) (t [B]; jnp, any float)."""
  c_v, c_x = score_coefficients(_expand_like(t, x), path, jnp)
  return c_v * v + c_x * x


def sde_drift(v, x, t, path: str = "linear"):
  """Euler-Maruyama drift d = v - g/2 * score with the reference's diffusion g = 2t."""
  return v - 0.5 * (2 * _expand_like(t, x)) * score_from_velocity(v, x, t, path)


# ------------------------------------------------------------------------------------------------
# Time grids (float64, host) and guidance.
# ------------------------------------------------------------------------------------------------


def ode_time_grid(steps: int) -> np.ndarray:
  """[steps + 1] float64: linspace(1, 0, steps + 1) (the reference's euler_sampler)."""
  return np.linspace(1.0, 0.0, steps + 1, dtype=np.float64)


def sde_time_grid(steps: int) -> np.ndarray:
  """[steps + 1] float64: linspace(1, 0.04, steps) then 0 (the reference's Euler-Maruyama)."""
  return np.concatenate([np.linspace(1.0, SDE_LAST_TIME, steps, dtype=np.float64), [0.0]])


def guidance_mask(times, cfg_scale: float, guidance_interval: Sequence[float]) -> np.ndarray:
  """Which times are guided: cfg_scale > 1 and low <= t <= high (compared in float64, as the
  reference compares its float64 grid)."""
  low, high = (float(v) for v in guidance_interval)
  times = np.asarray(times, np.float64)
  return (float(cfg_scale) > 1.0) & (times >= low) & (times <= high)


def _check_guidance(cfg_scale: float, guidance_interval) -> tuple[float, float]:
  if not cfg_scale >= 1.0:
    raise ValueError(f"cfg_scale={cfg_scale} must be >= 1 (1 = no guidance); for unconditional "
                     f"samples pass the null class {NULL_CLASS} as the labels")
  try:
    low, high = (float(v) for v in guidance_interval)
  except (TypeError, ValueError):
    raise ValueError(
        f"guidance_interval={guidance_interval!r} must be a pair (low, high)") from None
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"guidance_interval=({low}, {high}) must satisfy 0 <= low <= high <= 1")
  return low, high


def guided_output(model_fn: ModelFn, x, t, y, cfg_scale: float, guided, *,
                  guide_channels: int | None = None):
  """The model output with classifier-free guidance where `guided`, else the conditional pass.

  x [B, ...], t [B] (float32 or int32), y [B] int. `guided` is a Python bool (decided at trace
  time) or a traced scalar bool. Guided: ONE doubled batch, x twice with labels (y, 1000), and
  out = out_u + cfg_scale (out_c - out_u) on the first `guide_channels` channels (all when None;
  DiT guides its eps channels and keeps the conditional pass's variance channels).

  Cost trade-off of a traced `guided` (a guidance interval that covers part of the grid):
  `lax.cond` runs only the branch taken — the doubled batch inside the interval, the single batch
  outside, as the reference does — at the price of compiling the model twice (one copy per
  branch). The alternative `jnp.where` over an always-doubled batch compiles once but pays the
  doubled batch on every step (2x the network FLOPs outside the interval; for the published
  interval [0, 0.7] that is 30% of the steps at twice the cost). Sampling runs far longer than it
  compiles, so the cond is used; when the interval covers all steps or none, the caller passes a
  Python bool and only one branch exists. Under `vmap` a cond becomes a select and runs both.
  """
  def conditional(x):
    return model_fn(x, t, y)

  def doubled(x):
    null = jnp.full_like(y, NULL_CLASS)
    out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0),
                   jnp.concatenate([y, null], 0))
    cond, uncond = jnp.split(out, 2, axis=0)
    c = cond.shape[-1] if guide_channels is None else guide_channels
    mixed = uncond[..., :c] + cfg_scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([mixed, cond[..., c:]], -1) if c < cond.shape[-1] else mixed

  if isinstance(guided, (bool, np.bool_)):
    return doubled(x) if guided else conditional(x)
  return jax.lax.cond(guided, doubled, conditional, x)


def _static_or_traced(mask: np.ndarray, index):
  """A Python bool when the mask is constant (one branch compiled), else mask[index] traced."""
  if mask.all():
    return True
  if not mask.any():
    return False
  return jnp.asarray(mask)[index]


# ------------------------------------------------------------------------------------------------
# Noise.
# ------------------------------------------------------------------------------------------------


def _is_key_batch(key) -> bool:
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2  # raw uint32 keys [B, 2]


def step_noise(key, step, shape, dtype=jnp.float32):
  """N(0, I) of `shape` [B, ...] for sampler step `step` (an int or a traced int).

  One key: normal(fold_in(key, step), shape). A batch of B keys: sample b draws
  normal(fold_in(key[b], step), shape[1:]), so it does not depend on the other samples.
  """
  if _is_key_batch(key):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape[1:], dtype))(key)
  return jax.random.normal(jax.random.fold_in(key, step), shape, dtype)


def initial_noise(key, shape, dtype=jnp.float32):
  """The starting noise x_1 ~ N(0, I) [B, ...]: one key, or one key per sample (as step_noise)."""
  if _is_key_batch(key):
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
  return jax.random.normal(key, shape, dtype)


# ------------------------------------------------------------------------------------------------
# Flow samplers (SiT).
# ------------------------------------------------------------------------------------------------


def _velocity(out, x):
  """The velocity part of a SiT output: all of it, or the first half of the channels of a
  learn_sigma network (whose second half is unused by flow matching)."""
  c = x.shape[-1]
  if out.shape == x.shape:
    return out
  if out.shape[:-1] == x.shape[:-1] and out.shape[-1] == 2 * c:
    return out[..., :c]
  raise ValueError(f"the model returned {out.shape} for x {x.shape}; a velocity model returns x's "
                   "shape (or twice its channels with learn_sigma)")


@dataclasses.dataclass(frozen=True)
class _Evaluation:
  """Per-model-evaluation tables of a flow sampler (host float64, entered as float32)."""
  step: np.ndarray        # [E] int: the grid interval the evaluation belongs to
  corrector: np.ndarray   # [E] bool: Heun's second evaluation (at t_next, from the Euler guess)
  finishes: np.ndarray    # [E] bool: the step's last evaluation (x moves to the next grid point)
  time: np.ndarray        # [E] float64: the time fed to the model


def _ode_evaluations(grid: np.ndarray, heun: bool) -> _Evaluation:
  steps = len(grid) - 1
  step, corr, fin, time = [], [], [], []
  for i in range(steps):
    has_corrector = heun and i < steps - 1
    step.append(i), corr.append(False), fin.append(not has_corrector), time.append(grid[i])
    if has_corrector:
      step.append(i), corr.append(True), fin.append(True), time.append(grid[i + 1])
  return _Evaluation(np.array(step), np.array(corr), np.array(fin), np.array(time))


def _f32(a) -> jax.Array:
  return jnp.asarray(np.asarray(a, np.float64).astype(np.float32))


def sample_ode(model_fn: ModelFn, labels, noise, *, steps: int, heun: bool = False,
               cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0)):
  """Euler (optionally Heun) ODE from t = 1 (noise [B, ...]) to t = 0; spec.md §8.3.

  On linspace(1, 0, steps + 1): x += (t_next - t) d with d the (guided) velocity at (x, t). Heun
  (except on the last step): d' at (x + dt d, t_next), x += dt (d + d') / 2. As in the reference,
  whether the corrector's evaluation is guided is decided by the step's t, not t_next.
  """
  grid = ode_time_grid(steps)
  ev = _ode_evaluations(grid, heun)
  dt = np.diff(grid)
  mask = guidance_mask(grid[:-1], cfg_scale, guidance_interval)[ev.step]
  e_corr, e_fin = jnp.asarray(ev.corrector), jnp.asarray(ev.finishes)
  e_time, e_dt = _f32(ev.time), _f32(dt[ev.step])
  x0 = jnp.asarray(noise, jnp.float32)
  batch = x0.shape[0]

  def body(e, carry):
    x, x_guess, d_first = carry
    corr = e_corr[e]
    x_in = jnp.where(corr, x_guess, x)
    t = jnp.full((batch,), e_time[e], jnp.float32)
    d = _velocity(guided_output(model_fn, x_in, t, labels, cfg_scale,
                                _static_or_traced(mask, e)), x_in).astype(jnp.float32)
    dt_e = e_dt[e]
    euler = x + dt_e * d
    heun_x = x + dt_e * (0.5 * d_first + 0.5 * d)
    x_end = jnp.where(corr, heun_x, euler)
    x_new = jnp.where(e_fin[e], x_end, x)
    x_guess = jnp.where(corr, x_guess, euler)
    d_first = jnp.where(corr, d_first, d)
    return x_new, x_guess, d_first

  x, _, _ = jax.lax.fori_loop(0, len(ev.step), body, (x0, x0, jnp.zeros_like(x0)))
  return x


def sample_sde(model_fn: ModelFn, labels, noise, key, *, steps: int, cfg_scale: float = 1.0,
               guidance_interval=(0.0, 1.0), path: str = "linear"):
  """Euler-Maruyama from t = 1 to 0 on linspace(1, 0.04, steps) then 0; spec.md §8.3.

  Interval i: g = 2 t_i, score s = c_v v + c_x x (score_coefficients), drift d = v - g s / 2 with
  v the guided velocity, x += d dt + sqrt(g) sqrt(|dt|) eps_i; the last interval (0.04 -> 0) is
  x += d dt. The reference applies CFG to the drift of each half; the drift is affine in v with
  the same x and t for both halves, so guiding v first is the same quantity (tests compare both).
  """
  _check_path(path)
  grid = sde_time_grid(steps)
  t_cur, dt = grid[:-1], np.diff(grid)
  g = 2.0 * t_cur
  c_v, c_x = score_coefficients(t_cur, path)
  noise_scale = np.sqrt(g) * np.sqrt(np.abs(dt))
  noise_scale[-1] = 0.0  # the deterministic last interval
  mask = guidance_mask(t_cur, cfg_scale, guidance_interval)
  tabs = {k: _f32(v) for k, v in dict(t=t_cur, dt=dt, g=g, c_v=c_v, c_x=c_x,
                                      noise_scale=noise_scale).items()}
  x0 = jnp.asarray(noise, jnp.float32)
  batch = x0.shape[0]

  def body(i, x):
    t = jnp.full((batch,), tabs["t"][i], jnp.float32)
    v = _velocity(guided_output(model_fn, x, t, labels, cfg_scale, _static_or_traced(mask, i)),
                  x).astype(jnp.float32)
    score = tabs["c_v"][i] * v + tabs["c_x"][i] * x
    drift = v - 0.5 * tabs["g"][i] * score
    eps = step_noise(key, i, x.shape)
    return x + drift * tabs["dt"][i] + tabs["noise_scale"][i] * eps

  return jax.lax.fori_loop(0, steps, body, x0)


def sample_flow(model_fn: ModelFn, labels, noise, key=None, *, mode: str = "sde",
                steps: int = 250, heun: bool = False, cfg_scale: float = 1.0,
                guidance_interval=(0.0, 1.0), path: str = "linear"):
  """Samples of a flow-matching (SiT) model: the entry point `Generator.sample` calls.

  model_fn(x, t, y) -> velocity (x's shape): x [B, N, e] or [B, H, W, C], t [B] float32 in
  [0, 1], y [B] int32 (1000 = null class). labels [B] int; noise [B, ...] the initial x at t = 1;
  key: one PRNG key or one per sample (SDE only; ignored by the ODE). Returns x at t = 0 [B, ...]
  float32 (normalised latents). mode "sde" (Euler-Maruyama; `path` sets its score) or "ode"
  (Euler, `heun` adds the correction). Jittable with all keyword options static.
  """
  if mode not in FLOW_MODES:
    raise ValueError(f"mode={mode!r} is not one of {FLOW_MODES}")
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps={steps} must be a positive integer")
  _check_path(path)
  _check_guidance(cfg_scale, guidance_interval)
  labels = jnp.asarray(labels, jnp.int32)
  noise = jnp.asarray(noise, jnp.float32)
  if labels.shape != noise.shape[:1]:
    raise ValueError(f"labels {labels.shape} must be [B] for noise {noise.shape}")
  if mode == "ode":
    # path does not enter the ODE: the network's velocity defines it (as in the reference).
    return sample_ode(model_fn, labels, noise, steps=int(steps), heun=bool(heun),
                      cfg_scale=float(cfg_scale), guidance_interval=guidance_interval)
  if heun:
    raise ValueError("heun=True applies to mode='ode' only (the SDE sampler has no correction)")
  if key is None:
    raise ValueError("mode='sde' needs a PRNG key (e.g. jax.random.key(seed))")
  return sample_sde(model_fn, labels, noise, key, steps=int(steps), cfg_scale=float(cfg_scale),
                    guidance_interval=guidance_interval, path=path)


# ------------------------------------------------------------------------------------------------
# Gaussian diffusion (DiT, spec.md §8.4).
# ------------------------------------------------------------------------------------------------


def beta_schedule(name: str, num_steps: int = 1000) -> np.ndarray:
  """[num_steps] float64 betas. "linear": linspace(1e-4, 0.02) scaled by 1000 / num_steps (Ho et
  al.); "cosine": 1 - abar(t+1/T) / abar(t) with abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2,
  capped at 0.999 (Nichol & Dhariwal)."""
  if name == "linear":
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  if name == "cosine":
    def abar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                     for i in range(num_steps)], np.float64)
  raise ValueError(f"beta schedule {name!r} is not one of {BETA_SCHEDULES}")


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
  """The kept timesteps (sorted) of a process respaced to `section_counts` steps.

  section_counts: an int K, or a list / comma-separated string of counts, one per equal section of
  the original steps; each section of `size` steps keeps `count` steps at fractional stride
  (size - 1) / (count - 1), rounded with Python's round (half to even), as the reference does.
  """
  if isinstance(section_counts, str):
    section_counts = [int(c) for c in section_counts.split(",")]
  elif isinstance(section_counts, (int, np.integer)):
    section_counts = [int(section_counts)]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count or count < 1:
      raise ValueError(f"cannot divide a section of {size} diffusion steps into {count} steps")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):  # accumulated, not j * stride: the same float rounding as the reference
      kept.append(start + round(position))
      position += stride
    start += size
  return sorted(set(kept))


@dataclasses.dataclass(frozen=True)
class DiffusionSchedule:
  """Constants of a (respaced) Gaussian diffusion, float64 NumPy [K] arrays, index 0 = least noise.

  timesteps[k] is the original timestep (0..T-1) the model sees at respaced step k.
  """
  betas: np.ndarray
  timesteps: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @classmethod
  def from_betas(cls, betas, timesteps=None) -> "DiffusionSchedule":
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must be a 1-D array in (0, 1]")
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # log clipped: the posterior variance is 0 at the first step; the reference repeats step 1's.
    post_log = (np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1
                else np.log(np.maximum(post_var, 1e-20)))
    return cls(
        betas=betas,
        timesteps=np.arange(len(betas)) if timesteps is None else np.asarray(timesteps),
        alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, posterior_variance=post_var,
        posterior_log_variance_clipped=post_log,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1))


def diffusion_schedule(steps: int | Sequence[int] | str | None = None, *,
                       noise_schedule: str = "linear",
                       diffusion_steps: int = 1000) -> DiffusionSchedule:
  """The diffusion DiT samples with: `diffusion_steps` betas of `noise_schedule`, respaced to
  `steps` (None = all). Respacing keeps the original alpha-bar at the kept timesteps: the new
  betas are 1 - abar_k / abar_prev_kept (the reference's SpacedDiffusion)."""
  base = DiffusionSchedule.from_betas(beta_schedule(noise_schedule, diffusion_steps))
  if steps is None:
    return base
  kept = space_timesteps(diffusion_steps, steps)
  prev, betas = 1.0, []
  for k in kept:
    betas.append(1.0 - base.alphas_cumprod[k] / prev)
    prev = base.alphas_cumprod[k]
  return DiffusionSchedule.from_betas(np.array(betas), timesteps=np.array(kept))


def p_mean_variance(schedule: DiffusionSchedule, model_out, x, k, *, learn_sigma: bool = True):
  """(mean, log_variance, pred_x0) of p(x_{k-1} | x_k) at respaced step k (int or traced int).

  model_out [B, ..., 2C] with learn_sigma (first C channels eps, last C the variance
  interpolation v in [-1, 1]: log var = (v+1)/2 log beta_k + (1 - (v+1)/2) log posterior var_k,
  "learned range"), else [B, ..., C] eps with the fixed-large variance (posterior var at k=0,
  beta elsewhere). x_0 is not clipped (the reference samples with clip_denoised=False).
  """
  c = x.shape[-1]

  def tab(a):
    return _f32(a)[k]

  if learn_sigma:
    if model_out.shape[-1] != 2 * c:
      raise ValueError(f"learn_sigma: the model output {model_out.shape} must have twice the "
                       f"channels of x {x.shape}")
    eps, var_values = model_out[..., :c], model_out[..., c:]
    frac = (var_values + 1) / 2
    log_var = (frac * tab(np.log(schedule.betas))
               + (1 - frac) * tab(schedule.posterior_log_variance_clipped))
  else:
    if model_out.shape != x.shape:
      raise ValueError(f"the model output {model_out.shape} must be x's shape {x.shape} without "
                       "learn_sigma")
    eps = model_out
    fixed = np.append(schedule.posterior_variance[1], schedule.betas[1:])
    log_var = jnp.broadcast_to(tab(np.log(fixed)), x.shape)
  pred_x0 = tab(schedule.sqrt_recip_alphas_cumprod) * x - tab(
      schedule.sqrt_recipm1_alphas_cumprod) * eps
  mean = tab(schedule.posterior_mean_coef1) * pred_x0 + tab(schedule.posterior_mean_coef2) * x
  return mean, log_var, pred_x0


def sample_ddpm(model_fn: ModelFn, labels, noise, key, *, steps: int = 250,
                cfg_scale: float = 1.0, noise_schedule: str = "linear",
                diffusion_steps: int = 1000, learn_sigma: bool = True,
                guidance_interval=(0.0, 1.0)):
  """Ancestral DDPM sampling of a DiT (spec.md §8.4): the entry point `Generator.sample` calls for DiT.

  model_fn(x, t, y) -> [B, ..., 2C] (learn_sigma) or [B, ..., C]; t int32 original timesteps
  0..T-1. From x_K = noise, for respaced k = K-1 .. 0: model at timestep timesteps[k], CFG on the
  eps channels (doubled batch, labels y and 1000; the variance channels of the conditional pass),
  x = mean + [k > 0] exp(log_var / 2) z_k. guidance_interval is in units of t = timestep / T
  (the reference guides every step: (0, 1)). Returns x_0 [B, ...] float32.
  """
  _check_guidance(cfg_scale, guidance_interval)
  schedule = diffusion_schedule(steps, noise_schedule=noise_schedule,
                                diffusion_steps=diffusion_steps)
  labels = jnp.asarray(labels, jnp.int32)
  x0 = jnp.asarray(noise, jnp.float32)
  if labels.shape != x0.shape[:1]:
    raise ValueError(f"labels {labels.shape} must be [B] for noise {x0.shape}")
  batch, num = x0.shape[0], schedule.num_steps
  mask = guidance_mask(schedule.timesteps / diffusion_steps, cfg_scale, guidance_interval)
  timesteps = jnp.asarray(schedule.timesteps, jnp.int32)
  channels = x0.shape[-1]

  def body(j, x):
    k = num - 1 - j
    t = jnp.full((batch,), timesteps[k], jnp.int32)
    out = guided_output(model_fn, x, t, labels, cfg_scale, _static_or_traced(mask, k),
                        guide_channels=channels).astype(jnp.float32)
    mean, log_var, _ = p_mean_variance(schedule, out, x, k, learn_sigma=learn_sigma)
    z = step_noise(key, j, x.shape)
    return mean + jnp.where(k > 0, 1.0, 0.0) * jnp.exp(0.5 * log_var) * z

  return jax.lax.fori_loop(0, num, body, x0)
