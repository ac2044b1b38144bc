"""Helpers shared by the benchmarks (no torch import: train_step.py sets OpenMP env before it)."""
from __future__ import annotations

import platform
import time


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


def compiled_memory(compiled) -> dict | None:
  """Bytes XLA plans for one compiled program (arguments, outputs, temporaries): a per-program
  figure that the process-wide allocator peak cannot give, and the only one on the CPU (whose
  backend keeps no allocator statistics). None where the backend offers no analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # optional on some backends
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "alias_size_in_bytes", "temp_size_in_bytes",
                                          "generated_code_size_in_bytes") if hasattr(m, k)}
  # Donated (aliased) arguments are reused for outputs, so they are not counted twice.
  out["total_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                        - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
  return out


def timed_windows(fns: dict, batch: int, repeats: int, window_s: float,
                  pause_s: float = 0.1) -> dict[str, list[float]]:
  """Images/s of each callable in `repeats` windows, interleaved in ABBA order.

  fns: {name: f} where f() runs one call and waits for its result. A window repeats f until
  window_s has passed (at least once) and yields calls * batch / elapsed. pause_s: a sleep before
  each window, so the other framework's spinning worker threads go idle.
  """
  names = list(fns)
  rates = {n: [] for n in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(pause_s)
      calls, t0 = 0, time.perf_counter()
      while True:
        fns[name]()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
          break
      rates[name].append(calls * batch / elapsed)
  return rates
