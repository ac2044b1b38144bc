"""One path type for every file the project reads or writes: `etils.epath.Path`.

Why: on a TPU pod the workdir, the data and the caches live on GCS (`gs://bucket/...`), on a GPU
cluster on a shared local file system. `os.path` / `open()` / `np.load` understand only the
latter, and fail quietly on the former: `os.path.abspath("gs://b/run")` is `<cwd>/gs:/b/run`, a
local directory that nobody reads again. `epath.Path` (also what Orbax and TFDS use) reads and
writes local paths with `os`, `gs://` and other URLs with `tf.io.gfile` (or fsspec without
TensorFlow), so the code below it is written once for both.

Conventions used across the project:
* `resolve(p)` at every entry point: a local path becomes absolute (and `~` is expanded), a URL is
  kept as is; never `os.path.abspath` on something that may be a URL.
* Writes that another reader (a resumed run, another host) may see half-done go through
  `atomic_write` / `write_bytes_atomic`: locally a temporary file in the same folder renamed over
  the target; on object stores the upload itself is atomic (an object exists only once
  complete), so the file is written in place.
* NumPy archives and JSON go through `save_npz` / `load_npz` / `write_json` / `read_json`, which
  pass NumPy a file object opened through the path instead of a path string.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import Any, Iterator, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local paths."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """A local path made absolute (with `~` expanded); a URL unchanged."""
  path = os.fspath(path)
  if is_url(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


def resolve_str(path: PathLike) -> str:
  """`resolve` as a string (for APIs and records that keep plain strings)."""
  return os.fspath(resolve(path))


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
  """Opens `path` for writing so that readers never see a partial file.

  Local: writes `<dir>/.<name>.tmp.*` and renames it over `path` when the block ends without an
  error (the temporary file is removed otherwise). URL: object stores publish an object only when
  its upload is finalised (a killed writer leaves nothing), so the file is written in place; if
  the block raises, the object its closing finalised is deleted. Parent folders are created.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    try:
      with path.open(mode) as f:
        yield f
    except BaseException:
      with contextlib.suppress(Exception):
        path.unlink(missing_ok=True)
      raise
    return
  # A fresh name opened exclusively, with the default permissions (umask applied): a cache or an
  # exported model on a shared disk stays readable by others (mkstemp would make it 0600).
  tmp = os.path.join(os.fspath(path.parent), f".{path.name}.tmp.{uuid.uuid4().hex}")
  try:
    with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
    os.replace(tmp, os.fspath(path))
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  with atomic_write(path, "wb") as f:
    f.write(data)


def write_json(path: PathLike, value: Any, *, default=None) -> None:
  """`value` as indented JSON, written atomically (see `atomic_write`); `default` as json.dumps'."""
  with atomic_write(path, "w") as f:
    f.write(json.dumps(value, indent=2, default=default))


def read_json(path: PathLike) -> Any:
  return json.loads(resolve(path).read_text())


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
  """`np.savez(path, **arrays)` for any path, written atomically (see `atomic_write`)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes_atomic(path, buf.getvalue())


def load_npz(path: PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` file (local or URL): all of them, or only `keys`.

  Members are read lazily from the archive, so taking `mu`/`sigma` out of a 2 GB ADM reference
  batch does not read its images. Raises KeyError naming the archive's members if a key is
  missing.
  """
  with resolve(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
    names = list(z.files) if keys is None else list(keys)
    missing = [k for k in names if k not in z.files]
    if missing:
      raise KeyError(f"{path}: no array(s) {missing} (it holds {list(z.files)})")
    return {k: z[k] for k in names}
