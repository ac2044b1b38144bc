"""Grain input pipeline: sources -> per-process shard -> epoch shuffle -> decode + augment -> batch.

Public API (what the trainer and the evaluator call)::

  it = data.build_train_pipeline(config.data, image_size=256, global_batch_size=256, seed=0,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  batch = next(it)                      # {"image": [B_local, S, S, 3] uint8, "label": [B_local]
                                        #  int32, "index": [B_local] int32}, numpy, host memory
  gbatch = data.make_global_batch(batch, mesh)           # global jax.Arrays over ("data","fsdp")
  x = pixels.to_model_range(gbatch["image"])             # jit-able: uint8 -> float32 in [-1, 1]
  state = it.get_state()                # small JSON-able dict; store it in the checkpoint
  it.set_state(state)                   # continues with exactly the next unseen batch
  it.skipped                            # SkipStats(count, examples): bad files so far
  logging.info(it.skipped_summary())    # "skipped 3 bad image files (first: ...)"

  ev = data.build_eval_pipeline(config.data, image_size=256, global_batch_size=256,
                                process_index=..., process_count=...)
  for batch in ev:  # ev.num_batches batches, identical on every process; padded slots mask=False
    ...             # {"image", "label", "index", "mask": [B_local] bool}

`it` is a `grain.DatasetIterator`, so Orbax's `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` (one JSON file per process) work as they do for any Grain iterator.

Design notes (why):
* Sources (`data_sources.py`) hand out *undecoded* records (file path, encoded bytes or a demo crop)
  and every pixel is decoded here by PIL, so the image folder, TFDS ArrayRecord and the demo data
  share one decoder — the reference's (`PIL.Image.open(f).convert("RGB")`) — and one bad-file
  policy.
* Order of operations (train): `range(N)[process_index::process_count]` -> `shuffle(seed)` ->
  `repeat()`. Grain's shuffle re-seeds per epoch (seed + epoch), so each epoch has a new order and
  the whole infinite stream is a pure function of (seed, position): the checkpoint state is one
  integer per worker, and resume is exact also across epoch boundaries. Augmentation randomness is
  drawn from `np.random.default_rng((seed, epoch, record_index))`, so an image's crop/flip in a
  given epoch does not depend on the number of hosts or workers.
* Bad files are dropped *inside* the batching step (`_SkipBadBatchIterDataset`), which keeps
  pulling records until the batch is full and attaches the number and names of the dropped files to
  the batch; the iterator wrapper (`InputIterator`) strips those fields, accumulates them (also in
  the checkpoint state) and logs them with the word "skipped". Counting in the batch is what lets
  the count survive Grain's worker processes, whose own memory the trainer never sees.
* Images leave the pipeline as uint8 NHWC by default (`config.data.output_dtype`): measured in
  `benchmarks/input_pipeline.py` / BENCHMARKS.md, uint8 is as fast as float32 in one process and
  10-25% faster with worker processes (4x fewer bytes through shared memory), and it moves 4x fewer
  bytes host->device; `pixels.to_model_range` (softvq_jax/pixels.py) does the reference's ToTensor + Normalize((0.5,), (0.5,))
  on the device. With output_dtype="float32" the pipeline scales on the host and
  `pixels.to_model_range` is the identity.
* Eval is a fixed, finite pass: each process gets its `[process_index::process_count]` share,
  padded to the same number of full batches on every process (static shapes, no host deadlock on
  an uneven last step); padded or undecodable slots have mask=False.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, NamedTuple, Sequence

from absl import logging
from etils import epath
import grain
import numpy as np
from PIL import Image, ImageFile

from softvq_jax import axes as axes_lib
from softvq_jax import data_sources, pixels
from softvq_jax.data_sources import DataSourceError  # re-exported  # noqa: F401

# How many bad-file names travel with a batch / are kept in the state and logs.
_MAX_SKIP_EXAMPLES = 8
# A stream that keeps failing is a broken dataset, not a few dirty files: stop with a clear error.
_MAX_CONSECUTIVE_SKIPS = 1000
# Images whose long side is this many times the short one would blow up to huge arrays when the
# short side is resized to the crop size (a 1x10000 px strip at 256 px -> 256x2.56M px); skip them.
_MAX_ASPECT_RATIO = 50.0


# ------------------------------------------------------------------------------------------------
# Decoding: one PIL decoder for every source, never fatal.
# ------------------------------------------------------------------------------------------------


class BadImageError(ValueError):
  """The record cannot be turned into an RGB image; the pipeline skips it and counts it."""


def _to_rgb(img: Image.Image) -> Image.Image:
  """RGB as the reference (`img.convert("RGB")`), except for high bit-depth modes.

  PIL converts 16-bit ("I;16*", "I") and float ("F") images to 8 bits by *clipping* at 255, which
  turns a 16-bit photo into a white sheet; those are rescaled to the 8-bit range instead. Everything
  else — L, LA, P (palette), PA, RGBA (alpha dropped, as the reference does), CMYK, YCbCr — is
  PIL's `convert("RGB")`. ImageNet contains no 16-bit files, so parity is unaffected.
  """
  if img.mode == "RGB":
    return img
  if img.mode.startswith("I;16") or img.mode == "I":
    arr = np.asarray(img).astype(np.int64)  # [H, W]
    # 16-bit data: keep the high byte, as PIL does for 16-bit RGB. Mode "I" (32-bit) carries no
    # bit depth; values above 255 mean it holds 16-bit samples (PNG/TIFF loaders).
    if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
      arr = arr >> 8
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
  if img.mode == "F":
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))  # [H, W]
    scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
  return img.convert("RGB")


def decode_image(image: bytes | str | np.ndarray) -> Image.Image:
  """A record's image (encoded bytes, a file path or URL, or a uint8 array) as an RGB PIL image.

  Raises BadImageError for anything that is not a complete, decodable image: zero-byte files,
  non-images with an image extension, truncated or corrupt JPEG/PNG (PIL raises on `load()`;
  `LOAD_TRUNCATED_IMAGES` stays off, so a half-grey image never reaches training), decompression
  bombs, and unreadable files.
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise BadImageError(f"expected a uint8 HW or HWC array, got {image.dtype} {image.shape}")
    return _to_rgb(Image.fromarray(image))
  try:
    if isinstance(image, (bytes, bytearray, memoryview)):
      if not len(image):
        raise BadImageError("empty (0 bytes)")
      f = io.BytesIO(image)
    else:  # a file path: local, or a URL (gs://...) of an image folder on an object store
      content = epath.Path(image).read_bytes()
      if not content:
        raise BadImageError("empty file (0 bytes)")
      f = io.BytesIO(content)
    # tensorflow_datasets sets PIL's process-global LOAD_TRUNCATED_IMAGES = True as a side effect
    # of its image utilities (seen in tests once TensorFlow is installed): keep truncated files
    # failing here whatever another library did to the flag.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(f) as img:
      img.load()
      if img.width < 1 or img.height < 1:
        raise BadImageError(f"degenerate size {img.size}")
      return _to_rgb(img)
  except BadImageError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
    # UnidentifiedImageError (an OSError) for non-images, OSError("image file is truncated"),
    # SyntaxError/ValueError from broken headers.
    raise BadImageError(f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Transforms: the reference's ADM `random_crop_arr` / `center_crop_arr` (spec.md §4).
# ------------------------------------------------------------------------------------------------


def _box_halve(img: Image.Image, min_side: int) -> Image.Image:
  """Halve (integer division of both sides, BOX) while the short side is >= 2 * min_side."""
  while min(*img.size) >= 2 * min_side:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  return img


def _resize_short_side(img: Image.Image, short: int) -> Image.Image:
  """BICUBIC resize so the short side is `short`; each side round(side * short / min_side)."""
  scale = short / min(*img.size)
  return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


class TrainParams(NamedTuple):
  """The random draws of one training transform (see `sample_train_params`)."""
  short_side: int  # m: the short side after resizing, uniform in [S, ceil(S / 0.8)]
  top: int
  left: int
  flip: bool


def train_short_side_range(image_size: int, min_crop_frac: float = 0.8,
                           max_crop_frac: float = 1.0) -> tuple[int, int]:
  """Inclusive range of m: [ceil(S / max_crop_frac), ceil(S / min_crop_frac)]."""
  return math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)


def _check_aspect(img: Image.Image) -> None:
  if max(img.size) > _MAX_ASPECT_RATIO * min(img.size):
    raise BadImageError(f"extreme aspect ratio {img.size}")


def random_crop_arr(img: Image.Image, image_size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, TrainParams]:
  """Train transform (ADM `random_crop_arr` + RandomHorizontalFlip) -> ([S, S, 3] uint8, draws).

  Draw order: m, then the crop offsets (which depend on the resized size), then the flip.
  """
  _check_aspect(img)
  lo, hi = train_short_side_range(image_size)
  m = int(rng.integers(lo, hi + 1))
  img = _resize_short_side(_box_halve(img, m), m)
  arr = np.asarray(img)  # [H, W, 3] uint8
  top = int(rng.integers(0, arr.shape[0] - image_size + 1))
  left = int(rng.integers(0, arr.shape[1] - image_size + 1))
  flip = bool(rng.random() < 0.5)
  return apply_train_params(arr, image_size, top, left, flip), TrainParams(m, top, left, flip)


def apply_train_params(arr: np.ndarray, image_size: int, top: int, left: int,
                       flip: bool) -> np.ndarray:
  out = arr[top:top + image_size, left:left + image_size]  # [S, S, 3]
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def center_crop_flip_arr(img: Image.Image, image_size: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, bool]:
  """The generators' train transform (spec.md §8: ADM `center_crop_arr` + RandomHorizontalFlip,
  p 0.5) -> ([S, S, 3] uint8, flipped). One draw (the flip) from `rng`.

  Why not the tokenizer's random crop: the generator reproduces the paper's numbers only on the
  images it was trained on there, whole centre crops (the latents of `--mode=extract` are of
  centre crops too, so both data paths see the same images)."""
  arr = center_crop_arr(img, image_size)
  flip = bool(rng.random() < 0.5)
  return (np.ascontiguousarray(arr[:, ::-1]) if flip else arr), flip


def center_crop_arr(img: Image.Image, image_size: int) -> np.ndarray:
  """Eval transform (ADM `center_crop_arr`) -> [S, S, 3] uint8."""
  _check_aspect(img)
  img = _resize_short_side(_box_halve(img, image_size), image_size)
  arr = np.asarray(img)  # [H, W, 3]
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


# ------------------------------------------------------------------------------------------------
# Per-record work (runs in the Grain workers).
# ------------------------------------------------------------------------------------------------


class Skipped(NamedTuple):
  """Marker for a record that could not be used; dropped (train) or masked (eval) downstream."""
  name: str
  reason: str


def _output(arr: np.ndarray, output_dtype: str) -> np.ndarray:
  return pixels.to_model_range(arr) if output_dtype == "float32" else arr


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """index -> transformed example (or Skipped). A picklable callable for Grain's workers."""
  source: Any
  image_size: int
  seed: int
  output_dtype: str
  shard_len: int
  transform: str = "random_crop"  # config.data.train_transform

  def __call__(self, position: int, record_index: int):
    epoch = position // self.shard_len
    record_index = int(record_index)
    name = f"#{record_index}"
    try:
      rec = self.source[record_index]
      name = rec["name"]
      rng = np.random.default_rng((self.seed, epoch, record_index))
      if self.transform == "center_crop_flip":
        arr, _ = center_crop_flip_arr(decode_image(rec["image"]), self.image_size, rng)
      else:
        arr, _ = random_crop_arr(decode_image(rec["image"]), self.image_size, rng)
    except BadImageError as e:
      return Skipped(name, str(e))
    except Exception as e:  # pylint: disable=broad-except
      # A read error on one file (I/O hiccup, permission) must not kill a week-long run.
      return Skipped(name, f"{type(e).__name__}: {e}")
    return {"image": _output(arr, self.output_dtype),  # [S, S, 3]
            "label": np.int32(rec["label"]), "index": np.int32(record_index)}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """Shard position -> centre-cropped example with mask, padding beyond the shard's end."""
  source: Any
  image_size: int
  output_dtype: str
  process_index: int
  process_count: int
  shard_len: int

  def __call__(self, position: int, _):
    s = self.image_size
    pad = {"image": _output(np.zeros((s, s, 3), np.uint8), self.output_dtype),
           "label": np.int32(-1), "index": np.int32(-1), "mask": np.bool_(False)}
    if position >= self.shard_len:
      return pad
    record_index = self.process_index + position * self.process_count
    name = f"#{record_index}"
    try:
      rec = self.source[record_index]
      name = rec["name"]
      arr = center_crop_arr(decode_image(rec["image"]), s)
    except Exception as e:  # pylint: disable=broad-except
      pad["skipped"] = Skipped(name, f"{type(e).__name__}: {e}")
      return pad
    return {"image": _output(arr, self.output_dtype), "label": np.int32(rec["label"]),
            "index": np.int32(record_index), "mask": np.bool_(True)}


# ------------------------------------------------------------------------------------------------
# Batching that drops bad records and reports them.
# ------------------------------------------------------------------------------------------------


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _skip_fields(skipped: Sequence[Skipped]) -> dict[str, Any]:
  return {"skipped": np.int32(len(skipped)),
          "skipped_examples": tuple(f"{s.name} ({s.reason})" for s in skipped[:_MAX_SKIP_EXAMPLES])}


class _SkipBadBatchIterator(grain.DatasetIterator):
  """Fills each batch with good examples, dropping `Skipped` markers and counting them."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __next__(self) -> dict[str, Any]:
    good, bad = [], []
    consecutive = 0
    while len(good) < self._batch_size:
      ex = next(self._parent)
      if isinstance(ex, Skipped):
        bad.append(ex)
        consecutive += 1
        if consecutive >= _MAX_CONSECUTIVE_SKIPS:
          raise RuntimeError(
              f"{consecutive} consecutive images could not be decoded (e.g. {bad[0].name}: "
              f"{bad[0].reason}); the dataset looks broken. Check config.data.path / source.")
      else:
        good.append(ex)
        consecutive = 0
    batch = _stack(good)  # image [B, S, S, 3], label [B], index [B]
    batch.update(_skip_fields(bad))
    return batch

  # A batch consumes a deterministic run of parent elements, so the parent's state is the state.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def __str__(self) -> str:
    return f"SkipBadBatchIterator(batch_size={self._batch_size})"


class _SkipBadBatchIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __iter__(self) -> _SkipBadBatchIterator:
    return _SkipBadBatchIterator(self._parent.__iter__(), self._batch_size)

  def __str__(self) -> str:
    return f"SkipBadBatchIterDataset(batch_size={self._batch_size})"


def _eval_batch_fn(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
  bad = [e.pop("skipped") for e in examples if "skipped" in e]
  batch = _stack(examples)  # image [B, S, S, 3], label/index/mask [B]
  batch.update(_skip_fields(bad))
  return batch


# ------------------------------------------------------------------------------------------------
# The iterator the trainer holds.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SkipStats:
  """Bad files seen so far by this process (cumulative across checkpoint restores)."""
  count: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    if not self.count:
      return "skipped 0 bad image files"
    return (f"skipped {self.count} bad image files (first: {'; '.join(self.examples)})")


class InputIterator(grain.DatasetIterator):
  """Thin wrapper over the Grain iterator: strips and accumulates the skipped-file fields.

  State: {"grain": <Grain pipeline state: per-worker next index>, "skipped": int,
  "skipped_examples": [str]} — JSON-serialisable and a few hundred bytes. Restoring requires the
  same data source, seed, batch size, process count and `num_workers` as the run that saved it.
  """

  def __init__(self, parent: grain.DatasetIterator, *, description: str,
               num_batches: int | None = None):
    super().__init__(parent)
    self._description = description
    self.num_batches = num_batches  # finite passes (eval) only
    self.skipped = SkipStats()
    self._next_log = 1

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    n = int(batch.pop("skipped"))
    examples = batch.pop("skipped_examples")
    if n:
      self.skipped.count += n
      room = _MAX_SKIP_EXAMPLES - len(self.skipped.examples)
      self.skipped.examples.extend(list(examples)[:max(room, 0)])
      if self.skipped.count >= self._next_log:  # log at 1, 2, 4, 8, ... bad files
        logging.warning("%s input: %s", self._description, self.skipped.summary())
        while self._next_log <= self.skipped.count:
          self._next_log *= 2
    return batch

  def skipped_summary(self) -> str:
    """E.g. "skipped 3 bad image files (first: a.jpg (empty file (0 bytes)); ...)"."""
    return self.skipped.summary()

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._parent.get_state(), "skipped": self.skipped.count,
            "skipped_examples": list(self.skipped.examples)}

  def set_state(self, state: dict[str, Any]) -> None:
    try:
      self._parent.set_state(state["grain"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise ValueError(
          f"the input-pipeline state in the checkpoint does not fit this pipeline ({e!r}); it must "
          "be restored with the config.data.num_workers, data source, seed, batch size and "
          "process count of the run that saved it") from e
    self.skipped = SkipStats(int(state.get("skipped", 0)), list(state.get("skipped_examples", [])))
    self._next_log = 1
    while self._next_log <= self.skipped.count:
      self._next_log *= 2

  def __str__(self) -> str:
    return f"InputIterator({self._description})"


# ------------------------------------------------------------------------------------------------
# Building the pipelines.
# ------------------------------------------------------------------------------------------------


def make_source(data_config, split: str):
  """The random-access source for `config.data` and a split name; fails fast with a fix."""
  source = data_config.source
  if source == "demo":
    n = data_config.demo_train_size if split == data_config.train_split else data_config.demo_eval_size
    return data_sources.DemoSource(n, split=split)
  if source == "folder":
    if not data_config.path:
      raise DataSourceError("config.data.source=folder needs config.data.path=<image folder root> "
                            "(<root>/<class>/<image>, or <root>/train and <root>/val).")
    root = data_sources.resolve_folder_root(data_config.path, split)
    return data_sources.FolderSource(root, cache_dir=data_config.cache_dir)
  if source == "tfds":
    return data_sources.TfdsSource(data_config.tfds_name, data_config.path, split)
  raise DataSourceError(f"config.data.source={source!r} is not one of "
                        "('demo', 'folder', 'tfds').")


def _check_common(data_config, image_size: int, global_batch_size: int, process_index: int,
                  process_count: int) -> int:
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes; change config.batch_size")
  if data_config.output_dtype not in ("uint8", "float32"):
    raise ValueError(f"config.data.output_dtype={data_config.output_dtype!r} is not 'uint8' or "
                     "'float32'")
  if data_config.num_workers < 0:
    raise ValueError(f"config.data.num_workers={data_config.num_workers} must be >= 0")
  return global_batch_size // process_count


def _read_options(data_config) -> grain.ReadOptions:
  # Threads overlap file I/O and PIL's decode/resize (which release the GIL) inside each process.
  return grain.ReadOptions(num_threads=max(1, data_config.num_threads),
                           prefetch_buffer_size=max(1, data_config.read_buffer_size))


def _prefetch(ds: grain.IterDataset, data_config) -> grain.IterDataset:
  if data_config.num_workers > 0:
    # Grain's worker processes read absl flags; outside `absl.app.run` (tests, notebooks, scripts
    # with argparse) nothing has parsed them and Grain fails with UnparsedFlagAccessError. Use the
    # defaults then; under absl.app this is a no-op.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=max(1, data_config.prefetch_buffer_size)))
  return ds


def build_train_dataset(data_config, *, image_size: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        source=None) -> grain.IterDataset:
  """The infinite, shuffled, augmented, batched train `grain.IterDataset` of this process.

  `source` overrides `make_source(data_config, train_split)` (benchmarks, tests).
  Elements: {"image": [B_local, S, S, 3] uint8|float32, "label": [B_local] int32,
  "index": [B_local] int32 (record index in the source), "skipped", "skipped_examples"}.
  """
  local_bs = _check_common(data_config, image_size, global_batch_size, process_index,
                           process_count)
  if source is None:
    source = make_source(data_config, data_config.train_split)
  n = len(source)
  if n < process_count:
    raise DataSourceError(f"{source!r} has {n} records, fewer than the {process_count} processes")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  ids = grain.MapDataset.range(n)[process_index::process_count]  # this process's record indices
  shard_len = len(ids)
  ds = ids.shuffle(seed=seed).repeat(None)  # epoch e uses shuffle seed (seed + e)
  transform = data_config.get("train_transform", "random_crop")
  if transform not in ("random_crop", "center_crop_flip"):
    raise ValueError(f"config.data.train_transform={transform!r} is not 'random_crop' or "
                     "'center_crop_flip'")
  ds = ds.map_with_index(_TrainExample(source, image_size, seed, data_config.output_dtype,
                                       shard_len, transform))
  ds = ds.to_iter_dataset(_read_options(data_config))
  ds = _SkipBadBatchIterDataset(ds, local_bs)
  return _prefetch(ds, data_config)


def build_train_pipeline(data_config, *, image_size: int, global_batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1,
                         source=None) -> InputIterator:
  """Iterator over this process's train batches (see the module docstring)."""
  ds = build_train_dataset(data_config, image_size=image_size,
                           global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count,
                           source=source)
  return InputIterator(iter(ds), description=f"train[{data_config.source}]")


def eval_num_batches(num_records: int, local_batch_size: int, process_count: int) -> int:
  """Batches per process for one eval pass; the same on every process."""
  return -(-(-(-num_records // process_count)) // local_batch_size)


def build_eval_pipeline(data_config, *, image_size: int, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1, split: str | None = None,
                        source=None, start_batch: int = 0) -> InputIterator:
  """One finite, unshuffled, centre-cropped pass over `split` (default `eval_split`).

  Each process reads records process_index, process_index + P, ...; every process yields
  `num_batches` full batches, the tail padded with mask=False slots. Undecodable records also
  become mask=False slots (and are counted as skipped) so that per-process shapes stay static.
  Build a new one for each evaluation. `start_batch` skips that many batches without reading
  them (resuming a token extraction); `num_batches` still counts the whole pass.
  """
  local_bs = _check_common(data_config, image_size, global_batch_size, process_index,
                           process_count)
  if source is None:
    source = make_source(data_config, split or data_config.eval_split)
  n = len(source)
  shard_len = len(range(process_index, n, process_count))
  num_batches = eval_num_batches(n, local_bs, process_count)
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f"start_batch {start_batch} is outside the pass of {num_batches} batches")
  ds = grain.MapDataset.range(num_batches * local_bs)
  ds = ds.map_with_index(_EvalExample(source, image_size, data_config.output_dtype,
                                      process_index, process_count, shard_len))
  ds = ds[start_batch * local_bs:]
  ds = ds.batch(local_bs, drop_remainder=True, batch_fn=_eval_batch_fn)
  ds = ds.to_iter_dataset(_read_options(data_config))
  ds = _prefetch(ds, data_config)
  return InputIterator(iter(ds), description=f"eval[{data_config.source}]",
                       num_batches=num_batches)


# ------------------------------------------------------------------------------------------------
# Host batch -> global device arrays.
# ------------------------------------------------------------------------------------------------


def make_global_batch(local_batch: dict[str, np.ndarray], mesh,
                      data_axes: Sequence[str] = axes_lib.BATCH_AXES) -> dict[str, Any]:
  """Process-local numpy batch -> global `jax.Array`s, batch dim sharded over `data_axes`.

  Every process passes its own [B_local, ...] slice; the result has global shape
  [B_local * process_count, ...] with `NamedSharding(mesh, P(data_axes))`. Non-array entries are
  dropped. Axes of `data_axes` missing from the mesh are ignored (a mesh without "fsdp" works).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in axes)
  sharding = NamedSharding(mesh, PartitionSpec(axes))
  out = {}
  for k, v in local_batch.items():
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
      continue
    global_rows = v.shape[0] * jax.process_count()
    if global_rows % shards:
      raise ValueError(f"global batch {global_rows} ({k!r}) is not divisible by the "
                       f"{shards} devices of mesh axes {axes}; change config.batch_size")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
