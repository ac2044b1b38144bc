"""The one table of accelerator chips: memory and dense bf16 peak FLOP/s per device.

Used for MFU in the training loop (`peak_flops_per_device`, matched on `jax.Device.device_kind`)
and for memory planning (softvq_jax/compile_plan.py: `--target=v5e-64`, `8xH100`). MFU is always
stated against these bf16 numbers (a chip running float32 matmuls has a lower peak).
"""
from __future__ import annotations

import dataclasses

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind (= one JAX device)."""
  name: str                       # as in a compile target: "H100", "v5e"
  platform: str                   # "gpu" | "tpu"
  device_kinds: tuple[str, ...]   # `jax.Device.device_kind` prefixes that are this chip
  hbm_bytes: float                # per device
  peak_flops: float               # dense bf16 per device
  tpu_dims: int = 0               # TPU torus dimensions (0: not a TPU compile target)
  chip_config: str | None = None  # libtpu chip config
  name_counts_cores: bool = False  # TPU slice names count TensorCores (2 per chip), not chips


# GPUs: HBM as sold (decimal GB) and the dense bf16 tensor-core peak of the SXM parts.
CHIPS = (
    Chip("H200", "gpu", ("NVIDIA H200",), 141e9, 989e12),
    Chip("H100", "gpu", ("NVIDIA H100",), 80e9, 989e12),
    Chip("A100", "gpu", ("NVIDIA A100",), 80e9, 312e12),
    Chip("A100-40", "gpu", (), 40e9, 312e12),
    Chip("L4", "gpu", ("NVIDIA L4",), 24e9, 121e12),
    Chip("v6e", "tpu", ("TPU v6",), 32 * GiB, 918e12, 2, "default", False),
    Chip("v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12, 2, "default", False),
    Chip("v5p", "tpu", ("TPU v5",), 95 * GiB, 459e12, 3, "megacore", True),
    Chip("v4", "tpu", ("TPU v4",), 32 * GiB, 275e12, 3, "megacore", True),
    Chip("v3", "tpu", ("TPU v3",), 16 * GiB, 123e12),
)


def chip_of(device_kind: str) -> Chip | None:
  """The chip whose longest `device_kinds` prefix starts `device_kind` ("TPU v5 lite" is a v5e,
  "TPU v5" a v5p), else None (e.g. a CPU)."""
  best, best_len = None, -1
  for chip in CHIPS:
    for prefix in chip.device_kinds:
      if device_kind.startswith(prefix) and len(prefix) > best_len:
        best, best_len = chip, len(prefix)
  return best


def peak_flops_per_device(config) -> float | None:
  """`config.peak_flops_per_device` if set, else the table's peak of this process's devices, else
  None (no MFU is reported)."""
  if config.peak_flops_per_device > 0:
    return float(config.peak_flops_per_device)
  import jax  # pylint: disable=import-outside-toplevel
  chip = chip_of(jax.devices()[0].device_kind)
  return chip.peak_flops if chip is not None else None
