"""Strict, name-based mapping between PyTorch state dicts and our NNX parameter trees.

Our modules keep timm / official names, so a PyTorch key is derived from a parameter's path by a
few fixed rules (`torch_key`), and a loader can check the whole state dict against the whole
model: every expected key present, every present key either consumed or explicitly ignored, every
shape right. Anything else raises a `CheckpointError` listing the offending keys — a silent
partial load is the worst failure a converter can have.

Layout rules: Linear weight [out, in] <-> kernel [in, out]; Conv2d weight [out, in, kh, kw] <->
kernel [kh, kw, in, out]; LayerNorm weight <-> scale.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from softvq_jax.convert.safetensors_io import CheckpointError

_MAX_LISTED = 12


def torch_key(path: tuple) -> tuple[str, str]:
  """Our parameter path -> (PyTorch state-dict key, layout kind: 'linear' | 'conv' | 'plain')."""
  parts = [str(p) for p in path]
  last, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
  if parent == "patch_embed":  # timm PatchEmbed keeps its conv in `.proj`
    return ".".join(parts[:-1] + ["proj", "weight" if last == "kernel" else last]), (
        "conv" if last == "kernel" else "plain")
  if parent == "to_pixel":  # official ToPixel wraps its Linear in `.model`
    return ".".join(parts[:-1] + ["model", "weight" if last == "kernel" else last]), (
        "linear" if last == "kernel" else "plain")
  if last == "kernel":
    return ".".join(parts[:-1] + ["weight"]), "linear"
  if last == "scale":
    return ".".join(parts[:-1] + ["weight"]), "plain"
  return ".".join(parts), "plain"


def to_ours(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return arr.T
  if kind == "conv":
    return arr.transpose(2, 3, 1, 0)
  return arr


def to_torch(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return arr.T
  if kind == "conv":
    return arr.transpose(3, 2, 0, 1)
  return arr


def expected_keys(module: nnx.Module, prefix: str = "") -> dict[str, tuple[tuple, str, tuple]]:
  """{torch key: (our path, kind, our shape)} for every parameter of `module`."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    key, kind = torch_key(path)
    out[prefix + key] = (path, kind, tuple(var.shape))
  return out


def _listing(keys: Iterable[str]) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def match_state_dict(expected: Mapping[str, tuple[Any, str, tuple]],
                     state_dict: Mapping[str, np.ndarray], *,
                     convert: Callable[[np.ndarray, str], np.ndarray] = to_ours,
                     unconvert: Callable[[np.ndarray, str], np.ndarray] = to_torch,
                     ignore: Callable[[str], bool] = lambda key: False,
                     adapt: Callable[[str, np.ndarray, tuple], np.ndarray] | None = None
                     ) -> tuple[list[tuple[Any, np.ndarray]], list[str]]:
  """The strict part every weight importer shares: every expected key present, no unknown key,
  every shape right. expected: {torch key: (target, kind, our shape)}; convert(arr, kind) turns
  a PyTorch-layout array into ours (unconvert the inverse, for the error message).

  Returns (updates [(target, float32 array in our layout)], problems [human-readable strings]);
  nothing is written, so a caller can refuse a bad file without touching the model.
  """
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected and not ignore(k)]
  updates, mismatched = [], []
  for key, (target, kind, shape) in expected.items():
    if key not in state_dict:
      continue
    raw = np.asarray(state_dict[key])
    arr = convert(raw, kind)
    if adapt is not None and arr.shape != tuple(shape):
      arr = adapt(key, arr, tuple(shape))
    if arr.shape != tuple(shape):
      mismatched.append(f"{key}: file {tuple(raw.shape)} vs model "
                        f"{tuple(unconvert(np.zeros(shape, np.int8), kind).shape)}")
      continue
    updates.append((target, arr.astype(np.float32)))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
  return updates, problems


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                    source: str, prefix: str = "", ignore: Iterable[str] = (),
                    adapt: Callable[[str, np.ndarray, tuple], np.ndarray] | None = None) -> None:
  """Loads a PyTorch-named state dict into `module` in place, strictly.

  prefix: prepended to our keys (e.g. "encoder.model." when loading a bare ViT checkpoint into a
    sub-module is done by passing that sub-module and no prefix; a prefix is for keys that carry
    an extra leading scope in the file). ignore: regexes of keys that may be present and are
    dropped (e.g. heads or unused modules). adapt(key, our_layout_array, target_shape): a hook to
    resample arrays whose shape legitimately differs (pos_embed grid, patch size).
  """
  ignore_re = [re.compile(p) for p in ignore]
  updates, problems = match_state_dict(
      expected_keys(module, prefix), state_dict, adapt=adapt,
      ignore=lambda k: any(r.fullmatch(k) for r in ignore_re))
  if problems:
    raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems) +
                          ". Check that the checkpoint and the model config describe the same "
                          "architecture (size, image size, tokens, codebook).")
  flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
  nnx.update(module, nnx.from_flat_state([(p, flat[p].replace(v)) for p, v in updates]))


def export_state_dict(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
  """module parameters -> {PyTorch key: array in PyTorch layout} (inverse of load_state_dict)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    key, kind = torch_key(path)
    out[prefix + key] = np.ascontiguousarray(to_torch(np.asarray(var[...]), kind))
  return out
