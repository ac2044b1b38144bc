"""Training a generator (SiT / DiT over a tokenizer's tokens) in the tokenizer's training loop.

`python -m softvq_jax.main --mode=train --config=<a generator config>` runs
`train.train_and_evaluate`, the one training loop (mesh, resume with the data position, jitted
step, clu logging, NaN stop, Orbax checkpoints, SIGTERM / preemption, multi-host). What differs
from training a tokenizer lives here, in `GeneratorTask` (the members of train.TokenizerTask):

* the Trainer (`build_generator_trainer`): train_state.GeneratorTrainState (params, opt_state,
  ema_params, step, rng), its shardings from the network's logical axes (FSDP / tensor rules as
  the tokenizer's), the step `steps.make_generator_train_step` over
  `generator_objective.make_loss_fn`, and the frozen argument {"fixed": the network's sin-cos
  pos_embed, "tokenizer": the tokenizer's parameters (data path b) or None} — loaded once, not
  donated, not checkpointed;
* the batches: data path (a) `config.generator_data.source="tokens"`: `--mode=extract`'s chunks
  through token_data.TokenSource / build_token_train_pipeline -> {"latents", "label"}; data
  path (b) `"images"`: the image pipeline of `config.data` (`data.train_transform=
  "center_crop_flip"`, the ADM centre crop + flip of spec.md §8) -> {"image", "label"}, encoded
  with normalize=True inside the jitted step by `api.tokenizer_functions(tok).encode`;
* the latent statistics: the tokenizer's vq_mean / vq_std (its checkpoint's metadata after
  `--mode=stats`, or an official config.json) normalise both paths; the defaults (0, 1) are
  refused unless `generator_data.allow_unnormalised_latents` (token_data.check_latent_statistics);
* the image grid: class-conditional samples of the EMA generator (`config.sample`'s sampler, its
  seed and labels), decoded by the tokenizer: `<workdir>/images/samples_<step>.png`;
* the in-loop evaluation (`eval.every_steps`): gen_eval.GenerationEvaluator's gFID / IS /
  precision-recall of `gen_eval.in_loop_num_images` samples;
* the end: the EMA generator exported in the official format to `<workdir>/generator`
  (config.json + model.safetensors: what `load_generator` and `--mode=sample --checkpoint=` read).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from softvq_jax import (api, config_lib, data, generate, generator_objective, optim, paths,
                        sharding, steps, token_data, train_state, visualize)
from softvq_jax.convert import generator_official
from softvq_jax.convert.safetensors_io import CheckpointError
from softvq_jax.models import sit as sit_lib

EXPORT_DIR = "generator"   # <workdir>/generator: the EMA generator in the official format


class GeneratorTrainError(generate.SampleError):
  """A user error of generator training (a bad field, a missing tokenizer or extraction, latent
  statistics never measured): `main` prints it as one line and exits with status 2."""


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      shardings)


@dataclasses.dataclass
class GeneratorTrainer:
  """The generator's counterpart of train.Trainer (the members the loop uses).

  `p_step(state, frozen, batch) -> (state, metrics)`: jitted with explicit shardings, the state
  donated; frozen = `self.frozen()` = {"fixed": pos_embed, "tokenizer": params or None}.
  """
  mesh: Mesh
  graphdef: Any               # the network's NNX graph (params + fixed merge into a SiT)
  objective: generator_objective.GeneratorObjective
  abstract_state: train_state.GeneratorTrainState
  state_sharding: train_state.GeneratorTrainState
  abstract_frozen: Any
  frozen_sharding: Any
  batch_sharding: NamedSharding
  batch_structs: dict         # key -> (per-example shape, dtype) of a global batch
  step_fn: Callable
  single_pass_step_fn: Callable
  p_step: Callable
  init_fn: Callable
  load_frozen_fn: Callable

  def frozen(self):
    if not hasattr(self, "_frozen"):
      self._frozen = self.load_frozen_fn()
    return self._frozen

  def init_state(self):
    return self.init_fn()

  def abstract_batch(self, config) -> dict[str, jax.ShapeDtypeStruct]:
    b = int(config.batch_size)
    return {k: jax.ShapeDtypeStruct((b,) + tuple(shape), dtype, sharding=self.batch_sharding)
            for k, (shape, dtype) in self.batch_structs.items()}

  def abstract_args(self, config) -> tuple:
    return self.abstract_state, self.abstract_frozen, self.abstract_batch(config)


def objective_of(config, gen_cfg: sit_lib.SiTConfig) -> generator_objective.GeneratorObjective:
  o = config.generator_objective
  return generator_objective.GeneratorObjective.for_network(
      gen_cfg, path=str(o.path), time_sampling=str(o.time_sampling),
      noise_schedule=str(o.noise_schedule), diffusion_steps=int(o.diffusion_steps),
      num_time_buckets=int(o.num_time_buckets))


def build_generator_trainer(config, mesh: Mesh, gen_cfg: sit_lib.SiTConfig,
                            tokenizer: api.Tokenizer | None = None) -> GeneratorTrainer:
  """The generator's train step and state layout on `mesh` (nothing is computed yet).

  tokenizer: for data path (b) (images encoded inside the step), else None (data path a: the
  batches hold normalised latents).
  """
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tx, schedule = optim.build_optimizer(config.optim, batch_size=config.batch_size,
                                       total_steps=int(config.num_train_steps))
  objective = objective_of(config, gen_cfg)
  graphdef, abstract, abstract_fixed = train_state.abstract_generator_state(gen_cfg, tx,
                                                                            config.seed)
  state_sh = train_state.generator_state_shardings(abstract, tx, mesh, rules)
  fixed_sh = sharding.state_shardings(abstract_fixed, mesh, rules)  # like the parameters
  batch_sh = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  if tokenizer is not None:
    fns = api.tokenizer_functions(tokenizer)
    abstract_tok = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fns.params)
    tok_sh = sharding.frozen_shardings(fns.params, mesh, rules, config.frozen_sharding)
    encode = fns.encode
    s = int(tokenizer.config.image_size)
    image_dtype = jnp.uint8 if config.data.output_dtype == "uint8" else jnp.float32
    structs = {"image": ((s, s, 3), image_dtype), "label": ((), jnp.int32)}
  else:
    abstract_tok = tok_sh = encode = None
    structs = {"latents": (tuple(gen_cfg.input_shape), jnp.float32), "label": ((), jnp.int32)}
  frozen_sh = {"fixed": fixed_sh, "tokenizer": tok_sh}
  loss_fn = generator_objective.make_loss_fn(objective, graphdef, encode=encode)
  make_step = functools.partial(steps.make_generator_train_step, loss_fn, tx, schedule,
                                ema_decay=config.optim.ema_decay, batch_sharding=batch_sh)
  step_fn = make_step(grad_accum_steps=config.grad_accum_steps)
  p_step = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, {k: batch_sh for k in structs}),
                   out_shardings=(state_sh, rep), donate_argnums=(0,), keep_unused=True)
  init = jax.jit(functools.partial(train_state.init_generator_state, gen_cfg, tx, config.seed),
                 out_shardings=state_sh)

  def load_frozen():
    # The fixed table as the network builds it, computed in one jitted program (XLA drops the
    # unused parameter initialisers): no eager initialisation of a 675M-parameter network.
    fixed = jax.jit(lambda: generator_objective.split_generator(
        sit_lib.build_sit(gen_cfg, config.seed))[2], out_shardings=fixed_sh)()
    # host copies first: every process holds the same weights and puts its own shards
    tok = (jax.device_put(jax.tree.map(np.asarray, api.tokenizer_functions(tokenizer).params),
                          tok_sh) if tokenizer is not None else None)
    return {"fixed": fixed, "tokenizer": tok}

  abstract_frozen = {"fixed": _with_shardings(abstract_fixed, fixed_sh),
                     "tokenizer": (_with_shardings(abstract_tok, tok_sh)
                                   if abstract_tok is not None else None)}
  return GeneratorTrainer(
      mesh=mesh, graphdef=graphdef, objective=objective,
      abstract_state=_with_shardings(abstract, state_sh), state_sharding=state_sh,
      abstract_frozen=abstract_frozen, frozen_sharding=frozen_sh, batch_sharding=batch_sh,
      batch_structs=structs, step_fn=step_fn,
      single_pass_step_fn=(step_fn if config.grad_accum_steps == 1
                           else make_step(grad_accum_steps=1)),
      p_step=p_step, init_fn=init, load_frozen_fn=load_frozen)


def _local(tree):
  """A replicated global tree -> this process's copy (one device's data): usable by the
  process-local sampler also when the global arrays span several processes."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)


class GeneratorTask:
  """What is particular to training a generator; see the module docstring. Same members as
  train.TokenizerTask."""
  accumulate_metrics = staticmethod(steps.accumulate_generator_metrics)
  summarize_window = staticmethod(steps.summarize_generator_window)

  def __init__(self, config):
    try:
      config_lib.validate_generator_training(config)
    except ValueError as e:
      raise GeneratorTrainError(str(e)) from None  # a user error: one line, exit status 2
    self.config = config
    d = config.generator_data
    self.tokenizer_source = str(d.tokenizer)
    try:
      self.tokenizer = api.load_tokenizer(self.tokenizer_source,
                                          compute_dtype=config.model.compute_dtype)
    except CheckpointError as e:
      raise GeneratorTrainError(f"config.generator_data.tokenizer: {e}") from None
    tc = self.tokenizer.config
    try:
      token_data.check_latent_statistics(
          tc.vq_mean, tc.vq_std, allow_unnormalised_latents=bool(d.allow_unnormalised_latents),
          source=f"the tokenizer {self.tokenizer_source}")
    except ValueError as e:  # UnnormalisedLatentsError included
      raise GeneratorTrainError(str(e)) from None
    self.gen_cfg = generate.generator_network_config(config, tc)
    if (self.gen_cfg.input_size, self.gen_cfg.in_channels) != (tc.num_latent_tokens,
                                                               tc.codebook_embed_dim):
      raise GeneratorTrainError(
          f"config.generator: input_size={self.gen_cfg.input_size}, in_channels="
          f"{self.gen_cfg.in_channels}, but the tokenizer's tokens are {tc.num_latent_tokens} x "
          f"{tc.codebook_embed_dim}; leave them 0 (= the tokenizer's)")
    self.online = d.source == "images"
    self.source = None
    if self.online:
      # the images are cut at the tokenizer's size (config.image_size describes the config's own
      # tokenizer sections, used only when --mode=sample builds one randomly)
      self.image_size = int(tc.image_size)
      if config.data.get("train_transform", "random_crop") != "center_crop_flip":
        logging.warning("data path 'images' with config.data.train_transform=%r: the reference "
                        "trains generators on centre crops + flips ('center_crop_flip')",
                        config.data.train_transform)
      self.batch_keys = ("image", "label")
    else:
      # the chunks hold raw z_q: normalised here with the tokenizer's statistics (--mode=stats
      # may have run after the extraction; its manifest then records the old ones)
      local = paths.is_url(self.tokenizer_source) or paths.resolve(self.tokenizer_source).is_dir()
      if not d.tokens_dir and not local:
        raise GeneratorTrainError(
            f"config.generator_data.tokens_dir is empty and the tokenizer "
            f"{self.tokenizer_source} is not a directory (a hub id) to find <tokenizer>/tokens "
            "in: give the extraction's out dir (--mode=extract, config.latents.out_dir)")
      self.tokens_dir = str(d.tokens_dir) or str(paths.resolve(self.tokenizer_source) / "tokens")
      try:
        self.source = token_data.TokenSource(
            self.tokens_dir, vq_mean=tc.vq_mean, vq_std=tc.vq_std, seed=int(config.seed),
            flip=None if d.flip else False,
            allow_unnormalised_latents=bool(d.allow_unnormalised_latents))
      except (FileNotFoundError, ValueError) as e:
        raise GeneratorTrainError(f"config.generator_data.tokens_dir: {e}") from None
      if tuple(self.source.latent_shape) != tuple(self.gen_cfg.input_shape):
        raise GeneratorTrainError(
            f"config.generator_data.tokens_dir={self.tokens_dir}: the extracted tokens are "
            f"{self.source.latent_shape}, the generator models {self.gen_cfg.input_shape} "
            f"(the tokenizer {self.tokenizer_source}): extract with that tokenizer")
      self.batch_keys = ("latents", "label")
    self.description = (f"{self.gen_cfg.kind.upper()} width {self.gen_cfg.hidden_size} depth "
                        f"{self.gen_cfg.depth} heads {self.gen_cfg.num_heads} on "
                        f"{self.gen_cfg.input_size} x {self.gen_cfg.in_channels} tokens of "
                        f"{self.tokenizer_source} (data: {d.source})")

  def build_trainer(self, mesh: Mesh) -> GeneratorTrainer:
    self._trainer = build_generator_trainer(self.config, mesh, self.gen_cfg,
                                            self.tokenizer if self.online else None)
    return self._trainer

  def train_iterator(self):
    c = self.config
    if self.online:
      return data.build_train_pipeline(
          c.data, image_size=self.image_size, global_batch_size=c.batch_size, seed=c.seed,
          process_index=jax.process_index(), process_count=jax.process_count())
    return token_data.build_token_train_pipeline(
        self.source, global_batch_size=c.batch_size, seed=c.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=c.data.num_threads)

  # ---- the EMA generator as a process-local network (grids, in-loop evaluation, export) ----

  def _ema_network_state(self, trainer: GeneratorTrainer, state):
    """nnx state (params + fixed) of the EMA network, on this process's first device."""
    if not hasattr(self, "_gather"):
      rep = sharding.replicated(trainer.mesh)
      self._gather = jax.jit(lambda t: t, out_shardings=rep)
      self._fixed_local = _local(self._gather(trainer.frozen()["fixed"]))
    ema = _local(self._gather(state.ema_params))
    return nnx.split(nnx.merge(trainer.graphdef, ema, self._fixed_local))[1]

  def _ema_network(self, trainer, state) -> sit_lib.SiT:
    return nnx.merge(trainer.graphdef, self._ema_network_state(trainer, state))

  def grid_writer(self, trainer, workdir, writer, is_main):
    """`write_grid(step, state)`: `num_grid_images` class-conditional samples of the EMA
    generator (config.sample: sampler, seed, labels), 8 per row, PNG + TensorBoard."""
    c = self.config
    options = generate.sampler_options(c.sample, self.gen_cfg.kind)
    sampler = None
    n = int(c.num_grid_images)
    idx = np.arange(n)
    labels = generate.class_labels(idx, self.gen_cfg.num_classes, c.sample.labels)

    def write_grid(step: int, state):
      nonlocal sampler
      if n <= 0:
        return
      if sampler is None:
        sampler = generate.ImageSampler(self.gen_cfg, self._ema_network(trainer, state),
                                        self.tokenizer, options)
      else:
        sampler.set_generator_state(self._ema_network_state(trainer, state))
      batch = -(-n // sampler.num_devices) * sampler.num_devices
      images = generate.draw(sampler, idx, labels, int(c.sample.seed), batch)
      if is_main:
        cols = generate.GRID_COLUMNS
        rows = [images[r:r + cols] for r in range(0, n, cols)]
        if len(rows) > 1 and len(rows[-1]) < cols:
          pad = np.full((cols - len(rows[-1]),) + rows[-1].shape[1:], 255, np.uint8)
          rows[-1] = np.concatenate([rows[-1], pad])
        grid = visualize.image_grid(rows)
        visualize.save_png(os.path.join(workdir, "images", f"samples_{step:08d}.png"), grid)
        writer.write_images(step, {"samples/ema": grid[None]})
    return write_grid

  def in_loop_evaluator(self, trainer, workdir, writer, is_main):
    """`evaluate_ema(step, state)` (gFID / IS / precision-recall of the EMA generator's
    samples, softvq_jax/gen_eval.py) with the latest result in `.last`, or None when
    `config.eval.every_steps` is 0. Built up front (the Inception and the reference statistics
    load at start-up)."""
    c = self.config
    if not c.eval.every_steps:
      return None
    from softvq_jax import gen_eval  # pylint: disable=import-outside-toplevel
    evaluator = gen_eval.GenerationEvaluator(  # its weights are replaced at every call
        c, self.tokenizer, self.gen_cfg, generate.random_generator(self.gen_cfg, int(c.seed)),
        workdir)

    def evaluate_ema(step: int, state):
      result = evaluator(self._ema_network_state(trainer, state))
      evaluate_ema.last = result
      logging.info("generation evaluation at step %d (EMA weights, %d samples): %s", step,
                   evaluator.num_images,
                   ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.items())
                             if isinstance(v, (int, float))))
      if is_main:
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()
                                    if isinstance(v, (int, float))})
        with epath.Path(workdir, "eval_metrics.jsonl").open("a") as f:
          f.write(json.dumps(dict(step=step, **result), default=float) + "\n")

    evaluate_ema.last = {}
    return evaluate_ema

  def metadata(self, mesh) -> dict[str, Any]:
    tc = self.tokenizer.config
    return {
        "task": "generator",
        "generator": dataclasses.asdict(self.gen_cfg),
        "objective": dataclasses.asdict(objective_of(self.config, self.gen_cfg)),
        "tokenizer": {"source": self.tokenizer_source, "vq_mean": float(tc.vq_mean),
                      "vq_std": float(tc.vq_std), "image_size": int(tc.image_size)},
        "data": str(self.config.generator_data.source),
        "mesh_shape": [int(s) for s in mesh.devices.shape],
        "process_count": jax.process_count(),
        "global_batch_size": int(self.config.batch_size),
    }

  def export(self, trainer, state, directory) -> None:
    """The EMA generator in the official hub format (process 0 writes)."""
    model = self._ema_network(trainer, state)
    if jax.process_index() == 0:
      generator_official.export_generator(model, directory)

  def finish(self, state, trainer, workdir: str, *, step: int, minutes: float,
             config_path: str | None, eval_result) -> str:
    """Exports the EMA generator to <workdir>/generator; returns the closing message."""
    out = paths.resolve(workdir) / EXPORT_DIR
    self.export(trainer, state, out)
    config_arg = f"--config={config_path}" if config_path else "--config=<this run's config>"
    scores = ", ".join(f"{k} {v:.4g}" for k, v in sorted(eval_result.items())
                       if isinstance(v, (int, float)) and not k.endswith("seconds"))
    return "\n".join([
        f"finished at step {step} in {minutes:.1f} min." + (
            f"  In-loop evaluation: {scores}" if scores else ""),
        f"  outputs in {workdir}:",
        "    checkpoints/                 Orbax checkpoints (rerun the same command to resume)",
        f"    {EXPORT_DIR}/                   the EMA generator (official format: "
        "config.json + model.safetensors)",
        "    images/samples_*.png         samples of the EMA generator (8 per row)",
        "    metrics.jsonl, config.json   per-window metrics (loss per time bucket); the config",
        f"  TensorBoard: tensorboard --logdir={workdir}",
        f"  sample:      python -m softvq_jax.main --mode=sample {config_arg} "
        f"--workdir={workdir}/sample --checkpoint={out} --tokenizer={self.tokenizer_source}",
        f"  load:        softvq_jax.load_generator({str(out)!r})"])
