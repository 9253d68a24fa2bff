"""numba-CPU kernels of the QSGD family (``qsgd``, ``qsgd_scaled``, ``qsgd_runlength``; wire
formats in qprsgd/codecs/qsgd.py): quantize + Elias-gamma pack, the table-driven decoder and the
multi-threaded encoder/decoder.

Every multi-threaded kernel produces exactly the bytes / values of the single-thread ones,
whatever the thread count:
  * encode: T element segments; segment t starts the PCG64 stream at its first element's draw
    (``_pcg64.segment_states``), writes its own bitstream from bit 0, and the segments' streams
    are concatenated in order.
  * decode: segment 0 parses from bit 32; segment t >= 1 parses speculatively from the middle of
    the stream (restarting one bit later after an impossible code while it has not yet recorded
    ``SPEC_K`` record starts) into scratch.  Segment 0's parse ends at the first true record
    start p >= its stop bit; if p is one of segment 1's recorded starts, segment 1's records
    from there on are the true ones and are copied into place; otherwise -- or on any error,
    count mismatch or level > s -- the serial decoder resumes from the last true (position,
    index) and reports exactly what the single-thread decoder reports.

Error codes returned by the decoders (the wrappers raise ``CodecError``): ``ERR_*`` of _nb_core.
Every kernel is bounded by the payload length and ``d``: a decoder advances at least 2 bits per
record and stops at the first error, so it cannot hang."""
from __future__ import annotations

import numba
import numpy as np

from ._nb_core import (CHUNK, ERR_BADCODE, ERR_OK, ERR_PASTEND, ERR_SHORT, U0, U1, U32, U63,
                       U64, _bswap, _bswap32, _clz, _pcg_chunk, _put, _put32, _window, njit,
                       pjit)

SPEC_K = 1024   # record starts a speculative decode segment remembers


@njit
def _quantize_chunk(x, u, mode, c, s32, zeta, neg):
    """zeta[t], neg[t] for the chunk (branch-free, vectorizable)."""
    for t in range(x.shape[0]):
        xi = x[t]
        a = abs(xi)
        if mode == 1:
            r = a * c
        else:
            r = (a / c) * s32
        r = min(r, s32)
        lv = np.int64(r)  # r >= 0: truncation is floor
        fr = r - np.float32(lv)
        z = lv + (1 if u[t] < fr else 0)
        zeta[t] = np.uint64(z if mode != 0 else 0)
        neg[t] = U1 if xi < np.float32(0) else U0

@njit
def qsgd_quantize_pack(x, u, state, use_pcg, mode, c, s32, norm_be, words, runlength):
    """Quantize (docs/codecs.md, qsgd) and pack, in L1-sized chunks: draws (inline PCG64
    when ``use_pcg``, else ``u``), quantization, then the bit writer.

    mode 0: norm == 0 (every level 0, the d draws are still made); 1: r = |x| * c;
    2: r = (|x| / c) * s32 (c is then the norm).  ``runlength`` False: the qsgd stream
    (norm, then sign + gamma(zeta + 1) per element), returns (nbits, 0).  True: only the
    records gamma(i - prev), sign, gamma(zeta) of the non-zero levels, from bit 0, returns
    (record bits, k)."""
    d = x.shape[0]
    hi, lo, ihi, ilo = state[0], state[1], state[2], state[3]
    has = state[4]
    buf = state[5]
    ub = np.empty(CHUNK, dtype=np.float32)
    zeta = np.empty(CHUNK, dtype=np.uint64)
    neg = np.empty(CHUNK, dtype=np.uint64)
    out32 = words.view(np.uint32)
    wi = 0
    acc = U0
    fill = U0
    if not runlength:
        wi, acc, fill = _put32(out32, wi, acc, fill, np.uint64(norm_be), U32)
    total = U0
    k = 0
    prev = -1
    for c0 in range(0, d, CHUNK):
        n = min(CHUNK, d - c0)
        if use_pcg:
            hi, lo, has, buf = _pcg_chunk(hi, lo, ihi, ilo, has, buf, ub, n)
            uc = ub[:n]
        else:
            uc = u[c0:c0 + n]
        _quantize_chunk(x[c0:c0 + n], uc, mode, c, s32, zeta, neg)
        if not runlength:
            for t in range(n):
                kk = zeta[t] + U1
                nn = U63 - _clz(kk)
                ln = nn + nn + np.uint64(2)
                wi, acc, fill = _put(out32, wi, acc, fill, kk | (neg[t] << (ln - U1)), ln)
                total += ln
        else:
            for t in range(n):
                z = zeta[t]
                if z != U0:
                    i = c0 + t
                    g = np.uint64(i - prev)
                    prev = i
                    k += 1
                    n1 = U63 - _clz(g)
                    l1 = n1 + n1 + U1
                    wi, acc, fill = _put(out32, wi, acc, fill, g, l1)
                    n2 = U63 - _clz(z)
                    l2 = n2 + n2 + np.uint64(2)
                    wi, acc, fill = _put(out32, wi, acc, fill, z | (neg[t] << (l2 - U1)), l2)
                    total += l1 + l2
    out32[wi] = _bswap32(np.uint32(acc >> U32))  # the partial last word (zero padded)
    state[0] = hi
    state[1] = lo
    state[4] = has
    state[5] = buf
    if runlength:
        return np.int64(total), k
    return np.int64(total) + 32, k

@njit
def runlength_assemble(rec, recbits, norm_be, d_be, k, words):
    """norm (32 bits), d (32 bits), gamma(k + 1), then ``recbits`` bits of ``rec`` (wire
    words)."""
    out32 = words.view(np.uint32)
    rec32 = rec.view(np.uint32)
    j = 0
    acc = U0
    fill = U0
    j, acc, fill = _put32(out32, j, acc, fill, np.uint64(norm_be), U32)
    j, acc, fill = _put32(out32, j, acc, fill, np.uint64(d_be), U32)
    kk = np.uint64(k + 1)
    n = U63 - _clz(kk)
    j, acc, fill = _put(out32, j, acc, fill, kk, n + n + U1)
    nfull = recbits // 32
    for t in range(nfull):
        j, acc, fill = _put32(out32, j, acc, fill, np.uint64(_bswap32(rec32[t])), U32)
    rem = np.uint64(recbits - 32 * nfull)
    if rem != U0:
        j, acc, fill = _put32(out32, j, acc, fill,
                              np.uint64(_bswap32(rec32[nfull])) >> (U32 - rem), rem)
    out32[j] = _bswap32(np.uint32(acc >> U32))
    return 64 + 2 * np.int64(n) + 1 + recbits


@njit
def qsgd_decode(words, end, d, nmax, s, tab, nsc, sd, out):
    """Parse d records sign + gamma(zeta + 1) from bit 32 of the wire words (byte-swapped on
    load; ``words`` has >= 2 zero guard words).  Writes ±value into out (``tab[zeta]`` when
    zeta < len(tab), else float32(nsc * zeta / sd)).  Returns (err, info, end_bit, level_bad)."""
    pos = 32
    cur = _bswap(words[0])
    nxt = _bswap(words[1])
    wi = 2
    off = U32
    zbad = False
    ntab = tab.shape[0]
    su = np.uint64(s)
    nm = np.uint64(nmax)
    for i in range(d):
        if pos >= end:
            return ERR_SHORT, i, pos, zbad
        win = _window(cur, nxt, off)
        body = win << U1
        n = _clz(body)
        if n > nm:
            return ERR_BADCODE, pos, pos, zbad
        ln = n + n + np.uint64(2)
        if pos + np.int64(ln) > end:
            return ERR_PASTEND, pos, pos, zbad
        zeta = (body >> (U63 - n - n)) - U1
        if zeta > su:
            zbad = True
            v = np.float32(0)
        elif zeta < np.uint64(ntab):
            v = tab[zeta]
        else:
            v = np.float32((nsc * np.float64(zeta)) / sd)
        out[i] = -v if (win >> U63) != U0 else v
        pos += np.int64(ln)
        off += ln
        if off >= U64:
            off -= U64
            cur = nxt
            nxt = _bswap(words[wi])
            wi += 1
    return ERR_OK, 0, pos, zbad

@njit
def runlength_decode(words, start, end, k, d, nd, nmax, s, tab, nsc, sd, out):
    """Parse k records gamma(i - prev), sign, gamma(zeta) from bit ``start``; out must be
    zero.  Returns (err, info, end_bit, level_bad, index_bad)."""
    pos = start
    wi = start // 64
    cur = _bswap(words[wi])
    nxt = _bswap(words[wi + 1])
    wi += 2
    off = np.uint64(start % 64)
    zbad = False
    ibad = False
    idx = -1
    ntab = tab.shape[0]
    su = np.uint64(s)
    nm = np.uint64(nmax)
    ndm = np.uint64(min(nd, 31))
    for j in range(k):
        if pos >= end:
            return ERR_SHORT, j, pos, zbad, ibad
        win = _window(cur, nxt, off)
        n1 = _clz(win)
        if n1 > ndm:
            return ERR_BADCODE, pos, pos, zbad, ibad
        l1 = n1 + n1 + U1
        gap = win >> (U64 - l1)
        # second window: the sign bit and gamma(zeta), l1 bits further
        o2 = off + l1
        if o2 >= U64:
            w2 = _window(nxt, _bswap(words[wi]), o2 - U64)
        else:
            w2 = _window(cur, nxt, o2)
        body = w2 << U1
        n2 = _clz(body)
        if n2 > nm:
            return ERR_BADCODE, pos, pos, zbad, ibad
        l2 = n2 + n2 + np.uint64(2)
        ln = l1 + l2
        if pos + np.int64(ln) > end:
            return ERR_PASTEND, pos, pos, zbad, ibad
        zeta = body >> (U63 - n2 - n2)
        idx += np.int64(gap)
        if zeta > su:
            zbad = True
        elif idx >= d:
            ibad = True
        else:
            if zeta < np.uint64(ntab):
                v = tab[zeta]
            else:
                v = np.float32((nsc * np.float64(zeta)) / sd)
            out[idx] = -v if (w2 >> U63) != U0 else v
        pos += np.int64(ln)
        off += ln
        while off >= U64:
            off -= U64
            cur = nxt
            nxt = _bswap(words[wi])
            wi += 1
    return ERR_OK, 0, pos, zbad, ibad


# ---- qsgd encode ------------------------------------------------------------------------
@njit
def _quantize32(x, u, mode, c, s32, zeta, neg):
    """``_quantize_chunk`` into uint32 levels / signs, one loop per mode (vectorizes); the
    same float32 operations, so the same levels (zeta <= float32(s) + 1 < 2**32)."""
    n = x.shape[0]
    if mode == 0:
        for t in range(n):
            zeta[t] = np.uint32(0)
            neg[t] = np.uint32(x[t] < np.float32(0))
    elif mode == 1:
        for t in range(n):
            xi = x[t]
            r = min(abs(xi) * c, s32)
            lv = np.int64(r)
            fr = r - np.float32(lv)
            zeta[t] = np.uint32(lv) + np.uint32(u[t] < fr)
            neg[t] = np.uint32(xi < np.float32(0))
    else:
        for t in range(n):
            xi = x[t]
            r = min((abs(xi) / c) * s32, s32)
            lv = np.int64(r)
            fr = r - np.float32(lv)
            zeta[t] = np.uint32(lv) + np.uint32(u[t] < fr)
            neg[t] = np.uint32(xi < np.float32(0))

@njit
def _codes(zeta, neg, n, cs, ls):
    """cs[t], ls[t] = sign + gamma(zeta[t] + 1) code and its length, t < n."""
    for t in range(n):
        kk = np.uint64(zeta[t]) + U1
        nn = U63 - _clz(kk)
        ln = nn + nn + np.uint64(2)
        cs[t] = kk | (np.uint64(neg[t]) << (ln - U1))
        ls[t] = ln

@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gput(out32, wi, acc, fill, g, gl, item, L):
    """Append an item of L (1..64) bits through the 64-bit group register (g, gl): the
    writer is called only when the group is full."""
    if gl + L > U64:
        wi, acc, fill = _put(out32, wi, acc, fill, g, gl)
        return wi, acc, fill, item, L
    if gl == U0:        # L may be 64 only here: no shift by 64
        return wi, acc, fill, item, L
    return wi, acc, fill, (g << L) | item, gl + L

@njit
def _qsgd_encode_seg(x, a, b, st, mode, c, s32, out32, wi, acc, fill, ub, zeta, neg, cs, ls):
    """Quantize and pack elements a..b-1 (a multiple of CHUNK) with the inline PCG64 from
    state row ``st`` (updated), appending to the writer (out32, wi, acc, fill).  The codes
    of 8 elements are merged into one item when they fit in 64 bits (almost always at
    s = sqrt(d)), and items go through a 64-bit group register."""
    hi, lo, ihi, ilo = st[0], st[1], st[2], st[3]
    has = st[4]
    buf = st[5]
    total = U0
    g = U0
    gl = U0
    for c0 in range(a, b, CHUNK):
        n = min(CHUNK, b - c0)
        hi, lo, has, buf = _pcg_chunk(hi, lo, ihi, ilo, has, buf, ub, n)
        _quantize32(x[c0:c0 + n], ub[:n], mode, c, s32, zeta, neg)
        _codes(zeta, neg, n, cs, ls)
        n8 = n - n % 8
        for q in range(0, n8, 8):
            L = ls[q] + ls[q + 1] + ls[q + 2] + ls[q + 3] + ls[q + 4] + ls[q + 5] + \
                ls[q + 6] + ls[q + 7]
            total += L
            if L <= U64:
                item = U0
                for k in range(8):
                    item = (item << ls[q + k]) | cs[q + k]
                wi, acc, fill, g, gl = _gput(out32, wi, acc, fill, g, gl, item, L)
            else:
                for k in range(8):
                    wi, acc, fill, g, gl = _gput(out32, wi, acc, fill, g, gl, cs[q + k],
                                                 ls[q + k])
        for k in range(n8, n):
            total += ls[k]
            wi, acc, fill, g, gl = _gput(out32, wi, acc, fill, g, gl, cs[k], ls[k])
    if gl != U0:
        wi, acc, fill = _put(out32, wi, acc, fill, g, gl)
    st[0] = hi
    st[1] = lo
    st[4] = has
    st[5] = buf
    return wi, acc, fill, total

@pjit
def qsgd_encode_par(x, bounds, states, mode, c, s32, norm_be, words, scratch, soff, segbits,
                    wstate):
    """The qsgd stream of ``qsgd_quantize_pack`` (inline PCG64 draws) with the elements
    split into segments bounds[t]..bounds[t+1]-1 (multiples of CHUNK): segment 0 writes the
    norm and its records into ``words``; segment t >= 1 writes its records from bit 0 of
    ``scratch`` words soff[t]..; :func:`qsgd_append` then appends them in order (writer
    states in ``wstate``).  ``states[t]`` is the generator at the segment's first draw
    (``pcg64_segment_states``); on return row T-1 holds the state after all d draws."""
    nt = bounds.shape[0] - 1
    for t in numba.prange(nt):
        _qsgd_encode_task(t, x, bounds, states, mode, c, s32, norm_be, words, scratch, soff,
                          segbits, wstate)

@njit
def _qsgd_encode_task(t, x, bounds, states, mode, c, s32, norm_be, words, scratch, soff,
                      segbits, wstate):
    """Segment t of qsgd_encode_par (a function of its own: numba's parfor lowering
    mishandled the branch-assigned output array when this was inlined in the prange body)."""
    ub = np.empty(CHUNK, dtype=np.float32)
    zeta = np.empty(CHUNK, dtype=np.uint32)
    neg = np.empty(CHUNK, dtype=np.uint32)
    cs = np.empty(CHUNK, dtype=np.uint64)
    ls = np.empty(CHUNK, dtype=np.uint64)
    if t == 0:
        o32 = words.view(np.uint32)
        wi, acc, fill = _put32(o32, 0, U0, U0, np.uint64(norm_be), U32)
    else:
        o32 = scratch.view(np.uint32)[2 * soff[t]:2 * soff[t + 1]]
        wi, acc, fill = 0, U0, U0
    wi, acc, fill, tot = _qsgd_encode_seg(x, bounds[t], bounds[t + 1], states[t], mode,
                                          c, s32, o32, wi, acc, fill, ub, zeta, neg, cs, ls)
    o32[wi] = _bswap32(np.uint32(acc >> U32))
    segbits[t] = np.int64(tot)
    wstate[t, 0] = np.uint64(wi)
    wstate[t, 1] = acc
    wstate[t, 2] = fill

@njit
def qsgd_append(words, scratch, soff, segbits, wstate):
    """Append the bitstreams of segments 1.. (scratch) after segment 0's (words); returns
    nbits."""
    nt = segbits.shape[0]
    out32 = words.view(np.uint32)
    wi = np.int64(wstate[0, 0])
    acc = wstate[0, 1]
    fill = wstate[0, 2]
    for t in range(1, nt):
        r32 = scratch.view(np.uint32)[2 * soff[t]:2 * soff[t + 1]]
        rb = segbits[t]
        nfull = rb // 32
        for k in range(nfull):
            wi, acc, fill = _put32(out32, wi, acc, fill, np.uint64(_bswap32(r32[k])), U32)
        rem = np.uint64(rb - 32 * nfull)
        if rem != U0:
            wi, acc, fill = _put32(out32, wi, acc, fill,
                                   np.uint64(_bswap32(r32[nfull])) >> (U32 - rem), rem)
    out32[wi] = _bswap32(np.uint32(acc >> U32))
    total = 32
    for t in range(nt):
        total += segbits[t]
    return total

# ---- qsgd decode ------------------------------------------------------------------------
FAST_BITS = 12   # lookahead of the multi-record decode table
FAST_MAX = 6     # records per table entry (12 bits hold at most 6 two-bit records)

@njit
def qsgd_fast_table(nmax, s):
    """Multi-record table for the qsgd stream: entry w (the next FAST_BITS stream bits)
    holds cnt complete records (sign + gamma(zeta + 1)) read greedily from w and their total
    length bits, as meta[w] = bits | cnt << 4, and zs[w, k] = zeta_k << 1 | sign_k (uint8:
    zeta <= 62; the tables take 28 KB, L1-resident).  A record is only taken into an
    entry when it is valid (n <= nmax, zeta <= s); cnt = 0 sends the decoder to the
    one-record path, which reports errors exactly as before."""
    nw = 1 << FAST_BITS
    meta = np.zeros(nw, dtype=np.uint8)
    zs = np.zeros((nw, FAST_MAX), dtype=np.uint8)
    for w in range(nw):
        p = 0
        k = 0
        while k < FAST_MAX and p + 2 <= FAST_BITS:
            sign = (w >> (FAST_BITS - 1 - p)) & 1
            n = 0
            while p + 1 + n < FAST_BITS and ((w >> (FAST_BITS - 2 - p - n)) & 1) == 0:
                n += 1
            ln = 2 * n + 2
            if p + ln > FAST_BITS or n > nmax:
                break
            v = (w >> (FAST_BITS - p - ln)) & ((1 << (n + 1)) - 1)
            zeta = v - 1
            if zeta > s:
                break
            zs[w, k] = (zeta << 1) | sign
            p += ln
            k += 1
        meta[w] = p | (k << 4)
    return meta, zs

@njit
def _qsgd_parse(words, pos, stop, end, cap, spec, nmax, s, tab, nsc, sd, vals, starts,
                fmeta, fzs):
    """Parse records from bit ``pos`` while the record start is < stop, at most ``cap``,
    values into vals[0..]: the table path (up to FAST_MAX records per lookup, always storing
    FAST_MAX values -- the extra ones are overwritten by the next records) while at least
    FAST_BITS bits remain before ``stop`` and FAST_MAX values fit, else one record at a time.
    ``spec``: a speculative start -- the first SPEC_K record starts are recorded in
    ``starts`` (one record at a time), and an impossible code among them restarts the
    parse one bit later.  Returns (n, pos, status, zlast): status 0 = reached stop/cap,
    1 = impossible code (info: its position is pos), 2 = record past the end; zlast =
    index of the last record with level > s (-1 if none)."""
    ntab = tab.shape[0]
    su = np.uint64(s)
    nm = np.uint64(nmax)
    fb = np.uint64(64 - FAST_BITS)
    stab = np.zeros(128, dtype=np.float32)  # stab[zeta << 1 | sign] = ±tab[zeta]
    for z in range(min(64, ntab)):
        stab[2 * z] = tab[z]
        stab[2 * z + 1] = -tab[z]
    fast_stop = stop - FAST_BITS
    fast_cap = cap - FAST_MAX
    while True:
        wi = pos // 64
        cur = _bswap(words[wi])
        nxt = _bswap(words[wi + 1])
        wi += 2
        off = np.uint64(pos % 64)
        n_rec = 0
        zlast = -1
        status = 0
        restart = False
        while pos < stop and n_rec < cap:
            win = _window(cur, nxt, off)
            if pos <= fast_stop and n_rec <= fast_cap and (not spec or n_rec >= SPEC_K):
                e = np.int64(win >> fb)
                mt = np.int64(fmeta[e])
                c = mt >> 4
                if c != 0:
                    for k in range(FAST_MAX):
                        vals[n_rec + k] = stab[fzs[e, k]]
                    n_rec += c
                    ln = np.uint64(mt & 15)
                    pos += np.int64(ln)
                    off += ln
                    if off >= U64:
                        off -= U64
                        cur = nxt
                        nxt = _bswap(words[wi])
                        wi += 1
                    continue
            body = win << U1
            n = _clz(body)
            if n > nm:
                if spec and n_rec < SPEC_K:
                    restart = True
                status = 1
                break
            ln = n + n + np.uint64(2)
            if pos + np.int64(ln) > end:
                status = 2
                break
            zeta = (body >> (U63 - n - n)) - U1
            if zeta > su:
                zlast = n_rec
                v = np.float32(0)
            elif zeta < np.uint64(ntab):
                v = tab[zeta]
            else:
                v = np.float32((nsc * np.float64(zeta)) / sd)
            vals[n_rec] = -v if (win >> U63) != U0 else v
            if spec and n_rec < SPEC_K:
                starts[n_rec] = pos
            pos += np.int64(ln)
            n_rec += 1
            off += ln
            if off >= U64:
                off -= U64
                cur = nxt
                nxt = _bswap(words[wi])
                wi += 1
        if restart:
            pos += 1
            if pos >= stop:
                return 0, pos, 1, -1
            continue
        return n_rec, pos, status, zlast

@njit
def qsgd_decode_from(words, pos, i0, end, d, nmax, s, tab, nsc, sd, out, fmeta, fzs):
    """The decoder resumed at a true record start (record i0 begins at bit ``pos``), with
    the table path.  Returns (err, info, end_bit, level_bad) exactly as ``qsgd_decode``."""
    starts = np.zeros(1, dtype=np.int64)
    n, p, st, zl = _qsgd_parse(words, pos, end, end, d - i0, False, nmax, s, tab, nsc, sd,
                               out[i0:], starts, fmeta, fzs)
    zbad = zl >= 0
    if st == 1:
        return ERR_BADCODE, p, p, zbad
    if st == 2:
        return ERR_PASTEND, p, p, zbad
    if n < d - i0:
        return ERR_SHORT, i0 + n, p, zbad
    return ERR_OK, 0, p, zbad

@njit
def qsgd_catchup(words, pos, i, end, d, nmax, s, tab, nsc, sd, out, starts, k):
    """Resynchronise with a speculative segment: decode true records one at a time from
    (pos, i) into out until pos is one of the segment's recorded starts starts[0..k-1]
    (sorted).  Returns (pos, i, j) with starts[j] == pos, or j = -1 when the true parse
    passes the last recorded start, meets an error or a level > s, or reaches d records
    (the caller then resumes the serial decoder from the returned (pos, i))."""
    if k == 0:
        return pos, i, -1
    j = 0
    wi = pos // 64
    cur = _bswap(words[wi])
    nxt = _bswap(words[wi + 1])
    wi += 2
    off = np.uint64(pos % 64)
    ntab = tab.shape[0]
    su = np.uint64(s)
    nm = np.uint64(nmax)
    while i < d and pos <= starts[k - 1]:
        while starts[j] < pos:
            j += 1
        if starts[j] == pos:
            return pos, i, j
        win = _window(cur, nxt, off)
        body = win << U1
        n = _clz(body)
        if n > nm:
            break
        ln = n + n + np.uint64(2)
        if pos + np.int64(ln) > end:
            break
        zeta = (body >> (U63 - n - n)) - U1
        if zeta > su:
            break
        elif zeta < np.uint64(ntab):
            v = tab[zeta]
        else:
            v = np.float32((nsc * np.float64(zeta)) / sd)
        out[i] = -v if (win >> U63) != U0 else v
        i += 1
        pos += np.int64(ln)
        off += ln
        if off >= U64:
            off -= U64
            cur = nxt
            nxt = _bswap(words[wi])
            wi += 1
    return pos, i, -1

@pjit
def qsgd_decode_par(words, end, d, nmax, s, tab, nsc, sd, out, tmp, bounds, toff, res,
                    starts, fmeta, fzs):
    """Segment 0 parses from bit 32 into out; segment t >= 1 speculatively from bit
    bounds[t] into tmp[toff[t]:toff[t+1]], each while the record start is < bounds[t+1].
    res[t] = (n, final pos, status, zlast); the merge is in QSGD._nb_decode_par."""
    nt = bounds.shape[0] - 1
    for t in numba.prange(nt):
        _qsgd_decode_task(t, words, end, d, nmax, s, tab, nsc, sd, out, tmp, bounds, toff,
                          res, starts, fmeta, fzs)

@njit
def _qsgd_decode_task(t, words, end, d, nmax, s, tab, nsc, sd, out, tmp, bounds, toff, res,
                      starts, fmeta, fzs):
    if t == 0:
        n, p, stt, zl = _qsgd_parse(words, 32, bounds[1], end, d, False, nmax, s, tab, nsc,
                                    sd, out, starts[0], fmeta, fzs)
    else:
        n, p, stt, zl = _qsgd_parse(words, bounds[t], bounds[t + 1], end,
                                    toff[t + 1] - toff[t], True, nmax, s, tab, nsc, sd,
                                    tmp[toff[t]:toff[t + 1]], starts[t], fmeta, fzs)
    res[t, 0] = n
    res[t, 1] = p
    res[t, 2] = stt
    res[t, 3] = zl

@pjit
def pcopy(src, dst, nt):
    """dst[:] = src (same length) in nt contiguous pieces."""
    n = src.shape[0]
    for t in numba.prange(nt):
        a = (n * t) // nt
        b = (n * (t + 1)) // nt
        dst[a:b] = src[a:b]
