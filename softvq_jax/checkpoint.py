"""Orbax checkpoints of a training run: everything needed to continue, in one step directory.

    <workdir>/checkpoints/<step>/
      state/      the sharded TrainState (params, EMA, optimizer, step, rng, [discriminator]): the
                  whole TrainState, which holds nothing else (the objective's frozen networks are
                  not in it: they are loaded from their own files at every start);
                  `load_tokenizer(workdir)` restores only its `ema_params` subtree (Orbax partial
                  restore), never the 4x larger optimizer state
      data/       the Grain iterator state, one JSON file per process (grain.checkpoint)
      config/     the run's full ml_collections config (JSON)
      metadata/   model config, latent statistics, library versions, mesh, process count (JSON)

Why this shape (exact resume incl. the data position, tests/test_main.py; resume on another
topology, tests/test_train.py; loading on one CPU without the mesh; failures that are loud):
* Saves are asynchronous (the step loop continues while arrays are written) and atomic: Orbax
  writes into a temporary directory and renames it when every process has finished, so a save
  interrupted by a crash or kill leaves no step directory, and `latest_step()` only ever returns
  complete checkpoints. Leftover temporary directories are deleted at start-up.
* Restore takes the *target* shardings, so a checkpoint written on one mesh (8 devices, FSDP)
  restores onto another (4 devices, data parallel): Orbax reads each device's slices.
* An error of a background save is raised at the next save / `wait()` instead of being lost.
* Which checkpoints exist is read by process 0 alone and broadcast (Orbax's
  `single_host_load_and_broadcast`), so every process resumes from the same step even when their
  views of the storage differ for a moment (object-store listings, caches).
* The workdir is a local path or a URL (gs://...); every access goes through etils.epath
  (`softvq_jax.paths`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from softvq_jax import paths

ITEMS = ("state", "data", "config", "metadata")
CHECKPOINT_SUBDIR = "checkpoints"


def absolute_workdir(workdir) -> str:
  """A local path made absolute; a URL (gs://bucket/run, s3://...) returned unchanged.

  Why not os.path.abspath: it turns "gs://b/run" into "<cwd>/gs:/b/run", a silently local
  directory. Everything that touches the workdir goes through etils.epath (tf.io.gfile for gs://),
  as Orbax does.
  """
  return paths.resolve_str(workdir)


def checkpoint_dir(workdir) -> str:
  return os.fspath(paths.resolve(workdir) / CHECKPOINT_SUBDIR)


def library_versions() -> dict[str, str]:
  out = {}
  for name in ("softvq_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


class Checkpointer:
  """A thin, explicit wrapper of `ocp.CheckpointManager` for the trainer's items."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_every_steps: int = 0,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every_steps or None,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        single_host_load_and_broadcast=True,
    )
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, data_iterator, config: dict, metadata: dict,
           force: bool = False) -> bool:
    """Starts an async save of everything at `step`; returns whether a save was started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config),
        metadata=ocp.args.JsonSave(dict(metadata, step=int(step),
                                        versions=library_versions())),
    )
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, *, data_iterator=None):
    """Restores the TrainState onto the shardings carried by `abstract_state`'s leaves
    (jax.ShapeDtypeStruct with .sharding) and, if given, the iterator's position in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items)).state
    except ValueError as e:
      if "frozen" not in str(e):
        raise
    # Written before the frozen networks left the TrainState (issue 14): its state has one more
    # field, `frozen`, always None there. Everything else is the same: restore the fields we have.
    logging.info("step %d was written with the older TrainState layout (a `frozen` field); "
                 "restoring its other fields", step)
    state = _restore_fields(epath.Path(self.directory) / str(step) / "state", abstract_state)
    if data_iterator is not None:
      self._manager.restore(step, args=ocp.args.Composite(data=items["data"]))
    return state

  def wait(self) -> None:
    """Blocks until the background save finished; raises its error if it failed."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any process got a preemption notice (multi-host, JAX's
    coordination service); single-process runs use the trainer's own SIGTERM handler."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def read_json_item(step_dir: str, item: str) -> dict[str, Any]:
  """Reads a JSON item ("config" / "metadata") of one step directory (no mesh needed)."""
  path = epath.Path(step_dir) / item
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: this checkpoint has no {item!r} item")
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def write_json_item(step_dir: str, item: str, value: dict[str, Any]) -> None:
  """Replaces a JSON item of one step directory (atomically: Orbax writes a temporary directory
  and renames it), e.g. to add latent statistics to "metadata" after training."""
  path = epath.Path(step_dir) / item
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(path, value, force=True)


def resolve_step_dir(path: str) -> str | None:
  """A workdir, its checkpoints/ directory or one step directory -> the step directory to load
  (the newest complete one), or None if `path` holds no checkpoint of ours."""
  path = epath.Path(absolute_workdir(path))
  if (path / "state").is_dir() and (path / "config").is_dir():
    return str(path)
  for root in (path / CHECKPOINT_SUBDIR, path):
    if not root.is_dir():
      continue
    steps = [int(d.name) for d in root.iterdir()
             if d.name.isdigit() and (d / "state").is_dir()]
    if steps:
      return str(root / str(max(steps)))
  return None


def agreed_source(source: str) -> str:
  """The tokenizer source that every process of a run loads (`--mode=eval/stats/extract`): a
  workdir or checkpoints/ directory of ours becomes its newest complete step directory as process
  0 sees it; anything else (an official-format directory, a hub id) is returned unchanged.

  Why: processes that each resolved "the newest checkpoint" themselves could pick different steps
  while a training job is still adding them, or when their views of the storage differ, and would
  then evaluate different weights without noticing.
  """
  from softvq_jax.convert import official  # pylint: disable=import-outside-toplevel
  chosen = ""
  if jax.process_index() == 0:
    path = paths.resolve(source)
    try:
      if (paths.is_url(source) or path.exists()) and path.is_dir() and \
          not official.is_official_dir(path):
        chosen = resolve_step_dir(path) or ""
    except OSError as e:  # every process then tries `source` itself and reports the problem
      logging.warning("cannot list %s (%s)", path, e)
  return _str_from_process_0(chosen) or source


def _str_from_process_0(text: str, max_bytes: int = 4096) -> str:
  """Process 0's `text` on every process (a fixed-size byte buffer through a broadcast)."""
  raw = text.encode()
  if len(raw) > max_bytes:
    raise ValueError(f"path too long to share between processes ({len(raw)} > {max_bytes} bytes)")
  buf = np.zeros((max_bytes,), np.uint8)
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)
  return bytes(buf).rstrip(b"\0").decode()


def _restore_fields(state_dir, abstract_state):
  """The fields of the dataclass `abstract_state` from a state directory that may hold more
  (Orbax partial restore), onto the shardings of `abstract_state`'s leaves."""
  target = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return abstract_state.replace(**out)


def restore_ema(step_dir: str, abstract_params):
  """EMA parameters of one step directory onto the shardings of `abstract_params` (e.g. one CPU);
  reads only the `ema_params` subtree of the state: no mesh, no optimizer state."""
  target = {"ema_params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(epath.Path(step_dir) / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return out["ema_params"]


def log_restore(step: int, directory: str) -> None:
  if jax.process_index() == 0:
    logging.info("resuming from step %d (%s)", step, directory)
