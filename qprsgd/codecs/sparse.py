"""Sparsifiers: ``topk`` (dist-ef L46), ``randk`` (beyond the papers), ``bernoulli_p``
(dcd-ecd footnote 2).

Index coding (all three): absolute element indices as little-endian uint32, strictly increasing;
values as little-endian float32 in the same order.
  topk, randk (k fixed by the config):  [k uint32 indices][k float32 values]      nbits = 64 k
  bernoulli_p (k random):               [uint32 k][k uint32 indices][k float32]    nbits = 32 + 64 k
Decoding rejects a wrong length, indices >= d or not strictly increasing, non-finite values.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..registry import CODECS
from .base import Codec, CodecError, Payload
from .qsgd import draw_uniform32


class KParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: Optional[int] = Field(None, ge=1)
    ratio: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.k is None) == (self.ratio is None):
            raise ValueError("give exactly one of k, ratio")
        return self


class BernoulliParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    p: float = Field(..., gt=0, le=1)


def _host(xp, a):
    return a if xp is np else a.get()


class _Sparse(Codec):
    def _pack(self, idx, vals, header=None):
        xp = self.xp
        k = int(idx.shape[0])
        h = 0 if header is None else 4
        data = xp.empty(h + 8 * k, dtype=xp.uint8)
        if header is not None:
            data[:4] = xp.asarray(np.frombuffer(np.uint32(header).astype("<u4").tobytes(), np.uint8))
        data[h:h + 4 * k] = idx.astype("<u4").view(xp.uint8)
        data[h + 4 * k:] = vals.astype("<f4").view(xp.uint8)
        return data

    def _unpack(self, data, k, h, out=None):
        xp = self.xp
        idx = data[h:h + 4 * k].copy().view("<u4").astype(xp.int64)
        vals = data[h + 4 * k:h + 8 * k].copy().view("<f4").astype(xp.float32)
        if k:
            if int(idx[-1]) >= self.d or int(idx.max()) >= self.d:
                raise CodecError(f"{self.name}: index out of range (>= d={self.d})")
            if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise CodecError(f"{self.name}: indices not strictly increasing")
            if not bool(xp.isfinite(vals).all()):
                raise CodecError(f"{self.name}: non-finite value (NaN/Inf)")
        out = self._out(out, zero=True)
        out[idx] = vals
        return out


class _FixedK(_Sparse):
    def __init__(self, d, blocks=None, xp=np, k: Optional[int] = None, ratio: Optional[float] = None):
        super().__init__(d, blocks, xp)
        if k is None and ratio is None:
            raise ValueError(f"{self.name}: give k or ratio")
        self.k = int(k) if k is not None else max(1, math.ceil(float(ratio) * self.d))
        if not 1 <= self.k <= self.d:
            raise ValueError(f"{self.name}: k must be in [1, d={self.d}], got {self.k}")

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, k={self.k})"

    def decode(self, data, out=None):
        data = self._as_bytes(data)
        n, want = int(data.shape[0]), 8 * self.k
        if n != want:
            raise CodecError(f"{self.name}: payload {'truncated' if n < want else 'extended'} "
                             f"({n} bytes, expected {want})")
        return self._unpack(data, self.k, 0, out)


@CODECS.register("topk", params=KParams)
class TopK(_FixedK):
    """Top-k by magnitude (dist-ef L46): k uint32 indices + k float32 values; biased (delta = k/d)."""

    name = "topk"
    unbiased = False
    deterministic = True

    def encode(self, x, rng=None) -> Payload:
        xp = self.xp
        x = self._check_input(x)
        if self.k == self.d:
            idx = xp.arange(self.d, dtype=xp.int64)
        else:
            idx = xp.argpartition(xp.abs(x), self.d - self.k)[self.d - self.k:]
            idx.sort()
        return Payload(self._pack(idx, x[idx]), 64 * self.k)


@CODECS.register("randk", params=KParams)
class RandK(_FixedK):
    """k uniformly random coordinates scaled by d/k (unbiased): k uint32 indices + k float32."""

    name = "randk"
    unbiased = True
    deterministic = False

    @classmethod
    def alpha(cls, d: int, k: Optional[int] = None, ratio: Optional[float] = None) -> float:
        """Compression constant (dcd-ecd L194): E‖C(z) − z‖² = (d/k − 1)‖z‖² exactly."""
        k = int(k) if k is not None else max(1, math.ceil(float(ratio) * d))
        return math.sqrt(d / k - 1.0)

    def encode(self, x, rng=None) -> Payload:
        xp = self.xp
        x = self._check_input(x)
        if not isinstance(rng, np.random.Generator):
            raise CodecError(f"{self.name}: needs an explicit numpy.random.Generator")
        idx = np.sort(rng.choice(self.d, size=self.k, replace=False))
        idx = xp.asarray(idx)
        vals = x[idx] * np.float32(self.d / self.k)
        if not bool(xp.isfinite(vals).all()):
            raise CodecError(f"{self.name}: scaled value overflows float32")
        return Payload(self._pack(idx, vals), 64 * self.k)


@CODECS.register("bernoulli_p", params=BernoulliParams)
class BernoulliP(_Sparse):
    """Keep each z_i w.p. p as z_i/p, else 0 (dcd-ecd fn. 2): uint32 count, indices, float32."""

    name = "bernoulli_p"
    unbiased = True
    deterministic = False

    def __init__(self, d, blocks=None, xp=np, p: float = 0.5):
        super().__init__(d, blocks, xp)
        if not 0 < p <= 1:
            raise ValueError("bernoulli_p: p must be in (0, 1]")
        self.p = float(p)

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, p={self.p})"

    @classmethod
    def alpha(cls, d: int, p: float = 0.5) -> float:
        """Compression constant (dcd-ecd L194, footnote 2): E‖C(z) − z‖² = ((1 − p)/p)‖z‖² exactly."""
        return math.sqrt((1.0 - p) / p)

    def encode(self, x, rng=None) -> Payload:
        xp = self.xp
        x = self._check_input(x)
        u = draw_uniform32(xp, rng, self.d)
        idx = xp.flatnonzero(u < np.float32(self.p))
        vals = (x[idx].astype(xp.float64) / self.p).astype(xp.float32)
        if not bool(xp.isfinite(vals).all()):
            raise CodecError(f"{self.name}: z/p overflows float32")
        k = int(idx.shape[0])
        return Payload(self._pack(idx, vals, header=k), 32 + 64 * k)

    def decode(self, data, out=None):
        data = self._as_bytes(data)
        n = int(data.shape[0])
        if n < 4:
            raise CodecError(f"{self.name}: payload truncated (no count)")
        k = int(np.frombuffer(_host(self.xp, data[:4]).tobytes(), dtype="<u4")[0])
        if k > self.d:
            raise CodecError(f"{self.name}: count {k} > d={self.d}")
        if n != 4 + 8 * k:
            raise CodecError(f"{self.name}: payload {'truncated' if n < 4 + 8 * k else 'extended'} "
                             f"({n} bytes, count {k} needs {4 + 8 * k})")
        return self._unpack(data, k, 4, out)
