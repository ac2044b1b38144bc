"""Helpers shared by the benchmarks (no torch import: train_step.py sets OpenMP env before it)."""
from __future__ import annotations

import platform


def model_name(config) -> str:
  """E.g. "SoftVQ-BL-64" from config.model (non-released sizes as "SoftVQ-mini/mini-32")."""
  m = config.model
  if m.encoder_size not in ("B", "L") or m.decoder_size not in ("B", "L"):
    return f"SoftVQ-{m.encoder_size}/{m.decoder_size}-{m.num_latent_tokens}"
  size = m.encoder_size if m.encoder_size == m.decoder_size else m.encoder_size + m.decoder_size
  return f"SoftVQ-{size}-{m.num_latent_tokens}"


def cpu_model() -> str:
  """The CPU's marketing name (for the JSON records in BENCHMARKS.md)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
