"""The same input gives the same bytes whatever the array's memory alignment (BLAS reductions do
not: their summation order depends on it, which once made two identical runs differ)."""
import numpy as np
import pytest

from qprsgd.codecs import _numba_kernels as nk
from qprsgd.registry import CODECS


@pytest.mark.parametrize("use_numba", [False, True] if nk.enabled() else [False])
@pytest.mark.parametrize("name,params", [("block_sign", {}), ("sign", {}), ("qsgd", {}),
                                         ("stochastic_bits", {"b": 4})])
def test_payload_independent_of_alignment(monkeypatch, name, params, use_numba):
    monkeypatch.setattr(nk, "USE_NUMBA", use_numba)
    d = 100_003
    v = np.random.default_rng(1).standard_normal(d).astype(np.float32) * 3
    codec = CODECS.get(name).factory(d, (50_000, 50_003), **params)
    outs = set()
    for off in range(16):
        buf = np.empty(d + 16, np.float32)[off:off + d]
        buf[:] = v
        outs.add(codec.encode(buf, np.random.default_rng(7)).data.tobytes())
    assert len(outs) == 1
