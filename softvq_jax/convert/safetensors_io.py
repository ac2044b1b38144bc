"""Read and write `.safetensors` files with NumPy only (no torch, no framework).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and one raw buffer. Reading it ourselves (instead of `safetensors.numpy`) gives
bfloat16 support through `ml_dtypes` and errors that name the file and the broken tensor, which is
what a user with a truncated download needs to see.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from softvq_jax import paths

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint file or state dict that cannot be loaded as asked; the message says why."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file (local path or URL such as gs://) as NumPy arrays.

  A local file is memory-mapped and each tensor copied out of it (no second copy of the whole
  file); a remote file is read whole through etils.epath.
  """
  path = paths.resolve(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file")
  if paths.is_url(path):
    return _parse(path, memoryview(path.read_bytes()))
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size < 8:  # mmap refuses empty files: let _parse say why
      return _parse(path, memoryview(f.read()))
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      return _parse(path, mm)


def _parse(path, buf) -> dict[str, np.ndarray]:
  """Tensors of a whole safetensors file held in `buf` (bytes-like), copied out of it."""
  size = len(buf)
  fix = "the file is damaged or incomplete; download or export it again"
  if size < 8:
    raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file; {fix}")
  (header_len,) = struct.unpack("<Q", buf[:8])
  if header_len > size - 8:
    raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}; {fix}")
  try:
    header = json.loads(bytes(buf[8:8 + header_len]))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable safetensors header ({e}); {fix}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: safetensors header is not a JSON object; {fix}")
  data_start = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: tensor {name!r} has an invalid header entry {info!r}; "
                            f"{fix}") from None
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize or data_start + end > size or begin < 0:
      raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']}{list(shape)}) lies "
                            f"outside the file's data (bytes {begin}..{end} of "
                            f"{size - data_start}); {fix}")
    out[name] = np.frombuffer(buf, dtype, count, data_start + begin).reshape(shape).copy()
  return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes tensors (C order) to `path` (local or URL) atomically (`paths.atomic_write`)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in _NAMES:
      raise CheckpointError(f"tensor {name!r} has dtype {arr.dtype}, not storable in safetensors")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  # Streamed tensor by tensor (a 600M-parameter model is 2.4 GB), atomically: see paths.
  with paths.atomic_write(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
