"""The training loop: mesh, data, state, resume, jitted step, logging, images, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m softvq_jax.main --mode=train` runs, on one
CPU, 8 fake CPU devices, a GPU node, a GPU cluster or a TPU pod alike:

1. mesh from `config.mesh_shape`; the TrainState's shardings from the parameters' logical axes;
2. resume by itself: the newest complete checkpoint in `<workdir>/checkpoints` (state onto this
   run's mesh, whatever mesh wrote it, and the data iterator's position), else a fresh state
   created directly sharded by a jitted init;
3. per step: next host batch -> global array over (data, fsdp) -> `train_step` (jitted with
   explicit in/out shardings, the state donated) -> metrics folded into a device-side window;
4. every `log_every_steps`: window means to TensorBoard + `<workdir>/metrics.jsonl` (process 0),
   images/s, step time, MFU, and one progress line on stdout (step/total, images/s, ETA, the main
   losses; softvq_jax/progress.py); a NaN/Inf loss stops the run here naming the step, before
   anything is saved, so the last checkpoint stays the last good one;
5. at step 0 (a fresh run), every `image_every_steps` and at the end: input | EMA-reconstruction
   grids (PNG in `<workdir>/images`, and TensorBoard); every `checkpoint_every_steps`, at the end
   and on SIGTERM / a preemption notice: an async Orbax checkpoint.

The whole config goes to `<workdir>/config.json` (and TensorBoard's hparams); the last log lines
say where the outputs are and how to evaluate and load the tokenizer.
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
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from softvq_jax import checkpoint as ckpt_lib
from softvq_jax import config_lib, data, optim, progress, sharding, steps, visualize
from softvq_jax import objective as objective_lib
from softvq_jax.models.tokenizer import TokenizerConfig
from softvq_jax.train_state import (TrainState, abstract_train_state, init_train_state,
                                    train_state_shardings)

# Dense bf16 peak FLOP/s per chip by `device_kind` prefix, for MFU. (A GPU/TPU running float32
# matmuls has a lower peak; MFU is always stated against these bf16 numbers.)
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12), ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops_per_device(config) -> float | None:
  if config.peak_flops_per_device > 0:
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS:
    if kind.startswith(prefix):
      return flops
  return None


def train_step_flops(step_fn, abstract_state, abstract_batch) -> float | None:
  """Model FLOPs of one step from XLA's cost analysis of the (unpartitioned) lowered step."""
  try:
    cost = jax.jit(step_fn).lower(abstract_state, abstract_batch).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops or None
  except Exception as e:  # pylint: disable=broad-except  # a metric must not stop training
    logging.warning("could not count the train step's FLOPs (%s); no MFU will be reported", e)
    return None


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

  `p_step(state, {"image": global [B, S, S, 3]}) -> (state, metrics)` is the jitted pure step
  with explicit in/out shardings and the state donated.
  """
  mesh: Mesh
  graphdef: Any
  abstract_state: TrainState   # ShapeDtypeStructs carrying this mesh's shardings
  state_sharding: TrainState
  batch_sharding: NamedSharding
  step_fn: Callable            # the pure step (not jitted)
  p_step: Callable
  init_fn: Callable[[], TrainState]  # a fresh state without frozen networks, directly sharded
  objective: Any = None        # objective.Objective (None: pixel + entropy only)
  load_frozen_fn: Callable[[], Any] = lambda: None

  def frozen(self):
    """The frozen networks (LPIPS, DINO backbone, REPA teacher) on the mesh; loaded once.

    `p_step` donates its whole state, these buffers included (they come back as the new state's
    `frozen`): attach them to one state, then keep using the states the step returns.
    """
    if not hasattr(self, "_frozen"):
      self._frozen = self.load_frozen_fn()
    return self._frozen

  def with_frozen(self, state: TrainState) -> TrainState:
    """A restored (or fresh) state completed with the frozen networks the step needs."""
    return state.replace(frozen=self.frozen())

  def init_state(self) -> TrainState:
    return self.with_frozen(self.init_fn())

  def abstract_batch(self, config) -> dict[str, jax.ShapeDtypeStruct]:
    s = config.image_size
    dtype = jnp.uint8 if config.data.output_dtype == "uint8" else jnp.float32
    return {"image": jax.ShapeDtypeStruct((config.batch_size, s, s, 3), dtype,
                                          sharding=self.batch_sharding)}


def build_trainer(config, mesh: Mesh, *, grad_accum_steps: int | None = None) -> Trainer:
  """The train step and state layout of `config` on `mesh` (nothing is computed yet)."""
  rules = tuple(tuple(r) for r in config.sharding_rules)
  cfg = TokenizerConfig.from_config(config)
  tx, schedule = optim.build_optimizer(config.optim, batch_size=config.batch_size,
                                       total_steps=int(config.num_train_steps))
  obj = objective_lib.build_objective(config)
  obj = obj if obj.any_network else None
  # The discriminator: the generator's optimizer settings and schedule (spec 5), its own state.
  disc_tx = (optim.build_optimizer(config.optim, batch_size=config.batch_size,
                                   total_steps=int(config.num_train_steps))[0]
             if obj is not None and obj.gan else None)
  graphdef, abstract = abstract_train_state(cfg, tx, config.seed, objective=obj, disc_tx=disc_tx)
  if obj is not None:
    abstract = abstract.replace(frozen=objective_lib.abstract_frozen(obj))
  state_sh = train_state_shardings(abstract, tx, mesh, rules, disc_tx=disc_tx,
                                   frozen_sharding=config.frozen_sharding)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = steps.make_train_step(
      graphdef, tx, schedule, loss_config=config.loss, ema_decay=config.optim.ema_decay,
      grad_accum_steps=config.grad_accum_steps if grad_accum_steps is None else grad_accum_steps,
      batch_sharding=batch_sh, objective=obj, disc_tx=disc_tx)
  p_step = jax.jit(step_fn, in_shardings=(state_sh, {"image": batch_sh}),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  init = jax.jit(functools.partial(init_train_state, cfg, tx, config.seed, objective=obj,
                                   disc_tx=disc_tx),
                 out_shardings=state_sh.replace(frozen=None))

  def load_frozen():
    if obj is None:
      return None
    frozen, random = objective_lib.load_frozen(obj, config)
    logging.info("frozen networks of the objective: %s",
                 {k: "random init" if v else "pretrained" for k, v in random.items()})
    return jax.device_put(frozen, state_sh.frozen)

  return Trainer(mesh=mesh, graphdef=graphdef, abstract_state=abstract, state_sharding=state_sh,
                 batch_sharding=batch_sh, step_fn=step_fn, p_step=p_step, init_fn=init,
                 objective=obj, load_frozen_fn=load_frozen)


def train_and_evaluate(config, workdir: str, *, train_iter: Iterator | None = None,
                       config_path: str | None = None) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the final state.

  train_iter: a replacement for the configured input pipeline (tests); it must yield host batches
  {"image": [B_local, S, S, 3]} and, for exact resume, be a Grain iterator.
  config_path: the config file the run came from, only to print the follow-up commands.
  """
  run_start = time.time()
  config_lib.validate(config)
  workdir = ckpt_lib.absolute_workdir(workdir)  # a str: local (absolute) path or gs:// / s3:// URL
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = progress.metric_writer(workdir, is_main=is_main)

  mesh = sharding.create_mesh(config.mesh_shape)
  trainer = build_trainer(config, mesh)
  cfg = TokenizerConfig.from_config(config)
  total_steps = int(config.num_train_steps)
  graphdef, abstract = trainer.graphdef, trainer.abstract_state
  rep = sharding.replicated(mesh)

  if train_iter is None:
    train_iter = data.build_train_pipeline(
        config.data, image_size=config.image_size, global_batch_size=config.batch_size,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       keep_every_steps=config.keep_every_steps)
  latest = checkpointer.latest_step()
  if latest is not None:
    ckpt_lib.log_restore(latest, checkpointer.directory)
    state = trainer.with_frozen(checkpointer.restore(latest, abstract, data_iterator=train_iter))
  else:
    logging.info("no checkpoint in %s: starting from scratch (seed %d)", checkpointer.directory,
                 config.seed)
    state = trainer.init_state()
  start_step = int(state.step)

  abstract_batch = trainer.abstract_batch(config)
  # Compiled ahead of the loop: the compile time and the per-device memory are known (and logged)
  # before the first step, and the first window's step time does not include the compilation.
  t0 = time.time()
  p_step = trainer.p_step.lower(abstract, abstract_batch).compile()
  _log_compiled(p_step, time.time() - t0)
  metrics_shape = jax.eval_shape(trainer.step_fn, abstract, abstract_batch)[1]
  p_accumulate = jax.jit(steps.accumulate_metrics, donate_argnums=(0,))
  new_window = jax.jit(functools.partial(steps.init_accumulator, metrics_shape), out_shardings=rep)

  # FLOPs of the whole global batch in one pass (a scan over micro-batches would count once).
  # Only where MFU can be reported: the extra lowering costs ~40 s on a loaded 2-core CPU (measured
  # with the demo), whose peak is unknown.
  peak = peak_flops_per_device(config)
  flops = (train_step_flops(build_trainer(config, mesh, grad_accum_steps=1).step_fn, abstract,
                            abstract_batch) if peak else None)

  # The same images on every process, as one replicated global array (multi-host safe).
  grid_inputs = jax.make_array_from_process_local_data(
      rep, np.asarray(data.to_model_range(_grid_images(config, config.num_grid_images))))
  ema_reconstruct = jax.jit(
      lambda p, x: jnp.clip(nnx.merge(graphdef, p)(x).reconstruction, -1.0, 1.0),
      out_shardings=rep)

  def write_grid(step: int, state: TrainState):
    recon = np.asarray(ema_reconstruct(state.ema_params, grid_inputs))
    if is_main:
      grid = visualize.image_grid([visualize.to_uint8(np.asarray(grid_inputs)),
                                   visualize.to_uint8(recon)])
      visualize.save_png(os.path.join(workdir, "images", f"recon_{step:08d}.png"), grid)
      writer.write_images(step, {"reconstruction/input_vs_ema": grid[None]})

  evaluator = None
  if config.eval.every_steps:  # built up front: missing Inception/LPIPS files fail at start-up
    from softvq_jax import evaluate  # pylint: disable=import-outside-toplevel
    evaluator = evaluate.Evaluator(config, mesh, graphdef, workdir)

  last_eval = {}

  def run_eval(step: int, state: TrainState):
    result = evaluator(state.ema_params, num_images=config.eval.in_loop_num_images)
    last_eval.clear()
    last_eval.update(result)
    logging.info("evaluation at step %d (EMA weights, %d images): %s", step,
                 config.eval.in_loop_num_images,
                 ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.items())))
    if is_main:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
      writer.write_images(step, {"eval/input_vs_ema": evaluator.last_grid[None]})
      with epath.Path(workdir, "eval_metrics.jsonl").open("a") as f:
        f.write(json.dumps(dict(step=step, **result)) + "\n")

  def check_finite(acc) -> None:
    bad = steps.nonfinite_step(jax.device_get(acc))
    if bad is not None:
      checkpointer.wait()
      last = checkpointer.latest_step()
      raise FloatingPointError(
          f"non-finite loss or gradient norm at step {bad}: stopping without saving. The last good "
          f"checkpoint is step {last} in {checkpointer.directory}. Restarting resumes from it; "
          "if it diverges again, lower config.optim.lr or check the data.")

  config_json = json.loads(config.to_json_best_effort())
  metadata = _metadata(config, cfg, mesh)

  def save(step: int, acc, *, force: bool = False):
    check_finite(acc)
    checkpointer.save(step, state, data_iterator=train_iter, config=config_json,
                      metadata=metadata, force=force)

  if is_main:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    logging.info("model %s: %.2fM parameters; mesh %s; global batch %d (%d per process); "
                 "steps %d -> %d", cfg, n_params / 1e6, dict(mesh.shape), config.batch_size,
                 config.batch_size // jax.process_count(), start_step, total_steps)
    logging.info("hyperparameters: %s", progress.write_hparams(workdir, config_json))
    if start_step == 0:
      writer.write_hparams({k: v for k, v in _flatten(config_json).items()
                            if isinstance(v, (int, float, str, bool))})
  progress_line = progress.ProgressLine(total_steps, config.batch_size)
  if start_step == 0:  # "before": what the untrained tokenizer makes of the grid images
    write_grid(0, state)
  preemption = _Preemption(checkpointer)
  acc = new_window()
  window_start, window_step = time.time(), start_step
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  step = start_step
  try:
    while step < total_steps:
      local = next(train_iter)
      batch = data.make_global_batch({"image": local["image"]}, mesh)
      state, m = p_step(state, batch)
      acc = p_accumulate(acc, m)
      step += 1
      preempted = preemption.reached(step)
      if step % config.log_every_steps == 0 or step == total_steps or preempted:
        check_finite(acc)
        summary = steps.summarize_window(jax.device_get(acc))
        elapsed = time.time() - window_start
        n = step - window_step
        summary["perf/step_time_s"] = elapsed / n
        summary["perf/images_per_s"] = config.batch_size * n / elapsed
        if flops and peak:
          summary["perf/mfu"] = flops * n / elapsed / (peak * jax.device_count())
        skipped = getattr(train_iter, "skipped", None)  # the pipeline itself logs the file names
        if skipped is not None:
          summary["data/skipped"] = float(skipped.count)
        if is_main:
          writer.write_scalars(step, summary)
          with epath.Path(metrics_path).open("a") as f:
            f.write(json.dumps(dict(step=step, **summary)) + "\n")
          logging.info("%s", progress_line(step, summary, n, elapsed))
        acc = new_window()
        window_start, window_step = time.time(), step
      if step % config.image_every_steps == 0 or step == total_steps:
        write_grid(step, state)
      if evaluator is not None and (step % config.eval.every_steps == 0 or step == total_steps):
        run_eval(step, state)
      if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
        save(step, acc, force=preempted or step == total_steps)
      if preempted:
        checkpointer.wait()
        logging.warning("preemption notice: saved step %d to %s; stopping. Run the same command "
                        "to resume.", step, checkpointer.directory)
        break
  finally:
    preemption.restore()
    checkpointer.close()
    writer.flush()
  if is_main and step >= total_steps:
    logging.info("%s", progress.outputs_message(
        workdir, step=step, minutes=(time.time() - run_start) / 60, config_path=config_path,
        eval_result=last_eval))
  return state


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
