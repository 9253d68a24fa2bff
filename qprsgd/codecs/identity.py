"""``identity``: raw float32, the uncompressed baseline (32 d bits)."""
from __future__ import annotations

from ..registry import CODECS
from .base import Codec, CodecError, Payload


@CODECS.register("identity")
class Identity(Codec):
    """Raw little-endian float32; nbits = 32 d."""

    name = "identity"
    unbiased = True
    deterministic = True

    def encode(self, x, rng=None) -> Payload:
        x = self._check_input(x)
        xp = self.xp
        data = xp.ascontiguousarray(x).view(xp.uint8).copy()
        return Payload(data, 32 * self.d)

    def decode(self, data, out=None):
        data = self._as_bytes(data)
        if data.shape[0] != 4 * self.d:
            raise CodecError(f"identity: payload has {data.shape[0]} bytes, expected 4*d = {4 * self.d}")
        out = self._out(out)
        out.view(self.xp.uint8)[:] = data
        if not bool(self.xp.isfinite(out).all()):
            raise CodecError("identity: payload holds NaN or Inf")
        return out
