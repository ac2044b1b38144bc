"""Memory planning: compile the train step ahead of time for a target topology, hardware-free.

`python -m softvq_jax.main --mode=compile --config=configs/sq64_256.py:L --workdir=DIR
--target=v5e-64` answers "does this config fit there, and how fast can it be?" before a pod is
rented. It writes `<workdir>/compile_<target>.json`, prints a table, and exits non-zero (naming
what to change) when the step does not fit the device's memory.

What is compiled is exactly what training runs: `train.build_trainer(config, mesh).p_step`
lowered with the trainer's abstract (sharded) state and batch, so every term the trainer's
objective grows (GAN, LPIPS, REPA) is counted without this module knowing about it.

Three ways to get the numbers, best first (the report's `method` says which one was used):

* `tpu-aot`: TPU slices (v4, v5e, v5p, v6e) are compiled by the real TPU compiler on this (CPU)
  machine: `jax.experimental.topologies.get_topology_desc` with `libtpu` describes the slice's
  devices; the mesh is built on them; XLA:TPU compiles and reports per-device memory (and itself
  rejects a program larger than HBM). Needs `pip install libtpu` (the version that `jax[tpu]`
  pins for the installed jax) or `TPU_LIBRARY_PATH=/path/to/libtpu.so`; no TPU is touched.
* `attached`: the local devices are the target kind and count (e.g. `--target=8xH100` on an
  8-GPU node): compiled for them.
* `cpu-aot`: GPU targets elsewhere (jaxlib cannot compile CUDA without a GPU) and the fallback
  of everything: compiled on N fake CPU devices (`--xla_force_host_platform_device_count`, set by
  `ensure_cpu_devices`, which re-executes the command when JAX already started with fewer). The
  sharding, the per-device state and the FLOPs are the target's; XLA:CPU's buffer assignment is
  not the GPU's, so temporaries are indicative only, and attention is the einsum form
  (the GPU would run cuDNN flash attention, which saves less: see `analytic_estimate`).

Every report also carries the analytic estimate (`analytic_estimate`): per-device state bytes
exact from the sharding plan (`sharding.per_device_bytes` of the trainer's abstract state),
activations and FLOPs from the ViT shapes (formulas in that function's docstring). It is what
`--target` falls back to when nothing can be compiled (`method: analytic`), and what
`docs/memory_planning.md`'s table uses for cells that were not compiled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

from softvq_jax import paths

GiB = 2 ** 30

# Per chip (= per JAX device): HBM bytes, dense bf16 peak FLOP/s, TPU topology dimensions,
# libtpu chip config, whether the slice name counts TensorCores (2 per chip) instead of chips.
_TPU = {
    "v4": dict(hbm=32 * GiB, flops=275e12, dims=3, chip_config="megacore", name_counts_cores=True),
    "v5p": dict(hbm=95 * GiB, flops=459e12, dims=3, chip_config="megacore",
                name_counts_cores=True),
    "v5e": dict(hbm=16 * GiB, flops=197e12, dims=2, chip_config="default", name_counts_cores=False),
    "v6e": dict(hbm=32 * GiB, flops=918e12, dims=2, chip_config="default", name_counts_cores=False),
}
# GPUs: HBM as sold (decimal GB) and dense bf16 tensor-core peak (SXM parts).
_GPU = {
    "H100": dict(hbm=80e9, flops=989e12),
    "H200": dict(hbm=141e9, flops=989e12),
    "A100": dict(hbm=80e9, flops=312e12),
    "A100-40": dict(hbm=40e9, flops=312e12),
}
# JAX preallocates this fraction of a GPU's memory as its pool (XLA_PYTHON_CLIENT_MEM_FRACTION);
# the step must fit in the pool, not in the whole HBM.
DEFAULT_GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  """A named hardware target: what one device has and how many there are."""
  name: str                 # as given, e.g. "v5e-64", "2x8xH100", "cpu-8"
  platform: str             # "tpu" | "gpu" | "cpu"
  kind: str                 # "v5e", "H100", "cpu"
  num_devices: int          # JAX devices (= chips on TPU v4/v5p megacore, v5e, v6e; GPUs)
  devices_per_host: int
  hbm_bytes: float          # per device
  peak_flops: float         # dense bf16 per device (0 = unknown, no time estimate)
  usable_fraction: float = 1.0  # of hbm_bytes the step may use (GPU: JAX's preallocated pool)
  topology: str | None = None   # libtpu topology name, e.g. "v5e:8x8"
  chip_config: str | None = None

  @property
  def usable_bytes(self) -> float:
    return self.hbm_bytes * self.usable_fraction

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_devices // self.devices_per_host)


def _tpu_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` chips: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (3-D
  torus, v4/v5p) or 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, 8x8, ... (2-D, v5e/v6e): each doubling doubles
  the last of the smallest dimensions."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: TPU slices here are powers of two")
  grid = [2, 2, 1] if dims == 3 else [1, 1]
  if dims == 3 and chips < 4:
    raise ValueError("v4/v5p slices start at 4 chips (v4-8 / v5p-8)")
  while math.prod(grid) < chips:
    m = min(grid)
    i = max(j for j, g in enumerate(grid) if g == m)
    grid[i] *= 2
  return tuple(grid)


_TARGET_HELP = ("use a TPU slice 'v4-32', 'v5e-64', 'v5p-128', 'v6e-16' (v4/v5p count TensorCores, "
                "2 per chip; v5e/v6e count chips), a GPU node 'H100', '8xH100', '2x8xH100' "
                f"(kinds {sorted(_GPU)}), or 'cpu-8'")


def parse_target(name: str, *, gpu_mem_fraction: float | None = None) -> Target:
  """'v5e-64' / 'v4-32' / '8xH100' / '2x8xH100' / 'cpu-8' -> Target (ValueError naming the form).

  A suffix '@<GiB>' overrides the memory per device (e.g. '8xH100@94' for H100 NVL parts,
  'cpu-8@0.001' in tests).
  """
  if "@" in name:
    base, _, mem = name.partition("@")
    try:
      gib = float(mem)
    except ValueError:
      raise ValueError(f"target {name!r}: the part after '@' must be GiB per device") from None
    return dataclasses.replace(parse_target(base, gpu_mem_fraction=gpu_mem_fraction),
                               name=name.strip(), hbm_bytes=gib * GiB)
  s = name.strip()
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v6litepod)-(\d+)", s, re.IGNORECASE)
  if m:
    gen = {"v5litepod": "v5e", "v6litepod": "v6e"}.get(m.group(1).lower(), m.group(1).lower())
    spec, n = _TPU[gen], int(m.group(2))
    chips = n // 2 if spec["name_counts_cores"] else n
    if spec["name_counts_cores"] and n % 2:
      raise ValueError(f"target {name!r}: {gen} slices are named by TensorCores (even numbers)")
    grid = _tpu_grid(chips, spec["dims"])
    per_host = 8 if spec["dims"] == 2 and chips == 8 else min(4, chips)
    return Target(name=s, platform="tpu", kind=gen, num_devices=chips, devices_per_host=per_host,
                  hbm_bytes=spec["hbm"], peak_flops=spec["flops"],
                  topology=f"{gen}:{'x'.join(map(str, grid))}", chip_config=spec["chip_config"])
  m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?([A-Za-z0-9-]+)", s)
  if m and m.group(3).upper() in {k.upper() for k in _GPU}:
    kind = next(k for k in _GPU if k.upper() == m.group(3).upper())
    a, b = m.group(1), m.group(2)
    hosts, per_host = (int(a), int(b)) if b else (1, int(a) if a else 1)
    if hosts < 1 or per_host < 1:
      raise ValueError(f"target {name!r}: host and GPU counts must be positive")
    frac = gpu_mem_fraction
    if frac is None:
      frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
    return Target(name=s, platform="gpu", kind=kind, num_devices=hosts * per_host,
                  devices_per_host=per_host, hbm_bytes=_GPU[kind]["hbm"],
                  peak_flops=_GPU[kind]["flops"], usable_fraction=frac)
  m = re.fullmatch(r"cpu-(\d+)", s, re.IGNORECASE)
  if m:
    n = int(m.group(1))
    # A test/planning target: "memory" is what this host's RAM would have to hold per device.
    return Target(name=s, platform="cpu", kind="cpu", num_devices=n, devices_per_host=n,
                  hbm_bytes=64 * GiB, peak_flops=0.0)
  raise ValueError(f"unknown target {name!r}: {_TARGET_HELP}")


# ------------------------------------------------------------------------------------------------
# Devices to compile for.
# ------------------------------------------------------------------------------------------------

def tpu_devices(target: Target):
  """Compile-only devices of a TPU slice from libtpu's topology description (no TPU needed).

  Raises RuntimeError saying what is missing when libtpu cannot be loaded.
  """
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) against two processes driving one
  # TPU; compiling touches no TPU, so two plans (or a plan beside training) may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chips_per_host = (2, 4, 1) if target.devices_per_host == 8 else (
      (2, 2, 1) if target.num_devices >= 4 else (1, 1, 1))
  try:
    desc = topologies.get_topology_desc(target.topology, "tpu", chip_config_name=target.chip_config,
                                        chips_per_host_bounds=chips_per_host, num_slices=1)
  except Exception as e:  # pylint: disable=broad-except  # no libtpu / incompatible libtpu
    raise RuntimeError(
        f"cannot describe TPU topology {target.topology} ({type(e).__name__}: {e}). Install the "
        "libtpu that jax[tpu] pins for this jax (`pip install 'jax[tpu]==<jax version>'`, or "
        "`pip install libtpu==<pinned>`), or point TPU_LIBRARY_PATH at a libtpu.so") from e
  devices = list(desc.devices)
  if len(devices) != target.num_devices:
    raise RuntimeError(f"libtpu described {len(devices)} devices for {target.topology}, expected "
                       f"{target.num_devices}")
  return devices


def ensure_cpu_devices(n: int, *, reexec: bool = True) -> None:
  """Makes `n` CPU devices available to this process (fake ones, for compiling only).

  XLA fixes the CPU device count when the backend starts, so: before that, set it; after it (with
  fewer devices), re-execute the same command with `--xla_force_host_platform_device_count=n`
  (reexec=True, the CLI) or raise naming the variable to set (reexec=False, library callers).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_num_cpu_devices", max(n, 1))
    if len(jax.devices("cpu")) >= n:
      return
  elif len(jax.devices("cpu")) >= n:
    return
  flag = f"--xla_force_host_platform_device_count={n}"
  if reexec and os.environ.get("_SOFTVQ_COMPILE_REEXEC") != "1":
    env = dict(os.environ, _SOFTVQ_COMPILE_REEXEC="1")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} {flag}".strip()
    print(f"compile_plan: restarting with XLA_FLAGS={env['XLA_FLAGS']!r} for {n} CPU devices",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable] + _original_argv(), env)
  raise RuntimeError(f"{n} CPU devices are needed, this process has {len(jax.devices('cpu'))}: "
                     f"run with XLA_FLAGS={flag} (set before jax is imported)")


def _original_argv() -> list[str]:
  """`python -m softvq_jax.main ...` or `python path/script.py ...` as this process was started."""
  orig = getattr(sys, "orig_argv", None)
  if orig and len(orig) > 1:
    return list(orig[1:])
  return list(sys.argv)


@contextlib.contextmanager
def _trace_for(platform: str):
  """Traces the model as it would be traced on `platform` while this process runs on the CPU.

  Why: the model picks CPU-only graph changes and the attention kernel from
  `jax.default_backend()` at trace time (models/vit.py). A TPU program compiled here must not
  carry the XLA:CPU-specific cotangent barrier. GPU programs compiled on CPU devices keep the
  CPU graph (cuDNN attention cannot be lowered for the CPU).
  """
  import jax  # pylint: disable=import-outside-toplevel
  if platform != "tpu":
    yield
    return
  original = jax.default_backend
  jax.default_backend = lambda: platform
  try:
    yield
  finally:
    jax.default_backend = original


# ------------------------------------------------------------------------------------------------
# Analytic estimate.
# ------------------------------------------------------------------------------------------------

def _vit_dims(size: str):
  from softvq_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.VIT_SIZES[size]


def _attention_backend(cfg, platform: str) -> str:
  if cfg.attention_backend != "auto":
    return cfg.attention_backend
  return "cudnn" if platform == "gpu" and cfg.compute_dtype in ("bfloat16", "float16") else "xla"


def _dtype_bytes(compute_dtype: str) -> int:
  return {"float32": 4, "bfloat16": 2, "float16": 2}[compute_dtype]


def _vit_cost(width: int, depth: int, heads: int, tokens: int, s: int, attn: str, *,
              remat: bool = False) -> tuple[float, float, float]:
  """(activation bytes saved for the backward, forward FLOPs, one block's activation bytes) of
  `depth` pre-norm blocks on `tokens` tokens, per image (see `analytic_per_image`)."""
  d, t, h = width, tokens, heads
  att_bytes = s * t * d + 4 * h * t if attn == "cudnn" else (4 + s) * h * t * t
  block = 18 * s * t * d + att_bytes
  act = (depth * s * t * d + block) if remat else depth * block
  flops = depth * (24 * t * d * d + 4 * t * t * d)
  return float(act), float(flops), float(block)


def analytic_per_image(cfg, platform: str) -> dict[str, float]:
  """The tokenizer's activation bytes saved for the backward pass and training FLOPs, per image.

  Per transformer block of T tokens, width D, H heads, MLP 4D, compute dtype of s bytes, without
  rematerialisation, the backward pass needs (Korthikanti et al. 2022's count for this block):
    s*T*D * 18     norm1 in, qkv in, q/k/v (3), attention out, proj out, residual, norm2 in/out
                   (counted as 2), fc1 out (4), GELU out (4), fc2 out
  + (4 + s)*H*T^2  float32 softmax output + its compute-dtype copy for the P.V matmul
                   (einsum attention; fused flash attention (cuDNN) saves only s*T*D + 4*H*T).
  With `remat` only each block's input (s*T*D) is kept, plus one block's full set while it is
  recomputed. Encoder T = 1 + P + N (cls, P patches, N latent tokens), decoder T = [1] + P + N.
  One more block's worth is live as cotangents while a block runs backward (the peak is at the
  decoder's top block). The soft quantizer keeps ~6 float32 [N, K] arrays (logits, probs,
  entropy softmax / log-softmax, one-hot histogram); pixels add the float32 image,
  reconstruction and patch tensors.

  FLOPs (multiply-add = 2): per block 24*T*D^2 (qkv 6, proj 2, MLP 16) + 4*T^2*D (QK^T, PV);
  plus the patch embedding, pixel head, token projections and the two [N, K, e] quantizer
  matmuls; training = 3x the forward (the backward costs twice the forward).

  The objective's other networks (LPIPS, discriminator, REPA teacher) are `objective_per_image`.
  """
  s = _dtype_bytes(cfg.compute_dtype)
  p, n = cfg.patch_size, cfg.num_latent_tokens
  patches = cfg.grid ** 2
  attn = _attention_backend(cfg, platform)

  def vit(size, prefix):
    d, depth, h = _vit_dims(size)
    t = prefix + patches + n
    act, flops, block = _vit_cost(d, depth, h, t, s, attn, remat=cfg.remat)
    act += 2 * s * t * d  # final norm in/out
    return act, flops, d, block

  enc_act, enc_flops, de, enc_block = vit(cfg.encoder_size, 1)
  dec_act, dec_flops, dd, dec_block = vit(cfg.decoder_size, 1 if cfg.dec_cls_token else 0)
  # The backward pass of a block needs cotangents the size of that block's activations, live
  # next to everything saved: the peak is reached at the decoder's top block.
  working = max(enc_block, dec_block)
  k, e = cfg.codebook_size, cfg.codebook_embed_dim
  quant_act = 6 * 4 * n * k
  pixels = cfg.image_size ** 2 * 3
  pixel_act = 4 * pixels * 3 + s * pixels * 2
  fwd = (enc_flops + dec_flops + 2 * patches * (3 * p * p) * (de + dd)
         + 2 * n * e * (de + dd) + 2 * 2 * n * k * e)
  return {"activation_bytes": float(enc_act + dec_act + working + quant_act + pixel_act),
          "working_bytes": float(working), "train_flops": float(3 * fwd), "attention": attn}


def _vgg16_cost(size: int) -> tuple[float, float, float]:
  """(sum of the 13 conv outputs' elements, sum of the 5 read-outs' elements, forward FLOPs) of
  LPIPS-VGG16 on one size x size image (3x3 convs, padding 1, 2x2 pools before stages 2-5).

  FLOPs count the taps that fall inside the image, (3h - 2)^2 of the 9h^2 per output plane, as
  XLA's cost analysis does (the zero padding is not work)."""
  from softvq_jax.models.lpips import VGG16_STAGES  # pylint: disable=import-outside-toplevel
  h, cin = size, 3
  conv_elems = readout_elems = flops = 0
  for k, stage in enumerate(VGG16_STAGES):
    if k:
      h //= 2
    for cout in stage:
      conv_elems += h * h * cout
      flops += 2 * (3 * h - 2) ** 2 * cin * cout
      cin = cout
    readout_elems += h * h * cin
  return float(conv_elems), float(readout_elems), float(flops)


def objective_per_image(config, platform: str) -> dict[str, dict[str, float]]:
  """Activation bytes and training FLOPs per image of the objective's other networks, by part.

  Only terms whose weight is > 0 appear (`objective.build_objective` builds nothing else).
  s = compute-dtype bytes; einsum/cuDNN attention as for the tokenizer (`analytic_per_image`,
  whose block formula `_vit_cost` is reused for the ViTs here). Their frozen weights are state
  (exact, `state_bytes["frozen"]`), not counted here.

  lpips (x and x_hat through VGG16 at the image size S; gradient to x_hat only):
    bytes  = 2*s*E + 8*R, E = sum of the 13 conv outputs' elements (a ReLU mask and the pooled
             input per layer), R = sum of the 5 read-outs (x_hat's float32 feature and the float32
             difference of the unit-normalised features, both needed by the backward). x's VGG
             pass is forward-only: only its read-outs live until the difference is taken.
    flops  = 3 * F_vgg (x forward, x_hat forward, x_hat input-gradient: no weight gradients),
             F_vgg = sum over the convs of 2*(3h-2)^2*C_in*C_out (taps inside the h x h image).
  disc (DINO ViT-S/16 at disc.img_size, T = 1 + P tokens, the blocks up to the last read-out;
        5 heads Block(k=1) -> Block(k=9) -> conv(D->1) on [P, D]):
    generator step, 1 call, gradient to the image through the frozen backbone:
      bytes_g = backbone blocks (`_vit_cost`) + n_heads * c_h * P*D + 4 float32 image copies
                (DiffAugment and the resize to the backbone's size);
      flops_g = 2 * (F_backbone + F_heads)   (forward + input gradient);
    discriminator step, n = 2 calls (real, detached x_hat) + 2 with consistency regularisation,
    backbone forward only (its input carries no gradient), gradient to the heads:
      bytes_d = n * n_heads * c_h * P*D;
      flops_d = n * (F_backbone + 3 * F_heads);
    c_h = 6*s + 8: per head, the conv inputs/outputs and LeakyReLU masks in the compute dtype and
    the two BatchNorms' float32 normalised activations. F_heads = n_heads * 2*P*(D^2 + k*D^2 + D).
  repa (DINOv2 teacher at the image size, patch repa.patch_size, forward only: its activations
        die block by block; the REPA projector e -> h -> h -> D_t on the N latent tokens):
    bytes  = 4*P_t*D_t (the teacher's float32 tokens, kept for the loss) + the projector's
             s*N*(2h + D_t) + float32 4*N*D_t;
    flops  = F_teacher + 3 * F_projector.
  With `loss.adaptive_weight` two more forwards of the generator objective and the backward
  through LPIPS / the discriminator to x_hat are added (FLOPs only: they run one after another).

  The generator step's parts are live together at its peak; the discriminator step runs after
  it (on the reconstruction and the new state), so the estimate takes the larger of the two.
  `working` is one block of the largest ViT that runs forward only there (a transient).
  """
  lc = config.loss
  s = _dtype_bytes(config.model.compute_dtype)
  attn = _attention_backend(config.model, platform)
  size = config.image_size
  gen, disc_step, flops, working = {}, {}, {}, 0.0
  if lc.perceptual_weight > 0:
    e, r, f = _vgg16_cost(size)
    gen["lpips"] = 2 * s * e + 8 * r
    flops["lpips"] = 3 * f
  if lc.gan_weight > 0:
    d = config.disc
    width, depth, heads = _vit_dims(d.backbone_size)
    used = max(int(i) for i in d.readout_blocks) + 1
    patches = (d.img_size // d.patch_size) ** 2
    t = 1 + patches
    bb_act, bb_flops, bb_block = _vit_cost(width, used, heads, t, s, attn)
    bb_flops += 2 * patches * 3 * d.patch_size ** 2 * width
    n_heads = 1 + len(d.readout_blocks)
    head_act = n_heads * (6 * s + 8) * patches * width
    head_flops = n_heads * 2 * patches * (width ** 2 * (1 + d.head_kernel_size) + width)
    calls = 2 + (2 if lc.cr_weight > 0 else 0)
    gen["disc"] = bb_act + head_act + 4 * 4 * 3 * (size ** 2 + d.img_size ** 2)
    disc_step["disc"] = calls * head_act
    flops["disc_generator_step"] = 2 * (bb_flops + head_flops)
    flops["disc_discriminator_step"] = calls * (bb_flops + 3 * head_flops)
    working = max(working, bb_block)
  if lc.repa_weight > 0:
    r = config.repa
    tw, tdepth, th = _vit_dims(r.teacher_size)
    tdepth = int(r.teacher_depth) or tdepth
    tp = (size // r.patch_size) ** 2
    _, t_flops, t_block = _vit_cost(tw, tdepth, th, 1 + tp, s, attn)
    t_flops += 2 * tp * 3 * r.patch_size ** 2 * tw
    n, e, h = config.model.num_latent_tokens, config.model.codebook_embed_dim, r.hidden_dim
    gen["repa"] = 4 * tp * tw + s * n * (2 * h + tw) + 4 * n * tw
    flops["repa"] = t_flops + 3 * 2 * n * (e * h + h * h + h * tw)
    working = max(working, t_block)
  if lc.adaptive_weight and lc.gan_weight > 0:
    # pylint: disable-next=import-outside-toplevel
    from softvq_jax.models.tokenizer import TokenizerConfig
    tok_fwd = analytic_per_image(TokenizerConfig.from_config(config), platform)["train_flops"] / 3
    extra = 2 * tok_fwd + flops["disc_generator_step"]
    if "lpips" in flops:  # (REPA is not part of either gradient: XLA drops it there)
      extra += flops["lpips"]
    flops["adaptive_weight"] = extra
  return {"generator_step_bytes": gen, "discriminator_step_bytes": disc_step,
          "train_flops": flops, "working_bytes": working}


def _state_bytes(trainer) -> dict[str, int]:
  """Per-device bytes of each part of the TrainState (params, ema_params, opt_state, ...) and of
  the frozen networks the step takes beside it ("frozen")."""
  from softvq_jax import sharding  # pylint: disable=import-outside-toplevel
  parts = {f.name: (getattr(trainer.abstract_state, f.name), getattr(trainer.state_sharding, f.name))
           for f in dataclasses.fields(trainer.abstract_state)}
  parts["frozen"] = (trainer.abstract_frozen, trainer.frozen_sharding)
  out = {}
  for name, (a, s) in parts.items():
    if a is None or not _leaves(a):
      continue
    out[name] = int(sharding.per_device_bytes(a, s))
  out["total"] = sum(out.values())
  return out


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


def analytic_estimate(config, target: Target, trainer) -> dict[str, Any]:
  """Per-device memory and per-step FLOPs without compiling (see `analytic_per_image` and
  `objective_per_image`).

  total = state (exact, from the sharding plan: parameters, EMA, both optimizers' moments, the
  discriminator's statistics and the frozen networks) + batch + gradients (float32, sharded like
  the parameters: tokenizer + REPA projector + discriminator heads) + with
  `frozen_sharding="fsdp"` the all-gathered frozen weights + per-device micro-batch x
  activations per image, where activations per image = max(generator step, discriminator step):
    generator step     = tokenizer + LPIPS + discriminator (1 call, backward to the image) +
                         REPA (+ a forward-only block larger than the tokenizer's, if any);
    discriminator step = 2 (+2 with consistency regularisation) calls' head activations.
  Checked against compiled numbers in tests/test_compile.py and docs/memory_planning.md.
  """
  from softvq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=import-outside-toplevel
  cfg = TokenizerConfig.from_config(config)
  state = _state_bytes(trainer)
  per_dev_batch = per_device_batch(config, trainer.mesh)
  micro = max(per_dev_batch // max(int(config.grad_accum_steps), 1), 1)
  img = analytic_per_image(cfg, target.platform)
  obj = objective_per_image(config, target.platform)
  batch_bytes = _batch_bytes(config, per_dev_batch)
  grads = sum(state.get(k, 0) for k in ("params", "proj_params", "disc_params"))
  by_part = {"tokenizer": img["activation_bytes"], **obj["generator_step_bytes"]}
  generator = sum(by_part.values()) + max(obj["working_bytes"] - img["working_bytes"], 0.0)
  discriminator = sum(obj["discriminator_step_bytes"].values())
  if discriminator:
    by_part["disc_discriminator_step"] = discriminator
  per_image = max(generator, discriminator)
  activations = micro * per_image
  # FSDP-split frozen networks are all-gathered for use; XLA may hold every gathered copy at
  # once (measured on XLA:CPU), so count the full weights less the shard already in the state.
  gathered = 0
  if state.get("frozen") and config.frozen_sharding == "fsdp":
    gathered = sum(int(math.prod(x.shape)) * x.dtype.itemsize
                   for x in _leaves(trainer.abstract_frozen)) - state["frozen"]
  total = state["total"] + batch_bytes + grads + activations + gathered
  flops_by_part = {"tokenizer": img["train_flops"], **obj["train_flops"]}
  flops = sum(flops_by_part.values())
  return {
      "state_bytes": state,
      "batch_bytes": batch_bytes,
      "gradient_bytes": grads,
      "gathered_frozen_bytes": gathered,
      "activation_bytes": activations,
      "activation_bytes_per_image": per_image,
      "activation_bytes_by_part": by_part,
      "attention": img["attention"],
      "total_bytes": total,
      "train_flops_per_image": flops,
      "train_flops_by_part": flops_by_part,
      "train_flops_per_step": flops * int(config.batch_size),
  }


def _batch_bytes(config, per_dev_batch: int) -> int:
  itemsize = 1 if config.data.output_dtype == "uint8" else 4
  return per_dev_batch * config.image_size ** 2 * 3 * itemsize


def per_device_batch(config, mesh) -> int:
  """Images each device processes per step; the global batch must split evenly."""
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if config.batch_size % shards:
    raise ValueError(f"config.batch_size={config.batch_size} does not split over the "
                     f"{shards} data x fsdp shards of mesh {dict(mesh.shape)}: use a multiple of "
                     f"{shards}")
  return config.batch_size // shards


# ------------------------------------------------------------------------------------------------
# Compilation.
# ------------------------------------------------------------------------------------------------

def _memory(compiled, platform: str) -> dict[str, int]:
  mem = compiled.memory_analysis()
  if isinstance(mem, (list, tuple)):
    mem = mem[0]
  g = lambda k: int(getattr(mem, k, 0) or 0)  # noqa: E731
  out = {"argument_bytes": g("argument_size_in_bytes"), "output_bytes": g("output_size_in_bytes"),
         "alias_bytes": g("alias_size_in_bytes"), "temp_bytes": g("temp_size_in_bytes"),
         "generated_code_bytes": g("generated_code_size_in_bytes")}
  # Live at the peak: inputs + outputs not written in place of a (donated) input + temporaries;
  # on accelerators the program itself sits in device memory too.
  total = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  if platform != "cpu":
    total += out["generated_code_bytes"]
  peak = g("peak_memory_in_bytes")
  if peak:
    out["peak_bytes"] = peak
  out["total_bytes"] = total
  return out


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-dependent
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get("flops", 0.0)) if cost else None


def _out_of_memory(e: Exception) -> bool:
  msg = str(e)
  return "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg


def choose_method(target: Target) -> str:
  """tpu-aot for TPU slices when libtpu is usable, attached for matching local devices, else
  cpu-aot (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  if target.platform == "tpu":
    return "tpu-aot"
  try:
    local = jax.devices(target.platform) if target.platform != "cpu" else []
  except RuntimeError:
    local = []
  kind = local[0].device_kind.upper() if local else ""
  if len(local) == target.num_devices and target.kind.upper() in kind:
    return "attached"
  return "cpu-aot"


def make_mesh(config, target: Target, method: str):
  """The config's (data, fsdp, tensor) mesh over the target's devices (abstract for analytic)."""
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax import sharding  # pylint: disable=import-outside-toplevel
  shape = sharding.resolve_mesh_shape(config.mesh_shape, target.num_devices)
  if method == "analytic":
    return jax.sharding.AbstractMesh(shape, sharding.MESH_AXES)
  if method == "tpu-aot":
    devices = tpu_devices(target)
  elif method == "attached":
    devices = jax.devices(target.platform)
  else:
    devices = jax.devices("cpu")[:target.num_devices]
    if len(devices) < target.num_devices:
      raise RuntimeError(f"{target.num_devices} CPU devices needed for {target.name}, found "
                         f"{len(devices)}: call ensure_cpu_devices({target.num_devices}) first")
  return sharding.create_mesh(shape, devices=devices)


def plan(config, target: Target | str, *, method: str | None = None) -> dict[str, Any]:
  """Compiles (or estimates) `config`'s train step on `target`; returns the report (a dict).

  method: None = `choose_method(target)`, falling back to "cpu-aot" (then "analytic") with the
  reason recorded in `fallback_reason` when the preferred one cannot run here. "analytic"
  skips compilation.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax import config_lib, train  # pylint: disable=import-outside-toplevel
  config_lib.validate(config)
  target = parse_target(target) if isinstance(target, str) else target
  method = method or choose_method(target)
  notes = []
  t0 = time.time()
  try:
    mesh = make_mesh(config, target, method)
  except RuntimeError as e:
    if method == "analytic":
      raise
    notes.append(f"{method} unavailable: {e}")
    method = "cpu-aot" if method == "tpu-aot" and len(jax.devices("cpu")) >= target.num_devices \
        else "analytic"
    mesh = make_mesh(config, target, method)
  per_dev = per_device_batch(config, mesh)
  with _trace_for(target.platform if method != "cpu-aot" else "cpu"):
    trainer = train.build_trainer(config, mesh)
    analytic = analytic_estimate(config, target, trainer)
    report = _base_report(config, target, mesh, per_dev, trainer, analytic)
    report["method"] = method
    if notes:
      report["fallback_reason"] = "; ".join(notes)
    if method != "analytic":
      t1 = time.time()
      lowered = trainer.p_step.lower(*trainer.abstract_args(config))
      try:
        compiled = lowered.compile()
      except Exception as e:  # pylint: disable=broad-except
        if not _out_of_memory(e):
          raise
        report["compiled"] = None
        report["compile_error"] = str(e)[:4000]
        report["fits"] = False
        report["total_bytes"] = None
      else:
        report["compile_seconds"] = round(time.time() - t1, 1)
        mem = _memory(compiled, "cpu" if method == "cpu-aot" else target.platform)
        report["compiled"] = mem
        flops = _flops(compiled)
        report["flops"]["compiled_per_device"] = flops
        report["total_bytes"] = mem["total_bytes"]
        report["fits"] = mem["total_bytes"] <= target.usable_bytes
    else:
      report["compiled"] = None
      report["total_bytes"] = analytic["total_bytes"]
      report["fits"] = analytic["total_bytes"] <= target.usable_bytes
  report["seconds"] = round(time.time() - t0, 1)
  return report


def _base_report(config, target: Target, mesh, per_dev: int, trainer, analytic) -> dict:
  from softvq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=import-outside-toplevel
  cfg = TokenizerConfig.from_config(config)
  n_params = sum(int(math.prod(x.shape)) for x in _leaves(trainer.abstract_state.params))
  flops_step = analytic["train_flops_per_step"]
  devices = target.num_devices
  step_at_peak = (flops_step / (target.peak_flops * devices)) if target.peak_flops else None
  return {
      "target": dataclasses.asdict(target) | {"usable_bytes": target.usable_bytes},
      "model": {"encoder": cfg.encoder_size, "decoder": cfg.decoder_size,
                "image_size": cfg.image_size, "num_latent_tokens": cfg.num_latent_tokens,
                "codebook_embed_dim": cfg.codebook_embed_dim, "compute_dtype": cfg.compute_dtype,
                "remat": cfg.remat, "params": n_params},
      "mesh_shape": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": int(config.batch_size),
      "per_device_batch": per_dev,
      "grad_accum_steps": int(config.grad_accum_steps),
      "state_bytes": analytic["state_bytes"],
      "analytic": analytic,
      "flops": {"per_step_analytic": flops_step,
                "per_device_analytic": flops_step / devices,
                "step_seconds_at_peak": step_at_peak,
                "images_per_second_at_50pct_mfu": (config.batch_size / step_at_peak * 0.5
                                                   if step_at_peak else None)},
  }


# ------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------

_UNIT = [GiB, "GiB"]


def _gib(b) -> str:
  return "-" if b is None else f"{b / _UNIT[0]:8.3f}"


def _temporaries(a: dict) -> float:
  """The analytic counterpart of the compiled temporaries."""
  return a["gradient_bytes"] + a.get("gathered_frozen_bytes", 0) + a["activation_bytes"]


def format_report(r: dict) -> str:
  """The printed table: per-device memory by part, vs the device's memory; FLOPs per step."""
  t, m = r["target"], r["model"]
  c, a = r.get("compiled"), r["analytic"]
  _UNIT[:] = [GiB, "GiB"] if a["total_bytes"] >= GiB / 4 else [2 ** 20, "MiB"]
  lines = [
      f"SoftVQ {m['encoder']}/{m['decoder']}-{m['num_latent_tokens']} (token dim "
      f"{m['codebook_embed_dim']}) at {m['image_size']} px "
      f"({m['params'] / 1e6:.1f}M params, {m['compute_dtype']}) on {t['name']}: "
      f"{t['num_devices']} x {t['kind']} (mesh {r['mesh_shape']}), method {r['method']}",
      f"global batch {r['global_batch']} = {r['per_device_batch']} per device"
      + (f" ({r['grad_accum_steps']} micro-batches)" if r["grad_accum_steps"] > 1 else ""),
      f"{'per device (' + _UNIT[1] + ')':34s} {'compiled':>8s} {'analytic':>8s}",
  ]
  sb = r["state_bytes"]
  for k, v in sb.items():
    if k != "total":
      lines.append(f"  state.{k:26s} {'':>8s} {_gib(v)}")
  lines.append(f"  {'state total':32s} {'':>8s} {_gib(sb['total'])}")
  if c:
    lines.append(f"  {'arguments (state + batch)':32s} {_gib(c['argument_bytes'])} "
                 f"{_gib(sb['total'] + a['batch_bytes'])}")
    lines.append(f"  {'outputs not aliased':32s} {_gib(c['output_bytes'] - c['alias_bytes'])}")
    lines.append(f"  {'temporaries (grads + activations)':32s} {_gib(c['temp_bytes'])} "
                 f"{_gib(_temporaries(a))}")
    lines.append(f"  {'program':32s} {_gib(c['generated_code_bytes'])}")
  else:
    lines.append(f"  {'gradients':32s} {'':>8s} {_gib(a['gradient_bytes'])}")
    if a.get("gathered_frozen_bytes"):
      lines.append(f"  {'frozen weights all-gathered':32s} {'':>8s} "
                   f"{_gib(a['gathered_frozen_bytes'])}")
    lines.append(f"  {'activations':32s} {'':>8s} {_gib(a['activation_bytes'])}")
    for k, v in a.get("activation_bytes_by_part", {}).items():
      lines.append(f"    {'per image: ' + k:30s} {'':>8s} {_gib(v)}")
  lines.append(f"  {'TOTAL':32s} {_gib(c['total_bytes'] if c else None)} {_gib(a['total_bytes'])}")
  usable = t["usable_bytes"]
  lines.append(f"  {'device memory usable':32s} {'':>8s} {_gib(usable)}  (HBM "
               f"{t['hbm_bytes'] / GiB:.1f} GiB x {t['usable_fraction']:.2f})")
  if r.get("compile_error"):
    lines.append("  compile failed for lack of memory: " + r["compile_error"].splitlines()[0][:300])
  f = r["flops"]
  lines.append(f"FLOPs per step {f['per_step_analytic']:.3e} (analytic), per device "
               f"{f['per_device_analytic']:.3e}"
               + (f", compiled {f['compiled_per_device']:.3e}" if f.get("compiled_per_device")
                  else ""))
  if f["step_seconds_at_peak"]:
    lines.append(f"step time at 100% MFU {f['step_seconds_at_peak'] * 1e3:.1f} ms; "
                 f"{f['images_per_second_at_50pct_mfu']:.0f} images/s at 50% MFU")
  lines.append("FITS" if r["fits"] else "DOES NOT FIT")
  if r.get("fallback_reason"):
    lines.append("note: " + r["fallback_reason"])
  return "\n".join(lines)


def advice(r: dict) -> str:
  """What to change when it does not fit."""
  return (f"config does not fit {r['target']['name']}: {_gib(r['total_bytes']).strip()} GiB per "
          f"device needed, {_gib(r['target']['usable_bytes']).strip()} GiB usable. Lower "
          "config.batch_size, raise config.grad_accum_steps, set config.model.remat=True, or shard "
          "the state with config.mesh_shape=(1,-1,1) (FSDP)")


def run(config, workdir: str, target_name: str) -> dict:
  """The `--mode=compile` entry: plan, write `<workdir>/compile_<target>.json`, print the table.

  Raises SystemExit (non-zero) with advice when the step does not fit.
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  target = parse_target(target_name)
  # Fake CPU devices for cpu-aot (GPU targets, and the fallback of TPU ones): cheap to declare
  # before JAX starts; re-executing the command for them is only worth it for non-TPU targets.
  if target.platform == "tpu" and not xla_bridge.backends_are_initialized() and not \
      os.environ.get("JAX_PLATFORMS"):
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")  # libtpu is used for its compiler only
  if target.platform != "tpu" or not xla_bridge.backends_are_initialized():
    ensure_cpu_devices(target.num_devices, reexec=True)
  report = plan(config, target)
  path = paths.resolve(workdir) / f"compile_{re.sub(r'[^A-Za-z0-9_.-]', '_', target.name)}.json"
  paths.write_json(path, report, default=float)  # float: the report's numpy scalars
  print(format_report(report), flush=True)
  print(f"wrote {path}", flush=True)
  if not report["fits"]:
    raise SystemExit(advice(report))
  return report


# ------------------------------------------------------------------------------------------------
# The docs table: largest per-device batch that fits, per released size and target.
# ------------------------------------------------------------------------------------------------

def max_batch_per_device(report: dict) -> int:
  """Largest per-device batch whose analytic total fits the target (state and gradients are
  batch-independent, activations linear in the batch)."""
  a, t = report["analytic"], report["target"]
  fixed = a["state_bytes"]["total"] + a["gradient_bytes"] + a.get("gathered_frozen_bytes", 0)
  per_image = (a["activation_bytes_per_image"]
               + a["batch_bytes"] / max(report["per_device_batch"], 1))
  return max(int((t["usable_bytes"] - fixed) // per_image), 0)


def _table_main(argv: list[str]) -> None:
  """python -m softvq_jax.compile_plan [--targets=...] [--remat] [--pixel_only]: the markdown
  table (analytic) of the largest per-device batch; the config's full objective by default.

  All targets must have the same number of devices (the state plan is built once per model).
  """
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=_table_main.__doc__)
  parser.add_argument("--targets", default="v5e-8,v4-16,v6e-8,v5p-16,8xH100")
  parser.add_argument("--variants", default="",
                      help="comma-separated softvq_jax/variants.py names (default: every released "
                           "variant)")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--pixel_only", action="store_true",
                      help="pixel + entropy loss only (perceptual, GAN and REPA weights 0)")
  args = parser.parse_args(argv)
  from softvq_jax import config_lib, train, variants  # pylint: disable=import-outside-toplevel
  targets = [parse_target(t) for t in args.targets.split(",")]
  n = targets[0].num_devices
  if any(t.num_devices != n for t in targets):
    raise SystemExit("--targets must all have the same number of devices")
  chosen = ([variants.by_name(v) for v in args.variants.split(",")] if args.variants
            else [v for v in variants.VARIANTS if v.released])
  print("| model (config) | enc/dec | px | tokens x e | params | " + " | ".join(
      f"{t.name} ({t.usable_bytes / GiB:.0f} GiB)" for t in targets) + " |")
  print("|---|---|---|---|---|" + "---|" * len(targets))
  for v in chosen:
    config = config_lib.base_config(v)
    config.model.remat = args.remat
    if args.pixel_only:
      config.loss.perceptual_weight = config.loss.gan_weight = config.loss.repa_weight = 0.0
    config.batch_size = n  # 1 per device; the state does not depend on it
    mesh = make_mesh(config, targets[0], "analytic")
    with _trace_for("tpu"):
      trainer = train.build_trainer(config, mesh)
    cells, params = [], 0
    for t in targets:
      r = _base_report(config, t, mesh, 1, trainer, analytic_estimate(config, t, trainer))
      params = r["model"]["params"]
      cells.append(str(max_batch_per_device(r)))
    print(f"| {v.name} (`{v.config_file}.py:{v.config_arg}`) | {v.architecture} | "
          f"{v.image_size} | {v.num_latent_tokens} x {v.codebook_embed_dim} | "
          f"{params / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  _table_main(sys.argv[1:])
