#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels a lent GPU machine lacks, for scripts/gpu_check.sh.
#
# The GPU machine's image (Python 3.12, torch, CuPy, numba-cuda, mpi4py, h5py, pyyaml; no network)
# has no pydantic and no MPI library; this downloads them for CPython 3.12 / manylinux x86-64, at
# the versions installed in this checkout's .venv (the ones CI tests), plus mpi4py at the same
# version so the carried MPICH is the one it loads.  About 16 MB; the device tool carries at most
# 64 MiB with the working tree.  Run here (needs the package registry), then name `.whl` in the
# device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}
pins=$("$VENV_PY" - <<'PY'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "mpich",
         "mpi4py"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
mkdir -p .whl
for p in $pins; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p"
done
ls -la .whl
du -sh .whl
