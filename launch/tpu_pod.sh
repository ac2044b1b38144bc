#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod slice): create the slice (directly, or as a
# queued resource, optionally spot), copy and install this checkout on every worker, start
# `python -m softvq_jax.main` on all workers at once, stream worker 0's log, and - after a
# preemption - recreate the slice and run the same command again: the trainer resumes from the
# newest checkpoint in the gs:// workdir by itself (checkpoints are atomic, the data position is
# part of them).
#
# Every gcloud command is printed (and nothing is run) with --dry-run.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --type=ACCELERATOR_TYPE --config=CONFIG
                         --workdir=gs://BUCKET/RUN [options] [-- EXTRA_TRAINING_FLAGS...]
       launch/tpu_pod.sh --name=NAME --zone=ZONE --delete [--queued] [--project=P]

  --name=NAME           TPU VM (and queued resource) name
  --zone=ZONE           e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --type=TYPE           accelerator type: v4-32, v5litepod-64, v5p-128, v6e-64, ...
  --version=RUNTIME     TPU software version (default by generation: v4 tpu-ubuntu2204-base,
                        v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project=PROJECT     Google Cloud project (default: gcloud's configured project)
  --config=CONFIG       config file, relative to the repository (e.g. configs/sq32_256.py)
  --workdir=gs://...    run directory; must be gs:// for a multi-host slice (every worker and
                        every restart must see the same checkpoints)
  --spot                spot (preemptible) capacity; implies --queued and restarts
  --queued              create through `queued-resources create` (waits for capacity)
  --max-restarts=N      recreate-and-resume after at most N preemptions (default 0; 100 with --spot)
  --skip-create         use an existing slice
  --skip-setup          do not copy/install the code (already there)
  --pip-extra=SPEC      extra pip requirement installed on every worker (repeatable)
  --delete              delete the slice (and its queued resource) and exit
  --delete-when-done    delete the slice after the training finished successfully
  --dry-run             print every command instead of running it
  -h, --help            this help

Example (spot v5e-64, 16 workers):
  launch/tpu_pod.sh --name=softvq --zone=us-west4-a --type=v5litepod-64 --spot \
    --config=configs/sq32_256.py --workdir=gs://my-bucket/softvq/sq32_256
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
log() { echo "tpu_pod.sh: $*" >&2; }

name=""
zone=""
accel=""
version=""
project=""
config=""
workdir=""
spot=0
queued=0
max_restarts=""
skip_create=0
skip_setup=0
pip_extra=()
delete_only=0
delete_when_done=0
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) accel="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --spot) spot=1; queued=1 ;;
    --queued) queued=1 ;;
    --max-restarts=*) max_restarts="${1#*=}" ;;
    --skip-create) skip_create=1 ;;
    --skip-setup) skip_setup=1 ;;
    --pip-extra=*) pip_extra+=("${1#*=}") ;;
    --delete) delete_only=1 ;;
    --delete-when-done) delete_when_done=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"

gc_flags=("--zone=$zone")
[[ -n "$project" ]] && gc_flags+=("--project=$project")

# Prints (dry run) or runs a command.
run() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

delete_slice() {
  if [[ "$queued" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$name" "${gc_flags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${gc_flags[@]}" --quiet
  fi
}

if [[ "$delete_only" == 1 ]]; then
  delete_slice
  exit 0
fi

[[ -n "$accel" ]] || die "--type is required (e.g. v4-32, v5litepod-64)"
[[ -n "$config" ]] || die "--config is required"
[[ -n "$workdir" ]] || die "--workdir is required"
[[ -z "$max_restarts" ]] && max_restarts=$(( spot == 1 ? 100 : 0 ))
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts must be an integer >= 0"

# Workers (TPU VM hosts) of a slice, from the accelerator type's trailing number:
#   v2-N, v3-N, v4-N, v5p-N: N counts TensorCores, 2 per chip, 4 chips per host -> N/8 hosts
#   v5litepod-N (v5e), v6e-N: N counts chips (1 TensorCore each); slices up to 8 chips are one
#     host, larger (multi-host) slices use 4-chip hosts -> N/4 hosts
# (Cloud TPU docs: "System architecture" / the v4, v5e, v5p, v6e pages). Only used for messages
# and checks: the commands themselves address every worker with --worker=all.
slice_workers() {
  local type="$1" n gen
  n="${type##*-}"
  gen="${type%-*}"
  [[ "$n" =~ ^[0-9]+$ ]] || { echo 0; return; }
  case "$gen" in
    v2|v3|v4|v5p) echo $(( n <= 8 ? 1 : n / 8 )) ;;
    v5litepod|v5e|v6e) echo $(( n <= 8 ? 1 : n / 4 )) ;;
    *) echo 0 ;;
  esac
}

default_version() {
  case "$1" in
    v2-*|v3-*) echo tpu-ubuntu2204-base ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "" ;;
  esac
}

workers="$(slice_workers "$accel")"
[[ "$workers" -gt 0 ]] || die "unknown accelerator type '$accel' (expected e.g. v4-32, v5litepod-64)"
[[ -n "$version" ]] || version="$(default_version "$accel")"
if [[ "$workers" -gt 1 && "$workdir" != gs://* ]]; then
  die "--workdir=$workdir: a $workers-worker slice needs a gs:// workdir that every worker shares"
fi
echo "# slice $accel: $workers worker(s); runtime $version; workdir $workdir"

# The command every worker runs (from the copied checkout). --distributed=yes: on a multi-host
# slice jax.distributed.initialize() finds the coordinator and worker ids in the TPU metadata.
# shellcheck disable=SC2016  # $HOME expands on the worker, not here
remote_dir='$HOME/softvq_jax'
train_cmd=(python3 -m softvq_jax.main "--config=$config" "--workdir=$workdir")
[[ "$workers" -gt 1 ]] && train_cmd+=(--distributed=yes)
train_cmd+=(${extra[@]+"${extra[@]}"})
printf -v train_str '%q ' "${train_cmd[@]}"
# Started detached on every worker (survives the ssh session); the exit code goes to a file.
printf -v inner_str '%q' "${train_str}> \$HOME/softvq_train.log 2>&1; echo \$? > \$HOME/softvq_train.rc"
launch_str="cd $remote_dir && rm -f \$HOME/softvq_train.rc && (nohup setsid bash -c $inner_str > /dev/null 2>&1 &); sleep 1"
# Worker 0's log until its training process ends, then its exit code.
# shellcheck disable=SC2016  # expands on worker 0
stream_str='while [ ! -f $HOME/softvq_train.log ]; do sleep 1; done; tail -n +1 -f $HOME/softvq_train.log & t=$!; while [ ! -f $HOME/softvq_train.rc ]; do sleep 5; done; sleep 2; kill $t; exit $(cat $HOME/softvq_train.rc)'

slice_state() {
  if [[ "$dry_run" == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$name" "${gc_flags[@]}" --format='value(state)' >&2
    echo READY
    return
  fi
  gcloud compute tpus tpu-vm describe "$name" "${gc_flags[@]}" --format='value(state)' 2>/dev/null \
    || echo MISSING
}

create_slice() {
  if [[ "$queued" == 1 ]]; then
    local qflags=()
    [[ "$spot" == 1 ]] && qflags+=(--spot)
    run gcloud compute tpus queued-resources create "$name" "${gc_flags[@]}" --node-id="$name" \
      --accelerator-type="$accel" --runtime-version="$version" ${qflags[@]+"${qflags[@]}"}
  else
    run gcloud compute tpus tpu-vm create "$name" "${gc_flags[@]}" \
      --accelerator-type="$accel" --version="$version"
  fi
  # Wait until the slice is READY (a queued resource may wait hours for capacity).
  local state
  while true; do
    state="$(slice_state)"
    [[ "$state" == READY ]] && break
    log "slice $name is ${state:-not there yet}; waiting"
    sleep 60
  done
}

setup_workers() {
  local tarball
  tarball="$(mktemp -t softvq_jax.XXXXXX.tar.gz)"
  run tar -czf "$tarball" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
    -C "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:softvq_jax.tar.gz" "${gc_flags[@]}" \
    --worker=all
  local pip_str
  printf -v pip_str '%q ' "jax[tpu]" ${pip_extra[@]+"${pip_extra[@]}"}
  run gcloud compute tpus tpu-vm ssh "$name" "${gc_flags[@]}" --worker=all --command="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf \$HOME/softvq_jax.tar.gz -C $remote_dir && pip install -q -U ${pip_str}&& pip install -q -e $remote_dir"
  [[ "$dry_run" == 1 ]] || rm -f "$tarball"
}

restarts=0
fresh=$(( skip_create == 1 ? 0 : 1 ))
while true; do
  if [[ "$fresh" == 1 ]]; then
    create_slice
  fi
  if [[ "$fresh" == 1 || "$skip_setup" == 0 ]]; then
    setup_workers
    skip_setup=1  # once per slice
  fi
  rc=0
  run gcloud compute tpus tpu-vm ssh "$name" "${gc_flags[@]}" --worker=all --command="$launch_str" || rc=$?
  if [[ "$rc" == 0 ]]; then
    run gcloud compute tpus tpu-vm ssh "$name" "${gc_flags[@]}" --worker=0 --command="$stream_str" || rc=$?
  fi
  if [[ "$rc" == 0 ]]; then
    log "training finished"
    [[ "$delete_when_done" == 1 ]] && delete_slice
    exit 0
  fi
  state="$(slice_state)"
  if [[ "$state" == READY ]]; then
    log "training failed (exit $rc) on a healthy slice: not restarting; see \$HOME/softvq_train.log on the workers"
    exit "$rc"
  fi
  if [[ "$restarts" -ge "$max_restarts" ]]; then
    log "slice $name is $state after $restarts restart(s) (--max-restarts=$max_restarts): giving up"
    exit 1
  fi
  restarts=$((restarts + 1))
  log "slice $name is $state (preempted?): recreating it and resuming (restart $restarts)"
  delete_slice || true
  fresh=1
  skip_setup=0
done
