"""Command-line entry point: `python -m softvq_jax.main --config=configs/X.py --workdir=DIR`.

Modes:
  train        (default) train the tokenizer of --config in --workdir: TensorBoard logs,
               metrics.jsonl, reconstruction grids in images/, Orbax checkpoints in checkpoints/.
               Resumes by itself from the newest complete checkpoint in --workdir.
  reconstruct  encode + decode a batch of evaluation images (the embedded demo photographs by
               default) with a tokenizer — random-initialised from the config, or loaded with
               `--checkpoint` (an official-format directory or hub id) — and write
               `reconstructions.png` (top row inputs, bottom row reconstructions) plus PSNR.
Multi-host: `jax.distributed.initialize()` is called when the environment says the job spans
several processes (TPU pod slices, SLURM, or JAX_COORDINATOR_ADDRESS / --coordinator_address);
every process runs this same command.
"""
from __future__ import annotations

import json
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for outputs (logs, images, checkpoints)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "reconstruct"], "what to run")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "call jax.distributed.initialize(): auto = when the environment describes a multi-process job")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "tokenizer to load (official-format dir or hub id); default: "
                                  "random initialisation from --config")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "images to reconstruct")


def reconstruct(config, workdir: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax import api, data, visualize  # pylint: disable=import-outside-toplevel
  from softvq_jax.models.tokenizer import TokenizerConfig, build_tokenizer  # pylint: disable=import-outside-toplevel

  if _CHECKPOINT.value:
    tok = api.load_tokenizer(_CHECKPOINT.value, compute_dtype=config.model.compute_dtype)
  else:
    cfg = TokenizerConfig.from_config(config)
    tok = api.Tokenizer(cfg, build_tokenizer(cfg, seed=config.seed))
    logging.info("randomly initialised tokenizer (no --checkpoint): expect noise")
  size = tok.config.image_size
  it = data.build_eval_pipeline(config.data, image_size=size, global_batch_size=_NUM_IMAGES.value)
  batch = next(iter(it))
  images = np.asarray(data.to_model_range(batch["image"]))
  recon = np.asarray(tok.reconstruct(images))
  inputs_u8, recon_u8 = visualize.to_uint8(images), visualize.to_uint8(recon)
  mse = np.mean((inputs_u8.astype(np.float64) - recon_u8) ** 2)
  result = {"mode": "reconstruct", "num_images": int(images.shape[0]), "image_size": size,
            "psnr": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10))),
            "tokens_shape": list(tok.latent_shape), "device": jax.devices()[0].device_kind}
  path = os.path.join(workdir, "reconstructions.png")
  visualize.save_png(path, visualize.image_grid([inputs_u8, recon_u8]))
  with open(os.path.join(workdir, "reconstruct.json"), "w") as f:
    json.dump(result, f, indent=2)
  logging.info("wrote %s: %s", path, result)
  print(json.dumps(result))
  return result


def _is_multiprocess_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES", "1") not in ("", "1"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  # TPU VM pod slices: more than one worker host.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


class _QuietLibraries:
  """Drops INFO records of Orbax (dozens of lines per save) from the log; warnings pass."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _setup_jax() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  # Random numbers independent of the mesh, so a resume on another mesh shape is exact.
  jax.config.update("jax_threefry_partitionable", True)
  if _DISTRIBUTED.value == "yes" or (_DISTRIBUTED.value == "auto" and
                                     _is_multiprocess_environment()):
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from softvq_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  config_lib.validate(config)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _setup_jax()
  if _MODE.value == "train":
    from softvq_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == "reconstruct":
    reconstruct(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
