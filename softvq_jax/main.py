"""Command-line entry point: `python -m softvq_jax.main --config=configs/X.py --workdir=DIR`.

Modes:
  train        (default) train the tokenizer of --config in --workdir: TensorBoard logs,
               metrics.jsonl, reconstruction grids in images/, Orbax checkpoints in checkpoints/.
               Resumes by itself from the newest complete checkpoint in --workdir.
  eval         rFID / PSNR / SSIM / LPIPS / codebook usage of a tokenizer (--checkpoint, else the
               workdir's newest EMA) on config.data.eval_split: <workdir>/eval/*.json + *.png.
  stats        latent statistics (vq_mean / vq_std, per channel too) of config.latents.split,
               stored in the workdir's checkpoint metadata and <workdir>/latent_stats.json.
  extract      tokens (+ flips) of config.latents.split to sharded .npz files, resumable.
  compile      ahead-of-time compile the train step for --target (a TPU slice like v5e-64, or a
               GPU node like 8xH100) without that hardware: per-device memory vs HBM and FLOPs per
               step in <workdir>/compile_<target>.json; exits non-zero when it does not fit.
  reconstruct  encode + decode a batch of evaluation images (the embedded demo photographs by
               default) with a tokenizer — random-initialised from the config, or loaded with
               `--checkpoint` (an official-format directory or hub id) — and write
               `reconstructions.png` (top row inputs, bottom row reconstructions) plus PSNR.
Multi-host: `jax.distributed.initialize()` is called when the environment says the job spans
several processes (TPU pod slices, SLURM, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
JAX_PROCESS_ID as set by launch/multinode.sh); every process runs this same command. --workdir may be
a local path or a gs:// URL (checkpoints, logs and images go through etils.epath / tf.io.gfile).
"""
from __future__ import annotations

import json
import logging as std_logging
import os

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for outputs (logs, images, checkpoints)")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "reconstruct", "eval", "stats", "extract", "compile"],
                          "what to run")
_TARGET = flags.DEFINE_string("target", None, "--mode=compile: hardware to plan for, e.g. v5e-64, "
                              "v4-32, v5p-128, v6e-16, 8xH100, 2x8xH100, cpu-8")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "yes", "no"],
    "call jax.distributed.initialize(): auto = when the environment describes a multi-process job")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None,
    "tokenizer to load (official-format dir, hub id, or a workdir of ours); default: reconstruct "
    "initialises randomly from --config, eval/stats/extract use --workdir's newest checkpoint")
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
  epath.Path(workdir, "reconstruct.json").write_text(json.dumps(result, indent=2))
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


def _distributed_args_from_env() -> dict:
  """jax.distributed.initialize() arguments from JAX_* variables (launch/multinode.sh sets them).

  Why: JAX (0.10) reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS itself, but takes the
  process count and id only as arguments or from a cluster it recognises (SLURM, Open MPI, TPU
  VM/GKE metadata). A plain multi-node launcher (or N processes on one machine) has none of these,
  so JAX_NUM_PROCESSES / JAX_PROCESS_ID are passed here. Unset variables are left to JAX's own
  cluster detection.
  """
  env = os.environ
  args = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    args["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  for var, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if env.get(var):
      try:
        args[name] = int(env[var])
      except ValueError:
        raise app.UsageError(f"{var}={env[var]!r} must be an integer") from None
  if ("num_processes" in args) != ("process_id" in args):
    raise app.UsageError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, to let JAX "
                         "detect SLURM / a TPU slice)")
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    args["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",") if i]
  return args


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
    # Cross-process collectives of the CPU backend (multi-process CPU runs: launch/local_cpu.sh,
    # tests/test_multiprocess.py); "gloo" is JAX 0.10's default, set explicitly so that an older or
    # newer default cannot silently turn them off. The flag only affects the CPU client.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**_distributed_args_from_env())
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
  epath.Path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)  # local path or gs:// URL
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _setup_jax()
  if _MODE.value == "train":
    from softvq_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == "reconstruct":
    reconstruct(config, _WORKDIR.value)
  elif _MODE.value == "eval":
    from softvq_jax import evaluate  # pylint: disable=import-outside-toplevel
    print(json.dumps(evaluate.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value)))
  elif _MODE.value == "stats":
    from softvq_jax import latents  # pylint: disable=import-outside-toplevel
    result = latents.compute_latent_stats(config, _WORKDIR.value, _CHECKPOINT.value)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("channel_")}))
  elif _MODE.value == "compile":  # memory / FLOPs plan of the train step: compile_plan.py
    if not _TARGET.value:
      raise app.UsageError("--mode=compile needs --target (e.g. v5e-64, v4-32, 8xH100)")
    from softvq_jax import compile_plan  # pylint: disable=import-outside-toplevel
    compile_plan.run(config, _WORKDIR.value, _TARGET.value)
  elif _MODE.value == "extract":
    from softvq_jax import latents  # pylint: disable=import-outside-toplevel
    print(json.dumps(latents.extract_tokens(config, _WORKDIR.value, _CHECKPOINT.value)))


if __name__ == "__main__":
  app.run(main)
