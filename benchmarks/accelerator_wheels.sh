#!/usr/bin/env bash
# Wheels for an accelerator machine that reaches no package registry: the distributions that
# benchmarks/accelerator_check.sh needs and that machine's image lacks (its image has jax with
# CUDA, torch, timm, optax, orbax; not grain, ml_collections or, possibly, our flax range).
# Run here, where pip works; then carry the directory and pass it to the check:
#
#   bash benchmarks/accelerator_wheels.sh .whl          # ~5 MB; keep .whl out of git
#   bash benchmarks/accelerator_check.sh --wheels .whl  # there: installs only what is missing
#
# The versions are the ones installed here (what the tests ran with), else the newest.
# WHEEL_PYTHON_VERSION (default 3.12: the accelerator image's python3) picks the target Python.
set -euo pipefail

dir="${1:-.whl}"
target_python="${WHEEL_PYTHON_VERSION:-3.12}"
py="${PYTHON:-python3}"

packages=(grain array-record portpicker ml-collections flax)
specs=()
for package in "${packages[@]}"; do
  version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
    "$package" 2>/dev/null || true)
  specs+=("${package}${version:+==$version}")
done

mkdir -p "$dir"
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$target_python" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dir" "${specs[@]}"
ls -l "$dir"
