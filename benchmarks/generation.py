"""The paper's throughput claim re-measured (spec.md §8.5): SiT on 1-D SoftVQ tokens vs SiT/2 on SD-VAE
latents, generator only and end to end (generator + decode).

  python benchmarks/generation.py                                   # a GPU: the published sampler
  python benchmarks/generation.py --steps=2 --batch_size=1 --repeats=2   # a 2-core CPU
  python benchmarks/generation.py --plan=toy --steps=2                # seconds: the smoke test

Prints ONE JSON line (and writes it to --out when given). What is compared, per resolution:

  generators (ours, `softvq_jax/models/sit.py`, the same code in both forms, the same sampler
  `softvq_jax.sampling.sample_flow` with the same mode / steps / CFG / batch, one jitted program):
    sit1d_<N>    SiT-<size>/1 on N 1-D tokens of dim e: 32 x 64 (SoftVQ-*-32) and 64 x 32
                 (SoftVQ-*-64). The token count does not depend on the image size, so the same two
                 networks serve 256 and 512 px and are timed once.
    sit2d_<H>    SiT-<size>/2 on H x H x 4 NHWC latents: 32 (256 px, 256 transformer tokens) and
                 64 (512 px, 1024 transformer tokens) -- the paper's baseline (SD-VAE latents).
  decoders (random weights; decode time does not depend on the values):
    softvq_<variant>   our tokenizer's decode at the released variant's shapes
                       (`softvq_jax/variants.py`: decoder size, N, e, image size), in JAX (ours,
                       jitted) and in PyTorch (the official architecture,
                       `benchmarks/torch_reference.py`);
    sdvae_<S>          the SD-VAE decoder: diffusers' `AutoencoderKL` with Stable Diffusion's
                       config (4 latent channels, block_out_channels (128, 256, 512, 512), 2
                       layers per block, 8x downsampling), `vae.decode(z)`, in PyTorch.
  Which decoder framework is fair: the generator runs in the same framework (ours) on both sides;
  the two decoders are compared (a) both in PyTorch -- each decoder's own reference
  implementation, no framework advantage to either side (our JAX ViTs run 1.5-1.9x faster than
  PyTorch's on this AMD CPU, BENCHMARKS.md "Encode / decode", which would otherwise count as a
  tokenizer advantage) -- and (b) as shipped: ours in JAX vs SD-VAE in PyTorch (there is no
  maintained JAX SD-VAE decoder: diffusers 0.42 dropped its Flax VAE, and a port written here
  would measure that port). Both end-to-end ratios are reported.

Every timed callable runs in round-robin windows (the order reversed every other round, so load
from other processes hits all of them alike); each window is >= --window_s and >= 1 call;
medians are reported. Compilation (AOT, `jit(...).lower(...).compile()`) and one warm-up call per
PyTorch module stay outside the windows.

End to end is composed, not timed as one program (SD-VAE runs in PyTorch): seconds per image of
the generator plus seconds per image of the decoder, the two running one after the other. The
generator's cost is linear in the sampler steps (one identical network evaluation per step in a
`fori_loop`), so the record also gives the end-to-end ratio at other step counts
(`e2e_ratio_at_steps`): ratio(S) = (S g_2d + d_2d) / (S g_1d + d_1d) with g = generator seconds per
image per step at the measured setting and d = decode seconds per image. That extrapolation is
labelled as such; only `steps` itself is measured.

Defaults: on an accelerator the published setting (SDE, 250 steps, CFG 1.75 on [0, 0.7], cosine
path, batch 64, bfloat16); on a CPU SDE with --steps=2, no guidance (cfg 1), batch 1, float32 --
say so when quoting CPU numbers (a 250-step XL/2 sampler at 512 px takes hours on 2 cores).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import cpu_model  # noqa: E402

# Stable Diffusion's VAE (diffusers AutoencoderKL, the SD v1/v2 and SD-VAE-ft-EMA config).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

# What is measured. "paper": the comparison of spec.md §8.5 at the released shapes. "toy": the same
# structure at tiny sizes (micro networks, 32 / 64 px) so the smoke test runs in seconds.
PLANS = {
    "paper": {
        "sit_size": "XL",
        "tokens": {32: 64, 64: 32},             # N -> e (spec.md §2: 32-token models have e = 64)
        "resolutions": {
            256: {"latent": 32, "tokenizers": {32: "b-32", 64: "b-64"}},
            512: {"latent": 64, "tokenizers": {32: "l-32-512", 64: "bl-64-512"}},
        },
        "sd_vae": SD_VAE,
    },
    "toy": {
        "sit_size": "micro",
        "tokens": {8: 16, 16: 8},
        "resolutions": {
            32: {"latent": 4, "tokenizers": {
                8: dict(decoder_size="micro", num_latent_tokens=8, codebook_embed_dim=16,
                        image_size=32),
                16: dict(decoder_size="micro", num_latent_tokens=16, codebook_embed_dim=8,
                         image_size=32)}},
            64: {"latent": 8, "tokenizers": {
                8: dict(decoder_size="micro", num_latent_tokens=8, codebook_embed_dim=16,
                        image_size=64),
                16: dict(decoder_size="micro", num_latent_tokens=16, codebook_embed_dim=8,
                         image_size=64)}},
        },
        "sd_vae": dict(SD_VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=8,
                       layers_per_block=1),
    },
}
PAPER_CLAIM = {256: 18.0, 512: 55.0}  # "up to 18x (256 px) and 55x (512 px)" (spec.md §8.5)
LATENT_CHANNELS_2D = 4
PATCH_2D = 2

_PLAN = flags.DEFINE_enum("plan", "paper", list(PLANS), "what to measure (module docstring)")
_RESOLUTIONS = flags.DEFINE_list("resolutions", None, "image sizes of the plan to measure "
                                 "(default: all of the plan's)")
_SIZE = flags.DEFINE_enum("size", None, ["micro", "S", "B", "L", "XL"], "SiT size (default: "
                          "the plan's: XL)")
_DEPTH = flags.DEFINE_integer("depth", 0, "override the SiT depth (0 = the size's); named "
                              "e.g. SiT-XL(d=4) in the record")
_BATCH = flags.DEFINE_integer("batch_size", None, "images per sampler call and per decode "
                              "(default: 1 on CPU, 64 otherwise)")
_MODE = flags.DEFINE_enum("mode", "sde", ["sde", "ode"], "sampler (sampling.sample_flow)")
_STEPS = flags.DEFINE_integer("steps", None, "sampler steps (default: 2 on CPU, 250 otherwise)")
_CFG = flags.DEFINE_float("cfg_scale", None, "guidance scale (default: 1 on CPU = one pass per "
                          "step, 1.75 otherwise)")
_INTERVAL = flags.DEFINE_list("guidance_interval", None, "low,high (default 0,0.7 with guidance)")
_PATH = flags.DEFINE_enum("path", "cosine", ["linear", "cosine"], "SDE score path")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "activation dtype of "
                           "the JAX networks (default: float32 on CPU, bfloat16 otherwise; "
                           "PyTorch decoders then run under autocast)")
_DECODE_FW = flags.DEFINE_list("softvq_decode", ["jax", "torch"], "frameworks to time our "
                               "tokenizer's decode in")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timing rounds (each callable once per round)")
_WINDOW_S = flags.DEFINE_float("window_s", 1.0, "minimum window length in seconds (>= 1 call)")
_EXTRA_STEPS = flags.DEFINE_list("project_steps", ["50", "250"], "step counts the end-to-end "
                                 "ratio is extrapolated to (module docstring)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and inputs")
_OUT = flags.DEFINE_string("out", None, "also write the JSON record to this file")

_PAUSE_S = 0.05


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def timed_rounds(fns: dict, repeats: int, window_s: float) -> dict[str, list[float]]:
  """Seconds per call of each callable: `repeats` rounds, every callable one window per round, the
  order reversed on odd rounds (ABBA generalised). fns: {name: f}, f() runs one call and waits."""
  names = list(fns)
  secs = {n: [] for n in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(_PAUSE_S)
      calls, t0 = 0, time.perf_counter()
      while True:
        fns[name]()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
          break
      secs[name].append(elapsed / calls)
  return secs


# ------------------------------------------------------------------------------------------------
# Generators: one set of transformer blocks shared by every case (same weights, memory once)
# ------------------------------------------------------------------------------------------------


def _sit_config(size: str, depth: int, *, tokens: int | None = None, channels: int | None = None,
                latent: int | None = None, compute_dtype: str = "float32"):
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel
  if tokens is not None:
    kw = dict(input_size=tokens, in_channels=channels, patch_size=1, vae_1d=True)
  else:
    kw = dict(input_size=latent, in_channels=LATENT_CHANNELS_2D, patch_size=PATCH_2D,
              vae_1d=False)
  cfg = sit_lib.SiTConfig.named(size, compute_dtype=compute_dtype, **kw)
  return cfg.replace(depth=depth) if depth else cfg


def shared_weight_states(cfgs: dict, seed: int) -> dict:
  """{name: (graphdef, state)} for SiT configs that differ only in their input form.

  The first network is built (random init, spec.md §8.1); every other one reuses its arrays wherever
  the parameter path and shape agree (all transformer blocks, the timestep and label embedders)
  and draws the few form-specific ones (x_embedder, pos_embed, final linear) at N(0, 0.02): so
  the generators hold the same block weights and the process holds them once. Values do not
  change the work (no data-dependent control flow), only the memory does.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel

  out, donor = {}, None
  rng = np.random.RandomState(seed)
  for name, cfg in cfgs.items():
    if donor is None:
      graphdef, state = nnx.split(sit_lib.build_sit(cfg, seed=seed))
      state = jax.device_put(state)
      donor = {jax.tree_util.keystr(p): leaf
               for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    else:
      graphdef, abstract = nnx.split(sit_lib.abstract_sit(cfg))

      def fill(path, leaf):
        have = donor.get(jax.tree_util.keystr(path))
        if have is not None and have.shape == leaf.shape and have.dtype == leaf.dtype:
          return have
        return jax.device_put((0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

      state = jax.tree_util.tree_map_with_path(fill, abstract)
    out[name] = (graphdef, state)
  return out


def compile_sampler(graphdef, state, cfg, *, batch: int, mode: str, steps: int, cfg_scale: float,
                    guidance_interval, path: str, seed: int):
  """AOT-compiled `sampling.sample_flow` over the network: (call() -> waits, compile seconds)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from softvq_jax import sampling  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel

  def run(st, labels, noise, key):
    model_fn = functools.partial(sit_lib.sit_apply, graphdef, st)
    return sampling.sample_flow(model_fn, labels, noise, key, mode=mode, steps=steps,
                                cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                                path=path)

  rng = np.random.RandomState(seed)
  labels = jax.device_put(rng.randint(0, 1000, batch).astype(np.int32))
  noise = jax.device_put(rng.standard_normal((batch,) + cfg.input_shape).astype(np.float32))
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  compiled = jax.jit(run).lower(state, labels, noise, key).compile()
  compile_s = time.perf_counter() - t0
  out = compiled(state, labels, noise, key)
  if out.shape != noise.shape or not bool(np.isfinite(np.asarray(out)).all()):
    raise AssertionError(f"the sampler returned {out.shape} (non-finite?) for noise {noise.shape}")
  return (lambda: jax.block_until_ready(compiled(state, labels, noise, key))), compile_s


# ------------------------------------------------------------------------------------------------
# Decoders
# ------------------------------------------------------------------------------------------------


def softvq_config(spec, compute_dtype: str):
  """TokenizerConfig of a variant name (softvq_jax/variants.py) or an explicit dict (toy plan).

  The encoder is built at "micro" size: decode never touches it (post_quant_conv + decoder only),
  and the released encoders would only cost memory here."""
  from softvq_jax import variants  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  if isinstance(spec, str):
    v = variants.by_name(spec)
    name = f"SoftVQ-{v.config_arg}-{v.num_latent_tokens}" + (
        f" ({v.image_size} px)" if v.image_size != 256 else "")
    spec = dict(decoder_size=v.decoder_size, num_latent_tokens=v.num_latent_tokens,
                codebook_embed_dim=v.codebook_embed_dim, image_size=v.image_size)
  else:
    name = f"SoftVQ-{spec['decoder_size']}dec-{spec['num_latent_tokens']}"
  cfg = tokenizer_lib.TokenizerConfig(encoder_size="micro", compute_dtype=compute_dtype, **spec)
  return name, cfg


def jax_softvq_decoder(cfg, batch: int, seed: int):
  """Our decode (jitted, as `Tokenizer.decode`): (call, compile seconds, parameters)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  model = tokenizer_lib.build_tokenizer(cfg, seed=seed)
  n_params = tokenizer_lib.count_params(model.decoder) + tokenizer_lib.count_params(
      model.post_quant_conv)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state)
  z = jax.device_put(np.random.RandomState(seed).standard_normal(
      (batch, cfg.num_latent_tokens, cfg.codebook_embed_dim)).astype(np.float32))
  t0 = time.perf_counter()
  compiled = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z)).lower(state, z).compile()
  compile_s = time.perf_counter() - t0
  img = compiled(state, z)
  want = (batch, cfg.image_size, cfg.image_size, 3)
  if img.shape != want:
    raise AssertionError(f"our decode returned {img.shape}, expected {want}")
  return (lambda: jax.block_until_ready(compiled(state, z))), compile_s, n_params


def _torch_call(module_fn, device: str, compute_dtype: str):
  import contextlib  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def call():
    amp = (torch.autocast(device, dtype=getattr(torch, compute_dtype))
           if compute_dtype != "float32" else contextlib.nullcontext())
    with torch.inference_mode(), amp:
      out = module_fn()
    sync()
    return out
  return call


def torch_softvq_decoder(cfg, batch: int, seed: int, device: str, compute_dtype: str):
  """The official decoder architecture in PyTorch eager (post_quant_conv + TimmViTDecoder)."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_reference  # pylint: disable=import-outside-toplevel
  from softvq_jax import config_lib  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  dd = config_lib.VIT_SIZES[cfg.decoder_size][0]
  post = torch.nn.Linear(cfg.codebook_embed_dim, dd)
  dec = torch_reference.Decoder(cfg)
  model = torch.nn.Sequential(post, dec).eval().to(device)
  z = torch.randn(batch, cfg.num_latent_tokens, cfg.codebook_embed_dim, device=device)
  call = _torch_call(lambda: model(z), device, compute_dtype)
  img = call()
  want = (batch, 3, cfg.image_size, cfg.image_size)
  if tuple(img.shape) != want:
    raise AssertionError(f"the torch SoftVQ decoder returned {tuple(img.shape)}, expected {want}")
  # timm builds a patch_embed the decoder never uses (spec.md §2): not counted, as in ours
  return call, sum(p.numel() for n, p in model.named_parameters() if "patch_embed" not in n)


def sd_vae_decoder(vae_config: dict, image_size: int, batch: int, seed: int, device: str,
                   compute_dtype: str):
  """diffusers AutoencoderKL (random weights) `decode`: latents [B, 4, S/8, S/8] -> [B, 3, S, S]."""
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  vae = AutoencoderKL(sample_size=image_size, **vae_config).eval().to(device)
  del vae.encoder, vae.quant_conv  # decode never touches them
  down = 2 ** (len(vae_config["block_out_channels"]) - 1)
  lat = image_size // down
  z = torch.randn(batch, vae_config["latent_channels"], lat, lat, device=device)
  call = _torch_call(lambda: vae.decode(z).sample, device, compute_dtype)
  img = call()
  want = (batch, 3, image_size, image_size)
  if tuple(img.shape) != want:
    raise AssertionError(f"the SD-VAE decoder returned {tuple(img.shape)}, expected {want}")
  return call, sum(p.numel() for p in vae.parameters()), [vae_config["latent_channels"], lat, lat]


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------


def _sig(v: float) -> float:
  """6 significant digits (seconds range from 1e-4 to 1e3 between the toy and paper plans)."""
  return float(f"{v:.6g}")


def _e2e(gen_s: float, dec_s: float) -> float:
  """Images/s of generator then decoder (seconds per image add)."""
  return 1.0 / (gen_s + dec_s)


def run(*, plan_name: str, resolutions, size: str | None, depth: int, batch: int, mode: str,
        steps: int, cfg_scale: float, guidance_interval, path: str, compute_dtype: str,
        softvq_decode, repeats: int, window_s: float, project_steps, seed: int) -> dict:
  """Builds, compiles and times everything of the plan; returns the JSON-able record."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  plan = PLANS[plan_name]
  size = size or plan["sit_size"]
  res_plan = {int(r): plan["resolutions"][int(r)] for r in resolutions}
  torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"

  # --- generators -----------------------------------------------------------------------------
  gen_cfgs = {}
  for latent in sorted({p["latent"] for p in res_plan.values()}, reverse=True):
    gen_cfgs[f"sit2d_{latent}"] = _sit_config(size, depth, latent=latent,
                                              compute_dtype=compute_dtype)
  used_tokens = sorted({n for p in res_plan.values() for n in p["tokenizers"]})
  for n in used_tokens:
    gen_cfgs[f"sit1d_{n}"] = _sit_config(size, depth, tokens=n, channels=plan["tokens"][n],
                                         compute_dtype=compute_dtype)
  from softvq_jax.models import sit as sit_lib  # pylint: disable=import-outside-toplevel
  states = shared_weight_states(gen_cfgs, seed)
  fns, records = {}, {}
  for name, cfg in gen_cfgs.items():
    graphdef, state = states[name]
    fns[name], compile_s = compile_sampler(
        graphdef, state, cfg, batch=batch, mode=mode, steps=steps, cfg_scale=cfg_scale,
        guidance_interval=guidance_interval, path=path, seed=seed)
    model = f"SiT-{size}" + (f"(d={cfg.depth})" if depth else "") + f"/{cfg.patch_size}"
    records[name] = {
        "kind": "generator", "model": model, "input_shape": list(cfg.input_shape),
        "sequence_length": cfg.num_tokens,
        "params": sit_lib.count_params(sit_lib.abstract_sit(cfg), include_pos_embed=True),
        "framework": "jax", "compile_s": round(compile_s, 2)}

  # --- decoders -------------------------------------------------------------------------------
  for res, p in res_plan.items():
    for n, spec in p["tokenizers"].items():
      label, tcfg = softvq_config(spec, compute_dtype)
      if "jax" in softvq_decode:
        key = f"softvq_{n}_{res}_jax"
        fns[key], compile_s, n_params = jax_softvq_decoder(tcfg, batch, seed)
        records[key] = {"kind": "decoder", "model": label, "framework": "jax",
                        "input_shape": [n, tcfg.codebook_embed_dim], "image_size": res,
                        "params": n_params, "compile_s": round(compile_s, 2)}
      if "torch" in softvq_decode:
        key = f"softvq_{n}_{res}_torch"
        fns[key], n_params = torch_softvq_decoder(tcfg, batch, seed, torch_device, compute_dtype)
        records[key] = {"kind": "decoder", "model": label, "framework": "torch",
                        "input_shape": [n, tcfg.codebook_embed_dim], "image_size": res,
                        "params": n_params}
    key = f"sdvae_{res}_torch"
    fns[key], n_params, lat_shape = sd_vae_decoder(plan["sd_vae"], res, batch, seed,
                                                   torch_device, compute_dtype)
    if lat_shape[1] != p["latent"]:
      raise AssertionError(f"SD-VAE latents {lat_shape} do not match the 2-D generator's "
                           f"{p['latent']}x{p['latent']} at {res} px")
    records[key] = {"kind": "decoder", "model": "SD-VAE decoder (diffusers AutoencoderKL)",
                    "framework": "torch", "input_shape": lat_shape, "image_size": res,
                    "params": n_params}

  # --- timing ---------------------------------------------------------------------------------
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  secs = timed_rounds(fns, repeats, window_s)
  timing_s = time.perf_counter() - t0
  for name, s in secs.items():
    med = statistics.median(s)
    records[name].update(s_per_call=_sig(med), img_s=_sig(batch / med),
                         img_s_best=_sig(batch / min(s)),
                         windows_s_per_call=[_sig(v) for v in s])

  # --- ratios ---------------------------------------------------------------------------------
  comparisons = []
  for res, p in res_plan.items():
    g2 = records[f"sit2d_{p['latent']}"]
    base = {"sdvae_torch": records[f"sdvae_{res}_torch"]}
    for n in p["tokenizers"]:
      g1 = records[f"sit1d_{n}"]
      row = {"image_size": res, "tokens": n, "baseline": f"SiT/2 on {p['latent']}x{p['latent']}"
             f"x{LATENT_CHANNELS_2D} + SD-VAE decoder",
             "generator_img_s": {"1d": g1["img_s"], "2d": g2["img_s"]},
             "generator_only_ratio": _sig(g2["s_per_call"] / g1["s_per_call"]),
             "paper_claim": PAPER_CLAIM.get(res)}
      sec_g1, sec_g2 = g1["s_per_call"] / batch, g2["s_per_call"] / batch
      d2 = base["sdvae_torch"]["s_per_call"] / batch
      for fw in softvq_decode:
        d1 = records[f"softvq_{n}_{res}_{fw}"]["s_per_call"] / batch
        tag = "both_torch" if fw == "torch" else "softvq_jax_vs_sdvae_torch"
        row.setdefault("decoder_img_s", {})[f"softvq_{fw}"] = _sig(1 / d1)
        row.setdefault("end_to_end_img_s", {})[tag] = {
            "1d": _sig(_e2e(sec_g1, d1)), "2d": _sig(_e2e(sec_g2, d2))}
        row.setdefault("end_to_end_ratio", {})[tag] = _sig(
            _e2e(sec_g1, d1) / _e2e(sec_g2, d2))
        row.setdefault("e2e_ratio_at_steps", {})[tag] = {
            str(s): _sig((s * sec_g2 / steps + d2) / (s * sec_g1 / steps + d1))
            for s in sorted({int(v) for v in project_steps})}
      row["decoder_img_s"]["sdvae_torch"] = _sig(1 / d2)
      row["softvq_decoder"] = records[f"softvq_{n}_{res}_{softvq_decode[0]}"]["model"] if (
          softvq_decode) else None
      comparisons.append(row)

  return {
      "benchmark": "generation_throughput", "plan": plan_name,
      "sampler": {"function": "softvq_jax.sampling.sample_flow", "mode": mode, "steps": steps,
                  "cfg_scale": cfg_scale, "guidance_interval": list(guidance_interval),
                  "path": path},
      "batch_size": batch, "compute_dtype": compute_dtype, "repeats": repeats,
      "window_s": window_s, "timing_wall_s": round(timing_s, 1),
      "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
      "end_to_end": "composed: generator s/img + decoder s/img (run one after the other)",
      "cases": records, "comparisons": comparisons,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  plan = PLANS[_PLAN.value]
  resolutions = [int(r) for r in (_RESOLUTIONS.value or plan["resolutions"])]
  unknown = [r for r in resolutions if r not in plan["resolutions"]]
  if unknown:
    raise app.UsageError(f"--resolutions {unknown}: plan {_PLAN.value!r} has "
                         f"{list(plan['resolutions'])}")
  bad = sorted(set(_DECODE_FW.value) - {"jax", "torch"})
  if bad or not _DECODE_FW.value:
    raise app.UsageError(f"--softvq_decode={_DECODE_FW.value}: use jax and/or torch")
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel

  cpu = jax.default_backend() == "cpu"
  cfg_scale = _CFG.value if _CFG.value is not None else (1.0 if cpu else 1.75)
  interval = tuple(float(v) for v in (_INTERVAL.value or ([0, 0.7] if cfg_scale > 1 else [0, 1])))
  if len(interval) != 2:
    raise app.UsageError(f"--guidance_interval={_INTERVAL.value}: give low,high")
  steps = _STEPS.value or (2 if cpu else 250)
  batch = _BATCH.value or (1 if cpu else 64)
  dtype = _DTYPE.value or ("float32" if cpu else "bfloat16")
  cpus = os.cpu_count() or 1
  torch.set_num_threads(cpus)
  record = run(plan_name=_PLAN.value, resolutions=resolutions, size=_SIZE.value,
               depth=_DEPTH.value, batch=batch, mode=_MODE.value, steps=steps,
               cfg_scale=cfg_scale, guidance_interval=interval, path=_PATH.value,
               compute_dtype=dtype, softvq_decode=_DECODE_FW.value, repeats=_REPEATS.value,
               window_s=_WINDOW_S.value, project_steps=_EXTRA_STEPS.value, seed=_SEED.value)
  record.update(
      device={"jax": f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
              "torch": "cuda" if not cpu and torch.cuda.is_available() else "cpu",
              "cpu": cpu_model(), "cpus": cpus},
      threads={"torch": torch.get_num_threads()},
      versions={"python": platform.python_version(), "jax": jax.__version__,
                "flax": flax.__version__, "torch": torch.__version__,
                "diffusers": diffusers.__version__},
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
  line = json.dumps(record)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
