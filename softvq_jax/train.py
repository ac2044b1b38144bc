"""The training loop: mesh, data, state, resume, jitted step, logging, images, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m softvq_jax.main --mode=train` runs, on one
CPU, 8 fake CPU devices, a GPU node, a GPU cluster or a TPU pod alike:

1. mesh from `config.mesh_shape`; the TrainState's shardings from the parameters' logical axes;
2. resume by itself: the newest complete checkpoint in `<workdir>/checkpoints` (state onto this
   run's mesh, whatever mesh wrote it, and the data iterator's position), else a fresh state
   created directly sharded by a jitted init;
3. per step: next host batch -> global array over (data, fsdp) -> `p_step(state, frozen, batch)`
   (jitted with explicit in/out shardings; the TrainState donated, the objective's frozen
   networks loaded once and passed beside it) -> metrics folded into a device-side window;
4. every `log_every_steps`: window means to TensorBoard + `<workdir>/metrics.jsonl` (process 0),
   images/s, step time, MFU, and one progress line on stdout (step/total, images/s, ETA, the main
   losses; `progress.MetricsLog`); a NaN/Inf loss stops the run here naming the step, before
   anything is saved, so the last checkpoint stays the last good one;
5. at step 0 (a fresh run), every `image_every_steps` and at the end: input | EMA-reconstruction
   grids (PNG in `<workdir>/images`, and TensorBoard); every `checkpoint_every_steps`, at the end
   and on SIGTERM / a preemption notice: an async Orbax checkpoint.

The whole config goes to `<workdir>/config.json` (and TensorBoard's hparams); the last log lines
say where the outputs are and how to evaluate and load the tokenizer.

One loop, two tasks: what differs between training a tokenizer and a generator (SiT / DiT over a
tokenizer's tokens) is a small task object chosen by `config_lib.is_generator_config` (`task_for`):
`TokenizerTask` here, `generator_task.GeneratorTask` — the Trainer (state, shardings, step), the
input iterator and which of its keys go to the step, the metric window, the image grid (EMA
reconstructions / EMA samples), the in-loop evaluation (rFID / gFID), the checkpoint metadata and
the end of the run (the closing message; the generator also exports its EMA weights). Resume,
checkpoints, SIGTERM, the NaN stop and logging are this module's, for both.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding

from softvq_jax import checkpoint as ckpt_lib
from softvq_jax import (config_lib, data, hardware, optim, pixels, progress, sharding, steps,
                        visualize)
from softvq_jax import objective as objective_lib
from softvq_jax.models.tokenizer import TokenizerConfig
from softvq_jax.train_state import (TrainState, abstract_train_state, init_train_state,
                                    train_state_shardings)

# The chip table lives in softvq_jax/hardware.py; kept here for callers of `train.*`.
peak_flops_per_device = hardware.peak_flops_per_device


def train_step_flops(step_fn, *abstract_args) -> float | None:
  """Model FLOPs of one step from XLA's cost analysis of the (unpartitioned) lowered step."""
  try:
    cost = jax.jit(step_fn).lower(*abstract_args).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops or None
  except Exception as e:  # pylint: disable=broad-except  # a metric must not stop training
    logging.warning("could not count the train step's FLOPs (%s); no MFU will be reported", e)
    return None


def due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, image grid, evaluation, checkpoint) runs after `step`: every
  `every` steps (0: never periodically) and always at the last step."""
  return step == total or (every > 0 and step % every == 0)


class _Preemption:
  """SIGTERM -> save and stop at the next step (single host); multi-host runs also ask JAX's
  coordination service, so that every process stops at the same step."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer):
    self._ckpt = checkpointer
    self.signalled = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      pass

  def _handler(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self.signalled

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _log_compiled(compiled, seconds: float) -> None:
  try:
    mem = compiled.memory_analysis()
    gib = lambda b: b / 2**30  # noqa: E731
    logging.info("compiled the train step in %.1f s; per device: arguments %.3f GiB, outputs "
                 "%.3f GiB (aliased %.3f), temporaries %.3f GiB", seconds,
                 gib(mem.argument_size_in_bytes), gib(mem.output_size_in_bytes),
                 gib(mem.alias_size_in_bytes), gib(mem.temp_size_in_bytes))
  except Exception:  # pylint: disable=broad-except  # memory analysis is backend-dependent
    logging.info("compiled the train step in %.1f s", seconds)


def _metadata(config, cfg: TokenizerConfig, mesh) -> dict[str, Any]:
  return {
      "model": dataclasses.asdict(cfg),
      "latent_stats": {"vq_mean": cfg.vq_mean, "vq_std": cfg.vq_std},
      "mesh_shape": [int(s) for s in mesh.devices.shape],
      "process_count": jax.process_count(),
      "global_batch_size": int(config.batch_size),
  }


def _grid_images(config, num: int) -> np.ndarray:
  """The first `num` eval images (centre crops), identical on every process: [num, S, S, 3]."""
  it = data.build_eval_pipeline(config.data, image_size=config.image_size, global_batch_size=num)
  return np.asarray(next(iter(it))["image"])


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one config on one mesh: shardings, the init and the train step.

  `p_step(state, frozen, {"image": global [B, S, S, 3]}) -> (state, metrics)` is the jitted pure
  step with explicit in/out shardings; only `state` (the TrainState, exactly what is checkpointed)
  is donated. `frozen` is `self.frozen()`: the objective's pretrained networks, loaded once.
  """
  mesh: Mesh
  graphdef: Any
  objective: objective_lib.Objective
  abstract_state: TrainState   # ShapeDtypeStructs carrying this mesh's shardings
  state_sharding: TrainState
  abstract_frozen: Any         # the same for the frozen networks (None: the objective has none)
  frozen_sharding: Any
  batch_sharding: NamedSharding
  step_fn: Callable            # the pure step (not jitted)
  single_pass_step_fn: Callable  # the same without gradient accumulation (to count FLOPs)
  p_step: Callable
  init_fn: Callable[[], TrainState]  # a fresh state, directly sharded
  load_frozen_fn: Callable[[], Any]

  def frozen(self):
    """The frozen networks (LPIPS, DINO backbone, REPA teacher) on the mesh; loaded once."""
    if not hasattr(self, "_frozen"):
      self._frozen = self.load_frozen_fn()
    return self._frozen

  def init_state(self) -> TrainState:
    return self.init_fn()

  def abstract_batch(self, config) -> dict[str, jax.ShapeDtypeStruct]:
    s = config.image_size
    dtype = jnp.uint8 if config.data.output_dtype == "uint8" else jnp.float32
    return {"image": jax.ShapeDtypeStruct((config.batch_size, s, s, 3), dtype,
                                          sharding=self.batch_sharding)}

  def abstract_args(self, config) -> tuple:
    """(state, frozen, batch) as sharded ShapeDtypeStructs: what `p_step.lower` takes."""
    return self.abstract_state, self.abstract_frozen, self.abstract_batch(config)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      shardings)


def build_trainer(config, mesh: Mesh) -> Trainer:
  """The train step and state layout of `config` on `mesh` (nothing is computed yet)."""
  rules = tuple(tuple(r) for r in config.sharding_rules)
  cfg = TokenizerConfig.from_config(config)
  tx, schedule = optim.build_optimizer(config.optim, batch_size=config.batch_size,
                                       total_steps=int(config.num_train_steps))
  obj = objective_lib.build_objective(config)
  # The discriminator: the generator's optimizer settings and schedule (spec.md §5), its own state.
  disc_tx = (optim.build_optimizer(config.optim, batch_size=config.batch_size,
                                   total_steps=int(config.num_train_steps))[0]
             if obj.gan else None)
  graphdef, abstract = abstract_train_state(cfg, tx, config.seed, objective=obj, disc_tx=disc_tx)
  state_sh = train_state_shardings(abstract, tx, mesh, rules, disc_tx=disc_tx)
  frozen_sh = sharding.frozen_shardings(obj.frozen_shapes, mesh, rules, config.frozen_sharding)
  batch_sh = sharding.batch_sharding(mesh)
  make_step = functools.partial(
      steps.make_train_step, graphdef, tx, schedule, objective=obj,
      ema_decay=config.optim.ema_decay, batch_sharding=batch_sh, disc_tx=disc_tx)
  step_fn = make_step(grad_accum_steps=config.grad_accum_steps)
  # keep_unused: a frozen weight the step does not read (the DINO backbone's final norm) is still
  # an argument, so the compiled memory analysis counts every byte the device holds for the step.
  p_step = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, {"image": batch_sh}),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                   keep_unused=True)
  init = jax.jit(functools.partial(init_train_state, cfg, tx, config.seed, objective=obj,
                                   disc_tx=disc_tx),
                 out_shardings=state_sh)

  def load_frozen():
    if not obj.any_network:
      return None
    frozen, random = objective_lib.load_frozen(obj, config)
    logging.info("frozen networks of the objective: %s",
                 {k: "random init" if v else "pretrained" for k, v in random.items()})
    return jax.device_put(frozen, frozen_sh)

  return Trainer(mesh=mesh, graphdef=graphdef, objective=obj,
                 abstract_state=_with_shardings(abstract, state_sh), state_sharding=state_sh,
                 abstract_frozen=(_with_shardings(obj.frozen_shapes, frozen_sh)
                                  if obj.any_network else None),
                 frozen_sharding=frozen_sh, batch_sharding=batch_sh, step_fn=step_fn,
                 single_pass_step_fn=(step_fn if config.grad_accum_steps == 1
                                      else make_step(grad_accum_steps=1)),
                 p_step=p_step, init_fn=init, load_frozen_fn=load_frozen)


def restore_or_init(trainer: Trainer, checkpointer: ckpt_lib.Checkpointer, train_iter,
                    seed: int) -> TrainState:
  """The newest complete checkpoint's state (onto this run's mesh, whatever mesh wrote it) and,
  in place, the data iterator's position; else a fresh state (created sharded, from `seed`)."""
  latest = checkpointer.latest_step()
  if latest is not None:
    ckpt_lib.log_restore(latest, checkpointer.directory)
    return checkpointer.restore(latest, trainer.abstract_state, data_iterator=train_iter)
  logging.info("no checkpoint in %s: starting from scratch (seed %d)", checkpointer.directory,
               seed)
  return trainer.init_state()


class TokenizerTask:
  """What is particular to training a SoftVQ tokenizer (the loop itself is `train_and_evaluate`):
  the Trainer (state, shardings, step), the image batches, input | EMA-reconstruction grids,
  the rFID in-loop evaluation, the checkpoint metadata and the closing message.

  The generator's counterpart is softvq_jax/generator_task.py's GeneratorTask; `task_for`
  picks one by `config_lib.is_generator_config`. Both have the same members.
  """
  batch_keys = ("image",)  # what of a host batch goes to the step
  accumulate_metrics = staticmethod(steps.accumulate_metrics)
  summarize_window = staticmethod(steps.summarize_window)

  def __init__(self, config):
    self.config = config
    self.cfg = TokenizerConfig.from_config(config)
    self.description = str(self.cfg)

  def build_trainer(self, mesh: Mesh) -> Trainer:
    return build_trainer(self.config, mesh)

  def train_iterator(self):
    c = self.config
    return data.build_train_pipeline(
        c.data, image_size=c.image_size, global_batch_size=c.batch_size, seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def grid_writer(self, trainer, workdir, writer, is_main):
    return _grid_writer(self.config, trainer, workdir, writer, is_main)

  def in_loop_evaluator(self, trainer, workdir, writer, is_main):
    return _in_loop_evaluator(self.config, trainer, workdir, writer, is_main)

  def metadata(self, mesh) -> dict[str, Any]:
    return _metadata(self.config, self.cfg, mesh)

  def finish(self, state, trainer, workdir: str, *, step: int, minutes: float,
             config_path: str | None, eval_result) -> str:
    del state, trainer
    return progress.outputs_message(workdir, step=step, minutes=minutes, config_path=config_path,
                                    eval_result=eval_result)


def task_for(config):
  """The task of `config`: a generator (SiT / DiT over a tokenizer's tokens) when it has a
  `generator` section (`config_lib.is_generator_config`), else the tokenizer."""
  if config_lib.is_generator_config(config):
    from softvq_jax import generator_task  # pylint: disable=import-outside-toplevel
    return generator_task.GeneratorTask(config)
  return TokenizerTask(config)


def train_and_evaluate(config, workdir: str, *, train_iter: Iterator | None = None,
                       config_path: str | None = None) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the final state.

  train_iter: a replacement for the configured input pipeline (tests); it must yield host batches
  with the task's `batch_keys` ({"image": [B_local, S, S, 3]} for a tokenizer; {"latents",
  "label"} or {"image", "label"} for a generator) and, for exact resume, be checkpointable as a
  Grain iterator is.
  config_path: the config file the run came from, only to print the follow-up commands.
  """
  # ---- Setup: everything the loop needs, built once. ----
  run_start = time.time()
  config_lib.validate(config)
  task = task_for(config)  # what differs between training a tokenizer and a generator
  workdir = ckpt_lib.absolute_workdir(workdir)  # a str: local (absolute) path or gs:// / s3:// URL
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  total_steps = int(config.num_train_steps)

  mesh = sharding.create_mesh(config.mesh_shape)
  trainer = task.build_trainer(mesh)
  frozen = trainer.frozen()  # missing pretrained files fail here, before anything is compiled
  if train_iter is None:
    train_iter = task.train_iterator()
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       keep_every_steps=config.keep_every_steps)
  state = restore_or_init(trainer, checkpointer, train_iter, config.seed)
  start_step = int(state.step)

  # Compiled ahead of the loop: the compile time and the per-device memory are known (and logged)
  # before the first step, and the first window's step time does not include the compilation.
  abstract_args = trainer.abstract_args(config)
  t0 = time.time()
  p_step = trainer.p_step.lower(*abstract_args).compile()
  _log_compiled(p_step, time.time() - t0)
  rep = sharding.replicated(mesh)
  metrics_shape = jax.eval_shape(trainer.step_fn, *abstract_args)[1]
  p_accumulate = jax.jit(task.accumulate_metrics, donate_argnums=(0,))
  new_window = jax.jit(functools.partial(steps.init_accumulator, metrics_shape), out_shardings=rep)

  # FLOPs of the whole global batch in one pass (a scan over micro-batches would count once).
  # Only where MFU can be reported: the extra lowering costs ~40 s on a loaded 2-core CPU (measured
  # with the demo), whose peak is unknown.
  peak = hardware.peak_flops_per_device(config)
  flops = train_step_flops(trainer.single_pass_step_fn, *abstract_args) if peak else None
  log = progress.MetricsLog(workdir, is_main=is_main, total_steps=total_steps,
                            batch_size=config.batch_size, start_step=start_step,
                            num_devices=jax.device_count(), flops_per_step=flops,
                            peak_flops_per_device=peak)
  write_grid = task.grid_writer(trainer, workdir, log.writer, is_main)
  evaluate_ema = task.in_loop_evaluator(trainer, workdir, log.writer, is_main)
  config_json = json.loads(config.to_json_best_effort())
  metadata = task.metadata(mesh)

  def check_finite(acc) -> None:
    bad = steps.nonfinite_step(jax.device_get(acc))
    if bad is not None:
      checkpointer.wait()
      last = checkpointer.latest_step()
      raise FloatingPointError(
          f"non-finite loss or gradient norm at step {bad}: stopping without saving. The last good "
          f"checkpoint is step {last} in {checkpointer.directory}. Restarting resumes from it; "
          "if it diverges again, lower config.optim.lr or check the data.")

  if is_main:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    logging.info("model %s: %.2fM parameters; mesh %s; global batch %d (%d per process); "
                 "steps %d -> %d", task.description, n_params / 1e6, dict(mesh.shape), config.batch_size,
                 config.batch_size // jax.process_count(), start_step, total_steps)
    logging.info("hyperparameters: %s", progress.write_hparams(workdir, config_json))
    if start_step == 0:
      log.writer.write_hparams({k: v for k, v in
                                traverse_util.flatten_dict(config_json, sep=".").items()
                                if isinstance(v, (int, float, str, bool))})
  if start_step == 0:  # "before": what the untrained network makes of the grid
    write_grid(0, state)

  # ---- The loop. ----
  preemption = _Preemption(checkpointer)
  acc = new_window()
  step = start_step
  try:
    while step < total_steps:
      host_batch = next(train_iter)
      batch = data.make_global_batch({k: host_batch[k] for k in task.batch_keys}, mesh)
      state, m = p_step(state, frozen, batch)
      acc = p_accumulate(acc, m)
      step += 1
      preempted = preemption.reached(step)
      if due(step, config.log_every_steps, total_steps) or preempted:
        check_finite(acc)
        summary = task.summarize_window(jax.device_get(acc))
        skipped = getattr(train_iter, "skipped", None)  # the pipeline itself logs the file names
        if skipped is not None:
          summary["data/skipped"] = float(skipped.count)
        log.write_window(step, summary)
        acc = new_window()
      if due(step, config.image_every_steps, total_steps):
        write_grid(step, state)
      if evaluate_ema is not None and due(step, config.eval.every_steps, total_steps):
        evaluate_ema(step, state)
      if due(step, config.checkpoint_every_steps, total_steps) or preempted:
        check_finite(acc)
        checkpointer.save(step, state, data_iterator=train_iter, config=config_json,
                          metadata=metadata, force=preempted or step == total_steps)
      if preempted:
        checkpointer.wait()
        logging.warning("preemption notice: saved step %d to %s; stopping. Run the same command "
                        "to resume.", step, checkpointer.directory)
        break
  finally:
    preemption.restore()
    checkpointer.close()
    log.flush()
  if step >= total_steps:
    message = task.finish(state, trainer, workdir, step=step,
                          minutes=(time.time() - run_start) / 60, config_path=config_path,
                          eval_result=evaluate_ema.last if evaluate_ema is not None else {})
    if is_main:
      logging.info("%s", message)
  return state


def _grid_writer(config, trainer: Trainer, workdir: str, writer, is_main: bool):
  """`write_grid(step, state)`: input | EMA-reconstruction grid of the first eval images (the
  same on every process, one replicated global array: multi-host safe), as PNG and TensorBoard."""
  rep = sharding.replicated(trainer.mesh)
  grid_inputs = jax.make_array_from_process_local_data(
      rep, np.asarray(pixels.to_model_range(_grid_images(config, config.num_grid_images))))
  graphdef = trainer.graphdef
  ema_reconstruct = jax.jit(
      lambda p, x: jnp.clip(nnx.merge(graphdef, p)(x).reconstruction, -1.0, 1.0),
      out_shardings=rep)

  def write_grid(step: int, state: TrainState):
    recon = np.asarray(ema_reconstruct(state.ema_params, grid_inputs))
    if is_main:
      grid = visualize.image_grid([pixels.to_uint8(np.asarray(grid_inputs)),
                                   pixels.to_uint8(recon)])
      visualize.save_png(os.path.join(workdir, "images", f"recon_{step:08d}.png"), grid)
      writer.write_images(step, {"reconstruction/input_vs_ema": grid[None]})
  return write_grid


def _in_loop_evaluator(config, trainer: Trainer, workdir: str, writer, is_main: bool):
  """`evaluate_ema(step, state)` with the latest result in `.last`, or None when
  `config.eval.every_steps` is 0. Built up front: missing Inception/LPIPS files fail at start-up."""
  if not config.eval.every_steps:
    return None
  from softvq_jax import evaluate  # pylint: disable=import-outside-toplevel
  evaluator = evaluate.Evaluator(config, trainer.mesh, trainer.graphdef, workdir)

  def evaluate_ema(step: int, state: TrainState):
    result = evaluator(state.ema_params, num_images=config.eval.in_loop_num_images)
    evaluate_ema.last = result
    logging.info("evaluation at step %d (EMA weights, %d images): %s", step,
                 config.eval.in_loop_num_images,
                 ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.items())))
    if is_main:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
      writer.write_images(step, {"eval/input_vs_ema": evaluator.last_grid[None]})
      with epath.Path(workdir, "eval_metrics.jsonl").open("a") as f:
        f.write(json.dumps(dict(step=step, **result)) + "\n")

  evaluate_ema.last = {}
  return evaluate_ema
