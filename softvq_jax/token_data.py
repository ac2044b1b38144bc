"""Generator training data from pre-extracted tokens (data path (a)), and the latent-scale guard.

`--mode=extract` (softvq_jax/latents.py) writes the tokenizer's raw tokens z_q of a split, and of
its horizontal flips, to `<out>/p<process>/chunk_<i>.npz` ({"tokens", "tokens_flip", "label",
"index"}) plus `manifest.json` when complete. This module serves them to the generator's trainer:

  source = TokenSource(out_dir, vq_mean=tok.config.vq_mean, vq_std=tok.config.vq_std, seed=seed)
  source[i]  # {"latents": [N, e] float32 = (z_q - vq_mean) / vq_std, "label": int32,
             #  "index": int32 (record index in the split), "flipped": bool}
  it = build_token_train_pipeline(source, global_batch_size=256, seed=seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  batch = next(it)   # {"latents": [B_local, N, e], "label": [B_local], "index", "flipped"}
  state = it.get_state(); it.set_state(state)   # exact resume (one integer)

Why the choice between a token and its flip is a pure function of (seed, epoch, record): the
reference picks one of the two at random at every access (spec.md §8: "pre-extracted z_q and z_q of
the flipped image, picking one at random"); taking it from a hash of (seed, epoch, record)
(`coin_flips`) keeps that augmentation (a record is flipped in some epochs and not in others) while the
whole stream stays a function of the pipeline position, so a resumed run reads exactly the batches
an uninterrupted one would — the same rule as the image pipeline's crops (softvq_jax/data.py).

Why a new module and not a class in data_sources.py: those sources hand out undecoded image
records for data.py's shared decoder and bad-file policy; tokens need neither, and they come with
their own contract (normalisation statistics, the guard below, the flip choice), so they get one
small module that does not touch the image path.

Memory: the chunks are read once into two host arrays (tokens and flips, float32): ImageNet's
1.28 M images at 64 x 32 tokens are 10.5 GB each, 21 GB with flips, per process. The examples are
a slice and a scale, so the pipeline runs in the trainer's process (Grain threads, no worker
processes, which would each receive a pickled copy of the arrays). Every process reads the whole
extraction (all p<k>/ folders, which `--mode=extract` may have written on different hosts): give
the trainer a directory all processes can read (a shared file system or gs://...).

The guard (`check_latent_statistics`): a tokenizer whose statistics are the defaults (vq_mean 0,
vq_std 1) has never been measured; a generator trained on its raw tokens trains fine and samples
garbage at decode time, with nothing in the logs to say why. It is refused unless the caller says
`allow_unnormalised_latents=True`. The trainer calls it for both data paths; TokenSource calls it
itself.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from absl import logging
import grain
import numpy as np

from softvq_jax import paths

_CHUNK_RE = re.compile(r"chunk_(\d{6})\.npz$")
MANIFEST = "manifest.json"


class UnnormalisedLatentsError(ValueError):
  """A generator would train on latents nobody normalised (vq_mean 0, vq_std 1)."""


def check_latent_statistics(vq_mean: float, vq_std: float, *,
                            allow_unnormalised_latents: bool = False,
                            source: str = "the tokenizer") -> None:
  """Refuses the default latent statistics (0, 1) for generator training unless allowed.

  Raises UnnormalisedLatentsError naming the fixes: measure the statistics with `--mode=stats`
  (stored in our checkpoint; for an official-format directory, put them in its config.json as
  vq_mean / vq_std), or pass allow_unnormalised_latents=True when the raw tokens are what you
  want. A non-finite mean or a std that is not > 0 is always refused (ValueError).
  """
  mean, std = float(vq_mean), float(vq_std)
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise ValueError(f"{source}: latent statistics vq_mean={mean}, vq_std={std} are unusable "
                     "(need a finite mean and a std > 0); re-run --mode=stats")
  if (mean, std) != (0.0, 1.0):
    return
  if allow_unnormalised_latents:
    logging.warning("%s has the default latent statistics (vq_mean=0, vq_std=1): training the "
                    "generator on un-normalised tokens, as allow_unnormalised_latents=True asks",
                    source)
    return
  raise UnnormalisedLatentsError(
      f"{source} has the default latent statistics (vq_mean=0, vq_std=1): they were never "
      "measured, so a generator would train on un-normalised tokens — the classic silent failure "
      "(the loss looks fine, the samples decode at the wrong scale). Fix: measure them with "
      "`python -m softvq_jax.main --mode=stats --config=<the tokenizer's config> "
      "--workdir=<its workdir>` (they are stored in its checkpoint; for an official-format "
      "directory, write the printed vq_mean / vq_std into its config.json), then use that "
      "tokenizer; or, if the raw tokens are really what you want, set "
      "allow_unnormalised_latents=True.")


def _chunk_files(root) -> list:
  return sorted((f for f in root.glob("p*/chunk_*.npz") if _CHUNK_RE.fullmatch(f.name)), key=str)


class TokenSource:
  """Grain random-access source over an extraction's chunks (`grain.sources.RandomAccessDataSource`:
  `__len__` + `__getitem__`); see the module docstring.

  directory: the extraction's out dir (local or a URL), with manifest.json (a complete
  extraction). vq_mean / vq_std: the tokenizer's statistics (default: those the manifest recorded
  at extraction time; pass the tokenizer's when `--mode=stats` ran after the extraction — the
  chunks hold raw z_q, so only the normalisation changes). flip: pick the flipped image's tokens
  with probability 0.5 (needs an extraction with config.latents.flip=True; None = when present).

  Positions follow the record index (position i = the i-th smallest record index, i.e. record i
  of a whole split). `source[i]` for i >= len(source) is position i % len in epoch i // len;
  `example(position, epoch)` is the same thing spelled out.
  """

  def __init__(self, directory, *, vq_mean: float | None = None, vq_std: float | None = None,
               seed: int = 0, flip: bool | None = None,
               allow_unnormalised_latents: bool = False):
    root = paths.resolve(directory)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
      have = _chunk_files(root) if root.is_dir() else []
      hint = (f"it has {len(have)} chunk(s) but no {MANIFEST}: the extraction did not finish; "
              "re-run the same --mode=extract command, it resumes" if have else
              "it holds no extraction; run --mode=extract first")
      raise FileNotFoundError(f"{root}: not a complete token extraction ({hint})")
    self.manifest = json.loads(manifest_path.read_text())
    self.directory = str(root)
    self.vq_mean = float(self.manifest["vq_mean"] if vq_mean is None else vq_mean)
    self.vq_std = float(self.manifest["vq_std"] if vq_std is None else vq_std)
    check_latent_statistics(self.vq_mean, self.vq_std,
                            allow_unnormalised_latents=allow_unnormalised_latents,
                            source=f"the tokenizer of {root} ({self.manifest.get('source')})")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    self.seed = int(seed)
    has_flip = bool(self.manifest.get("flip", False))
    if flip and not has_flip:
      raise ValueError(f"{root}: flip=True needs the flipped images' tokens; extract with "
                       "--config.latents.flip=True")
    self.flip = has_flip if flip is None else bool(flip)
    self._load(root)

  def _load(self, root) -> None:
    files = _chunk_files(root)
    if not files:
      raise FileNotFoundError(f"{root}: {MANIFEST} but no p*/chunk_*.npz files")
    indices = [paths.load_npz(f, keys=("index",))["index"] for f in files]
    all_index = np.concatenate(indices)
    order = np.sort(all_index)
    if len(np.unique(order)) != len(order):
      raise ValueError(f"{root}: record indices repeat across chunks (two extractions mixed in one "
                       "folder?); extract into an empty folder")
    expected = self.manifest.get("num_examples")
    if expected is not None and int(expected) != len(order):
      raise ValueError(f"{root}: the chunks hold {len(order)} examples, the manifest says "
                       f"{expected}; re-run --mode=extract into an empty folder")
    keys = ("tokens", "label") + (("tokens_flip",) if self.flip else ())
    first = paths.load_npz(files[0], keys=("tokens",))["tokens"]
    n = len(order)
    self.latent_shape = tuple(first.shape[1:])
    self._tokens = np.empty((n,) + self.latent_shape, np.float32)
    self._tokens_flip = np.empty_like(self._tokens) if self.flip else None
    self._labels = np.empty((n,), np.int32)
    self._index = order.astype(np.int64)
    for f, idx in zip(files, indices):
      arrays = paths.load_npz(f, keys=keys)
      pos = np.searchsorted(order, idx)
      self._tokens[pos] = arrays["tokens"]
      self._labels[pos] = arrays["label"]
      if self.flip:
        self._tokens_flip[pos] = arrays["tokens_flip"]
    logging.info("token source %s: %d examples %s, flips %s, vq_mean %.6g vq_std %.6g", root, n,
                 self.latent_shape, "on" if self.flip else "off", self.vq_mean, self.vq_std)

  def __len__(self) -> int:
    return len(self._labels)

  def __repr__(self) -> str:
    return (f"TokenSource({self.directory!r}, {len(self)} examples, latents {self.latent_shape}, "
            f"flip={self.flip})")

  def flipped(self, position: int, epoch: int) -> bool:
    """Whether `example(position, epoch)` serves the flipped image's tokens."""
    return bool(self._flips(np.array([position]), np.array([epoch]))[0])

  def _flips(self, positions: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    if not self.flip:
      return np.zeros(positions.shape, bool)
    return coin_flips(self.seed, epochs, self._index[positions])

  def examples(self, positions, epochs) -> dict[str, np.ndarray]:
    """A batch at once (what the pipeline calls): positions [B], epochs [B] ->
    {"latents": [B, N, e] float32, "label": [B] int32, "index": [B] int32, "flipped": [B] bool},
    row b equal to example(positions[b], epochs[b])."""
    positions = np.asarray(positions, np.int64)
    flipped = self._flips(positions, np.asarray(epochs, np.int64))
    tokens = self._tokens[positions]
    if flipped.any():
      tokens[flipped] = self._tokens_flip[positions[flipped]]
    tokens -= np.float32(self.vq_mean)
    tokens /= np.float32(self.vq_std)
    return {"latents": tokens, "label": self._labels[positions],
            "index": self._index[positions].astype(np.int32), "flipped": flipped}

  def example(self, position: int, epoch: int = 0) -> dict[str, Any]:
    one = self.examples(np.array([int(position)]), np.array([int(epoch)]))
    return {k: v[0] for k, v in one.items()}

  def __getitem__(self, index: int) -> dict[str, Any]:
    epoch, position = divmod(int(index), len(self))
    return self.example(position, epoch)


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed hash."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def coin_flips(seed: int, epochs, records) -> np.ndarray:
  """Fair coins, one per (epoch, record) pair of `seed`: a pure, vectorised function (a hash, not
  a generator's state), so any example's choice is known from its position alone."""
  epochs = np.atleast_1d(np.asarray(epochs)).astype(np.uint64)
  records = np.atleast_1d(np.asarray(records)).astype(np.uint64)
  h = _mix64(_mix64(_mix64(np.full(records.shape, seed, np.uint64)) ^ epochs) ^ records)
  return (h >> np.uint64(63)) == 1


@dataclasses.dataclass(frozen=True)
class _TokenBatch:
  """(batch number, source positions [B]) -> the batch; element k of the stream (position
  b * B + i) is in epoch k // shard_len."""
  source: TokenSource
  shard_len: int
  batch_size: int

  def __call__(self, batch_number: int, positions: np.ndarray) -> dict[str, np.ndarray]:
    stream = int(batch_number) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    return self.source.examples(positions, stream // self.shard_len)


def build_token_train_pipeline(source: TokenSource, *, global_batch_size: int, seed: int,
                               process_index: int = 0, process_count: int = 1,
                               num_threads: int = 2) -> grain.DatasetIterator:
  """This process's infinite stream of token batches, as the image pipeline orders it:
  positions [process_index::process_count] -> shuffle(seed) (re-seeded per epoch) -> repeat ->
  example (flip choice from (source.seed, epoch, record)) -> batch. A pure function of the
  position: `get_state()` / `set_state()` resume exactly. Elements: {"latents": [B_local, N, e]
  float32, "label": [B_local] int32, "index": [B_local] int32, "flipped": [B_local] bool}."""
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if len(source) < process_count:
    raise ValueError(f"{source!r} has fewer examples than the {process_count} processes")
  ids = grain.MapDataset.range(len(source))[process_index::process_count]
  ds = ids.shuffle(seed=seed).repeat(None)
  local_bs = global_batch_size // process_count
  ds = ds.batch(local_bs, drop_remainder=True)
  ds = ds.map_with_index(_TokenBatch(source, len(ids), local_bs))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads)))
  return iter(ds)
