"""Input-pipeline throughput: decoded + augmented images/s per worker process.

  python benchmarks/input_pipeline.py                       # 256 and 512 px, folder + ArrayRecord
  python benchmarks/input_pipeline.py --sizes 256 --workers 0,4 --seconds 20

Builds an ImageNet-like JPEG set from scikit-image's bundled photographs (long side 500 px for
70% of the files, 250-1200 px for the rest; quality 90; ImageNet's median is 500x375), writes it
as an image folder and as a TFDS ArrayRecord dataset (no TensorFlow needed), then times the real
train pipeline (`data.build_train_dataset`) for each setting and prints one JSON line per setting:

  workers=0: one process, `--threads` decode threads (1 = the cost of one core);
  workers=W: W Grain worker processes with one thread each; `per_worker` = total / W.

Also prints the per-image cost split (decode / BOX+BICUBIC resize / crop) measured in one thread,
which is what a worker spends its time on.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from softvq_jax import config_lib  # noqa: E402
from softvq_jax import data  # noqa: E402
from softvq_jax import data_sources  # noqa: E402

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
           "hubble_deep_field", "retina", "cat")


def imagenet_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
  import skimage.data
  photos = [getattr(skimage.data, p)() for p in _PHOTOS]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    src = photos[i % len(photos)]
    h, w = src.shape[:2]
    aspect = rng.choice([4 / 3, 3 / 4, 3 / 2, 1.0])  # width / height
    ch = int(min(h, w / aspect) * rng.uniform(0.6, 1.0))
    cw = int(min(w, ch * aspect))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(src[top:top + ch, left:left + cw])
    long_side = 500 if rng.random() < 0.7 else int(rng.uniform(250, 1200))
    scale = long_side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def write_folder(root: str, jpegs: list[bytes]) -> None:
  for i, b in enumerate(jpegs):
    d = os.path.join(root, f"n{i % 10:08d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"img_{i:05d}.JPEG"), "wb") as f:
      f.write(b)


def write_array_record(data_dir: str, jpegs: list[bytes]) -> str:
  """A TFDS dataset in imagenet2012's feature layout, stored as ArrayRecord."""
  import tensorflow_datasets as tfds

  class SoftvqBenchImages(tfds.core.GeneratorBasedBuilder):
    """ImageNet-like JPEGs for the input-pipeline benchmark."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=10),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, b in enumerate(jpegs):
        yield i, {"image": io.BytesIO(b), "label": i % 10, "file_name": f"img_{i:05d}.JPEG"}

  SoftvqBenchImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "softvq_bench_images"


def stage_costs(jpegs: list[bytes], size: int, n: int = 64) -> dict[str, float]:
  """Milliseconds per image for decode, resize (BOX halvings + BICUBIC), crop+flip; one thread."""
  t_dec = t_rs = t_crop = 0.0
  rng = np.random.default_rng(0)
  for b in jpegs[:n]:
    t0 = time.perf_counter()
    img = data.decode_image(b)
    t1 = time.perf_counter()
    lo, hi = data.train_short_side_range(size)
    m = int(rng.integers(lo, hi + 1))
    img = data._resize_short_side(data._box_halve(img, m), m)  # pylint: disable=protected-access
    arr = np.asarray(img)
    t2 = time.perf_counter()
    data.apply_train_params(arr, size, 0, 0, True)
    t3 = time.perf_counter()
    t_dec, t_rs, t_crop = t_dec + t1 - t0, t_rs + t2 - t1, t_crop + t3 - t2
  k = 1000.0 / min(n, len(jpegs))
  return {"decode_ms": round(t_dec * k, 2), "resize_ms": round(t_rs * k, 2),
          "crop_flip_ms": round(t_crop * k, 3)}


def measure(cfg, source, size: int, batch: int, seconds: float, repeats: int) -> list[float]:
  """Images/s in `repeats` consecutive windows of `seconds` (the machine may be shared: the
  median is reported, the spread shows the noise)."""
  ds = data.build_train_dataset(cfg, image_size=size, global_batch_size=batch, seed=0,
                                source=source)
  it = iter(ds)
  for _ in range(2):  # worker start-up and buffer fill are not throughput
    next(it)
  rates = []
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      n += next(it)["image"].shape[0]
    rates.append(n / (time.perf_counter() - t0))
  it.close()
  return rates


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="256,512")
  p.add_argument("--workers", default="0,2", help="comma list; 0 = in-process")
  p.add_argument("--threads", type=int, default=1, help="decode threads per process")
  p.add_argument("--sources", default="folder,array_record")
  p.add_argument("--dtypes", default="uint8,float32")
  p.add_argument("--num_images", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seconds", type=float, default=5.0, help="length of one timing window")
  p.add_argument("--repeats", type=int, default=3, help="timing windows (median reported)")
  args = p.parse_args()

  jpegs = imagenet_like_jpegs(args.num_images)
  sizes_px = [Image.open(io.BytesIO(b)).size for b in jpegs]
  print(json.dumps({"dataset": "imagenet-like JPEG q90", "images": len(jpegs),
                    "mean_wh": [round(float(np.mean([s[i] for s in sizes_px]))) for i in (0, 1)],
                    "mean_kb": round(float(np.mean([len(b) for b in jpegs])) / 1024, 1),
                    "cpus": os.cpu_count()}), flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    write_folder(os.path.join(tmp, "folder"), jpegs)
    name = write_array_record(os.path.join(tmp, "tfds"), jpegs) if "array_record" in args.sources else ""
    for size in [int(s) for s in args.sizes.split(",")]:
      print(json.dumps({"image_size": size, "stage_costs_one_thread": stage_costs(jpegs, size)}),
            flush=True)
      for source_name in args.sources.split(","):
        if source_name == "folder":
          source = data_sources.FolderSource(os.path.join(tmp, "folder"), cache_dir=tmp)
        else:
          source = data_sources.TfdsSource(name, os.path.join(tmp, "tfds"), "train")
        for dtype in args.dtypes.split(","):
          for workers in [int(w) for w in args.workers.split(",")]:
            cfg = config_lib.data_config()
            cfg.num_workers, cfg.num_threads, cfg.output_dtype = workers, args.threads, dtype
            rates = measure(cfg, source, size, args.batch, args.seconds, args.repeats)
            rate = float(np.median(rates))
            print(json.dumps({
                "source": source_name, "image_size": size, "output_dtype": dtype,
                "num_workers": workers, "threads_per_process": args.threads,
                "images_per_s": round(rate, 1),
                "images_per_s_per_worker": round(rate / max(workers, 1), 1),
                "windows": [round(r, 1) for r in rates]}), flush=True)


if __name__ == "__main__":
  main()
