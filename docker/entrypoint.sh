#!/usr/bin/env bash
# Run tools/train_net.py under torchrun as one node of a job, always with --resume, so a job
# that is requeued or restarted continues from its last checkpoint in OUTPUT_DIR.
#
#   entrypoint.sh --config-file CFG [KEY VALUE ...]      (arguments go to train_net.py)
#
# The node's place in the job comes from the scheduler's environment:
#   SLURM     SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (compressed lists such as
#             node[01-02,07] are expanded; the first host is the rendezvous host),
#             SLURM_GPUS_ON_NODE, SLURM_JOB_ID (rendezvous id)
#   Kubeflow  PET_NNODES (N or MIN:MAX), PET_NPROC_PER_NODE, PET_RDZV_ENDPOINT or
#             PET_MASTER_ADDR/PET_MASTER_PORT, PET_RDZV_ID, PET_MAX_RESTARTS; without PET_*,
#             WORLD_SIZE and MASTER_ADDR/MASTER_PORT, with WORLD_SIZE taken as the number of
#             pods (one process each, the operator's behaviour without nprocPerNode).
#             POD_IP (downward API), if set, is this node's address.
#   plain     the DETECTOR_* variables below.
# DETECTOR_* variables override whatever the scheduler says:
#   DETECTOR_NNODES, DETECTOR_NPROC_PER_NODE (default: the visible GPUs, at least 1),
#   DETECTOR_MASTER_ADDR, DETECTOR_MASTER_PORT (default 29500), DETECTOR_RDZV_ID,
#   DETECTOR_LOCAL_ADDR (this node's address; give every container on a host-network host
#   its own, otherwise the c10d node ids, made of hostname and pid, collide),
#   DETECTOR_MAX_RESTARTS (default 0), DETECTOR_SHUTDOWN_TIMEOUT (seconds the workers get to
#   write their checkpoint after a stop signal, default 100), DETECTOR_PYTHON (default python),
#   DETECTOR_DRY_RUN=1 (print the torchrun command instead of running it).
#
# Stopping: SIGTERM, SIGINT, SIGHUP and SIGQUIT go to torchrun, which passes them to its workers
# (they checkpoint and exit). torchrun starts the workers in their own sessions and does not
# handle SIGUSR1 (SLURM's warning signal), so SIGUSR1 is sent to torchrun as SIGTERM. After such
# a stop the script exits 128 + the signal received (138 for SIGUSR1, 143 for SIGTERM), which
# Kubernetes' restartPolicy ExitCode retries; torchrun shuts down instead of restarting its
# workers, so a preemption does not count against --max-restarts. A node whose workers stopped
# because another node was signalled exits with the same status (they report it through
# DETECTOR_STOP_STATUS_FILE; torchrun itself would exit 1). With --max-restarts above 0 such a
# node's torchrun restarts its workers first, which resume from the checkpoint just written.
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE defaults to 1: restarted workers then connect reliably.
set -euo pipefail

PROG=entrypoint.sh

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

# Split a SLURM node list at the commas outside brackets, one item per line.
split_nodelist() {
    local list=$1 item="" depth=0 char i
    for ((i = 0; i < ${#list}; i++)); do
        char=${list:i:1}
        case $char in
            "[") depth=$((depth + 1)); item+=$char ;;
            "]") depth=$((depth - 1)); item+=$char ;;
            ",")
                if ((depth == 0)); then
                    printf '%s\n' "$item"
                    item=""
                else
                    item+=$char
                fi
                ;;
            *) item+=$char ;;
        esac
        ((depth >= 0)) || return 1
    done
    ((depth == 0)) && [[ -n $item ]] || return 1
    printf '%s\n' "$item"
}

# Expand one item with bracket groups (several allowed: rack[1-2]-n[01-02]), one host per line.
# Ranges keep the zero padding of their start, as SLURM writes them.
expand_node_item() {
    local item=$1 prefix rest inner suffix part low high width number
    if [[ $item != *"["* ]]; then
        [[ -n $item && $item != *"]"* ]] || return 1
        printf '%s\n' "$item"
        return 0
    fi
    prefix=${item%%"["*}
    rest=${item#*"["}
    inner=${rest%%"]"*}
    suffix=${rest#*"]"}
    [[ $rest == *"]"* && -n $inner ]] || return 1
    local IFS=,
    for part in $inner; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            low=${BASH_REMATCH[1]}
            high=${BASH_REMATCH[2]}
            width=${#low}
            ((10#$low <= 10#$high)) || return 1
            for ((number = 10#$low; number <= 10#$high; number++)); do
                expand_node_item "$prefix$(printf '%0*d' "$width" "$number")$suffix" || return 1
            done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            expand_node_item "$prefix$part$suffix" || return 1
        else
            return 1
        fi
    done
}

# Expand a compressed SLURM node list without scontrol, one host per line; fails on bad syntax.
expand_nodelist_bash() {
    local items item
    items=$(split_nodelist "$1") || return 1
    while IFS= read -r item; do
        expand_node_item "$item" || return 1
    done <<<"$items"
}

# One host per line: SLURM's own expansion when scontrol is installed, else ours.
expand_nodelist() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1"
    else
        expand_nodelist_bash "$1"
    fi
}

# Number of GPUs torch sees, at least 1 (one CPU process otherwise).
visible_devices() {
    local count
    count=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())") || count=0
    ((count > 0)) && echo "$count" || echo 1
}

# Fill NNODES, NPROC, RDZV_HOST, RDZV_PORT, RDZV_ID, LOCAL_ADDR, MAX_RESTARTS from the scheduler.
read_slurm() {
    local hosts listing node_id
    SCHEDULER=slurm
    : "${SLURM_JOB_NODELIST:?SLURM_NNODES is set but SLURM_JOB_NODELIST is not}"
    listing=$(expand_nodelist "$SLURM_JOB_NODELIST") && [[ -n $listing ]] ||
        die "SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' is not a valid node list"
    mapfile -t hosts <<<"$listing"
    is_uint "$SLURM_NNODES" || die "SLURM_NNODES='$SLURM_NNODES' is not a number"
    ((SLURM_NNODES == ${#hosts[@]})) ||
        die "SLURM_NNODES=$SLURM_NNODES but SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' has ${#hosts[@]} host(s)"
    node_id=${SLURM_NODEID:-0}
    is_uint "$node_id" && ((node_id < ${#hosts[@]})) ||
        die "SLURM_NODEID='$node_id' is not an index into SLURM_JOB_NODELIST (${#hosts[@]} hosts)"
    NNODES=$SLURM_NNODES
    RDZV_HOST=${hosts[0]}
    LOCAL_ADDR=${hosts[node_id]}
    RDZV_ID=${SLURM_JOB_ID:-detector}
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]] && is_uint "$SLURM_GPUS_ON_NODE" && ((SLURM_GPUS_ON_NODE > 0)); then
        NPROC=$SLURM_GPUS_ON_NODE
    fi
}

read_kubeflow() {
    SCHEDULER=kubeflow
    if [[ -n ${PET_NNODES:-} ]]; then
        NNODES=$PET_NNODES
    elif [[ -n ${WORLD_SIZE:-} ]]; then
        NNODES=$WORLD_SIZE
    fi
    NPROC=${PET_NPROC_PER_NODE:-${NPROC:-}}
    if [[ -n ${PET_RDZV_ENDPOINT:-} ]]; then
        RDZV_HOST=${PET_RDZV_ENDPOINT%:*}
        [[ $PET_RDZV_ENDPOINT == *:* ]] && RDZV_PORT=${PET_RDZV_ENDPOINT##*:}
    else
        RDZV_HOST=${PET_MASTER_ADDR:-${MASTER_ADDR:-}}
        RDZV_PORT=${PET_MASTER_PORT:-${MASTER_PORT:-${RDZV_PORT:-}}}
    fi
    RDZV_ID=${PET_RDZV_ID:-detector}
    MAX_RESTARTS=${PET_MAX_RESTARTS:-$MAX_RESTARTS}
    LOCAL_ADDR=${POD_IP:-}
}

build_torchrun_args() {
    SCHEDULER=plain
    NNODES=1 NPROC="" RDZV_HOST="" RDZV_PORT=29500 RDZV_ID=detector LOCAL_ADDR="" MAX_RESTARTS=0
    if [[ -n ${SLURM_NNODES:-} && -n ${SLURM_JOB_ID:-} ]]; then
        read_slurm
    elif [[ -n ${PET_NNODES:-}${PET_MASTER_ADDR:-}${PET_RDZV_ENDPOINT:-} ]] ||
        [[ -n ${WORLD_SIZE:-} && -n ${RANK:-} && -n ${MASTER_ADDR:-} ]]; then
        read_kubeflow
    fi
    NNODES=${DETECTOR_NNODES:-$NNODES}
    NPROC=${DETECTOR_NPROC_PER_NODE:-$NPROC}
    RDZV_HOST=${DETECTOR_MASTER_ADDR:-$RDZV_HOST}
    RDZV_PORT=${DETECTOR_MASTER_PORT:-$RDZV_PORT}
    RDZV_ID=${DETECTOR_RDZV_ID:-$RDZV_ID}
    LOCAL_ADDR=${DETECTOR_LOCAL_ADDR:-$LOCAL_ADDR}
    MAX_RESTARTS=${DETECTOR_MAX_RESTARTS:-$MAX_RESTARTS}
    SHUTDOWN_TIMEOUT=${DETECTOR_SHUTDOWN_TIMEOUT:-100}

    [[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] ||
        die "number of nodes '$NNODES' ($SCHEDULER) is neither N nor MIN:MAX"
    [[ -n $NPROC ]] || NPROC=$(visible_devices)
    # besides a count torchrun accepts gpu, cpu and auto (Kubeflow's nprocPerNode may say so)
    [[ $NPROC =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]] ||
        die "processes per node '$NPROC' ($SCHEDULER) is neither a positive number nor gpu, cpu or auto"
    is_uint "$RDZV_PORT" || die "rendezvous port '$RDZV_PORT' ($SCHEDULER) is not a number"
    is_uint "$MAX_RESTARTS" || die "max restarts '$MAX_RESTARTS' is not a number"
    is_uint "$SHUTDOWN_TIMEOUT" || die "DETECTOR_SHUTDOWN_TIMEOUT='$SHUTDOWN_TIMEOUT' is not a number"

    TORCHRUN_ARGS=(--nnodes="$NNODES" --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS"
        --shutdown-timeout="$SHUTDOWN_TIMEOUT")
    if [[ $NNODES == 1 && -z $RDZV_HOST ]]; then
        TORCHRUN_ARGS+=(--standalone)
    else
        [[ -n $RDZV_HOST ]] ||
            die "no rendezvous host for $NNODES nodes ($SCHEDULER): set DETECTOR_MASTER_ADDR"
        TORCHRUN_ARGS+=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RDZV_ID")
        [[ -n $LOCAL_ADDR ]] && TORCHRUN_ARGS+=(--local-addr="$LOCAL_ADDR")
    fi
    return 0
}

main() {
    local root script status=0
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    script=$root/tools/train_net.py
    PYTHON=${DETECTOR_PYTHON:-python}
    build_torchrun_args
    local command=("$PYTHON" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" "$script" --resume "$@")
    if [[ -n ${DETECTOR_DRY_RUN:-} ]]; then
        printf '%q ' "${command[@]}"
        printf '\n'
        return 0
    fi
    echo "$PROG: $SCHEDULER node: ${command[*]}" >&2
    # a fresh rendezvous store per round: with torchrun's shared one, workers restarted after a
    # failure can read their dead predecessors' addresses and fail to connect
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    # workers that stop on a signal (also one sent to another node) write their status here
    DETECTOR_STOP_STATUS_FILE=$(mktemp)
    export DETECTOR_STOP_STATUS_FILE

    RECEIVED=0
    CHILD=""
    trap 'forward_signal TERM 15' TERM
    trap 'forward_signal INT 2' INT
    trap 'forward_signal HUP 1' HUP
    trap 'forward_signal QUIT 3' QUIT
    trap 'forward_signal TERM 10' USR1
    "${command[@]}" &
    CHILD=$!
    # a signal that came while torchrun was starting
    ((RECEIVED == 0)) || kill -TERM "$CHILD" 2>/dev/null || true
    # wait returns early (status > 128) whenever a trapped signal arrives; keep waiting for torchrun
    wait "$CHILD" || status=$?
    while ((status > 128)) && kill -0 "$CHILD" 2>/dev/null; do
        status=0
        wait "$CHILD" || status=$?
    done
    local stopped
    stopped=$(cat "$DETECTOR_STOP_STATUS_FILE" 2>/dev/null || true)
    rm -f "$DETECTOR_STOP_STATUS_FILE"
    if ((RECEIVED != 0 && status != 0)); then
        echo "$PROG: stopped by signal $RECEIVED (torchrun exited $status);" \
            "exiting $((128 + RECEIVED)) so the job can be retried" >&2
        exit $((128 + RECEIVED))
    fi
    if ((status != 0)) && [[ $stopped =~ ^[0-9]{3}$ ]] && ((stopped > 128 && stopped < 256)); then
        # another node was signalled: the workers here saved and stopped with it
        echo "$PROG: the workers stopped on a signal to another node (torchrun exited" \
            "$status); exiting $stopped so the job can be retried" >&2
        exit "$stopped"
    fi
    exit "$status"
}

# Send torchrun the signal it understands; remember the one received for the exit status.
forward_signal() {
    RECEIVED=$2
    [[ -n $CHILD ]] && kill "-$1" "$CHILD" 2>/dev/null
    return 0
}

# Sourcing the file (tests) defines the functions without starting anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
