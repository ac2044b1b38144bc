"""Image grids for humans: inputs next to reconstructions, written as PNG (and later TensorBoard)."""
from __future__ import annotations

import io

from etils import epath
import numpy as np
from PIL import Image


def image_grid(rows: list, pad: int = 2) -> np.ndarray:
  """rows: equally shaped [B, H, W, 3] uint8 arrays -> one [R*(H+pad), B*(W+pad), 3] uint8 grid.

  Row r shows batch r (e.g. row 0 the inputs, row 1 their reconstructions).
  """
  b, h, w, _ = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, 3), 255, np.uint8)
  for r, imgs in enumerate(rows):
    for i in range(b):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      grid[y:y + h, x:x + w] = imgs[i]
  return grid


def save_png(path, image: np.ndarray) -> None:
  """Writes a PNG to a local path or a gs:// URL (epath; PIL itself only knows local files)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  path.write_bytes(buf.getvalue())
