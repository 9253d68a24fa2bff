#!/bin/bash
# One qprsgd run on the hosts of a hostfile, without a scheduler.  Nothing to fill in:
#
#   HOSTFILE=hosts NTASKS=8 TASKS_PER_NODE=4 bash jobs/mpirun_hostfile.sh CONFIG OUT [qprsgd run options]
#
# Arguments: the experiment config, the run folder, then anything `qprsgd run` takes
# (e.g. --set train.lr=0.05 --set run.name=x, --resume), passed through unchanged.
# Variables:
#   HOSTFILE        (required) one host per line; Open MPI: "node1 slots=4", MPICH hydra: "node1:4"
#   NTASKS          (required) total MPI ranks
#   TASKS_PER_NODE  (required) ranks per host
#   QPRSGD_PYTHON   the Python with qprsgd installed (default: `python` on PATH, i.e. the active venv)
#   MPIRUN          the launcher (default: the one for the MPI library mpi4py loads in QPRSGD_PYTHON:
#                   Open MPI -> the first Open MPI `mpirun` on PATH; MPICH family -> the
#                   `mpiexec` next to QPRSGD_PYTHON (the bundled MPICH's hydra), else on PATH)
#   MPIRUN_ARGS     extra launcher options, e.g. "--allow-run-as-root --oversubscribe"
# Every rank gets OMP_NUM_THREADS=1 (unless set), PYTHONUNBUFFERED=1 and this shell's PATH,
# LD_LIBRARY_PATH, PYTHONPATH, VIRTUAL_ENV, MPI4PY_LIBMPI, MPI4PY_MPIABI and QPRSGD_* (Open MPI: -x;
# hydra forwards the whole environment).  The same Python environment (path) must exist on every
# host, and the hosts must reach each other by ssh without a password.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: HOSTFILE=... NTASKS=... TASKS_PER_NODE=... bash $0 CONFIG OUT [qprsgd run options]" >&2
  exit 2
fi
CONFIG=$1; OUT=$2; shift 2
for v in HOSTFILE NTASKS TASKS_PER_NODE; do
  if [ -z "${!v:-}" ]; then echo "$0: set $v (see the comments at the top)" >&2; exit 2; fi
done
PYTHON=${QPRSGD_PYTHON:-$(command -v python || true)}
if [ -z "${PYTHON}" ] || ! "${PYTHON}" -c "import qprsgd, h5py" 2>/dev/null; then
  echo "$0: '${PYTHON:-python}' cannot import qprsgd and h5py; activate the venv or set QPRSGD_PYTHON" >&2
  exit 2
fi
ABI=$("${PYTHON}" -c 'import os, mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; print(os.path.basename(MPI.__file__).split(".")[1])')
if [ -z "${MPIRUN:-}" ]; then
  if [ "${ABI}" = openmpi ]; then
    # the first Open MPI launcher on PATH (an active venv puts the bundled MPICH's mpirun first)
    for c in $(type -a -P mpirun mpirun.openmpi prterun 2>/dev/null || true); do
      if "$c" --version 2>&1 | grep -qi "open mpi"; then MPIRUN=$c; break; fi
    done
    MPIRUN=${MPIRUN:-mpirun}
  elif [ -x "$(dirname "${PYTHON}")/mpiexec" ]; then
    MPIRUN=$(dirname "${PYTHON}")/mpiexec
  else
    MPIRUN=mpiexec
  fi
fi
if "${MPIRUN}" --version 2>&1 | grep -qi "open mpi"; then KIND=openmpi; else KIND=mpich; fi
if [ "${KIND}" != "${ABI}" ]; then
  echo "$0: mpi4py loads the ${ABI} ABI but ${MPIRUN} is a ${KIND} launcher: every rank would be a 1-rank job." >&2
  echo "    Set MPIRUN to the library's own launcher, or MPI4PY_LIBMPI/MPI4PY_MPIABI (docs/cluster.md)." >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

if [ "${KIND}" = openmpi ]; then
  XARGS=(-x OMP_NUM_THREADS -x PYTHONUNBUFFERED)
  for v in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV MPI4PY_LIBMPI MPI4PY_MPIABI $(compgen -e | grep '^QPRSGD_' || true); do
    if [ -n "${!v:-}" ]; then XARGS+=(-x "$v"); fi
  done
  # shellcheck disable=SC2086
  exec "${MPIRUN}" ${MPIRUN_ARGS:-} -n "${NTASKS}" --hostfile "${HOSTFILE}" --map-by "ppr:${TASKS_PER_NODE}:node" \
    "${XARGS[@]}" "${PYTHON}" -m qprsgd.cli run "${CONFIG}" --out "${OUT}" "$@"
else
  # shellcheck disable=SC2086
  exec "${MPIRUN}" ${MPIRUN_ARGS:-} -n "${NTASKS}" -f "${HOSTFILE}" -ppn "${TASKS_PER_NODE}" -genvall \
    "${PYTHON}" -m qprsgd.cli run "${CONFIG}" --out "${OUT}" "$@"
fi
