"""The numba kernels (qprsgd/codecs/_numba_kernels.py) against the numpy path: byte-identical
payloads, bit-identical decoded vectors, the same generator state afterwards, the same errors on
malformed payloads; the inline PCG64 against numpy's Generator; backend selection."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qprsgd.codecs import CodecError
from qprsgd.codecs import _pcg64
from qprsgd.codecs.backends import numba_importable

if numba_importable():
    from qprsgd.codecs import _nb_core
from qprsgd.codecs.qsgd import norm_acc
from qprsgd.registry import CODECS

pytestmark = pytest.mark.skipif(not numba_importable(), reason="numba not installed")

QSGD_FAMILY = ["qsgd", "qsgd_scaled", "qsgd_runlength"]


def make(name, d, backend, **params):
    e = CODECS.get(name)
    p = e.params(**params).model_dump() if e.params else {}
    c = e.factory(d, None, xp=np, backend=backend, **p)
    return c


def vec(kind, d, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal(d).astype(np.float32)
    if kind == "zeros":
        x[:] = 0
    elif kind == "one":
        x[:] = 0
        x[d // 2] = -2.5
    elif kind == "huge":
        x *= np.float32(1e36)
    elif kind == "tiny":
        x *= np.float32(1e-41)  # subnormal
    elif kind == "mixed":
        x *= r.choice(np.array([1e-30, 1.0, 1e30], np.float32), size=d)
        x[::3] = -0.0
    return x


def outcome(f):
    try:
        return f()
    except CodecError as e:
        return ("CodecError", str(e))


def same_encode_decode(name, d, kind, s, rng_factory=lambda: np.random.default_rng(7)):
    p = {} if s is None else {"s": s}
    a, b = make(name, d, "numpy", **p), make(name, d, "numba", **p)
    x = vec(kind, d, seed=d)
    ra, rb = rng_factory(), rng_factory()
    pa = outcome(lambda: a.encode(x, ra))
    pb = outcome(lambda: b.encode(x, rb))
    if isinstance(pa, tuple) or isinstance(pb, tuple):
        assert pa == pb
        return
    assert pa.nbits == pb.nbits and pa.data.dtype == pb.data.dtype == np.uint8
    assert pa.data.shape == pb.data.shape == ((pa.nbits + 7) // 8,)
    assert np.array_equal(pa.data, pb.data)
    assert ra.random() == rb.random()  # the generators advanced identically
    ya, yb = a.decode(pa.data), b.decode(pa.data)
    assert ya.dtype == yb.dtype == np.float32
    assert np.array_equal(ya.view(np.uint32), yb.view(np.uint32))  # also the sign of zeros
    # decoding twice reuses the scratch buffers: same result, a fresh output each time
    yb2 = b.decode(pb.data)
    assert yb2 is not yb and np.array_equal(yb2.view(np.uint32), yb.view(np.uint32))


@pytest.mark.parametrize("name", QSGD_FAMILY)
@pytest.mark.parametrize("d", [1, 7, 1000])
@pytest.mark.parametrize("kind", ["gauss", "zeros", "one", "huge", "tiny", "mixed"])
@pytest.mark.parametrize("s", [1, 2, "sqrt", 2**20])
def test_numba_equals_numpy(name, d, kind, s):
    s = math.isqrt(d - 1) + 1 if s == "sqrt" else s
    same_encode_decode(name, d, kind, s)


@pytest.mark.parametrize("name", QSGD_FAMILY)
@pytest.mark.parametrize("kind,s", [("gauss", None), ("mixed", 3), ("gauss", 2**30)])
def test_numba_equals_numpy_large(name, kind, s):
    same_encode_decode(name, 300_000, kind, s)


@pytest.mark.parametrize("bitgen", [np.random.Philox, np.random.MT19937, np.random.SFC64])
def test_other_bit_generators_and_encode_with(bitgen):
    same_encode_decode("qsgd", 1001, "gauss", None, lambda: np.random.Generator(bitgen(3)))
    same_encode_decode("qsgd_runlength", 1001, "gauss", 5, lambda: np.random.Generator(bitgen(3)))
    x = vec("gauss", 513)
    u = np.random.default_rng(4).random(513, dtype=np.float32)
    for name in QSGD_FAMILY:
        pa = make(name, 513, "numpy").encode_with(x, u)
        pb = make(name, 513, "numba").encode_with(x, u)
        assert pa.nbits == pb.nbits and np.array_equal(pa.data, pb.data)


def test_nan_inf_and_overflow_errors_match():
    for name in QSGD_FAMILY:
        for bad in [np.nan, np.inf, -np.inf]:
            x = vec("gauss", 50)
            x[7] = bad
            ra, rb = np.random.default_rng(1), np.random.default_rng(1)
            ea = outcome(lambda: make(name, 50, "numpy").encode(x, ra))
            eb = outcome(lambda: make(name, 50, "numba").encode(x, rb))
            assert ea == eb and "NaN" in ea[1]
            assert ra.random() == rb.random()
        x = np.full(50, 3e38, np.float32)  # finite, but the norm overflows float32
        ra, rb = np.random.default_rng(1), np.random.default_rng(1)
        ea = outcome(lambda: make(name, 50, "numpy").encode(x, ra))
        eb = outcome(lambda: make(name, 50, "numba").encode(x, rb))
        assert ea == eb and "overflows" in ea[1]
        assert ra.random() == rb.random()
        with pytest.raises(CodecError, match="length"):
            make(name, 50, "numba").encode(np.zeros(49, np.float32), np.random.default_rng(0))
        with pytest.raises(CodecError, match="rng"):
            make(name, 50, "numba").encode(np.zeros(50, np.float32), None)


@pytest.mark.parametrize("d", [1, 7, 8, 9, 1000, 65536, 65543, 300_001])
def test_norm_sum_identical(d):
    r = np.random.default_rng(d)
    for scale in [1e-20, 1.0, 1e18]:
        x = (r.standard_normal(d) * scale).astype(np.float32)
        a, b = norm_acc(x, True), norm_acc(x, False)
        assert a == b
        # and it is the sum of squares (float64 rounding only)
        ref = float(np.sum(x.astype(np.float64) ** 2))
        assert abs(a - ref) <= 1e-12 * ref + 1e-300


@pytest.mark.parametrize("skip", [0, 1, 2, 3])
def test_inline_pcg64_equals_numpy(skip):
    """The encoder's inline generator is numpy's PCG64 float32 stream, including a buffered
    half word left by an odd number of earlier float32 draws, and the state written back."""
    rng, ref = np.random.default_rng(11), np.random.default_rng(11)
    rng.random(skip, dtype=np.float32)
    ref.random(skip, dtype=np.float32)
    for n in [1, 2, 7, 4096]:
        state, bg = _pcg64.state_of(rng)
        out = np.empty(n, np.float32)
        _nb_core.pcg64_fill_f32(state, out)
        _pcg64.store(bg, state)
        assert np.array_equal(out, ref.random(n, dtype=np.float32))
    assert rng.random() == ref.random() and rng.integers(1 << 62) == ref.integers(1 << 62)
    assert _pcg64.state_of(np.random.Generator(np.random.Philox(0))) == (None, None)


def gamma(k):
    n = k.bit_length() - 1
    return "0" * n + format(k, "b")


def to_bytes(bits):
    bits += "0" * (-len(bits) % 8)
    return np.frombuffer(bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)), np.uint8)


NORM1 = format(int.from_bytes(np.float32(1.0).astype("<f4").tobytes(), "big"), "032b")
D10 = "".join(f"{b:08b}" for b in np.uint32(10).astype("<u4").tobytes())  # runlength's d field


def both_raise(name, d, data, match, **params):
    ea = outcome(lambda: make(name, d, "numpy", **params).decode(data))
    eb = outcome(lambda: make(name, d, "numba", **params).decode(data))
    assert isinstance(eb, tuple), f"numba path accepted a malformed payload ({match})"
    assert ea == eb and match in eb[1], (ea, eb)


def test_malformed_messages_match():
    d = 12
    ok = NORM1 + ("0" + gamma(1)) * d
    both_raise("qsgd", d, to_bytes(ok)[:-1], "truncated", s=3)
    both_raise("qsgd", d, np.concatenate([to_bytes(ok), np.zeros(1, np.uint8)]), "extended", s=3)
    odd = NORM1 + ("0" + gamma(1)) * (d - 1)
    b = to_bytes(odd).copy()
    b[-1] |= 1
    both_raise("qsgd", d - 1, b, "padding", s=3)
    both_raise("qsgd", d, to_bytes(NORM1 + "0" + "0" * 10 + "1" + "0" * 60), "impossible", s=3)
    both_raise("qsgd", d, to_bytes(NORM1 + ("0" + gamma(5)) + ("0" + gamma(1)) * (d - 1)),
               "level", s=3)
    both_raise("qsgd", d, to_bytes("0" * 24), "truncated", s=3)
    nan = to_bytes(ok).copy()
    nan[:4] = np.frombuffer(np.float32(np.nan).astype("<f4").tobytes(), np.uint8)
    both_raise("qsgd", d, nan, "norm", s=3)
    # runlength: index out of range, level > s, count > d, record past the end
    both_raise("qsgd_runlength", 10, to_bytes(NORM1 + D10 + gamma(2) + gamma(11) + "0" + gamma(1)),
               "range", s=3)
    both_raise("qsgd_runlength", 10, to_bytes(NORM1 + D10 + gamma(2) + gamma(1) + "0" + gamma(4)),
               "level", s=3)
    both_raise("qsgd_runlength", 10, to_bytes(NORM1 + D10 + gamma(12) + "1" * 40), "non-zeros", s=3)
    both_raise("qsgd_runlength", 10, to_bytes(NORM1 + D10 + gamma(3) + gamma(1) + "0" + gamma(1)
                                              + "1" + "0"), "truncated", s=3)


CASES = [("qsgd", {}), ("qsgd", {"s": 2}), ("qsgd_scaled", {"s": 7}), ("qsgd_runlength", {}),
         ("qsgd_runlength", {"s": 1})]


def check_same(name, params, d, data):
    data = np.frombuffer(bytes(data), np.uint8)
    ra = outcome(lambda: make(name, d, "numpy", **params).decode(data))
    rb = outcome(lambda: make(name, d, "numba", **params).decode(data))
    if isinstance(ra, tuple) or isinstance(rb, tuple):
        assert isinstance(ra, tuple) and isinstance(rb, tuple), (ra, rb)
        assert ra == rb
    else:
        assert np.array_equal(ra.view(np.uint32), rb.view(np.uint32))
        assert np.isfinite(rb).all()


@pytest.mark.parametrize("name,params", CASES)
def test_fuzz_numba_matches_numpy(name, params):
    """Random bytes and mutated valid payloads: the numba path raises CodecError exactly when
    the numpy path does (with the same message) and otherwise decodes the same vector."""
    d = 21

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(st.binary(max_size=120))
    def random_bytes(data):
        check_same(name, params, d, data)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(st.integers(0, 2**31), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)),
                                           max_size=4), st.integers(-3, 3))
    def mutated(seed, flips, dl):
        x = vec("gauss", d, seed=seed % 97)
        data = bytearray(make(name, d, "numba", **params).encode(x, np.random.default_rng(seed))
                         .data.tobytes())
        for pos, bit in flips:
            data[pos % len(data)] ^= 1 << bit
        data = data[:len(data) + dl] if dl < 0 else data + bytes(dl)
        check_same(name, params, d, data)

    random_bytes()
    mutated()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["qsgd", "qsgd_runlength"])
def test_random_payload_never_hangs(name):
    """Large random and all-ones/all-zero payloads of the maximal length: the kernel stops at
    the first error (or decodes), bounded by the buffer."""
    d = 300_000
    c = make(name, d, "numba", s=2**20)
    r = np.random.default_rng(0)
    n = c.max_bytes()
    for data in [r.integers(0, 256, n, dtype=np.uint8), np.full(n, 255, np.uint8),
                 np.zeros(n, np.uint8), r.integers(0, 256, 4 + d // 4, dtype=np.uint8)]:
        data[:4] = np.frombuffer(np.float32(1.0).astype("<f4").tobytes(), np.uint8)
        try:
            y = c.decode(data)
        except CodecError:
            continue
        assert y.shape == (d,) and np.isfinite(y).all()


def test_backend_selection_env():
    code = ("from qprsgd.registry import CODECS; import numpy as np; "
            "print(CODECS.get('qsgd').factory(10, None, xp=np).backend)")
    env = dict(os.environ, QPRSGD_NO_NUMBA="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "numpy", out.stderr
    env.pop("QPRSGD_NO_NUMBA")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "numba", out.stderr


def test_warmup_compiles_the_kernels():
    """Codec.warmup() (called by experiment.build) must run the numba kernels, so their JIT compile
    or cache load is not timed inside step 0: checked in a fresh interpreter, where no kernel has a
    compiled signature before the call."""
    code = (
        "import numpy as np\n"
        "from qprsgd.codecs import _nb_qsgd as nq, _nb_sign as ns\n"
        "from qprsgd.registry import CODECS\n"
        "ks = [nq.qsgd_quantize_pack, nq.qsgd_decode_from, ns.block_sign_encode, ns.block_sign_decode]\n"
        "assert all(not k.signatures for k in ks), [k.signatures for k in ks]\n"
        "CODECS.get('qsgd').factory(1000, None, xp=np).warmup()\n"
        "assert nq.qsgd_quantize_pack.signatures and nq.qsgd_decode_from.signatures\n"
        "assert not ns.block_sign_encode.signatures\n"
        "CODECS.get('block_sign').factory(1000, (400, 600), xp=np).warmup()\n"
        "assert ns.block_sign_encode.signatures and ns.block_sign_decode.signatures\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "QPRSGD_NO_NUMBA"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_parallel_kernels_leave_torch_threads_alone():
    """A multi-threaded codec call must not change torch's intra-op thread count (numba's OpenMP
    layer did: torch.set_num_threads(1) became 2 after the first qsgd encode, and ranks sharing a
    node then oversubscribed it).  Fresh interpreter: the threading layer is chosen at first use."""
    code = (
        "import os\n"
        "import numpy as np, torch, numba\n"
        "torch.set_num_threads(1)\n"
        "from qprsgd.registry import CODECS\n"
        "for name in ('qsgd', 'block_sign'):\n"
        "    c = CODECS.get(name).factory(1 << 20, None, xp=np, threads=2)\n"
        "    p = c.encode(np.linspace(-1, 1, 1 << 20, dtype=np.float32), np.random.default_rng(0))\n"
        "    c.decode(p.data)\n"
        "    assert c._nt() == 2, c._nt()\n"
        "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
        "print(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("QPRSGD_NO_NUMBA", "NUMBA_THREADING_LAYER")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "workqueue", r.stdout + r.stderr


def test_parallel_context_sets_and_restores_threads():
    import numba
    before = numba.get_num_threads()
    with _nb_core.parallel(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
