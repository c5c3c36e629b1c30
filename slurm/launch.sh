#!/usr/bin/env bash
# Run `lightning_simo fit` on every task of the current SLURM allocation, resuming after a requeue.
#
# Usage (from an sbatch script, see single_node.sbatch / multi_node.sbatch):
#   slurm/launch.sh CONFIG [extra lightning_simo fit arguments...]
#
# What it adds to the command line, so the Trainer matches the allocation and a requeued job picks
# up where it stopped:
#   --trainer.devices    SLURM's tasks per node   (Lightning refuses a mismatch)
#   --trainer.num_nodes  SLURM's node count
#   --trainer.strategy   $LIGHTNING_SIMO_STRATEGY (default ddp_find_unused_parameters_true)
#   --trainer.sync_batchnorm  $LIGHTNING_SIMO_SYNC_BN (default true): heads' BatchNorm
#                        statistics over the global batch, as on one GPU, identical on all ranks
#   --trainer.default_root_dir runs/$RUN_NAME     (stable across requeues; Lightning writes
#                        hpc_ckpt_<n>.ckpt there when SLURM signals the end of the time limit)
#   --trainer.logger.init_args.version $SLURM_JOB_ID  (one log folder across requeues; a
#                        requeued job keeps its id). Only for a config with one logger that has
#                        a version (TensorBoard, CSV, W&B); MLflow, several loggers or none get
#                        no such argument. LIGHTNING_SIMO_LOG_VERSION overrides the id ("" = off).
#   --ckpt_path hpc      only when runs/$RUN_NAME already holds an hpc_ckpt_*.ckpt
# Later arguments win, so anything in "extra arguments" overrides these.
#
# Environment:
#   RUN_NAME   run folder under $RUN_ROOT (default: the config path without configs/ and .yaml,
#              e.g. synthetic/merge); give each experiment its own name, or a finished run's
#              hpc checkpoint would be resumed.
#   RUN_ROOT   parent of run folders (default: runs).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [extra lightning_simo fit arguments...]" >&2
    exit 2
fi
config=$1
shift
if [[ ! -f "$config" ]]; then
    echo "$0: config not found: $config" >&2
    exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "$0: not inside a SLURM job; submit with: sbatch slurm/single_node.sbatch $config" >&2
    exit 2
fi

name=${RUN_NAME:-$config}
name=${name#configs/}
name=${name%.yaml}
name=${name%.yml}
root=${RUN_ROOT:-runs}/$name

nodes=${SLURM_NNODES:-1}
# SLURM_NTASKS_PER_NODE is set by --ntasks-per-node; SLURM_TASKS_PER_NODE reads like "4(x2)"
tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
tasks_per_node=${tasks_per_node%%(*}

# does the config's logger take a `version`? (one TensorBoard / CSV / W&B logger)
versioned=$("${PYTHON:-python3}" - "$config" <<'EOF'
import sys

import yaml

logger = ((yaml.safe_load(open(sys.argv[1])) or {}).get("trainer") or {}).get("logger")
name = logger.get("class_path", "") if isinstance(logger, dict) else ""
print(int(name.rsplit(".", 1)[-1] in ("TensorBoardLogger", "CSVLogger", "WandbLogger")))
EOF
)
log_version=${LIGHTNING_SIMO_LOG_VERSION-$SLURM_JOB_ID}

args=(
    fit --config "$config"
    --trainer.default_root_dir "$root"
    --trainer.devices "$tasks_per_node"
    --trainer.num_nodes "$nodes"
)
if [[ "$versioned" == 1 && -n "$log_version" ]]; then
    args+=(--trainer.logger.init_args.version "$log_version")
fi
if (( nodes * tasks_per_node > 1 )); then
    args+=(
        --trainer.strategy "${LIGHTNING_SIMO_STRATEGY:-ddp_find_unused_parameters_true}"
        --trainer.sync_batchnorm "${LIGHTNING_SIMO_SYNC_BN:-true}"
    )
fi
if compgen -G "$root/hpc_ckpt_*.ckpt" > /dev/null; then
    echo "$0: resuming from the requeue checkpoint in $root" >&2
    args+=(--ckpt_path hpc)
fi

mkdir -p "$root"
exec srun lightning_simo "${args[@]}" "$@"
