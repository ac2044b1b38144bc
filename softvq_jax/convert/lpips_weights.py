"""LPIPS-VGG weights: import from torchvision + lpips files, export / load one `.safetensors` file.

LPIPS needs two downloads that live in different places: the ImageNet VGG16 from torchvision
(`vgg16-397923af.pth`, keys `features.{0,2,5,...}.weight/bias`, plus a `classifier.*` that LPIPS
does not use) and the learned heads shipped inside the `lpips` wheel (`lpips/weights/v0.1/vgg.pth`,
keys `lin{0..4}.model.1.weight` [1, C, 1, 1]). Reading those needs torch, so they are converted
once into ONE safetensors file that the training and evaluation paths load with NumPy alone:

  python -m softvq_jax.convert.lpips_weights --vgg=vgg16-397923af.pth --out=lpips_vgg.safetensors

The exported file keeps the PyTorch key names and layouts (the union of the two sources), so it is
also readable by anyone with the lpips / torchvision code. Loading is strict: every expected key
present, every key in the file used (or one of the documented ignorable `classifier.*` keys),
every shape right; otherwise a `CheckpointError` lists the offending keys.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax.convert.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from softvq_jax.convert import state_dict as state_dict_lib
from softvq_jax.models.lpips import LPIPS, VGG16_STAGES
from softvq_jax.models.vit import shape_only_rngs

# torchvision `features` index of each 3x3 convolution (ReLUs and max-pools sit between them).
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_IGNORED = re.compile(r"classifier\..*")  # the ImageNet classifier of a full vgg16 file
FORMAT = "softvq_jax lpips vgg v0.1"
assert len(VGG_CONV_INDICES) == sum(len(s) for s in VGG16_STAGES)


def _vgg_table(model: LPIPS) -> dict[str, tuple[nnx.Param, str]]:
  """{torchvision key: (our parameter, layout)} for the 13 convolutions."""
  table = {}
  for conv, idx in zip(model.convs, VGG_CONV_INDICES):
    table[f"features.{idx}.weight"] = (conv.kernel, "conv")
    table[f"features.{idx}.bias"] = (conv.bias, "plain")
  return table


def _heads_table(model: LPIPS) -> dict[str, tuple[nnx.Param, str]]:
  return {f"lin{k}.model.1.weight": (lin.weight, "head") for k, lin in enumerate(model.lins)}


def _to_ours(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
    return arr.transpose(2, 3, 1, 0)
  if kind == "head":  # [1, C, 1, 1] -> [C]
    is_head = arr.ndim == 4 and arr.shape[0] == 1 and arr.shape[2:] == (1, 1)
    return arr.reshape(-1) if is_head else arr
  return arr


def _to_torch(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return arr.transpose(3, 2, 0, 1)
  if kind == "head":
    return arr.reshape(1, -1, 1, 1)
  return arr


def _match(table, state_dict: Mapping[str, np.ndarray], source: str, ignore=None) -> list:
  """Checks one state dict against its table; returns [(param, float32 array)] or raises."""
  expected = {k: (param, kind, tuple(param.shape)) for k, (param, kind) in table.items()}
  updates, problems = state_dict_lib.match_state_dict(
      expected, state_dict, convert=_to_ours, unconvert=_to_torch,
      ignore=lambda k: bool(ignore and ignore.fullmatch(k)))
  if problems:
    raise CheckpointError(f"{source} is not what LPIPS-VGG expects: " + "; ".join(problems))
  return updates


def load_lpips_weights(model: LPIPS, vgg_state_dict: Mapping[str, np.ndarray],
                       heads_state_dict: Mapping[str, np.ndarray], *,
                       vgg_source: str = "VGG16 state dict",
                       heads_source: str = "LPIPS heads state dict") -> None:
  """Fills `model` in place from a torchvision VGG16 state dict and the lpips v0.1 'vgg' heads.

  vgg_state_dict: `features.N.weight` [out, in, 3, 3] / `features.N.bias` (a full `vgg16()` state
    dict's `classifier.*` keys are accepted and dropped). heads_state_dict: `lin{k}.model.1.weight`
    [1, C, 1, 1]. Arrays may be NumPy or anything `np.asarray` takes (torch CPU tensors too).
  Both dicts are checked before anything is written, so a failed load leaves `model` unchanged.
  """
  updates = _match(_vgg_table(model), vgg_state_dict, vgg_source, VGG_IGNORED)
  updates += _match(_heads_table(model), heads_state_dict, heads_source)
  for param, arr in updates:
    param.set_value(jnp.asarray(arr))


def export_state_dicts(model: LPIPS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """model -> (torchvision VGG16 `features.*` dict, lpips heads dict), PyTorch layouts, float32."""
  def export(table):
    return {k: np.ascontiguousarray(_to_torch(np.asarray(p[...], np.float32), kind))
            for k, (p, kind) in table.items()}
  return export(_vgg_table(model)), export(_heads_table(model))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{key: float32 array} from a `.safetensors` file (NumPy only) or a `.pth` (needs torch)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    return {k: np.asarray(v, np.float32) for k, v in read_safetensors(path).items()}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"{path}: reading PyTorch files needs torch (pip install torch); or "
                          "convert once elsewhere with `python -m "
                          "softvq_jax.convert.lpips_weights` and load the .safetensors file with "
                          "load_lpips_file") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types for bad files
    raise CheckpointError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e}); "
                          "the file is damaged or incomplete, download it again") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def shipped_heads_path() -> str:
  """The `lpips` package's own `weights/v0.1/vgg.pth` (found without importing lpips / torch)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("no LPIPS head weights given and the `lpips` package is not installed; "
                          "pip install lpips, or pass "
                          "heads_path=/path/to/lpips/weights/v0.1/vgg.pth")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
  if not os.path.isfile(path):
    raise CheckpointError(f"the installed lpips package has no {path}; reinstall lpips or pass "
                          "heads_path explicitly")
  return path


def _abstract_lpips(dtype) -> LPIPS:
  """An LPIPS whose parameters are shapes only: the loaders fill every one (strictly)."""
  return nnx.eval_shape(lambda: LPIPS(rngs=shape_only_rngs(0), dtype=dtype))


def load_lpips(vgg_path: str | os.PathLike, heads_path: str | os.PathLike | None = None, *,
               dtype=jnp.float32) -> LPIPS:
  """LPIPS from a torchvision VGG16 file and a heads file (default: the lpips package's own)."""
  heads_path = shipped_heads_path() if heads_path is None else os.fspath(heads_path)
  model = _abstract_lpips(dtype)
  load_lpips_weights(model, read_state_dict(vgg_path), read_state_dict(heads_path),
                     vgg_source=os.fspath(vgg_path), heads_source=heads_path)
  return model


def export_lpips(model: LPIPS, path: str | os.PathLike) -> None:
  """Writes all LPIPS weights to ONE `.safetensors` file (PyTorch names and layouts, float32)."""
  vgg, heads = export_state_dicts(model)
  write_safetensors(path, {**vgg, **heads}, metadata={"format": FORMAT})


def load_lpips_file(path: str | os.PathLike, *, dtype=jnp.float32) -> LPIPS:
  """LPIPS from the single file `export_lpips` writes (NumPy only; no torch needed)."""
  path = os.fspath(path)
  tensors = read_safetensors(path)
  heads = {k: v for k, v in tensors.items() if k.startswith("lin")}
  vgg = {k: v for k, v in tensors.items() if not k.startswith("lin")}
  model = _abstract_lpips(dtype)
  load_lpips_weights(model, vgg, heads, vgg_source=path, heads_source=path)
  return model


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m softvq_jax.convert.lpips_weights",
      description="Convert torchvision VGG16 + lpips v0.1 heads into one LPIPS .safetensors file.")
  parser.add_argument("--vgg", required=True,
                      help="torchvision VGG16 weights (vgg16-397923af.pth or a .safetensors)")
  parser.add_argument("--heads", default=None,
                      help="lpips heads (default: the installed lpips package's "
                           "weights/v0.1/vgg.pth)")
  parser.add_argument("--out", required=True, help="output .safetensors path")
  args = parser.parse_args(argv)
  model = load_lpips(args.vgg, args.heads)
  export_lpips(model, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
