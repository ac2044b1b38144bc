"""The device mesh's axes and shape, in one place (no imports beyond the standard library: the
input pipeline's worker processes read them without loading JAX).

The mesh is (data, fsdp, tensor) with sizes from `config.mesh_shape` (one -1 fills); the batch is
split over (data, fsdp) (softvq_jax/sharding.py, softvq_jax/data.py `make_global_batch`).
`resolve_mesh_shape` is the one check of `config.mesh_shape`, used by the config validator
(without a device count), by `sharding.create_mesh` and by the pre-flight checks.
"""
from __future__ import annotations

import math
from typing import Sequence

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int | None = None
                       ) -> tuple[int, ...]:
  """`config.mesh_shape` with its -1 replaced by what fills `num_devices` (None: only the form is
  checked and the shape returned as given). ValueError naming the field and the fix."""
  shape = [int(s) for s in mesh_shape]
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} must have {len(MESH_AXES)} entries, "
                     f"the sizes of axes {MESH_AXES}: positive, or one -1 (what fills the "
                     "devices)")
  if num_devices is None:
    return tuple(shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} does not fit the {num_devices} "
                       f"devices ({known} does not divide {num_devices} devices)")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} needs {math.prod(shape)} devices, "
                     f"{num_devices} are available")
  return tuple(shape)
