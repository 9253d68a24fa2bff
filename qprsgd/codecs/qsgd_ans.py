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
    """The vectorized quantizer, then the rANS kernels interpreted (sequential reference)."""

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

    def encode_streams(self, syms, nch, tabs, buf, starts):
        cap = 2 * A.CHUNK_ELEMS + 16
        for t in range(nch):
            a = t * A.CHUNK_ELEMS
            b = min(self.c.d, a + A.CHUNK_ELEMS)
            starts[t] = A.rans_encode_chunk(syms, a, b, *tabs, buf, (t + 1) * cap)

    def decode_streams(self, data, offs, slot_sym, slot_fb, vtab, nesc_sym, out, escpos, res):
        d = self.c.d
        for t in range(offs.shape[0] - 1):
            a = t * A.CHUNK_ELEMS
            b = min(d, a + A.CHUNK_ELEMS)
            res[t] = A.rans_decode_chunk(data, int(offs[t]), int(offs[t + 1]), a, b, slot_sym,
                                         slot_fb, vtab, nesc_sym, out, escpos[a:b])


class _AnsNumba:
    """Compiled kernels: one fused quantize/symbol/histogram pass (the qsgd encoder's input
    checks and inline draws), then the chunks' streams on up to ``threads`` threads."""

    def __init__(self, c):
        from . import _nb_ans, _nb_core
        from ._qsgd_numba import QSGDNumba

        self.c, self.k, self.core = c, _nb_ans, _nb_core
        self.q = QSGDNumba(c)   # input checks, norm and draws in the qsgd order

    def _nt(self, nch):
        return max(1, min(self.c.threads, nch))

    def symbols(self, x, rng, u, Ecap, syms):
        from . import _pcg64
        from .qsgd import _Given

        c = self.c
        x, norm, mode, cc, uu, state, bg = self.q.prepare(x, rng if u is None else _Given(u))
        escv = c._scratch_arr("escv", c.d, np.uint32)
        nt = self._nt(c.nch)
        if bg is not None and nt > 1:
            # segments of whole chunks, each starting numpy's stream at its first element
            per = -(-c.nch // nt) * A.CHUNK_ELEMS
            bounds = np.array([min(c.d, t * per) for t in range(nt)] + [c.d], dtype=np.int64)
            states = _pcg64.segment_states(state, bounds[:-1])
            counts2 = np.zeros((nt, 2 * Ecap + 1), dtype=np.int64)
            res = np.zeros((nt, 2), dtype=np.int64)
            with self.core.parallel(nt):
                self.k.quantize_symbols_par(x, bounds, states, mode, cc, np.float32(c.s), Ecap,
                                            syms, counts2, escv, res)
            _pcg64.store(bg, states[-1])
            esc = np.concatenate([escv[bounds[t]:bounds[t] + res[t, 1]] for t in range(nt)])
            return norm, counts2.sum(axis=0), int(res[:, 0].max()), esc
        counts = np.zeros(2 * Ecap + 1, dtype=np.int64)
        zmax, nesc = self.k.quantize_symbols_pcg(x, uu, state, bg is not None, mode, cc,
                                                 np.float32(c.s), Ecap, syms, counts, escv)
        if bg is not None:
            _pcg64.store(bg, state)
        return norm, counts, int(zmax), escv[:nesc]

    def encode_streams(self, syms, nch, tabs, buf, starts):
        with self.core.parallel(self._nt(nch)):
            self.k.encode_chunks(syms, nch, *tabs, buf, starts)

    def decode_streams(self, data, offs, slot_sym, slot_fb, vtab, nesc_sym, out, escpos, res):
        with self.core.parallel(self._nt(offs.shape[0] - 1)):
            self.k.decode_chunks(data, offs, self.c.d, slot_sym, slot_fb, vtab, nesc_sym, out,
                                 escpos, res)


@CODECS.register("qsgd_ans", params=QSGDParams)
class QSGDAns(_QSGDBase):
    """Q_s (as qsgd) with the signed levels rANS-coded under a per-message static table
    (float32 norm, uint32 d, table, per-chunk rANS streams, escapes)."""

    name = "qsgd_ans"
    IMPLS = {"numpy": _AnsNumpy, "numba": _AnsNumba}

    def _nt(self):
        return max(1, min(self.threads, self.nch))

    @property
    def nch(self) -> int:
        return -(-self.d // A.CHUNK_ELEMS)

    @property
    def ecap(self) -> int:
        return min(self.s, E_MAX - 1) + 1

    def max_bytes(self):
        # header + table (<= 2 bytes per varint) + lengths + streams (<= 14 bits/symbol + 8
        # bytes per chunk) + escapes
        return (10 + 2 * (2 * self.ecap + 1) + 4 * self.nch + (14 * self.d + 7) // 8
                + 16 * self.nch + 4 * self.d)

    def _scratch_arr(self, key, n, dtype):
        sc = self._thread_scratch()
        b = sc.get(key)
        if b is None or b.shape[0] < n or b.dtype != dtype:
            b = sc[key] = np.empty(n, dtype=dtype)
        return b

    def encode(self, x, rng=None) -> Payload:
        return self._encode(x, rng, None)

    def encode_with(self, x, u) -> Payload:
        """Encode with given uniforms ``u`` (d float32 values) in place of the d draws."""
        return self._encode(x, None, u)

    def _encode(self, x, rng, u) -> Payload:
        Ecap = self.ecap
        syms = self._scratch_arr("syms", self.d, np.uint16)
        norm, counts, zmax, escv = self.impl.symbols(x, rng, u, Ecap, syms)
        E = min(zmax, Ecap - 1) + 1          # symbols above 2E are unused (counts 0)
        counts = counts[:2 * E + 1]
        freq = quantize_freqs(counts)
        cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)
        tabs = A.enc_tables(freq, cum)
        nch = self.nch
        cap = 2 * A.CHUNK_ELEMS + 16
        buf = self._scratch_arr("rbuf", nch * cap, np.uint8)
        starts = np.zeros(nch, dtype=np.int64)
        self.impl.encode_streams(syms, nch, tabs, buf, starts)
        ends = (np.arange(nch, dtype=np.int64) + 1) * cap
        lens = ends - starts
        head = (np.float32(norm).astype("<f4").tobytes() + np.uint32(self.d).astype("<u4").tobytes()
                + np.uint16(E).astype("<u2").tobytes() + _varints(freq)
                + lens.astype("<u4").tobytes())
        h = len(head)
        total = h + int(lens.sum()) + 4 * int(escv.shape[0])
        data = np.empty(total, dtype=np.uint8)
        data[:h] = np.frombuffer(head, np.uint8)
        p = h
        for t in range(nch):
            data[p:p + lens[t]] = buf[starts[t]:ends[t]]
            p += int(lens[t])
        data[p:] = escv.astype("<u4").view(np.uint8)
        return Payload(data, 8 * total)

    def decode(self, data, out=None):
        data, norm = self._header(data)
        data = np.ascontiguousarray(data)
        n = int(data.shape[0])
        if n < 10:
            raise CodecError(f"{self.name}: payload truncated (header)")
        d = int(np.frombuffer(data[4:8].tobytes(), "<u4")[0])
        if d != self.d:
            raise CodecError(f"{self.name}: payload is for d={d}, this codec has d={self.d}")
        E = int(np.frombuffer(data[8:10].tobytes(), "<u2")[0])
        if not 1 <= E <= self.ecap:
            raise CodecError(f"{self.name}: E={E} outside 1..{self.ecap}")
        na = 2 * E + 1
        freq, p = _read_varints(data, 10, na, self.name)
        if int(freq.sum()) != A.M:
            raise CodecError(f"{self.name}: frequencies sum to {int(freq.sum())}, not {A.M}")
        nch = self.nch
        if p + 4 * nch > n:
            raise CodecError(f"{self.name}: payload truncated (stream lengths)")
        lens = np.frombuffer(data[p:p + 4 * nch].tobytes(), "<u4").astype(np.int64)
        offs = p + 4 * nch + np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        if int(offs[-1]) > n:
            raise CodecError(f"{self.name}: payload truncated (rANS streams)")
        cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)
        sym_of_slot = np.repeat(np.arange(na, dtype=np.int64), freq)
        slot_sym = sym_of_slot.astype(np.uint16)
        slot_fb = ((freq[sym_of_slot] << 16) | (np.arange(A.M) - cum[sym_of_slot])).astype(np.uint32)
        nsc = float(np.float64(norm))
        z = np.concatenate([[0], np.repeat(np.arange(1, E, dtype=np.float64), 2)])
        vtab = ((nsc * z) / self.s).astype(np.float32)
        vtab[2::2] *= -1                      # symbol 2z is -z (index 0 stays +0.0)
        out = self._out(out)
        escpos = self._scratch_arr("escpos", self.d, np.int64)
        res = np.zeros((nch, 2), dtype=np.int64)
        self.impl.decode_streams(data, offs, slot_sym, slot_fb, vtab, 2 * E - 1, out, escpos, res)
        for t in range(nch):
            if res[t, 0] == A.ERR_PASTEND:
                raise CodecError(f"{self.name}: payload truncated (rANS stream {t} runs out)")
            if res[t, 0] == A.ERR_STATE:
                raise CodecError(f"{self.name}: rANS stream {t} inconsistent (final state or "
                                 "length)")
        nesc = int(res[:, 1].sum())
        end = int(offs[-1])
        if n != end + 4 * nesc:
            raise CodecError(f"{self.name}: escape section has {n - end} bytes, expected "
                             f"{4 * nesc}")
        if nesc:
            pos = np.concatenate([escpos[t * A.CHUNK_ELEMS:t * A.CHUNK_ELEMS + int(res[t, 1])]
                                  for t in range(nch)])
            ev = np.frombuffer(data[end:].tobytes(), "<u4").astype(np.int64) + E
            if int(ev.max()) > self.s:
                raise CodecError(f"{self.name}: level > s={self.s}")
            v = ((nsc * ev.astype(np.float64)) / self.s).astype(np.float32)
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
