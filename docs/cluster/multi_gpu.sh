#!/bin/bash
# lmclab on one machine with several GPUs: Ray on this machine, every step a Ray task.
#
#   bash docs/cluster/multi_gpu.sh                 # benko --preset paper on all GPUs and CPUs here
#   EXPERIMENT=singh bash docs/cluster/multi_gpu.sh
#
# Without --address, `lmclab run --executor ray` starts Ray on this machine with all its CPUs and GPUs and
# stops it at the end. Training takes one GPU per run by default, path evaluation a quarter of one,
# weight matching CPUs only; a preset's `resources` table changes that, e.g. for small models
#   [paper.resources]
#   training = { gpus = 0.25 }          # four small trainings share one GPU
# To see what would run (and what is already stored) first:
#   lmclab run "$EXPERIMENT" --preset paper --plan
set -euo pipefail

EXPERIMENT=${EXPERIMENT:-benko}
PRESET=${PRESET:-paper}
export LMCLAB_RUNS_DIR=${LMCLAB_RUNS_DIR:-$PWD/runs}
export OMP_NUM_THREADS=1   # each step sets torch's threads to its CPU share itself

lmclab run "$EXPERIMENT" --preset "$PRESET" --plan
lmclab run "$EXPERIMENT" --preset "$PRESET" --executor ray --json > "$EXPERIMENT-$PRESET.json"

# Or keep one Ray instance for several commands (and watch it with `ray status`):
#   ray start --head --num-gpus="$(nvidia-smi -L | wc -l)"
#   lmclab run benko --preset paper --executor ray --address auto
#   lmclab run singh --preset paper --executor ray --address auto
#   ray stop
