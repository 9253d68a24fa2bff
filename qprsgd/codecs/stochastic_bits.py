"""``stochastic_bits``: b-bit unbiased stochastic rounding on a per-vector min/max grid
(dcd-ecd §5, footnote 1).

  m = min v, M = max v (float32, sent);  q_i = (float64(v_i) - m) * ((2^b - 1) / (M - m))
  l_i = floor(q_i);  zeta_i = l_i + (U_i < q_i - l_i),  U = rng.random(d, dtype=np.float32)
  decoded: float32(m + zeta_i * ((M - m) / (2^b - 1)))   (float64 arithmetic); M == m: zeta = 0
Wire: m, M as little-endian float32, then d b-bit fields MSB-first, zero-padded.  nbits = 64 + b d.

Backends (``backend=`` at construction, see qprsgd/codecs/backends.py): ``numba`` -- one-thread
compiled kernels in ``_nb_sbits`` with the uniforms drawn inline from the PCG64 state (the
generator's state is written back) and decoding through a 2^b-entry table of the decoded values
built with the numpy path's arithmetic -- or ``numpy`` (the vectorized reference, any array
module).  Both give byte-identical payloads, identical decoded vectors, the
same generator state after encode and the same CodecErrors
(tests/test_codecs_stochastic_numba.py).
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import CODECS
from . import _bitstream as bs
from . import _pcg64
from .base import Codec, CodecError, Payload
from .qsgd import draw_uniform32


class _SbitsNumpy:
    """The vectorized backend (any array module)."""

    def __init__(self, c):
        self.c = c

    def encode(self, x, rng, u):
        c = self.c
        if u is None:
            x = c._check_input(x)
            u = draw_uniform32(c.xp, rng, c.d)
        return c._np_encode(x, u)

    def decode(self, data, out=None):
        c = self.c
        xp = c.xp
        m, M, zeta = c.decode_levels(data)
        out = c._out(out)
        step = (np.float64(M) - np.float64(m)) / c.levels
        v = zeta.astype(xp.float64)
        v *= step
        v += np.float64(m)
        out[:] = v  # float64 -> float32, rounded as astype
        return out


class _SbitsNumba:
    """One-thread compiled kernels (``_nb_sbits``)."""

    def __init__(self, c):
        from . import _nb_sbits

        self.c, self.k = c, _nb_sbits

    def encode(self, x, rng, u):
        """The numpy path's payload with the compiled kernel: shape and NaN/Inf checks before
        any draw, then the d draws (inline PCG64 for a PCG64 Generator, else drawn into an
        array), quantization and packing in one pass."""
        c, K = self.c, self.k
        if x.ndim != 1 or x.shape[0] != c.d:
            raise CodecError(f"{c.name}: expected a vector of length d={c.d}, "
                             f"got shape {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        m, M = np.float32(x.min()), np.float32(x.max())  # NaN propagates: both finite iff x is
        if not (math.isfinite(float(m)) and math.isfinite(float(M))):
            raise CodecError(f"{c.name}: cannot encode a vector holding NaN or Inf")
        if u is not None:
            state, bg = None, None
            u = np.ascontiguousarray(u, dtype=np.float32)
            if u.shape != (c.d,):
                raise CodecError(f"{c.name}: expected {c.d} uniforms, got shape {u.shape}")
        else:
            state, bg = _pcg64.state_of(rng)
            if state is None:
                u = np.ascontiguousarray(draw_uniform32(np, rng, c.d), dtype=np.float32)
        if state is None:
            state = np.zeros(6, dtype=np.uint64)
        else:
            u = np.zeros(0, dtype=np.float32)
        scale = c.levels / (np.float64(M) - np.float64(m)) if M > m else np.float64(0.0)
        data = np.empty(c.nbytes, dtype=np.uint8)
        data[:8] = np.array([m, M], dtype="<f4").view(np.uint8)
        K.sbits_encode(x, u, state, bg is not None, c.b, np.float64(m), np.float64(scale), data)
        if bg is not None:
            _pcg64.store(bg, state)
        return Payload(data, c.nbits)

    def decode(self, data, out=None):
        """Checks as the numpy path, then out[i] = tab[zeta_i] with the 2^b decoded values
        tab[z] = float32(m + z * step) computed in numpy exactly as the numpy path does."""
        c, K = self.c, self.k
        data, m, M = c._check_payload(data)
        data = np.ascontiguousarray(data)
        if M == m and bool(data[8:].any()):  # padding is zero: a non-zero byte is a level
            raise CodecError(f"{c.name}: non-zero level with min == max")
        step = (np.float64(M) - np.float64(m)) / c.levels
        tab = np.arange(c.levels + 1, dtype=np.float64)
        tab *= step
        tab += np.float64(m)
        tab = tab.astype(np.float32)
        out = c._out(out)
        K.sbits_decode(data, c.b, tab, out)
        return out


def _cuda_sbits(c):
    from ._cuda_backends import SbitsCuda

    return SbitsCuda(c)


class StochasticBitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b: int = Field(8, ge=1, le=16)


@CODECS.register("stochastic_bits", params=StochasticBitsParams)
class StochasticBits(Codec):
    """b-bit stochastic rounding between per-vector min and max (two float32 + b bits/element)."""

    name = "stochastic_bits"
    unbiased = True
    deterministic = False
    IMPLS = {"numpy": _SbitsNumpy, "numba": _SbitsNumba, "cuda": _cuda_sbits}

    def __init__(self, d, blocks=None, xp=np, b: int = 8, **kw):
        super().__init__(d, blocks, xp, **kw)
        if not 1 <= int(b) <= 16:
            raise ValueError(f"stochastic_bits: b must be in 1..16, got {b!r}")
        self.b = int(b)
        self.levels = (1 << self.b) - 1
        self.nbits = 64 + self.b * self.d
        self.nbytes = (self.nbits + 7) // 8
        self._make_impl()

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, b={self.b})"

    @classmethod
    def alpha(cls, d: int, b: int = 8) -> float:
        """Compression constant (dcd-ecd L194): a bound on sqrt(E‖C(z) − z‖²/‖z‖²) for every z.

        Each element's rounding variance is at most Δ²/4, Δ = (max − min)/(2^b − 1), and
        (max − min)² ≤ 2‖z‖², so α² ≤ d/(2(2^b − 1)²).  (A worst case: typical vectors do far better.)"""
        return math.sqrt(d / 2.0) / ((1 << int(b)) - 1)

    def encode(self, x, rng=None) -> Payload:
        return self.impl.encode(x, rng, None)

    def encode_with(self, x, u) -> Payload:
        """Encode with given uniforms ``u`` (d float32 values)."""
        return self.impl.encode(x, None, u)

    def decode(self, data, out=None):
        return self.impl.decode(data, out)

    def _np_encode(self, x, u) -> Payload:
        xp = self.xp
        m, M = np.float32(x.min()), np.float32(x.max())
        if M > m:
            q = x.astype(xp.float64)
            q -= np.float64(m)
            q *= self.levels / (np.float64(M) - np.float64(m))
            xp.clip(q, 0, self.levels, out=q)
            lvl = xp.floor(q)
            q -= lvl
            zeta = lvl.astype(xp.uint64)
            zeta += (u < q)
        else:
            zeta = xp.zeros(self.d, dtype=xp.uint64)
        data = xp.empty(self.nbytes, dtype=xp.uint8)
        data[:8] = xp.asarray(np.array([m, M], dtype="<f4").view(np.uint8))
        if self.b == 8:
            data[8:] = zeta.astype(xp.uint8)
        elif self.b == 16:
            data[8:] = zeta.astype(">u2").view(xp.uint8)
        else:
            words = bs.new_words(xp, self.nbits)
            lens = xp.full(self.d, self.b, dtype=xp.int64)
            bs.pack(xp, words, 64, zeta, lens)
            data[8:] = bs.words_to_bytes(xp, words, self.nbits)[8:]
        return Payload(data, self.nbits)

    def _check_payload(self, data):
        """Length, header and padding checks (both backends); returns (data, m, M)."""
        xp = self.xp
        data = self._as_bytes(data)
        n = int(data.shape[0])
        if n != self.nbytes:
            raise CodecError(f"{self.name}: payload {'truncated' if n < self.nbytes else 'extended'}"
                             f" ({n} bytes, expected {self.nbytes})")
        head = data[:8] if xp is np else data[:8].get()
        m, M = np.frombuffer(head.tobytes(), dtype="<f4")
        if not (np.isfinite(m) and np.isfinite(M)) or M < m:
            raise CodecError(f"{self.name}: min/max must be finite with min <= max")
        pad = 8 * self.nbytes - self.nbits
        if pad and int(data[-1]) & ((1 << pad) - 1):
            raise CodecError(f"{self.name}: nonzero padding bits")
        return data, m, M

    def decode_levels(self, data):
        xp = self.xp
        data, m, M = self._check_payload(data)
        if self.b == 8:
            zeta = data[8:].astype(xp.uint64)
        elif self.b == 16:
            zeta = data[8:].copy().view(">u2").astype(xp.uint64)
        else:
            words = bs.bytes_to_words(xp, data)
            pos = 64 + self.b * xp.arange(self.d, dtype=xp.int64)
            zeta = bs.window(xp, words, pos) >> np.uint64(64 - self.b)
        if M == m and bool(zeta.any()):
            raise CodecError(f"{self.name}: non-zero level with min == max")
        return m, M, zeta
