"""Grain random-access sources for `softvq_jax.data`: demo crops, image folders, TFDS ArrayRecord.

Every source is a `grain.sources.RandomAccessDataSource` (`__len__` + `__getitem__`) whose records
are small dicts

  {"image": <encoded bytes | file path (str) | uint8 HWC/HW ndarray>, "label": int, "name": str}

Decoding is deliberately *not* done here: it happens in `data.decode_image`, inside the Grain map
that runs in the worker processes, so that one decoder (PIL, as in the reference) and one bad-file
policy serve all three sources. Records stay cheap to produce and to pickle.

Start-up checks live here too: a missing path, an empty folder or an unprepared TFDS dataset raise
`DataSourceError` naming the problem and the fix, before any worker process is started.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from softvq_jax import paths

# torchvision's ImageFolder extensions (the reference's dataset class), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_FILELIST_VERSION = 2


class DataSourceError(RuntimeError):
  """A dataset that cannot be used; the message says what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------------
# Demo data: real photographs bundled with scikit-image, cut into a deterministic set of crops.
# ------------------------------------------------------------------------------------------------

# Photographs that scikit-image loads from its own package files (no download). `camera` is
# grayscale and goes through the same grayscale -> RGB conversion as any other L-mode file.
DEMO_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry",
               "hubble_deep_field", "retina", "camera")

_demo_cache: dict[str, np.ndarray] = {}
_demo_lock = threading.Lock()


def _demo_image(name: str) -> np.ndarray:
  """The full photograph, loaded once per process (workers load their own copy lazily)."""
  with _demo_lock:
    if name not in _demo_cache:
      import skimage.data  # pylint: disable=g-import-not-at-top
      _demo_cache[name] = np.ascontiguousarray(getattr(skimage.data, name)())
    return _demo_cache[name]


class DemoSource:
  """`num_examples` crops of the bundled photographs; crop i is a pure function of (split, i).

  Why crops and not the raw photos: nine images make a useless epoch, while thousands of distinct
  crops (different scale, aspect ratio and position) give the train/eval pipelines, the tests and
  the demo training job real, varied photographic content with no download. Crop sides are 35-100%
  of the photo's short side with aspect ratio in [3/4, 4/3], so the train transform still sees
  images both larger and smaller than the output size. Train and eval use different crop streams.
  Labels are the index of the source photograph.
  """

  def __init__(self, num_examples: int, split: str = "train"):
    if num_examples <= 0:
      raise DataSourceError(f"demo data: num_examples must be positive, got {num_examples}")
    self._n = int(num_examples)
    self._split = split
    self._split_id = int(hashlib.sha256(split.encode()).hexdigest()[:8], 16)

  def __len__(self) -> int:
    return self._n

  def __repr__(self) -> str:
    return f"DemoSource(num_examples={self._n}, split={self._split!r})"

  def crop_box(self, index: int) -> tuple[str, int, int, int, int]:
    """(photo name, top, left, height, width) of crop `index`."""
    name = DEMO_IMAGES[index % len(DEMO_IMAGES)]
    h, w = _demo_image(name).shape[:2]
    rng = np.random.default_rng([self._split_id, index])
    side = rng.uniform(0.35, 1.0) * min(h, w)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))  # width / height
    ch = int(min(h, max(8, round(side / np.sqrt(aspect)))))
    cw = int(min(w, max(8, round(side * np.sqrt(aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return name, top, left, ch, cw

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"demo index {index} out of range [0, {self._n})")
    name, top, left, ch, cw = self.crop_box(index)
    crop = _demo_image(name)[top:top + ch, left:left + cw]  # [ch, cw, 3] or [ch, cw] uint8
    return {"image": np.ascontiguousarray(crop), "label": DEMO_IMAGES.index(name),
            "name": f"demo/{self._split}/{name}/{index}"}


# ------------------------------------------------------------------------------------------------
# Image folder: root/<class>/**/<file> (ImageNet layout) or a flat root/<file>.
# ------------------------------------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _scan_folder(root: epath.Path) -> dict[str, Any]:
  """Lists `root` once; sorted so that every host and every run sees the same order.

  Local folders: class folders may nest (`<class>/**/<file>`) and symlinks are followed (os.walk).
  URLs (gs://...): one listing per level (`<root>/*` and `<root>/*/*`), because object stores
  have no folders to walk and a per-entry "is this a folder?" request would cost one round trip
  per image; so a URL image folder is `<root>/<class>/<file>` or `<root>/<file>`.
  """
  if paths.is_url(root):
    return _scan_url_folder(root)
  local = os.fspath(root)
  entries = sorted(os.scandir(local), key=lambda e: e.name)
  class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
  top_files = [e.name for e in entries if e.is_file() and _is_image_file(e.name)]
  files: list[str] = []
  labels: list[int] = []
  if class_dirs:
    for label, cls in enumerate(class_dirs):
      found = []
      for dirpath, dirnames, filenames in os.walk(os.path.join(local, cls), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, local)
        found.extend(os.path.join(rel, f) for f in filenames if _is_image_file(f))
      found.sort()
      files.extend(found)
      labels.extend([label] * len(found))
  return _listing(root, class_dirs, top_files, files, labels)


def _scan_url_folder(root: epath.Path) -> dict[str, Any]:
  top = [p.name for p in root.glob("*")]
  nested = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*"))
  class_dirs = sorted({n.split("/")[0] for n in nested if not n.startswith(".")})
  top_files = sorted(n for n in top if n not in class_dirs and _is_image_file(n))
  label_of = {c: i for i, c in enumerate(class_dirs)}
  files = [n for n in nested if n.split("/")[0] in label_of and _is_image_file(n.split("/")[1])]
  files.sort(key=lambda n: (label_of[n.split("/")[0]], n))  # class by class, as a local folder
  return _listing(root, class_dirs, top_files, files, [label_of[f.split("/")[0]] for f in files])


def _listing(root: epath.Path, class_dirs: list[str], top_files: list[str], files: list[str],
             labels: list[int]) -> dict[str, Any]:
  if class_dirs:
    if top_files:
      logging.warning("image folder %s has class sub-folders; ignoring %d image files directly "
                      "in the root (e.g. %s)", root, len(top_files), top_files[0])
    layout = "classes"
  else:
    files, labels, layout = top_files, [-1] * len(top_files), "flat"
  return {"version": _FILELIST_VERSION, "root": str(root), "layout": layout,
          "classes": class_dirs, "files": files, "labels": labels,
          "mtimes": _dir_mtimes(root, layout, class_dirs)}


def _dir_mtimes(root: epath.Path, layout: str, class_dirs: list[str]) -> dict[str, float] | None:
  """Modification times that change when a file is added, removed or renamed: the class folders
  (class layout; the set of class folders itself is compared separately) or the root (flat).
  None for URLs: object stores have no folders, hence no folder modification times."""
  if paths.is_url(root):
    return None
  local = os.fspath(root)
  if layout == "flat":
    return {".": os.stat(local).st_mtime}
  return {cls: os.stat(os.path.join(local, cls)).st_mtime for cls in class_dirs}


def _class_dirs(root: epath.Path) -> list[str]:
  return sorted(e.name for e in os.scandir(os.fspath(root))
                if e.is_dir() and not e.name.startswith("."))


def user_cache_dir() -> epath.Path:
  """$XDG_CACHE_HOME/softvq_jax, else ~/.cache/softvq_jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return paths.resolve(os.path.join(base, "softvq_jax"))


def filelist_cache_path(root, cache_dir: str = "") -> epath.Path:
  """Where the file list of image folder `root` is cached: `<cache_dir>/filelists/` (a local
  folder or a URL), else the user's cache directory (`user_cache_dir()/filelists/`).

  Never inside the dataset itself: datasets are often read-only or shared between users, and
  writing into them would be a surprise. The file list belongs to the data rather than to one
  run, so it lives in a per-user (or configured, e.g. gs:// for a pod) cache that later runs on
  the same data reuse, not in one run's workdir.
  """
  root = str(paths.resolve(root))
  base = paths.resolve(cache_dir) if cache_dir else user_cache_dir()
  key = hashlib.sha256(root.encode()).hexdigest()[:16]
  return base / "filelists" / f"filelist_{key}.json"


def _load_cached_filelist(path: epath.Path, root: epath.Path) -> dict[str, Any] | None:
  try:
    cached = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if cached.get("version") != _FILELIST_VERSION or cached.get("root") != str(root):
    return None
  if paths.is_url(root):
    return cached  # no folder mtimes to compare: reused until the cache file is deleted
  try:
    stale = (_class_dirs(root) != cached["classes"]
             or cached.get("mtimes") != _dir_mtimes(root, cached["layout"], cached["classes"]))
    if stale:
      logging.info("file list cache %s is stale (folder modified); rescanning", path)
      return None
  except OSError:
    return None
  return cached


def list_image_folder(root, *, cache_dir: str = "") -> dict[str, Any]:
  """The sorted file list of an image folder (local or URL), read from / written to its cache.

  Returns dict(root, layout, classes, files (paths relative to root), labels). Listing 1.28 M
  ImageNet files over a network file system takes minutes, so it is done once and cached as JSON
  at `filelist_cache_path(root, cache_dir)` — never inside the data, which may be read-only. A
  local folder's list is rebuilt when a class folder is added/removed or a folder's modification
  time changes; a URL folder's (no folder times on object stores) when its cache file is deleted.
  A cache that cannot be written is skipped with a log line, never an error.
  """
  root = paths.resolve(root)
  if not root.exists():
    raise DataSourceError(
        f"image folder {str(root)!r} does not exist. Set config.data.path to a folder laid out as "
        "<path>/<class>/<image> (ImageNet style) or <path>/<image>, or use config.data.source=demo.")
  if not root.is_dir():
    raise DataSourceError(f"config.data.path={str(root)!r} is a file, not a folder of images.")
  cache = filelist_cache_path(root, cache_dir)
  listing = _load_cached_filelist(cache, root)
  if listing is not None:
    logging.info("image folder %s: %d files (cached list %s%s)", root, len(listing["files"]),
                 cache, "; delete it to rescan" if paths.is_url(root) else "")
  else:
    listing = _scan_folder(root)
    if listing["files"]:
      try:
        # Atomic: hosts sharing the cache never read a half-written list.
        paths.write_bytes_atomic(cache, json.dumps(listing).encode())
        logging.info("image folder %s: %d files, %d classes; file list cached at %s", root,
                     len(listing["files"]), len(listing["classes"]), cache)
      except OSError as e:
        logging.info("image folder %s: %d files; cannot cache the file list at %s (%s)", root,
                     len(listing["files"]), cache, e)
  if not listing["files"]:
    raise DataSourceError(
        f"image folder {str(root)!r} contains no image files (looked for "
        f"{', '.join(IMAGE_EXTENSIONS)} in <path>/<class>/ sub-folders, or directly in <path> "
        "when it has no sub-folders). Check config.data.path.")
  return listing


class FolderSource:
  """Random access over an image folder's sorted file list; records carry the file path (a local
  path or a URL, read by `data.decode_image`).

  Paths are stored as one fixed-width numpy byte array (ImageNet: ~40 MB instead of ~150 MB of
  Python strings), which is what each worker process receives when the pipeline is pickled.
  """

  def __init__(self, root, *, cache_dir: str = ""):
    listing = list_image_folder(root, cache_dir=cache_dir)
    self.root = listing["root"]
    self.layout = listing["layout"]
    self.classes = tuple(listing["classes"])
    self._files = np.array([f.encode("utf-8") for f in listing["files"]])  # [N] bytes
    self._labels = np.asarray(listing["labels"], np.int32)  # [N]

  def __len__(self) -> int:
    return len(self._files)

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, {len(self)} files, layout={self.layout})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    rel = self._files[int(index)].decode("utf-8")
    return {"image": f"{self.root}/{rel}", "label": int(self._labels[int(index)]), "name": rel}


def resolve_folder_root(path, split: str) -> str:
  """`path/<split>` when it exists (ImageNet's train/ and val/), else `path` itself."""
  path = paths.resolve(path)
  candidates = [split] + (["val"] if split == "validation" else [])
  for c in candidates:
    if c and (path / c).is_dir():
      return str(path / c)
  return str(path)


# ------------------------------------------------------------------------------------------------
# TFDS ArrayRecord (e.g. imagenet2012 prepared with `tfds build --file_format=array_record`).
# ------------------------------------------------------------------------------------------------

_TFDS_HOWTO = (
    "Prepare it once with TFDS (TensorFlow is needed for this one-off step only):\n"
    "  pip install tensorflow tensorflow-datasets\n"
    "  # ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <manual_dir>\n"
    "  tfds build {name} --data_dir={data_dir} --file_format=array_record --manual_dir=<manual_dir>\n"
    "then set config.data.path={data_dir}. See docs/data.md.")


class TfdsSource:
  """A prepared TFDS dataset in ArrayRecord format, read with `tfds.data_source`.

  The image feature is read with `SkipDecoding`, so records carry the stored JPEG/PNG bytes and the
  pipeline decodes them with PIL exactly like the image-folder path (the reference's decoder) and
  with the same bad-file policy. Reading needs `tensorflow-datasets` and `array_record` but not
  TensorFlow (verified with tensorflow-datasets 4.9.10: `import tensorflow` never happens).
  """

  def __init__(self, name: str, data_dir: str, split: str):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise DataSourceError(
          f"config.data.source=tfds needs tensorflow-datasets ({e}); pip install "
          "tensorflow-datasets array-record") from e
    # "" = TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets (as preflight.py checks).
    data_dir = (data_dir or os.environ.get("TFDS_DATA_DIR", "")
                or os.path.expanduser("~/tensorflow_datasets"))
    data_path = paths.resolve(data_dir)  # local, or gs://... (TFDS and Orbax use epath too)
    data_dir = str(data_path)
    howto = _TFDS_HOWTO.format(name=name, data_dir=data_dir)
    if not data_path.is_dir():
      raise DataSourceError(f"TFDS data_dir {data_dir!r} does not exist. " + howto)
    dataset_dir = data_path.joinpath(*name.split(":")[0].split("/"))
    if not dataset_dir.is_dir():
      raise DataSourceError(
          f"TFDS dataset {name!r} is not prepared in {data_dir!r} (no {dataset_dir}). " + howto)
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise DataSourceError(f"cannot load TFDS dataset {name!r} from {data_dir!r}: {e}. "
                            + howto) from e
    if not builder.is_prepared():
      raise DataSourceError(
          f"TFDS dataset {name!r} is not prepared in {data_dir!r} ({builder.data_dir} has no "
          "dataset_info.json). " + howto)
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if "array_record" not in file_format:
      raise DataSourceError(
          f"TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}; random access "
          "needs ArrayRecord. Convert it with `tfds convert_format "
          f"--dataset_dir={builder.data_dir} --out_file_format=array_record` or rebuild it with "
          "--file_format=array_record.")
    if split.split("[")[0] not in builder.info.splits:
      raise DataSourceError(f"TFDS dataset {name!r} has no split {split!r}; available: "
                            f"{sorted(builder.info.splits)}. Set config.data.train_split / "
                            "eval_split.")
    features = builder.info.features
    if "image" not in features:
      raise DataSourceError(f"TFDS dataset {name!r} has no 'image' feature ({list(features)}).")
    self.name, self.split = name, split
    self.has_label = "label" in features
    self.has_file_name = "file_name" in features
    self._ds = builder.as_data_source(split=split,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    if paths.is_url(data_dir) and len(self._ds):
      self._check_remote_read(data_dir)

  def _check_remote_read(self, data_dir: str) -> None:
    """Reads one record now, so that an array_record build without support for this URL scheme
    fails at start-up with the fix instead of as a skipped-file storm in the workers."""
    try:
      self._ds[0]
    except RuntimeError as e:  # array_record: "open() failed: No such file or directory; ..."
      import importlib.metadata  # pylint: disable=g-import-not-at-top
      try:
        version = importlib.metadata.version("array-record")
      except importlib.metadata.PackageNotFoundError:
        version = "unknown"
      raise DataSourceError(
          f"cannot read TFDS dataset {self.name!r} from {data_dir!r} ({e}). The ArrayRecord reader "
          f"(array-record {version}) must support this URL scheme: array-record 0.8.6 reads gs:// "
          "itself (pip install -U array-record), older builds only read local files. Otherwise "
          "copy the prepared dataset to a local disk (gcloud storage cp -r) and set "
          "config.data.path to it.") from e

  def __len__(self) -> int:
    return len(self._ds)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = self._ds[int(index)]
    name = rec["file_name"] if self.has_file_name else f"{self.name}/{self.split}[{index}]"
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    return {"image": rec["image"], "label": int(rec["label"]) if self.has_label else -1,
            "name": str(name)}
