"""``identity``: raw float32, the uncompressed baseline (32 d bits).

Wire: the d elements as little-endian IEEE float32, in order; nbits = 32 d, no header.  This is
the one uncompressed format: the gossip algorithms' uncompressed models (D-PSGD) are sent as
:func:`raw_bytes` and read back with :func:`from_raw`.
"""
from __future__ import annotations

import numpy as np

from ..devices import array_module
from ..registry import CODECS
from .base import Codec, CodecError, Payload


def raw_bytes(v) -> np.ndarray:
    """The identity wire bytes of a float32 vector, without a copy when ``v`` is already a
    contiguous little-endian float32 vector (no NaN/Inf check: the caller's model is sent as
    it is)."""
    return array_module(v).ascontiguousarray(v, dtype="<f4").view(np.uint8)


def from_raw(buf, d: int) -> np.ndarray:
    """The float32 vector of an identity payload of d elements (a view of ``buf`` when it is
    contiguous); CodecError (a ValueError) when the length is not 4 d bytes."""
    if not hasattr(buf, "dtype"):   # bytes / memoryview; arrays stay on their device
        buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise CodecError(f"identity: payload must be a 1-D uint8 buffer, got {buf.dtype} "
                         f"with shape {buf.shape}")
    if buf.nbytes != 4 * d:
        raise CodecError(f"identity: received {buf.nbytes} bytes, expected 4*d = {4 * d}")
    return array_module(buf).ascontiguousarray(buf).view("<f4").astype(np.float32, copy=False)


class _IdNumpy:
    def __init__(self, c):
        self.c = c

    def encode(self, x):
        xp = self.c.xp
        return xp.ascontiguousarray(x, dtype="<f4").view(xp.uint8).copy()


def _cuda_identity(c):
    from ._cuda_backends import IdentityCuda

    return IdentityCuda(c)


@CODECS.register("identity")
class Identity(Codec):
    """Raw little-endian float32; nbits = 32 d."""

    name = "identity"
    unbiased = True
    deterministic = True
    IMPLS = {"numpy": _IdNumpy, "cuda": _cuda_identity}

    def __init__(self, d, blocks=None, xp=np, **kw):
        super().__init__(d, blocks, xp, **kw)
        self._make_impl()

    def encode(self, x, rng=None) -> Payload:
        x = self._check_input(x)
        return Payload(self.impl.encode(x), 32 * self.d)

    def decode(self, data, out=None):
        data = self._as_bytes(data)
        if data.shape[0] != 4 * self.d:
            raise CodecError(f"identity: payload has {data.shape[0]} bytes, expected 4*d = {4 * self.d}")
        out = self._out(out)
        out.view(self.xp.uint8)[:] = data
        if not bool(self.xp.isfinite(out).all()):
            raise CodecError("identity: payload holds NaN or Inf")
        return out
