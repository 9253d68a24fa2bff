"""Vectorized MSB-first bit packing and Elias-gamma parsing, written against an array module ``xp``.

Layout convention: a bit stream is held as 64-bit *words* whose integer value is the big-endian
reading of 8 stream bytes, so stream bit ``p`` is bit ``63 - (p & 63)`` of word ``p >> 6``.
``words_to_bytes`` byteswaps once to get the wire bytes; ``bytes_to_words`` does the reverse.

Packing (``pack``): every field is a (code, length) pair with 1 <= length <= 64.  Offsets are an
exclusive cumulative sum of the lengths; a field touches at most two words, so its contribution
to each is one shifted copy, and the contributions of the fields that start in the same word are
summed with ``add.reduceat`` (fields never overlap, so + is |).  No loop over elements.

Parsing variable-length records (``parse_records``) has a sequential dependency (record i+1 starts
where record i ends).  It is resolved with *speculative segment walkers*: the stream is cut into
segments of ``G`` bits, one walker per segment starts at the segment start and steps record by
record (all walkers in lockstep, one numpy op per step over all walkers), continuing ``R`` bits
into the next segment.  Walker j's margin is checked against the positions walker j+1 visited
inside its own segment; the first common position is a synchronization point, after which both
parses coincide.  Walker 0 starts at the true start, so by induction the stitched path is the
true parse.  A walker that finds no synchronization point gets its successor restarted at its own
first margin position (which is exact once walker j is verified), and the walk is repeated; every
round verifies at least one more segment, so the number of rounds is bounded by the number of
segments (typical streams need one round).  Every walker takes at most (2G + R) / min_len steps,
so work and memory are O(stream bits).
"""
from __future__ import annotations

import numpy as np

from .base import CodecError

U64 = np.uint64


def new_words(xp, nbits: int):
    """Zeroed word buffer for ``nbits`` stream bits plus two guard words (for window reads)."""
    return xp.zeros((nbits + 63) // 64 + 2, dtype=xp.uint64)


def pack(xp, words, start_bit: int, codes, lens):
    """Add the fields ``codes`` (uint64, < 2**lens) of ``lens`` bits (int64, 1..64) at ``start_bit``.

    Returns the end bit.  ``words`` must be zero where the fields land.
    """
    n = int(codes.shape[0])
    if n == 0:
        return start_bit
    ends = xp.cumsum(lens)
    total = int(ends[-1])
    starts = ends - lens
    starts += start_bit
    w = starts >> 6
    p = (starts & 63).astype(xp.uint64)
    top = codes << (64 - lens).astype(xp.uint64)  # field's first bit at bit 63
    first = top >> p
    spill = (top << U64(1)) << (U64(63) - p)  # p == 0 gives 0 without a shift by 64
    if n > 1:
        brk = xp.flatnonzero(w[1:] != w[:-1]) + 1
        idx = xp.concatenate([xp.zeros(1, dtype=brk.dtype), brk])
    else:
        idx = xp.zeros(1, dtype=xp.int64)
    uw = w[idx]
    if xp is np:
        fs = np.add.reduceat(first, idx)
        ss = np.add.reduceat(spill, idx)
    else:  # cupy has no reduceat: segmented sum via cumsum differences (mod 2**64, exact)
        fs = _segsum(xp, first, idx)
        ss = _segsum(xp, spill, idx)
    words[uw] += fs
    words[uw + 1] += ss
    return start_bit + total


def _segsum(xp, a, idx):
    c = xp.cumsum(a, dtype=xp.uint64)
    ends = xp.concatenate([idx[1:] - 1, xp.asarray([a.shape[0] - 1], dtype=idx.dtype)])
    tot = c[ends]
    prev = xp.concatenate([xp.zeros(1, dtype=xp.uint64), tot[:-1]])
    return tot - prev


def words_to_bytes(xp, words, nbits: int):
    """Wire bytes (a fresh array of ceil(nbits/8) bytes) from a word buffer (which is clobbered)."""
    nbytes = (nbits + 7) // 8
    if xp is np:
        words.byteswap(inplace=True)
    else:
        words = words.view(xp.uint8).reshape(-1, 8)[:, ::-1].copy().reshape(-1).view(xp.uint64)
    return words.view(xp.uint8)[:nbytes].copy()


def bytes_to_words(xp, data):
    """Word buffer (with guard words) holding ``data``."""
    nbytes = int(data.shape[0])
    words = xp.zeros(nbytes // 8 + 3, dtype=xp.uint64)
    words.view(xp.uint8)[:nbytes] = data
    if xp is np:
        words.byteswap(inplace=True)
    else:
        words = words.view(xp.uint8).reshape(-1, 8)[:, ::-1].copy().reshape(-1).view(xp.uint64)
    return words


def window(xp, words, pos):
    """The 64 stream bits starting at bit ``pos`` (int64 array), as uint64 (bit 63 = first)."""
    w = pos >> 6
    o = (pos & 63).astype(xp.uint64)
    return (words[w] << o) | ((words[w + 1] >> U64(1)) >> (U64(63) - o))


def gamma_n(xp, win):
    """n = floor(log2 k) of the Elias-gamma code of k at the top of ``win``; 32 when no 1 bit in
    the top 32 bits (i.e. a code longer than 63 bits, which no codec here produces)."""
    top = (win >> U64(32)).astype(xp.float64)  # exact: < 2**32
    _, e = xp.frexp(top)
    return 32 - e.astype(xp.int64)


def gamma_value(xp, win, n):
    """Value k of the gamma code of leading-zero count ``n`` at the top of ``win`` (n <= 31)."""
    return win >> (63 - 2 * n).astype(xp.uint64)


def gamma_len_n(xp, k):
    """floor(log2 k) for positive integers k < 2**53 (uint64 array)."""
    _, e = xp.frexp(k.astype(xp.float64))
    return e.astype(xp.int64) - 1


def parse_records(xp, words, start: int, end: int, count: int, reclen, min_len: int,
                  G: int = 2048, what: str = "codec"):
    """Positions (int64, ``count``) of the first ``count`` records from bit ``start``.

    ``reclen(pos) -> (length int64, bad bool)`` gives a record's length, or flags an impossible
    code.  ``end`` is the number of stream bits available.  Returns (positions, lengths).
    Raises CodecError when the true parse meets an impossible code or runs past ``end``.
    """
    if count == 0:
        return xp.zeros(0, dtype=xp.int64), xp.zeros(0, dtype=xp.int64)
    span = end - start
    if span < count * min_len:
        raise CodecError(f"{what}: payload truncated ({span} bits cannot hold {count} records)")
    G = max(G, 64)
    R = G // 2
    J = max(1, span // G)
    seg0 = start + G * xp.arange(J, dtype=xp.int64)
    seg_end = seg0 + G
    seg_end[-1] = end
    stop = seg_end + R
    stop[-1] = end
    S = seg0.copy()
    for _round in range(J + 1):
        pos = S.copy()
        active = pos < end
        P, L, B = [], [], []
        while bool(active.any()):
            ln, bad = reclen(pos)
            over = (pos + ln) > end
            st = xp.where(bad, 1, xp.where(over, 2, 0)).astype(xp.int8)
            P.append(xp.where(active, pos, -1))
            L.append(ln)
            B.append(st)
            nxt = pos + ln
            active = active & (st == 0) & (nxt < stop)
            pos = xp.where(active, nxt, pos)
        P = xp.stack(P, axis=1)
        L = xp.stack(L, axis=1)
        B = xp.stack(B, axis=1)
        valid = P >= 0
        Pc = xp.where(valid, P, 0)
        if J > 1:
            mark = xp.zeros(end + 1, dtype=xp.bool_)
            own = valid & (P >= S[:, None]) & (P < seg_end[:, None])
            mark[P[own]] = True
            margin = valid & (P >= seg_end[:, None]) & (B == 0)
            hit = margin & mark[Pc]
            has = hit[:-1].any(axis=1)
            col = xp.argmax(hit[:-1], axis=1)
            sync = P[xp.arange(J - 1), col]
            failed = xp.flatnonzero(~has)
        else:
            failed = xp.zeros(0, dtype=xp.int64)
            sync = xp.zeros(0, dtype=xp.int64)
        lo = xp.concatenate([xp.asarray([start], dtype=xp.int64), sync])
        hi = xp.concatenate([sync, xp.asarray([end + 1], dtype=xp.int64)])
        nverified = J if failed.shape[0] == 0 else int(failed[0]) + 1
        lo, hi = lo[:nverified], hi[:nverified]
        if failed.shape[0]:
            hi[-1] = end + 1  # the first unsynchronized walker is exact to its end
        sel = valid[:nverified] & (P[:nverified] >= lo[:, None]) & (P[:nverified] < hi[:, None])
        pos_t = P[:nverified][sel]
        st_t = B[:nverified][sel]
        len_t = L[:nverified][sel]
        bad_idx = xp.flatnonzero(st_t != 0)
        first_bad = int(bad_idx[0]) if bad_idx.shape[0] else None
        if first_bad is not None and first_bad < count:
            kind = int(st_t[first_bad])
            if kind == 1:
                raise CodecError(f"{what}: impossible code length at bit {int(pos_t[first_bad])}")
            raise CodecError(f"{what}: payload truncated (record at bit {int(pos_t[first_bad])} "
                             "runs past the end)")
        if pos_t.shape[0] >= count:
            return pos_t[:count], len_t[:count]
        if failed.shape[0] == 0 or first_bad is not None:
            raise CodecError(f"{what}: payload truncated ({int(pos_t.shape[0])} of {count} records)")
        # restart the successors of unsynchronized walkers at their predecessor's first margin
        # position (exact for the first one, a good guess for the others) and walk again
        fm = margin[failed]
        has_m = fm.any(axis=1)
        f_ok = failed[has_m]
        firstm = P[f_ok, xp.argmax(fm[has_m], axis=1)]
        S[f_ok + 1] = firstm
        dead = failed[~has_m]  # died before its margin: its successor restarts at its segment
        if dead.shape[0] and int(dead[0]) == int(failed[0]):
            raise CodecError(f"{what}: payload truncated")
    raise CodecError(f"{what}: could not parse payload")  # pragma: no cover - bounded above
