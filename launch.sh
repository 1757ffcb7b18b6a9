#!/usr/bin/env bash
# torchrun wrapper for train_ddp.py: one process per GPU (or a CPU/gloo run), one node or several.
# Every argument goes to train_ddp.py unchanged; the launch itself is configured by environment variables.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: [VAR=value ...] bash launch.sh [train_ddp.py options]

Starts train_ddp.py under torchrun with one process per visible GPU (NCCL). With no GPU it starts a CPU run
(gloo). Every argument is passed to train_ddp.py; run `python train_ddp.py --help` for the training options.

Environment:
  NPROC         processes on this node (default: the GPU count; on CPU 2 with at least 4 cores, else 1)
  NNODES        number of nodes (default 1: a standalone single-node run), or MIN:MAX for an elastic job
                (e.g. 1:2): when a node is lost, torchrun re-forms the group with the nodes left (at least MIN)
                and the run resumes from the newest checkpoint on the new number of processes, with the same
                global batch (NODE_RANK is then assigned by the rendezvous and ignored)
  NODE_RANK     this node's rank, 0 .. NNODES-1 (default 0)
  MASTER_ADDR   host of the c10d rendezvous; required when NNODES > 1 (e.g. the first node's address)
  MASTER_PORT   port of the c10d rendezvous (default 29500)
  RDZV_ID       rendezvous id shared by all nodes of one job (default mlm-ddp)
  SOCKET_IFNAME network interface the nodes reach each other on (e.g. eth0, ib0): sets GLOO_SOCKET_IFNAME and
                NCCL_SOCKET_IFNAME when they are unset (needed where the hostname resolves to 127.0.1.1)
  MAX_RESTARTS  torchrun --max-restarts: after a worker fails or is killed, restart the group this many times;
                each restart resumes from the newest complete checkpoint (default 3)
  OMP_NUM_THREADS  threads per process; on CPU it defaults to cores / NPROC
  PYTHON        the interpreter, run as PYTHON -m torch.distributed.run (default: torchrun on the PATH)
  LAUNCH_DRY_RUN=1  print the torchrun command instead of running it

Examples:
  bash launch.sh --model_name_or_path bert-base-uncased --output_dir outputs/bert-wt2
  NPROC=2 bash launch.sh --train_file my.txt --max_train_steps 1000
  # two nodes with 8 GPUs each; run on both, NODE_RANK=0 on node-a and NODE_RANK=1 on node-b:
  NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a MASTER_PORT=29500 bash launch.sh --config run.yaml
  # under SLURM: sbatch examples/slurm/train.sbatch --config configs/wikitext103-bert-base.yaml
Several nodes: only global rank 0 writes output_dir, and every rank reads it to resume, so put it on a shared
filesystem; --cache_scope node (default) prepares downloads and the data cache once per node.
EOF
}

fail() {  # one line on stderr, exit 2 (the same convention as train_ddp.py)
    echo "launch.sh: error: $*" >&2
    exit 2
}

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python || command -v python3 || true)}"
[[ -n "$python" ]] || fail "no python found; set PYTHON to the interpreter that has torch installed"

count_visible() {  # count_visible LIST PHYSICAL: the GPUs CUDA makes visible from a CUDA_VISIBLE_DEVICES value
    # CUDA reads the list up to its first invalid entry: an empty one ("0,1," is two GPUs), -1, an index that
    # is not a GPU of this machine, or a repeated index. UUIDs (GPU-..., MIG-...) are taken as given.
    local n=0 tok entries seen=","
    IFS=, read -ra entries <<<"${1//[[:space:]]/}"
    for tok in "${entries[@]}"; do
        if [[ "$tok" =~ ^[0-9]+$ ]]; then
            (( 10#$tok < $2 )) && [[ "$seen" != *",$((10#$tok)),"* ]] || break
            seen+="$((10#$tok)),"
        elif [[ ! "$tok" =~ ^(GPU|MIG)- ]]; then
            break
        fi
        n=$(( n + 1 ))
    done
    echo "$n"
}

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        local physical
        physical="$(nvidia-smi -L | grep -c '^GPU ' || true)"
        if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
            # nvidia-smi ignores CUDA_VISIBLE_DEVICES, so a restricted set is counted from the variable.
            count_visible "$CUDA_VISIBLE_DEVICES" "$physical"
        else
            echo "$physical"
        fi
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" && -z "$CUDA_VISIBLE_DEVICES" ]]; then
        echo 0  # an empty list hides every GPU: no need to spend 2 s importing torch to hear it
    else  # no driver tool: ask torch (it honours CUDA_VISIBLE_DEVICES)
        "$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
    fi
}

# GNU nproc reports OMP_NUM_THREADS when it is set; the cores usable by this process are wanted here.
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
gpus="$(count_gpus)"
if [[ -n "${NPROC:-}" ]]; then
    is_count "$NPROC" || fail "NPROC must be a whole number of processes >= 1, got '$NPROC'"
    nproc_per_node="$NPROC"
elif (( gpus > 0 )); then
    nproc_per_node="$gpus"
else
    # CPU DDP is for trying the distributed path, not for speed: each process wants at least two threads
    # for its matmuls, and more processes than core pairs only adds all-reduce traffic. So 2 processes
    # (enough to exercise DDP) when there are 4 or more cores, else 1.
    nproc_per_node=$(( cores >= 4 ? 2 : 1 ))
fi
if (( gpus == 0 )) && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    # torchrun would set 1 thread per process, which leaves most cores idle in a CPU run.
    threads=$(( cores / nproc_per_node ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

nnodes_spec="${NNODES:-1}"
[[ "$nnodes_spec" =~ ^([1-9][0-9]*)(:([1-9][0-9]*))?$ ]] || \
    fail "NNODES must be a whole number of nodes >= 1, or MIN:MAX (e.g. 1:2), got '$nnodes_spec'"
min_nodes="${BASH_REMATCH[1]}"
nnodes="${BASH_REMATCH[3]:-$min_nodes}"  # the most nodes the job may have
(( min_nodes <= nnodes )) || fail "NNODES=$nnodes_spec: MIN must not exceed MAX"
max_restarts="${MAX_RESTARTS:-3}"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS must be a whole number >= 0, got '$max_restarts'"

if [[ -z "${PYTHON:-}" ]] && command -v torchrun >/dev/null 2>&1; then
    torchrun=(torchrun)
else
    torchrun=("$python" -m torch.distributed.run)
fi
cmd=("${torchrun[@]}" "--nproc_per_node=$nproc_per_node" "--max-restarts=$max_restarts")
if (( nnodes > 1 )); then
    [[ -n "${MASTER_ADDR:-}" ]] || fail "NNODES=$nnodes needs MASTER_ADDR, the rendezvous host (e.g. the first" \
        "node's address); set MASTER_ADDR (and MASTER_PORT, default 29500) on every node"
    port="${MASTER_PORT:-29500}"
    if (( min_nodes < nnodes )); then  # elastic: the rendezvous numbers the nodes
        cmd+=("--nnodes=$min_nodes:$nnodes")
    else
        node_rank="${NODE_RANK:-0}"
        [[ "$node_rank" =~ ^[0-9]+$ ]] && (( node_rank < nnodes )) || \
            fail "NODE_RANK must be in 0..$(( nnodes - 1 )), got '$node_rank'"
        cmd+=("--nnodes=$nnodes" "--node_rank=$node_rank")
    fi
    cmd+=("--rdzv_backend=c10d" "--rdzv_endpoint=$MASTER_ADDR:$port" "--rdzv_id=${RDZV_ID:-mlm-ddp}")
else
    cmd+=(--standalone)  # a private rendezvous on a free port: MASTER_ADDR and MASTER_PORT are not needed
fi
cmd+=("$here/train_ddp.py" "$@")

# The network interface gloo (the control group, CPU runs) and NCCL use between nodes. Without one, gloo binds
# to the address the hostname resolves to, 127.0.1.1 on Debian-style hosts, and a multi-node run hangs.
if [[ -n "${SOCKET_IFNAME:-}" ]]; then
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}"
fi
ifnames=()
for var in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
    [[ -n "${!var:-}" ]] && ifnames+=("$var=${!var}")
done
if (( nnodes > 1 )) && [[ -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
    own="$(getent hosts "$(hostname)" 2>/dev/null | awk '{print $1; exit}' || true)"
    if [[ "$own" == 127.* ]]; then
        echo "launch.sh: warning: $(hostname) resolves to $own, a loopback address the other nodes cannot reach;" \
            "set SOCKET_IFNAME to this node's network interface (see ip -br addr), e.g. SOCKET_IFNAME=eth0" >&2
    fi
fi

if (( gpus > 0 )); then device="$gpus GPU(s), nccl"; else device="cpu, gloo, OMP_NUM_THREADS=$OMP_NUM_THREADS"; fi
echo "launch.sh: $nnodes_spec node(s) x $nproc_per_node process(es) ($device)${ifnames:+; ${ifnames[*]}}" >&2
if [[ "${LAUNCH_DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${ifnames[@]}" "${cmd[@]}"
    echo
    exit 0
fi
# Check the options once here: a bad value would otherwise fail every torchrun restart attempt in turn.
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m mlm.config "$@" || exit $?
# A user error found later (a data file without its text column, say) would fail every restart too, its line
# printed each time: train_ddp.py notes it in MLM_USER_ERROR_FILE, a restarted attempt that finds the note ends
# at once without a word, and the launch exits 2, as a plain run does. Signals reach torchrun as they reach us.
user_error_file="$(mktemp "${TMPDIR:-/tmp}/mlm-user-error.XXXXXX")"
export MLM_USER_ERROR_FILE="$user_error_file"
"${cmd[@]}" &
child=$!
for sig in TERM INT HUP; do
    trap 'kill -'"$sig"' "$child" 2>/dev/null' "$sig"
done
code=0
wait "$child" || code=$?
while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends the wait early: torchrun is still stopping
    code=0
    wait "$child" || code=$?
done
if [[ -s "$user_error_file" ]]; then
    code=2
fi
rm -f "$user_error_file"
exit "$code"
