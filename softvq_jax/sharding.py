"""Device mesh and logical-axis sharding rules.

One code path for 1 CPU, 8 fake CPU devices, a GPU node, a GPU cluster and a TPU pod: the mesh has
the named axes (`data`, `fsdp`, `tensor`) with sizes from `config.mesh_shape` (-1 fills), every
parameter carries logical axis names (`models/vit.py`: `embed`, `mlp`, `qkv`, `heads`, `vocab`,
`norm`, None), and `config.sharding_rules` maps logical names to mesh axes (MaxText-style). The
batch is split over (`data`, `fsdp`). Parameters of FSDP run are split over `fsdp` along `embed`;
tensor parallelism splits `mlp` / `qkv` / `heads` over `tensor`.

A dimension that a mesh axis does not divide is left unsplit (e.g. a codebook dim of 32 on a
fsdp axis of 64) instead of failing: correctness never depends on the rules, only memory does.

FSDP means every parameter is split (ZeRO-3): a parameter whose logical axes gave it no `fsdp`
split (LayerNorm scales, LayerScale gammas, biases of tensor-parallel axes when `tensor` is 1) is
split over `fsdp` along its largest dimension that `fsdp` divides. Without this, those small
vectors stay replicated and, with their Adam moments and EMA, cost ~10% over the 1/N target on
narrow models.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softvq_jax import axes, config_lib

MESH_AXES, BATCH_AXES = axes.MESH_AXES, axes.BATCH_AXES

DEFAULT_RULES = config_lib.DEFAULT_SHARDING_RULES


resolve_mesh_shape = axes.resolve_mesh_shape  # the one check of config.mesh_shape


def create_mesh(mesh_shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices, topology-aware where possible."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except  # e.g. CPU / unusual topologies
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axis names of one array -> PartitionSpec over the mesh.

  A mesh axis is used at most once per array; a dimension it does not divide stays unsplit.
  """
  if not logical_axes:
    return PartitionSpec()
  table = dict(rules)
  used, out = set(), []
  for i, name in enumerate(logical_axes):
    axis = table.get(name) if name is not None else None
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"sharding rule {name!r} -> {axis!r}: no such mesh axis {mesh.axis_names}")
    if (axis is None or axis in used or mesh.shape[axis] == 1
        or (shape is not None and shape[i] % mesh.shape[axis])):
      out.append(None)
    else:
      used.add(axis)
      out.append(axis)
  return PartitionSpec(*out)


def _logical_axes(var) -> tuple | None:
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  return meta.get("out_sharding")


def _with_fsdp_split(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Adds an `fsdp` split on the largest free dimension it divides, if the spec has none."""
  n = mesh.shape.get("fsdp", 1)
  parts = list(spec) + [None] * (len(shape) - len(spec))
  if n == 1 or "fsdp" in parts:
    return spec
  free = [i for i, p in enumerate(parts) if p is None and shape[i] % n == 0]
  if not free:
    return spec
  parts[max(free, key=lambda i: shape[i])] = "fsdp"
  return PartitionSpec(*parts)


def state_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedSharding for every parameter of an NNX state (abstract or concrete): its logical axes
  mapped by `rules`, plus the FSDP split of anything left whole (module docstring)."""
  def one(var):
    if isinstance(var, nnx.Variable):
      spec = logical_to_spec(_logical_axes(var), rules, mesh, var.shape)
      spec = _with_fsdp_split(spec, var.shape, mesh)
      return var.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def frozen_shardings(abstract_frozen, mesh: Mesh, rules=DEFAULT_RULES, how: str = "replicated"):
  """Frozen networks (the objective's pretrained weights): every device holds them whole
  ("replicated"), or they are split like the trainable parameters ("fsdp")."""
  if abstract_frozen is None:
    return None
  if how == "fsdp":
    return state_shardings(abstract_frozen, mesh, rules)
  rep = replicated(mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda v: v.replace(rep) if is_var(v) else rep, abstract_frozen,
                      is_leaf=is_var)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds for a tree of arrays placed with `shardings` (largest shard)."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total
