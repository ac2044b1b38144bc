"""The one table of accelerator chips (memory and dense bf16 peak FLOP/s per device) and the
hardware targets named after them.

Used for MFU in the training loop (`peak_flops_per_device`, matched on `jax.Device.device_kind`)
and for memory planning (`parse_target`: `--target=v5e-64`, `8xH100`, used by
softvq_jax/compile_plan.py). MFU is always stated against these bf16 numbers (a chip running
float32 matmuls has a lower peak).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

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


# ------------------------------------------------------------------------------------------------
# Hardware targets for memory planning.
# ------------------------------------------------------------------------------------------------

_TPU = {c.name: c for c in CHIPS if c.tpu_dims}   # compile targets: TPU slices libtpu describes
_GPU = {c.name: c for c in CHIPS if c.platform == "gpu"}
# JAX preallocates this fraction of a GPU's memory as its pool (XLA_PYTHON_CLIENT_MEM_FRACTION);
# the step must fit in the pool, not in the whole HBM.
DEFAULT_GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  """A named hardware target: what one device has and how many there are."""
  name: str                 # as given, e.g. "v5e-64", "2x8xH100", "cpu-8"
  platform: str             # "tpu" | "gpu" | "cpu"
  kind: str                 # "v5e", "H100", "cpu"
  num_devices: int          # JAX devices (= chips on TPU v4/v5p megacore, v5e, v6e; GPUs)
  devices_per_host: int
  hbm_bytes: float          # per device
  peak_flops: float         # dense bf16 per device (0 = unknown, no time estimate)
  usable_fraction: float = 1.0  # of hbm_bytes the step may use (GPU: JAX's preallocated pool)
  topology: str | None = None   # libtpu topology name, e.g. "v5e:8x8"
  chip_config: str | None = None

  @property
  def usable_bytes(self) -> float:
    return self.hbm_bytes * self.usable_fraction

  @property
  def num_hosts(self) -> int:
    return max(1, self.num_devices // self.devices_per_host)


def _tpu_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` chips: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (3-D
  torus, v4/v5p) or 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, 8x8, ... (2-D, v5e/v6e): each doubling doubles
  the last of the smallest dimensions."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: TPU slices here are powers of two")
  grid = [2, 2, 1] if dims == 3 else [1, 1]
  if dims == 3 and chips < 4:
    raise ValueError("v4/v5p slices start at 4 chips (v4-8 / v5p-8)")
  while math.prod(grid) < chips:
    m = min(grid)
    i = max(j for j, g in enumerate(grid) if g == m)
    grid[i] *= 2
  return tuple(grid)


_TARGET_HELP = ("use a TPU slice 'v4-32', 'v5e-64', 'v5p-128', 'v6e-16' (v4/v5p count TensorCores, "
                "2 per chip; v5e/v6e count chips), a GPU node 'H100', '8xH100', '2x8xH100' "
                f"(kinds {sorted(_GPU)}), or 'cpu-8'")


def parse_target(name: str, *, gpu_mem_fraction: float | None = None) -> Target:
  """'v5e-64' / 'v4-32' / '8xH100' / '2x8xH100' / 'cpu-8' -> Target (ValueError naming the form).

  A suffix '@<GiB>' overrides the memory per device (e.g. '8xH100@94' for H100 NVL parts,
  'cpu-8@0.001' in tests).
  """
  if "@" in name:
    base, _, mem = name.partition("@")
    try:
      gib = float(mem)
    except ValueError:
      raise ValueError(f"target {name!r}: the part after '@' must be GiB per device") from None
    return dataclasses.replace(parse_target(base, gpu_mem_fraction=gpu_mem_fraction),
                               name=name.strip(), hbm_bytes=gib * GiB)
  s = name.strip()
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v6litepod)-(\d+)", s, re.IGNORECASE)
  if m:
    gen = {"v5litepod": "v5e", "v6litepod": "v6e"}.get(m.group(1).lower(), m.group(1).lower())
    spec, n = _TPU[gen], int(m.group(2))
    chips = n // 2 if spec.name_counts_cores else n
    if spec.name_counts_cores and n % 2:
      raise ValueError(f"target {name!r}: {gen} slices are named by TensorCores (even numbers)")
    grid = _tpu_grid(chips, spec.tpu_dims)
    per_host = 8 if spec.tpu_dims == 2 and chips == 8 else min(4, chips)
    return Target(name=s, platform="tpu", kind=gen, num_devices=chips, devices_per_host=per_host,
                  hbm_bytes=spec.hbm_bytes, peak_flops=spec.peak_flops,
                  topology=f"{gen}:{'x'.join(map(str, grid))}", chip_config=spec.chip_config)
  m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?([A-Za-z0-9-]+)", s)
  if m and m.group(3).upper() in {k.upper() for k in _GPU}:
    kind = next(k for k in _GPU if k.upper() == m.group(3).upper())
    a, b = m.group(1), m.group(2)
    hosts, per_host = (int(a), int(b)) if b else (1, int(a) if a else 1)
    if hosts < 1 or per_host < 1:
      raise ValueError(f"target {name!r}: host and GPU counts must be positive")
    frac = gpu_mem_fraction
    if frac is None:
      frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
    return Target(name=s, platform="gpu", kind=kind, num_devices=hosts * per_host,
                  devices_per_host=per_host, hbm_bytes=_GPU[kind].hbm_bytes,
                  peak_flops=_GPU[kind].peak_flops, usable_fraction=frac)
  m = re.fullmatch(r"cpu-(\d+)", s, re.IGNORECASE)
  if m:
    n = int(m.group(1))
    # A test/planning target: "memory" is what this host's RAM would have to hold per device.
    return Target(name=s, platform="cpu", kind="cpu", num_devices=n, devices_per_host=n,
                  hbm_bytes=64 * GiB, peak_flops=0.0)
  raise ValueError(f"unknown target {name!r}: {_TARGET_HELP}")

