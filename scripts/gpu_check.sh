#!/usr/bin/env bash
# The prepared check for a lent GPU machine (the `device` tool; docs/gpu.md, "On a lent GPU"):
# one call runs the GPU tests and the GPU benchmarks and leaves their output under $OUT.
#
#   here:   bash scripts/gpu_wheels.sh           # once: .whl/ with what the GPU image lacks
#   device: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The image's python3 (3.12) has torch, CuPy, numba-cuda, mpi4py, h5py, pyyaml, but not pydantic
# or an MPI library: the carried wheels go to /tmp/site (Python packages) and /tmp/mpich (MPICH:
# mpiexec, libmpi), and the checkout is imported from here (PYTHONPATH), not installed.  Each
# step has its own time bound and its exit status is written to $OUT/summary.txt; a failing step
# does not stop the others.  Steps: environment; pytest -m gpu (tests/test_gpu.py: cuda vs cpu vs
# cuda_host runs, buckets during backward, the refusal of more ranks than GPUs, SIGKILL resume,
# every CUDA codec's payload vs the CPU's); bench_codecs --backend cuda; bench_step --device cuda.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --prefix /tmp/mpich \
    .whl/mpich-*.whl || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls .whl/*.whl | grep -v '/mpich-') || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/mpich/bin:$PATH LD_LIBRARY_PATH=/tmp/mpich/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

step env 60 bash -c "nvidia-smi; which mpiexec; $PY -c 'import sys, torch, cupy, numba, mpi4py, h5py, pydantic
print(sys.version); print(\"torch\", torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))
print(\"cupy\", cupy.__version__, \"numba\", numba.__version__, \"mpi4py\", mpi4py.__version__, \"h5py\", h5py.__version__, \"pydantic\", pydantic.VERSION)
from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])'"
step gpu_tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step bench_codecs_cuda 90 "$PY" scripts/bench_codecs.py --backend cuda --xp cupy --d 10000000 --repeat 5 --no-resnet
step bench_step_cuda 150 "$PY" scripts/bench_step.py --device cuda --share-gpus --models resnet20 --ranks 1,2 \
  --algorithms psgd,qpr_sgd,dist_ef_blocksgdm --steps 40
cat "$OUT/summary.txt"
