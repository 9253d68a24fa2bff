"""The multi-threaded codec kernels against the single-thread ones (qprsgd/codecs/_numba_kernels.py,
the "Multi-threaded kernels" section): byte-identical payloads, bit-identical decoded vectors and
the same generator state for any thread count; the same CodecError (message included) on
malformed payloads; decode into a caller-provided buffer (``decode(data, out=...)``)."""
import subprocess
import sys

import numpy as np
import pytest

from qprsgd.codecs import CodecError
from qprsgd.codecs import _pcg64
from qprsgd.codecs.backends import numba_importable

if numba_importable():
    from qprsgd.codecs import _nb_core, _nb_qsgd
from qprsgd.registry import CODECS

needs_numba = pytest.mark.skipif(not numba_importable(), reason="numba kernels disabled")

SIZES = [1, 7, 1000, 300_001]


def make(name, d, threads, blocks=None, backend="numba", **params):
    e = CODECS.get(name)
    p = e.params(**params).model_dump() if e.params else {}
    c = e.factory(d, blocks, xp=np, backend=backend, threads=threads, **p)
    c.par_min_d = 0  # use the parallel kernels even for tiny d
    return c


def vec(d, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal(d).astype(np.float32)
    x[::5] *= np.float32(1e-3)
    x[::11] = -0.0
    return x


def outcome(f):
    try:
        return f()
    except CodecError as e:
        return ("CodecError", str(e))


def same_vec(a, b):
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# --- qsgd ---------------------------------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("s", [None, 1, 3, 2**20, 2**30])
@pytest.mark.parametrize("name", ["qsgd", "qsgd_scaled"])
def test_qsgd_parallel_equals_serial(name, d, s):
    p = {} if s is None else {"s": s}
    x = vec(d, seed=d)
    ref = make(name, d, 1, **p)
    ref.par_min_d = 1 << 60  # the original single-thread kernels throughout
    r0 = np.random.default_rng(11)
    r0.random(3, dtype=np.float32)  # odd offset: a buffered half-word at the start
    pr = ref.encode(x, r0)
    yr = ref.decode(pr.data)
    for nt in (1, 2, 3):
        c = make(name, d, nt, **p)
        r = np.random.default_rng(11)
        r.random(3, dtype=np.float32)
        pay = c.encode(x, r)
        assert pay.nbits == pr.nbits and pay.data.tobytes() == pr.data.tobytes(), nt
        assert r.bit_generator.state == r0.bit_generator.state  # same draws consumed
        assert same_vec(c.decode(pay.data), yr)
        # the table decoder of the serial path against the one-record reference kernel
        assert same_vec(ref.decode(pay.data), yr)


@needs_numba
def test_qsgd_parallel_large():
    d = 10_000_019
    x = vec(d, seed=3)
    a, b = make("qsgd", d, 1), make("qsgd", d, 2)
    a.par_min_d = 1 << 60
    ra, rb = np.random.default_rng(5), np.random.default_rng(5)
    pa, pb = a.encode(x, ra), b.encode(x, rb)
    assert pa.nbits == pb.nbits and np.array_equal(pa.data, pb.data)
    assert ra.random() == rb.random()
    out = np.full(d, np.nan, np.float32)
    y = b.decode(pb.data, out=out)
    assert y is out and same_vec(out, a.decode(pa.data))


@needs_numba
def test_reference_single_record_decoder_agrees():
    """The table-driven decoder (qsgd_decode_from) against the one-record kernel qsgd_decode on
    valid streams with every code length present."""
    d = 20_000
    for s in (1, 5, 63, 3000, 2**20):
        c = make("qsgd", d, 1, s=s)
        x = vec(d, seed=s) * np.float32(np.random.default_rng(s).random(d) ** 4)
        pay = c.encode(x, np.random.default_rng(s))
        words = c.impl.words(pay.data)
        norm = np.frombuffer(pay.data[:4].tobytes(), "<f4")[0]
        tab, nsc = c.impl._table(norm, 1.0)
        o1, o2 = np.empty(d, np.float32), np.empty(d, np.float32)
        r1 = _nb_qsgd.qsgd_decode(words, 8 * pay.nbytes, d, c.nmax, s, tab, nsc, float(s), o1)
        r2 = _nb_qsgd.qsgd_decode_from(words, 32, 0, 8 * pay.nbytes, d, c.nmax, s, tab, nsc, float(s),
                                 o2, *c.impl._fast())
        assert tuple(int(v) for v in r1) == tuple(int(v) for v in r2)
        assert same_vec(o1, o2)


def _mutations(data, rng):
    n = len(data)
    yield data[:-1]
    yield data[: n // 2]
    yield np.concatenate([data, np.zeros(1, np.uint8)])
    yield np.concatenate([data, np.full(9, 255, np.uint8)])
    for frac in (0.001, 0.25, 0.5, 0.5001, 0.75, 0.999):
        for bit in (0, 3, 7):
            m = data.copy()
            m[4 + int(frac * (n - 5))] ^= np.uint8(1 << bit)
            yield m
    m = data.copy()
    m[-1] |= 1  # padding
    yield m
    m = data.copy()
    m[n // 2: n // 2 + 64] = 0  # a long zero run at the split point
    yield m
    m = data.copy()
    m[n // 2: n // 2 + 64] = 255
    yield m
    yield rng.integers(0, 256, n, dtype=np.uint8)


@needs_numba
@pytest.mark.parametrize("s", [None, 3, 2**20])
def test_parallel_decoder_malformed_same_error(s):
    """Mutated payloads: the parallel decoder raises exactly the serial decoder's CodecError,
    or decodes exactly the same vector."""
    d = 300_001
    p = {} if s is None else {"s": s}
    ser, par, par3 = make("qsgd", d, 1, **p), make("qsgd", d, 2, **p), make("qsgd", d, 3, **p)
    data = ser.encode(vec(d, 1), np.random.default_rng(2)).data
    rng = np.random.default_rng(0)
    seen_err = 0
    for m in _mutations(data, rng):
        a = outcome(lambda: ser.decode(m))
        for c in (par, par3):
            b = outcome(lambda: c.decode(m))
            if isinstance(a, tuple) or isinstance(b, tuple):
                assert a == b
            else:
                assert same_vec(a, b)
        seen_err += isinstance(a, tuple)
    assert seen_err >= 5  # the mutations do reach the error paths


@needs_numba
def test_parallel_decoder_small_fuzz():
    """Tiny d with the parallel path forced: random bytes and bit flips, 2 and 3 threads."""
    rng = np.random.default_rng(4)
    for d in (1, 2, 7, 40):
        for s in (1, 2, 9):
            ser = make("qsgd", d, 1, s=s)
            pars = [make("qsgd", d, nt, s=s) for nt in (2, 3)]
            good = ser.encode(vec(d, d), np.random.default_rng(d)).data
            for trial in range(60):
                if trial % 3 == 0:
                    m = rng.integers(0, 256, rng.integers(0, 3 * len(good) + 2), dtype=np.uint8)
                    if len(m) >= 4:
                        m[:4] = good[:4]
                else:
                    m = good.copy()
                    m[rng.integers(0, len(m))] ^= np.uint8(1 << rng.integers(0, 8))
                a = outcome(lambda: ser.decode(m))
                for c in pars:
                    b = outcome(lambda: c.decode(m))
                    assert (a == b) if isinstance(a, tuple) or isinstance(b, tuple) \
                        else same_vec(a, b)


@needs_numba
def test_pcg64_segment_states():
    """Row t of pcg64_segment_states continues numpy's float32 stream at draw starts[t], with
    and without a buffered half-word at the start."""
    for pre in (0, 1, 2):
        r = np.random.default_rng(9)
        r.random(pre, dtype=np.float32)
        st, _ = _pcg64.state_of(r)
        starts = [0, 1, 2, 3, 2048, 4097, 100_001]
        rows = _pcg64.segment_states(st, starts)
        ref = r.random(100_010, dtype=np.float32)
        for t, e in enumerate(starts):
            u = np.empty(5, np.float32)
            _nb_core.pcg64_fill_f32(rows[t].copy(), u)
            assert np.array_equal(u, ref[e:e + 5]), (pre, e)


# --- block_sign / sign --------------------------------------------------------------------------

def _layouts(d, rng):
    yield None
    if d > 3:
        cuts = np.sort(rng.choice(np.arange(1, d), size=min(6, d - 1), replace=False))
        yield [int(v) for v in np.diff(np.concatenate([[0], cuts, [d]]))]
    if d > 20:
        yield [3, 5, 1] + [d - 9]


@needs_numba
@pytest.mark.parametrize("d", SIZES)
def test_block_sign_parallel_equals_numpy(d):
    rng = np.random.default_rng(d)
    x = vec(d, seed=d) * np.float32(7)
    for blocks in _layouts(d, rng):
        ref = make("block_sign", d, 1, blocks, backend="numpy")
        pr = ref.encode(x)
        yr = ref.decode(pr.data)
        for nt in (1, 2, 3, 5):
            c = make("block_sign", d, nt, blocks)
            pay = c.encode(x)
            assert pay.nbits == pr.nbits and pay.data.tobytes() == pr.data.tobytes(), (blocks, nt)
            assert same_vec(c.decode(pay.data), yr)
            out = np.empty(d, np.float32)
            assert c.decode(pay.data, out=out) is out and same_vec(out, yr)
    s_ref = make("sign", d, 1, backend="numpy")
    for nt in (1, 2):
        c = make("sign", d, nt)
        assert c.encode(x).data.tobytes() == s_ref.encode(x).data.tobytes()


@needs_numba
def test_block_sign_parallel_large_and_errors():
    d = 10_000_019
    x = vec(d, seed=8)
    a = make("block_sign", d, 1, None, backend="numpy", block_size=1 << 18)
    b = make("block_sign", d, 2, None, block_size=1 << 18)
    pa, pb = a.encode(x), b.encode(x)
    assert np.array_equal(pa.data, pb.data)
    out = np.empty(d, np.float32)
    assert same_vec(b.decode(pb.data, out=out), a.decode(pa.data))
    x[d - 3] = np.inf
    for c in (a, b):
        with pytest.raises(CodecError, match="NaN or Inf"):
            c.encode(x)
    x[d - 3] = np.nan
    for c in (a, b):
        with pytest.raises(CodecError, match="NaN or Inf"):
            c.encode(x)


# --- decode(out=) for every codec ---------------------------------------------------------------

CONFIGS = [("identity", {}), ("qsgd", {}), ("qsgd_scaled", {"s": 7}), ("qsgd_runlength", {}),
           ("stochastic_bits", {"b": 8}), ("stochastic_bits", {"b": 4}), ("sign", {}),
           ("block_sign", {}), ("topk", {"ratio": 0.1}), ("randk", {"ratio": 0.1}),
           ("bernoulli_p", {"p": 0.2})]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name,params", CONFIGS)
def test_decode_into_out(name, params, backend):
    if backend == "numba" and not numba_importable():
        pytest.skip("numba kernels disabled")
    if backend not in (CODECS.get(name).factory.IMPLS or {"numpy": None}):
        pytest.skip(f"{name} has no {backend} backend")
    d = 1001
    c = make(name, d, 2, [500, 501] if name == "block_sign" else None, backend=backend,
             **params)
    x = vec(d, seed=5)
    pay = c.encode(x, np.random.default_rng(1))
    fresh = c.decode(pay.data)
    out = np.full(d, np.float32(123.0))  # stale contents must not leak (sparse codecs)
    got = c.decode(pay.data, out=out)
    assert got is out and same_vec(out, fresh)
    assert c.decode(pay.data) is not fresh  # the default still returns a fresh array
    for bad in (np.empty(d, np.float64), np.empty(d + 1, np.float32),
                np.empty((d, 1), np.float32), np.empty(2 * d, np.float32)[::2], [0.0] * d):
        with pytest.raises(ValueError, match="out"):
            c.decode(pay.data, out=bad)
    ro = np.empty(d, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        c.decode(pay.data, out=ro)


# --- thread configuration -----------------------------------------------------------------------

def test_threads_argument(monkeypatch):
    """Threads are a constructor argument (default 1); the environment plays no part."""
    monkeypatch.setenv("QPRSGD_CODEC_THREADS", "5")
    assert CODECS.get("qsgd").factory(10, None).threads == 1
    assert CODECS.get("qsgd").factory(10, None, threads=3).threads == 3
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            CODECS.get("qsgd").factory(10, None, threads=bad)
    with pytest.raises(ValueError, match="backend"):
        CODECS.get("qsgd").factory(10, None, backend="gpu")
    with pytest.raises(ValueError, match="backend 'numba' is not implemented"):
        CODECS.get("randk").factory(10, None, backend="numba", k=2)


@needs_numba
def test_thread_count_does_not_change_bytes_across_processes():
    """The same payload from a process whose codecs run 1 thread and one with 2."""
    code = ("import sys, numpy as np, hashlib; from qprsgd.registry import CODECS; "
            "nt = int(sys.argv[1]); "
            "d = 400_003; x = np.random.default_rng(0).standard_normal(d).astype(np.float32); "
            "a = CODECS.get('qsgd').factory(d, None, threads=nt).encode(x, np.random.default_rng(1)).data; "
            "b = CODECS.get('block_sign').factory(d, (200_000, 200_003), threads=nt).encode(x).data; "
            "print(hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest())")
    outs = []
    for nt in ("1", "2"):
        r = subprocess.run([sys.executable, "-c", code, nt], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1] and len(outs[0]) == 64


@needs_numba
def test_parallel_decoder_resynchronises_without_serial_resume(monkeypatch):
    """On valid payloads the speculative segment always meets the true parse (directly or after
    a catch-up when it restarted past the split point): the serial decoder is never resumed, so
    the second thread's work is never thrown away.  s = 2**30 makes restarts happen."""
    from qprsgd.codecs._qsgd_numba import QSGDNumba

    resumed, caught = [], []
    orig_serial, orig_catch = QSGDNumba.decode_serial, _nb_qsgd.qsgd_catchup

    def serial(self, *a, **k):
        resumed.append(a)
        return orig_serial(self, *a, **k)

    def catch(*a):
        caught.append(a[1])
        return orig_catch(*a)

    monkeypatch.setattr(QSGDNumba, "decode_serial", serial)
    monkeypatch.setattr(_nb_qsgd, "qsgd_catchup", catch)
    d = 300_001
    for s in (None, 2**30):
        p = {} if s is None else {"s": s}
        c = make("qsgd", d, 2, **p)
        for seed in range(3):
            x = vec(d, seed)
            pay = c.encode(x, np.random.default_rng(seed))
            y = c.decode(pay.data)
            c.threads = 1
            assert same_vec(y, c.decode(pay.data))
            c.threads = 2
    n_serial_calls = 6  # the threads = 1 decodes above
    assert len(resumed) == n_serial_calls
    assert caught  # the catch-up path ran (and was then exact: compared above)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_codec_shared_by_threads(backend):
    """One codec used by several Python threads at once (as the in-process test clusters do):
    the per-thread scratch keeps every payload and decoded vector equal to a sequential run."""
    from concurrent.futures import ThreadPoolExecutor

    if backend == "numba" and not numba_importable():
        pytest.skip("numba kernels disabled")
    for name, d, blocks in [("block_sign", 20, (7, 13)), ("block_sign", 200_003, (100_000, 100_003)),
                            ("qsgd", 21, None), ("qsgd", 300_001, None)]:
        c = make(name, d, 2, blocks, backend=backend)
        c.par_min_d = 1 << 16
        xs = [vec(d, seed=k) for k in range(6)]

        def job(k):
            pay = c.encode(xs[k], np.random.default_rng(k))
            return pay.data.tobytes(), c.decode(pay.data).tobytes()

        seq = [job(k) for k in range(6)]
        for _ in range(3):
            with ThreadPoolExecutor(6) as ex:
                assert list(ex.map(job, range(6))) == seq, name
