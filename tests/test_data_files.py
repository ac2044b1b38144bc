"""Test helpers (no tests here): real-photo crops and every kind of dirty image file, on disk."""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image
import skimage.data


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> np.ndarray:
  """A bundled photograph ([H, W, 3] uint8), optionally resized (w, h) to keep tests small."""
  arr = getattr(skimage.data, name)()
  if size is not None:
    arr = np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))
  return arr


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt, **kw)
  return buf.getvalue()


def png_rgb16(arr16: np.ndarray) -> bytes:
  """A 16-bit-per-channel RGB PNG ([H, W, 3] uint16), written by hand: PIL cannot write one."""
  h, w, _ = arr16.shape
  raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
          + chunk(b"IEND", b""))


def dirty_files(base: np.ndarray) -> dict[str, tuple[bytes, bool]]:
  """file name -> (content, decodable). `base` is an [H, W, 3] uint8 photo crop."""
  jpeg = encode(base, "JPEG", quality=90)
  gray = np.asarray(Image.fromarray(base).convert("L"))
  corrupt = bytearray(jpeg)
  # Garbage in the scan data, and no end marker. The garbage is fixed and free of 0xFF: with
  # random bytes (os.urandom before) a 0xFF starts a marker that ends the scan early, and PIL then
  # decodes the file without error in 22 of 300 draws (measured; seen in CI as corrupt.jpeg
  # accepted as a good file). Without 0xFF none of 300 draws decodes.
  garbage = np.random.default_rng(0).integers(0, 0xFF, 400, dtype=np.uint8).tobytes()
  corrupt[len(jpeg) // 3: len(jpeg) // 3 + 400] = garbage
  corrupt = bytes(corrupt[:len(jpeg) // 2])
  rgba = np.concatenate([base, np.full(base.shape[:2] + (1,), 128, np.uint8)], -1)
  gray16 = (gray.astype(np.uint16) << 8) | 0x5A
  rgb16 = (base.astype(np.uint16) << 8) | 0x33
  return {
      "good.jpg": (jpeg, True),
      "truncated.jpg": (jpeg[: len(jpeg) * 2 // 3], False),
      "corrupt.jpeg": (corrupt, False),
      "empty.jpg": (b"", False),
      "not_an_image.png": (b"this is a text file, not a PNG\n" * 20, False),
      "html_page.JPEG": (b"<html><body>404 Not Found</body></html>", False),
      "gray.png": (encode(gray, "PNG"), True),
      "cmyk.jpg": (_save(Image.fromarray(base).convert("CMYK"), "JPEG"), True),
      "rgba.png": (encode(rgba, "PNG"), True),
      "palette.png": (_save(Image.fromarray(base).convert("P", palette=Image.ADAPTIVE), "PNG"),
                      True),
      "gray16.png": (encode(gray16, "PNG"), True),
      "rgb16.png": (png_rgb16(rgb16), True),
      "tiny.png": (encode(base[:7, :5], "PNG"), True),  # smaller than any crop: upsampled
  }


def _save(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def write_folder(root: str, files: dict[str, bytes]) -> None:
  os.makedirs(root, exist_ok=True)
  for name, content in files.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(content)
