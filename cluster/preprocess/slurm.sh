#!/bin/bash
# Slurm: start a Ray head on the first node and Ray workers on the others, then run the
# preprocessing job against that cluster.
#   DREAMACTOR_INPUT=s3://... DREAMACTOR_OUTPUT=s3://... sbatch cluster/preprocess/slurm.sh
# EDIT: the #SBATCH lines (nodes, GPUs, CPUs, partition, time) and the environment activation. Every node
# needs the GL loader packages for MediaPipe's GPU delegate (libegl1 libgles2 libglvnd0 libopengl0, installed by
# scripts/install.sh); a node without them fails the model stages at setup with that message.
#SBATCH --job-name=dreamactor-preprocess
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
# EDIT: activate the environment made by scripts/install.sh
# source /path/to/venv/bin/activate
: "${DREAMACTOR_INPUT:?set DREAMACTOR_INPUT to the raw videos (dir, glob, manifest or URI)}"
: "${DREAMACTOR_OUTPUT:?set DREAMACTOR_OUTPUT to the shard output (dir or URI)}"

# Ray's dashboard and job API run arbitrary code for whoever reaches them: every Ray process of this job uses
# token authentication (srun passes this environment to every node), and the dashboard listens on the head's
# localhost only (look at it with `ssh -L 8265:localhost:8265 <head node>`, token: `ray get-auth-token`).
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(umask 077; ray get-auth-token --generate 2>/dev/null)  # ~/.ray/auth_token (mode 600), made once
export RAY_AUTH_TOKEN

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=6379
export RAY_ADDRESS="$head_ip:$port"

srun --nodes=1 --ntasks=1 -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port=$port --dashboard-host=127.0.0.1 \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${SLURM_GPUS_PER_NODE:-0}" --block &
sleep 20
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$RAY_ADDRESS" \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="${SLURM_GPUS_PER_NODE:-0}" --block &
done
sleep 20
# The driver authenticates with the same RAY_AUTH_MODE / RAY_AUTH_TOKEN.
python preprocess/run.py +cluster=prod
