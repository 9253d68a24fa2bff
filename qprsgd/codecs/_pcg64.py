"""numpy's PCG64 float32 draws, as data: the state of a ``numpy.random.Generator`` over PCG64 as
a uint64[6] array (the layout the numba and CUDA kernels read), and the O(log n) jump-ahead that
lets a kernel start the stream at any element.  Pure Python: shared by every backend.

numpy's ``Generator.random(n, dtype=float32)`` takes each 64-bit PCG64 output (XSL-RR) as two
32-bit halves, low half first (a leftover high half waits in ``has_uint32``/``uinteger``), and
maps a half u32 to ``(u32 >> 8) * 2**-24``."""
from __future__ import annotations

import numpy as np

PCG_MULT_HI = 2549297995355413924
PCG_MULT_LO = 4865540595714422341
_M128 = (1 << 128) - 1
_M64 = (1 << 64) - 1

def state_of(rng):
    """(uint64[6] state array, bit generator) for a PCG64-driven Generator, else (None, None).

    Layout: [state_hi, state_lo, inc_hi, inc_lo, has_uint32, uinteger]."""
    if not isinstance(rng, np.random.Generator):
        return None, None
    bg = rng.bit_generator
    if type(bg) is not np.random.PCG64:
        return None, None
    st = bg.state
    s, inc = int(st["state"]["state"]), int(st["state"]["inc"])
    m = (1 << 64) - 1
    arr = np.array([s >> 64, s & m, inc >> 64, inc & m, int(st["has_uint32"]),
                    int(st["uinteger"])], dtype=np.uint64)
    return arr, bg


def store(bg, arr):
    """Write the state array back into the bit generator."""
    st = bg.state
    st["state"]["state"] = (int(arr[0]) << 64) | int(arr[1])
    st["has_uint32"] = int(arr[4])
    st["uinteger"] = int(arr[5])
    bg.state = st


PCG_MULT = (PCG_MULT_HI << 64) | PCG_MULT_LO


def _lcg_advance(state: int, inc: int, n: int) -> int:
    """state after n steps of state <- state * PCG_MULT + inc (mod 2**128), in O(log n)."""
    am, ap, cm, cp = 1, 0, PCG_MULT, inc
    while n:
        if n & 1:
            am = (am * cm) & _M128
            ap = (ap * cm + cp) & _M128
        cp = ((cm + 1) * cp) & _M128
        cm = (cm * cm) & _M128
        n >>= 1
    return (am * state + ap) & _M128


def _xsl_rr(state: int) -> int:
    v = ((state >> 64) ^ state) & _M64
    r = state >> 122
    return ((v >> r) | (v << ((64 - r) & 63))) & _M64


def segment_states(state, starts):
    """Per-segment PCG64 state rows (layout of :func:`state_of`) for float32 draws: row t is
    the generator as it stands before draw number ``starts[t]`` of ``rng.random(n, float32)``."""
    s0 = (int(state[0]) << 64) | int(state[1])
    inc = (int(state[2]) << 64) | int(state[3])
    has, buf = int(state[4]), int(state[5])
    out = np.zeros((len(starts), 6), dtype=np.uint64)
    for t, e in enumerate(starts):
        e = int(e)
        if e == 0:
            st, h, b = s0, has, buf
        else:
            m = e - 1 if has else e     # draws served by fresh 64-bit outputs before element e
            q, odd = divmod(m, 2)
            if odd:                     # the low half of output q was used: its high half waits
                st = _lcg_advance(s0, inc, q + 1)
                h, b = 1, _xsl_rr(st) >> 32
            else:
                st = _lcg_advance(s0, inc, q)
                h, b = 0, 0
        out[t] = [st >> 64, st & _M64, state[2], state[3], h, b]
    return out
