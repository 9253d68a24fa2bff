"""numba-CPU build of the ``qsgd_ans`` kernels: the functions of ``_ans_kernels`` compiled,
a fused quantize -> symbol -> histogram pass (inline PCG64 draws as the qsgd encoder), and the
per-chunk streams encoded / decoded on up to ``threads`` threads (chunk boundaries are fixed by
the format, so the bytes do not depend on the thread count)."""
from __future__ import annotations

import numba
import numpy as np

from . import _ans_kernels as A
from ._nb_core import CHUNK, _pcg_chunk, njit, pjit
from ._nb_qsgd import _quantize32

enc_tables = A.enc_tables   # tiny: stays in Python
rans_encode_chunk = njit(A.rans_encode_chunk)
rans_decode_chunk = njit(A.rans_decode_chunk)


@njit
def quantize_symbols_pcg(x, u, state, use_pcg, mode, c, s32, Ecap, syms, counts, escv):
    """qsgd's quantizer (draws: inline PCG64 from ``state``, updated, when ``use_pcg``, else
    ``u``) fused with ``_ans_kernels.quantize_symbols``.  Returns (max level, escapes)."""
    d = x.shape[0]
    hi, lo, ihi, ilo = state[0], state[1], state[2], state[3]
    has = state[4]
    buf = state[5]
    ub = np.empty(CHUNK, dtype=np.float32)
    zc = np.empty(CHUNK, dtype=np.uint32)
    nc = np.empty(CHUNK, dtype=np.uint32)
    h4 = np.zeros((4, counts.shape[0]), dtype=np.int64)   # 4 histograms: no store chains
    zmax = np.int64(0)
    nesc = 0
    for c0 in range(0, d, CHUNK):
        n = min(CHUNK, d - c0)
        if use_pcg:
            hi, lo, has, buf = _pcg_chunk(hi, lo, ihi, ilo, has, buf, ub, n)
            uc = ub[:n]
        else:
            uc = u[c0:c0 + n]
        _quantize32(x[c0:c0 + n], uc, mode, c, s32, zc, nc)
        zm = np.uint32(0)
        for t in range(n):
            zm = max(zm, zc[t])
        zmax = max(zmax, np.int64(zm))
        if np.int64(zm) < Ecap:       # no escape in this chunk: a branch-free mapping
            for t in range(n):
                z = np.int64(zc[t])
                sym = (2 * z - 1 + np.int64(nc[t])) if z != 0 else np.int64(0)
                syms[c0 + t] = sym
        else:
            for t in range(n):
                z = np.int64(zc[t])
                if z == 0:
                    sym = 0
                elif z < Ecap:
                    sym = 2 * z - 1 + np.int64(nc[t])
                else:
                    sym = 2 * Ecap - 1 + np.int64(nc[t])
                    escv[nesc] = np.uint32(z - Ecap)
                    nesc += 1
                syms[c0 + t] = sym
        n4 = n - n % 4
        for t in range(0, n4, 4):
            h4[0, syms[c0 + t]] += 1
            h4[1, syms[c0 + t + 1]] += 1
            h4[2, syms[c0 + t + 2]] += 1
            h4[3, syms[c0 + t + 3]] += 1
        for t in range(n4, n):
            h4[0, syms[c0 + t]] += 1
    for k in range(counts.shape[0]):
        counts[k] += h4[0, k] + h4[1, k] + h4[2, k] + h4[3, k]
    state[0] = hi
    state[1] = lo
    state[4] = has
    state[5] = buf
    return zmax, nesc


@pjit
def encode_chunks(syms, nch, xmax, rcp, sh, bias, cmpl, buf, starts):
    """Chunk t's stream written backwards ending at buf[(t + 1) * cap]; starts[t] = its first
    byte (cap = 2 * CHUNK_ELEMS + 16 bytes per chunk)."""
    d = syms.shape[0]
    cap = 2 * A.CHUNK_ELEMS + 16
    for t in numba.prange(nch):
        a = t * A.CHUNK_ELEMS
        b = min(d, a + A.CHUNK_ELEMS)
        starts[t] = rans_encode_chunk(syms, a, b, xmax, rcp, sh, bias, cmpl, buf, (t + 1) * cap)


@pjit
def decode_chunks(data, offs, d, slot_sym, slot_fb, vtab, nesc_sym, out, escpos, res):
    """Chunk t from data[offs[t]:offs[t + 1]] into out; res[t] = (err, escapes), the escapes'
    positions in escpos[t * CHUNK_ELEMS:]."""
    nch = offs.shape[0] - 1
    for t in numba.prange(nch):
        a = t * A.CHUNK_ELEMS
        b = min(d, a + A.CHUNK_ELEMS)
        err, ne = rans_decode_chunk(data, offs[t], offs[t + 1], a, b, slot_sym, slot_fb, vtab,
                                    nesc_sym, out, escpos[a:b])
        res[t, 0] = err
        res[t, 1] = ne


@pjit
def quantize_symbols_par(x, bounds, states, mode, c, s32, Ecap, syms, counts, escv, res):
    """``quantize_symbols_pcg`` on segments bounds[t]..bounds[t+1]-1, each from its own PCG64
    state row (``_pcg64.segment_states``: the generator at the segment's first draw), so the
    draws are numpy's stream whatever the split; counts[t] = segment t's histogram, its escapes
    in escv[bounds[t]:], res[t] = (max level, escapes).  Row T-1 ends as the state after all d
    draws."""
    nt = bounds.shape[0] - 1
    u0 = np.zeros(0, dtype=np.float32)
    for t in numba.prange(nt):
        a = bounds[t]
        b = bounds[t + 1]
        zm, ne = quantize_symbols_pcg(x[a:b], u0, states[t], True, mode, c, s32, Ecap,
                                      syms[a:b], counts[t], escv[a:b])
        res[t, 0] = zm
        res[t, 1] = ne
