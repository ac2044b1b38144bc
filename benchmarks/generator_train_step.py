"""Generator train-step throughput: SiT/1 on SoftVQ tokens, ours (JAX) vs the official modules in
PyTorch, the same weights, one optimizer step of the flow-matching loss.

  python benchmarks/generator_train_step.py --size=XL --depth=4 --batch_size=2   # a 2-core CPU
  python benchmarks/generator_train_step.py --size=XL --batch_size=64 --compute_dtype=bfloat16  # GPU

Prints ONE JSON line (also written to --out). One step, both sides (spec.md §8.2's recipe, no EMA):
  loss  flow matching, v-prediction, linear path, uniform t: per example
        mean over tokens and channels of (model(x_t, t, y) - v)^2, batch mean; label dropout 0.1
        in the network. Ours: `softvq_jax.generator_objective.make_loss_fn` (the trainer's loss,
        `split_generator`: the fixed pos_embed is not a parameter). PyTorch: the same formula
        written out (the official `transport.training_losses` with path "Linear", prediction
        "velocity"), `model.train()` (its label dropout).
  update  global-norm clip 1.0, AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.
          Ours: optax, the whole step one jitted program with params / optimizer state donated.
          PyTorch: `clip_grad_norm_` + `torch.optim.AdamW` (its default implementation), eager,
          fused SDPA attention (the official fused_attn option).

Fairness: the torch model is perturbed (adaLN-Zero would hide the blocks) and loaded into ours with
the strict official-format loader; before any timing ONE step from the same weights and the same
inputs (ours' draw of t, noise and label dropout fed to the torch model in eval mode, which then
differs from train mode in nothing else) is compared: loss and pre-clip gradient norm within
--rtol. Timed steps then run from there (both sides keep training their own copy). Compilation
and two warm-up steps are outside the windows; windows alternate ABBA; medians are reported.

On a CPU the full SiT-XL (675M parameters) needs ~11 GB per framework for parameters, gradients
and AdamW moments -- more than a shared 24 GB machine can give to both at once; `--depth` keeps
the XL width (1152, 16 heads, the same per-block work) with fewer blocks, and the record names the
model e.g. SiT-XL(d=4)/1. Per-block throughput is what the ratio measures.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_model, timed_windows  # noqa: E402

_SIZE = flags.DEFINE_enum("size", "XL", ["micro", "S", "B", "L", "XL"], "SiT size (spec.md §8.1)")
_DEPTH = flags.DEFINE_integer("depth", 0, "override the size's depth (0 = the size's)")
_TOKENS = flags.DEFINE_integer("tokens", 64, "latent tokens N")
_CHANNELS = flags.DEFINE_integer("channels", 32, "token dim e")
_BATCH = flags.DEFINE_integer("batch_size", None, "examples per step (default: 2 on CPU, 64 "
                              "otherwise)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timing windows per framework")
_WINDOW_S = flags.DEFINE_float("window_s", 2.0, "minimum window length in seconds (>= 1 step)")
_FRAMEWORK = flags.DEFINE_enum("framework", "both", ["both", "jax", "torch"], "what to time")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "activation dtype of both (parameters float32; torch under autocast)")
_RTOL = flags.DEFINE_float("rtol", 1e-4, "parity guard on the first step's loss and gradient "
                           "norm, relative (negative: skip)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and inputs")
_OUT = flags.DEFINE_string("out", None, "also write the JSON record to this file")

LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.999), 1e-8, 1.0


def run(*, size: str, depth: int, tokens: int, channels: int, batch: int, repeats: int,
        window_s: float, framework: str, compute_dtype: str, rtol: float, seed: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import torch_sit_reference as ref  # pylint: disable=import-outside-toplevel
  from softvq_jax import generator_objective as gobj  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import generator_official  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel

  cfg = sit_lib.SiTConfig.named(size, input_size=tokens, in_channels=channels, patch_size=1,
                                vae_1d=True, compute_dtype=compute_dtype)
  if depth:
    cfg = cfg.replace(depth=depth)
  torch_device = ("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available()
                  else "cpu")

  # --- the same weights on both sides ---------------------------------------------------------
  torch.manual_seed(seed)
  tmodel = ref.SiT(input_size=tokens, patch_size=1, in_channels=channels,
                   hidden_size=cfg.hidden_size, decoder_hidden_size=cfg.hidden_size,
                   depth=cfg.depth, num_heads=cfg.num_heads, vae_1d=True, qk_norm=False)
  ref.perturb_(tmodel, std=0.02, seed=seed)
  ref.use_fused_attention(tmodel, True)
  ours = sit_lib.build_sit(cfg.replace(compute_dtype="float32"), seed=seed)
  generator_official.load_generator_state_dict(
      ours, {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}, source="torch")
  graphdef32, params, fixed = gobj.split_generator(ours)
  params, fixed = jax.device_put(params), jax.device_put(fixed)
  del ours
  graphdef = nnx.graphdef(sit_lib.abstract_sit(cfg))  # compute_dtype's graph, same parameters
  tmodel.to(torch_device)

  objective = gobj.GeneratorObjective.for_network(cfg, path="linear", time_sampling="uniform")
  tx = optax.chain(optax.clip_by_global_norm(CLIP),
                   optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0))

  def make_step(gd):
    loss_fn = gobj.make_loss_fn(objective, gd)

    def step(params, opt_state, fixed, batch_, key):
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, {"fixed": fixed, "tokenizer": None}, batch_, key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)
    return jax.jit(step, donate_argnums=(0, 1))

  rng = np.random.RandomState(seed)
  latents = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
  labels = rng.randint(0, 1000, batch).astype(np.int32)
  jbatch = {"latents": jax.device_put(latents), "label": jax.device_put(labels)}
  key = jax.random.key(seed)

  topt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=LR,
                           betas=BETAS, eps=EPS, weight_decay=0.0)
  xt_lat = torch.from_numpy(latents).to(torch_device)
  yt_lab = torch.from_numpy(labels.astype(np.int64)).to(torch_device)
  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

  def amp():
    return (torch.autocast(torch_device, dtype=getattr(torch, compute_dtype))
            if compute_dtype != "float32" else contextlib.nullcontext())

  def torch_step(t=None, noise=None, y=None):
    """The official step: t ~ U(0, 1), x_t = (1 - t) x + t eps, v = eps - x (linear path)."""
    if t is None:
      t = torch.rand(batch, device=torch_device)
      noise = torch.randn_like(xt_lat)
    y = yt_lab if y is None else y
    tb = t[:, None, None]
    x_t, target = (1 - tb) * xt_lat + tb * noise, noise - xt_lat
    with amp():
      out = tmodel(x_t, t, y)
    loss = ((out.float() - target) ** 2).mean(dim=(1, 2)).mean()
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), CLIP)
    topt.step()
    topt.zero_grad(set_to_none=True)
    sync()
    return loss.detach(), gnorm

  # --- parity: one step from the same weights and inputs, in float32 ----------------------------
  parity, first_step_s = None, None
  step32 = make_step(graphdef32)
  opt_state = tx.init(params)
  if rtol >= 0:
    draw = gobj.draw_training_inputs(objective, key, latents.shape)
    dropped = np.where(np.asarray(jax.random.uniform(draw.dropout_key, (batch,))) <
                       cfg.class_dropout_prob, cfg.null_class, labels)
    p_copy = jax.tree.map(jnp.copy, params)
    o_copy = jax.tree.map(jnp.copy, opt_state)
    t0 = time.perf_counter()
    _, _, loss_j, gnorm_j = step32(p_copy, o_copy, fixed, jbatch, key)
    first_step_s = time.perf_counter() - t0
    tmodel.eval()
    with contextlib.ExitStack() as stack:
      if torch_device == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        stack.callback(lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", tf32))
      loss_t, gnorm_t = torch_step(
          torch.from_numpy(np.array(draw.t)).to(torch_device),
          torch.from_numpy(np.array(draw.noise)).to(torch_device),
          torch.from_numpy(dropped.astype(np.int64)).to(torch_device))
    tmodel.train()
    parity = {"loss": [float(loss_j), float(loss_t)],
              "grad_norm": [float(gnorm_j), float(gnorm_t)], "rtol": rtol,
              "labels_dropped": int((dropped != labels).sum())}
    for name, (a, b) in (("loss", parity["loss"]), ("grad_norm", parity["grad_norm"])):
      if not abs(a - b) <= rtol * abs(b):
        raise AssertionError(f"ours and the torch reference disagree on the first step's {name}: "
                             f"{parity}")
    del p_copy, o_copy

  # --- the timed steps --------------------------------------------------------------------------
  step = step32 if compute_dtype == "float32" else make_step(graphdef)
  box = {"params": params, "opt": opt_state, "i": 0}
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, fixed, jbatch, key).compile()
  compile_s = time.perf_counter() - t0

  def jax_call():
    box["i"] += 1
    box["params"], box["opt"], loss, _ = compiled(box["params"], box["opt"], fixed, jbatch,
                                                  jax.random.fold_in(key, box["i"]))
    jax.block_until_ready(loss)

  fns = {}
  if framework in ("both", "jax"):
    fns["jax"] = jax_call
  if framework in ("both", "torch"):
    fns["torch"] = torch_step
  for f in fns.values():
    f()
    f()
  load_before = os.getloadavg()[0]
  rates = timed_windows(fns, batch, repeats, window_s)
  n_params = sit_lib.count_params(sit_lib.abstract_sit(cfg))
  result = {
      "benchmark": "generator_train_step", "model": f"SiT-{size}" + (
          f"(d={cfg.depth})" if depth else "") + "/1",
      "input_shape": [tokens, channels], "depth": cfg.depth, "hidden_size": cfg.hidden_size,
      "trainable_params": n_params, "batch_size": batch, "compute_dtype": compute_dtype,
      "objective": "flow matching, linear path, uniform t, label dropout 0.1",
      "optimizer": f"clip {CLIP} + AdamW lr {LR} betas {BETAS} eps {EPS} wd 0",
      "parity_float32_first_step": parity,
      # the parity step compiles the float32 step (then the AOT compile below is a cache hit)
      "jax_first_step_s": first_step_s and round(first_step_s, 2),
      "jax_aot_compile_s": round(compile_s, 2),
      "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
  }
  for fw, r in rates.items():
    result[fw] = {"img_s": round(statistics.median(r), 3), "img_s_best": round(max(r), 3),
                  "windows": [round(v, 3) for v in r]}
  if "jax" in rates and "torch" in rates:
    result["ratio_jax_over_torch"] = round(result["jax"]["img_s"] / result["torch"]["img_s"], 3)
    result["ratio_jax_over_torch_paired"] = round(statistics.median(
        a / b for a, b in zip(rates["jax"], rates["torch"])), 3)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  cpu = jax.default_backend() == "cpu"
  cpus = os.cpu_count() or 1
  torch.set_num_threads(cpus)
  result = run(size=_SIZE.value, depth=_DEPTH.value, tokens=_TOKENS.value,
               channels=_CHANNELS.value, batch=_BATCH.value or (2 if cpu else 64),
               repeats=_REPEATS.value, window_s=_WINDOW_S.value, framework=_FRAMEWORK.value,
               compute_dtype=_DTYPE.value, rtol=_RTOL.value, seed=_SEED.value)
  result.update(
      device={"jax": f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
              "torch": "cuda" if not cpu and torch.cuda.is_available() else "cpu",
              "cpu": cpu_model(), "cpus": cpus},
      threads={"torch": torch.get_num_threads()},
      versions={"python": platform.python_version(), "jax": jax.__version__,
                "flax": flax.__version__, "torch": torch.__version__},
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
  line = json.dumps(result)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
