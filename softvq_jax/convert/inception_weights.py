"""Import / export the FID Inception-v3 weights of pytorch-fid (`models/inception.py`).

The source is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF FID graph ported to
PyTorch; the state dict `pytorch_fid.inception.fid_inception_v3()` loads), with keys such as
`Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.running_mean`, `Mixed_5b.branch1x1.conv.weight`,
`fc.weight`. Reading a `.pth` needs torch; convert it once to `.safetensors` with

  python -m softvq_jax.convert.inception_weights --pth=pt_inception-2015-12-05-6726825d.pth \
      --out=fid_inception.safetensors

and evaluation then needs neither torch nor network access. The safetensors file holds the same
keys in PyTorch layout (loadable back into pytorch-fid with `safetensors.torch.load_file`).

Loading is strict: every model variable (conv kernels, BatchNorm weight/bias/running stats, fc)
must be in the file with the right shape, and every key of the file must be used, except
BatchNorm's `num_batches_tracked` counters (training bookkeeping, meaningless in eval mode).
Otherwise `CheckpointError` lists the missing / unknown / mis-shaped keys.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax.convert.safetensors_io import CheckpointError, write_safetensors
from softvq_jax.convert import state_dict as state_dict_lib
from softvq_jax.convert.timm_vit import read_state_dict
from softvq_jax.models.inception import FIDInception

IGNORED = re.compile(r".*\.num_batches_tracked")
_TORCH_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key(path: tuple) -> tuple[str, str]:
  """Our variable path -> (PyTorch key, layout kind 'conv' | 'linear' | 'plain')."""
  parts = [str(p) for p in path]
  leaf, parent = parts[-1], parts[-2]
  if leaf == "kernel":
    return ".".join(parts[:-1] + ["weight"]), ("conv" if parent == "conv" else "linear")
  if parent == "bn":
    return ".".join(parts[:-1] + [_TORCH_LEAF[leaf]]), "plain"
  return ".".join(parts), "plain"


def _to_ours(arr: np.ndarray, kind: str) -> np.ndarray:
  return {"conv": lambda a: a.transpose(2, 3, 1, 0), "linear": lambda a: a.T}.get(
      kind, lambda a: a)(arr)


def _to_torch(arr: np.ndarray, kind: str) -> np.ndarray:
  return {"conv": lambda a: a.transpose(3, 2, 0, 1), "linear": lambda a: a.T}.get(
      kind, lambda a: a)(arr)


def _variables(model: nnx.Module):
  """[(path, variable)] of every Param and BatchStat."""
  return list(nnx.to_flat_state(nnx.state(model)))


def load_inception_state_dict(model: FIDInception, state_dict: Mapping[str, np.ndarray], *,
                              source: str = "state dict") -> FIDInception:
  """Fills `model` (concrete or abstract from `nnx.eval_shape`) in place from a pytorch-fid state
  dict, strictly; returns it."""
  expected = {}
  for path, var in _variables(model):
    key, kind = _torch_key(path)
    expected[key] = (path, kind, tuple(var.shape))
  updates, problems = state_dict_lib.match_state_dict(
      expected, state_dict, convert=_to_ours, unconvert=_to_torch,
      ignore=lambda k: bool(IGNORED.fullmatch(k)))
  if problems:
    raise CheckpointError(
        f"{source} is not pytorch-fid's FID Inception-v3 state dict "
        f"(pt_inception-2015-12-05-6726825d.pth, or its export by "
        f"softvq_jax.convert.inception_weights): " + "; ".join(problems))
  flat = dict(_variables(model))
  nnx.update(model, nnx.from_flat_state(
      [(p, flat[p].replace(jnp.asarray(v))) for p, v in updates]))
  return model


def load_inception(path: str | os.PathLike, *, dtype=jnp.float32,
                   precision=None) -> FIDInception:
  """An `FIDInception` with the weights of `path`: pytorch-fid's `.pth` (needs torch) or our
  `.safetensors` export (NumPy only). dtype / precision: see `FIDInception`."""
  path = os.fspath(path)
  state_dict = read_state_dict(path)
  # Abstract construction: no placeholder initialisation of 24M parameters; every variable is
  # then replaced by the file (a strict load leaves none abstract).
  model = nnx.eval_shape(lambda: FIDInception(dtype=dtype, precision=precision))
  return load_inception_state_dict(model, state_dict, source=path)


def export_state_dict(model: FIDInception) -> dict[str, np.ndarray]:
  """{PyTorch key: float32 array in PyTorch layout}, the inverse of the loader."""
  out = {}
  for path, var in _variables(model):
    key, kind = _torch_key(path)
    out[key] = np.ascontiguousarray(_to_torch(np.asarray(var[...], np.float32), kind))
  return out


def export_inception(model: FIDInception, path: str | os.PathLike) -> None:
  """Writes `model`'s weights as a safetensors file with pytorch-fid's keys and layouts."""
  write_safetensors(path, export_state_dict(model),
                    metadata={"format": "pt", "model": "pytorch-fid FID Inception-v3",
                              "source": "softvq_jax.convert.inception_weights"})


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m softvq_jax.convert.inception_weights",
      description="Convert pytorch-fid's FID Inception weights (.pth) to .safetensors.")
  parser.add_argument("--pth", required=True,
                      help="pt_inception-2015-12-05-6726825d.pth (from pytorch-fid's release)")
  parser.add_argument("--out", default="fid_inception.safetensors", help="output file")
  args = parser.parse_args(argv)
  try:
    model = load_inception(args.pth)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  export_inception(model, args.out)
  n = sum(int(np.prod(v.shape)) for _, v in _variables(model))
  print(f"wrote {args.out}: {n} values from {args.pth}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
