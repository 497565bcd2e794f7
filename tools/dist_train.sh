#!/usr/bin/env bash
# Distributed training with torchrun, one process per GPU (per CPU process without GPUs:
# gloo backend).
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
#   e.g. bash tools/dist_train.sh configs/detection/nat_tiny_maskrcnn.py 8 --auto-scale-lr
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT (defaults 1, 0, 127.0.0.1, 29500).
set -e
if [ "$#" -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
exec bash "$(dirname "$0")/dist_launch.sh" train.py "$2" "$1" --launcher pytorch "${@:3}"
