"""Input pipeline: determinism, sharding, exact resume, bad files, reference parity, TFDS, devices."""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import require
from softvq_jax import config_lib
from softvq_jax import data
from softvq_jax import pixels
from softvq_jax import data_sources
import test_data_files as files


def _cfg(**overrides):
  c = config_lib.data_config()
  c.source = "demo"  # the default is ImageNet (TFDS), which tests do not have
  c.num_threads = 2
  c.read_buffer_size = 8
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Determinism, sharding, epochs.
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
  cfg = _cfg(demo_train_size=40)
  kw = dict(image_size=32, global_batch_size=8)
  a = _take(data.build_train_pipeline(cfg, seed=3, **kw), 3)
  b = _take(data.build_train_pipeline(cfg, seed=3, **kw), 3)
  c = _take(data.build_train_pipeline(cfg, seed=4, **kw), 3)
  _assert_same_batches(a, b)
  assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].dtype == np.int32 and a[0]["index"].dtype == np.int32
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  # Real photo content, not blank: every image has texture.
  assert all(x["image"].reshape(8, -1).std(axis=1).min() > 5 for x in a)


def test_process_shards_are_disjoint_and_cover_each_epoch_in_a_new_order():
  n, procs, local_bs, size = 48, 3, 4, 32
  cfg = _cfg(demo_train_size=n)
  per_proc_epochs = []
  for p in range(procs):
    it = data.build_train_pipeline(cfg, image_size=size, global_batch_size=local_bs * procs,
                                   seed=0, process_index=p, process_count=procs)
    steps = n // procs // local_bs  # batches per epoch per process (= 4)
    idx = np.concatenate([b["index"] for b in _take(it, 2 * steps)])
    per_proc_epochs.append((idx[: n // procs], idx[n // procs:]))
  for epoch in (0, 1):
    shards = [set(e[epoch].tolist()) for e in per_proc_epochs]
    for p, s in enumerate(shards):
      assert len(s) == n // procs  # each record once per epoch
      assert s == set(range(p, n, procs))  # this process's records only
    assert set().union(*shards) == set(range(n))
  for e0, e1 in per_proc_epochs:
    assert sorted(e0.tolist()) == sorted(e1.tolist()) and e0.tolist() != e1.tolist()


def test_augmentation_depends_on_record_and_epoch_not_on_sharding():
  """The same record in the same epoch gets the same crop/flip with 1 or 2 processes."""
  cfg = _cfg(demo_train_size=16)
  one = _take(data.build_train_pipeline(cfg, image_size=32, global_batch_size=16, seed=1), 1)[0]
  two = _take(data.build_train_pipeline(cfg, image_size=32, global_batch_size=16, seed=1,
                                        process_index=1, process_count=2), 1)[0]
  pos = {int(i): k for k, i in enumerate(one["index"])}
  for k, i in enumerate(two["index"]):
    np.testing.assert_array_equal(two["image"][k], one["image"][pos[int(i)]])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_exact_next_batch_across_epochs(num_workers):
  cfg = _cfg(demo_train_size=20, num_workers=num_workers)
  kw = dict(image_size=32, global_batch_size=6, seed=7)
  n_before, n_after = 4, 5  # 24 + 30 records: crosses the 20-record epoch boundaries
  ref = data.build_train_pipeline(cfg, **kw)
  expected = _take(ref, n_before + n_after)
  ref.close()

  it = data.build_train_pipeline(cfg, **kw)
  _assert_same_batches(_take(it, n_before), expected[:n_before])
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  it.close()
  assert len(json.dumps(state)) < 2000

  resumed = data.build_train_pipeline(cfg, **kw)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, n_after), expected[n_before:])
  resumed.close()
  if num_workers:  # a state from W workers cannot silently drive an in-process pipeline
    with pytest.raises(ValueError, match="num_workers"):
      data.build_train_pipeline(_cfg(demo_train_size=20), **kw).set_state(state)


def test_orbax_grain_checkpoint_handler_roundtrip(tmp_path):
  from etils import epath
  import grain
  cfg = _cfg(demo_train_size=24)
  kw = dict(image_size=32, global_batch_size=4, seed=0)
  expected = _take(data.build_train_pipeline(cfg, **kw), 5)
  it = data.build_train_pipeline(cfg, **kw)
  _take(it, 3)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  restored = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(
      data.build_train_pipeline(cfg, **kw)))
  _assert_same_batches(_take(restored, 2), expected[3:])


def test_eval_pass_is_finite_sharded_padded_and_masked():
  n, procs, size = 21, 2, 32
  cfg = _cfg(demo_eval_size=n)
  seen = []
  for p in range(procs):
    ev = data.build_eval_pipeline(cfg, image_size=size, global_batch_size=8, process_index=p,
                                  process_count=procs)
    batches = list(ev)
    assert len(batches) == ev.num_batches == math.ceil(math.ceil(n / procs) / 4)
    for b in batches:
      assert b["image"].shape == (4, size, size, 3) and b["mask"].dtype == np.bool_
      assert (b["index"][~b["mask"]] == -1).all() and (b["image"][~b["mask"]] == 0).all()
    idx = np.concatenate([b["index"][b["mask"]] for b in batches])
    assert idx.tolist() == list(range(p, n, procs))  # in order, this process's share
    seen += idx.tolist()
  assert sorted(seen) == list(range(n))
  # Deterministic: centre crops, no randomness.
  a = list(data.build_eval_pipeline(cfg, image_size=size, global_batch_size=8))
  b = list(data.build_eval_pipeline(cfg, image_size=size, global_batch_size=8))
  _assert_same_batches(a, b)


def test_float32_output_is_the_scaled_uint8_output():
  kw = dict(image_size=32, global_batch_size=4, seed=0)
  u8 = next(data.build_train_pipeline(_cfg(demo_train_size=8), **kw))["image"]
  f32 = next(data.build_train_pipeline(_cfg(demo_train_size=8, output_dtype="float32"),
                                       **kw))["image"]
  assert f32.dtype == np.float32 and f32.min() >= -1 and f32.max() <= 1
  np.testing.assert_array_equal(f32, pixels.to_model_range(u8))
  import jax
  # XLA turns x / 255 into x * (1 / 255): equal up to 1 ulp.
  np.testing.assert_allclose(np.asarray(jax.jit(pixels.to_model_range)(u8)), f32, rtol=0, atol=2e-7)
  np.testing.assert_array_equal(np.asarray(pixels.to_model_range(f32)), f32)


def test_demo_source_is_deterministic_real_photos():
  a, b = data_sources.DemoSource(50, "train"), data_sources.DemoSource(50, "train")
  ev = data_sources.DemoSource(50, "validation")
  assert [a.crop_box(i) for i in range(50)] == [b.crop_box(i) for i in range(50)]
  assert [a.crop_box(i) for i in range(50)] != [ev.crop_box(i) for i in range(50)]
  names = {a.crop_box(i)[0] for i in range(50)}
  assert names == set(data_sources.DEMO_IMAGES)
  rec = a[0]
  assert rec["image"].dtype == np.uint8 and min(rec["image"].shape[:2]) >= 8


# ------------------------------------------------------------------------------------------------
# Bad files and start-up errors.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
  base = files.photo("chelsea", (120, 80))
  contents = files.dirty_files(base)
  root = str(tmp_path_factory.mktemp("dirty"))
  files.write_folder(root, {f"cls/{k}": v for k, (v, _) in contents.items()})
  return root, base, contents


def test_each_bad_file_kind_decodes_correctly_or_raises_bad_image(dirty):
  root, base, contents = dirty
  gray = np.asarray(Image.fromarray(base).convert("L"))
  for name, (content, ok) in contents.items():
    path = os.path.join(root, "cls", name)
    if not ok:
      with pytest.raises(data.BadImageError):
        data.decode_image(path)
      with pytest.raises(data.BadImageError):
        data.decode_image(content)
      continue
    img = data.decode_image(path)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8, name
    if name in ("gray.png", "gray16.png"):
      for c in range(3):
        np.testing.assert_array_equal(arr[..., c], gray, err_msg=name)  # 16-bit: high byte
    elif name in ("rgba.png", "rgb16.png"):
      np.testing.assert_array_equal(arr, base, err_msg=name)
    elif name == "tiny.png":
      assert arr.shape == (7, 5, 3)
    else:  # lossy: JPEG, CMYK JPEG, palette quantisation
      assert arr.shape == base.shape and np.abs(arr.astype(int) - base).mean() < 12, name
  # Every such file also survives the train transform at a size larger than itself.
  for name in ("tiny.png", "gray16.png", "cmyk.jpg"):
    out, _ = data.random_crop_arr(data.decode_image(os.path.join(root, "cls", name)), 64,
                                  np.random.default_rng(0))
    assert out.shape == (64, 64, 3)


def test_folder_pipeline_skips_and_reports_bad_files(dirty, caplog, tmp_path):
  root, _, contents = dirty
  n_bad = sum(not ok for _, ok in contents.values())
  n = len(contents)
  cfg = _cfg(source="folder", path=root, cache_dir=str(tmp_path))
  good_per_epoch = n - n_bad
  it = data.build_train_pipeline(cfg, image_size=32, global_batch_size=good_per_epoch, seed=0)
  src = data.make_source(cfg, "train")
  names = [src[i]["name"] for i in range(n)]
  with caplog.at_level("WARNING"):
    b1 = next(it)
    b2 = next(it)
  got = {names[i].split("/")[-1] for i in b1["index"]}
  assert got == {k for k, (_, ok) in contents.items() if ok}  # one epoch: all good files, once
  # Epoch 0's bad files are all counted; some of epoch 1's may be, before its 9th good file.
  assert n_bad <= it.skipped.count <= 2 * n_bad
  assert b2["image"].shape == (good_per_epoch, 32, 32, 3)
  summary = it.skipped_summary()
  assert summary.startswith(f"skipped {it.skipped.count} bad image files")
  assert "truncated.jpg" in summary or "corrupt.jpeg" in summary or "empty.jpg" in summary
  assert any("skipped" in r.getMessage() for r in caplog.records)
  state = it.get_state()
  assert state["skipped"] == it.skipped.count and state["skipped_examples"]
  # Eval: bad files become masked slots, counted as skipped.
  ev = data.build_eval_pipeline(cfg, image_size=32, global_batch_size=4, split="train")
  batches = list(ev)
  assert sum(int(b["mask"].sum()) for b in batches) == good_per_epoch
  assert ev.skipped.count == n_bad


def test_all_bad_stream_fails_with_clear_error(tmp_path):
  files.write_folder(str(tmp_path / "c"), {f"x{i}.jpg": b"" for i in range(5)})
  it = data.build_train_pipeline(_cfg(source="folder", path=str(tmp_path)), image_size=32,
                                 global_batch_size=2, seed=0)
  with pytest.raises(RuntimeError, match="consecutive images could not be decoded"):
    next(it)


def test_startup_errors_say_what_to_do(tmp_path):
  kw = dict(image_size=32, global_batch_size=2, seed=0)
  with pytest.raises(data.DataSourceError, match="does not exist.*config.data.path"):
    data.build_train_pipeline(_cfg(source="folder", path=str(tmp_path / "nope")), **kw)
  with pytest.raises(data.DataSourceError, match="needs config.data.path"):
    data.build_train_pipeline(_cfg(source="folder", path=""), **kw)
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
  with pytest.raises(data.DataSourceError, match="contains no image files"):
    data.build_train_pipeline(_cfg(source="folder", path=str(tmp_path / "empty")), **kw)
  with pytest.raises(data.DataSourceError, match="tfds build imagenet2012 .*array_record"):
    data.build_train_pipeline(_cfg(source="tfds", path=str(tmp_path)), **kw)
  with pytest.raises(data.DataSourceError, match="does not exist"):
    data.build_train_pipeline(_cfg(source="tfds", path=str(tmp_path / "nope")), **kw)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    data.build_train_pipeline(_cfg(), image_size=32, global_batch_size=4, seed=0,
                              process_index=0, process_count=3)


def test_folder_layouts_labels_and_cached_file_list(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  jpg = files.encode(files.photo("coffee", (40, 30)))
  root = tmp_path / "classes"
  files.write_folder(str(root), {"b/2.jpg": jpg, "b/1.JPEG": jpg, "a/sub/3.png": jpg,
                                 "a/.hidden.jpg": jpg, "a/readme.txt": b"x"})
  before = sorted(str(p) for p in root.rglob("*"))
  src = data_sources.FolderSource(str(root))
  assert [src[i]["name"] for i in range(len(src))] == ["a/sub/3.png", "b/1.JPEG", "b/2.jpg"]
  assert [src[i]["label"] for i in range(len(src))] == [0, 1, 1]
  assert src.classes == ("a", "b")
  # The list is cached in the user's cache directory, never inside the (maybe read-only) data.
  cache = data_sources.filelist_cache_path(root)
  assert str(cache).startswith(str(tmp_path / "xdg" / "softvq_jax" / "filelists"))
  assert cache.exists() and sorted(str(p) for p in root.rglob("*")) == before
  # Cached list is reused; adding a file changes the class folder's mtime and forces a rescan.
  with monkeypatch.context() as m:
    m.setattr(data_sources, "_scan_folder", lambda r: pytest.fail("rescanned"))
    assert len(data_sources.FolderSource(str(root))) == 3
  (root / "b" / "0.jpg").write_bytes(jpg)
  os.utime(root / "b", (1, 1))
  src = data_sources.FolderSource(str(root))
  assert [src[i]["name"] for i in range(len(src))] == [
      "a/sub/3.png", "b/0.jpg", "b/1.JPEG", "b/2.jpg"]
  flat = tmp_path / "flat"
  files.write_folder(str(flat), {"z.jpg": jpg, "y.png": jpg})
  src = data_sources.FolderSource(str(flat), cache_dir=str(tmp_path / "cache"))
  assert [src[i]["name"] for i in range(len(src))] == ["y.png", "z.jpg"]
  assert [src[i]["label"] for i in range(len(src))] == [-1, -1]
  assert os.listdir(tmp_path / "cache")
  # <path>/train and <path>/val are picked by split name.
  files.write_folder(str(tmp_path / "inet"), {"train/c/1.jpg": jpg, "val/c/2.jpg": jpg})
  cfg = _cfg(source="folder", path=str(tmp_path / "inet"))
  assert data.make_source(cfg, "train")[0]["name"] == "c/1.jpg"
  assert data.make_source(cfg, "validation")[0]["name"] == "c/2.jpg"


# ------------------------------------------------------------------------------------------------
# Parity with the reference transforms (ADM random_crop_arr / center_crop_arr + torchvision).
# ------------------------------------------------------------------------------------------------


class _NumpyRandom:
  """`random.randrange` and `torch.rand(1) < p` interfaces over the pipeline's generator."""

  def __init__(self, rng):
    self.rng = rng

  def randrange(self, a, b=None):
    return int(self.rng.integers(0, a) if b is None else self.rng.integers(a, b))


def _ref_random_crop_arr(pil_image, image_size, rnd, min_crop_frac=0.8, max_crop_frac=1.0):
  """ADM's random_crop_arr, verbatim except that `random` is a parameter."""
  min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
  max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
  smaller_dim_size = rnd.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
  while min(*pil_image.size) >= 2 * smaller_dim_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = smaller_dim_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = rnd.randrange(arr.shape[0] - image_size + 1)
  crop_x = rnd.randrange(arr.shape[1] - image_size + 1)
  return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _ref_center_crop_arr(pil_image, image_size):
  """ADM's center_crop_arr, verbatim."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _ref_train(pil_image, image_size, rng):
  """The reference's train Compose: random_crop_arr, RandomHorizontalFlip, ToTensor, Normalize."""
  tf = require("torchvision.transforms.functional")
  torch = require("torch")
  rnd = _NumpyRandom(rng)
  arr = _ref_random_crop_arr(pil_image, image_size, rnd)
  img = Image.fromarray(arr)
  if rng.random() < 0.5:  # RandomHorizontalFlip's `torch.rand(1) < p`, same draw order
    img = tf.hflip(img)
  x = tf.normalize(tf.to_tensor(img), [0.5] * 3, [0.5] * 3)  # [3, S, S] float32
  return x.permute(1, 2, 0).numpy(), torch


def _ref_eval(pil_image, image_size):
  tf = require("torchvision.transforms.functional")
  img = Image.fromarray(_ref_center_crop_arr(pil_image, image_size))
  return tf.normalize(tf.to_tensor(img), [0.5] * 3, [0.5] * 3).permute(1, 2, 0).numpy()


_PARITY_IMAGES = [("astronaut", None), ("coffee", None), ("retina", None),  # retina: BOX halving
                  ("chelsea", (150, 97))]  # smaller than the crop: upsampled


@pytest.mark.parametrize("image_size", [256, 512])
def test_train_and_eval_transforms_match_reference_exactly(image_size):
  for name, size in _PARITY_IMAGES:
    pil = Image.fromarray(files.photo(name, size))
    for trial in range(3):
      ours, params = data.random_crop_arr(pil, image_size, np.random.default_rng((trial, 9)))
      ref, _ = _ref_train(pil, image_size, np.random.default_rng((trial, 9)))
      lo, hi = data.train_short_side_range(image_size)
      assert lo <= params.short_side <= hi
      np.testing.assert_array_equal(pixels.to_model_range(ours), ref,
                                    err_msg=f"{name} {params}")
    np.testing.assert_array_equal(
        pixels.to_model_range(data.center_crop_arr(pil, image_size)),
        _ref_eval(pil, image_size), err_msg=name)


def test_train_transform_draw_distribution():
  """m uniform over [S, ceil(S / 0.8)], offsets over the full range, flip with p = 0.5."""
  pil = Image.fromarray(files.photo("coffee", (120, 80)))
  s = 32
  draws = [data.random_crop_arr(pil, s, np.random.default_rng(i))[1] for i in range(600)]
  ms = [d.short_side for d in draws]
  assert set(ms) == set(range(s, math.ceil(s / 0.8) + 1))
  assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
  assert min(d.top for d in draws) == 0 and min(d.left for d in draws) == 0
  widest = [d for d in draws if d.short_side == max(ms)]
  assert max(d.left for d in widest) == round(120 * max(ms) / 80) - s


def test_pipeline_output_equals_reference_on_the_same_draws():
  """End to end: batch images == reference transforms of the decoded record with the rng the
  pipeline documents, np.random.default_rng((seed, epoch, record_index))."""
  cfg = _cfg(demo_train_size=12, output_dtype="float32")
  seed = 5
  it = data.build_train_pipeline(cfg, image_size=64, global_batch_size=6, seed=seed)
  src = data.make_source(cfg, "train")
  for step in range(3):  # 18 records: epoch 0 and the start of epoch 1
    b = next(it)
    for k, i in enumerate(b["index"]):
      epoch = (step * 6 + k) // 12
      pil = data.decode_image(src[int(i)]["image"])
      ref, _ = _ref_train(pil, 64, np.random.default_rng((seed, epoch, int(i))))
      np.testing.assert_array_equal(b["image"][k], ref)


# ------------------------------------------------------------------------------------------------
# TFDS ArrayRecord on a dataset this test builds (TFDS format, no download, no TensorFlow).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # an install requirement (reading needs no TensorFlow)
  photos = [files.photo(n, (96, 72)) for n in ("astronaut", "coffee", "rocket", "cat")]
  records = []
  for i in range(14):
    arr = photos[i % 4][i % 7: i % 7 + 60, (i * 3) % 20: (i * 3) % 20 + 50]
    records.append((files.encode(arr, "JPEG" if i % 2 else "PNG"), i % 4, f"img_{i:03d}.jpg"))
  records[5] = (records[5][0][:200], 1, "img_005_truncated.jpg")

  class SoftvqTestImages(tfds.core.GeneratorBasedBuilder):
    """Tiny image dataset in the imagenet2012 feature layout (image, label, file_name)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=4),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(records[:10]),
              "validation": self._generate_examples(records[10:])}

    def _generate_examples(self, recs):
      # Encoded bytes go in as-is (what `tfds build imagenet2012` stores); numpy images would
      # need TensorFlow to encode.
      for content, label, fname in recs:
        yield fname, {"image": io.BytesIO(content), "label": label, "file_name": fname}

  root = str(tmp_path_factory.mktemp("tfds"))
  SoftvqTestImages(data_dir=root, file_format="array_record").download_and_prepare()
  return root, {fname: (content, label) for content, label, fname in records}


def test_tfds_array_record_source_and_pipeline(tfds_dir):
  root, by_name = tfds_dir
  cfg = _cfg(source="tfds", path=root, tfds_name="softvq_test_images")
  src = data.make_source(cfg, "train")
  assert len(src) == 10 and isinstance(src, data_sources.TfdsSource)
  for i in range(len(src)):
    rec = src[i]
    content, label = by_name[rec["name"]]
    assert rec["image"] == content and rec["label"] == label  # stored bytes, undecoded
  it = data.build_train_pipeline(cfg, image_size=32, global_batch_size=9, seed=0)
  b = next(it)
  assert b["image"].shape == (9, 32, 32, 3)
  assert it.skipped.count == 1 and "img_005_truncated.jpg" in it.skipped_summary()
  bad = next(i for i in range(10) if src[i]["name"] == "img_005_truncated.jpg")
  assert bad not in b["index"].tolist() and len(set(b["index"].tolist())) == 9
  # Each pipeline image is the reference eval transform of the stored bytes.
  ev = data.build_eval_pipeline(cfg, image_size=32, global_batch_size=4)
  batches = list(ev)
  assert len(batches) == 1 and batches[0]["mask"].all()
  val = data.make_source(cfg, "validation")
  for k, i in enumerate(batches[0]["index"]):
    pil = Image.open(io.BytesIO(val[int(i)]["image"])).convert("RGB")
    np.testing.assert_array_equal(batches[0]["image"][k], _ref_center_crop_arr(pil, 32))
  with pytest.raises(data.DataSourceError, match="no split 'test'"):
    data.make_source(cfg, "test")
  with pytest.raises(data.DataSourceError, match="not prepared"):
    data.make_source(_cfg(source="tfds", path=root, tfds_name="imagenet2012"), "train")


# ------------------------------------------------------------------------------------------------
# Host batch -> global arrays on the (data, fsdp) mesh (8 fake CPU devices from conftest).
# ------------------------------------------------------------------------------------------------


def test_make_global_batch_shards_over_data_and_fsdp():
  import jax
  from jax.sharding import Mesh, PartitionSpec
  devices = np.asarray(jax.devices()[:8]).reshape(2, 4)
  mesh = Mesh(devices, ("data", "fsdp"))
  batch = next(data.build_train_pipeline(_cfg(demo_train_size=16), image_size=32,
                                         global_batch_size=8, seed=0))
  g = data.make_global_batch(batch, mesh)
  assert set(g) == {"image", "label", "index"}
  assert g["image"].shape == (8, 32, 32, 3) and g["image"].dtype == np.uint8
  assert g["image"].sharding.spec == PartitionSpec(("data", "fsdp"))
  assert len(g["image"].addressable_shards) == 8
  assert all(s.data.shape == (1, 32, 32, 3) for s in g["image"].addressable_shards)
  np.testing.assert_array_equal(np.asarray(g["image"]), batch["image"])
  x = jax.jit(pixels.to_model_range)(g["image"])
  assert x.dtype == np.float32 and x.sharding.spec == PartitionSpec(("data", "fsdp"))
  # A mesh without an fsdp axis; a batch the mesh cannot split is a clear error.
  g2 = data.make_global_batch(batch, Mesh(np.asarray(jax.devices()[:4]), ("data",)))
  assert g2["label"].sharding.spec == PartitionSpec(("data",))
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    data.make_global_batch({"image": batch["image"][:6]}, mesh)


def test_truncated_files_stay_bad_when_another_library_flips_pil_flag(dirty, monkeypatch):
  """tensorflow_datasets sets PIL's global LOAD_TRUNCATED_IMAGES = True; our decoder must not care."""
  from PIL import ImageFile  # pylint: disable=import-outside-toplevel
  root, _, contents = dirty
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  for name, (_, ok) in contents.items():
    if not ok and name.endswith((".jpg", ".jpeg")):
      with pytest.raises(data.BadImageError):
        data.decode_image(os.path.join(root, "cls", name))
