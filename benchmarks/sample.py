"""Generator network throughput: SiT on 1-D SoftVQ tokens vs SiT/2 on 2-D latents, ours vs PyTorch.

  python benchmarks/sample.py                        # SiT-XL/1 on 64x32 + SiT-XL/2 on 32x32x4
  python benchmarks/sample.py --size=B --batch_size=2 --repeats=5   # a 2-core CPU
  python benchmarks/sample.py --compute_dtype=bfloat16 --batch_size=64  # a GPU

Prints ONE JSON line. For each form (`--forms`, default both):
  1d: SiT/1 on N = --tokens latent tokens of dim e = --channels (the SoftVQ generator; 64 x 32 is
      SoftVQ-{B,BL,L}-64's, 674,926,880 parameters at size XL);
  2d: SiT/p on --latent_size^2 x --latent_channels NHWC latents with patch --patch_size (the
      paper's baseline, SiT-XL/2 on SD-VAE latents 32x32x4: 256 transformer tokens);
it reports images/s of ONE network forward on a batch of --batch_size (what one sampler step
costs without guidance; a 250-step sampler with CFG at every step makes images at
img_s / 500), for
  jax:   `softvq_jax.models.sit.sit_apply` under `jax.jit`, parameters and inputs on the device;
  torch: the official modules in PyTorch eager (`benchmarks/torch_sit_reference.py`) under
         `torch.inference_mode()`, attention through PyTorch's fused scaled_dot_product_attention
         (the official `fused_attn` option, its fastest path; `--torch_attention=math` times the
         official fp32 default, the explicit softmax).
Generator only: no tokenizer / VAE decode (benchmarks/encode_decode.py has the decode rate).

Fairness, as benchmarks/encode_decode.py: both hold the same weights (a perturbed torch model's
state dict loaded with the strict official-format loader; perturbed so the adaLN-Zero blocks are
not identities) and are checked to agree in float32 before anything is timed (max |diff| <=
--atol x max(1, max |output|)); compilation and warm-up stay outside the timing windows; windows
of the two frameworks alternate ABBA; medians, best windows and the paired ratio are reported;
torch uses as many threads as there are CPUs.
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

_FORMS = flags.DEFINE_list("forms", ["1d", "2d"], "which networks: 1d (SiT/1 on tokens), "
                           "2d (SiT/p on NHWC latents)")
_SIZE = flags.DEFINE_enum("size", "XL", ["micro", "S", "B", "L", "XL"], "SiT size (spec.md §8.1)")
_DEPTH = flags.DEFINE_integer("depth", 0, "override the size's depth (0 = the size's); the JSON "
                              "then names the model e.g. SiT-XL(d=4)/1")
_TOKENS = flags.DEFINE_integer("tokens", 64, "1d: latent tokens N")
_CHANNELS = flags.DEFINE_integer("channels", 32, "1d: token dim e")
_LATENT = flags.DEFINE_integer("latent_size", 32, "2d: latent side H = W")
_LATENT_C = flags.DEFINE_integer("latent_channels", 4, "2d: latent channels C")
_PATCH = flags.DEFINE_integer("patch_size", 2, "2d: patch size p")
_BATCH = flags.DEFINE_integer("batch_size", None, "samples per forward (default: 2 on CPU, 64 "
                              "otherwise)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timing windows per framework and form")
_WINDOW_S = flags.DEFINE_float("window_s", 2.0, "minimum window length in seconds (>= 1 call)")
_FRAMEWORK = flags.DEFINE_enum("framework", "both", ["both", "jax", "torch"], "what to time")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "float16"],
                           "activation dtype of both (parameters float32; torch under autocast)")
_TORCH_ATTN = flags.DEFINE_enum("torch_attention", "sdpa", ["sdpa", "math"],
                                "torch attention: fused SDPA or the official explicit softmax")
_ATOL = flags.DEFINE_float("atol", 1e-3, "parity guard, relative to max(1, max |output|) "
                           "(negative: skip)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and inputs")



def _form_config(form: str, size: str, depth: int, sit_lib):
  if form == "1d":
    kw = dict(input_size=_TOKENS.value, in_channels=_CHANNELS.value, patch_size=1, vae_1d=True)
  elif form == "2d":
    kw = dict(input_size=_LATENT.value, in_channels=_LATENT_C.value, patch_size=_PATCH.value,
              vae_1d=False)
  else:
    raise app.UsageError(f"--forms: unknown form {form!r}; use 1d and/or 2d")
  cfg = sit_lib.SiTConfig.named(size, **kw)
  if depth:
    cfg = cfg.replace(depth=depth)
  return cfg


def run_form(form: str, *, size: str, depth: int, batch_size: int, repeats: int,
             window_s: float, framework: str, compute_dtype: str, torch_attention: str,
             atol: float, seed: int) -> dict:
  """One network: same weights both sides, parity guard, timing windows; a JSON-able dict."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import torch_sit_reference as ref  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import generator_official  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import vit  # pylint: disable=import-outside-toplevel

  cfg32 = _form_config(form, size, depth, sit_lib)
  cfg = cfg32.replace(compute_dtype=compute_dtype)
  backend = jax.default_backend()
  torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"

  # --- the same weights on both sides ---------------------------------------------------------
  torch.manual_seed(seed)
  tmodel = ref.SiT(input_size=cfg.input_size, patch_size=cfg.patch_size,
                   in_channels=cfg.in_channels, hidden_size=cfg.hidden_size,
                   decoder_hidden_size=cfg.hidden_size, depth=cfg.depth,
                   num_heads=cfg.num_heads, vae_1d=cfg.vae_1d, qk_norm=False).eval()
  ref.perturb_(tmodel, std=0.02, seed=seed)
  ref.use_fused_attention(tmodel, torch_attention == "sdpa")
  graphdef, abstract = nnx.split(sit_lib.abstract_sit(cfg))
  ours = nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract))
  generator_official.load_generator_state_dict(
      ours, {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}, source="torch")
  state = jax.device_put(nnx.state(ours))  # on the device once (see encode_decode.py)
  del ours
  fwd = jax.jit(lambda st, x, t, y: sit_lib.sit_apply(graphdef, st, x, t, y))
  tmodel.to(torch_device)

  rng = np.random.RandomState(seed)
  x = rng.standard_normal((batch_size,) + cfg.input_shape).astype(np.float32)
  t = rng.uniform(0, 1, batch_size).astype(np.float32)
  y = rng.randint(0, 1000, batch_size).astype(np.int32)
  xj, tj, yj = jax.device_put(x), jax.device_put(t), jax.device_put(y)
  xt = torch.from_numpy(x if cfg.vae_1d else x.transpose(0, 3, 1, 2).copy()).to(torch_device)
  tt, yt = torch.from_numpy(t).to(torch_device), torch.from_numpy(y.astype(np.int64)).to(
      torch_device)

  t0 = time.perf_counter()
  out = np.asarray(fwd(state, xj, tj, yj))
  compile_s = time.perf_counter() - t0

  parity = None
  if atol >= 0:  # in float32, before any timing (TF32 off on GPUs, as encode_decode.py)
    on_gpu = torch_device == "cuda"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if on_gpu:
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
      with torch.inference_mode():
        want = tmodel(xt, tt, yt).float().cpu().numpy()
      if not cfg.vae_1d:
        want = want.transpose(0, 2, 3, 1)
      graphdef32 = nnx.graphdef(sit_lib.abstract_sit(cfg32))  # the same weights in float32
      fwd32 = fwd if compute_dtype == "float32" else jax.jit(
          lambda st, a, b, c: sit_lib.sit_apply(graphdef32, st, a, b, c))
      with jax.default_matmul_precision("highest" if on_gpu else None):
        got = np.asarray(fwd32(state, xj, tj, yj))
    finally:
      torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    scale = float(np.max(np.abs(want)))
    parity = {"max_abs_diff": float(np.max(np.abs(got - want))), "max_abs_ref": scale,
              "atol": atol}
    if not parity["max_abs_diff"] <= atol * max(1.0, scale):
      raise AssertionError(f"ours and the torch reference disagree in float32: {parity}")
  del out

  sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

  def torch_call():
    amp = (torch.autocast(torch_device, dtype=getattr(torch, compute_dtype))
           if compute_dtype != "float32" else contextlib.nullcontext())
    with torch.inference_mode(), amp:
      tmodel(xt, tt, yt)
    sync()

  fns = {}
  if framework in ("both", "jax"):
    fns["jax"] = lambda: jax.block_until_ready(fwd(state, xj, tj, yj))
  if framework in ("both", "torch"):
    fns["torch"] = torch_call
  for f in fns.values():  # warm-up
    f()
    f()
  load_before = os.getloadavg()[0]
  rates = timed_windows(fns, batch_size, repeats, window_s)
  name = f"SiT-{size}" + (f"(d={cfg.depth})" if depth else "") + f"/{cfg.patch_size}"
  result = {
      "form": form, "model": name, "input_shape": list(cfg.input_shape),
      "sequence_length": cfg.num_tokens, "hidden_size": cfg.hidden_size, "depth": cfg.depth,
      "params": sit_lib.count_params(sit_lib.abstract_sit(cfg), include_pos_embed=True),
      "batch_size": batch_size, "compute_dtype": compute_dtype,
      "attention": {"jax": (vit._default_backend(cfg.dtype)  # pylint: disable=protected-access
                            if cfg.attention_backend == "auto" else cfg.attention_backend),
                    "torch": torch_attention},
      "parity_float32": parity, "jax_compile_s": round(compile_s, 2),
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
  backend = jax.default_backend()
  batch = _BATCH.value or (2 if backend == "cpu" else 64)
  cpus = os.cpu_count() or 1
  torch.set_num_threads(cpus)
  forms = {}
  for form in _FORMS.value:
    forms[form] = run_form(form, size=_SIZE.value, depth=_DEPTH.value, batch_size=batch,
                           repeats=_REPEATS.value, window_s=_WINDOW_S.value,
                           framework=_FRAMEWORK.value, compute_dtype=_DTYPE.value,
                           torch_attention=_TORCH_ATTN.value, atol=_ATOL.value, seed=_SEED.value)
  result = {
      "benchmark": "sample_network_forward", "forms": forms,
      "device": {"jax": f"{backend}:{jax.devices()[0].device_kind}",
                 "torch": "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu",
                 "cpu": cpu_model(), "cpus": cpus},
      "threads": {"torch": torch.get_num_threads(), "xla_cpu": cpus},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "torch": torch.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "repeats": _REPEATS.value, "window_s": _WINDOW_S.value,
  }
  if "1d" in forms and "2d" in forms:  # the paper's throughput claim, generator only
    for fw in ("jax", "torch"):
      if fw in forms["1d"] and fw in forms["2d"]:
        result.setdefault("ratio_1d_over_2d", {})[fw] = round(
            forms["1d"][fw]["img_s"] / forms["2d"][fw]["img_s"], 3)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
