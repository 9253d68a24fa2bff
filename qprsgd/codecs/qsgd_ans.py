"""``qsgd_ans``: QSGD's quantizer (qsgd.py: the same norm, levels, draws) with the signed levels
entropy-coded by rANS under a static table sent in the message.

Symbols: each element's signed level, alphabet of A = 2E + 1 symbols, E = min(max level, s,
E_MAX - 1) + 1:  0 for level 0 (no sign: a zero has none);  2z - 1 for +z and 2z for -z,
1 <= z < E;  2E - 1 / 2E for an escaped level z >= E (+ / -), whose value follows in the escape
section.  Frequencies are the symbol counts scaled to M = 2^14 (every symbol that occurs gets
>= 1; the rounding remainder goes to the most frequent symbols).

Wire (byte-aligned; nbits = 8 * bytes, nothing to pad):
  bytes 0-3   norm, float32 LE (as qsgd; must be finite and not sign-negative)
  bytes 4-7   d, uint32 LE (a payload for another d is a CodecError)
  bytes 8-9   E, uint16 LE (1 <= E <= min(s, E_MAX - 1) + 1)
  table       A = 2E + 1 frequencies as LEB128 varints (7 bits per byte, low first); they must
              sum to M
  lengths     C = ceil(d / 2^20) uint32 LE: the byte length of each chunk's rANS stream
  streams     chunk t (elements t 2^20 .. min(d, (t+1) 2^20) - 1) as its own rANS stream with
              two interleaved 32-bit states (element i of the chunk: state i mod 2), L = 2^23,
              byte renormalisation; the encoder's final states first (state 0, state 1, 4 bytes
              each, big-endian); its decoder must end with both states at L having read
              exactly its length
  escapes     one uint32 LE (z - E) per escaped element, in element order; exactly the number
              of escape symbols, z <= s
Decoded value: float32(float64(norm) * z / s) with the element's sign (+0.0 for level 0).

Backends: ``numba`` (``_nb_ans``: one fused quantize/symbol/histogram pass with inline PCG64
draws, then the chunks' streams encoded / decoded on up to ``threads`` threads) and ``numpy``
(the vectorized qsgd quantizer, then the same rANS kernels of ``_ans_kernels`` interpreted: a
slow sequential reference for small d; bytes identical).
"""
from __future__ import annotations


import numpy as np

from ..registry import CODECS
from . import _ans_kernels as A
from .base import CodecError, Payload
from .qsgd import QSGDParams, _QSGDBase, draw_uniform32

E_MAX = 1024     # direct levels 0..E_MAX-1; larger levels escape (32 bits each)


def quantize_freqs(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies summing to M, >= 1 where the count is > 0 (deterministic)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    f = (counts * A.M) // total
    f[(counts > 0) & (f == 0)] = 1
    diff = A.M - int(f.sum())
    order = np.lexsort((np.arange(counts.shape[0]), -counts))   # most frequent first
    j = 0
    while diff != 0:
        a = order[j % order.shape[0]]
        if diff > 0:
            f[a] += diff
            diff = 0
        elif f[a] > 1:
            take = min(-diff, int(f[a]) - 1)
            f[a] -= take
            diff += take
        j += 1
    return f


def _varints(f: np.ndarray) -> bytes:
    out = bytearray()
    for v in f.tolist():
        while True:
            b = v & 127
            v >>= 7
            out.append(b | (128 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_varints(data: np.ndarray, p: int, n: int, what: str):
    vals = np.zeros(n, dtype=np.int64)
    for k in range(n):
        v, sh = 0, 0
        while True:
            if p >= data.shape[0]:
                raise CodecError(f"{what}: payload truncated (frequency table)")
            b = int(data[p])
            p += 1
            v |= (b & 127) << sh
            sh += 7
            if not b & 128:
                break
            if sh > 14:
                raise CodecError(f"{what}: frequency varint too long")
        vals[k] = v
    return vals, p


class _AnsNumpy:
    """The vectorized quantizer, then the vectorized reference coder of ``_ans_kernels``."""

    def __init__(self, c):
        self.c = c

    def symbols(self, x, rng, u, Ecap, syms):
        """(norm, counts, zmax, escape values) with syms[:] filled."""
        c = self.c
        if u is None:
            x = c._check_input(x)
            u = draw_uniform32(c.xp, rng, c.d)
        norm, zeta, neg = c.quantize(x, u)
        z = np.asarray(zeta).astype(np.int64)
        ng = np.asarray(neg).astype(np.int64)
        esc = z >= Ecap
        syms[:] = np.where(z == 0, 0, np.where(esc, 2 * Ecap - 1 + ng, 2 * z - 1 + ng))
        counts = np.bincount(syms, minlength=2 * Ecap + 1).astype(np.int64)
        return norm, counts, int(z.max()), (z[esc] - Ecap).astype(np.uint32)

    def encode_streams(self, syms, pl, ec, buf, hi):
        return A.encode_ref(syms, pl, ec, buf, hi)

    def decode_streams(self, data, offs, pl, tab, esc0, esc1, out32, escpos):
        return A.decode_ref(data, offs, pl, tab, esc0, esc1, out32, escpos)


class _AnsNumba:
    """Compiled kernels (``_nb_ans``): one fused draws/quantize/symbol/histogram pass (the qsgd
    encoder's input checks), then the chunks' streams, on up to ``threads`` threads."""

    def __init__(self, c):
        from . import _nb_ans, _nb_core
        from ._qsgd_numba import QSGDNumba

        self.c, self.k, self.core = c, _nb_ans, _nb_core
        self.q = QSGDNumba(c)   # input checks, norm and draws in the qsgd order
        self.simd = _nb_ans.SIMD    # the AVX-512 group loops (tests switch them off)

    def _nt(self, nch):
        return max(1, min(self.c.threads, nch))

    def symbols(self, x, rng, u, Ecap, syms):
        from . import _pcg64
        from .qsgd import _Given

        c = self.c
        x, norm, mode, cc, uu, state, bg = self.q.prepare(x, rng if u is None else _Given(u))
        escv = c._scratch_arr("escv", c.d, np.uint32)
        nch = c.plan[0].shape[0]
        nt = self._nt(nch)
        per = -(-nch // nt) * c.chunk_elems       # segments of whole chunks: escapes in order
        bounds = np.array([min(c.d, t * per) for t in range(nt)] + [c.d], dtype=np.int64)
        use_pcg = bg is not None
        states = _pcg64.segment_states(state, bounds[:-1]) if use_pcg else \
            np.zeros((nt, 6), dtype=np.uint64)
        jmp = self.k.jump_consts(state) if use_pcg else np.zeros(8, dtype=np.uint64)
        counts = np.zeros((nt, 2 * Ecap + 1), dtype=np.int64)
        res = np.zeros((nt, 2), dtype=np.int64)
        with self.core.parallel(nt):
            self.k.quantize_symbols_par(x, uu, bounds, states, jmp, use_pcg, mode, cc,
                                        np.float32(c.s), Ecap, syms, counts, escv, res)
        if use_pcg:
            _pcg64.store(bg, states[-1])
        if nt == 1:
            esc = escv[:res[0, 1]]
        else:
            esc = np.concatenate([escv[bounds[t]:bounds[t] + res[t, 1]] for t in range(nt)])
        return norm, counts.sum(axis=0), int(res[:, 0].max()), esc

    def encode_streams(self, syms, pl, ec, buf, hi):
        starts = np.zeros(pl[0].shape[0], dtype=np.int64)
        with self.core.parallel(self._nt(starts.shape[0])):
            self.k.encode_chunks(syms, *pl, ec, buf, hi, starts, self.simd)
        return starts

    def decode_streams(self, data, offs, pl, tab, esc0, esc1, out32, escpos):
        res = np.zeros((pl[0].shape[0], 2), dtype=np.int64)
        with self.core.parallel(self._nt(res.shape[0])):
            self.k.decode_chunks(data, offs, *pl, tab, np.uint64(esc0), np.uint64(esc1), out32,
                                 escpos, res, self.simd)
        return res


def _cuda_ans(c):
    from ._cuda_ans import QSGDAnsCuda

    return QSGDAnsCuda(c)


@CODECS.register("qsgd_ans", params=QSGDParams)
class QSGDAns(_QSGDBase):
    """Q_s (as qsgd) with the signed levels rANS-coded under a per-message static table
    (float32 norm, uint32 d, table, per-chunk rANS streams of up to 32 interleaved lanes,
    escapes)."""

    name = "qsgd_ans"
    IMPLS = {"numpy": _AnsNumpy, "numba": _AnsNumba, "cuda": _cuda_ans}
    chunk_elems = A.CHUNK_ELEMS     # the format's constants; tests may shrink them on an
    lane_elems = A.LANE_ELEMS       # instance (every backend reads them from here)

    @property
    def plan(self):
        """(first element, elements, lanes) per chunk."""
        key = (self.chunk_elems, self.lane_elems)
        if getattr(self, "_plan_key", None) != key:
            self._plan = A.plan(self.d, *key)
            self._plan_key = key
        return self._plan

    @property
    def nch(self) -> int:
        return int(self.plan[0].shape[0])

    @property
    def ecap(self) -> int:
        return min(self.s, E_MAX - 1) + 1

    def max_bytes(self):
        # header + table (<= 2 bytes per varint) + lengths + streams (4 bytes per lane, <= one
        # 16-bit word per symbol) + escapes
        return (10 + 2 * (2 * self.ecap + 1) + 4 * self.nch + 4 * int(self.plan[2].sum())
                + 2 * self.d + 4 * self.d)

    def _scratch_arr(self, key, n, dtype):
        sc = self._thread_scratch()
        b = sc.get(key)
        if b is None or b.shape[0] < n or b.dtype != dtype:
            b = sc[key] = np.empty(n, dtype=dtype)
        return b

    # shared by the backends ------------------------------------------------------------------
    def _tables(self, counts, zmax):
        """(E, freq, cum) from the symbol counts (counted with E = ecap) and the largest level."""
        E = min(zmax, self.ecap - 1) + 1          # symbols above 2E are unused (counts 0)
        freq = quantize_freqs(np.asarray(counts)[:2 * E + 1])
        cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)
        return E, freq, cum

    def _head(self, norm, E, freq, lens) -> np.ndarray:
        head = (np.float32(norm).astype("<f4").tobytes() + np.uint32(self.d).astype("<u4").tobytes()
                + np.uint16(E).astype("<u2").tobytes() + _varints(freq)
                + np.asarray(lens, dtype=np.int64).astype("<u4").tobytes())
        return np.frombuffer(head, np.uint8)

    def head_max(self) -> int:
        """Bytes that always hold the header (table and lengths) of a valid payload."""
        return 10 + 3 * (2 * self.ecap + 1) + 4 * self.nch

    def _parse(self, head, n):
        """(E, freq, cum, offs): the table and the streams' byte offsets (nch + 1) from the first
        bytes ``head`` (numpy) of an n-byte payload whose norm was checked."""
        if n < 10:
            raise CodecError(f"{self.name}: payload truncated (header)")
        d = int(np.frombuffer(head[4:8].tobytes(), "<u4")[0])
        if d != self.d:
            raise CodecError(f"{self.name}: payload is for d={d}, this codec has d={self.d}")
        E = int(np.frombuffer(head[8:10].tobytes(), "<u2")[0])
        if not 1 <= E <= self.ecap:
            raise CodecError(f"{self.name}: E={E} outside 1..{self.ecap}")
        freq, p = _read_varints(head, 10, 2 * E + 1, self.name)
        if int(freq.sum()) != A.M:
            raise CodecError(f"{self.name}: frequencies sum to {int(freq.sum())}, not {A.M}")
        nch = self.nch
        if p + 4 * nch > n:
            raise CodecError(f"{self.name}: payload truncated (stream lengths)")
        lens = np.frombuffer(head[p:p + 4 * nch].tobytes(), "<u4").astype(np.int64)
        offs = p + 4 * nch + np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        if int(offs[-1]) > n:
            raise CodecError(f"{self.name}: payload truncated (rANS streams)")
        cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)
        return E, freq, cum, offs

    def _dec_table(self, norm, E, freq, cum):
        """(tab, esc0, esc1): the slot table of ``_ans_kernels.dec_table`` and the escape slots."""
        nsc = float(np.float64(norm))
        z = np.concatenate([[0], np.repeat(np.arange(1, E, dtype=np.float64), 2), [0, 0]])
        vtab = ((nsc * z) / self.s).astype(np.float32)
        vtab[2:2 * E - 1:2] *= -1                      # symbol 2z is -z (index 0 stays +0.0)
        tab = A.dec_table(freq, cum, vtab)
        return tab, int(cum[2 * E - 1]), int(cum[2 * E])

    def _check(self, res, offs, n) -> int:
        """Raise for the first chunk with an error; the escape count after checking the
        escape section's size."""
        for t in range(res.shape[0]):
            if res[t, 0] == A.ERR_PASTEND:
                raise CodecError(f"{self.name}: payload truncated (rANS stream {t} runs out)")
            if res[t, 0] == A.ERR_STATE:
                raise CodecError(f"{self.name}: rANS stream {t} inconsistent (states or length)")
        nesc = int(res[:, 1].sum())
        end = int(offs[-1])
        if n != end + 4 * nesc:
            raise CodecError(f"{self.name}: escape section has {n - end} bytes, expected "
                             f"{4 * nesc}")
        return nesc

    def _escape_values(self, raw, E, norm):
        """float32 magnitudes of the escaped levels (raw: their uint32 LE bytes)."""
        ev = np.frombuffer(np.asarray(raw).tobytes(), "<u4").astype(np.int64) + E
        if int(ev.max()) > self.s:
            raise CodecError(f"{self.name}: level > s={self.s}")
        return ((float(np.float64(norm)) * ev.astype(np.float64)) / self.s).astype(np.float32)

    def _escape_positions(self, escpos, res):
        a = self.plan[0]
        return np.concatenate([escpos[int(a[t]):int(a[t]) + int(res[t, 1])]
                               for t in range(res.shape[0])])

    # encode / decode --------------------------------------------------------------------------
    def encode(self, x, rng=None) -> Payload:
        if self.backend == "cuda":
            return self.impl.encode(x, rng, None)
        return self._encode(x, rng, None)

    def encode_with(self, x, u) -> Payload:
        """Encode with given uniforms ``u`` (d float32 values) in place of the d draws."""
        if self.backend == "cuda":
            return self.impl.encode(x, None, u)
        return self._encode(x, None, u)

    def _encode(self, x, rng, u) -> Payload:
        Ecap = self.ecap
        syms = self._scratch_arr("syms", self.d, np.uint16)[:self.d]
        norm, counts, zmax, escv = self.impl.symbols(x, rng, u, Ecap, syms)
        E, freq, cum = self._tables(counts, zmax)
        ec = A.enc_tables(freq, cum)
        pl = self.plan
        nch = pl[0].shape[0]
        cap = self.chunk_elems + 2 * A.MAX_LANES + 2        # words per chunk's region
        hi = (np.arange(nch, dtype=np.int64) + 1) * cap
        buf = self._scratch_arr("rbuf", nch * cap, np.uint16)
        starts = self.impl.encode_streams(syms, pl, ec, buf, hi)
        lens = 2 * (hi - starts)
        head = self._head(norm, E, freq, lens)
        h = head.shape[0]
        total = h + int(lens.sum()) + 4 * int(escv.shape[0])
        data = np.empty(total, dtype=np.uint8)
        data[:h] = head
        b8 = buf.view(np.uint8)
        p = h
        for t in range(nch):
            data[p:p + lens[t]] = b8[2 * starts[t]:2 * hi[t]]
            p += int(lens[t])
        data[p:] = escv.astype("<u4").view(np.uint8)
        return Payload(data, 8 * total)

    def decode(self, data, out=None):
        if self.backend == "cuda":
            return self.impl.decode(data, out)
        data, norm = self._header(data)
        data = np.ascontiguousarray(data)
        n = int(data.shape[0])
        E, freq, cum, offs = self._parse(data, n)
        tab, esc0, esc1 = self._dec_table(norm, E, freq, cum)
        out = self._out(out)
        escpos = self._scratch_arr("escpos", self.d, np.int64)
        res = self.impl.decode_streams(data, offs, self.plan, tab, esc0, esc1,
                                       out.view(np.uint32), escpos)
        nesc = self._check(res, offs, n)
        if nesc:
            v = self._escape_values(data[int(offs[-1]):], E, norm)
            pos = self._escape_positions(escpos, res)
            out[pos >> 1] = np.where((pos & 1) == 1, -v, v)
        return out


def empirical_entropy_bits(zeta, neg) -> float:
    """d * H of the empirical distribution of the signed levels (0 unsigned): the bound a
    static per-message code approaches (bits, excluding the table)."""
    z = np.asarray(zeta, dtype=np.int64)
    sym = np.where(z == 0, 0, 2 * z - 1 + np.asarray(neg, dtype=np.int64))
    _, cnt = np.unique(sym, return_counts=True)
    p = cnt / cnt.sum()
    return float(-(cnt * np.log2(p)).sum())
