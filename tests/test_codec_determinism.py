"""The same input gives the same bytes whatever the array's memory alignment (BLAS reductions do
not: their summation order depends on it, which once made two identical runs differ)."""
import numpy as np
import pytest

from qprsgd.codecs.backends import numba_importable
from qprsgd.registry import CODECS


@pytest.mark.parametrize("backend", ["numpy", "numba"] if numba_importable() else ["numpy"])
@pytest.mark.parametrize("name,params", [("block_sign", {}), ("sign", {}), ("qsgd", {}),
                                         ("stochastic_bits", {"b": 4})])
def test_payload_independent_of_alignment(name, params, backend):
    d = 100_003
    v = np.random.default_rng(1).standard_normal(d).astype(np.float32) * 3
    codec = CODECS.get(name).factory(d, (50_000, 50_003), backend=backend, threads=2, **params)
    outs = set()
    for off in range(16):
        buf = np.empty(d + 16, np.float32)[off:off + d]
        buf[:] = v
        outs.add(codec.encode(buf, np.random.default_rng(7)).data.tobytes())
    assert len(outs) == 1
