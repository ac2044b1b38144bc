"""Train-step throughput: ours (the jitted `softvq_jax.train` step) vs the same step, PyTorch eager.

  python benchmarks/train_step.py --config=configs/sq64_256.py:B \
      --config.model.compute_dtype=float32 --config.batch_size=2 --repeats=5
  python benchmarks/train_step.py --config=configs/demo.py --repeats=7 --steps_per_window=5
  python benchmarks/train_step.py --config=configs/sq64_256.py:L \
      --config.model.compute_dtype=bfloat16 --config.batch_size=32   # GPU: MFU vs bf16 peak

  python benchmarks/train_step.py --config=configs/sq64_256.py:B --objective=full \
      --config.model.compute_dtype=float32 --config.batch_size=2 --repeats=3
  python benchmarks/train_step.py --config=configs/demo.py --objective=full --repeats=5 \
      --steps_per_window=3

(BENCHMARKS.md, "Train step" and "Train step, full objective", have the numbers and the exact
commands behind them.)

`--objective=pixel` (the default) times the pixel objective below against PyTorch: the config's
perceptual / REPA / GAN weights are set to 0 whatever it says (the torch side implements
reconstruction + entropy only). `--objective=full` times OUR step only, with the whole objective
of spec.md §5 and then with each network term switched off in turn (see `run_objective`).

Prints ONE JSON line with images/s, step time, achieved GFLOP/s and MFU of
  jax:   `train.build_trainer(config, mesh).p_step` on a 1-device mesh — exactly the program
         `main --mode=train` runs per step: uint8 batch -> [-1, 1], forward, reconstruction +
         entropy loss, backward, global-norm clipping, AdamW(W) with the reference schedule, EMA
         of all parameters, metrics (incl. codebook statistics); the state is donated;
  torch: the same step in PyTorch eager on the official architecture (timm DINOv2 blocks,
         `benchmarks/torch_reference.py`): the same uint8 -> [-1, 1] scaling, the same objective
         (`loss.reconstruction_weight` * MSE + `loss.entropy_weight` * spec.md §1.3 step 7
         entropy loss), `clip_grad_norm_`, torch AdamW (fused CPU/CUDA kernel) with the same
         betas / eps / weight decay / decay grouping (no decay on 1-D parameters) and the same
         per-step learning rate, and an EMA of all parameters (`torch._foreach_lerp_`).
         Under a 16-bit `config.model.compute_dtype` it runs in `torch.autocast`, as the official
         training does.

Why the comparison is honest:
  - both start from the same weights (the torch model's state dict is loaded into ours with the
    strict official-format loader), and the first step of each on the same batch is the parity
    check: in float32 their losses (--parity_rtol) and gradient norms (--grad_norm_rtol) must
    agree before anything is timed; `--check_update` also compares every parameter and EMA after
    that step (the optimizer half). The decoder's unused `patch_embed` (in the official model,
    not in ours) is frozen on the torch side so both optimise and average the same parameters;
  - LayerScale gammas are drawn in [0.1, 0.5] (not DINOv2's 1e-5) so that the check sees the
    attention and MLP branches; this changes no FLOPs;
  - everything is warmed up first (compile time is reported apart, never timed); the frameworks'
    timing windows are interleaved in ABBA order so that load from other processes on a shared
    machine hits both alike; medians are reported and every window is listed;
  - torch uses one intra-op thread per CPU, as XLA:CPU does; on a shared machine run it with
    both --torch_omp_wait_policy=default and =passive and take the better torch number (see the
    flag: spinning OpenMP threads are fastest on a quiet machine and 3-40x slower on a busy one);
    JAX steps are dispatched asynchronously (as in the training loop) and a window ends with
    `jax.block_until_ready`.

FLOPs: XLA's cost analysis of our lowered step (`train.train_step_flops`), used for both
frameworks' achieved GFLOP/s (the same model math). MFU = FLOPs / step time / peak, with the peak
from `--peak_flops`, else `config.peak_flops_per_device`, else the chip table in
softvq_jax/hardware.py (the CPU has no entry: MFU is null there, GFLOP/s is always reported).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import compiled_memory, cpu_model, model_name  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timing windows per framework (interleaved ABBA; "
                                "the median is reported)")
_STEPS = flags.DEFINE_integer("steps_per_window", 1, "train steps in one timing window")
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "untimed steps per framework before timing "
                               "(the first is the parity check)")
_FRAMEWORK = flags.DEFINE_enum("framework", "both", ["both", "jax", "torch"], "what to time (both "
                               "are always built, warmed up and checked against each other)")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "peak FLOP/s of one device for MFU (0: "
                           "config.peak_flops_per_device, else the table in softvq_jax/hardware.py)")
_RTOL = flags.DEFINE_float("parity_rtol", 1e-4, "max relative difference of the first step's "
                           "loss (float32 only; negative: do not check)")
# Looser: torch's clip_grad_norm_ on CPU measured 7e-5 relative below the float64 norm of its own
# SoftVQ-B gradients (ours: 1e-7; the gradients themselves agree to 3e-7 per tensor).
_GN_RTOL = flags.DEFINE_float("grad_norm_rtol", 1e-3, "max relative difference of the first "
                              "step's global gradient norm (float32 only; negative: do not check)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and batch")
_CHECK_UPDATE = flags.DEFINE_bool("check_update", False, "also compare all parameters and EMAs "
                                   "after the first step (host copies of both models)")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: one per CPU, "
                                      "as XLA:CPU uses)")

# torch's OpenMP threads spin while waiting by default (libgomp). Measured here (2 shared cores):
# with the machine quiet that is the fastest setting (demo step 0.15 s vs 0.27 s with passive
# waiting), but whenever another process is busy a spinning thread waits for a descheduled one and
# a step takes 3-40x longer (0.7-7 s). Which one wins depends on the machine's load, so it is a
# flag: compare both on a shared machine, and report the better torch number.
_OMP_WAIT = flags.DEFINE_enum("torch_omp_wait_policy", "default", ["default", "passive", "active"],
                              "OMP_WAIT_POLICY for torch's OpenMP threads (default: leave the "
                              "environment as it is); set before torch is imported")
_OBJECTIVE = flags.DEFINE_enum("objective", "pixel", ["pixel", "full"], "pixel: reconstruction + "
                                "entropy, ours vs PyTorch; full: the whole objective (LPIPS, REPA, "
                                "GAN with LeCam and CR), ours, with each network term switched off "
                                "in turn (--variants)")
_VARIANTS = flags.DEFINE_list("variants", ",".join(("full", "no_gan", "no_repa", "no_perceptual",
                                                    "pixel")),
                              "--objective=full: the objectives to time, of full, no_gan, "
                              "no_repa, no_perceptual, pixel")
_INTERLEAVE = flags.DEFINE_bool("interleave", False, "--objective=full: keep every variant's "
                                "state alive and interleave their timing windows (fairer on a "
                                "noisy machine; memory = all variants at once), else time the "
                                "variants one after the other")
_PAUSE_S = 0.1  # before each window: lets the other framework's spinning worker threads go idle
_FROZEN_TORCH = ("decoder.model.patch_embed.",)  # official-only module, unused by the forward


class TorchTrainStep:
  """One training step of the official model in PyTorch eager, configured like ours.

  `step(images_uint8 [B, S, S, 3])` -> (total loss, pre-clip global gradient norm), both tensors.
  `lr_of(t)` gives the learning rate after t completed steps (our schedule, so both sides use
  identical values). Parameters are in `self.named` (official key names).
  """

  def __init__(self, model, config, lr_of: Callable[[int], float], *, device: str,
               compute_dtype: str):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.model = model.to(device).train()
    self.device = device
    self.lr_of = lr_of
    self.completed = 0
    o, loss = config.optim, config.loss
    on = [w for w in NETWORK_WEIGHTS.values() if loss[w] > 0]
    if on:
      raise ValueError(f"the torch step implements reconstruction + entropy only, but config.loss "
                       f"has {on} > 0: pass variant_config(config, 'pixel')")
    if loss.reconstruction not in ("l2", "l1"):
      raise ValueError(f"unknown reconstruction loss {loss.reconstruction!r}")
    self.rec_kind, self.rec_w, self.ent_w = (loss.reconstruction, float(loss.reconstruction_weight),
                                             float(loss.entropy_weight))
    self.clip = float(o.grad_clip_norm)
    self.ema_decay = float(o.ema_decay)
    self.named = []
    for name, p in self.model.named_parameters():
      if name.startswith(_FROZEN_TORCH):
        p.requires_grad_(False)
      else:
        self.named.append((name, p))
    self.params = [p for _, p in self.named]
    # The reference's grouping (and our optim.decay_mask): decay only on >= 2-D parameters.
    decay = [p for p in self.params if p.ndim >= 2]
    no_decay = [p for p in self.params if p.ndim < 2]
    # The fused kernel is torch's fastest AdamW on CPU and CUDA: the strongest baseline.
    common = dict(lr=lr_of(0), betas=(o.b1, o.b2), eps=o.eps, fused=True)
    if o.name == "adamw":
      self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], **common)
    elif o.name == "adam":
      self.opt = torch.optim.Adam(self.params, weight_decay=0.0, **common)
    else:
      raise ValueError(f"config.optim.name={o.name!r} is not 'adamw' or 'adam'")
    self.ema = [p.detach().clone() for p in self.params]
    self.autocast = (torch.autocast(device, dtype=getattr(torch, compute_dtype))
                     if compute_dtype != "float32" else contextlib.nullcontext())
    self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step(self, images_uint8):
    torch = self.torch
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0  # pixels.to_model_range, NCHW
    x = (x - 0.5) / 0.5
    with self.autocast:
      recon, _, entropy = self.model(x)
    diff = recon.float() - x
    rec = diff.square().mean() if self.rec_kind == "l2" else diff.abs().mean()
    loss = self.rec_w * rec + self.ent_w * entropy.float()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip > 0:
      grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    else:
      grad_norm = torch.linalg.vector_norm(
          torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params]))
    lr = self.lr_of(self.completed)
    for group in self.opt.param_groups:
      group["lr"] = lr
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    self.completed += 1
    return loss.detach(), grad_norm.detach()


NETWORK_WEIGHTS = {"gan": "gan_weight", "repa": "repa_weight", "perceptual": "perceptual_weight"}
VARIANTS = ("full", "no_gan", "no_repa", "no_perceptual", "pixel")


def variant_config(config, variant: str):
  """A copy of `config` with the objective `variant`: "full" (as configured), "no_<term>" (that
  network term's weight set to 0), "pixel" (all three network terms off: reconstruction + entropy,
  what the PyTorch step implements)."""
  import copy  # pylint: disable=import-outside-toplevel
  if variant not in VARIANTS:
    raise ValueError(f"unknown objective variant {variant!r}; use one of {VARIANTS}")
  config = copy.deepcopy(config)
  off = (tuple(NETWORK_WEIGHTS) if variant == "pixel" else
         (variant[3:],) if variant.startswith("no_") else ())
  for term in off:
    config.loss[NETWORK_WEIGHTS[term]] = 0.0
  return config


def build_pair(config, *, seed: int = 0, torch_device: str = "cpu"):
  """Ours and torch's train steps of `config`, starting from the same weights.

  Returns (trainer, jax_state, torch_step, cfg) where
  `trainer.p_step(jax_state, trainer.frozen(), batch)` and
  `torch_step.step(batch)` perform the same update. The model is built from the config's sizes;
  the weights come from the torch reference (LayerScale drawn in [0.1, 0.5]) and are loaded into
  our state with the strict official-format loader, so a mapping error cannot go unnoticed.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import torch_reference  # pylint: disable=import-outside-toplevel
  from softvq_jax import config_lib, optim, sharding, train  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import official, state_dict  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from softvq_jax.models.tokenizer import split_model  # pylint: disable=import-outside-toplevel

  config_lib.validate(config)
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  trainer = train.build_trainer(config, mesh)
  cfg = tokenizer_lib.TokenizerConfig.from_config(config)
  cfg32 = cfg.replace(compute_dtype="float32")  # parameters are float32 whatever the compute

  tmodel = torch_reference.build_torch_tokenizer(cfg32, seed=seed, layer_scale=(0.1, 0.5))
  ours = tokenizer_lib.build_tokenizer(cfg32, seed=seed)
  state_dict.load_state_dict(ours, torch_reference.numpy_state_dict(tmodel),
                             source="torch reference", ignore=official.IGNORED_KEYS)
  _, params = split_model(ours)
  fresh = trainer.init_state()  # optimizer moments are zeros and step 0 whatever the weights
  if jax.tree.structure(params) != jax.tree.structure(fresh.params):
    raise AssertionError("the loaded parameters do not have the trainer's structure")
  params = jax.device_put(params, trainer.state_sharding.params)
  state = fresh.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))

  _, schedule = optim.build_optimizer(config.optim, batch_size=config.batch_size,
                                      total_steps=int(config.num_train_steps))
  lr_cache: dict[int, float] = {}

  def lr_of(t: int) -> float:
    """The very values our step uses (float32), computed 1024 steps at a time so that no JAX
    work happens inside torch's timing windows."""
    if t not in lr_cache:
      ts = np.arange(t, t + 1024, dtype=np.int32)
      lr_cache.update(zip(ts.tolist(), np.asarray(jax.vmap(schedule)(ts), np.float32).tolist()))
    return lr_cache[t]

  tstep = TorchTrainStep(tmodel, config, lr_of, device=torch_device,
                         compute_dtype=cfg.compute_dtype)
  return trainer, state, tstep, cfg


def _timed_windows(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds per step of each window; frameworks interleaved in ABBA order.

  fns: {name: f} where f() runs one whole window (and waits for it), returning its step count.
  """
  names = list(fns)
  out = {n: [] for n in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(_PAUSE_S)
      t0 = time.perf_counter()
      steps = fns[name]()
      out[name].append((time.perf_counter() - t0) / steps)
  return out


def _compare_updates(trainer, state, tstep) -> dict:
  """After one step of each side from the same weights: how far apart are the parameters and EMAs,
  in units of that step's update (Adam's first update is ~lr per element, the EMA's (1-decay) lr)?

  This is what makes the optimizer half of the comparison honest (AdamW, decay mask, clipping,
  schedule, EMA); the loss alone cannot see it. Host copies of every parameter: tests and small
  models (`--check_update`).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert.state_dict import export_state_dict  # pylint: disable=import-outside-toplevel

  lr = tstep.lr_of(0)
  ours = {k: export_state_dict(nnx.merge(trainer.graphdef, jax_tree))
          for k, jax_tree in (("params", _host(state.params)), ("ema", _host(state.ema_params)))}
  theirs = {"params": {n: p.detach().cpu().numpy() for n, p in tstep.named},
            "ema": {n: e.cpu().numpy() for (n, _), e in zip(tstep.named, tstep.ema)}}
  if set(ours["params"]) != set(theirs["params"]):
    raise AssertionError("ours and the torch model optimise different parameter sets: "
                         f"{sorted(set(ours['params']) ^ set(theirs['params']))[:10]}")
  # an EMA moves by (1 - decay) x the parameter's update
  scale = {"params": lr, "ema": (1.0 - tstep.ema_decay) * lr}
  out = {"lr": lr, "ema_decay": tstep.ema_decay}
  for kind in ("params", "ema"):
    worst, worst_key = 0.0, ""
    for k, a in ours[kind].items():
      d = float(np.max(np.abs(a - theirs[kind][k])))
      if d > worst:
        worst, worst_key = d, k
    out[f"{kind}_max_abs_diff"] = worst
    out[f"{kind}_max_abs_diff_over_update"] = worst / scale[kind]
    out[f"{kind}_worst_key"] = worst_key
  return out


def _host(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.device_get(tree)


def _rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def run(config, *, repeats: int = 3, steps_per_window: int = 1, warmup_steps: int = 2,
        framework: str = "both", peak_flops: float = 0.0, parity_rtol: float = 1e-4,
        grad_norm_rtol: float = 1e-3, seed: int = 0, torch_threads: int = 0,
        torch_omp_wait_policy: str = "default", check_update: bool = False,
        config_name: str = "") -> dict:
  """Builds both steps from the same weights, checks their first step agrees, times: JSON dict."""
  if warmup_steps < 1:
    raise ValueError("warmup_steps must be >= 1 (the first step is the parity check)")
  # The torch step implements reconstruction + entropy only: compare that objective, whatever
  # network terms the config switches on (configs/demo.py and the base config turn them all on).
  config = variant_config(config, "pixel")
  # On a GPU both frameworks share the device: JAX must not grab 75% of its memory up front (read
  # when the backend starts, i.e. at the first computation).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if torch_omp_wait_policy != "default":  # before anything loads torch (timm does)
    if "torch" in sys.modules:
      raise RuntimeError("torch_omp_wait_policy must be set before torch is imported")
    os.environ["OMP_WAIT_POLICY"] = torch_omp_wait_policy.upper()
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from softvq_jax import train  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import vit  # pylint: disable=import-outside-toplevel

  backend = jax.default_backend()
  cpus = os.cpu_count() or 1
  torch.set_num_threads(torch_threads or cpus)
  torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  trainer, state, tstep, cfg = build_pair(config, seed=seed, torch_device=torch_device)

  b, s = int(config.batch_size), int(config.image_size)
  batch_np = np.random.RandomState(seed).randint(0, 256, (b, s, s, 3)).astype(np.uint8)
  batch = {"image": jax.device_put(batch_np, trainer.batch_sharding)}
  tbatch = torch.from_numpy(batch_np).to(torch_device)

  abstract_args = trainer.abstract_args(config)
  t0 = time.perf_counter()
  p_step = trainer.p_step.lower(*abstract_args).compile()
  frozen = trainer.frozen()
  compile_s = time.perf_counter() - t0
  flops = train.train_step_flops(trainer.step_fn, *abstract_args)
  peak = float(peak_flops) if peak_flops > 0 else train.peak_flops_per_device(config)

  # --- warm-up; the first step of each side (same weights, same batch) is the parity check ---
  state, m = p_step(state, frozen, batch)
  jax_first = {k: float(m[k]) for k in ("loss/total", "loss/reconstruction", "loss/entropy",
                                         "grad_norm")}
  loss, gn = tstep.step(tbatch)
  tstep.sync()
  torch_first = {"loss/total": float(loss), "grad_norm": float(gn)}
  parity = {
      "jax_loss": jax_first["loss/total"], "torch_loss": torch_first["loss/total"],
      "loss_rel_diff": _rel(jax_first["loss/total"], torch_first["loss/total"]),
      "jax_grad_norm": jax_first["grad_norm"], "torch_grad_norm": torch_first["grad_norm"],
      "grad_norm_rel_diff": _rel(jax_first["grad_norm"], torch_first["grad_norm"]),
      "jax_loss_terms": {k: jax_first[k] for k in ("loss/reconstruction", "loss/entropy")},
      "rtol": parity_rtol, "grad_norm_rtol": grad_norm_rtol,
      "checked": parity_rtol >= 0 and cfg.compute_dtype == "float32",
  }
  if check_update:
    parity["update"] = _compare_updates(trainer, state, tstep)
  if parity["checked"] and not (parity["loss_rel_diff"] <= parity_rtol and (
      grad_norm_rtol < 0 or parity["grad_norm_rel_diff"] <= grad_norm_rtol)):
    raise AssertionError(f"ours and the torch step disagree on the first step: {parity}")
  for _ in range(warmup_steps - 1):
    state, m = p_step(state, frozen, batch)
    jax.block_until_ready((state, m))
    tstep.step(tbatch)
    tstep.sync()

  # --- timing --------------------------------------------------------------------------------
  holder = {"state": state}

  def jax_window():
    st = holder["state"]
    for _ in range(steps_per_window):
      st, m = p_step(st, frozen, batch)  # dispatched asynchronously, as in the training loop
    jax.block_until_ready((st, m))
    holder["state"] = st
    return steps_per_window

  def torch_window():
    for _ in range(steps_per_window):
      tstep.step(tbatch)
    tstep.sync()
    return steps_per_window

  fns = {}
  if framework in ("both", "jax"):
    fns["jax"] = jax_window
  if framework in ("both", "torch"):
    fns["torch"] = torch_window
  load_before = os.getloadavg()[0]
  times = _timed_windows(fns, repeats)

  backend_name = (vit._default_backend(  # pylint: disable=protected-access
                      cfg.dtype, vit.resolve_platform(cfg.platform))
                  if cfg.attention_backend == "auto" else cfg.attention_backend)
  result = {
      "benchmark": "train_step", "objective": "pixel", "config": config_name,
      "model": model_name(config), "image_size": s, "num_latent_tokens": cfg.num_latent_tokens, "batch_size": b,
      "compute_dtype": cfg.compute_dtype, "attention_backend": backend_name,
      "remat": bool(cfg.remat), "optimizer": config.optim.name,
      "device": {"jax": f"{backend}:{jax.devices()[0].device_kind}", "torch": torch_device,
                 "cpu": cpu_model(), "cpus": cpus},
      "threads": {"torch": torch.get_num_threads(), "xla_cpu": cpus,
                  "torch_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "optax": optax.__version__,
                   "torch": torch.__version__, "timm": timm.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_compile_s": round(compile_s, 2),
      "jax_memory_analysis": compiled_memory(p_step),
      "step_gflop": None if flops is None else round(flops / 1e9, 3),
      "peak_flops_per_device": peak,
      "parity_first_step": parity,
      "repeats": repeats, "steps_per_window": steps_per_window, "warmup_steps": warmup_steps,
  }
  for fw, t in times.items():
    med = statistics.median(t)
    best = min(t)  # load from other processes only slows a window down
    r = {"images_per_s": round(b / med, 4), "step_time_s": round(med, 5),
         "images_per_s_best": round(b / best, 4), "step_time_s_windows": [round(v, 5) for v in t]}
    if flops:
      r["gflop_per_s"] = round(flops / med / 1e9, 3)
      if peak:
        r["mfu"] = round(flops / med / peak, 5)
    result[fw] = r
  result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
  if "jax" in result and "torch" in result:
    result["ratio_jax_over_torch"] = round(result["jax"]["images_per_s"]
                                           / result["torch"]["images_per_s"], 3)
    result["ratio_jax_over_torch_best"] = round(result["jax"]["images_per_s_best"]
                                                / result["torch"]["images_per_s_best"], 3)
  return result


def run_objective(config, *, variants=VARIANTS, repeats: int = 3, steps_per_window: int = 1,
                  warmup_steps: int = 2, peak_flops: float = 0.0, seed: int = 0,
                  interleave: bool = False, config_name: str = "") -> dict:
  """Our train step with the full objective and with each network term switched off: JSON dict.

  Every variant is `train.build_trainer(variant_config(config, v), mesh).p_step` on a 1-device
  mesh, from a fresh state (random tokenizer; the frozen LPIPS-VGG, DINO backbone and REPA teacher
  randomly initialised: `config.pretrained.allow_random_init`, speed does not depend on weights).
  `loss.disc_start` is set to 0 so that the timed steps are the ones after the discriminator
  starts (the generator's adversarial term and the discriminator update + LeCam + CR are computed
  in every step either way, masked before `disc_start`; this only makes the loss values real).
  The cost of a term = the full step's median time - that of the variant without it.
  """
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from softvq_jax import config_lib, sharding, train  # pylint: disable=import-outside-toplevel
  from softvq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=import-outside-toplevel

  if warmup_steps < 1:
    raise ValueError("warmup_steps must be >= 1")
  variants = tuple(variants)
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown --variants entry {v!r}; use some of {VARIANTS}")
  base = variant_config(config, "full")
  base.pretrained.allow_random_init = True
  base.loss.disc_start = 0
  b, s = int(base.batch_size), int(base.image_size)
  batch_np = np.random.RandomState(seed).randint(0, 256, (b, s, s, 3)).astype(np.uint8)
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  cfg = TokenizerConfig.from_config(base)
  peak = (float(peak_flops) if peak_flops > 0 else train.peak_flops_per_device(base))

  def build(v: str) -> dict:
    vc = variant_config(base, v)
    config_lib.validate(vc)
    t0 = time.perf_counter()
    trainer = train.build_trainer(vc, mesh)
    state = trainer.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    abstract_args = trainer.abstract_args(vc)
    t0 = time.perf_counter()
    p_step = trainer.p_step.lower(*abstract_args).compile()
    frozen = trainer.frozen()
    compile_s = time.perf_counter() - t0
    flops = train.train_step_flops(trainer.step_fn, *abstract_args)
    batch = {"image": jax.device_put(batch_np, trainer.batch_sharding)}
    first = None
    for _ in range(warmup_steps):
      state, m = p_step(state, frozen, batch)
      jax.block_until_ready((state, m))
      first = first or {k: float(v_) for k, v_ in m.items()
                        if k.startswith(("loss/", "disc/")) and np.ndim(v_) == 0}
    obj = trainer.objective
    return {"p_step": p_step, "frozen": frozen, "state": state, "batch": batch, "flops": flops,
            "compile_s": compile_s, "init_s": init_s, "first_metrics": first,
            "memory_analysis": compiled_memory(p_step),
            "terms": {"perceptual": obj.perceptual, "repa": obj.repa, "gan": obj.gan},
            "weights": {k: float(vc.loss[w]) for k, w in NETWORK_WEIGHTS.items()}}

  def window(run_: dict) -> int:
    st = run_["state"]
    for _ in range(steps_per_window):
      st, m = run_["p_step"](st, run_["frozen"], run_["batch"])
    jax.block_until_ready((st, m))
    run_["state"] = st
    return steps_per_window

  times: dict[str, list[float]] = {}
  loads: dict[str, list[float]] = {}
  built: dict[str, dict] = {}
  if interleave:
    for v in variants:
      built[v] = build(v)
    loads = {v: [round(os.getloadavg()[0], 2)] for v in variants}
    times = _timed_windows({v: (lambda r=built[v]: window(r)) for v in variants}, repeats)
    for v in variants:
      loads[v].append(round(os.getloadavg()[0], 2))
  else:
    for v in variants:
      built[v] = build(v)
      loads[v] = [round(os.getloadavg()[0], 2)]
      times[v] = _timed_windows({v: lambda r=built[v]: window(r)}, repeats)[v]
      loads[v].append(round(os.getloadavg()[0], 2))
      built[v].pop("state")  # free this variant's state before the next one is built
      built[v].pop("p_step")
      built[v].pop("frozen")

  out_variants = {}
  for v in variants:
    r, t = built[v], times[v]
    med = statistics.median(t)
    row = {"images_per_s": round(b / med, 4), "step_time_s": round(med, 5),
           "images_per_s_best": round(b / min(t), 4),
           "step_time_s_windows": [round(x, 5) for x in t],
           "compile_s": round(r["compile_s"], 2), "init_s": round(r["init_s"], 2),
           "step_gflop": None if r["flops"] is None else round(r["flops"] / 1e9, 3),
           "memory_analysis": r["memory_analysis"],
           "terms": r["terms"], "weights": r["weights"], "loadavg_1m": loads[v],
           "first_step_metrics": r["first_metrics"]}
    if r["flops"]:
      row["gflop_per_s"] = round(r["flops"] / med / 1e9, 3)
      if peak:
        row["mfu"] = round(r["flops"] / med / peak, 5)
    out_variants[v] = row
  result = {
      "benchmark": "train_step", "objective": "full", "config": config_name,
      "model": model_name(base), "image_size": s, "num_latent_tokens": cfg.num_latent_tokens,
      "batch_size": b, "compute_dtype": cfg.compute_dtype, "remat": bool(cfg.remat),
      "networks": {"lpips": "VGG16 (random)",
                   "disc": {"backbone_size": base.disc.backbone_size,
                            "img_size": base.disc.img_size, "patch_size": base.disc.patch_size,
                            "readout_blocks": list(base.disc.readout_blocks)},
                   "repa_teacher": {"size": base.repa.teacher_size,
                                    "patch_size": base.repa.patch_size,
                                    "depth": int(base.repa.teacher_depth) or None,
                                    "hidden_dim": base.repa.hidden_dim},
                   "cr_weight": float(base.loss.cr_weight),
                   "lecam_weight": float(base.loss.lecam_weight),
                   "adaptive_weight": bool(base.loss.adaptive_weight),
                   "disc_start": int(base.loss.disc_start)},
      "device": {"jax": f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
                 "cpu": cpu_model(), "cpus": os.cpu_count()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "optax": optax.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "peak_flops_per_device": peak, "interleaved": bool(interleave),
      "repeats": repeats, "steps_per_window": steps_per_window, "warmup_steps": warmup_steps,
      "variants": out_variants,
      "torch": "not implemented for the full objective (ours only)",
  }
  if "full" in out_variants:
    full_t = out_variants["full"]["step_time_s"]
    cost = {}
    for v in variants:
      if v != "full":
        key = "network_terms" if v == "pixel" else v[3:]
        cost[key] = {"seconds": round(full_t - out_variants[v]["step_time_s"], 5),
                     "share_of_full": round(1 - out_variants[v]["step_time_s"] / full_t, 4)}
    result["cost_of_term"] = cost
    if "pixel" in out_variants:
      result["full_over_pixel_step_time"] = round(full_t / out_variants["pixel"]["step_time_s"], 4)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/sq64_256.py:B")
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  if _OBJECTIVE.value == "full":
    if _FRAMEWORK.value == "torch":
      raise app.UsageError("--objective=full times ours only: use --framework=jax (or both)")
    result = run_objective(_CONFIG.value, variants=_VARIANTS.value, repeats=_REPEATS.value,
                           steps_per_window=_STEPS.value, warmup_steps=_WARMUP.value,
                           peak_flops=_PEAK.value, seed=_SEED.value,
                           interleave=_INTERLEAVE.value, config_name=name)
    print(json.dumps(result), flush=True)
    return
  result = run(_CONFIG.value, repeats=_REPEATS.value, steps_per_window=_STEPS.value,
               warmup_steps=_WARMUP.value, framework=_FRAMEWORK.value, peak_flops=_PEAK.value,
               parity_rtol=_RTOL.value, grad_norm_rtol=_GN_RTOL.value, seed=_SEED.value,
               torch_threads=_TORCH_THREADS.value, torch_omp_wait_policy=_OMP_WAIT.value,
               check_update=_CHECK_UPDATE.value, config_name=name)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
