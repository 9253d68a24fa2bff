"""numba-CPU kernels of ``topk`` (wire format and selection rule: qprsgd/codecs/sparse.py).

One filtering pass over x: every element whose magnitude bits (``float32 bits & 0x7fffffff``,
monotone in |x| for finite x) are >= a threshold is appended, in index order, to a candidate
list; the caller then selects exactly among the candidates.  The pass also reports a non-finite
element, so the encoder needs no separate ``isfinite`` pass."""
from __future__ import annotations

import numpy as np

from ._nb_core import njit

_MASK = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)


_BLK = 16


@njit
def filter_ge(x, t, cand):
    """cand[:n] = indices i (ascending) with |x_i| bits >= t; returns (n, finite).  x contiguous
    float32, cand int64 of length >= len(x).  Blocks of 64 elements: the block's largest
    magnitude bits (a vectorized max) decide whether it is scanned, so the pass runs at read
    speed when few elements pass; the same max detects NaN/Inf (bits >= 0x7f800000)."""
    xb = x.view(np.uint32)
    d = xb.shape[0]
    n = 0
    top = np.uint32(0)
    nfull = d - d % _BLK
    for b in range(0, nfull, _BLK):
        m = np.uint32(0)
        for j in range(_BLK):
            m = max(m, xb[b + j] & _MASK)
        top = max(top, m)
        if m >= t:
            for j in range(_BLK):
                if (xb[b + j] & _MASK) >= t:
                    cand[n] = b + j
                    n += 1
    for i in range(nfull, d):
        a = xb[i] & _MASK
        top = max(top, a)
        if a >= t:
            cand[n] = i
            n += 1
    return n, top < _INF


@njit
def keys_of(x, cand, n, keys):
    """keys[j] = (~|x| bits) << 32 | index for the n candidates: ascending key order is
    descending magnitude, ties by ascending index."""
    xb = x.view(np.uint32)
    for j in range(n):
        i = cand[j]
        a = np.uint64(~(xb[i] & _MASK) & np.uint32(0xFFFFFFFF))
        keys[j] = (a << np.uint64(32)) | np.uint64(i)


@njit
def gather_le(x, cand, n, kmax, idx, vals):
    """The candidates (index order) whose key is <= kmax, into idx/vals (uint32 / float32);
    returns how many."""
    xb = x.view(np.uint32)
    m = 0
    for j in range(n):
        i = cand[j]
        a = np.uint64(~(xb[i] & _MASK) & np.uint32(0xFFFFFFFF))
        if ((a << np.uint64(32)) | np.uint64(i)) <= kmax:
            idx[m] = np.uint32(i)
            vals[m] = x[i]
            m += 1
    return m
