"""numba-CPU kernels of ``stochastic_bits`` (wire format: qprsgd/codecs/stochastic_bits.py).

One thread, sequential in element order.  Arithmetic as the numpy path: q = (float64(x_i) - m) *
scale, clipped to [0, L], zeta = floor(q) + (float64(U_i) < q - floor(q)); fields of b bits
MSB-first from byte 8 (bytes 0..7 = m, M are written by the caller)."""
from __future__ import annotations

import numba
import numpy as np

from ._nb_core import CHUNK, INV24, U0, U1, U8, U32, _pcg_next64, njit


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _sbits_level(xv, uv, m64, scale, lv):
    """zeta for one element (scale = 0 when M == m: every level is 0)."""
    q = (np.float64(xv) - m64) * scale
    q = min(max(q, 0.0), lv)
    fl = np.floor(q)
    return np.int64(fl) + (1 if np.float64(uv) < q - fl else 0)

@njit
def _sbits_draws(hi, lo, ihi, ilo, has, buf, u, n):
    """u[:n] = the next n float32 uniforms, as ``_pcg_chunk`` (numpy's order: a buffered
    high half first, then both halves of each 64-bit output, low half first), two per
    step in the steady state; (has, buf) end as numpy's (has_uint32, uinteger)."""
    t = 0
    if has != U0 and n > 0:
        u[0] = np.float32(np.int64(buf >> U8)) * INV24
        has = U0
        t = 1
    while t + 1 < n:
        hi, lo, r = _pcg_next64(hi, lo, ihi, ilo)
        u[t] = np.float32(np.int64((r & np.uint64(0xFFFFFFFF)) >> U8)) * INV24
        u[t + 1] = np.float32(np.int64(r >> np.uint64(40))) * INV24
        buf = r >> U32      # numpy leaves the consumed high half in ``uinteger``
        t += 2
    if t < n:
        hi, lo, r = _pcg_next64(hi, lo, ihi, ilo)
        u[t] = np.float32(np.int64((r & np.uint64(0xFFFFFFFF)) >> U8)) * INV24
        buf = r >> U32
        has = U1
    return hi, lo, has, buf

@njit
def sbits_encode(x, u, state, use_pcg, b, m64, scale, out):
    """Levels of x (draws: inline PCG64 from ``state``, updated, when ``use_pcg``; else
    ``u``) packed as b-bit fields MSB-first into out[8:] (zero-padded last byte); scale = 0
    when M == m."""
    d = x.shape[0]
    lv = np.float64((1 << b) - 1)
    ub = np.empty(CHUNK, dtype=np.float32)
    hi, lo, ihi, ilo = state[0], state[1], state[2], state[3]
    has = state[4]
    buf = state[5]
    p = 8
    acc = 0
    nb = 0
    for c0 in range(0, d, CHUNK):
        n = min(CHUNK, d - c0)
        if use_pcg:
            hi, lo, has, buf = _sbits_draws(hi, lo, ihi, ilo, has, buf, ub, n)
            uc = ub[:n]
        else:
            uc = u[c0:c0 + n]
        xc = x[c0:c0 + n]
        if b == 8:
            for t in range(n):
                out[p + t] = np.uint8(_sbits_level(xc[t], uc[t], m64, scale, lv))
            p += n
        elif b == 16:
            for t in range(n):
                z = _sbits_level(xc[t], uc[t], m64, scale, lv)
                out[p + 2 * t] = np.uint8(z >> 8)
                out[p + 2 * t + 1] = np.uint8(z & 255)
            p += 2 * n
        else:
            for t in range(n):           # nb < 8 on entry: acc holds nb + b <= 23 bits
                acc = (acc << b) | _sbits_level(xc[t], uc[t], m64, scale, lv)
                nb += b
                while nb >= 8:
                    nb -= 8
                    out[p] = np.uint8((acc >> nb) & 255)
                    p += 1
                acc &= (1 << nb) - 1
    if nb > 0:
        out[p] = np.uint8((acc << (8 - nb)) & 255)
    state[0] = hi
    state[1] = lo
    state[4] = has
    state[5] = buf

@njit
def sbits_decode(data, b, tab, out):
    """out[i] = tab[zeta_i], zeta_i the i-th b-bit field of data[8:] (length checked by the
    caller); tab[z] = float32(m + z * step) has 2^b entries, so every field is in range."""
    d = out.shape[0]
    if b == 8:
        for i in range(d):
            out[i] = tab[data[8 + i]]
    elif b == 16:
        for i in range(d):
            out[i] = tab[(np.int64(data[8 + 2 * i]) << 8) | np.int64(data[9 + 2 * i])]
    else:
        p = 8
        acc = 0
        nb = 0
        mask = (1 << b) - 1
        for i in range(d):
            while nb < b:
                acc = ((acc << 8) | np.int64(data[p])) & 0xFFFFFF
                p += 1
                nb += 8
            nb -= b
            out[i] = tab[(acc >> nb) & mask]
