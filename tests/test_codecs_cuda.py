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
    randk, qsgd_ans; the other codecs refuse it naming the allowed backends."""
    from qprsgd.registry import CODECS

    for name in ("identity", "sign", "block_sign", "stochastic_bits", "qsgd", "qsgd_scaled",
                 "randk", "qsgd_ans"):
        assert "cuda" in CODECS.get(name).factory.IMPLS
    for name, p in (("qsgd_runlength", {}), ("topk", {"k": 1}),
                    ("bernoulli_p", {"p": 0.5})):
        with pytest.raises(ValueError, match="backend 'cuda' is not implemented"):
            CODECS.get(name).factory(10, None, backend="cuda", **p)
