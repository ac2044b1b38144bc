"""Every mode on gs:// paths, as on a TPU pod: train -> load_tokenizer -> eval (FID cache reused)
-> stats -> extract -> load_extracted, the official format saved to and loaded from gs://, TFDS
ArrayRecord and image folders read from gs://, and a read-only dataset that is never written to.

gs:// is a local folder behind every library's GCS access (tests/fake_gcs.py): code that goes
through etils.epath lands there, code that calls os.* / open() / np.load on a gs:// string would
create a local `gs:` directory under the current directory instead, which every test looks for.
"""
import os
import shutil
import stat

import numpy as np
import pytest

import fake_gcs
from conftest import tiny_config
import test_data_files as files

BUCKET = "gs://bucket"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The fake bucket root (gs://bucket/x is <root>/bucket/x), with the current directory set to
  an empty folder in which a stray local `gs:` directory would appear."""
  root = str(tmp_path_factory.mktemp("fake_gcs"))
  cwd = tmp_path_factory.mktemp("cwd")
  with pytest.MonkeyPatch.context() as mp:
    fake_gcs.install(root, mp.setattr)
    mp.chdir(cwd)
    yield root
    assert os.listdir(cwd) == [], "a gs:// path was written as a local directory"


def _no_local_gs_dirs():
  assert not os.path.exists("gs:"), "a gs:// path was written as a local directory"


def _read_only_folder(root) -> dict[str, float]:
  """<root>/{train,val}/<class>/*.png from photo crops, made read-only; returns a snapshot
  (relative path -> mtime of every file and folder) to check that nothing was written."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("val", 10)):
    for i in range(n):
      photo = files.photo(("coffee", "chelsea", "astronaut")[i % 3], (48, 40))
      top, left = rng.integers(0, 8, 2)
      files.write_folder(str(root / split / f"c{i % 2}"),
                         {f"{i:02d}.png": files.encode(photo[top:top + 32, left:left + 36], "PNG")})
  snapshot = {}
  for dirpath, _, names in os.walk(root, topdown=False):
    for name in names:
      os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IRGRP)
    os.chmod(dirpath, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
  for dirpath, dirnames, names in os.walk(root):
    for name in dirnames + names:
      path = os.path.join(dirpath, name)
      snapshot[os.path.relpath(path, root)] = os.stat(path).st_mtime
  return snapshot


def _unchanged(root, snapshot):
  now = {}
  for dirpath, dirnames, names in os.walk(root):
    for name in dirnames + names:
      path = os.path.join(dirpath, name)
      now[os.path.relpath(path, root)] = os.stat(path).st_mtime
  assert now == snapshot, "the dataset folder was written to"


def _chain_config(data_root):
  config = tiny_config()
  config.num_train_steps = 2
  config.optim.warmup_steps = 1
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.image_every_steps = 2
  # pixel + entropy: what is tested here is where files go, not the objective
  config.loss.perceptual_weight = config.loss.repa_weight = config.loss.gan_weight = 0.0
  config.data.source, config.data.path = "folder", str(data_root)
  config.data.cache_dir = f"{BUCKET}/cache"  # the file list goes to gs://, not into the data
  config.eval.batch_size = 8
  config.eval.num_images = 8  # one batch: the Inception-v3 at 299 px is most of this test's time
  config.pretrained.allow_random_init = True
  config.latents.split = "validation"
  config.latents.batch_size = 8
  config.latents.num_images = 0
  config.latents.chunk_batches = 1
  return config


def test_train_eval_stats_extract_on_gs_from_a_read_only_folder(gcs, tmp_path, monkeypatch):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from softvq_jax import api, evaluate, latents, train  # pylint: disable=import-outside-toplevel
  # TensorBoard event files are written by TensorFlow's own C++ GCS client, which the fake
  # cannot serve: its writer gets the fake bucket's local folder instead of the gs:// URL.
  create = tf.summary.create_file_writer
  monkeypatch.setattr(tf.summary, "create_file_writer", lambda logdir, *a, **kw: create(
      fake_gcs.local_path(gcs, logdir) if str(logdir).startswith("gs://") else logdir, *a, **kw))
  data_root = tmp_path / "imagenet_like"
  snapshot = _read_only_folder(data_root)
  config = _chain_config(data_root)
  run = f"{BUCKET}/run"

  # 1. Train 2 steps: checkpoints, metrics, images on gs://; the read-only data is never written.
  train.train_and_evaluate(config, run)
  run_dir = fake_gcs.local_path(gcs, run)
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2"]
  assert "recon_00000002.png" in os.listdir(os.path.join(run_dir, "images"))
  assert os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
  assert len(os.listdir(fake_gcs.local_path(gcs, f"{BUCKET}/cache/filelists"))) == 2  # train, val
  _unchanged(data_root, snapshot)

  # 2. load_tokenizer of a gs:// workdir; the official format saved to and loaded from gs://.
  tok = api.load_tokenizer(run)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = np.asarray(tok.encode(x))
  assert z.shape == (2, 8, 16)
  tok.save(f"{BUCKET}/export")
  assert sorted(os.listdir(fake_gcs.local_path(gcs, f"{BUCKET}/export"))) == [
      "config.json", "model.safetensors"]
  np.testing.assert_array_equal(np.asarray(api.load_tokenizer(f"{BUCKET}/export").encode(x)), z)

  # 3. Eval twice: the second run takes the real statistics from the gs:// cache.
  saved = []
  save = evaluate._save_stats  # pylint: disable=protected-access
  monkeypatch.setattr(evaluate, "_save_stats", lambda s, p: (saved.append(p), save(s, p)))
  first = evaluate.evaluate_checkpoint(config, run, None)
  assert len(saved) == 1 and saved[0].startswith(f"{run}/fid_stats/")
  assert os.path.exists(fake_gcs.local_path(gcs, saved[0]))
  second = evaluate.evaluate_checkpoint(config, run, None)
  assert len(saved) == 1, "the cached real statistics were not used"
  assert first["num_images"] == second["num_images"] == 8
  for k in ("rfid_random_inception", "psnr", "ssim", "lpips_random_vgg"):
    assert abs(first[k] - second[k]) <= 1e-9 * max(1.0, abs(first[k])), k
  assert first["checkpoint"] == f"{run}/checkpoints/2"  # the step chosen by process 0
  assert sorted(os.listdir(os.path.join(run_dir, "eval"))) == [
      "eval_validation_8.json", "eval_validation_8.png"]

  # 4. Latent statistics into the gs:// checkpoint, read back by load_tokenizer.
  stats = latents.compute_latent_stats(config, run)
  assert stats["num_images"] == 10
  assert os.path.exists(os.path.join(run_dir, "latent_stats.json"))
  tok = api.load_tokenizer(run)
  assert (tok.config.vq_mean, tok.config.vq_std) == (stats["vq_mean"], stats["vq_std"])

  # 5. Extract tokens to gs:// in 2 chunks, resume after losing one, read them back.
  manifest = latents.extract_tokens(config, run)
  assert manifest["num_examples"] == 10
  chunk_dir = os.path.join(run_dir, "tokens", "p000")
  assert sorted(os.listdir(chunk_dir)) == ["chunk_000000.npz", "chunk_000001.npz"]
  full = latents.load_extracted(f"{run}/tokens")
  os.remove(os.path.join(chunk_dir, "chunk_000001.npz"))
  latents.extract_tokens(config, run)
  again = latents.load_extracted(f"{run}/tokens")
  np.testing.assert_array_equal(full["index"], np.arange(10))
  assert full["tokens"].shape == (10, 8, 16)
  for k in full:
    np.testing.assert_array_equal(again[k], full[k])
  _unchanged(data_root, snapshot)
  _no_local_gs_dirs()


def test_image_folder_on_gs(gcs, monkeypatch):
  from softvq_jax import data, data_sources  # pylint: disable=import-outside-toplevel
  jpg = files.encode(files.photo("coffee", (40, 30)))
  bucket_dir = fake_gcs.local_path(gcs, f"{BUCKET}/images")
  files.write_folder(bucket_dir, {"b/2.jpg": jpg, "b/1.JPEG": jpg, "a/3.png": jpg,
                                  "a/.hidden.jpg": jpg, "a/readme.txt": b"x", "stray.jpg": jpg})
  src = data_sources.FolderSource(f"{BUCKET}/images", cache_dir=f"{BUCKET}/cache2")
  assert [src[i]["name"] for i in range(len(src))] == ["a/3.png", "b/1.JPEG", "b/2.jpg"]
  assert [src[i]["label"] for i in range(len(src))] == [0, 1, 1]
  assert src[0]["image"] == f"{BUCKET}/images/a/3.png"
  # The second listing comes from the gs:// cache, without scanning.
  monkeypatch.setattr(data_sources, "_scan_folder", lambda root: pytest.fail("rescanned"))
  assert len(data_sources.FolderSource(f"{BUCKET}/images", cache_dir=f"{BUCKET}/cache2")) == 3
  cfg = tiny_config().data
  cfg.source, cfg.path, cfg.cache_dir = "folder", f"{BUCKET}/images", f"{BUCKET}/cache2"
  batch = next(data.build_train_pipeline(cfg, image_size=16, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].std() > 0
  _no_local_gs_dirs()


@pytest.fixture(scope="module")
def gcs_tfds(gcs, tmp_path_factory):
  """A TFDS ArrayRecord dataset (3 train / 2 validation JPEGs) prepared locally and copied to
  gs://bucket/tfds; returns the data config that reads it and the JPEG bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  jpgs = [files.encode(files.photo(n, (40, 30))) for n in ("coffee", "chelsea", "rocket")]

  class SoftvqGcsTestImages(tfds.core.GeneratorBasedBuilder):
    """3 train / 2 validation JPEGs."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(3)),
              "validation": self._generate_examples(range(2))}

    def _generate_examples(self, ids):
      for i in ids:
        yield i, {"image": jpgs[i], "label": i}

  local = str(tmp_path_factory.mktemp("tfds"))
  SoftvqGcsTestImages(data_dir=local, file_format="array_record").download_and_prepare()
  shutil.copytree(local, fake_gcs.local_path(gcs, f"{BUCKET}/tfds"))
  cfg = tiny_config().data
  cfg.source, cfg.path, cfg.tfds_name = "tfds", f"{BUCKET}/tfds", "softvq_gcs_test_images"
  return cfg, jpgs


def test_tfds_array_record_from_a_gs_data_dir(gcs_tfds):
  from softvq_jax import data, data_sources  # pylint: disable=import-outside-toplevel
  cfg, jpgs = gcs_tfds
  src = data.make_source(cfg, "train")
  assert isinstance(src, data_sources.TfdsSource) and len(src) == 3
  assert sorted(src[i]["image"] for i in range(3)) == sorted(jpgs)  # the stored bytes
  batch = next(iter(data.build_eval_pipeline(cfg, image_size=16, global_batch_size=2)))
  assert batch["image"].shape == (2, 16, 16, 3) and batch["mask"].all()
  missing = cfg.copy_and_resolve_references()
  missing.path = f"{BUCKET}/no_such_dir"
  with pytest.raises(data.DataSourceError, match="does not exist"):
    data.make_source(missing, "train")
  _no_local_gs_dirs()


def test_a_reader_without_gcs_support_is_a_start_up_error(gcs_tfds, monkeypatch):
  """An array_record build that cannot open gs:// fails when the source is made, with the fix."""
  from array_record.python import array_record_data_source as ards  # pylint: disable=import-outside-toplevel
  from softvq_jax import data  # pylint: disable=import-outside-toplevel

  def local_only(path, *args, **kwargs):
    raise RuntimeError(f"open() failed: No such file or directory; opening {path}")

  monkeypatch.setattr(ards.array_record_module, "ArrayRecordReader", local_only)
  with pytest.raises(data.DataSourceError, match="array-record .* must support this URL scheme"):
    data.make_source(gcs_tfds[0], "train")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_atomic_write_leaves_nothing_behind_on_error(gcs, tmp_path, where):
  from softvq_jax import paths  # pylint: disable=import-outside-toplevel
  target = f"{BUCKET}/atomic/a.json" if where == "gs" else str(tmp_path / "atomic" / "a.json")
  local_dir = os.path.dirname(fake_gcs.local_path(gcs, target) if where == "gs" else target)
  with pytest.raises(RuntimeError, match="disk full"):
    with paths.atomic_write(target, "w") as f:
      f.write("{half")
      raise RuntimeError("disk full")
  assert os.listdir(local_dir) == []
  paths.write_json(target, {"ok": 1})
  assert paths.read_json(target) == {"ok": 1} and os.listdir(local_dir) == ["a.json"]
  if where == "local":  # the default permissions (umask), not a temporary file's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask
