"""``stochastic_bits``: b-bit unbiased stochastic rounding on a per-vector min/max grid
(dcd-ecd §5, footnote 1).

  m = min v, M = max v (float32, sent);  q_i = (float64(v_i) - m) * ((2^b - 1) / (M - m))
  l_i = floor(q_i);  zeta_i = l_i + (U_i < q_i - l_i),  U = rng.random(d, dtype=np.float32)
  decoded: float32(m + zeta_i * ((M - m) / (2^b - 1)))   (float64 arithmetic); M == m: zeta = 0
Wire: m, M as little-endian float32, then d b-bit fields MSB-first, zero-padded.  nbits = 64 + b d.
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import CODECS
from . import _bitstream as bs
from .base import Codec, CodecError, Payload
from .qsgd import draw_uniform32


class StochasticBitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b: int = Field(8, ge=1, le=16)


@CODECS.register("stochastic_bits", params=StochasticBitsParams)
class StochasticBits(Codec):
    """b-bit stochastic rounding between per-vector min and max (two float32 + b bits/element)."""

    name = "stochastic_bits"
    unbiased = True
    deterministic = False

    def __init__(self, d, blocks=None, xp=np, b: int = 8):
        super().__init__(d, blocks, xp)
        if not 1 <= int(b) <= 16:
            raise ValueError("stochastic_bits: b must be in 1..16")
        self.b = int(b)
        self.levels = (1 << self.b) - 1
        self.nbits = 64 + self.b * self.d
        self.nbytes = (self.nbits + 7) // 8

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, b={self.b})"

    @classmethod
    def alpha(cls, d: int, b: int = 8) -> float:
        """Compression constant (dcd-ecd L194): a bound on sqrt(E‖C(z) − z‖²/‖z‖²) for every z.

        Each element's rounding variance is at most Δ²/4, Δ = (max − min)/(2^b − 1), and
        (max − min)² ≤ 2‖z‖², so α² ≤ d/(2(2^b − 1)²).  (A worst case: typical vectors do far better.)"""
        return math.sqrt(d / 2.0) / ((1 << int(b)) - 1)

    def encode(self, x, rng=None) -> Payload:
        xp = self.xp
        x = self._check_input(x)
        u = draw_uniform32(xp, rng, self.d)
        return self.encode_with(x, u)

    def encode_with(self, x, u) -> Payload:
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

    def decode_levels(self, data):
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

    def decode(self, data, out=None):
        xp = self.xp
        m, M, zeta = self.decode_levels(data)
        out = self._out(out)
        step = (np.float64(M) - np.float64(m)) / self.levels
        v = zeta.astype(xp.float64)
        v *= step
        v += np.float64(m)
        out[:] = v  # float64 -> float32, rounded as astype
        return out
