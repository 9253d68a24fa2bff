"""Codec tests: exact bitstreams against independent reference encoders written from the
definitions in docs/codecs.md, bit counts, malformed payloads, and the papers' bounds by
Monte Carlo with tolerances derived from the sample variance."""
import math

import numpy as np
import pytest

from qprsgd.codecs import CodecError
from qprsgd.codecs import _bitstream as bs
from qprsgd.registry import CODECS


def make(name, d, blocks=None, **params):
    e = CODECS.get(name)
    p = e.params(**params).model_dump() if e.params else {}
    return e.factory(d, blocks, xp=np, **p)


def vectors(d, seed=0):
    rng = np.random.default_rng(seed)
    out = {"gauss": rng.standard_normal(d).astype(np.float32), "zeros": np.zeros(d, np.float32)}
    one = np.zeros(d, np.float32)
    one[d // 2] = -3.5
    out["one"] = one
    out["huge"] = (rng.standard_normal(d) * 1e30).astype(np.float32)
    out["tiny"] = (rng.standard_normal(d) * 1e-30).astype(np.float32)
    mixed = rng.standard_normal(d).astype(np.float32)
    mixed[::3] = 0.0
    mixed[1::5] = -0.0
    out["mixed"] = mixed
    return out


DS = [1, 2, 7, 13, 64, 257, 1000]


# -- reference encoders (Python strings of bits, element by element) ------------------------
def bits_to_bytes(bits: str) -> bytes:
    bits = bits + "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def gamma(k: int) -> str:
    b = bin(k)[2:]
    return "0" * (len(b) - 1) + b


def f32bits_le(v) -> str:
    return "".join(format(c, "08b") for c in np.float32(v).astype("<f4").tobytes())


def ref_qsgd_levels(x, s, u):
    norm = np.float32(math.sqrt(sum(float(v) ** 2 for v in x.astype(np.float64))))
    if norm == 0:
        return norm, [0] * len(x)
    c = np.float32(s / float(norm))
    zeta = []
    for xi, ui in zip(x, u):
        r = np.float32(abs(xi)) * c if np.isfinite(c) else np.float32(np.float32(abs(xi)) / norm) * np.float32(s)
        r = min(np.float32(s), r)
        lvl = math.floor(r)
        zeta.append(lvl + int(ui < np.float32(r - np.float32(lvl))))
    return norm, zeta


def ref_qsgd(x, s, u):
    norm, zeta = ref_qsgd_levels(x, s, u)
    bits = f32bits_le(norm)
    for xi, z in zip(x, zeta):
        bits += ("1" if xi < 0 else "0") + gamma(z + 1)
    vals = [np.float32(float(norm) * z / s) * (-1 if xi < 0 else 1) for xi, z in zip(x, zeta)]
    return bits, np.array(vals, np.float32)


def ref_runlength(x, s, u):
    norm, zeta = ref_qsgd_levels(x, s, u)
    nz = [i for i, z in enumerate(zeta) if z]
    d_le = "".join(f"{b:08b}" for b in np.uint32(len(x)).astype("<u4").tobytes())
    bits = f32bits_le(norm) + d_le + gamma(len(nz) + 1)
    prev = -1
    for i in nz:
        bits += gamma(i - prev) + ("1" if x[i] < 0 else "0") + gamma(zeta[i])
        prev = i
    return bits


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ["gauss", "zeros", "one", "huge", "tiny", "mixed"])
@pytest.mark.parametrize("s", [None, 1, 3, 100])
def test_qsgd_exact(d, kind, s):
    x = vectors(d)[kind]
    c = make("qsgd", d, s=s)
    u = np.random.default_rng(5).random(d, dtype=np.float32)
    p = c.encode(x, np.random.default_rng(5))
    bits, vals = ref_qsgd(x, c.s, u)
    assert p.nbits == len(bits) and len(p.data) == math.ceil(p.nbits / 8)
    assert p.data.tobytes() == bits_to_bytes(bits)
    y = c.decode(p)
    assert y.dtype == np.float32 and np.array_equal(y, vals)
    cs = make("qsgd_scaled", d, s=s)
    ps = cs.encode(x, np.random.default_rng(5))
    assert ps.data.tobytes() == p.data.tobytes()
    scale = 1 / (1 + d / (4 * c.s ** 2))
    norm, zeta = ref_qsgd_levels(x, c.s, u)
    ref = np.array([np.float32(float(norm) * scale * z / c.s) * (-1 if xi < 0 else 1)
                    for xi, z in zip(x, zeta)], np.float32)
    assert np.array_equal(cs.decode(ps), ref)
    cr = make("qsgd_runlength", d, s=s)
    pr = cr.encode(x, np.random.default_rng(5))
    rb = ref_runlength(x, c.s, u)
    assert pr.nbits == len(rb) and pr.data.tobytes() == bits_to_bytes(rb)
    assert np.array_equal(cr.decode(pr), vals)


def test_qsgd_nbits_formula_and_default_s():
    d = 11_173_962
    assert make("qsgd", d).s == 3343
    assert make("qsgd", 16).s == 4 and make("qsgd", 17).s == 5
    x = vectors(5000)["gauss"]
    c = make("qsgd", 5000)
    u = np.random.default_rng(1).random(5000, dtype=np.float32)
    norm, zeta, neg = c.quantize(x, u)
    z = zeta.astype(np.int64)
    assert c.encode(x, np.random.default_rng(1)).nbits == 32 + int(np.sum(2 + 2 * np.floor(np.log2(z + 1))))


def test_qsgd_large_multisegment_parse():
    """d large enough for many walkers; also force tiny segments so synchronization is exercised."""
    d = 300_000
    x = np.random.default_rng(2).standard_normal(d).astype(np.float32)
    x[1000:50_000] *= 100  # long codes in part of the vector
    for s in (None, 7, 100_000):
        c = make("qsgd", d, s=s)
        p = c.encode(x, np.random.default_rng(3))
        norm, zeta, neg = c.quantize(x, np.random.default_rng(3).random(d, dtype=np.float32))
        n2, z2, g2 = c.decode_levels(p)
        assert n2 == norm and np.array_equal(z2, zeta) and np.array_equal(g2, neg)
        words = bs.bytes_to_words(np, p.data)

        def reclen(pos):
            n = bs.gamma_n(np, bs.window(np, words, pos + 1))
            return 2 * n + 2, n > c.nmax

        for G in (64, 130, 1000):
            pos, lens = bs.parse_records(np, words, 32, 8 * len(p.data), d, reclen, 2, G=G)
            assert int(pos[-1] + lens[-1]) == p.nbits
            assert np.array_equal(np.diff(pos), lens[:-1])


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ["gauss", "zeros", "one", "huge", "tiny", "mixed"])
def test_block_sign_exact(d, kind):
    x = vectors(d)[kind]
    for blocks, codec in [((d,), make("sign", d)), ((d,), make("block_sign", d)),
                          (None, make("block_sign", d, block_size=3))]:
        if blocks is None:
            blocks = [3] * (d // 3) + ([d % 3] if d % 3 else [])
        p = codec.encode(x)
        off = np.concatenate([[0], np.cumsum(blocks)])
        scales = [np.float32(np.abs(x[a:b].astype(np.float64)).sum() / (b - a)) for a, b in zip(off, off[1:])]
        got = np.frombuffer(p.data[:4 * len(blocks)].tobytes(), "<f4")
        np.testing.assert_allclose(got, scales, rtol=2e-6, atol=0)
        bits = "".join("1" if v < 0 else "0" for v in x)
        assert p.data[4 * len(blocks):].tobytes() == bits_to_bytes(bits)
        assert p.nbits == 32 * len(blocks) + d and len(p.data) == math.ceil(p.nbits / 8)
        y = codec.decode(p)
        ref = np.concatenate([np.where(x[a:b] < 0, -g, g) for a, b, g in zip(off, off[1:], got)]).astype(np.float32)
        assert np.array_equal(y, ref) and not np.signbit(y[x == 0]).any()


def test_block_sign_uses_given_blocks_and_identity():
    rng = np.random.default_rng(4)
    blocks = [5, 1, 100, 37, 2]
    d = sum(blocks)
    c = make("block_sign", d, blocks=blocks)
    assert c.blocks == tuple(blocks) and c.encode(np.ones(d, np.float32)).nbits == 32 * 5 + d
    for _ in range(20):
        v = (rng.standard_normal(d) * rng.choice([1e-3, 1, 1e3], size=d)).astype(np.float32)
        err = float(np.sum((c.decode(c.encode(v)).astype(np.float64) - v) ** 2))
        off = np.concatenate([[0], np.cumsum(blocks)])
        v64 = v.astype(np.float64)
        ident = sum(np.sum(v64[a:b] ** 2) - np.sum(np.abs(v64[a:b])) ** 2 / (b - a) for a, b in zip(off, off[1:]))
        assert err == pytest.approx(ident, rel=1e-4, abs=1e-9 * np.sum(v64 ** 2))
        phi = min(np.sum(np.abs(v64[a:b])) ** 2 / ((b - a) * np.sum(v64[a:b] ** 2)) for a, b in zip(off, off[1:]))
        assert phi >= min(1 / b for b in blocks) - 1e-12
        assert err <= (1 - phi) * np.sum(v64 ** 2) * (1 + 1e-5)


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ["gauss", "zeros", "one", "huge", "tiny", "mixed"])
def test_sparse_exact(d, kind):
    x = vectors(d)[kind]
    k = max(1, d // 4)
    c = make("topk", d, k=k)
    p = c.encode(x)
    assert np.frombuffer(p.data[:4].tobytes(), "<u4")[0] == d
    idx = np.frombuffer(p.data[4:4 + 4 * k].tobytes(), "<u4").astype(np.int64)
    assert np.all(np.diff(idx) > 0)
    kept = np.sort(np.abs(x[idx]))
    assert np.array_equal(kept, np.sort(np.abs(x))[d - k:])
    ref = np.zeros(d, np.float32)
    ref[idx] = x[idx]
    assert p.nbits == 32 + 64 * k and np.array_equal(c.decode(p), ref)
    v64 = x.astype(np.float64)
    assert np.sum((ref - v64) ** 2) <= (1 - k / d) * np.sum(v64 ** 2) * (1 + 1e-6) + 1e-300
    # randk: idx = sorted(rng.choice(d, k, replace=False)); values v_i * float32(d/k)
    r = make("randk", d, ratio=0.3)
    p = r.encode(x, np.random.default_rng(7))
    ridx = np.sort(np.random.default_rng(7).choice(d, size=r.k, replace=False))
    ref = np.zeros(d, np.float32)
    ref[ridx] = x[ridx] * np.float32(d / r.k)
    assert p.nbits == 32 + 64 * r.k and len(p.data) == 4 + 8 * r.k and np.array_equal(r.decode(p), ref)
    # bernoulli_p: keep iff U_i < float32(p), U = rng.random(d, dtype=float32); value float32(z/p)
    b = make("bernoulli_p", d, p=0.4)
    p = b.encode(x, np.random.default_rng(8))
    keep = np.random.default_rng(8).random(d, dtype=np.float32) < np.float32(0.4)
    ref = np.where(keep, (x.astype(np.float64) / 0.4).astype(np.float32), 0).astype(np.float32)
    assert p.nbits == 64 + 64 * int(keep.sum()) and len(p.data) == p.nbits // 8
    assert np.array_equal(b.decode(p), ref)


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ["gauss", "zeros", "one", "huge", "tiny", "mixed"])
def test_stochastic_bits_exact(b, d, kind):
    x = vectors(d)[kind]
    c = make("stochastic_bits", d, b=b)
    p = c.encode(x, np.random.default_rng(9))
    u = np.random.default_rng(9).random(d, dtype=np.float32)
    m, M = np.float32(x.min()), np.float32(x.max())
    L = 2 ** b - 1
    bits = f32bits_le(m) + f32bits_le(M)
    zs = []
    for xi, ui in zip(x, u):
        if M > m:
            q = min(max((float(xi) - float(m)) * (L / (float(M) - float(m))), 0.0), L)
            z = math.floor(q) + int(float(ui) < q - math.floor(q))
        else:
            z = 0
        zs.append(z)
        bits += format(z, f"0{b}b")
    assert p.nbits == 64 + b * d == len(bits) and p.data.tobytes() == bits_to_bytes(bits)
    step = (float(M) - float(m)) / L
    ref = np.array([np.float32(float(m) + z * step) for z in zs], np.float32)
    assert np.array_equal(c.decode(p), ref)


ALL = [("identity", {}), ("qsgd", {}), ("qsgd_scaled", {}), ("qsgd_runlength", {}),
       ("stochastic_bits", {"b": 4}), ("sign", {}), ("block_sign", {"block_size": 4}),
       ("topk", {"k": 3}), ("randk", {"ratio": 0.5}), ("bernoulli_p", {"p": 0.5})]


@pytest.mark.parametrize("name,params", ALL)
def test_nan_inf_rejected_and_flags(name, params):
    c = make(name, 10, **params)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones(10, np.float32)
        x[3] = bad
        with pytest.raises(CodecError):
            c.encode(x, np.random.default_rng(0))
    with pytest.raises(CodecError):
        c.encode(np.ones(11, np.float32), np.random.default_rng(0))
    biased = {"topk", "sign", "block_sign", "qsgd_scaled"}
    assert c.unbiased == (name not in biased)


@pytest.mark.parametrize("name,params", ALL)
def test_malformed(name, params):
    d = 37
    c = make(name, d, **params)
    x = vectors(d)["gauss"]
    p = c.encode(x, np.random.default_rng(0))
    data = p.data
    with pytest.raises(CodecError):
        c.decode(data[:-1])  # truncated
    with pytest.raises(CodecError):
        c.decode(np.concatenate([data, np.zeros(1, np.uint8)]))  # extended
    with pytest.raises(CodecError):
        c.decode(np.zeros(0, np.uint8))
    with pytest.raises(CodecError):
        c.decode(data.astype(np.int16))


def test_malformed_specific():
    d = 20
    c = make("qsgd", d, s=3)
    x = vectors(d)["gauss"]
    p = c.encode(x, np.random.default_rng(0))
    nan = p.data.copy()
    nan[:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    with pytest.raises(CodecError, match="norm"):
        c.decode(nan)
    # level > s: s=3 allows gamma(4) (n=2); gamma(4) = 00100 means level 3, gamma(5) -> level 4
    bits = f32bits_le(1.0) + ("0" + gamma(5)) + ("0" + gamma(1)) * (d - 1)
    with pytest.raises(CodecError, match="level"):
        c.decode(np.frombuffer(bits_to_bytes(bits), np.uint8))
    bits = f32bits_le(1.0) + "0" + "0" * 40
    with pytest.raises(CodecError):
        c.decode(np.frombuffer(bits_to_bytes(bits), np.uint8))
    # nonzero padding bits
    ok = f32bits_le(1.0) + ("0" + gamma(1)) * d  # 32 + 40 bits -> exact bytes; make it odd
    c2 = make("qsgd", d - 1, s=3)
    b2 = bytearray(bits_to_bytes(f32bits_le(1.0) + ("0" + gamma(1)) * (d - 1)))
    b2[-1] |= 1
    with pytest.raises(CodecError, match="padding"):
        c2.decode(np.frombuffer(bytes(b2), np.uint8))
    assert np.array_equal(c.decode(np.frombuffer(bits_to_bytes(ok), np.uint8)), np.zeros(d, np.float32))
    # sparse: indices not increasing / out of range / NaN value
    t = make("topk", 10, k=2)
    for idx, vals, msg in [((3, 3), (1, 1), "increasing"), ((5, 2), (1, 1), "increasing"),
                           ((1, 10), (1, 1), "range"), ((1, 2), (np.nan, 1), "non-finite")]:
        data = np.concatenate([np.array((10,) + idx, "<u4").view(np.uint8),
                               np.array(vals, "<f4").view(np.uint8)])
        with pytest.raises(CodecError, match=msg):
            t.decode(data)
    bp = make("bernoulli_p", 10, p=0.5)
    with pytest.raises(CodecError, match="count 11"):
        bp.decode(np.array([10, 0, 0, 0, 11, 0, 0, 0] + [0] * 88, np.uint8))
    sb = make("stochastic_bits", 10, b=8)
    with pytest.raises(CodecError):
        sb.decode(np.concatenate([np.array([2.0, 1.0], "<f4").view(np.uint8), np.zeros(10, np.uint8)]))
    bsn = make("block_sign", 10, block_size=5)
    with pytest.raises(CodecError):
        bsn.decode(np.concatenate([np.array([-1.0, 1.0], "<f4").view(np.uint8), np.zeros(2, np.uint8)]))
    r = make("qsgd_runlength", 10, s=3)
    bits = f32bits_le(1.0) + f"{10:08b}" + "0" * 24 + gamma(2) + gamma(11) + "0" + gamma(1)  # 10 >= d
    with pytest.raises(CodecError, match="range"):
        r.decode(np.frombuffer(bits_to_bytes(bits), np.uint8))


def test_params_and_registry():
    e = CODECS.get("qsgd")
    assert e.params(s=5).s == 5
    with pytest.raises(Exception):
        e.params(s=0)
    with pytest.raises(Exception):
        e.params(q=1)
    with pytest.raises(Exception):
        CODECS.get("topk").params(k=3, ratio=0.1)
    assert make("topk", 100, ratio=0.1).k == 10
    for name in ["identity", "qsgd", "qsgd_scaled", "qsgd_runlength", "qsgd_ans", "stochastic_bits", "sign",
                 "block_sign", "topk", "randk", "bernoulli_p"]:
        assert name in CODECS.names()


def test_stochastic_codecs_reproducible():
    x = vectors(500)["gauss"]
    for name, params in ALL:
        c = make(name, 500, **params)
        a = c.encode(x, np.random.default_rng(11)).data
        b = c.encode(x, np.random.default_rng(11)).data
        assert np.array_equal(a, b)


# -- Monte Carlo bounds -----------------------------------------------------------------------
def mc(codec, v, n, seed):
    """n independent draws of decode(encode(v)).  The QSGD codecs go through quantize/values
    (the same functions encode/decode use; the bitstream round trip is tested exactly above)
    to keep the default run fast."""
    rng = np.random.default_rng(seed)
    if hasattr(codec, "quantize"):
        out = []
        for _ in range(n):
            norm, zeta, neg = codec.quantize(v, rng.random(v.shape[0], dtype=np.float32))
            out.append(codec.values(norm, zeta, neg, getattr(codec, "scale", 1.0)))
        codec.decode(codec.encode(v, rng))
        return np.stack(out).astype(np.float64)
    return np.stack([codec.decode(codec.encode(v, rng)) for _ in range(n)]).astype(np.float64)


@pytest.mark.parametrize("name,params", [("qsgd", {"s": 2}), ("qsgd", {}), ("qsgd_runlength", {"s": 3}),
                                         ("stochastic_bits", {"b": 2}), ("randk", {"k": 5}),
                                         ("bernoulli_p", {"p": 0.3})])
def test_unbiased_monte_carlo(name, params):
    d, n = 24, 3000
    v = np.random.default_rng(12).standard_normal(d).astype(np.float32)
    v[5] = 0
    c = make(name, d, **params)
    y = mc(c, v, n, 13)
    mean = y.mean(axis=0)
    se = y.std(axis=0, ddof=1) / math.sqrt(n)
    tol = 5 * se + 1e-6 * np.abs(v) + 1e-12
    assert np.all(np.abs(mean - v) <= tol), np.max(np.abs(mean - v) / tol)


@pytest.mark.parametrize("s", [1, 2, 5, None])
def test_qsgd_variance_and_sparsity_bounds(s):
    d, n = 64, 2000
    v = np.random.default_rng(14).standard_normal(d).astype(np.float32)
    c = make("qsgd", d, s=s)
    y = mc(c, v, n, 15)
    v64 = v.astype(np.float64)
    err = np.sum((y - v64) ** 2, axis=1)
    nv2 = np.sum(v64 ** 2)
    assert err.mean() - 5 * err.std(ddof=1) / math.sqrt(n) <= d / (4 * c.s ** 2) * nv2
    # exact variance: sum_i (norm/s)^2 p_i (1 - p_i)
    r = np.abs(v64) * c.s / np.linalg.norm(v64)
    pf = r - np.floor(r)
    exact = np.sum((np.linalg.norm(v64) / c.s) ** 2 * pf * (1 - pf))
    assert abs(err.mean() - exact) <= 5 * err.std(ddof=1) / math.sqrt(n) + 1e-6 * nv2
    nnz = (y != 0).sum(axis=1)
    assert nnz.mean() - 5 * nnz.std(ddof=1) / math.sqrt(n) <= min(c.s ** 2 + c.s * math.sqrt(d), d)
    bits = np.array([c.encode(v, np.random.default_rng(i)).nbits for i in range(50)])
    bound = 32 + 2 * d + d * math.log2((c.s ** 2 + 2 * c.s * math.sqrt(d) + d + d / 4) / d)
    assert bits.mean() <= bound


def test_runlength_smaller_when_sparse():
    d = 20_000
    v = np.random.default_rng(16).standard_normal(d).astype(np.float32)
    q = make("qsgd", d, s=4).encode(v, np.random.default_rng(0))
    r = make("qsgd_runlength", d, s=4).encode(v, np.random.default_rng(0))
    assert r.nbits < 0.5 * q.nbits
    full = make("qsgd", d).encode(v, np.random.default_rng(0))
    assert 3.2 < full.nbits / d < 3.4  # Gaussian at s = sqrt(d): ~3.29 bits/element (R1)


@pytest.mark.parametrize("name,params", ALL)
def test_warmup_leaves_the_codec_unchanged(name, params):
    """experiment.build calls warmup() before the first step; it must not change what the run sends."""
    d = 257
    x = vectors(d)["gauss"]
    cold = make(name, d, **params)
    warm = make(name, d, **params)
    warm.warmup()
    a, b = cold.encode(x, np.random.default_rng(7)), warm.encode(x, np.random.default_rng(7))
    assert a.nbits == b.nbits and a.data.tobytes() == b.data.tobytes()
    assert np.array_equal(cold.decode(a.data), warm.decode(b.data))


# --- payloads for another d; -0.0 headers; the sign and identity wire helpers --------------------

ALL = [("identity", {}), ("sign", {}), ("block_sign", {"block_size": 300}), ("qsgd", {"s": 31}),
       ("qsgd_scaled", {"s": 31}), ("qsgd_runlength", {"s": 31}), ("qsgd_ans", {"s": 31}), ("stochastic_bits", {"b": 5}),
       ("stochastic_bits", {"b": 8}), ("topk", {"k": 10}), ("randk", {"k": 10}),
       ("bernoulli_p", {"p": 0.1})]


def _backends(name):
    impls = CODECS.get(name).factory.IMPLS or {"numpy": None}
    from qprsgd.codecs.backends import numba_importable
    return [b for b in ("numpy", "numba") if b in impls and (b != "numba" or numba_importable())]


@pytest.mark.parametrize("name,params", ALL)
def test_payload_for_another_d_is_a_codec_error(name, params):
    """A payload encoded for d1 and decoded by a codec built for d2 != d1 raises CodecError in
    every codec and backend (sizes chosen so that byte counts coincide: 999/1000/1001/1003/1008).

    Exception, documented in docs/codecs.md: the fixed-length formats with sub-byte fields and no
    d field (sign, block_sign, stochastic_bits -- their bit counts are the papers' formulas) refuse
    another d only when its byte count differs."""
    ds = [999, 1000, 1001, 1003, 1008, 2000]
    fixed = name in ("sign", "block_sign", "stochastic_bits")
    for backend in _backends(name):
        codecs = {d: CODECS.get(name).factory(d, None, backend=backend, **params) for d in ds}
        for d1 in ds:
            x = np.random.default_rng(d1).standard_normal(d1).astype(np.float32)
            data = codecs[d1].encode(x, np.random.default_rng(0)).data
            for d2 in ds:
                if d2 == d1 or (fixed and codecs[d2].nbytes == codecs[d1].nbytes):
                    continue
                with pytest.raises(CodecError):
                    codecs[d2].decode(data)


@pytest.mark.parametrize("name", ["qsgd", "qsgd_scaled", "qsgd_runlength", "qsgd_ans", "sign",
                                  "block_sign"])
def test_negative_zero_header_refused_identically(name):
    """A norm (qsgd family) or scale (sign family) of -0.0 -- never produced by an encoder -- is a
    CodecError with the same message on every backend (it decoded to zeros of different signs on
    the numba and numpy paths)."""
    d = 257
    x = np.zeros(d, np.float32)
    x[3] = -1.0
    msgs = []
    for backend in _backends(name):
        c = CODECS.get(name).factory(d, None, backend=backend)
        data = c.encode(np.zeros(d, np.float32), np.random.default_rng(0)).data.copy()
        assert c.decode(data).tobytes() == np.zeros(d, np.float32).tobytes()  # +0.0 decodes
        data[3] |= 0x80  # float32 +0.0 -> -0.0 (little-endian: sign bit in byte 3)
        with pytest.raises(CodecError, match=r"\+0\.0") as e:
            c.decode(data)
        msgs.append(str(e.value))
    assert len(set(msgs)) == 1


def test_sign_wire_helpers_one_convention():
    """pack_signs is exactly the sign codec's sign bits (bit 1 = negative, sign(0) = sign(-0.0) =
    +1); unpack_signs inverts it; majority_signs votes with ties to +1."""
    from qprsgd.codecs.sign import majority_signs, pack_signs, unpack_signs

    d = 1001
    x = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    x[:4] = [0.0, -0.0, -1e-45, 1e-45]
    bits = pack_signs(x)
    for backend in _backends("sign"):
        p = CODECS.get("sign").factory(d, None, backend=backend).encode(x)
        assert bits.tobytes() == p.data[4:].tobytes()
    s = unpack_signs(bits, d)
    assert s[:4].tolist() == [1, 1, -1, 1]
    assert np.array_equal(s, np.where(x < 0, -1, 1).astype(np.float32))
    S = np.array([[1, -1, -1, 1], [-1, 1, -1, 1]], np.float32)
    assert unpack_signs(majority_signs([pack_signs(r) for r in S], 4), 4).tolist() == [1, 1, -1, 1]
    with pytest.raises(CodecError, match="padding"):
        unpack_signs(np.array([0xFF], np.uint8), 3)
    with pytest.raises(CodecError, match="bytes"):
        unpack_signs(np.zeros(2, np.uint8), 3)


def test_identity_raw_helpers_are_the_identity_wire():
    from qprsgd.codecs.identity import from_raw, raw_bytes

    d = 37
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    c = CODECS.get("identity").factory(d, None)
    assert raw_bytes(x).tobytes() == c.encode(x).data.tobytes()
    assert np.shares_memory(raw_bytes(x), x)                      # no copy on the hot path
    assert np.array_equal(from_raw(raw_bytes(x), d), x)
    with pytest.raises(CodecError, match="4\\*d"):
        from_raw(raw_bytes(x), d + 1)


@pytest.mark.parametrize("d,k", [(1, 1), (10, 3), (1000, 10), (1000, 1000), (300_001, 3000),
                                 (300_001, 70_000)])
@pytest.mark.parametrize("kind", ["gauss", "ties", "zeros", "sample_heavy"])
def test_topk_is_the_first_k_of_a_full_sort(d, k, kind):
    """Exact top-k on both backends: the indices are the first k of a full sort by (-|x_i|, i),
    sent ascending -- also with many ties (rounded values, +-0.0) and when the sampled threshold
    lets fewer than k elements through (sample_heavy: every sampled element is large, so the
    filter falls back to all elements)."""
    x = np.random.default_rng(d).standard_normal(d).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2).astype(np.float32)
        x[::7] *= -1
    elif kind == "zeros":
        x[:] = 0
        x[::3] = -0.0
    elif kind == "sample_heavy" and d > 4 * (1 << 16):
        x[::d // (1 << 16)] = 100.0
    want = np.sort(np.lexsort((np.arange(d), -np.abs(x.astype(np.float64))))[:k])
    for backend in _backends("topk"):
        c = CODECS.get("topk").factory(d, None, backend=backend, k=k)
        p = c.encode(x)
        idx = np.frombuffer(p.data[4:4 + 4 * k].tobytes(), "<u4")
        assert np.array_equal(idx, want), backend
        assert p.data[4 + 4 * k:].tobytes() == x[want].astype("<f4").tobytes()
    if _backends("topk")[-1] == "numba":
        bad = x.copy()
        bad[d // 2] = np.inf
        with pytest.raises(CodecError, match="NaN or Inf"):
            CODECS.get("topk").factory(d, None, backend="numba", k=k).encode(bad)
