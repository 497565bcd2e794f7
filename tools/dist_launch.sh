#!/usr/bin/env bash
# The torchrun launch shared by dist_train.sh and dist_test.sh: one process per GPU (per
# CPU process without GPUs: gloo backend).
#   bash tools/dist_launch.sh SCRIPT NUM_PROCS [SCRIPT args...]     (SCRIPT: a file in tools/)
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT (defaults 1, 0, 127.0.0.1, 29500).
set -e
if [ "$#" -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
SCRIPT=$1
NPROCS=$2
shift 2
TOOLS="$(cd "$(dirname "$0")" && pwd)"

PYTHONPATH="$TOOLS/..":$PYTHONPATH \
python -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROCS" \
    "$TOOLS/$SCRIPT" "$@"
