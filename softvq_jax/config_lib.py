"""Helpers shared by the ml_collections files in `configs/`.

Configs are code (big_vision style): each `configs/*.py` builds a `ConfigDict` from the tables and
section builders here, so every released SoftVQ variant is a one-liner and every value a user may
change is a config field that can be overridden from the command line (`--config.batch_size=64`).
`validate` is run at start-up and names the first bad field.
"""
from __future__ import annotations

import ml_collections

from softvq_jax import axes, variants
from softvq_jax.models import vit

# ViT sizes live with the ViT (models/vit.py); re-exported here for config code.
VIT_SIZES = vit.VIT_SIZES

ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "jax")
PLATFORMS = vit.PLATFORMS
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("demo", "folder", "tfds")
TRAIN_TRANSFORMS = ("random_crop", "center_crop_flip")
OPTIMIZERS = ("adamw", "adam")
RECONSTRUCTION_LOSSES = ("l2", "l1")

# logical axis -> mesh axis (or None = replicated). `embed` over fsdp gives ZeRO-3-style
# parameter/optimizer sharding; the rest is tensor parallelism when the tensor axis is > 1.
DEFAULT_SHARDING_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("vocab", "fsdp"),  # the codebook [C, K, e] has no embed axis; split its K codes
    ("norm", None),
)


def model_config(variant: variants.Variant):
  """Model section building exactly `variant` (spec.md §1-2; softvq_jax/variants.py)."""
  return ml_collections.ConfigDict(dict(
      encoder_size=variant.encoder_size,
      decoder_size=variant.decoder_size,
      patch_size=16,
      num_latent_tokens=variant.num_latent_tokens,
      # Soft codebook (spec.md §1.3): 4 codebooks x 8192; token dim e = 64 for 32 tokens, 32 for 64.
      codebook_size=variants.CODEBOOK_SIZE,
      codebook_embed_dim=variant.codebook_embed_dim,
      num_codebooks=variants.NUM_CODEBOOKS,
      codebook_l2_norm=True,
      tau=0.07,
      dec_cls_token=True,
      # DINOv2 LayerScale init (the weights are learned; only matters from scratch).
      layer_scale_init=1e-5,
      # Activations/matmuls; parameters stay float32. bfloat16 on TPU/GPU, float32 on CPU.
      compute_dtype="bfloat16",
      attention_backend="auto",
      # The platform the graphs are built for ("cpu", "gpu", "tpu"): it picks the "auto"
      # attention kernel and CPU-only graph changes (softvq_jax/models/vit.py). "auto" = the
      # backend of the process that builds the model; --mode=compile sets it for its target.
      platform="auto",
      # Rematerialise every transformer block in the backward pass (saves activation memory).
      remat=False,
      # Scalar latent statistics for generators: z_norm = (z - vq_mean) / vq_std. Defaults: the
      # released model's values where known (so a fresh checkpoint is never silently
      # unnormalised); `--mode=stats` replaces them with the measured ones.
      vq_mean=0.0 if variant.vq_mean is None else variant.vq_mean,
      vq_std=1.0 if variant.vq_std is None else variant.vq_std,
  ))


def data_config():
  """Data section (input pipeline, `softvq_jax/data.py`; docs/data.md)."""
  return ml_collections.ConfigDict(dict(
      # one of DATA_SOURCES. Real runs read ImageNet: TFDS imagenet2012 as ArrayRecord in the TFDS
      # data dir (path = data_dir, "" = TFDS's default), or an image folder (source="folder").
      # Only configs/demo.py uses the embedded photographs ("demo").
      source="tfds",
      path="",              # image-folder root, or TFDS data_dir
      tfds_name="imagenet2012",
      train_split="train",
      eval_split="validation",  # image folder: <path>/validation or <path>/val
      num_workers=0,        # grain worker processes (0 = in the main process)
      prefetch_buffer_size=2,  # batches buffered per worker process
      num_threads=8,        # decode threads inside each process (PIL releases the GIL)
      read_buffer_size=64,  # decoded images buffered per process ahead of batching
      # image-folder file-list cache ("" = ~/.cache/softvq_jax/filelists; never inside the data)
      cache_dir="",
      # uint8 until the device (4x fewer bytes); the trainer applies pixels.to_model_range.
      output_dtype="uint8",
      # The train transform: "random_crop" (the tokenizer's: ADM random_crop_arr + flip) or
      # "center_crop_flip" (ADM center_crop_arr + horizontal flip p 0.5: what the generators'
      # images get, spec.md §8; used by generator training with online encoding).
      train_transform="random_crop",
      # Demo data (source="demo"): crops of scikit-image's bundled photographs.
      demo_train_size=4096,
      demo_eval_size=512,
  ))


def optim_config():
  """Optimizer, schedule, clipping and EMA (spec.md §5, as the released code actually runs)."""
  return ml_collections.ConfigDict(dict(
      # "adamw": decoupled weight decay on parameters with >= 2 dims (the reference's grouping:
      # no decay on biases, norms, LayerScale). "adam": plain Adam, weight_decay ignored — what the
      # released training script runs (its AdamW setting never reaches the optimizer).
      name="adamw",
      lr=1e-4,                 # at global batch 256; scaled by batch_size / 256 if lr_batch_scaling
      lr_batch_scaling=True,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=1e-4,
      # timm cosine schedule, per step (spec.md §5): linear warm-up from an absolute warmup_init_lr,
      # then min_lr + (lr - min_lr) * (1 + cos(pi * t / num_train_steps)) / 2 (cosine from step 0).
      warmup_steps=5005,       # one ImageNet epoch at batch 256
      warmup_init_lr=1e-5,
      min_lr_ratio=0.1,
      grad_clip_norm=1.0,      # global norm; <= 0 disables
      ema_decay=0.9999,        # EMA of all generator parameters, after every step
  ))


def loss_config():
  """Weights of the generator objective (spec.md §5). Each term's weight is a schedule of the step."""
  return ml_collections.ConfigDict(dict(
      reconstruction="l2",     # pixel loss: mean((x - x_hat)^2) ("l2") or mean(|x - x_hat|) ("l1")
      reconstruction_weight=1.0,
      entropy_weight=0.01,     # the reference's entropy_loss_ratio
      # LPIPS-VGG perceptual loss (config.pretrained.lpips): weight * min(1, step / warmup).
      perceptual_weight=1.0,
      perceptual_warmup_steps=10_000,
      # Dropout before each LPIPS head, active in the loss as in the official training (LPIPS in
      # train mode); never in evaluation. 0 = off.
      perceptual_dropout=0.5,
      # REPA (config.pretrained.repa_teacher, config.repa): weight * -cos(teacher, projector(z_q)).
      repa_weight=0.1,
      # GAN (config.pretrained.dino, config.disc): generator term weight from disc_start on, and
      # the discriminator loss weight w_d(t) (spec.md §5). 0 turns the discriminator off entirely.
      gan_weight=0.2,
      disc_start=20_000,
      disc_loss="hinge",       # hinge (released) | vanilla | non-saturating
      gen_adv_loss="hinge",    # hinge: -mean D(x_hat) (released) | non-saturating
      # Adaptive generator weight ||grad L_rec+p|| / ||grad L_adv|| at the pixel head (off in the
      # release; the authors suggest trying it when the released config under-performs).
      adaptive_weight=False,
      lecam_weight=0.001,
      lecam_decay=0.999,
      cr_weight=4.0,           # consistency regularisation, from disc_start on (0 = off)
      disc_aug="color,translation,cutout_0.2",
      disc_aug_prob=0.5,
      cr_aug="color,translation,cutout_0.5",
      cr_aug_prob=1.0,
  ))


def disc_config():
  """The DINO discriminator (spec.md §5.1): frozen DINO ViT-S/16 at 224 px + 5 readout heads."""
  return ml_collections.ConfigDict(dict(
      backbone_size="S",
      img_size=224,
      patch_size=16,
      readout_blocks=(2, 5, 8, 11),
      head_kernel_size=9,
  ))


def repa_config():
  """REPA (spec.md §5): frozen DINOv2 teacher at patch 16 / the image size, projector MLP on z_q."""
  return ml_collections.ConfigDict(dict(
      teacher_size="L",
      patch_size=16,
      teacher_depth=0,         # 0 = the size's depth (tests use fewer blocks)
      hidden_dim=1024,
  ))


def pretrained_config():
  """Files of the frozen pretrained networks (evaluation and the training objective).

  Empty = not given: whatever needs the network fails at start-up naming the field, unless
  `allow_random_init` is set (demo/tests only: the metric names then say "random").
  """
  return ml_collections.ConfigDict(dict(
      # FID Inception-v3: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or its .safetensors
      # conversion (python -m softvq_jax.convert.inception_weights).
      inception="",
      # LPIPS-VGG: one .safetensors made by `python -m softvq_jax.convert.lpips_weights` from
      # torchvision's vgg16-397923af.pth and the lpips package's vgg.pth heads.
      lpips="",
      # DINO ViT-S/16 discriminator backbone: dino_deitsmall16_pretrain.pth (or .safetensors).
      dino="",
      # REPA teacher: timm DINOv2 weights (e.g. vit_large_patch14_dinov2 model.safetensors).
      repa_teacher="",
      # Where fetched + converted frozen networks are cached ("" = the user's cache directory,
      # ~/.cache/softvq_jax or $XDG_CACHE_HOME/softvq_jax; a gs:// path can be shared by a pod).
      cache_dir="",
      # Empty fields above are filled from the cache, fetching missing files when online.
      auto_fetch=True,
      allow_random_init=False,
  ))


def eval_config():
  """Evaluation (softvq_jax/evaluate.py): `--mode=eval` and the in-loop evaluation."""
  return ml_collections.ConfigDict(dict(
      num_images=0,          # --mode=eval: first N images of data.eval_split (0 = all: 50k)
      batch_size=0,          # global eval batch (0 = config.batch_size)
      every_steps=0,         # in-loop evaluation of the EMA weights every N steps (0 = off)
      in_loop_num_images=1000,
      num_grid_images=8,
      reference_stats="",    # optional .npz with mu/sigma (e.g. an ADM reference batch)
  ))


def latents_config():
  """The latent contract (softvq_jax/latents.py): `--mode=stats` and `--mode=extract`."""
  return ml_collections.ConfigDict(dict(
      split="train",         # the split whose tokens are measured / extracted
      num_images=50_000,     # --mode=stats: images used (0 = the whole split)
      batch_size=0,          # global batch (0 = config.batch_size)
      flip=False,            # --mode=extract: also store tokens of the horizontal flips
      chunk_batches=50,      # --mode=extract: batches per .npz chunk (the unit of resume)
      out_dir="",            # --mode=extract: default <workdir>/tokens
  ))


def variant_config(config_file: str, config_arg: str):
  """The config of `--config=configs/<config_file>.py:<config_arg>` (one row of variants.py)."""
  return base_config(variants.find(config_file, config_arg))


def base_config(variant: variants.Variant):
  """Everything a run of `variant` needs, with the published recipe's values where they exist."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = variant.image_size
  config.model = model_config(variant)
  config.data = data_config()
  config.batch_size = 256  # global batch
  # Split each global batch into this many sequential micro-batches whose gradients are averaged
  # (large global batches on few devices); the optimizer steps once per global batch.
  config.grad_accum_steps = 1
  config.optim = optim_config()
  config.loss = loss_config()
  config.pretrained = pretrained_config()
  config.disc = disc_config()
  config.repa = repa_config()
  # Frozen networks (LPIPS VGG, DINO backbone, REPA teacher): "replicated" on every device, or
  # "fsdp" (split like the parameters; for the 300M-parameter DINOv2-L on small-memory chips).
  config.frozen_sharding = "replicated"
  config.eval = eval_config()
  config.latents = latents_config()
  # Training loop (softvq_jax/train.py). 50 epochs of ImageNet at batch 256 (spec.md §5).
  config.num_train_steps = 250_250
  config.log_every_steps = 100          # scalars to TensorBoard + stdout (window means)
  config.image_every_steps = 5000       # input | EMA reconstruction grid (PNG + TensorBoard)
  config.num_grid_images = 8
  config.checkpoint_every_steps = 5000  # async Orbax save; also at the end and on SIGTERM
  config.keep_checkpoints = 3           # the newest K checkpoints are kept ...
  config.keep_every_steps = 50_000      # ... plus every M-th step for good (0: none)
  # Per-device peak FLOP/s for the MFU metric; 0 = look the device kind up (GPUs/TPUs; the CPU
  # has no entry and reports no MFU).
  config.peak_flops_per_device = 0.0
  # Device mesh over axes (data, fsdp, tensor); -1 fills. (-1, 1, 1) = data parallel,
  # (1, -1, 1) = fully sharded parameters and optimizer state (FSDP).
  config.mesh_shape = (-1, 1, 1)
  # logical parameter axis -> mesh axis (None = replicated); see softvq_jax/sharding.py.
  config.sharding_rules = DEFAULT_SHARDING_RULES
  return config


def validate(config) -> None:
  """Fail fast, naming the field, on values the code cannot run with."""
  m = config.model

  def bad(field, msg):
    raise ValueError(f"config.{field}: {msg}")

  if config.image_size % m.patch_size:
    bad("image_size", f"{config.image_size} is not a multiple of model.patch_size={m.patch_size}")
  for f in ("encoder_size", "decoder_size"):
    if m[f] not in VIT_SIZES:
      bad(f"model.{f}", f"{m[f]!r} is not one of {sorted(VIT_SIZES)}")
  if m.num_latent_tokens <= 0:
    bad("model.num_latent_tokens", "must be positive")
  if m.num_latent_tokens % m.num_codebooks:
    bad("model.num_codebooks",
        f"num_latent_tokens={m.num_latent_tokens} must be divisible by num_codebooks={m.num_codebooks}")
  if m.codebook_size <= 0 or m.codebook_embed_dim <= 0:
    bad("model.codebook_size", "codebook_size and codebook_embed_dim must be positive")
  if not m.tau > 0:
    bad("model.tau", f"temperature must be > 0, got {m.tau}")
  if m.compute_dtype not in COMPUTE_DTYPES:
    bad("model.compute_dtype", f"{m.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
  if m.attention_backend not in ATTENTION_BACKENDS:
    bad("model.attention_backend", f"{m.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
  if m.platform not in PLATFORMS:
    bad("model.platform", f"{m.platform!r} is not one of {PLATFORMS}")
  if not m.vq_std > 0:
    bad("model.vq_std", f"must be > 0, got {m.vq_std}")
  if config.data.source not in DATA_SOURCES:
    bad("data.source", f"{config.data.source!r} is not one of {DATA_SOURCES}")
  if config.data.get("train_transform", "random_crop") not in TRAIN_TRANSFORMS:
    bad("data.train_transform", f"{config.data.train_transform!r} is not one of "
        f"{TRAIN_TRANSFORMS}")
  if config.batch_size <= 0:
    bad("batch_size", "must be positive")
  if config.grad_accum_steps <= 0 or config.batch_size % config.grad_accum_steps:
    bad("grad_accum_steps", f"{config.grad_accum_steps} must be positive and divide "
        f"batch_size={config.batch_size}")
  for f in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "image_every_steps",
            "keep_checkpoints"):
    if config[f] <= 0:
      bad(f, f"must be positive, got {config[f]}")
  o = config.optim
  if o.name not in OPTIMIZERS:
    bad("optim.name", f"{o.name!r} is not one of {OPTIMIZERS}")
  if not o.lr > 0:
    bad("optim.lr", f"must be > 0, got {o.lr}")
  for f in ("b1", "b2"):
    if not 0 <= o[f] < 1:
      bad(f"optim.{f}", f"Adam betas must be in [0, 1), got {o[f]}")
  if o.weight_decay < 0:
    bad("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  if o.warmup_steps < 0 or o.warmup_steps >= max(config.num_train_steps, 1):
    bad("optim.warmup_steps", f"{o.warmup_steps} must be in [0, num_train_steps="
        f"{config.num_train_steps})")
  if not 0 <= o.min_lr_ratio <= 1:
    bad("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
  if not 0 <= o.ema_decay < 1:
    bad("optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
  if config.loss.reconstruction not in RECONSTRUCTION_LOSSES:
    bad("loss.reconstruction", f"{config.loss.reconstruction!r} is not one of "
        f"{RECONSTRUCTION_LOSSES}")
  if config.keep_every_steps < 0:
    bad("keep_every_steps", f"must be >= 0, got {config.keep_every_steps}")
  lc = config.loss
  for f in ("perceptual_weight", "repa_weight", "gan_weight", "lecam_weight", "cr_weight",
            "perceptual_warmup_steps", "disc_start"):
    if lc[f] < 0:
      bad(f"loss.{f}", f"must be >= 0, got {lc[f]}")
  if not 0 <= lc.perceptual_dropout < 1:
    bad("loss.perceptual_dropout", f"must be in [0, 1), got {lc.perceptual_dropout}")
  for f in ("disc_aug_prob", "cr_aug_prob", "lecam_decay"):
    if not 0 <= lc[f] <= 1:
      bad(f"loss.{f}", f"must be in [0, 1], got {lc[f]}")
  if lc.disc_loss not in ("hinge", "vanilla", "non-saturating"):
    bad("loss.disc_loss", f"{lc.disc_loss!r} is not one of hinge, vanilla, non-saturating")
  if lc.gen_adv_loss not in ("hinge", "non-saturating"):
    bad("loss.gen_adv_loss", f"{lc.gen_adv_loss!r} is not one of hinge, non-saturating")
  if lc.gan_weight > 0:
    if config.grad_accum_steps > 1:
      bad("grad_accum_steps", "gradient accumulation is not supported with the GAN term "
          "(loss.gan_weight > 0): the discriminator's batch-norm statistics and LeCam EMAs are "
          "defined per global batch. Use more devices, a smaller batch_size, or model.remat=True")
    if config.disc.backbone_size not in VIT_SIZES:
      bad("disc.backbone_size", f"{config.disc.backbone_size!r} is not one of {sorted(VIT_SIZES)}")
    depth = VIT_SIZES[config.disc.backbone_size][1]
    if any(not 0 <= int(i) < depth for i in config.disc.readout_blocks):
      bad("disc.readout_blocks", f"{tuple(config.disc.readout_blocks)} must lie in 0..{depth - 1}")
    if config.disc.img_size % config.disc.patch_size:
      bad("disc.img_size", f"{config.disc.img_size} is not a multiple of disc.patch_size")
  if lc.repa_weight > 0:
    r = config.repa
    if r.teacher_size not in VIT_SIZES:
      bad("repa.teacher_size", f"{r.teacher_size!r} is not one of {sorted(VIT_SIZES)}")
    p = (config.image_size // r.patch_size) ** 2
    if config.image_size % r.patch_size or p % m.num_latent_tokens:
      bad("repa.patch_size", f"the teacher's {p} tokens (image_size {config.image_size} / patch "
          f"{r.patch_size}, squared) must be a multiple of num_latent_tokens="
          f"{m.num_latent_tokens} for REPA's 'repeat' alignment")
  if lc.perceptual_weight > 0 and config.image_size < 16:
    bad("loss.perceptual_weight", "LPIPS-VGG needs images of at least 16 px")
  if config.frozen_sharding not in ("replicated", "fsdp"):
    bad("frozen_sharding", f"{config.frozen_sharding!r} is not 'replicated' or 'fsdp'")
  ev = config.eval
  for f in ("num_images", "batch_size", "every_steps", "in_loop_num_images"):
    if ev[f] < 0:
      bad(f"eval.{f}", f"must be >= 0, got {ev[f]}")
  if ev.every_steps and ev.in_loop_num_images < 2:
    bad("eval.in_loop_num_images", "the in-loop evaluation needs at least 2 images")
  lat = config.latents
  if lat.num_images < 0 or lat.batch_size < 0:
    bad("latents.num_images", "num_images and batch_size must be >= 0")
  if lat.chunk_batches <= 0:
    bad("latents.chunk_batches", f"must be positive, got {lat.chunk_batches}")
  axes.resolve_mesh_shape(config.mesh_shape)  # its form; the device count is checked at start


# ================================================================================================
# The generator side (issue 18): a SiT / DiT on the tokenizer's tokens and `--mode=sample`.
# Separate from the tokenizer's sections above; `validate_generation(config)` checks them and is
# called by softvq_jax/generate.py (configs without these sections do not sample).
# ================================================================================================

GENERATOR_KINDS = ("sit", "dit")
SAMPLE_MODES = ("sde", "ode")
FLOW_PATHS = ("linear", "cosine")
NOISE_SCHEDULES = ("linear", "cosine")


def generator_config(size: str = "XL", kind: str = "sit"):
  """A SiT ("sit": flow matching, t in [0, 1]) or DiT ("dit": Gaussian diffusion, learn_sigma)
  network over the tokenizer's tokens (spec.md §8.1, 8.4; softvq_jax/models/sit.py).

  Used for a randomly initialised generator (`--mode=sample` without `--checkpoint`) and, from
  issue 19 on, for training one. A loaded checkpoint brings its own architecture.
  """
  return ml_collections.ConfigDict(dict(
      kind=kind,
      size=size,               # a row of models/sit.py SIT_SIZES: S, B, L, XL (or micro for tests)
      # 0 = the size's width / depth / heads; set all three for a custom network (demo_sit.py).
      hidden_size=0,
      depth=0,
      num_heads=0,
      mlp_ratio=4.0,
      # 0 = from the tokenizer: input_size = model.num_latent_tokens, in_channels =
      # model.codebook_embed_dim (the 1-D form, one transformer token per latent token).
      input_size=0,
      in_channels=0,
      num_classes=1000,        # label num_classes (= 1000) is the null class
      class_dropout_prob=0.1,
      compute_dtype="float32",  # bfloat16 on GPU/TPU; the samplers' state stays float32
      attention_backend="auto",
  ))


def sample_config():
  """`--mode=sample` (softvq_jax/generate.py): the sampler and the images to write.

  Defaults: the published gFID setting (spec.md §8.3: SDE, 250 steps, CFG 1.75 on t in [0, 0.7],
  cosine path) — the reference script's own defaults are SDE, 50 steps, CFG 1.5 on [0, 1], linear.
  """
  return ml_collections.ConfigDict(dict(
      # 0: only the PNG grid (grid_images). N > 0: all N images as .npz chunks (resumable) + grid.
      num_images=0,
      grid_images=16,          # images in <workdir>/samples.png (8 per row)
      batch_size=32,           # images per sampling step on each process (multiple of its devices)
      chunk_size=1000,         # images per .npz chunk (the unit of resume)
      out_dir="",              # "" = <workdir>/samples
      seed=0,                  # image i's noise depends on (seed, i) only
      # Labels: "" = class-balanced over num_classes (image i gets class i % num_classes: 50 per
      # class for 50k); else comma-separated class ids cycled over the images, e.g. "207,360,387".
      labels="",
      mode="sde",              # SiT: "sde" (Euler-Maruyama) | "ode" (Euler / Heun)
      steps=250,               # SiT: sampler steps; DiT: respaced DDPM steps
      heun=False,              # SiT ODE only
      cfg_scale=1.75,          # 1 = no guidance
      guidance_interval=(0.0, 0.7),
      path="cosine",           # SiT SDE: the path its score is derived with
      # DiT: beta schedule of its 1000-step diffusion (cosine: the published command; the
      # official script's default is linear).
      noise_schedule="cosine",
  ))


def gen_eval_config():
  """Generation evaluation (softvq_jax/gen_eval.py): `--mode=eval` of a generator config (gFID,
  Inception Score, precision / recall of `sample.num_images` samples) and the in-loop hook.

  The reference: an ADM-format .npz (`mu`, `sigma` of the real images' pool features for FID,
  and the reference batch's images `arr_0` for precision / recall, e.g.
  VIRTUAL_imagenet256_labeled.npz), or, with `reference=""`, statistics computed here over `data.<reference_split>` and cached under
  `<workdir>/fid_stats/` like the tokenizer evaluation's.
  """
  return ml_collections.ConfigDict(dict(
      reference="",                 # ADM-format .npz (local path or URL); "" = a data split
      reference_split="train",      # reference="" only: the split whose statistics are computed
      reference_num_images=50_000,  # reference="" only: images for mu / sigma (0 = whole split)
      precision_recall=True,
      # Real images whose features span the real manifold: the first N of arr_0 (ADM: all 10k)
      # or of the split.
      precision_recall_reference_images=10_000,
      nearest_k=3,                  # Kynkaenniemi et al. 2019 / the ADM evaluator
      inception_batch_size=64,      # images per Inception call on each process
      in_loop_num_images=2000,      # the in-loop hook (gen_eval.GenerationEvaluator)
  ))


GENERATOR_DATA_SOURCES = ("tokens", "images")
TIME_SAMPLINGS = ("uniform", "lognormal")


def generator_data_config():
  """Where a generator's training latents come from (`--mode=train` of a generator config;
  softvq_jax/generator_task.py). Both paths normalise with the tokenizer's vq_mean / vq_std.

  source="tokens" (data path a): the `.npz` chunks of `--mode=extract` in `tokens_dir`, served by
  token_data.TokenSource (the token or its flip's, at random per example and epoch).
  source="images" (data path b): image batches of `config.data` (set
  data.train_transform="center_crop_flip", the ADM centre crop + flip), encoded inside the
  jitted step by the frozen tokenizer (its parameters a frozen argument, sharded like the rest).
  """
  return ml_collections.ConfigDict(dict(
      source="tokens",
      # data path a: the extraction's out dir; "" = <tokenizer>/tokens, where `--mode=extract
      # --workdir=<tokenizer workdir>` writes by default
      tokens_dir="",
      # The tokenizer (what load_tokenizer accepts: a workdir of ours, an official-format
      # directory, a hub id): its vq_mean / vq_std normalise the latents of both paths, it
      # encodes the images of path b and it decodes the sample grids. Required; `--tokenizer`
      # on the command line sets it.
      tokenizer="",
      flip=True,               # data path a: use the flipped images' tokens when extracted
      # The default latent statistics (vq_mean 0, vq_std 1: never measured) are refused unless
      # this is True (token_data.check_latent_statistics): the classic silent failure.
      allow_unnormalised_latents=False,
  ))


def generator_objective_config(kind: str = "sit"):
  """The generator's loss (softvq_jax/generator_objective.py; spec.md §8.2, 8.4)."""
  return ml_collections.ConfigDict(dict(
      path="linear",             # SiT interpolant: linear | cosine
      # SiT time sampling: "lognormal" (the published command) or "uniform"
      time_sampling="lognormal",
      # DiT: beta schedule of the 1000-step diffusion (cosine: the published command)
      noise_schedule="cosine" if kind == "dit" else "linear",
      diffusion_steps=1000,
      num_time_buckets=4,        # the loss is also logged per bucket of t in [0, 1]
  ))


def generator_train_config(config, *, kind: str = "sit", size: str = "XL"):
  """Turns a tokenizer config (the one whose tokens are modelled: it describes their shape) into
  a generator training config: generator / generator_data / generator_objective / sample /
  gen_eval sections and the published recipe (spec.md §8.2: AdamW lr 1e-4 constant, betas
  (0.9, 0.999), no weight decay, clip 1.0 (DiT 5.0), EMA 0.9999, batch 256, 400k steps).

  The tokenizer's own loss sections stay (validate reads them) but are not used.
  """
  config.generator = generator_config(size=size, kind=kind)
  config.generator_data = generator_data_config()
  config.generator_objective = generator_objective_config(kind)
  config.sample = sample_config()
  config.gen_eval = gen_eval_config()
  config.data.train_transform = "center_crop_flip"   # data path b's images (spec.md §8)
  o = config.optim
  o.name, o.lr, o.lr_batch_scaling = "adamw", 1e-4, False
  o.b1, o.b2, o.eps, o.weight_decay = 0.9, 0.999, 1e-8, 0.0
  o.warmup_steps, o.min_lr_ratio = 0, 1.0          # constant learning rate
  o.grad_clip_norm = 5.0 if kind == "dit" else 1.0
  o.ema_decay = 0.9999
  config.batch_size = 256
  config.num_train_steps = 400_000
  config.log_every_steps = 100
  config.image_every_steps = 10_000
  config.checkpoint_every_steps = 10_000
  config.keep_every_steps = 100_000
  config.num_grid_images = 16
  return config


GENERATOR_SIZES = ("S", "B", "L", "XL")


def generator_variant_config(kind: str, arg: str = ""):
  """The config of `--config=configs/{sit,dit}_xl_sq64_256.py:<tokenizer>[,<size>]`: a SiT / DiT
  (size S | B | L | XL, default XL) trained on the tokens of a released SoftVQ tokenizer named
  as on the hub (a row of softvq_jax/variants.py: b-64 (default), bl-64, l-64, b-32, bl-32, l-32,
  bl-64-512, l-32-512, or the unreleased ll-32 / ll-32-512), with the published recipe
  (`generator_train_config`, spec.md §8.2 / 8.4).

  The tokenizer sections describe that tokenizer (its tokens' shape, image size); the tokenizer
  itself is `generator_data.tokenizer` = its hub id (or `--tokenizer=<your workdir / directory>`);
  the extracted tokens are `generator_data.tokens_dir` (data path a, the default), or set
  `--config.generator_data.source=images` to encode ImageNet online (data path b).
  """
  name, _, size = (arg or "").partition(",")
  name, size = (name.strip().lower() or "b-64"), (size.strip().upper() or "XL")
  found = [v for v in variants.VARIANTS if v.name == name]
  if not found:
    raise ValueError(f"tokenizer {name!r} is not one of "
                     f"{', '.join(v.name for v in variants.VARIANTS)} (softvq_jax/variants.py)")
  if size not in GENERATOR_SIZES:
    raise ValueError(f"generator size {size!r} is not one of {GENERATOR_SIZES}")
  variant = found[0]
  config = base_config(variant)
  generator_train_config(config, kind=kind, size=size)
  config.generator_data.tokenizer = variant.hub_id or ""
  config.generator.compute_dtype = "bfloat16"  # TPU / GPU; float32 on a CPU
  return config


def is_generator_config(config) -> bool:
  """Whether `config` describes a generator (SiT / DiT over a tokenizer's tokens): it has a
  `generator` section. `--mode=eval` then evaluates generated images (gFID) instead of a
  tokenizer's reconstructions (rFID)."""
  return "generator" in config


def validate_generator_training(config) -> None:
  """Fail fast, naming the field, on generator-training values (`--mode=train` of a generator
  config): the generator / sample sections (validate_generation) and the training data and
  objective sections."""
  validate_generation(config)

  def bad(field, msg):
    raise ValueError(f"config.{field}: {msg}")

  for section in ("generator_data", "generator_objective"):
    if section not in config:
      bad(section, f"a generator training config needs a {section} section "
          "(config_lib.generator_train_config)")
  d, o = config.generator_data, config.generator_objective
  if d.source not in GENERATOR_DATA_SOURCES:
    bad("generator_data.source", f"{d.source!r} is not one of {GENERATOR_DATA_SOURCES}")
  if not d.tokenizer:
    bad("generator_data.tokenizer", "the tokenizer is required (its vq_mean / vq_std normalise "
        "the latents; it encodes path b's images and decodes the sample grids): "
        "--tokenizer=<tokenizer workdir / official directory / hub id>")
  if o.path not in FLOW_PATHS:
    bad("generator_objective.path", f"{o.path!r} is not one of {FLOW_PATHS}")
  if o.time_sampling not in TIME_SAMPLINGS:
    bad("generator_objective.time_sampling", f"{o.time_sampling!r} is not one of "
        f"{TIME_SAMPLINGS}")
  if o.noise_schedule not in NOISE_SCHEDULES:
    bad("generator_objective.noise_schedule", f"{o.noise_schedule!r} is not one of "
        f"{NOISE_SCHEDULES}")
  if o.diffusion_steps < 1 or o.num_time_buckets < 1:
    bad("generator_objective.diffusion_steps", "diffusion_steps and num_time_buckets must be "
        "positive")
  if not 0 <= config.generator.class_dropout_prob < 1:
    bad("generator.class_dropout_prob", f"must be in [0, 1), got "
        f"{config.generator.class_dropout_prob}")


def validate_generation(config) -> None:
  """Fail fast, naming the field, on generator / sample values `--mode=sample` cannot run with."""

  def bad(field, msg):
    raise ValueError(f"config.{field}: {msg}")

  for section in ("generator", "sample"):
    if section not in config:
      bad(section, f"this config has no {section} section; use a generator config such as "
          "configs/demo_sit.py, or add config_lib.generator_config() / sample_config()")
  g, s = config.generator, config.sample
  if g.kind not in GENERATOR_KINDS:
    bad("generator.kind", f"{g.kind!r} is not one of {GENERATOR_KINDS}")
  from softvq_jax.models import sit  # pylint: disable=import-outside-toplevel
  custom = (g.hidden_size, g.depth, g.num_heads)
  if any(custom) and not all(custom):
    bad("generator.hidden_size", "set hidden_size, depth and num_heads together (or all 0 to use "
        "generator.size)")
  if not all(custom) and g.size not in sit.SIT_SIZES:
    bad("generator.size", f"{g.size!r} is not one of {list(sit.SIT_SIZES)}")
  for f in ("input_size", "in_channels"):
    if g[f] < 0:
      bad(f"generator.{f}", f"must be >= 0 (0 = from the tokenizer), got {g[f]}")
  if s.num_images < 0 or s.grid_images < 0:
    bad("sample.num_images", "num_images and grid_images must be >= 0")
  for f in ("batch_size", "chunk_size", "steps"):
    if s[f] <= 0:
      bad(f"sample.{f}", f"must be positive, got {s[f]}")
  if s.mode not in SAMPLE_MODES:
    bad("sample.mode", f"{s.mode!r} is not one of {SAMPLE_MODES}")
  if s.heun and s.mode != "ode":
    bad("sample.heun", "Heun's correction is for sample.mode='ode' only")
  if g.kind == "dit" and (s.mode == "ode" or s.heun):
    bad("sample.mode", "a DiT samples with DDPM; sample.mode='ode' and sample.heun are SiT "
        "options (leave sample.mode='sde', which DiT ignores)")
  if s.path not in FLOW_PATHS:
    bad("sample.path", f"{s.path!r} is not one of {FLOW_PATHS}")
  if s.noise_schedule not in NOISE_SCHEDULES:
    bad("sample.noise_schedule", f"{s.noise_schedule!r} is not one of {NOISE_SCHEDULES}")
  if not s.cfg_scale >= 1:
    bad("sample.cfg_scale", f"must be >= 1 (1 = no guidance), got {s.cfg_scale}")
  interval = tuple(s.guidance_interval)
  if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
    bad("sample.guidance_interval", f"{interval} must be (low, high) with 0 <= low <= high <= 1")
  try:
    labels = [int(v) for v in str(s.labels).split(",") if v.strip()]
  except ValueError:
    bad("sample.labels", f"{s.labels!r} must be comma-separated class ids, e.g. '207,360'")
  if any(not 0 <= v <= g.num_classes for v in labels):
    bad("sample.labels", f"class ids must lie in 0..{g.num_classes} ({g.num_classes} = "
        "unconditional)")
