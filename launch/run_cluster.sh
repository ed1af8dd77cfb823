#!/usr/bin/env bash
# Runs build/freqkv across the nodes of an MPI hostfile, one rank per GPU.
#
#   bash launch/run_cluster.sh HOSTFILE COMMAND [ARGS...]
#   GPUS_PER_NODE=8 NCCL_IB_HCA=mlx5_0,mlx5_1 NCCL_SOCKET_IFNAME=eth0 \
#     bash launch/run_cluster.sh hosts.txt train configs/llama2-7b-freqkv.yaml \
#       --set parallel.tp=8 --set parallel.dp=2 \
#       --set model.path=/models/Llama-2-7b-hf --set data.train=[/data/train.bin]
#
# HOSTFILE: Open MPI's format, one node a line ("node01 slots=8"); '#' starts a comment. The
# repository (build/freqkv) and the data must be at the same paths on every node, and mpirun must
# reach every node by ssh without a password.
# Ranks: nodes × GPUS_PER_NODE (default: the GPUs nvidia-smi lists here), placed node by node
# (--map-by ppr:G:node), each bound to its NUMA domain; parallel.tp × sp × dp must equal it, and
# tp should divide GPUS_PER_NODE so each tp group stays on one node's NVLink.
# Environment passed to every rank:
#   NCCL_IB_HCA         InfiniBand/RoCE adapters NCCL may use (e.g. mlx5_0,mlx5_1); NCCL picks when unset
#   NCCL_SOCKET_IFNAME  the interface for NCCL's bootstrap and socket traffic (e.g. eth0, ib0, ^lo,docker)
#   NCCL_DEBUG          WARN by default (INFO shows the rings, trees and transports NCCL chose)
#   CUDA_DEVICE_MAX_CONNECTIONS=1, OMP_NUM_THREADS (default: cores per node / GPUS_PER_NODE)
# Extra mpirun options go in $MPIRUN_ARGS (e.g. "--mca pml ucx" or "--report-bindings").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="launch/run_cluster.sh"

# The usage text is the comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
case "${1:-}" in ""|-h|--help) usage ;; esac
[ $# -ge 2 ] || usage
hostfile="$1"
shift

if [ ! -r "$hostfile" ]; then
  echo "$me: hostfile '$hostfile' does not exist or is not readable" >&2
  exit 1
fi
freqkv="${FREQKV_BIN:-$root/build/freqkv}"
if [ ! -x "$freqkv" ]; then
  echo "$me: $freqkv does not exist: build it with bash launch/build.sh" >&2
  exit 1
fi
if ! command -v mpirun >/dev/null 2>&1; then
  echo "$me: mpirun not found: install Open MPI with bash launch/install_deps.sh" >&2
  exit 1
fi

nodes="$(sed 's/#.*//' "$hostfile" | awk 'NF { print $1 }' | sort -u | wc -l)"
if [ "$nodes" -lt 1 ]; then
  echo "$me: hostfile '$hostfile' names no node" >&2
  exit 1
fi
gpus="${GPUS_PER_NODE:-}"
if [ -z "$gpus" ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if ! [[ "${gpus:-}" =~ ^[1-9][0-9]*$ ]]; then
  echo "$me: cannot tell the GPUs per node (no GPU visible here): set GPUS_PER_NODE" >&2
  exit 2
fi
np=$(( nodes * gpus ))
cores="$(nproc 2>/dev/null || echo 1)"

# Open MPI refuses to start as root unless told (containers usually run as root).
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # tp communication kernels are queued in issue order
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / gpus > 0 ? cores / gpus : 1 ))}"
# mpirun -x copies a variable of this shell to every rank; only those that are set.
exports=()
for var in NCCL_IB_HCA NCCL_SOCKET_IFNAME NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_IB_GID_INDEX \
           NCCL_NET_GDR_LEVEL CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS PATH LD_LIBRARY_PATH; do
  if [ -n "${!var:-}" ]; then exports+=(-x "$var"); fi
done

echo "$me: $nodes nodes × $gpus GPUs = $np ranks; NCCL_IB_HCA=${NCCL_IB_HCA:-auto}" \
     "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-auto} NCCL_DEBUG=$NCCL_DEBUG" \
     "OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun --hostfile "$hostfile" -np "$np" --map-by "ppr:$gpus:node" --bind-to numa \
  "${exports[@]}" ${MPIRUN_ARGS:-} "$freqkv" "$@"
