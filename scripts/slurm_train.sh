#!/bin/bash
# Train on a SLURM cluster: one torchrun per node, one worker per GPU, automatic restarts after a
# worker crash, and a polite stop + requeue shortly before the time limit.
#
#   sbatch scripts/slurm_train.sh model=tinyllama_1b parallel.sp=8 data.seq_len=131072
#   sbatch --nodes=4 --time=48:00:00 scripts/slurm_train.sh hydra.run.dir=runs/exp1 ...
#
# Across nodes, shard ZeRO within a node and replicate across nodes (hybrid sharding), e.g.
#   sbatch scripts/slurm_train.sh parallel.sp=8 parallel.zero=3 parallel.shard_group=8
# The torchrun line below is the one tests/e2e/test_multinode.py runs as two "nodes" on one machine.
#
# Arguments are train.py overrides. Submit from the repository root (the run dir is relative to
# it); the same overrides always map to the same run dir, so a requeued or resubmitted job
# resumes from its newest checkpoint (checkpoint.resume=auto).
#
# What happens when:
# - A worker crashes: torchrun stops the others and restarts all of them, up to MAX_RESTARTS
#   times; they resume from `latest`. Any node's failure restarts every node (c10d rendezvous).
# - 120 s before the time limit SLURM sends SIGUSR1 to this script (--signal=B:USR1@120). The
#   trap forwards it through srun to every torchrun, which forwards it to its workers
#   (--signals-to-handle). The workers finish the current step, save a checkpoint, exit 0; then
#   this script requeues the job, which starts again from that checkpoint.
# - torchrun gives its workers --shutdown-timeout seconds after forwarding a signal, then
#   SIGKILLs them: keep it above one step plus one checkpoint save (and below the 120 s).
#
#SBATCH --job-name=ulysses
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts the per-GPU workers
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120          # SIGUSR1 to this script 120 s before the time limit
#SBATCH --requeue                    # allow `scontrol requeue` after a polite stop
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}  # seconds torchrun waits for a polite stop
RDZV_PORT=${RDZV_PORT:-29500}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# torch >= 2.5 shares torchrun's rendezvous store with the workers and keeps it across restarts,
# so restarted workers would read the dead ones' addresses: restarts need the sharing off.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Network settings across nodes (docs/fault-tolerance.md, "Several nodes"): uncomment what your cluster needs.
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0  # the interface the nodes reach each other on
# export NCCL_IB_HCA=mlx5_0:1,mlx5_1:1                 # InfiniBand adapters NCCL may use
# export NCCL_IB_DISABLE=1                             # IB off (sockets): only to rule IB out
# export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET     # log the transport/interface NCCL chose
# Collective timeout: the train.py override parallel.timeout_s (default 600 s).

STOPPING=0
on_usr1() {
    echo "$(date -Is) time limit near: asking the workers to save and stop"
    STOPPING=1
    kill -USR1 "${SRUN_PID:-}" 2>/dev/null  # srun forwards SIGUSR1 to every task (each torchrun)
}
trap on_usr1 USR1

srun --kill-on-bad-exit=0 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD:$RDZV_PORT" \
    --rdzv-id="ulysses-$SLURM_JOB_ID" \
    --max-restarts="$MAX_RESTARTS" \
    --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 \
    --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    train.py "$@" &
SRUN_PID=$!

# `wait` returns early when a trapped signal arrives: keep waiting until srun itself has ended.
while true; do
    wait "$SRUN_PID"
    STATUS=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ "$STOPPING" = 1 ]; then
    echo "$(date -Is) stopped with a checkpoint (srun exit $STATUS); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
