#!/usr/bin/env bash
# Runs build/freqkv on one machine as N MPI ranks, one per GPU.
#
#   bash launch/run_local.sh [-n N] COMMAND [ARGS...]
#   bash launch/run_local.sh train configs/llama2-7b-freqkv.yaml --set parallel.tp=8 \
#       --set model.path=/models/Llama-2-7b-hf --set data.train=[/data/train.bin]
#   NP=4 bash launch/run_local.sh train configs/tiny-cpu.yaml --set parallel.dp=4
#
# N: -n N, else $NP, else the number of GPUs nvidia-smi lists, else 1. parallel.tp × parallel.sp
# × parallel.dp must equal N (README, "Running on a cluster"). Ranks are placed in order, one per
# core (--map-by slot --bind-to core), so local rank i is the process for GPU i; with more ranks
# than cores (CPU runs) they share cores instead. Extra mpirun options go in $MPIRUN_ARGS (e.g.
# MPIRUN_ARGS="--report-bindings"); the NCCL and thread settings are those of run_cluster.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="launch/run_local.sh"

# The usage text is the comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

np="${NP:-}"
if [ "${1:-}" = "-n" ] || [ "${1:-}" = "--np" ]; then
  [ $# -ge 2 ] || { echo "$me: $1 needs a number of ranks" >&2; exit 2; }
  np="$2"
  shift 2
fi
case "${1:-}" in ""|-h|--help) usage ;; esac

freqkv="${FREQKV_BIN:-$root/build/freqkv}"
if [ ! -x "$freqkv" ]; then
  echo "$me: $freqkv does not exist: build it with bash launch/build.sh" >&2
  exit 1
fi
if ! command -v mpirun >/dev/null 2>&1; then
  echo "$me: mpirun not found: install Open MPI with bash launch/install_deps.sh" >&2
  exit 1
fi

if [ -z "$np" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  np=$(( gpus > 0 ? gpus : 1 ))
fi
if ! [[ "$np" =~ ^[1-9][0-9]*$ ]]; then
  echo "$me: the number of ranks must be a positive integer, got '$np' (from -n or NP)" >&2
  exit 2
fi

cores="$(nproc 2>/dev/null || echo 1)"
placement=(--map-by slot --bind-to core)
if [ "$np" -gt "$cores" ]; then
  # one core per rank is impossible: let the ranks share the cores
  echo "$me: $np ranks on $cores cores: oversubscribing, ranks are not bound" >&2
  placement=(--map-by slot --bind-to none --oversubscribe)
fi

# Open MPI refuses to start as root unless told (containers usually run as root).
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # tp communication kernels are queued in issue order
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / np > 0 ? cores / np : 1 ))}"

# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun -np "$np" "${placement[@]}" ${MPIRUN_ARGS:-} "$freqkv" "$@"
