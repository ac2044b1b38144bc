#!/usr/bin/env bash
# One bounded command that measures everything GPU/TPU-specific about softvq_jax (issue 20):
# installs what is missing, then environment, numerics, encode/decode, train step and generator
# sampling, each timed and skipped with a recorded reason when the budget is short. Writes one
# JSON per step + summary.md + accelerator_check.log into --out (default $OUT).
#
#   bash benchmarks/accelerator_check.sh                          # default budget 420 s
#   bash benchmarks/accelerator_check.sh --budget 540 --wheels .whl   # offline machine
#   bash benchmarks/accelerator_check.sh --cpu-smoke --out /tmp/acc   # toy sizes on the CPU (CI)
#
# Options (see benchmarks/accelerator_check.py --help): --budget S, --out DIR, --cpu-smoke,
# --steps environment,numerics,encode_decode,train_step,generator, --wheels DIR, --no-install.
# PYTHON=... picks the interpreter (default: python3, else python).
set -uo pipefail

# The budget counts from here: interpreter start-up and the install are part of it.
started_at=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then
      py="$candidate"
      break
    fi
  done
fi
if [[ -z "$py" ]]; then
  echo "accelerator_check: no python3 or python on PATH (set PYTHON=...)" >&2
  exit 2
fi

# softvq_jax and the benchmark modules import from the checkout whether or not it is installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JAX must not take 75 % of the GPU up front: PyTorch runs beside it in the comparisons.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

# (No cd: a relative --out is relative to where the command was given.)
exec "$py" "$here/accelerator_check.py" --started-at "$started_at" "$@"
