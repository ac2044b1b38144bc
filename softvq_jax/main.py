"""Command-line entry point: `python -m softvq_jax.main --config=configs/X.py --workdir=DIR`.

Modes:
  train        (default) train the tokenizer of --config in --workdir: TensorBoard logs,
               metrics.jsonl, reconstruction grids in images/, Orbax checkpoints in checkpoints/.
               Resumes by itself from the newest complete checkpoint in --workdir. With a
               generator config (configs/sit_*.py, dit_*.py, demo_sit.py): trains the SiT / DiT
               on --tokenizer's tokens in the same loop (softvq_jax/generator_task.py).
  eval         rFID / PSNR / SSIM / LPIPS / codebook usage of a tokenizer (--checkpoint, else the
               workdir's newest EMA) on config.data.eval_split: <workdir>/eval/*.json + *.png.
               With a generator config (a `generator` section, e.g. configs/demo_sit.py): gFID,
               Inception Score, precision/recall of config.sample.num_images samples of
               --checkpoint decoded by --tokenizer (softvq_jax/gen_eval.py).
  stats        latent statistics (vq_mean / vq_std, per channel too) of config.latents.split,
               stored in the workdir's checkpoint metadata and <workdir>/latent_stats.json.
  extract      tokens (+ flips) of config.latents.split to sharded .npz files, resumable.
  compile      ahead-of-time compile the train step for --target (a TPU slice like v5e-64, or a
               GPU node like 8xH100) without that hardware: per-device memory vs HBM and FLOPs per
               step in <workdir>/compile_<target>.json; exits non-zero when it does not fit.
  sample       images from a generator (--checkpoint: SiT/DiT, else randomly initialised from
               config.generator) decoded by --tokenizer: <workdir>/samples.png, and with
               --config.sample.num_images=N all N as resumable .npz chunks (softvq_jax/generate.py).
  reconstruct  encode + decode a batch of evaluation images (the embedded demo photographs by
               default) with a tokenizer — random-initialised from the config, or loaded with
               `--checkpoint` (an official-format directory or hub id) — and write
               `reconstructions.png` (top row inputs, bottom row reconstructions) plus PSNR.
Multi-host: `jax.distributed.initialize()` is called when the environment says the job spans
several processes (TPU pod slices, SLURM, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
JAX_PROCESS_ID as set by launch/multinode.sh); every process runs this same command. --workdir may be
a local path or a gs:// URL (checkpoints, logs and images go through etils.epath / tf.io.gfile).

Before anything heavy, a pre-flight (`softvq_jax/preflight.py`) checks the config, the data, the
frozen networks' files (fetching missing ones once when `config.pretrained.auto_fetch` is set),
the workdir and the batch size vs the devices, and reports every problem together. Expected user
errors (a missing config file or flag, a bad config value, missing data, ...) print one message
and exit with status 2; a traceback means a bug.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

# Before anything can load TensorFlow (clu's TensorBoard writer) or libtpu: no native start-up
# chatter (oneDNN notice, absl's "All log messages before absl::InitializeLog()..."); warnings stay.
from softvq_jax import progress  # noqa: E402  (first: sets environment variables)
progress.quiet_native_logs()

from absl import app, flags, logging  # noqa: E402
from etils import epath
import ml_collections
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for outputs (logs, images, checkpoints)")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "reconstruct", "eval", "stats", "extract", "compile",
                           "sample"],
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
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "--mode=sample / generator eval: the tokenizer that decodes the generator's tokens (what "
    "load_tokenizer accepts); default: randomly initialised from --config. --mode=train of a "
    "generator config: the tokenizer whose tokens it models (sets config.generator_data.tokenizer)")


def reconstruct(config, workdir: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from softvq_jax import api, data, pixels, visualize  # pylint: disable=import-outside-toplevel
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
  images = np.asarray(pixels.to_model_range(batch["image"]))
  recon = np.asarray(tok.reconstruct(images))
  inputs_u8, recon_u8 = pixels.to_uint8(images), pixels.to_uint8(recon)
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
        raise UserError(f"{var}={env[var]!r} must be an integer") from None
  if ("num_processes" in args) != ("process_id" in args):
    raise UserError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, to let JAX "
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
    _no_one_sided_compilation_cache(jax)


def _no_one_sided_compilation_cache(jax) -> None:
  """Turns JAX's persistent compilation cache off for multi-process runs on the CPU backend.

  Why: JAX writes cache entries from process 0 only, and on CPU the cache key includes the device
  assignment, so only process 0 ever finds its programs again (measured, JAX 0.10, 2 processes:
  on a rerun process 0 loaded the program from the cache, process 1 compiled it anew). A resumed
  run then has process 0 start the first step while process 1 still compiles the train step (a
  minute or more on a small CPU), and the first cross-process collective fails with a gloo
  timeout. Compiling on every process keeps them in step. GPU (device assignment stripped from
  the key) and TPU slices share entries between processes and keep the cache.
  """
  if (jax.process_count() > 1 and jax.default_backend() == "cpu"
      and jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
    jax.config.update("jax_enable_compilation_cache", False)
    logging.warning("persistent compilation cache (%s) turned off: in multi-process CPU runs only "
                    "process 0 would find its programs in it, and the processes' first "
                    "collective would time out while the others compile",
                    jax.config.jax_compilation_cache_dir)


class UserError(Exception):
  """An error in what the user asked for (flags, config, files); printed without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
  """Exceptions that name a user's mistake and its fix (the modules raise them with a message)."""
  from softvq_jax import data_sources, fetch, preflight  # pylint: disable=import-outside-toplevel
  from softvq_jax import generate  # pylint: disable=import-outside-toplevel
  return (UserError, preflight.PreflightError, data_sources.DataSourceError, fetch.FetchError,
          generate.SampleError)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_override_error(argv, error: BaseException) -> str | None:
  """The message for a `--config.a.b=...` naming a field the config does not have, else None."""
  text = error
  while isinstance(text, BaseException):  # AttributeError(KeyError("'x'\nDid you mean ...?"))
    text = text.args[0] if text.args else str(text)
  text = str(text)
  missing = text.split("'")[1] if text.count("'") >= 2 else ""
  for arg in argv[1:]:
    if arg.startswith("--config.") and missing:
      path = arg[2:].split("=", 1)[0]
      if missing in path.split("."):
        hint = text.split("\n", 1)[1].strip() if "\n" in text else ""
        return f"{arg}: the config has no field {path}" + (f" ({hint})" if hint else "")
  return None


def _parse_flags(argv):
  """absl's flag parsing with user errors as one line and exit status 2 (and --help exits 0).

  absl prints the usage and exits 1 for --help, and ml_collections turns a missing config file
  or an unknown `--config.x` field into a long chained traceback; neither is a bug.
  """
  helps = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
  try:
    args = flags.FLAGS(argv)
  except SystemExit:
    if any(a.split("=")[0] in helps for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if "Traceback" in str(e):  # an exception inside a config file's get_config(arg)
      _fail(f"{lines[0].split(': Error whilst', 1)[0]}: {lines[-1]}")
    _fail(" ".join(lines))
  except (KeyError, AttributeError) as e:
    message = _config_override_error(argv, e)
    if message is None:
      raise
    _fail(message)
  config_arg = flags.FLAGS["config"].value
  if flags.FLAGS["config"].present and not isinstance(config_arg, ml_collections.ConfigDict):
    raw = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
    path = raw.split(":", 1)[0]
    if path and not os.path.exists(path):
      _fail(f"--config={raw}: no such file {os.path.abspath(path)} (the configs are in configs/, "
            "e.g. --config=configs/sq64_512.py)")
    try:  # ml_collections keeps the load error and raises it on first access
      getattr(config_arg, "model")
    except OSError as e:
      _fail(f"--config={raw}: " + " ".join(str(e).split()))
  return args


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/sq64_512.py (see configs/)")
  if _WORKDIR.value is None:
    _fail("--workdir is required: the directory (local or gs://) for logs, checkpoints and "
          "images, e.g. --workdir=/tmp/softvq_run")
  if _MODE.value == "compile" and not _TARGET.value:
    _fail("--mode=compile needs --target (e.g. v5e-64, v4-32, 8xH100)")
  try:
    _run(config)
  except _user_error_types() as e:
    _fail(str(e))


def _run(config) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _setup_jax()
  from softvq_jax import config_lib, preflight  # pylint: disable=import-outside-toplevel
  if _MODE.value == "compile" and config_lib.is_generator_config(config):
    _fail("--mode=compile plans the tokenizer's train step; a generator config (it has a "
          "`generator` section) is not supported yet. Size a generator run with a short "
          "--mode=train on the target instead: its log states the compiled step's memory.")
  if (_MODE.value == "train" and _TOKENIZER.value and config_lib.is_generator_config(config)
      and "generator_data" in config):  # the generator's tokenizer, as for --mode=sample
    config.generator_data.tokenizer = _TOKENIZER.value
  preflight.run(config, _WORKDIR.value, _MODE.value)
  if _MODE.value == "train":
    from softvq_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, _WORKDIR.value,
                             config_path=config_flags.get_config_filename(flags.FLAGS["config"]))
  elif _MODE.value == "reconstruct":
    reconstruct(config, _WORKDIR.value)
  elif _MODE.value == "eval" and config_lib.is_generator_config(config):  # gFID: gen_eval.py
    from softvq_jax import gen_eval  # pylint: disable=import-outside-toplevel
    print(json.dumps(gen_eval.run(config, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
                                  tokenizer=_TOKENIZER.value), default=str))
  elif _MODE.value == "eval":
    from softvq_jax import evaluate  # pylint: disable=import-outside-toplevel
    print(json.dumps(evaluate.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value)))
  elif _MODE.value == "stats":
    from softvq_jax import latents  # pylint: disable=import-outside-toplevel
    result = latents.compute_latent_stats(config, _WORKDIR.value, _CHECKPOINT.value)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("channel_")}))
  elif _MODE.value == "compile":  # memory / FLOPs plan of the train step: compile_plan.py
    from softvq_jax import compile_plan  # pylint: disable=import-outside-toplevel
    compile_plan.run(config, _WORKDIR.value, _TARGET.value)
  elif _MODE.value == "extract":
    from softvq_jax import latents  # pylint: disable=import-outside-toplevel
    print(json.dumps(latents.extract_tokens(config, _WORKDIR.value, _CHECKPOINT.value)))
  elif _MODE.value == "sample":
    from softvq_jax import generate  # pylint: disable=import-outside-toplevel
    print(json.dumps(generate.run(config, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
                                  tokenizer=_TOKENIZER.value), default=str))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
