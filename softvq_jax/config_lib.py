"""Helpers shared by the ml_collections files in `configs/`.

Configs are code (big_vision style): each `configs/*.py` builds a `ConfigDict` from the tables and
section builders here, so every released SoftVQ variant is a one-liner and every value a user may
change is a config field that can be overridden from the command line (`--config.batch_size=64`).
`validate` is run at start-up and names the first bad field.
"""
from __future__ import annotations

import ml_collections

# width, depth, heads of the timm/DINOv2 ViTs the official code builds (spec 1.1). MLP ratio 4.
VIT_SIZES = {
    "mini": (128, 4, 4),  # not a released size: the CPU demo and fast tests
    "T": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}

# encoder/decoder sizes by the released model's name part (SoftVQ-B / -BL / -L).
MODEL_SIZES = {"B": ("B", "B"), "BL": ("B", "L"), "L": ("L", "L")}

ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "jax")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("demo", "folder", "tfds")

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


def model_config(size: str = "B", num_latent_tokens: int = 64, image_size: int = 256):
  """Model section for SoftVQ-{size}-{num_latent_tokens} (spec sections 1-2)."""
  if size not in MODEL_SIZES:
    raise ValueError(f"model size {size!r} is not one of {sorted(MODEL_SIZES)}")
  enc, dec = MODEL_SIZES[size]
  return ml_collections.ConfigDict(dict(
      encoder_size=enc,
      decoder_size=dec,
      patch_size=16,
      num_latent_tokens=num_latent_tokens,
      # Soft codebook (spec 1.3). The published training config: 4 codebooks x 8192 x 32.
      codebook_size=8192,
      codebook_embed_dim=32,
      num_codebooks=4,
      codebook_l2_norm=True,
      tau=0.07,
      dec_cls_token=True,
      # DINOv2 LayerScale init (the weights are learned; only matters from scratch).
      layer_scale_init=1e-5,
      # Activations/matmuls; parameters stay float32. bfloat16 on TPU/GPU, float32 on CPU.
      compute_dtype="bfloat16",
      attention_backend="auto",
      # Rematerialise every transformer block in the backward pass (saves activation memory).
      remat=False,
      # Scalar latent statistics for generators: z_norm = (z - vq_mean) / vq_std.
      vq_mean=0.0,
      vq_std=1.0,
  ))


def data_config():
  """Data section (input pipeline, `softvq_jax/data.py`; docs/data.md)."""
  return ml_collections.ConfigDict(dict(
      source="demo",        # one of DATA_SOURCES
      path="",              # image-folder root, or TFDS data_dir
      tfds_name="imagenet2012",
      train_split="train",
      eval_split="validation",  # image folder: <path>/validation or <path>/val
      num_workers=0,        # grain worker processes (0 = in the main process)
      prefetch_buffer_size=2,  # batches buffered per worker process
      num_threads=8,        # decode threads inside each process (PIL releases the GIL)
      read_buffer_size=64,  # decoded images buffered per process ahead of batching
      cache_dir="",         # where the image-folder file list is cached ("" = next to the data)
      # uint8 until the device (4x fewer bytes); the trainer applies data.to_model_range.
      output_dtype="uint8",
      # Demo data (source="demo"): crops of scikit-image's bundled photographs.
      demo_train_size=4096,
      demo_eval_size=512,
  ))


def base_config(size: str = "B", num_latent_tokens: int = 64, image_size: int = 256):
  """Everything a run needs, with the published recipe's values where they exist."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = image_size
  config.model = model_config(size, num_latent_tokens, image_size)
  config.data = data_config()
  config.batch_size = 256  # global batch
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
  if not m.vq_std > 0:
    bad("model.vq_std", f"must be > 0, got {m.vq_std}")
  if config.data.source not in DATA_SOURCES:
    bad("data.source", f"{config.data.source!r} is not one of {DATA_SOURCES}")
  if config.batch_size <= 0:
    bad("batch_size", "must be positive")
  shape = tuple(config.mesh_shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    bad("mesh_shape", f"{shape} must be 3 sizes (data, fsdp, tensor), positive or one -1")
