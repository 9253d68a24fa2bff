#!/bin/bash
# One qprsgd run across machines listed in a hostfile, without a scheduler.
# Fill the @KEY@ placeholders (or export the variables) and run:  bash mpirun_hostfile.sh
#   HOSTFILE        one host per line ("node1:4" = 4 slots, MPICH hydra; Open MPI: "node1 slots=4")
#   NTASKS          total MPI ranks                    e.g. 8  (@TASKS@)
#   TASKS_PER_NODE  ranks per host                     e.g. 4  (@TASKS_PER_NODE@)
#   CONFIG, OUT     experiment config and run folder
# The same Python environment (path) must exist on every host (shared filesystem or identical
# installs), and the hosts must reach each other by ssh without a password.
set -euo pipefail

HOSTFILE=${HOSTFILE:-hostfile}
NTASKS=${NTASKS:-@TASKS@}
TASKS_PER_NODE=${TASKS_PER_NODE:-@TASKS_PER_NODE@}
CONFIG=${CONFIG:-@CONFIG@}
OUT=${OUT:-@OUT@}
PYTHON=${PYTHON:-$(command -v python)}
MPIRUN=${MPIRUN:-mpirun}

if "${MPIRUN}" --version 2>&1 | grep -qi "open mpi"; then
  # Open MPI
  exec "${MPIRUN}" -n "${NTASKS}" --hostfile "${HOSTFILE}" --map-by "ppr:${TASKS_PER_NODE}:node" \
    -x OMP_NUM_THREADS=1 -x PYTHONUNBUFFERED=1 -x PATH \
    "${PYTHON}" -m qprsgd.cli run "${CONFIG}" --out "${OUT}"
else
  # MPICH / Intel MPI (hydra)
  exec "${MPIRUN}" -n "${NTASKS}" -f "${HOSTFILE}" -ppn "${TASKS_PER_NODE}" \
    -genv OMP_NUM_THREADS 1 -genv PYTHONUNBUFFERED 1 \
    "${PYTHON}" -m qprsgd.cli run "${CONFIG}" --out "${OUT}"
fi
