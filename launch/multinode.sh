#!/usr/bin/env bash
# A torchrun-like launcher for clusters without SLURM or a TPU runtime: run it once on every node,
# it starts --nproc-per-node local training processes and tells each one, through environment
# variables that softvq_jax/main.py passes to jax.distributed.initialize(), where the coordinator
# is, how many processes the job has and which one it is:
#
#   JAX_COORDINATOR_ADDRESS = --coordinator (host:port of node 0, reachable from every node)
#   JAX_NUM_PROCESSES       = nnodes * nproc_per_node
#   JAX_PROCESS_ID          = node_rank * nproc_per_node + local_rank
#   JAX_LOCAL_DEVICE_IDS    = local_rank            (only with --device-binding=gpu and
#                                                    nproc_per_node > 1: one GPU per process)
#
# Everything after `--` goes to `python -m softvq_jax.main` (plus --distributed=yes).
#
# Signals: SIGTERM/SIGINT are forwarded to the local processes, which save a checkpoint and stop
# (the trainer's preemption path); the launcher then exits with their status. If one local process
# fails, the others are stopped (SIGTERM, by process id) and the launcher exits non-zero, so a
# cluster scheduler sees the failure instead of a hang in a collective.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/multinode.sh --nnodes=N --node-rank=R --coordinator=HOST:PORT
                           [--nproc-per-node=P] [--device-binding=gpu|none] [--log-dir=DIR]
                           [--python=PYTHON] [--dry-run] -- --config=CONFIG --workdir=DIR [FLAGS...]

Run the same command on every node (node 0 hosts the coordinator at HOST:PORT).

  --nnodes=N            number of nodes (default 1)
  --node-rank=R         this node's rank, 0 .. N-1 (default 0)
  --coordinator=H:P     address of node 0's coordinator service (required)
  --nproc-per-node=P    processes on this node (default 1: one process drives all local devices;
                        use the number of GPUs for one process per GPU)
  --device-binding=B    gpu (default): with P > 1, process i sees local GPU i (JAX_LOCAL_DEVICE_IDS);
                        none: do not restrict devices (CPU runs, launch/local_cpu.sh)
  --log-dir=DIR         write process k's stdout+stderr to DIR/process_<k>.log (default: terminal)
  --python=PYTHON       interpreter (default: $PYTHON or python)
  --dry-run             print the commands (with their environment) instead of running them
  -h, --help            this help

Example (2 nodes x 8 GPUs, run on each node with its rank):
  launch/multinode.sh --nnodes=2 --node-rank=0 --coordinator=10.0.0.1:12355 --nproc-per-node=8 \
    -- --config=configs/sq32_256.py --workdir=/shared/runs/sq32
EOF
}

die() { echo "multinode.sh: $*" >&2; exit 2; }

nnodes=1
node_rank=0
coordinator=""
nproc=1
binding=gpu
log_dir=""
python_bin="${PYTHON:-python}"
dry_run=0
args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes=*) nnodes="${1#*=}" ;;
    --node-rank=*) node_rank="${1#*=}" ;;
    --coordinator=*) coordinator="${1#*=}" ;;
    --nproc-per-node=*) nproc="${1#*=}" ;;
    --device-binding=*) binding="${1#*=}" ;;
    --log-dir=*) log_dir="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args=("$@"); break ;;
    *) die "unknown option '$1' (training flags go after --; see --help)" ;;
  esac
  shift
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_int "$nnodes" && [[ "$nnodes" -ge 1 ]] || die "--nnodes=$nnodes must be a positive integer"
is_int "$nproc" && [[ "$nproc" -ge 1 ]] || die "--nproc-per-node=$nproc must be a positive integer"
is_int "$node_rank" && [[ "$node_rank" -lt "$nnodes" ]] \
  || die "--node-rank=$node_rank must be in 0 .. $((nnodes - 1))"
[[ "$coordinator" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator=HOST:PORT is required (got '$coordinator')"
[[ "$binding" == gpu || "$binding" == none ]] || die "--device-binding must be gpu or none"
[[ ${#args[@]} -gt 0 ]] || die "no training flags: add -- --config=CONFIG --workdir=DIR"

world=$((nnodes * nproc))
pids=()
stopping=0

forward() {
  stopping=1
  if [[ ${#pids[@]} -gt 0 ]]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
}

for ((local_rank = 0; local_rank < nproc; local_rank++)); do
  pid_env=(
    "JAX_COORDINATOR_ADDRESS=$coordinator"
    "JAX_NUM_PROCESSES=$world"
    "JAX_PROCESS_ID=$((node_rank * nproc + local_rank))"
  )
  if [[ "$binding" == gpu && "$nproc" -gt 1 ]]; then
    pid_env+=("JAX_LOCAL_DEVICE_IDS=$local_rank")
  fi
  cmd=("$python_bin" -m softvq_jax.main --distributed=yes "${args[@]}")
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' env "${pid_env[@]}" "${cmd[@]}"
    if [[ -n "$log_dir" ]]; then
      printf '> %q 2>&1' "$log_dir/process_$((node_rank * nproc + local_rank)).log"
    fi
    printf '\n'
    continue
  fi
  if [[ -n "$log_dir" ]]; then
    mkdir -p "$log_dir"
    env "${pid_env[@]}" "${cmd[@]}" \
      > "$log_dir/process_$((node_rank * nproc + local_rank)).log" 2>&1 &
  else
    env "${pid_env[@]}" "${cmd[@]}" &
  fi
  pids+=("$!")
done
[[ "$dry_run" == 1 ]] && exit 0

trap forward TERM INT
status=0
remaining=${#pids[@]}
while [[ "$remaining" -gt 0 ]]; do
  rc=0
  wait -n || rc=$?
  if [[ "$rc" -eq 127 ]]; then  # no child left to wait for
    break
  fi
  if [[ "$rc" -gt 128 && "$stopping" == 1 ]]; then
    continue  # `wait` interrupted by the forwarded signal: keep waiting for the saves
  fi
  remaining=$((remaining - 1))
  if [[ "$rc" -ne 0 && "$status" -eq 0 ]]; then
    status=$rc
    echo "multinode.sh: a training process exited with status $rc; stopping the others" >&2
    forward
  fi
done
exit "$status"
