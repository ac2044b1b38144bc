"""The latent contract for generator training: token statistics (`--mode=stats`) and token
extraction (`--mode=extract`).

Generators (SiT/DiT) train on normalised tokens z_norm = (z_q - vq_mean) / vq_std. Official
checkpoints carry vq_mean / vq_std in their config.json; ours get them from `--mode=stats`, which
encodes a dataset split (centre crops, EMA weights, sharded over the mesh), accumulates the scalar
and per-channel mean/std in float64 on the host, and writes them into the checkpoint's metadata —
after which `load_tokenizer(workdir).encode(x, normalize=True)` uses them as it does for official
checkpoints.

`--mode=extract` encodes a split (optionally also its horizontal flips) into sharded `.npz` files
with labels and record indices: `<out>/p<process>/chunk_<i>.npz`, each written atomically, so a
killed extraction resumes at the first missing chunk; `manifest.json` is written when all are done.
`load_extracted(out)` reads them back in record order.
"""
from __future__ import annotations

import re
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from softvq_jax import data, paths, pixels, sharding

_CHUNK_RE = re.compile(r"chunk_(\d{6})\.npz$")


class LatentStats:
  """Streaming float64 mean/std of token values: scalar (all values) and per channel [D]."""

  def __init__(self, dim: int):
    self.n = 0  # number of tokens (rows of D values)
    self._sum = np.zeros((dim,), np.float64)
    self._sq = np.zeros((dim,), np.float64)

  def update(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
    """tokens [B, N, D] (mask [B] selects the valid examples)."""
    t = np.asarray(tokens, np.float64)
    if mask is not None:
      t = t[np.asarray(mask, bool)]
    t = t.reshape(-1, t.shape[-1])
    self.n += t.shape[0]
    self._sum += t.sum(axis=0)
    self._sq += np.square(t).sum(axis=0)

  def result(self) -> dict[str, Any]:
    if self.n < 2:
      raise ValueError(f"latent statistics need at least 2 tokens, got {self.n}")
    n, d = self.n, self._sum.shape[0]
    mean_c = self._sum / n
    var_c = np.maximum(self._sq / n - mean_c**2, 0.0)
    mean = self._sum.sum() / (n * d)
    var = max(self._sq.sum() / (n * d) - mean**2, 0.0)
    # Population std (torch's z.std() differs by sqrt(M / (M - 1)), negligible for M ~ 1e7).
    return {"vq_mean": float(mean), "vq_std": float(np.sqrt(var)),
            "channel_mean": mean_c.tolist(), "channel_std": np.sqrt(var_c).tolist(),
            "num_tokens": int(n)}


def _encode_fn(tok_graphdef, *, flip: bool):
  def encode(params, images):
    model = nnx.merge(tok_graphdef, params)
    x = pixels.to_model_range(images)
    out = {"tokens": model.encode(x)}
    if flip:
      out["tokens_flip"] = model.encode(x[:, :, ::-1, :])
    return out
  return encode


def _load(config, workdir: str, checkpoint: str | None):
  from softvq_jax import api  # pylint: disable=import-outside-toplevel
  tok, source = api.load_run_tokenizer(config, checkpoint or workdir)
  mesh = sharding.create_mesh(config.mesh_shape)
  graphdef, params = nnx.split(tok.model)
  return tok, mesh, graphdef, jax.device_put(params, sharding.replicated(mesh)), source


def _host_rows(x, mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array (the rows it fed in)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, sharding.batch_sharding(mesh).spec))


def compute_latent_stats(config, workdir: str, checkpoint: str | None = None) -> dict[str, Any]:
  """`--mode=stats`: statistics of the tokens of `config.latents.split` (first
  `config.latents.num_images`, 0 = all); stored in our checkpoint's metadata, and always in
  `<workdir>/latent_stats.json`."""
  tok, mesh, graphdef, params, source = _load(config, workdir, checkpoint)
  lc = config.latents
  gbs = int(lc.batch_size or config.batch_size)
  it = data.build_eval_pipeline(config.data, image_size=config.image_size, global_batch_size=gbs,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), split=lc.split)
  encode = jax.jit(_encode_fn(graphdef, flip=False))
  stats = LatentStats(tok.config.codebook_embed_dim)
  limit = int(lc.num_images) or None
  seen = 0
  for _ in range(it.num_batches):
    local = next(it)
    batch = data.make_global_batch({"image": local["image"], "mask": local["mask"]}, mesh)
    tokens = encode(params, batch["image"])["tokens"]
    mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True)
                      if jax.process_count() > 1 else batch["mask"]).astype(bool)
    if limit:
      mask &= np.cumsum(mask) <= limit - seen
    all_tokens = (multihost_utils.process_allgather(tokens, tiled=True)
                  if jax.process_count() > 1 else tokens)
    stats.update(np.asarray(all_tokens), mask)
    seen += int(mask.sum())
    if limit and seen >= limit:
      break
  result = stats.result()
  result.update({"num_images": seen, "split": lc.split, "image_size": config.image_size,
                 "data": config.data.source})
  stats_json = paths.resolve(workdir) / "latent_stats.json"
  if jax.process_index() == 0:
    paths.write_json(stats_json, result)
    if checkpoint is None:
      write_stats_to_checkpoint(source, result)  # the step directory the tokens came from
    else:
      logging.info("%s is not a checkpoint of ours: statistics written to %s only (for an "
                   "official-format directory, edit vq_mean / vq_std in its config.json)", source,
                   stats_json)
  logging.info("latent statistics of %s: vq_mean %.6f vq_std %.6f over %d images", source,
               result["vq_mean"], result["vq_std"], seen)
  return result


def write_stats_to_checkpoint(workdir: str, stats: dict[str, Any]) -> str:
  """Puts vq_mean / vq_std (and the per-channel statistics) into the metadata item of `workdir`'s
  newest checkpoint (or of `workdir` itself, a step directory), which `api.load_tokenizer` reads.
  Returns the step directory."""
  from softvq_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  step_dir = ckpt_lib.resolve_step_dir(workdir)
  if step_dir is None:
    raise FileNotFoundError(f"{workdir} holds no checkpoint of ours to store the statistics in")
  meta = ckpt_lib.read_json_item(step_dir, "metadata")
  meta["model"]["vq_mean"] = stats["vq_mean"]
  meta["model"]["vq_std"] = stats["vq_std"]
  meta["latent_stats"] = stats
  ckpt_lib.write_json_item(step_dir, "metadata", meta)
  return step_dir


def _done_chunks(proc_dir: epath.Path) -> int:
  """Number of consecutive complete chunks from 0 (chunks are written atomically, so a file that
  exists is complete; a gap is refilled from its first missing chunk on)."""
  have = {int(m.group(1)) for f in proc_dir.iterdir() if (m := _CHUNK_RE.fullmatch(f.name))}
  n = 0
  while n in have:
    n += 1
  return n


def extract_tokens(config, workdir: str, checkpoint: str | None = None,
                   out_dir: str | None = None) -> dict[str, Any]:
  """`--mode=extract`: tokens of `config.latents.split` (+ flips if `config.latents.flip`)."""
  tok, mesh, graphdef, params, source = _load(config, workdir, checkpoint)
  lc = config.latents
  out_dir = paths.resolve(out_dir or lc.out_dir or paths.resolve(workdir) / "tokens")
  proc_dir = out_dir / f"p{jax.process_index():03d}"
  proc_dir.mkdir(parents=True, exist_ok=True)
  done = _done_chunks(proc_dir)
  if jax.process_count() > 1:
    # Every process must restart at the same batch (the encode step is a collective). Each one
    # only sees its own chunks (its p<k>/ folder; hosts need not share a file system), so the
    # resume point is the minimum over all processes, the same number everywhere: a process that
    # got further rewrites its extra chunks with identical content.
    done = int(np.min(multihost_utils.process_allgather(np.array([done]))))
  per_chunk = int(lc.chunk_batches)
  gbs = int(lc.batch_size or config.batch_size)
  pipeline = lambda start: data.build_eval_pipeline(  # noqa: E731
      config.data, image_size=config.image_size, global_batch_size=gbs,
      process_index=jax.process_index(), process_count=jax.process_count(), split=lc.split,
      start_batch=start)
  total_batches = pipeline(0).num_batches
  it = pipeline(min(done * per_chunk, total_batches))
  if done:
    logging.info("resuming the extraction at chunk %d (batch %d of %d)", done, done * per_chunk,
                 total_batches)
  encode = jax.jit(_encode_fn(graphdef, flip=bool(lc.flip)))
  chunk = done
  for start in range(done * per_chunk, total_batches, per_chunk):
    rows: dict[str, list[np.ndarray]] = {}
    for _ in range(min(per_chunk, total_batches - start)):
      local = next(it)
      batch = data.make_global_batch({"image": local["image"]}, mesh)
      out = encode(params, batch["image"])
      m = np.asarray(local["mask"], bool)
      for k, v in out.items():
        rows.setdefault(k, []).append(_host_rows(v, mesh)[m])
      rows.setdefault("label", []).append(np.asarray(local["label"])[m])
      rows.setdefault("index", []).append(np.asarray(local["index"])[m])
    arrays = {k: np.concatenate(v) for k, v in rows.items()}
    paths.save_npz(proc_dir / f"chunk_{chunk:06d}.npz", **arrays)  # atomic: complete or absent
    chunk += 1
  num = sum(int(paths.load_npz(f, keys=("index",))["index"].shape[0])
            for f in proc_dir.iterdir() if _CHUNK_RE.fullmatch(f.name))
  manifest = {"source": source, "split": lc.split, "image_size": config.image_size,
              "flip": bool(lc.flip), "latent_shape": list(tok.latent_shape),
              "vq_mean": tok.config.vq_mean, "vq_std": tok.config.vq_std,
              "process_count": jax.process_count(), "complete": True}
  counts = (multihost_utils.process_allgather(np.array([num])) if jax.process_count() > 1
            else np.array([num]))
  manifest["num_examples"] = int(np.sum(counts))
  if jax.process_index() == 0:
    paths.write_json(out_dir / "manifest.json", manifest)
  logging.info("extracted %d examples' tokens to %s", manifest["num_examples"], out_dir)
  return manifest


def load_extracted(out_dir: str) -> dict[str, np.ndarray]:
  """All chunks of an extraction (a local folder or a URL), concatenated and sorted by record
  index: {"tokens": [M, N, D], ("tokens_flip"), "label": [M], "index": [M]}."""
  out_dir = paths.resolve(out_dir)
  files = sorted((f for f in out_dir.glob("p*/chunk_*.npz") if _CHUNK_RE.fullmatch(f.name)),
                 key=str)
  if not files:
    raise FileNotFoundError(f"{out_dir}: no token chunks (p*/chunk_*.npz); run --mode=extract")
  parts: dict[str, list[np.ndarray]] = {}
  for f in files:
    for k, v in paths.load_npz(f).items():
      parts.setdefault(k, []).append(v)
  out = {k: np.concatenate(v) for k, v in parts.items()}
  order = np.argsort(out["index"], kind="stable")
  return {k: v[order] for k, v in out.items()}
