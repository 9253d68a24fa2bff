"""CUDA backend of the QSGD family (``qsgd``, ``qsgd_scaled``, ``qsgd_runlength``; wire formats in
qprsgd/codecs/qsgd.py, unchanged): numba.cuda kernels and the backend objects.  Same payload
bytes, decoded values, generator state and CodecError messages as the CPU backends
(tests/cuda_sim_check.py runs them in numba's CUDA simulator).

Encode (both formats): one thread per element computes its level (float32 arithmetic as the
CPU); code lengths -> exclusive prefix sums (``_cuda_kernels.block_scan``, blocks of 1024, block
offsets on the host) -> bit positions -> every code OR-ed into big-endian-bit uint32 words
(``atomic.or_``: neighbouring codes share a word).  ``qsgd_runlength`` first compacts the
non-zero levels (prefix sum of the non-zero flags), then codes one record per non-zero:
gamma(gap) at its position, sign + gamma(zeta) right after it.

Decode: the Elias-gamma streams have no index, so the records are found by *self-synchronising
speculative decoding* (``SegmentParser``), with no format change:

1. The stream bits [start, end) are cut into P segments of about ``seg_bits`` bits (segment
   t >= 1 starts at a multiple of 32 bits, so it owns whole words of the record-start bitmap).
   Segment t "owns" the records that *start* in [lo_t, lo_t+1).
2. Pass 1 (``seg_spec``, one thread per segment): segment 0 parses from the true start; segment
   t >= 1 guesses that a record starts at lo_t and parses while the record start is < lo_t+1,
   marking every record start in the bitmap.  Its exit x_t is the first record boundary at or
   after lo_t+1 (or the position of an impossible / over-long record, status != 0).  A guessed
   parse that meets such an error restarts ``step`` bits after it (2 for qsgd, whose records
   all have even length: true starts are even, an odd guess never synchronises; 1 for
   qsgd_runlength, whose records have odd length).
3. Fix-up passes (``seg_fix``, one thread per segment, double-buffered exits): segment t >= 1
   whose start g_t differs from the previous segment's exit x_t-1 re-parses from x_t-1 until it
   reaches a start it had marked (from there both parses coincide: a record's length depends
   only on its bits, so its exit and status are unchanged), or its end; it then clears the
   marks it no longer visits and marks the new ones.  The passes stop after the first one that
   changes no exit read by a successor (segments 0 .. P-2); at that fixed point every g_t is
   the true start of segment t's first record: the chain is the serial parse.  Pass j makes
   segment j exact, so there are at most P - 1 passes.  Gamma codes resynchronise within a few
   codewords on real payloads: typically one fix-up pass in which some segments re-parse a few
   records; the worst case is serial (P - 1 passes; a valid qsgd payload of a 2-bit record
   followed by 4-bit records ``0010`` never resynchronises, see tests/cuda_sim_check.py).
4. Counts: popcount of each segment's bitmap words; the host finds in the P (count, status,
   exit) triples the first error of the chain and the segment holding record number ``count``
   (the end of the last record decoded), and raises exactly the serial decoder's error: an
   impossible code or a record past the end before record ``count``, or "truncated (N of
   count records)".
5. Values (``qsgd_values`` / ``rl_values``, one thread per segment up to that one): each
   segment re-parses from its true start and writes record i = (its first index) + j; the
   thread that reaches record ``count`` reports its bit position (the end the padding and
   extension checks use).  qsgd_runlength writes (value, gap) per record; a prefix sum of the
   gaps (block_scan) gives each record's element index, and a scatter writes the zero-filled
   output.

Launches per decode: bytes -> words, pass 1, the fix-up passes (1 typically, each followed by a
3-word device -> host read), counts, values (qsgd_runlength: + scan + scatter).  Memory: the
payload as words and a bitmap of one bit per payload bit.  ``seg_bits`` (``SEG_BITS`` by
default) is a backend attribute: the simulator check lowers it to force many segments.  The
last decode's ``stats`` (segments, fix-up passes, segments re-parsed in them and the records
they re-parsed) are kept on the backend.

The kernels avoid the builtins min/max (numba 0.68's built-in ``numba.cuda`` fails to type them
in device code; NVIDIA's numba-cuda, the ``gpu`` extra, compiles either).

Arrays: inputs with ``__cuda_array_interface__`` are used in place; under the simulator numpy
arrays stand in.  Draws: ``rng.random(d, dtype=float32)`` on the host, copied (the generator's
state afterwards equals the CPU backends').
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from . import _cuda_kernels as K
from .base import CodecError, Payload

SEG_BITS = 1024   # stream bits per decode segment (a guess: not yet tuned on a GPU)
PER = 1024        # elements per prefix-sum block (encode)
PTB = 128         # threads per block of the per-segment kernels

U0 = np.uint64(0)
U1 = np.uint64(1)
U32 = np.uint64(32)
U63 = np.uint64(63)
LOW32 = np.uint64(0xFFFFFFFF)

OK, BADCODE, PASTEND, SHORT = 0, 1, 2, 3


def _grid(n: int, tpb: int = K.TPB) -> tuple[int, int]:
    """A launch of >= n threads in blocks of at most ``tpb`` (no more threads than needed when
    n is small: the simulator runs every thread as a Python thread)."""
    n = max(1, int(n))
    tpb = min(tpb, n)
    return ((n + tpb - 1) // tpb, tpb)


def _pgrid(n: int) -> tuple[int, int]:
    """A launch of one thread per segment."""
    return _grid(n, PTB)


# ---- device functions ----------------------------------------------------------------------------
@cuda.jit(device=True)
def _clz64(v):
    """Leading zeros of a uint64 (64 for 0), from two 32-bit clz (the simulator's is 32-bit)."""
    hi = np.uint32(v >> U32)
    if hi != np.uint32(0):
        return np.int64(cuda.clz(hi))
    return np.int64(32 + cuda.clz(np.uint32(v & LOW32)))


@cuda.jit(device=True)
def _win(words, p):
    """Stream bits p .. p + 63 as a uint64 (bit p on top) from big-endian-bit uint32 words
    (bits past the payload read as 0: the caller's zero guard words)."""
    w = p >> 5
    o = np.uint64(p & 31)
    a = (np.uint64(words[w]) << U32) | np.uint64(words[w + 1])
    if o == U0:
        return a
    return (a << o) | (np.uint64(words[w + 2]) >> (U32 - o))


@cuda.jit(device=True)
def _rec(words, p, end, rl, nmax, ndm):
    """(length, status) of the record starting at bit p < end: status 0, 1 (impossible code
    length) or 2 (runs past ``end``), as the CPU decoders.  rl = 0: qsgd (sign, gamma(zeta+1));
    1: qsgd_runlength (gamma(gap), sign, gamma(zeta))."""
    win = _win(words, p)
    if rl == 0:
        n = _clz64(win << U1)
        if n > nmax:
            return np.int64(0), 1
        ln = 2 * n + 2
    else:
        n1 = _clz64(win)
        if n1 > ndm:
            return np.int64(0), 1
        l1 = 2 * n1 + 1
        n2 = _clz64(_win(words, p + l1) << U1)
        if n2 > nmax:
            return np.int64(0), 1
        ln = l1 + 2 * n2 + 2
    if p + ln > end:
        return ln, 2
    return ln, 0


@cuda.jit(device=True)
def _marked(marks, p):
    return ((marks[p >> 5] >> np.uint32(p & 31)) & np.uint32(1)) != np.uint32(0)


@cuda.jit(device=True)
def _mark(marks, p):
    marks[p >> 5] |= np.uint32(1) << np.uint32(p & 31)


@cuda.jit(device=True)
def _clear(marks, a, b):
    """Clear the bitmap's bits a .. b-1 (words owned by the calling segment)."""
    p = a
    while p < b:
        o = p & 31
        n = 32 - o
        if b - p < n:
            n = b - p
        m = ((U1 << np.uint64(n)) - U1) << np.uint64(o)
        marks[p >> 5] &= ~np.uint32(m)
        p += n


@cuda.jit(device=True)
def _or_bits(words, p, v, L):
    """OR the L (<= 64) low bits of v, MSB first, into the words at bit p (atomic)."""
    while L > 0:
        w = p >> 5
        off = p & 31
        room = 32 - off
        take = room
        if L < take:
            take = L
        piece = np.uint32((v >> np.uint64(L - take)) & ((U1 << np.uint64(take)) - U1))
        cuda.atomic.or_(words, w, piece << np.uint32(room - take))
        p += take
        L -= take


@cuda.jit(device=True)
def _level(xi, ui, mode, c, s32):
    """QSGD's level (float32 arithmetic as the CPU; mode 0: norm = 0, 1: r = |x| c,
    2: r = (|x| / c) s)."""
    z = U0
    if mode != 0:
        a = abs(xi)
        if mode == 1:
            r = a * c
        else:
            r = (a / c) * s32
        if r > s32:         # (min: r is finite and >= 0)
            r = s32
        lv = np.int64(r)
        fr = r - np.float32(lv)
        z = np.uint64(lv)
        if ui < fr:
            z += U1
    return z


@cuda.jit(device=True)
def _value(zeta, s, tab, nsc, sd):
    """Decoded magnitude float32(nsc * zeta / s) (table below len(tab)); 0 for zeta > s."""
    if zeta > np.uint64(s):
        return np.float32(0)
    if zeta < np.uint64(tab.shape[0]):
        return tab[zeta]
    return np.float32((nsc * np.float64(zeta)) / sd)


# ---- encode kernels ------------------------------------------------------------------------------
@cuda.jit
def qsgd_codes(x, u, mode, c, s32, code, length):
    """code_i = sign << (L - 1) | (zeta + 1), L = 2 floor(log2(zeta + 1)) + 2."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    xi = x[i]
    k = _level(xi, u[i], mode, c, s32) + U1
    L = 2 * (63 - _clz64(k)) + 2
    neg = U0
    if xi < np.float32(0):
        neg = U1
    code[i] = k | (neg << np.uint64(L - 1))
    length[i] = L


@cuda.jit
def rl_levels(x, u, mode, c, s32, zeta, neg, nz):
    """zeta_i, neg_i and nz_i = (zeta_i != 0) for qsgd_runlength."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    xi = x[i]
    z = _level(xi, u[i], mode, c, s32)
    zeta[i] = z
    neg[i] = 1 if xi < np.float32(0) else 0
    nz[i] = 1 if z != U0 else 0


@cuda.jit
def rl_compact(nz, rank, idx):
    """idx[rank_i] = i for the non-zero levels (rank = exclusive prefix sum of nz)."""
    i = cuda.grid(1)
    if i < nz.shape[0] and nz[i] != 0:
        idx[rank[i]] = i


@cuda.jit
def rl_lens(idx, zeta, rlen):
    """Record r's length: gamma(idx_r - idx_r-1) + 1 + gamma(zeta) (idx_-1 = -1)."""
    r = cuda.grid(1)
    if r >= rlen.shape[0]:
        return
    i = idx[r]
    prev = np.int64(-1)
    if r > 0:
        prev = idx[r - 1]
    n1 = 63 - _clz64(np.uint64(i - prev))
    n2 = 63 - _clz64(zeta[i])
    rlen[r] = 2 * n1 + 1 + 2 * n2 + 2


@cuda.jit
def rl_write(idx, zeta, neg, pos, k, hdr_len, words):
    """Thread 0 writes gamma(k + 1) at bit 64; thread r < k writes record r at pos[r]."""
    r = cuda.grid(1)
    if r == 0:
        _or_bits(words, np.int64(64), np.uint64(k + 1), hdr_len)
    if r >= k:
        return
    i = idx[r]
    prev = np.int64(-1)
    if r > 0:
        prev = idx[r - 1]
    gap = np.uint64(i - prev)
    l1 = 2 * (63 - _clz64(gap)) + 1
    z = zeta[i]
    l2 = 2 * (63 - _clz64(z)) + 2
    p = pos[r]
    _or_bits(words, p, gap, l1)
    _or_bits(words, p + l1, z | (np.uint64(neg[i]) << np.uint64(l2 - 1)), l2)


# ---- decode kernels ------------------------------------------------------------------------------
@cuda.jit
def be_words(data, nbytes, words):
    """words[j] = payload bytes 4j .. 4j+3 big-endian (zero past nbytes: guard words)."""
    j = cuda.grid(1)
    if j >= words.shape[0]:
        return
    w = np.uint32(0)
    for b in range(4):
        q = 4 * j + b
        v = np.uint32(0)
        if q < nbytes:
            v = np.uint32(data[q])
        w = np.uint32((w << np.uint32(8)) | v)
    words[j] = w


@cuda.jit
def seg_spec(words, lo, end, rl, nmax, ndm, step, marks, g, x, st):
    """Pass 1: segment t parses from lo[t] (t = 0: the true start; t >= 1: a guess, restarted
    ``step`` bits after an error) while the record start is < lo[t+1], marking the starts.
    g[t] = where the kept parse started, x[t] = its exit (first boundary >= lo[t+1]) or error
    position, st[t] = 0 or the error."""
    t = cuda.grid(1)
    P = lo.shape[0] - 1
    if t >= P:
        return
    hi = lo[t + 1]
    p0 = lo[t]
    p = p0
    s = 0
    while True:
        p = p0
        s = 0
        while p < hi:
            ln, s = _rec(words, p, end, rl, nmax, ndm)
            if s != 0:
                break
            _mark(marks, p)
            p += ln
        if s == 0 or t == 0 or p > end - 8:
            break           # (an error in the last byte: likely the true parse meeting the padding)
        _clear(marks, p0, p)
        p0 = p + step
        if p0 >= hi:        # no start left to try: an empty parse from p0
            p = p0
            s = 0
            break
    g[t] = p0
    x[t] = p
    st[t] = s


@cuda.jit
def seg_fix(words, lo, end, rl, nmax, ndm, marks, g, xin, sin, xout, sout, info):
    """A fix-up pass: segment t >= 1 whose start g[t] differs from the exit xin[t-1] of
    segment t-1 (when that one ended without error) re-parses from xin[t-1] until a start
    it had marked (exit and status unchanged), its end or an error; then it replaces the
    marks it no longer visits.  info[0] = 1 when the exit or status of a segment t < P - 1
    changed; info[1] counts the segments that re-parsed, info[2] the records they parsed."""
    t = cuda.grid(1)
    P = lo.shape[0] - 1
    if t >= P:
        return
    xo = xin[t]
    so = sin[t]
    if t > 0 and sin[t - 1] == 0 and xin[t - 1] != g[t]:
        cuda.atomic.add(info, 1, 1)
        n = xin[t - 1]
        hi = lo[t + 1]
        old = g[t]
        p = n
        s = 0
        met = False
        walked = 0
        while p < hi:
            if _marked(marks, p):
                met = True
                break
            ln, s = _rec(words, p, end, rl, nmax, ndm)
            if s != 0:
                break
            p += ln
            walked += 1
        cuda.atomic.add(info, 2, walked)
        a = n if n < old else old
        if met:
            _clear(marks, a, p)
        else:
            _clear(marks, a, hi)
            xo = p
            so = s
        q = n
        while q < p:            # the new starts before the meeting point / exit / error
            _mark(marks, q)
            ln, s2 = _rec(words, q, end, rl, nmax, ndm)
            q += ln
        g[t] = n
        if t < P - 1 and (xo != xin[t] or so != sin[t]):
            info[0] = 1     # (only segment t + 1 reads x[t]; the last exit is the host's)
    xout[t] = xo
    sout[t] = so


@cuda.jit
def seg_count(marks, lo, cnt):
    """cnt[t] = the number of record starts segment t marked (popcount of its words)."""
    t = cuda.grid(1)
    P = lo.shape[0] - 1
    if t >= P:
        return
    c = 0
    for w in range(lo[t] >> 5, (lo[t + 1] + 31) >> 5):
        c += cuda.popc(marks[w])
    cnt[t] = c


@cuda.jit
def qsgd_values(words, lo, g, first, d, s, tab, nsc, sd, out, res):
    """Segment t (t < number of threads launched) decodes its records from g[t] as records
    first[t] ...; the one reaching record d stores its position in res[0]; res[1] = 1 if a
    level of records < d is > s."""
    t = cuda.grid(1)
    nseg = first.shape[0]
    if t >= nseg:
        return
    i = first[t]
    p = g[t]
    hi = lo[t + 1]
    while p < hi:
        if i >= d:
            res[0] = p
            return
        win = _win(words, p)
        body = win << U1
        n = _clz64(body)
        zeta = (body >> np.uint64(63 - 2 * n)) - U1
        if zeta > np.uint64(s):
            res[1] = 1
        v = _value(zeta, s, tab, nsc, sd)
        if (win >> U63) != U0:
            v = -v
        out[i] = v
        i += 1
        p += 2 * n + 2


@cuda.jit
def rl_values(words, lo, g, first, k, s, tab, nsc, sd, vals, gaps, res):
    """As qsgd_values for qsgd_runlength records: vals[i] = ±value, gaps[i] = the gap."""
    t = cuda.grid(1)
    nseg = first.shape[0]
    if t >= nseg:
        return
    i = first[t]
    p = g[t]
    hi = lo[t + 1]
    while p < hi:
        if i >= k:
            res[0] = p
            return
        win = _win(words, p)
        n1 = _clz64(win)
        l1 = 2 * n1 + 1
        gaps[i] = np.int64(win >> np.uint64(64 - l1))
        w2 = _win(words, p + l1)
        body = w2 << U1
        n2 = _clz64(body)
        zeta = body >> np.uint64(63 - 2 * n2)
        if zeta > np.uint64(s):
            res[1] = 1
        v = _value(zeta, s, tab, nsc, sd)
        if (w2 >> U63) != U0:
            v = -v
        vals[i] = v
        i += 1
        p += l1 + 2 * n2 + 2


@cuda.jit
def rl_scatter(vals, gaps, excl, offs, per, out):
    """out[i_r] = vals[r], i_r = (exclusive prefix sum of the gaps to r) + gap_r - 1 (excl:
    the sums within blocks of ``per`` records, offs: the blocks' offsets)."""
    r = cuda.grid(1)
    if r < vals.shape[0]:
        out[excl[r] + offs[r // per] + gaps[r] - 1] = vals[r]


# ---- host side -----------------------------------------------------------------------------------
def _block_scan(length, n: int):
    """(device exclusive prefix sums of length[:n] within blocks of PER, host block offsets,
    total)."""
    nb = (n + PER - 1) // PER
    pos = K.empty(n, np.int64)
    totals = K.empty(nb, np.int64)
    K.block_scan[_grid(nb)](length[:n], pos, totals, PER)
    t = K.host(totals)
    return pos, np.concatenate([[0], np.cumsum(t)[:-1]]).astype(np.int64), int(t.sum())


def _scan(length, n: int, base: int):
    """(device exclusive prefix sums + base of the int64 device array length[:n], total)."""
    pos, offs, total = _block_scan(length, n)
    K.add_offsets[_grid(n)](pos, K.cuda.to_device(offs), PER, base)
    return pos, total


def _words(data, nbytes: int):
    """The payload as big-endian-bit uint32 words with 5 zero guard words."""
    words = K.empty((nbytes + 3) // 4 + 5, np.uint32)
    be_words[_grid(words.shape[0])](K.dev(data), nbytes, words)
    return words


class SegmentParser:
    """The record boundaries of a gamma-coded stream by self-synchronising speculative
    decoding (module docstring); ``parse`` returns what the value kernels need or the
    serial decoder's error."""

    def __init__(self, seg_bits: int = SEG_BITS):
        self.seg_bits = int(seg_bits)
        self.stats: dict = {}

    def parse(self, words, start: int, end: int, count: int, rl: int, nmax: int, ndm: int):
        """Returns (err, info, lo, g, first, end_bit): err != OK with info as the CPU decoders
        (error position, or the number of records for SHORT); otherwise lo / g (device) and
        ``first`` (host int64: first record index of each segment up to the one that holds
        record ``count``), and end_bit = that record's position when already known (else -1:
        the value kernel reports it)."""
        span = end - start
        w0 = start >> 5
        nw = ((end + 31) >> 5) - w0
        P = max(1, min(nw, -(-span // max(32, self.seg_bits))))
        lo = np.empty(P + 1, dtype=np.int64)
        lo[0] = start
        lo[1:P] = 32 * (w0 + (nw * np.arange(1, P, dtype=np.int64)) // P)
        lo[P] = end
        lod = K.cuda.to_device(lo)
        marks = K.zeros((end >> 5) + 2, np.uint32)
        g = K.empty(P, np.int64)
        x, st = K.empty(P, np.int64), K.empty(P, np.int64)
        x2, st2 = K.empty(P, np.int64), K.empty(P, np.int64)
        seg_spec[_pgrid(P)](words, lod, end, rl, nmax, ndm, 2 - rl, marks, g, x, st)
        passes = rewalked = walked = 0
        if P > 1:
            for passes in range(1, P + 1):
                info = K.zeros(3, np.int64)
                seg_fix[_pgrid(P)](words, lod, end, rl, nmax, ndm, marks, g, x, st, x2, st2,
                                   info)
                x, st, x2, st2 = x2, st2, x, st
                changed, n, w = (int(v) for v in K.host(info))
                rewalked += n
                walked += w
                if not changed:
                    break
        cnt = K.empty(P, np.int64)
        seg_count[_pgrid(P)](marks, lod, cnt)
        self.stats = {"segments": P, "fixup_passes": passes, "reparsed": rewalked,
                      "reparsed_records": walked}
        cnt, st, x = K.host(cnt), K.host(st), K.host(x)
        inc = np.cumsum(cnt)
        bad = np.flatnonzero(st != 0)
        te = int(bad[0]) if bad.shape[0] else P
        j = int(np.searchsorted(inc, count, side="right"))  # first segment past record count
        bd = -1
        if j > te or j == P:     # record `count` is not a valid record of the chain
            if te < P:
                if int(inc[te]) < count:
                    return int(st[te]), int(x[te]), None, None, None, -1
                j, bd = te, int(x[te])      # the erroneous record is record `count`
            else:
                if int(inc[-1]) < count:
                    return SHORT, int(inc[-1]), None, None, None, -1
                j, bd = P - 1, end
        first = (inc - cnt)[:j + 1].astype(np.int64)
        return OK, 0, lod, g, first, bd


def raise_err(name: str, err: int, info: int, count: int):
    """The CPU decoders' message for a parse error."""
    if err == BADCODE:
        raise CodecError(f"{name}: impossible code length at bit {info}")
    if err == PASTEND:
        raise CodecError(f"{name}: payload truncated (record at bit {info} runs past the end)")
    if err == SHORT:
        raise CodecError(f"{name}: payload truncated ({info} of {count} records)")


def _finish(name: str, data, nbytes: int, end: int):
    """No extension, zero padding (the CPU decoders' checks after the parse)."""
    if 8 * nbytes - end >= 8:
        raise CodecError(f"{name}: payload extended ({nbytes} bytes, codes end at bit {end})")
    pad = 8 * nbytes - end
    if pad and int(K.host(data[-1:])[0]) & ((1 << pad) - 1):
        raise CodecError(f"{name}: nonzero padding bits")


def _table(norm, scale: float, s: int):
    nsc = np.float64(norm) * scale
    n = min(s + 1, 1 << 16)
    tab = (nsc * np.arange(n, dtype=np.float64)) / s
    return K.cuda.to_device(tab.astype(np.float32)), float(nsc)


class QSGDCuda:
    """qsgd / qsgd_scaled: encode per element -> prefix sums -> parallel bit writes; decode by
    the segment parser (module docstring)."""

    def __init__(self, c, seg_bits: int = SEG_BITS):
        self.c = c
        self.parser = SegmentParser(seg_bits)

    @property
    def seg_bits(self):
        return self.parser.seg_bits

    @seg_bits.setter
    def seg_bits(self, v):
        self.parser.seg_bits = int(v)

    @property
    def stats(self):
        return self.parser.stats

    def _norm(self, x):
        """(device x, float32 norm) after the shape and NaN/Inf checks (the CPU's order)."""
        c = self.c
        if x.ndim != 1 or x.shape[0] != c.d:
            raise CodecError(f"{c.name}: expected a vector of length d={c.d}, "
                             f"got shape {tuple(x.shape)}")
        xd = K.dev(x)
        acc = float(K.fixed_sums(xd, K.cuda.to_device(np.array([0, c.d], np.int64)), 1, True)[0])
        if not math.isfinite(acc):
            raise CodecError(f"{c.name}: cannot encode a vector holding NaN or Inf")
        with np.errstate(over="ignore"):
            return xd, np.float32(math.sqrt(acc))

    def encode(self, x, rng):
        from .qsgd import draw_uniform32

        xd, norm = self._norm(x)
        u = draw_uniform32(np, rng, self.c.d)
        if not math.isfinite(float(norm)):
            raise CodecError(f"{self.c.name}: the norm of the input overflows float32")
        return self.encode_u(xd, norm, u)

    def encode_with(self, x, u):
        xd, norm = self._norm(x)
        if not math.isfinite(float(norm)):
            raise CodecError(f"{self.c.name}: the norm of the input overflows float32")
        return self.encode_u(xd, norm, u)

    def _mode(self, norm):
        if norm == 0:
            return 0, np.float32(0)
        with np.errstate(over="ignore"):
            cc = np.float32(self.c.s / float(norm))
        return (1, cc) if math.isfinite(float(cc)) else (2, norm)

    def encode_u(self, xd, norm, u):
        c = self.c
        d = c.d
        mode, cc = self._mode(norm)
        code = K.empty(d, np.uint64)
        length = K.empty(d, np.int64)
        qsgd_codes[_grid(d)](xd, K.dev(u), mode, cc, np.float32(c.s), code, length)
        pos, tot = _scan(length, d, 32)
        nbits = 32 + tot
        nbytes = (nbits + 7) // 8
        words = K.zeros((nbytes + 3) // 4, np.uint32)
        K.write_codes[_grid(d)](code, length, pos, words)
        out = K.empty(nbytes, np.uint8)
        K.words_to_bytes[_grid(nbytes)](words, out, nbytes)
        K.put_bytes[_grid(4)](K.cuda.to_device(np.array([norm], "<f4").view(np.uint8)), out, 0)
        return Payload(K.wrap(out, c.xp), nbits)

    def decode(self, data, out=None):
        c = self.c
        data, norm = c._header(data)
        nbytes = int(data.shape[0])
        if 8 * nbytes - 32 < 2 * c.d:
            raise CodecError(f"{c.name}: payload truncated ({8 * nbytes - 32} bits cannot hold "
                             f"{c.d} records)")
        tab, nsc = _table(norm, c.scale, c.s)
        out = c._out(out)
        words = _words(data, nbytes)
        err, info, lod, g, first, bd = self.parser.parse(words, 32, 8 * nbytes, c.d, 0,
                                                         c.nmax, 0)
        raise_err(c.name, err, info, c.d)
        res = K.cuda.to_device(np.array([bd, 0], np.int64))
        od = K.dev(out)
        qsgd_values[_pgrid(first.shape[0])](words, lod, g, K.cuda.to_device(first), c.d, c.s,
                                            tab, nsc, float(c.s), od, res)
        end, zbad = (int(v) for v in K.host(res))
        if isinstance(out, np.ndarray) and od is not out and hasattr(od, "copy_to_host"):
            od.copy_to_host(out)
        _finish(c.name, data, nbytes, end)
        if zbad:
            raise CodecError(f"{c.name}: level > s={c.s}")
        return out


class RunLengthCuda(QSGDCuda):
    """qsgd_runlength: levels -> compaction of the non-zeros (prefix sum) -> record lengths ->
    prefix sums -> parallel bit writes; decode by the segment parser, then a prefix sum of the
    gaps and a scatter."""

    def encode_u(self, xd, norm, u):
        c = self.c
        d = c.d
        mode, cc = self._mode(norm)
        zeta = K.empty(d, np.uint64)
        neg = K.empty(d, np.uint8)
        nz = K.empty(d, np.int64)
        rl_levels[_grid(d)](xd, K.dev(u), mode, cc, np.float32(c.s), zeta, neg, nz)
        rank, k = _scan(nz, d, 0)
        hn = (k + 1).bit_length() - 1
        start = 64 + 2 * hn + 1
        idx = K.empty(max(k, 1), np.int64)
        rlen = K.empty(max(k, 1), np.int64)
        tot = 0
        pos = rlen
        if k:
            rl_compact[_grid(d)](nz, rank, idx)
            rl_lens[_grid(k)](idx[:k], zeta, rlen[:k])
            pos, tot = _scan(rlen, k, start)
        nbits = start + tot
        nbytes = (nbits + 7) // 8
        words = K.zeros((nbytes + 3) // 4, np.uint32)
        rl_write[_grid(k)](idx, zeta, neg, pos, k, 2 * hn + 1, words)
        out = K.empty(nbytes, np.uint8)
        K.words_to_bytes[_grid(nbytes)](words, out, nbytes)
        head = np.concatenate([np.array([norm], "<f4").view(np.uint8),
                               np.array([d], "<u4").view(np.uint8)])
        K.put_bytes[_grid(8)](K.cuda.to_device(head), out, 0)
        return Payload(K.wrap(out, c.xp), nbits)

    def decode(self, data, out=None):
        from . import _bitstream as bs

        c = self.c
        name = c.name
        data, norm = c._header(data)
        nbytes = int(data.shape[0])
        end = 8 * nbytes
        if end < 65:
            raise CodecError(f"{name}: payload truncated (no count)")
        head = bs.bytes_to_words(np, np.ascontiguousarray(K.host(data[:24])))
        win0 = bs.window(np, head, np.asarray([64], dtype=np.int64))
        hn = int(bs.gamma_n(np, win0)[0])
        if hn > c.d.bit_length() or 64 + 2 * hn + 1 > end:
            raise CodecError(f"{name}: impossible count code")
        k = int(bs.gamma_value(np, win0, np.asarray([hn]))[0]) - 1
        if k > c.d:
            raise CodecError(f"{name}: {k} non-zeros > d={c.d}")
        start = 64 + 2 * hn + 1
        if end - start < 3 * k:
            raise CodecError(f"{name}: payload truncated ({end - start} bits cannot hold {k} "
                             "records)")
        tab, nsc = _table(norm, 1.0, c.s)
        out = c._out(out, zero=True)
        if k == 0:
            self.parser.stats = {"segments": 0, "fixup_passes": 0, "reparsed": 0,
                                 "reparsed_records": 0}
            _finish(name, data, nbytes, start)
            return out
        words = _words(data, nbytes)
        err, info, lod, g, first, bd = self.parser.parse(words, start, end, k, 1, c.nmax,
                                                         min(c.d.bit_length(), 31))
        raise_err(name, err, info, k)
        res = K.cuda.to_device(np.array([bd, 0], np.int64))
        vals = K.empty(k, np.float32)
        gaps = K.empty(k, np.int64)
        rl_values[_pgrid(first.shape[0])](words, lod, g, K.cuda.to_device(first), k, c.s, tab,
                                          nsc, float(c.s), vals, gaps, res)
        stop, zbad = (int(v) for v in K.host(res))
        _finish(name, data, nbytes, stop)
        if zbad:
            raise CodecError(f"{name}: level > s={c.s}")
        excl, offs, total = _block_scan(gaps, k)
        if total - 1 >= c.d:
            raise CodecError(f"{name}: index out of range (>= d={c.d})")
        od = K.dev(out)
        rl_scatter[_grid(k)](vals, gaps, excl, K.cuda.to_device(offs), PER, od)
        if isinstance(out, np.ndarray) and od is not out and hasattr(od, "copy_to_host"):
            od.copy_to_host(out)
        return out
