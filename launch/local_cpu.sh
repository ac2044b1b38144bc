#!/usr/bin/env bash
# N training processes on this machine, each with D fake CPU devices, joined by jax.distributed
# through a coordinator on 127.0.0.1: the multi-host code path (per-process data shards, global
# arrays from process-local batches, collective Orbax checkpoints, process-0-only logging) without
# a cluster. tests/test_multiprocess.py runs exactly this. Cross-process CPU collectives use gloo
# (softvq_jax/main.py sets jax_cpu_collectives_implementation).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_cpu.sh [--num-processes=N] [--devices-per-process=D] [--port=PORT]
                           [--log-dir=DIR] [--dry-run] -- --config=CONFIG --workdir=DIR [FLAGS...]

  --num-processes=N        processes (default 2)
  --devices-per-process=D  fake CPU devices per process (default 4): N*D global devices
  --port=PORT              coordinator port on 127.0.0.1 (default 12355)
  --log-dir=DIR            process k logs to DIR/process_<k>.log (default: terminal)
  --dry-run                print the commands instead of running them
  -h, --help               this help

Example (2 processes x 4 devices = the 8-device mesh of a single-process test run):
  launch/local_cpu.sh -- --config=configs/demo.py --workdir=/tmp/softvq_mp
EOF
}

die() { echo "local_cpu.sh: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nproc=2
devices=4
port=12355
extra=()
args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-processes=*) nproc="${1#*=}" ;;
    --devices-per-process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log-dir=*|--python=*) extra+=("$1") ;;
    --dry-run) extra+=("$1") ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args=("$@"); break ;;
    *) die "unknown option '$1' (training flags go after --; see --help)" ;;
  esac
  shift
done
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process=$devices must be a positive integer"
[[ "$port" =~ ^[1-9][0-9]*$ ]] || die "--port=$port must be a port number"

# Replace any device-count flag already in XLA_FLAGS (e.g. a test harness's 8) by ours.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" \
  | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +//; s/ +$//')"
export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS=cpu
if [[ " ${extra[*]:-} " == *" --dry-run "* ]]; then
  printf 'export %q\n' "JAX_PLATFORMS=$JAX_PLATFORMS" "XLA_FLAGS=$XLA_FLAGS"
fi

exec "$here/multinode.sh" --nnodes=1 --node-rank=0 --coordinator="127.0.0.1:$port" \
  --nproc-per-node="$nproc" --device-binding=none ${extra[@]+"${extra[@]}"} -- \
  ${args[@]+"${args[@]}"}
