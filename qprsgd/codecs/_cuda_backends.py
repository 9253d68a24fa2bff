"""The ``cuda`` backend objects of the codec families (kernels: ``_cuda_kernels``).  Each takes
the codec and implements the family's backend interface, exactly as the numpy / numba objects;
the codec does the input and header checks.  Draws: a numpy ``Generator`` drives the CUDA path
as it drives the CuPy path (``rng.random(d, dtype=float32)`` on the host, copied), so payloads
are identical to the CPU backends'; a generator-on-device is future work."""
from __future__ import annotations

import math

import numpy as np

from . import _cuda_kernels as K
from .base import CodecError, Payload


class IdentityCuda:
    def __init__(self, c):
        self.c = c

    def encode(self, x):
        xd = K.dev(x).view(np.uint8) if hasattr(x, "__cuda_array_interface__") else \
            np.ascontiguousarray(x, dtype="<f4").view(np.uint8)
        out = K.empty(4 * self.c.d, np.uint8)
        K.copy_u8[K.grid(4 * self.c.d)](xd, out)
        return K.wrap(out, self.c.xp)


class SignCuda:
    def __init__(self, c):
        self.c = c
        self.offs = K.cuda.to_device(c.offsets)

    def encode(self, x):
        c = self.c
        xd = K.dev(x)
        sums = K.fixed_sums(xd, self.offs, c.B, False)
        with np.errstate(over="ignore", invalid="ignore"):
            sc = (sums / c._sizes).astype(np.float32)
        if not np.isfinite(sc).all():
            c._raise_nonfinite(x)
        out = K.empty(c.nbytes, np.uint8)
        K.put_bytes[K.grid(4 * c.B)](K.cuda.to_device(sc.astype("<f4").view(np.uint8)), out, 0)
        K.sign_bytes[K.grid((c.d + 7) // 8)](xd, out, 4 * c.B)
        return K.wrap(out, c.xp)

    def decode(self, data, su, out):
        c = self.c
        od = K.dev(out)
        K.sign_expand[K.grid(c.d)](K.dev(data), 4 * c.B, self.offs, K.cuda.to_device(su),
                                  od.view(np.uint32))
        if isinstance(out, np.ndarray) and od is not out and hasattr(od, "copy_to_host"):
            od.copy_to_host(out)
        return out


class SbitsCuda:
    def __init__(self, c):
        self.c = c

    def encode(self, x, rng, u):
        from .qsgd import draw_uniform32

        c = self.c
        if x.ndim != 1 or x.shape[0] != c.d:
            raise CodecError(f"{c.name}: expected a vector of length d={c.d}, "
                             f"got shape {tuple(x.shape)}")
        m, M = np.float32(float(x.min())), np.float32(float(x.max()))
        if not (math.isfinite(float(m)) and math.isfinite(float(M))):
            raise CodecError(f"{c.name}: cannot encode a vector holding NaN or Inf")
        if u is None:
            u = draw_uniform32(np, rng, c.d)
        scale = c.levels / (np.float64(M) - np.float64(m)) if M > m else np.float64(0.0)
        zeta = K.empty(c.d, np.int64)
        K.sbits_levels[K.grid(c.d)](K.dev(x), K.dev(u), np.float64(m), np.float64(scale),
                                    np.float64(c.levels), zeta)
        out = K.empty(c.nbytes, np.uint8)
        K.put_bytes[K.grid(8)](K.cuda.to_device(np.array([m, M], "<f4").view(np.uint8)), out, 0)
        K.pack_fields[K.grid(c.nbytes - 8)](zeta, c.b, out, 8)
        return Payload(K.wrap(out, c.xp), c.nbits)

    def decode(self, data, out=None):
        c = self.c
        data, m, M = c._check_payload(data)
        if M == m and bool(K.host(data[8:]).any()):
            raise CodecError(f"{c.name}: non-zero level with min == max")
        step = (np.float64(M) - np.float64(m)) / c.levels
        tab = np.arange(c.levels + 1, dtype=np.float64)
        tab *= step
        tab += np.float64(m)
        out = c._out(out)
        od = K.dev(out)
        K.unpack_fields[K.grid(c.d)](K.dev(data), 8, c.b, K.cuda.to_device(tab.astype(np.float32)),
                                     od)
        return out


class RandKCuda:
    """randk: the host draws the k indices (``rng.choice``, as every backend), the device
    gathers, scales and packs."""

    def __init__(self, c):
        self.c = c
        self.head = np.array([c.d], "<u4").view(np.uint8)

    def encode(self, x, idx):
        c = self.c
        k = c.k
        idev = K.cuda.to_device(np.ascontiguousarray(idx, dtype=np.int64))
        vals = K.empty(k, np.float32)
        bad = K.zeros(1, np.int32)
        K.gather_scale[K.grid(k)](K.dev(x), idev, np.float32(c.d / c.k), vals, bad)
        if int(K.host(bad)[0]):
            raise CodecError(f"{c.name}: scaled value overflows float32")
        out = K.empty(4 + 8 * k, np.uint8)
        K.put_bytes[K.grid(4)](K.cuda.to_device(self.head), out, 0)
        K.put_bytes[K.grid(4 * k)](K.cuda.to_device(np.asarray(idx, "<u4").view(np.uint8)), out, 4)
        K.put_bytes[K.grid(4 * k)](vals.view(np.uint8), out, 4 + 4 * k)
        return K.wrap(out, c.xp)
