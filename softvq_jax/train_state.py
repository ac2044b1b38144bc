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
  opt_state: Any             # optax state of `params`
  rng: jax.Array             # [2] uint32 raw key; per-step keys are fold_in(rng, step)
  disc_params: Any = None    # discriminator (GAN objective), optional
  disc_opt_state: Any = None
  lecam: Any = None          # LeCam EMA statistics, optional


def split_model(model: SoftVQTokenizer):
  """(graphdef, params): the tokenizer must hold nothing but parameters (no mutable state)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"the tokenizer has non-parameter state, which TrainState does not carry: "
                     f"{jax.tree.map(jnp.shape, rest)}")
  return graphdef, params


def init_train_state(cfg: TokenizerConfig, tx: optax.GradientTransformation, seed: int,
                     rng: jax.Array | None = None) -> TrainState:
  """A fresh state (jit-able; call under `jax.jit(..., out_shardings=...)` to create it sharded).

  Parameters are drawn from `seed` exactly as `models.tokenizer.build_tokenizer(cfg, seed)`; the
  EMA starts equal to them (spec 5).
  """
  _, params = split_model(SoftVQTokenizer(cfg, rngs=nnx.Rngs(seed)))
  if rng is None:
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=rng)


def abstract_train_state(cfg: TokenizerConfig, tx, seed: int = 0):
  """(graphdef, abstract TrainState of ShapeDtypeStructs): no memory, no FLOPs."""
  graphdef, _ = split_model(abstract_tokenizer(cfg))
  return graphdef, jax.eval_shape(lambda: init_train_state(cfg, tx, seed))


def train_state_shardings(abstract_state: TrainState, tx, mesh: Mesh,
                          rules=sharding.DEFAULT_RULES) -> TrainState:
  """NamedShardings for every leaf: parameters (and their EMA and Adam moments) by their logical
  axes and the config's rules; counters, the key and other non-parameter leaves replicated."""
  param_sh = sharding.state_shardings(abstract_state.params, mesh, rules)
  rep = sharding.replicated(mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_sh,
                                 transform_non_params=lambda _: rep, is_leaf=is_var)
  return abstract_state.replace(
      step=rep, params=param_sh, ema_params=param_sh, opt_state=opt_sh, rng=rep,
      disc_params=None, disc_opt_state=None, lecam=None)
