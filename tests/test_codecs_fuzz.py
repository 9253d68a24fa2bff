"""Fuzzing decode: random bytes and mutated valid payloads only ever raise CodecError.
A few hundred examples per codec in the default run; thousands under ``-m slow``.
GPU parity tests (cupy vs numpy) skip cleanly without CUDA."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qprsgd.codecs import CodecError
from qprsgd.registry import CODECS

CASES = [("identity", {}), ("qsgd", {}), ("qsgd", {"s": 2}), ("qsgd_scaled", {}),
         ("qsgd_runlength", {}), ("qsgd_runlength", {"s": 1}), ("stochastic_bits", {"b": 3}),
         ("stochastic_bits", {"b": 8}), ("stochastic_bits", {"b": 16}), ("sign", {}),
         ("block_sign", {"block_size": 5}), ("topk", {"k": 4}), ("randk", {"k": 4}),
         ("bernoulli_p", {"p": 0.3})]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES]


def make(name, d, **params):
    e = CODECS.get(name)
    p = e.params(**params).model_dump() if e.params else {}
    return e.factory(d, None, xp=np, **p)


def check(codec, data):
    try:
        y = codec.decode(np.frombuffer(bytes(data), np.uint8))
    except CodecError:
        return
    assert y.shape == (codec.d,) and y.dtype == np.float32 and np.isfinite(y).all()


def valid_payload(codec, seed):
    x = np.random.default_rng(seed).standard_normal(codec.d).astype(np.float32)
    return bytes(codec.encode(x, np.random.default_rng(seed)).data)


mutation = st.tuples(st.integers(0, 2**31), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)),
                                                     max_size=4), st.integers(-3, 3))


def run_fuzz(name, params, n):
    codec = make(name, 21, **params)

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.binary(max_size=200))
    def random_bytes(data):
        check(codec, data)

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutation)
    def mutated(m):
        seed, flips, dl = m
        data = bytearray(valid_payload(codec, seed % 50))
        for pos, bit in flips:
            if data:
                data[pos % len(data)] ^= 1 << bit
        data = data[:len(data) + dl] if dl < 0 else data + bytes(dl)
        check(codec, data)

    random_bytes()
    mutated()


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_fuzz_decode(name, params):
    run_fuzz(name, params, 150)


@pytest.mark.slow
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_fuzz_decode_slow(name, params):
    run_fuzz(name, params, 3000)


# -- GPU parity -------------------------------------------------------------------------------
def _cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("name,params", [c for c in CASES if c[0] != "randk"], ids=[i for c, i in zip(CASES, IDS) if c[0] != "randk"])
@pytest.mark.parametrize("d", [1, 13, 1000, 100_003])
def test_cupy_matches_numpy(name, params, d):
    cp = _cupy()
    e = CODECS.get(name)
    p = e.params(**params).model_dump() if e.params else {}
    cn = e.factory(d, None, xp=np, **p)
    cg = e.factory(d, None, xp=cp, **p)
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    pn = cn.encode(x, np.random.default_rng(2))
    pg = cg.encode(cp.asarray(x), np.random.default_rng(2))  # numpy draws drive the GPU path
    assert pg.nbits == pn.nbits
    assert np.array_equal(cp.asnumpy(pg.data), pn.data)
    assert np.array_equal(cp.asnumpy(cg.decode(cp.asarray(pn.data))), cn.decode(pn))
