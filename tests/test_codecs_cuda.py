"""The CUDA backends' kernels in numba's CUDA simulator (no GPU needed), byte for byte against the
numpy backend: tests/cuda_sim_check.py in a fresh interpreter with NUMBA_ENABLE_CUDASIM=1 (the
variable must be set before numba.cuda is imported, hence the subprocess).  The real-GPU run is
``scripts/bench_codecs.py --backend cuda`` and tests/test_gpu.py on a machine with CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qprsgd.codecs.backends import numba_importable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not numba_importable(), reason="numba not installed")


def _run(*args, timeout=600):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_sim_check.py"), *args],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "cuda-sim ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_cuda_kernels_match_cpu_in_simulator_quick():
    _run("--quick")


@pytest.mark.slow
def test_cuda_kernels_match_cpu_in_simulator_full():
    _run()


def test_cuda_backend_selection():
    """backend='cuda' exists for identity, sign, block_sign, stochastic_bits, qsgd, qsgd_scaled,
    qsgd_runlength, qsgd_ans, randk, topk, bernoulli_p: every registered codec; a backend that
    does not exist is refused naming the allowed ones."""
    from qprsgd.registry import CODECS

    names = CODECS.names()
    assert {"identity", "qsgd", "qsgd_ans", "topk", "bernoulli_p", "qsgd_runlength"} <= set(names)
    for name in names:
        assert "cuda" in CODECS.get(name).factory.IMPLS, name
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        CODECS.get("qsgd").factory(10, None, backend="gpu")


def test_cuda_sparse_kernels_compile_to_ptx():
    """Every kernel of _cuda_sparse compiles with NVVM for sm_90 at the argument types the
    backends launch it with: the simulator runs the Python source and checks no CUDA typing
    (an integer promotion or an unsupported builtin passes there and fails on a GPU).  Needs
    the CUDA toolkit's NVVM, not a GPU; skipped without it."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("numba's CUDA simulator is on in this process")
    from numba import cuda, types as T

    try:
        cuda.compile_ptx(lambda a: None, T.void(T.Array(T.int32, 1, "C")), cc=(9, 0))
    except Exception as e:  # noqa: BLE001 - any failure of the trivial kernel: no NVVM here
        pytest.skip(f"NVVM unavailable: {type(e).__name__}")
    from numba.cuda.dispatcher import CUDADispatcher

    from qprsgd.codecs import _cuda_sparse as S

    a = lambda t: T.Array(t, 1, "C")  # noqa: E731
    u8, u32, i32, i64, u64 = T.uint8, T.uint32, T.int32, T.int64, T.uint64
    f32, f64 = T.float32, T.float64
    sigs = {
        "zero": [(a(u32),)],
        "nonfinite_flag": [(a(u32), a(i32))],
        "gather_sample": [(a(u32), i64, a(u32))],
        "filter_keys": [(a(u32), u32, a(u64), a(i64))],
        "radix_hist": [(a(u64), i64, u64, u64, u64, a(i64))],
        "mark_le": [(a(u64), i64, u64, a(u32))],
        "keep_words": [(a(f32), f32, a(u32))],
        "popc_scan": [(a(u32), a(i64), a(i64), i64)],
        "emit": [(a(u32), a(i64), a(i64), i64, a(u32), a(f32), i64, f64, i64, i64, i64, a(u32),
                  a(f32), a(i32))],
        "check_records": [(a(u8), i64, i64, i64, a(i32))],
        "scatter_records": [(a(u8), i64, i64, a(u32))],
    }
    kernels = {n for n, v in vars(S).items() if isinstance(v, CUDADispatcher)}
    assert kernels == set(sigs), kernels ^ set(sigs)
    for name, variants in sigs.items():
        for sig in variants:
            ptx, _ = cuda.compile_ptx(getattr(S, name).py_func, T.void(*sig), cc=(9, 0))
            assert ".entry" in ptx, name
