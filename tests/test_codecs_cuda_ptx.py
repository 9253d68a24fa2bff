"""The qsgd family's CUDA kernels (qprsgd/codecs/_cuda_qsgd.py) compile to PTX for a real GPU
(sm_90) with the argument types the backends pass.  The simulator runs the kernels as Python, so
it cannot see what the CUDA target cannot type or lower (numba 0.68's built-in ``numba.cuda``
could not type the builtin ``min`` in device code); the integer-only kernels must also stay
clear of floating point.  This needs NVVM (a CUDA toolkit) but no GPU, and skips without it.
In a subprocess: ``numba.cuda`` must be imported without the simulator, and device functions
ask the (absent) current device for its compute capability, which is patched."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qprsgd.codecs.backends import numba_importable

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not numba_importable(), reason="numba not installed")]

SIGS = {
    "qsgd_codes": "void(float32[:], float32[:], int64, float32, float32, uint64[:], int64[:])",
    "rl_levels": "void(float32[:], float32[:], int64, float32, float32, uint64[:], uint8[:], "
                 "int64[:])",
    "rl_compact": "void(int64[:], int64[:], int64[:])",
    "rl_lens": "void(int64[:], uint64[:], int64[:])",
    "rl_write": "void(int64[:], uint64[:], uint8[:], int64[:], int64, int64, uint32[:])",
    "be_words": "void(uint8[:], int64, uint32[:])",
    "seg_spec": "void(uint32[:], int64[:], int64, int64, int64, int64, int64, uint32[:], "
                "int64[:], int64[:], int64[:])",
    "seg_fix": "void(uint32[:], int64[:], int64, int64, int64, int64, uint32[:], int64[:], "
               "int64[:], int64[:], int64[:], int64[:], int64[:])",
    "seg_count": "void(uint32[:], int64[:], int64[:])",
    "qsgd_values": "void(uint32[:], int64[:], int64[:], int64[:], int64, int64, float32[:], "
                   "float64, float64, float32[:], int64[:])",
    "rl_values": "void(uint32[:], int64[:], int64[:], int64[:], int64, int64, float32[:], "
                 "float64, float64, float32[:], int64[:], int64[:])",
    "rl_scatter": "void(float32[:], int64[:], int64[:], int64[:], int64, float32[:])",
    # the shared kernels of _cuda_kernels.py the qsgd encoder and stochastic_bits use
    "K.block_scan": "void(int64[:], int64[:], int64[:], int64)",
    "K.write_codes": "void(uint64[:], int64[:], int64[:], uint32[:])",
    "K.sbits_levels": "void(float32[:], float32[:], float64, float64, float64, int64[:])",
}

SCRIPT = r"""
import re, sys, types
from numba import cuda
import numba.cuda.dispatcher as D
D.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
def probe(a):
    a[0] = 1
try:
    cuda.compile_ptx(probe, "void(int64[:])", cc=(9, 0))
except Exception as e:  # no NVVM / toolkit
    print("no-nvvm", repr(e)[:300])
    sys.exit(77)
from qprsgd.codecs import _cuda_kernels as K
from qprsgd.codecs import _cuda_qsgd as Q
sigs = eval(sys.argv[1])
for name, sig in sigs.items():
    fn = getattr(K, name[2:]) if name.startswith("K.") else getattr(Q, name)
    ptx, _ = cuda.compile_ptx(fn.py_func, sig, cc=(9, 0))
    # integer-only kernels must not go through floating point (an int64/uint64 mix does)
    if name.startswith(("seg_", "rl_compact", "rl_lens", "rl_write", "be_words")):
        assert not re.search(r"\.f(32|64)\b", ptx), name
    print("ptx", name, len(ptx))
print("ptx ok", len(sigs))
"""


def test_cuda_qsgd_kernels_compile_to_ptx():
    from qprsgd.codecs import _cuda_qsgd as Q  # noqa: F401 (every kernel has a signature)

    kernels = {n for n, v in vars(Q).items() if hasattr(v, "py_func") and
               not getattr(v, "_device", False) and not n.startswith("_")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, repr(SIGS)], env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode == 77:
        pytest.skip("no NVVM: " + r.stdout.strip())
    assert r.returncode == 0 and "ptx ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert set(SIGS) >= kernels, kernels - set(SIGS)
