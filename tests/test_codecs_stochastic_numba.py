"""stochastic_bits: the numba kernels against the numpy path -- byte-identical payloads, identical
decoded vectors, identical generator state after encode, identical CodecErrors."""
import numpy as np
import pytest

from qprsgd.codecs import _pcg64
from qprsgd.codecs.backends import numba_importable

if numba_importable():
    from qprsgd.codecs import _nb_sbits
from qprsgd.codecs.base import CodecError
from qprsgd.codecs.stochastic_bits import StochasticBits

pytestmark = pytest.mark.skipif(not numba_importable(), reason="numba kernels disabled")

BS = [1, 2, 3, 4, 7, 8, 12, 16]
DS = [1, 7, 1000, 300001]
KINDS = ["gaussian", "constant", "one_nonzero", "huge_tiny"]


def pair(d, b):
    a = StochasticBits(d, b=b, backend="numba")
    c = StochasticBits(d, b=b, backend="numpy")
    assert a.backend == "numba"
    return a, c


def vector(kind, d, seed=0):
    g = np.random.default_rng(seed)
    if kind == "gaussian":
        return g.standard_normal(d).astype(np.float32)
    if kind == "constant":
        return np.full(d, -1.7, dtype=np.float32)
    if kind == "one_nonzero":
        x = np.zeros(d, dtype=np.float32)
        x[d // 2] = 3.25
        return x
    x = (g.standard_normal(d) * 1e-30).astype(np.float32)  # tiny values, two extremes
    x[0] = 3.0e38
    x[-1] = -3.0e38 if d > 1 else x[-1]
    return x


def same_f32(a, b):
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("b", BS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", KINDS)
def test_numba_matches_numpy(b, d, kind):
    x = vector(kind, d, seed=b * 1000 + d)
    nb, npy = pair(d, b)
    r1, r2 = np.random.default_rng(11), np.random.default_rng(11)
    p1, p2 = nb.encode(x, r1), npy.encode(x, r2)
    assert p1.nbits == p2.nbits == 64 + b * d
    assert p1.data.dtype == np.uint8 and np.array_equal(p1.data, p2.data)
    assert r1.bit_generator.state == r2.bit_generator.state
    v1, v2 = nb.decode(p1), npy.decode(p2)
    assert v1.dtype == np.float32 and same_f32(v1, v2)
    out = np.full(d, np.nan, dtype=np.float32)
    assert nb.decode(p1.data.tobytes(), out=out) is out and same_f32(out, v2)
    # the next encode continues the same stream
    assert np.array_equal(nb.encode(x, r1).data, npy.encode(x, r2).data)


@pytest.mark.parametrize("b", [3, 8, 16])
def test_buffered_half_and_other_generators(b):
    d = 4097
    x = vector("gaussian", d, 3)
    nb, npy = pair(d, b)
    r1, r2 = np.random.default_rng(4), np.random.default_rng(4)
    r1.random(1, dtype=np.float32)  # leaves a buffered 32-bit half in the generator
    r2.random(1, dtype=np.float32)
    assert np.array_equal(nb.encode(x, r1).data, npy.encode(x, r2).data)
    assert r1.bit_generator.state == r2.bit_generator.state
    for bg in (np.random.Philox, np.random.MT19937):  # drawn into an array, not inline
        g1, g2 = np.random.Generator(bg(5)), np.random.Generator(bg(5))
        assert np.array_equal(nb.encode(x, g1).data, npy.encode(x, g2).data)
        assert g1.integers(2**62, size=4).tolist() == g2.integers(2**62, size=4).tolist()
    u = np.random.default_rng(9).random(d, dtype=np.float32)
    assert np.array_equal(nb.encode_with(x, u).data, npy.encode_with(x, u).data)


def test_draws_match_numpy_for_every_start_and_length():
    for pre in (0, 1):
        for n in (0, 1, 2, 3, 2047, 2048, 2049, 5000):
            g = np.random.default_rng(7)
            g.random(pre, dtype=np.float32)
            st, _ = _pcg64.state_of(g)
            u = np.empty(max(n, 1), dtype=np.float32)
            hi, lo, has, buf = _nb_sbits._sbits_draws(st[0], st[1], st[2], st[3], st[4], st[5], u, n)
            want = g.random(n, dtype=np.float32)
            assert same_f32(u[:n], want)
            s = g.bit_generator.state
            assert (int(hi) << 64 | int(lo)) == s["state"]["state"]
            assert (int(has), int(buf)) == (s["has_uint32"], s["uinteger"])


def errors(codec, data):
    try:
        codec.decode(data)
    except CodecError as e:
        return str(e)
    return None


@pytest.mark.parametrize("b", [3, 8, 16])
def test_malformed_payloads_same_errors(b):
    d = 13
    nb, npy = pair(d, b)
    good = nb.encode(vector("gaussian", d), np.random.default_rng(0)).data
    flat = nb.encode(np.full(d, 2.0, np.float32), np.random.default_rng(0)).data
    bad = {"truncated": good[:-1], "extended": np.concatenate([good, [0]]).astype(np.uint8),
           "empty": good[:0]}
    h = good.copy()
    h[:4] = np.array([np.nan], "<f4").view(np.uint8)
    bad["nan_min"] = h
    h = good.copy()
    h[4:8] = np.array([np.inf], "<f4").view(np.uint8)
    bad["inf_max"] = h
    h = good.copy()
    h[:8] = np.array([1.0, -1.0], "<f4").view(np.uint8)
    bad["min_gt_max"] = h
    h = flat.copy()
    h[8] = 0x80
    bad["level_when_flat"] = h
    if (b * d) % 8:
        h = good.copy()
        h[-1] |= 1
        bad["padding"] = h
    bad["wrong_dtype"] = good.astype(np.int16)
    for what, data in bad.items():
        e1, e2 = errors(nb, data), errors(npy, data)
        assert e1 is not None and e1 == e2, what


def test_input_errors_and_rng_untouched():
    d = 100
    nb, npy = pair(d, 4)
    x = vector("gaussian", d)
    for bad in (np.where(np.arange(d) == 5, np.nan, x).astype(np.float32),
                np.where(np.arange(d) == 7, -np.inf, x).astype(np.float32)):
        r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
        with pytest.raises(CodecError) as e1:
            nb.encode(bad, r1)
        with pytest.raises(CodecError) as e2:
            npy.encode(bad, r2)
        assert str(e1.value) == str(e2.value)
        assert r1.bit_generator.state == r2.bit_generator.state == \
            np.random.default_rng(1).bit_generator.state
    for args in ((x[:-1], np.random.default_rng(0)), (x, None)):
        with pytest.raises(CodecError) as e1:
            nb.encode(*args)
        with pytest.raises(CodecError) as e2:
            npy.encode(*args)
        assert str(e1.value) == str(e2.value)
    with pytest.raises(ValueError, match="out"):
        nb.decode(nb.encode(x, np.random.default_rng(0)), out=np.empty(d, np.float64))


def test_float64_input_and_env_switch(monkeypatch):
    d = 1001
    nb, npy = pair(d, 7)
    x = np.random.default_rng(2).standard_normal(d)  # float64: the numpy path's semantics
    assert np.array_equal(nb.encode(x, np.random.default_rng(3)).data,
                          npy.encode(x, np.random.default_rng(3)).data)
    monkeypatch.setenv("QPRSGD_NO_NUMBA", "1")
    assert StochasticBits(d, b=7).backend == "numpy"
