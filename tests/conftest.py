"""Test-wide setup: 8 fake CPU devices (set before jax is imported) and the torch requirement.

`SOFTVQ_REQUIRE_TORCH=1` (set by CI) turns a missing torch/timm into a failure instead of a skip,
so parity tests can never silently stop running.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib  # noqa: E402

import pytest  # noqa: E402


def require(module_name: str):
  """Imports an optional test dependency; skips (or fails under SOFTVQ_REQUIRE_TORCH=1) if absent."""
  try:
    return importlib.import_module(module_name)
  except ImportError as e:
    if os.environ.get("SOFTVQ_REQUIRE_TORCH") == "1":
      pytest.fail(f"{module_name} is required (SOFTVQ_REQUIRE_TORCH=1) but cannot be imported: {e}")
    pytest.skip(f"{module_name} not installed")
