"""The training state: one pytree that is jitted, sharded, donated and checkpointed as a whole.

The TrainState is exactly what is checkpointed (big_vision's {"params", "opt"}): nothing in it is
reloaded from elsewhere. The objective's frozen pretrained networks (LPIPS, the DINO backbone, the
REPA teacher) are not in it: they are loaded from their own files at every start and passed to
the step as a separate, non-donated argument (softvq_jax/objective.py, softvq_jax/steps.py).

`TrainState` holds float32 generator parameters, their EMA, the optimizer state, the step and a raw
PRNG key (uint32[2], so Orbax stores it as a plain array). The discriminator's parameters, its
optimizer state and the LeCam statistics are optional parts (None until the GAN objective uses
them; None is an empty pytree, so jit, sharding and Orbax simply see nothing there).

A generator run (SiT / DiT, softvq_jax/generator_task.py) checkpoints a `GeneratorTrainState`:
params, EMA, optimizer state, step, key — no discriminator, no projector; its frozen arguments
(the network's fixed sin-cos pos_embed, the tokenizer of online encoding) are not in it.

The NNX graph definition is not part of the state: `nnx.split` once, keep the `graphdef` beside
the state, `nnx.merge(graphdef, state.params)` inside the jitted step (softvq_jax/steps.py; no
`nnx.jit` in the loop: one `jax.jit` with explicit shardings, softvq_jax/train.py).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from softvq_jax import generator_objective
from softvq_jax import objective as objective_lib
from softvq_jax import sharding
from softvq_jax.models import sit as sit_lib
from softvq_jax.models.tokenizer import (SoftVQTokenizer, TokenizerConfig, abstract_tokenizer,
                                         split_model)


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # [] int32: completed optimizer steps
  params: Any                # nnx.State of the tokenizer's nnx.Param variables, float32
  ema_params: Any            # same structure: EMA of params (what evaluation and release use)
  opt_state: Any             # optax state of the generator's (params, proj_params)
  rng: jax.Array             # [2] uint32 raw key; per-step keys are fold_in(rng, step)
  proj_params: Any = None    # REPA projector (trained with the generator), optional
  disc_params: Any = None    # discriminator heads (GAN objective), optional
  disc_state: Any = None     # its BatchNorm running statistics and spectral-norm u/v vectors
  disc_opt_state: Any = None
  lecam: Any = None          # LeCam EMA statistics {"real", "fake"}, optional


def init_train_state(cfg: TokenizerConfig, tx: optax.GradientTransformation, seed: int,
                     rng: jax.Array | None = None, objective=None,
                     disc_tx: optax.GradientTransformation | None = None) -> TrainState:
  """A fresh state (jit-able; call under `jax.jit(..., out_shardings=...)` to create it sharded).

  Parameters are drawn from `seed` exactly as `models.tokenizer.build_tokenizer(cfg, seed)`; the
  EMA starts equal to them (spec.md §5). With an `objective` (softvq_jax/objective.py) the REPA
  projector, the discriminator heads/state and the LeCam EMAs are created too.
  """
  _, params = split_model(SoftVQTokenizer(cfg, rngs=nnx.Rngs(seed)))
  if rng is None:
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
  extra = {}
  if objective is not None:
    extra = objective_lib.init_trainable(objective, seed)
    if extra["disc_params"] is not None:
      extra["disc_opt_state"] = disc_tx.init(extra["disc_params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init((params, extra.get("proj_params"))),
                    rng=rng, **extra)


def abstract_train_state(cfg: TokenizerConfig, tx, seed: int = 0, objective=None, disc_tx=None):
  """(graphdef, abstract TrainState of ShapeDtypeStructs): no memory, no FLOPs."""
  graphdef, _ = split_model(abstract_tokenizer(cfg))
  return graphdef, jax.eval_shape(
      lambda: init_train_state(cfg, tx, seed, objective=objective, disc_tx=disc_tx))


def _opt_shardings(tx, opt_state, param_sh, rep):
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                               transform_non_params=lambda _: rep, is_leaf=is_var)


def train_state_shardings(abstract_state: TrainState, tx, mesh: Mesh,
                          rules=sharding.DEFAULT_RULES, disc_tx=None) -> TrainState:
  """NamedShardings for every leaf: parameters (and their EMA and Adam moments) by their logical
  axes and the config's rules; counters, the key, LeCam EMAs and other non-parameter leaves
  replicated."""
  shard = lambda tree: sharding.state_shardings(tree, mesh, rules)  # noqa: E731
  rep = sharding.replicated(mesh)
  param_sh = shard(abstract_state.params)
  proj_sh = shard(abstract_state.proj_params) if abstract_state.proj_params is not None else None
  disc_sh = shard(abstract_state.disc_params) if abstract_state.disc_params is not None else None
  return abstract_state.replace(
      step=rep, params=param_sh, ema_params=param_sh, rng=rep, proj_params=proj_sh,
      opt_state=_opt_shardings(tx, abstract_state.opt_state, (param_sh, proj_sh), rep),
      disc_params=disc_sh, lecam=jax.tree.map(lambda _: rep, abstract_state.lecam),
      disc_state=(shard(abstract_state.disc_state) if abstract_state.disc_state is not None
                  else None),
      disc_opt_state=(_opt_shardings(disc_tx, abstract_state.disc_opt_state, disc_sh, rep)
                      if disc_sh is not None else None))


# ------------------------------------------------------------------------------------------------
# The generator's (SiT / DiT) training state: the same rules, fewer parts.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class GeneratorTrainState:
  """What a generator run checkpoints: its parameters, their EMA, the optimizer state, the step
  and the raw key. No discriminator, no projector; the network's fixed sin-cos `pos_embed` is
  not in it either (a pure function of the network config: rebuilt at every start and passed
  beside the state as `frozen["fixed"]`, softvq_jax/generator_objective.py)."""
  step: jax.Array            # [] int32: completed optimizer steps
  params: Any                # nnx.State of the network's nnx.Param variables, float32
  ema_params: Any            # EMA of params (what sampling and export use)
  opt_state: Any
  rng: jax.Array             # [2] uint32 raw key; per-step keys are fold_in(rng, step)


def init_generator_state(sit_cfg, tx: optax.GradientTransformation,
                         seed: int) -> GeneratorTrainState:
  """A fresh generator state (jit-able; jit with out_shardings to create it sharded).

  Parameters are drawn exactly as `models.sit.build_sit(sit_cfg, seed)`; the EMA starts as a
  copy (spec.md §8.2); the step key stream is fold_in(key(seed), 1), as the tokenizer's."""
  _, params, _ = generator_objective.split_generator(sit_lib.build_sit(sit_cfg, seed))
  rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
  return GeneratorTrainState(step=jnp.zeros((), jnp.int32), params=params,
                             ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                             rng=rng)


def abstract_generator_state(sit_cfg, tx, seed: int = 0):
  """(graphdef, abstract GeneratorTrainState, abstract fixed pos_embed): no memory, no FLOPs."""
  graphdef, _, fixed = generator_objective.split_generator(sit_lib.abstract_sit(sit_cfg))
  return graphdef, jax.eval_shape(lambda: init_generator_state(sit_cfg, tx, seed)), fixed


def generator_state_shardings(abstract_state: GeneratorTrainState, tx, mesh: Mesh,
                              rules=sharding.DEFAULT_RULES) -> GeneratorTrainState:
  """Parameters, EMA and Adam moments by their logical axes (+ the FSDP split of anything left
  whole); the step and the key replicated."""
  rep = sharding.replicated(mesh)
  param_sh = sharding.state_shardings(abstract_state.params, mesh, rules)
  return abstract_state.replace(step=rep, params=param_sh, ema_params=param_sh, rng=rep,
                                opt_state=_opt_shardings(tx, abstract_state.opt_state, param_sh,
                                                         rep))
