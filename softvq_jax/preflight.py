"""Pre-flight: what a run needs, checked in seconds before anything heavy, reported together.

Why: a real run spends a minute or more building models and compiling before it first touches
the data or the frozen networks' files. Finding the missing pieces one by one at that pace — the
data, then `config.pretrained.lpips`, then `dino`, then `repa_teacher` — costs a user several
failed starts. `run` looks at everything `main` will need for the given mode first:

  * the config (`config_lib.validate`),
  * the data of every split the mode reads (TFDS ArrayRecord files in the TFDS data dir, or the
    image folder at `config.data.path`), by listing files only,
  * every `config.pretrained.*` network the mode needs given the loss weights (a zero weight
    needs none; `allow_random_init` needs none), found at the configured path or in the cache of
    fetched networks,
  * that the workdir (local or gs://) can be written,
  * that the batch sizes divide over the devices and processes (the mesh's batch axes),

and raises one `PreflightError` listing every problem with its fix. When nothing else is wrong and
`config.pretrained.auto_fetch` is set, missing networks are fetched first (`softvq_jax.fetch`);
a fetch that fails (offline, no torch) is reported the same way, with the files and where to put
them. No model is built and nothing is compiled here.
"""
from __future__ import annotations

import glob
import os
import uuid
from typing import Callable, Iterable, Sequence

from softvq_jax import axes, fetch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MESH_AXES = axes.MESH_AXES

# The one-time ImageNet preparation, as README's Training section documents it.
TFDS_BUILD = ("put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) in "
              "$MANUAL_DIR, then `tfds build {name} --data_dir={data_dir} --manual_dir=$MANUAL_DIR "
              "--file_format=array_record` (needs `pip install tensorflow`; once)")
FOLDER_LAYOUT = ("$IMAGENET/train/<class>/<image>.JPEG and $IMAGENET/val/<class>/<image>.JPEG "
                 "(or $IMAGENET/<class>/<image>)")


class PreflightError(Exception):
  """Everything that stops a run from starting; `str()` is the message for the user."""

  def __init__(self, problems: Sequence[str], notes: Sequence[str] = ()):
    self.problems, self.notes = list(problems), list(notes)
    n = len(self.problems)
    head = (f"cannot start: {self.problems[0]}" if n == 1 and not self.notes else
            f"cannot start, {n} problem{'s' * (n != 1)}:")
    lines = [head] if n == 1 and not self.notes else [head] + [f"  - {p}" for p in self.problems]
    lines += self.notes
    super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# What a mode needs.
# ------------------------------------------------------------------------------------------------


def splits_read(config, mode: str) -> list[str]:
  """The data splits `mode` reads (train also reads eval images for its reconstruction grids)."""
  d = config.data
  if mode == "train" and "generator_data" in config:  # generator training (generator_task.py)
    # pre-extracted tokens read no images; online encoding reads the train split (the sample
    # grids are generated, not reconstructed)
    return [d.train_split] if config.generator_data.source == "images" else []
  if mode == "train":
    return list(dict.fromkeys([d.train_split, d.eval_split]))
  if mode == "eval" and "generator" in config:  # gen_eval.py: a split only as its reference
    from softvq_jax import config_lib  # pylint: disable=import-outside-toplevel
    ge = config.get("gen_eval") or config_lib.gen_eval_config()
    return [] if ge.reference else [ge.reference_split]
  if mode in ("eval", "reconstruct"):
    return [d.eval_split]
  if mode in ("stats", "extract"):
    return [config.latents.split]
  return []  # compile: shapes only


def networks_needed(config, mode: str) -> list[str]:
  """`config.pretrained` fields `mode` loads (a term with weight 0 loads no network)."""
  lc = config.loss
  names = []
  if mode == "train" and "generator_data" in config:  # the tokenizer's loss is not trained
    return ["inception"] if config.eval.every_steps > 0 else []  # in-loop gFID
  if mode == "train":
    if lc.perceptual_weight > 0:
      names.append("lpips")
    if lc.gan_weight > 0:
      names.append("dino")
    if lc.repa_weight > 0:
      names.append("repa_teacher")
    if config.eval.every_steps > 0:  # the in-loop evaluation: rFID + LPIPS
      names += ["inception", "lpips"]
  elif mode == "eval" and "generator" in config:  # generation evaluation: Inception only
    names.append("inception")
  elif mode == "eval":
    names += ["inception", "lpips"]
  return list(dict.fromkeys(names))


def batch_sizes(config, mode: str) -> dict[str, int]:
  """{config field: global batch} of the steps `mode` runs."""
  if mode == "train" and "generator_data" in config:
    out = {"batch_size": int(config.batch_size)}
    if config.grad_accum_steps > 1:
      out["batch_size / grad_accum_steps"] = int(config.batch_size) // max(
          int(config.grad_accum_steps), 1)
    return out  # sample.batch_size (grids, in-loop gFID) is per process, checked there
  if mode == "train":
    out = {"batch_size": int(config.batch_size)}
    if config.grad_accum_steps > 1:
      out["batch_size / grad_accum_steps"] = int(config.batch_size) // max(
          int(config.grad_accum_steps), 1)
    if config.eval.every_steps > 0:
      out["eval.batch_size" if config.eval.batch_size else "batch_size"] = int(
          config.eval.batch_size or config.batch_size)
    return out
  if mode == "eval" and "generator" in config:
    return {}  # sample.batch_size is per process, checked by generate.run
  if mode == "eval":
    return {"eval.batch_size" if config.eval.batch_size else "batch_size":
            int(config.eval.batch_size or config.batch_size)}
  if mode in ("stats", "extract"):
    return {"latents.batch_size" if config.latents.batch_size else "batch_size":
            int(config.latents.batch_size or config.batch_size)}
  return {}


# ------------------------------------------------------------------------------------------------
# The checks. Each returns a list of problems (strings naming the config field and the fix).
# ------------------------------------------------------------------------------------------------


def check_config(config, mode: str = "") -> list[str]:
  from softvq_jax import config_lib  # pylint: disable=import-outside-toplevel
  try:
    config_lib.validate(config)
    if mode == "train" and "generator_data" in config:  # generator training: its sections
      config_lib.validate_generator_training(config)
  except ValueError as e:
    return [str(e)]
  return []


def tfds_data_dir(path: str) -> str:
  """config.data.path, else $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
  path = str(path or "") or os.environ.get("TFDS_DATA_DIR", "") or "~/tensorflow_datasets"
  return path if fetch.is_remote(path) else os.path.abspath(os.path.expanduser(path))


def _glob(pattern: str) -> list[str]:
  if fetch.is_remote(pattern):
    from etils import epath  # pylint: disable=import-outside-toplevel
    scheme_root, rest = pattern.split("://", 1)
    bucket, _, sub = rest.partition("/")
    return [os.fspath(p) for p in epath.Path(f"{scheme_root}://{bucket}").glob(sub)]
  return glob.glob(pattern)


def _check_tfds(config, splits: Iterable[str]) -> list[str]:
  d = config.data
  data_dir = tfds_data_dir(d.path)
  full = str(d.tfds_name)
  name, _, version = full.partition(":")
  base = name.split("/")[0]
  where = f"config.data.path={d.path}" if d.path else (
      f"$TFDS_DATA_DIR={data_dir}" if os.environ.get("TFDS_DATA_DIR") else
      f"TFDS's default data dir {data_dir} (config.data.path is empty)")
  version_dir = os.path.join(data_dir, *name.split("/"), version or "*")
  problems = []
  for split in splits:
    for part in str(split).split("+"):
      part = part.split("[")[0].strip()  # "train[:10%]" reads the files of "train"
      pattern = os.path.join(version_dir, f"{base}-{part}.array_record-*")
      if _glob(pattern):
        continue
      tfrecords = _glob(os.path.join(version_dir, f"{base}-{part}.tfrecord-*"))
      if tfrecords:
        problems.append(
            f"config.data.source=tfds: {full} split {part!r} in {os.path.dirname(tfrecords[0])} "
            "is stored as TFRecord; random access needs ArrayRecord: `tfds convert_format "
            f"--dataset_dir={os.path.dirname(tfrecords[0])} --out_file_format=array_record`")
        continue
      build = TFDS_BUILD.format(name=name, data_dir=data_dir)
      problems.append(
          f"config.data.source=tfds: {full} (split {part!r}) is not prepared in {where}: no "
          f"{pattern}. Prepare ImageNet once: {build}"
          + ("" if d.path else f", then run with --config.data.path={data_dir}") +
          ". Or read an image folder: --config.data.source=folder "
          f"--config.data.path=$IMAGENET with {FOLDER_LAYOUT}.")
      return problems  # one message per dataset is enough
  return problems


def _has_images(root: str, max_entries: int = 2000) -> bool:
  """An image file in `root` or in one of its first sub-folders (a sample, not a full scan)."""
  subdirs = []
  with os.scandir(root) as it:
    for i, entry in enumerate(it):
      if i >= max_entries:
        break
      if entry.is_dir():
        subdirs.append(entry.path)
      elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith("."):
        return True
  for sub in sorted(subdirs)[:3]:
    if _has_images(sub, max_entries):
      return True
  return False


def _check_folder(config, splits: Iterable[str]) -> list[str]:
  path = str(config.data.path or "")
  if not path:
    return [f"config.data.source=folder needs config.data.path=<image folder root>: {FOLDER_LAYOUT}"]
  if fetch.is_remote(path):
    return []  # read through epath by the data pipeline; listed there
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(root):
    what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
    return [f"config.data.path={path} {what}; an image folder is laid out as {FOLDER_LAYOUT} "
            "(or use --config.data.source=tfds for ImageNet prepared with TFDS)"]
  problems = []
  for split in splits:
    candidates = [split] + (["val"] if split == "validation" else [])
    split_root = next((os.path.join(root, c) for c in candidates
                       if os.path.isdir(os.path.join(root, c))), root)
    try:
      ok = _has_images(split_root)
    except OSError as e:
      problems.append(f"config.data.path={path}: cannot read {split_root} ({e})")
      continue
    if not ok:
      problems.append(f"config.data.path={path}: no image files in {split_root} (split "
                      f"{split!r}; extensions {' '.join(IMAGE_EXTENSIONS)}); expected {FOLDER_LAYOUT}")
  return problems


def check_data(config, mode: str) -> list[str]:
  splits = splits_read(config, mode)
  if not splits or config.data.source == "demo":
    return []
  if config.data.source == "tfds":
    return _check_tfds(config, splits)
  if config.data.source == "folder":
    return _check_folder(config, splits)
  return []  # an unknown source is a validation error, reported by check_config


def check_workdir(workdir: str) -> list[str]:
  """Creates the workdir and writes + deletes a probe file in it (local or gs://)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  try:
    path = epath.Path(workdir if fetch.is_remote(workdir) else
                      os.path.abspath(os.path.expanduser(workdir)))
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".softvq_write_probe_{uuid.uuid4().hex[:8]}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # any failure means: cannot write there
    return [f"--workdir={workdir} is not writable ({type(e).__name__}: {e}); choose a directory "
            "you can write (local or gs://) or fix its permissions"]
  return []


def _resolve_mesh(mesh_shape, num_devices: int) -> tuple[int, ...] | str:
  try:
    return axes.resolve_mesh_shape(mesh_shape, num_devices)
  except ValueError as e:
    return str(e)


def check_devices(config, mode: str, num_devices: int, num_processes: int) -> list[str]:
  """Batch sizes vs the mesh's batch axes (data x fsdp) and the processes."""
  if mode == "compile":
    return []  # planned for --target, not for this machine
  mesh = _resolve_mesh(config.mesh_shape, num_devices)
  if isinstance(mesh, str):
    return [mesh]
  shards = mesh[0] * mesh[1]
  problems = []
  for field, size in batch_sizes(config, mode).items():
    if size <= 0:
      continue  # a validation error
    if size % shards:
      lo, hi = size // shards * shards, -(-size // shards) * shards
      fix = f"{lo} or {hi}" if lo else f"{hi}"
      problems.append(
          f"config.{field}={size} is not divisible by the {shards} devices that split the batch "
          f"(mesh {dict(zip(MESH_AXES, mesh))}, axes data x fsdp on {num_devices} devices); use a "
          f"multiple of {shards}, e.g. --config.{field.split(' ')[0]}={fix}")
    elif size % num_processes:
      problems.append(f"config.{field}={size} is not divisible by the {num_processes} processes")
  return problems


def check_pretrained(config, mode: str) -> tuple[list[str], list[str]]:
  """(problems, fetchable): configured files that do not exist; needed networks that are neither
  configured nor cached (fetchable when auto_fetch is set, else problems)."""
  pc = config.pretrained
  problems, fetchable = [], []
  cache_dir = fetch.cache_dir_of(pc)
  for name in networks_needed(config, mode):
    path = str(pc[name] or "")
    if path:
      if not os.path.exists(os.path.expanduser(path)):
        problems.append(f"config.pretrained.{name}={path} does not exist (the "
                        f"{fetch.NETWORKS[name].title} weights); fix the path, or leave it empty "
                        "to use the fetched file (python -m softvq_jax.pretrained fetch "
                        f"--only={name})")
      continue
    if pc.allow_random_init:
      continue
    try:
      if fetch.cached(name, cache_dir):
        continue
    except Exception as e:  # pylint: disable=broad-except  # an unreadable (remote) cache
      problems.append(f"config.pretrained.cache_dir={cache_dir}: cannot read it ({e})")
      continue
    if pc.get("auto_fetch", False):
      fetchable.append(name)
    else:
      problems.append(
          f"config.pretrained.{name} is empty and {fetch.cache_file(name, cache_dir)} is not "
          f"there ({fetch.NETWORKS[name].title}): run `python -m softvq_jax.pretrained fetch "
          f"--only={name}`" + (f" --cache_dir={pc.cache_dir}" if pc.get("cache_dir") else "") +
          f", or set --config.pretrained.{name}=PATH, or --config.pretrained.auto_fetch=True")
  return problems, fetchable


def _device_counts(num_devices, num_processes) -> tuple[int, int]:
  """jax's global device / process counts, without the INFO line about backends that are absent
  ("Unable to initialize backend 'tpu'"), which reads like an error in front of the report."""
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  logger = std_logging.getLogger("jax._src.xla_bridge")
  level = logger.level
  logger.setLevel(max(level, std_logging.WARNING))
  try:
    return (jax.device_count() if num_devices is None else num_devices,
            jax.process_count() if num_processes is None else num_processes)
  finally:
    logger.setLevel(level)


def run(config, workdir: str, mode: str, *, num_devices: int | None = None,
        num_processes: int | None = None, fetch_missing: bool = True,
        report: Callable[[str], None] | None = None) -> None:
  """All checks for `mode`; fetches missing networks when that is the only thing missing.

  Raises PreflightError with every problem. num_devices / num_processes default to jax's global
  counts (call after jax.distributed.initialize on multi-host jobs).
  """
  if report is None:
    from absl import logging  # pylint: disable=import-outside-toplevel
    report = logging.info
  problems = check_config(config, mode)
  problems += check_data(config, mode)
  pretrained_problems, fetchable = check_pretrained(config, mode)
  problems += pretrained_problems
  problems += check_workdir(workdir)
  if mode != "compile":
    if num_devices is None or num_processes is None:
      num_devices, num_processes = _device_counts(num_devices, num_processes)
    problems += check_devices(config, mode, num_devices, num_processes)
  cache_dir = fetch.cache_dir_of(config.pretrained)
  if problems:
    notes = []
    if fetchable:
      notes.append(
          "Once these are fixed, the next run downloads (config.pretrained.auto_fetch) "
          + ", ".join(f"{n} ({fetch.NETWORKS[n].title})" for n in fetchable)
          + f" into {cache_dir}; or fetch them now: python -m softvq_jax.pretrained fetch --only="
          + ",".join(fetchable))
    raise PreflightError(problems, notes)
  if fetchable:
    if not fetch_missing:
      raise PreflightError([f"config.pretrained.{n} is not in the cache {cache_dir}"
                            for n in fetchable])
    report(f"fetching the frozen networks this run needs into {cache_dir}: {', '.join(fetchable)} "
           "(once; config.pretrained.auto_fetch)")
    try:
      fetch.fetch(fetchable, cache_dir, report=report)
    except fetch.FetchError as e:
      raise PreflightError([f"fetching {', '.join(fetchable)} failed: {e}"]) from None
