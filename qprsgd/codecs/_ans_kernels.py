"""rANS kernels of ``qsgd_ans`` (wire format: qprsgd/codecs/qsgd_ans.py), written once as plain
Python on numpy arrays: the numba backend compiles them (``_nb_ans``), the numpy backend runs
them interpreted (a slow sequential reference: rANS has no vectorized form), so both backends
execute the same operations and give the same bytes.

rANS with a 32-bit state and byte-wise renormalisation: state x in [L, 256 L), L = 2**23;
frequencies quantized to M = 2**SCALE_BITS.  The elements are cut into chunks of CHUNK_ELEMS,
each coded as its own stream (so chunks are encoded and decoded on separate threads; the chunk
size is part of the format, so the bytes do not depend on the thread count).  Encoding runs over
a chunk's symbols in reverse and writes bytes backwards; decoding reads forwards.  The encoder
divides by a frequency with a precomputed reciprocal (exact for 31-bit states)."""
from __future__ import annotations

import numpy as np

SCALE_BITS = 14
M = 1 << SCALE_BITS
RANS_L = 1 << 23
CHUNK_ELEMS = 1 << 20

ERR_OK = 0
ERR_PASTEND = 2    # the stream's bytes ran out
ERR_STATE = 3      # final state != L or bytes left over in the stream


def enc_tables(freq, cum):
    """Per-symbol (x_max, rcp, shift, bias, cmpl) for the reciprocal encoder."""
    n = freq.shape[0]
    xmax = np.zeros(n, dtype=np.uint64)
    rcp = np.zeros(n, dtype=np.uint64)
    sh = np.zeros(n, dtype=np.uint64)
    bias = np.zeros(n, dtype=np.uint64)
    cmpl = np.zeros(n, dtype=np.uint64)
    for s in range(n):
        f = int(freq[s])
        if f == 0:
            continue
        xmax[s] = ((RANS_L >> SCALE_BITS) << 8) * f
        cmpl[s] = M - f
        if f < 2:
            rcp[s] = 0xFFFFFFFF
            sh[s] = 0
            bias[s] = int(cum[s]) + M - 1
        else:
            shift = 0
            while f > (1 << shift):
                shift += 1
            rcp[s] = ((1 << (shift + 31)) + f - 1) // f
            sh[s] = shift - 1
            bias[s] = int(cum[s])
    return xmax, rcp, sh, bias, cmpl


def quantize_symbols(zeta, neg, Ecap, syms, counts, escv):
    """syms[i] (uint16) = the signed-level symbol of element i: 0 for level 0; 2 z - 1 + neg
    for 1 <= z < Ecap; 2 Ecap - 1 + neg for an escaped level (its z - Ecap appended to escv);
    counts[] += the histogram.  Returns (max level, escapes)."""
    nesc = 0
    zmax = 0
    for i in range(zeta.shape[0]):
        z = np.int64(zeta[i])
        zmax = max(zmax, z)
        if z == 0:
            s = 0
        elif z < Ecap:
            s = 2 * z - 1 + np.int64(neg[i])
        else:
            s = 2 * Ecap - 1 + np.int64(neg[i])
            escv[nesc] = np.uint32(z - Ecap)
            nesc += 1
        syms[i] = s
        counts[s] += 1
    return zmax, nesc


def rans_encode_chunk(syms, a, b, xmax, rcp, sh, bias, cmpl, buf, hi):
    """The rANS bytes of syms[a:b], written backwards ending at buf[hi]; returns the start
    offset (the stream is buf[start:hi]).  Two interleaved states: element i uses state
    (i - a) & 1; symbols are encoded in reverse, each state renormalised just before its symbol,
    and the final states are flushed state 1 first, so the stream starts with state 0's 4
    bytes, then state 1's (big-endian), as the decoder reads them."""
    p = hi
    x0 = np.uint64(RANS_L)
    x1 = np.uint64(RANS_L)
    m32 = np.uint64(32)
    for i in range(b - 1, a - 1, -1):
        s = syms[i]
        xm = xmax[s]
        if ((i - a) & 1) == 0:
            while x0 >= xm:
                p -= 1
                buf[p] = np.uint8(x0 & np.uint64(255))
                x0 >>= np.uint64(8)
            q = ((x0 * rcp[s]) >> m32) >> sh[s]
            x0 = x0 + bias[s] + q * cmpl[s]
        else:
            while x1 >= xm:
                p -= 1
                buf[p] = np.uint8(x1 & np.uint64(255))
                x1 >>= np.uint64(8)
            q = ((x1 * rcp[s]) >> m32) >> sh[s]
            x1 = x1 + bias[s] + q * cmpl[s]
    for _ in range(4):
        p -= 1
        buf[p] = np.uint8(x1 & np.uint64(255))
        x1 >>= np.uint64(8)
    for _ in range(4):
        p -= 1
        buf[p] = np.uint8(x0 & np.uint64(255))
        x0 >>= np.uint64(8)
    return p


def rans_decode_chunk(data, start, end, a, b, slot_sym, slot_fb, vtab, nesc_sym, out, escpos):
    """Decode the elements a..b-1 from data[start:end] into out (vtab[sym] for the direct
    symbols; two interleaved states as the encoder); an escape symbol s >= nesc_sym records
    2 i + (s - nesc_sym) in escpos[j] (j from 0).  Returns (err, escapes)."""
    p = start
    if end - start < 8:
        return ERR_PASTEND, 0
    x0 = np.uint64(0)
    x1 = np.uint64(0)
    for _ in range(4):
        x0 = (x0 << np.uint64(8)) | np.uint64(data[p])
        p += 1
    for _ in range(4):
        x1 = (x1 << np.uint64(8)) | np.uint64(data[p])
        p += 1
    mask = np.uint64(M - 1)
    sb = np.uint64(SCALE_BITS)
    L = np.uint64(RANS_L)
    m16 = np.uint64(0xFFFF)
    s16 = np.uint64(16)
    ne = 0
    i = a
    while i < b:
        slot0 = x0 & mask
        fb0 = np.uint64(slot_fb[slot0])
        s0 = np.int64(slot_sym[slot0])
        x0 = (fb0 >> s16) * (x0 >> sb) + (fb0 & m16)
        has1 = i + 1 < b
        if has1:
            slot1 = x1 & mask
            fb1 = np.uint64(slot_fb[slot1])
            s1 = np.int64(slot_sym[slot1])
            x1 = (fb1 >> s16) * (x1 >> sb) + (fb1 & m16)
        while x0 < L:
            if p >= end:
                return ERR_PASTEND, ne
            x0 = (x0 << np.uint64(8)) | np.uint64(data[p])
            p += 1
        if s0 < nesc_sym:
            out[i] = vtab[s0]
        else:
            escpos[ne] = 2 * i + (s0 - nesc_sym)
            ne += 1
        if has1:
            while x1 < L:
                if p >= end:
                    return ERR_PASTEND, ne
                x1 = (x1 << np.uint64(8)) | np.uint64(data[p])
                p += 1
            if s1 < nesc_sym:
                out[i + 1] = vtab[s1]
            else:
                escpos[ne] = 2 * (i + 1) + (s1 - nesc_sym)
                ne += 1
        i += 2
    if x0 != L or x1 != L or p != end:
        return ERR_STATE, ne
    return ERR_OK, ne
