#!/usr/bin/env bash
# torchrun for ridgeline on one node or several: builds the torchrun line, checks it, then execs torchrun.
#
#   launch/train.sh [--nproc-per-node=N] [--max-restarts=K] [key=value ...]                 one node
#   launch/train.sh --nnodes=M --node-rank=R --rdzv-endpoint=HOST:PORT [--rdzv-id=ID] \
#                   [--nproc-per-node=N] [--max-restarts=K] [key=value ...]                  node R of M
#
# Several nodes need an explicit --rdzv-endpoint (node 0's address, the same on every node): there is no
# fallback to localhost. --node-rank=0 marks the node that hosts the c10d rendezvous store (is_host), so a
# hostname that does not resolve to the endpoint's address cannot leave the store unhosted.
# Everything not starting with -- goes to the trainer (`python -m trainer`). Holds no training logic.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
fail() { echo "launch/train.sh: $*" >&2; exit 2; }

nnodes=1 node_rank="" nproc="" endpoint="" rdzv_id="${SLURM_JOB_ID:-ridgeline}" max_restarts=0
trainer_args=()
for arg in "$@"; do
    case "$arg" in
        --nnodes=*) nnodes="${arg#*=}" ;;
        --node-rank=*) node_rank="${arg#*=}" ;;
        --nproc-per-node=*) nproc="${arg#*=}" ;;
        --rdzv-endpoint=*) endpoint="${arg#*=}" ;;
        --rdzv-id=*) rdzv_id="${arg#*=}" ;;
        --max-restarts=*) max_restarts="${arg#*=}" ;;
        -h|--help) usage; exit 0 ;;
        --*) fail "unknown option $arg (options: --nnodes --node-rank --nproc-per-node --rdzv-endpoint --rdzv-id --max-restarts)" ;;
        *) trainer_args+=("$arg") ;;
    esac
done

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_count "$nnodes" && (( nnodes >= 1 )) || fail "--nnodes=$nnodes: must be a whole number >= 1"
is_count "$max_restarts" || fail "--max-restarts=$max_restarts: must be a whole number >= 0"
if [[ -z "$nproc" ]]; then
    # One process per GPU, else one per node (CPU).
    nproc=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
    (( nproc > 0 )) || nproc=1
fi
is_count "$nproc" && (( nproc >= 1 )) || fail "--nproc-per-node=$nproc: must be a whole number >= 1"

# A restart signal goes to the agent; it forwards SIGTERM and SIGUSR1 to the workers, which save and exit.
torchrun_args=(--nproc-per-node="$nproc" --max-restarts="$max_restarts"
               --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
if (( nnodes == 1 )); then
    [[ -z "$endpoint" ]] || fail "--rdzv-endpoint=$endpoint: only with --nnodes > 1 (one node uses --standalone)"
    torchrun_args+=(--standalone)
else
    [[ -n "$endpoint" ]] || fail "--nnodes=$nnodes needs --rdzv-endpoint=HOST:PORT (node 0's address, the same on every node); refusing to fall back to localhost"
    [[ "$endpoint" =~ ^[^:]+:[0-9]+$ ]] || fail "--rdzv-endpoint=$endpoint: must be HOST:PORT"
    [[ -n "$node_rank" ]] || fail "--nnodes=$nnodes needs --node-rank=R (0 .. $((nnodes - 1)); 0 on the endpoint's node)"
    is_count "$node_rank" && (( node_rank < nnodes )) || fail "--node-rank=$node_rank: must be in 0 .. $((nnodes - 1))"
    is_host=false
    (( node_rank == 0 )) && is_host=true
    torchrun_args+=(--nnodes="$nnodes" --node-rank="$node_rank" --rdzv-backend=c10d --rdzv-endpoint="$endpoint"
                    --rdzv-id="$rdzv_id" --rdzv-conf="is_host=$is_host")
    # torchrun hands restarted workers the first attempt's store, stale keys included (pytorch/pytorch#167288);
    # with this, each rendezvous round gets a new one. (One node is handled in trainer/env.py.)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi

exec "${TORCHRUN:-torchrun}" "${torchrun_args[@]}" -m trainer "${trainer_args[@]}"
