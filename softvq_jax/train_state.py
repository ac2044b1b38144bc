"""The training state: one pytree that is jitted, sharded, donated and checkpointed as a whole.

`TrainState` holds float32 generator parameters, their EMA, the optimizer state, the step and a raw
PRNG key (uint32[2], so Orbax stores it as a plain array). The discriminator's parameters, its
optimizer state and the LeCam statistics are optional parts (None until the GAN objective uses
them; None is an empty pytree, so jit, sharding and Orbax simply see nothing there).

The NNX graph definition is not part of the state: `nnx.split` once, keep the `graphdef` beside
the state, `nnx.merge(graphdef, state.params)` inside the jitted step (DESIGN.md: no `nnx.jit`
in the loop).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from softvq_jax import sharding
from softvq_jax.models.tokenizer import SoftVQTokenizer, TokenizerConfig, abstract_tokenizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # [] int32: completed optimizer steps
  params: Any                # nnx.State of the tokenizer's nnx.Param variables, float32
  ema_params: Any            # same structure: EMA of params (what evaluation and release use)
  opt_state: Any             # optax state of `generator_trainable(state)` = (params, proj_params)
  rng: jax.Array             # [2] uint32 raw key; per-step keys are fold_in(rng, step)
  proj_params: Any = None    # REPA projector (trained with the generator), optional
  disc_params: Any = None    # discriminator heads (GAN objective), optional
  disc_state: Any = None     # its BatchNorm running statistics and spectral-norm u/v vectors
  disc_opt_state: Any = None
  lecam: Any = None          # LeCam EMA statistics {"real", "fake"}, optional
  frozen: Any = None         # frozen networks' weights: loaded at start, never checkpointed


def generator_trainable(state_or_params, proj_params=None):
  """What the generator optimizer updates: (tokenizer params, REPA projector params or None)."""
  if isinstance(state_or_params, TrainState):
    return (state_or_params.params, state_or_params.proj_params)
  return (state_or_params, proj_params)


def split_model(model: SoftVQTokenizer):
  """(graphdef, params): the tokenizer must hold nothing but parameters (no mutable state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the tokenizer has non-parameter state, which TrainState does not carry: "
                     f"{jax.tree.map(jnp.shape, rest)}")
  return graphdef, params


def init_train_state(cfg: TokenizerConfig, tx: optax.GradientTransformation, seed: int,
                     rng: jax.Array | None = None, objective=None,
                     disc_tx: optax.GradientTransformation | None = None) -> TrainState:
  """A fresh state (jit-able; call under `jax.jit(..., out_shardings=...)` to create it sharded).

  Parameters are drawn from `seed` exactly as `models.tokenizer.build_tokenizer(cfg, seed)`; the
  EMA starts equal to them (spec 5). With an `objective` (softvq_jax/objective.py) the REPA
  projector, the discriminator heads/state and the LeCam EMAs are created too; `frozen` stays
  None (the loop attaches the loaded networks).
  """
  _, params = split_model(SoftVQTokenizer(cfg, rngs=nnx.Rngs(seed)))
  if rng is None:
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
  extra = {}
  if objective is not None:
    from softvq_jax import objective as objective_lib  # pylint: disable=import-outside-toplevel
    extra = objective_lib.init_trainable(objective, seed)
    if extra["disc_params"] is not None:
      extra["disc_opt_state"] = disc_tx.init(extra["disc_params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(generator_trainable(params, extra.get("proj_params"))),
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
                          rules=sharding.DEFAULT_RULES, disc_tx=None,
                          frozen_sharding: str = "replicated") -> TrainState:
  """NamedShardings for every leaf: parameters (and their EMA and Adam moments) by their logical
  axes and the config's rules; counters, the key, LeCam EMAs and other non-parameter leaves
  replicated; frozen networks replicated or FSDP-split (`frozen_sharding`)."""
  shard = lambda tree: sharding.state_shardings(tree, mesh, rules)  # noqa: E731
  rep = sharding.replicated(mesh)
  param_sh = shard(abstract_state.params)
  proj_sh = shard(abstract_state.proj_params) if abstract_state.proj_params is not None else None
  disc_sh = shard(abstract_state.disc_params) if abstract_state.disc_params is not None else None
  out = abstract_state.replace(
      step=rep, params=param_sh, ema_params=param_sh, rng=rep, proj_params=proj_sh,
      opt_state=_opt_shardings(tx, abstract_state.opt_state, (param_sh, proj_sh), rep),
      disc_params=disc_sh, lecam=jax.tree.map(lambda _: rep, abstract_state.lecam),
      disc_state=(shard(abstract_state.disc_state) if abstract_state.disc_state is not None
                  else None),
      disc_opt_state=(_opt_shardings(disc_tx, abstract_state.disc_opt_state, disc_sh, rep)
                      if disc_sh is not None else None),
      frozen=None)
  if abstract_state.frozen is not None:
    out = out.replace(frozen=frozen_shardings(abstract_state.frozen, mesh, rules, frozen_sharding))
  return out


def frozen_shardings(abstract_frozen, mesh: Mesh, rules, how: str = "replicated"):
  """Frozen networks: every device holds them whole ("replicated"), or they are split like the
  trainable parameters ("fsdp")."""
  if how == "fsdp":
    return sharding.state_shardings(abstract_frozen, mesh, rules)
  rep = sharding.replicated(mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda v: v.replace(rep) if is_var(v) else rep, abstract_frozen,
                      is_leaf=is_var)
