"""Test helper (no tests here): `gs://` served from a local folder, for every library that touches
the workdir, with no network.

`install(root, setattr)` makes `gs://bucket/x` mean `<root>/bucket/x` for
* etils.epath (our code, TFDS, Grain's and Orbax's metadata): its fsspec backend gets a local
  directory file system that strips the `gs://` scheme (TensorFlow's gfile, which epath would
  prefer, knows only the real GCS);
* Orbax's TensorStore arrays: the GCS kvstore spec becomes a `file` kvstore on the same folder,
  and the bucket has no hierarchical namespace (Orbax would ask the GCS API);
* array_record's C++ reader (TFDS ArrayRecord), which opens gs:// itself.

Why a folder rather than fsspec's in-memory file system (tests/test_launch.py): TensorStore writes
checkpoint arrays in C++ and cannot see a Python in-memory store, and a folder per process also
models hosts that do not share a file system (tests/test_multiprocess.py). Code that bypasses
epath and calls os.* / open() on a gs:// string writes a local `gs:` directory under the current
directory instead, which the tests look for.
"""
from __future__ import annotations

import os
import types


def local_path(root: str, url: str) -> str:
  """The local file behind `gs://bucket/path`."""
  assert url.startswith("gs://"), url
  return os.path.join(root, url[len("gs://"):])


def install(root: str, setattr_fn) -> None:
  """Serves gs:// from `root` for the rest of the process (or until `setattr_fn`'s owner, e.g. a
  pytest MonkeyPatch, undoes it)."""
  from etils.epath import backend, gpath  # pylint: disable=import-outside-toplevel
  from fsspec.implementations.dirfs import DirFileSystem  # pylint: disable=import-outside-toplevel
  from fsspec.implementations.local import LocalFileSystem  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel

  class BucketFileSystem(DirFileSystem):
    protocol = "gs"  # so that `_strip_protocol` turns gs://bucket/x into bucket/x under root

  os.makedirs(root, exist_ok=True)
  fs = BucketFileSystem(path=root, fs=LocalFileSystem(auto_mkdir=True))
  setattr_fn(gpath, "_is_tf_installed", lambda: False)
  setattr_fn(backend.fsspec_backend, "fs", lambda path: fs)

  def kvstore(path):
    bucket, blob = gcs_utils.split_gcs_path(path)
    return {"driver": "file", "path": os.path.join(root, bucket, blob)}

  setattr_fn(gcs_utils, "get_kvstore_for_gcs", kvstore)
  setattr_fn(gcs_utils, "get_bucket", lambda name: types.SimpleNamespace(name=name))

  try:
    from array_record.python import array_record_data_source as ards  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  real = ards.array_record_module

  def reader(path, *args, **kwargs):
    path = os.fspath(path)
    if path.startswith("gs://"):
      path = local_path(root, path)
    return real.ArrayRecordReader(path, *args, **kwargs)

  setattr_fn(ards, "array_record_module", types.SimpleNamespace(ArrayRecordReader=reader))


def _main() -> None:
  """`python tests/fake_gcs.py -m softvq_jax.main FLAGS...`: softvq_jax.main with gs:// served
  from `$FAKE_GCS_ROOT/p<JAX_PROCESS_ID>`, a folder of its own per process, as hosts that share
  no file system (tests/test_multiprocess.py passes it to the launchers as `--python`)."""
  import runpy  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  if sys.argv[1:3] != ["-m", "softvq_jax.main"]:
    raise SystemExit(f"usage: {sys.argv[0]} -m softvq_jax.main FLAGS... (got {sys.argv[1:3]})")
  root = os.path.join(os.environ["FAKE_GCS_ROOT"], f"p{os.environ.get('JAX_PROCESS_ID', '0')}")
  install(root, setattr)
  sys.argv = ["softvq_jax.main"] + sys.argv[3:]
  runpy.run_module("softvq_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  _main()
