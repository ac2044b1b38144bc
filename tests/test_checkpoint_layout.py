"""Checkpoints written before the frozen networks left the TrainState (issue 14) still restore:
their state has one more field, `frozen` (always None there), which the restore skips."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from softvq_jax import checkpoint
from softvq_jax.train_state import TrainState


@flax.struct.dataclass
class _OldTrainState:  # the layout before issue 14
  step: Any
  params: Any
  ema_params: Any
  opt_state: Any
  rng: Any
  proj_params: Any = None
  disc_params: Any = None
  disc_state: Any = None
  disc_opt_state: Any = None
  lecam: Any = None
  frozen: Any = None


def _fields(**kw):
  p = {"w": jnp.arange(6.0).reshape(2, 3)}
  return dict(step=jnp.int32(7), params=p, ema_params={"w": p["w"] + 1}, opt_state=({"mu": p},),
              rng=jnp.array([1, 2], jnp.uint32),
              lecam={"real": jnp.float32(0.5), "fake": jnp.float32(-0.5)}, **kw)


def test_a_checkpoint_with_the_older_train_state_layout_restores(tmp_path):
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(str(tmp_path)),
                                  item_names=checkpoint.ITEMS)
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(_OldTrainState(**_fields()))))
  manager.wait_until_finished()
  manager.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          TrainState(**_fields()))
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  restored = ckpt.restore(7, abstract)
  ckpt.close()
  assert isinstance(restored, TrainState) and restored.proj_params is None
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(TrainState(**_fields()))):
    np.testing.assert_array_equal(a, b)
