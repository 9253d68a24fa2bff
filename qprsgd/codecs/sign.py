"""Scaled sign compressors of dist-ef-blocksgdm: eq. (1) (``sign``, one block) and the blockwise
C_B of Alg. 3 (``block_sign``): [ ||v_b||_1 / d_b * sign(v_b) ]_b, sign(0) = +1.

Wire: B little-endian float32 scales (block order), then d sign bits MSB-first (1 = negative,
i.e. v < 0; 0 and -0.0 are +1), zero-padded to a byte.  nbits = 32 B + d.  Deterministic,
biased.  The sign bits alone (:func:`pack_signs`) are also the wire of majority vote
(signSGD / Signum with a server vote, qprsgd/algorithms/dist_ef.py).

Backends: ``numpy`` (``_SignNumpy``: numpy less + packbits / unpackbits) and ``numba``
(``_SignNumba``: one fused pass on up to ``threads`` threads, ``_nb_sign``); same bytes, same
values.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..devices import array_module
from ..registry import CODECS
from .base import Codec, CodecError, Payload
from .qsgd import norm_acc

_CHUNK = 1 << 16  # elements per cache-resident piece


class BlockSignParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: Optional[int] = Field(None, ge=1)


class SignParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def pack_signs(v, xp=None):
    """The sign bits of the wire: 1 bit per element, MSB-first, zero-padded to a byte, bit 1 ⇔
    v_j < 0 (sign(0) = sign(-0.0) = +1).  On ``v``'s device (``xp``: its array module)."""
    xp = array_module(v) if xp is None else xp
    return xp.packbits(xp.asarray(v) < 0)


def _check_signs(data, d: int):
    if not hasattr(data, "dtype"):    # bytes / memoryview; arrays stay on their device
        data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != (d + 7) // 8:
        raise CodecError(f"sign payload must be {(d + 7) // 8} bytes for d={d}, got shape "
                         f"{getattr(data, 'shape', None)} dtype {getattr(data, 'dtype', None)}")
    tail = d % 8
    if tail and int(data[-1]) & ((1 << (8 - tail)) - 1):
        raise CodecError("sign payload: nonzero padding bits")
    return data


def unpack_signs(data, d: int) -> np.ndarray:
    """The ±1 float32 vector of a :func:`pack_signs` payload of d elements (CodecError, a
    ValueError, on a wrong length or nonzero padding)."""
    data = _check_signs(data, d)
    bits = array_module(data).unpackbits(data)[:d]
    return np.float32(1.0) - np.float32(2.0) * bits.astype(np.float32)


def majority_signs(payloads, d: int) -> np.ndarray:
    """Packed sign(Σ_i s_i) of M :func:`pack_signs` payloads s_i ∈ {−1, +1}^d, sign(0) = +1: an
    element is voted negative iff more than half of the M payloads are negative there (for even
    M a tie votes +1)."""
    M = len(payloads)
    if M < 1:
        raise ValueError("majority vote needs at least one payload")
    xp = array_module(payloads[0])
    neg = xp.zeros(d, dtype=np.int64)
    for data in payloads:
        neg += xp.unpackbits(_check_signs(data, d))[:d]
    return xp.packbits(2 * neg > M)


def l1_float64(xp, v) -> float:
    """||v||_1 summed in float64 in a fixed order, identical on numpy and numba and independent of
    the array's alignment (see qsgd.norm_acc): the same input always gives the same scale."""
    return norm_acc(v, absolute=True)


class _SignNumpy:
    """The vectorized backend (any array module)."""

    def __init__(self, c):
        self.c = c

    def scales(self, x):
        c = self.c
        out = np.empty(c.B, dtype=np.float32)
        for b in range(c.B):
            a, e = int(c.offsets[b]), int(c.offsets[b + 1])
            out[b] = np.float32(norm_acc(x[a:e], use_numba=False, absolute=True) / (e - a))
        return out

    def encode(self, x):
        c, xp = self.c, self.c.xp
        sc = self.scales(x)
        # NaN/Inf in x make its block's l1 sum non-finite, so the isfinite pass over x is only
        # needed to tell the two errors apart
        if not np.isfinite(sc).all():
            c._raise_nonfinite(x)
        sc_ = c._thread_scratch()
        if "neg" not in sc_:
            sc_["neg"] = xp.empty(c.d, dtype=xp.bool_)
        neg = sc_["neg"]
        xp.less(x, 0, out=neg)
        data = xp.empty(c.nbytes, dtype=xp.uint8)
        data[:4 * c.B] = xp.asarray(sc.astype("<f4").view(np.uint8))
        data[4 * c.B:] = xp.packbits(neg)
        return data

    def decode(self, data, su, out):
        c, xp = self.c, self.c.xp
        ou = out.view(xp.uint32)
        sc_ = c._thread_scratch()
        if "bits" not in sc_:
            sc_["bits"] = xp.empty(c.d, dtype=xp.uint8)
        bits = sc_["bits"]
        bits[:] = xp.unpackbits(data[4 * c.B:], count=c.d)
        for b in range(c.B):
            a, e = int(c.offsets[b]), int(c.offsets[b + 1])
            sb = np.uint32(su[b])
            for i in range(a, e, _CHUNK):
                j = min(i + _CHUNK, e)
                o = ou[i:j]
                xp.left_shift(bits[i:j], 31, out=o, dtype=xp.uint32, casting="unsafe")
                xp.bitwise_or(o, sb, out=o)
        return out


class _SignNumba:
    """One fused pass (block L1 sums + sign bits) on up to ``threads`` threads, each owning
    whole blocks, so every block's sum keeps the abssum8 order."""

    def __init__(self, c):
        from . import _nb_core, _nb_sign

        self.c, self.core, self.k = c, _nb_core, _nb_sign
        self._plans = {}

    def nt(self):
        c = self.c
        return c.threads if (c.threads > 1 and c.d >= c.par_min_d) else 1

    def _plan(self, nt):
        """(thread -> first block, decode element bounds) for nt threads: blocks split so each
        thread owns about d / nt elements; decode ranges byte-aligned."""
        c = self.c
        if nt not in self._plans:
            tb = np.searchsorted(c.offsets[:-1], [c.d * t // nt for t in range(nt)], side="left")
            tb = np.concatenate([tb, [c.B]]).astype(np.int64)
            tb[0] = 0
            tb = np.maximum.accumulate(tb)
            bounds = [8 * ((c.d * t // nt) // 8) for t in range(nt)] + [c.d]
            self._plans[nt] = (tb, np.asarray(bounds, dtype=np.int64))
        return self._plans[nt]

    def encode(self, x):
        c = self.c
        x = np.ascontiguousarray(x)
        data = np.empty(c.nbytes, dtype=np.uint8)
        nt = self.nt()
        tb, _ = self._plan(nt)
        acc8 = np.empty((c.B, 8), dtype=np.float64)
        sums = np.empty(c.B, dtype=np.float64)
        with self.core.parallel(nt):
            self.k.block_sign_encode(x, c.offsets, tb, acc8, sums, data[4 * c.B:])
        with np.errstate(over="ignore", invalid="ignore"):
            sc = (sums / c._sizes).astype(np.float32)
        if not np.isfinite(sc).all():
            c._raise_nonfinite(x)
        data[:4 * c.B] = sc.astype("<f4").view(np.uint8)
        return data

    def decode(self, data, su, out):
        c = self.c
        nt = self.nt()
        _, bounds = self._plan(nt)
        with self.core.parallel(nt):
            self.k.block_sign_decode(np.ascontiguousarray(data[4 * c.B:]), c.offsets, su, bounds,
                                     out.view(np.uint32))
        return out


def _cuda_sign(c):
    from ._cuda_backends import SignCuda

    return SignCuda(c)


@CODECS.register("block_sign", params=BlockSignParams)
class BlockSign(Codec):
    """Blockwise scaled sign C_B (dist-ef Alg. 3): float32 ||v_b||_1/d_b per block + 1 bit/element."""

    name = "block_sign"
    unbiased = False
    deterministic = True
    IMPLS = {"numpy": _SignNumpy, "numba": _SignNumba, "cuda": _cuda_sign}
    par_min_d = 1 << 16  # numba: shorter vectors stay on one thread

    def __init__(self, d, blocks=None, xp=np, block_size: Optional[int] = None, **kw):
        super().__init__(d, blocks, xp, **kw)
        if block_size is not None:
            bsz = int(block_size)
            self.blocks = tuple([bsz] * (self.d // bsz) + ([self.d % bsz] if self.d % bsz else []))
        self._setup()

    def _setup(self):
        self.B = len(self.blocks)
        self.offsets = np.concatenate([[0], np.cumsum(self.blocks)]).astype(np.int64)
        self.nbits = 32 * self.B + self.d
        self.nbytes = 4 * self.B + (self.d + 7) // 8
        self._sizes = np.asarray(self.blocks, dtype=np.float64)
        self._make_impl()

    def _nt(self):
        return self.impl.nt() if hasattr(self.impl, "nt") else 1

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, B={self.B})"

    def scales(self, x):
        """The B float32 scales ||x_b||_1 / d_b (the numpy backend's reference)."""
        return _SignNumpy(self).scales(x)

    def _raise_nonfinite(self, x):
        if not bool(self.xp.isfinite(x).all()):
            raise CodecError(f"{self.name}: cannot encode a vector holding NaN or Inf")
        raise CodecError(f"{self.name}: a block's l1 norm / d_b overflows float32")

    def encode(self, x, rng=None) -> Payload:
        xp = self.xp
        if x.ndim != 1 or x.shape[0] != self.d:
            raise CodecError(f"{self.name}: expected a vector of length d={self.d}, "
                             f"got shape {tuple(x.shape)}")
        x = x.astype(xp.float32, copy=False)
        return Payload(self.impl.encode(x), self.nbits)

    def decode(self, data, out=None):
        xp = self.xp
        data = self._as_bytes(data)
        n = int(data.shape[0])
        if n < self.nbytes:
            raise CodecError(f"{self.name}: payload truncated ({n} < {self.nbytes} bytes)")
        if n > self.nbytes:
            raise CodecError(f"{self.name}: payload extended ({n} > {self.nbytes} bytes)")
        head = data[:4 * self.B]
        sc = np.frombuffer((head.get() if xp is not np else head).tobytes(), dtype="<f4")
        if not np.isfinite(sc).all() or np.signbit(sc).any():
            # -0.0 included: the encoder never sends it (a sum of absolute values)
            raise CodecError(f"{self.name}: block scales must be finite and >= +0.0")
        tail = self.d % 8
        if tail and int(data[-1]) & ((1 << (8 - tail)) - 1):
            raise CodecError(f"{self.name}: nonzero padding bits")
        out = self._out(out)
        return self.impl.decode(data, sc.astype(np.float32).view(np.uint32), out)


@CODECS.register("sign", params=SignParams)
class Sign(BlockSign):
    """Scaled sign ||v||_1/d * sign(v) (dist-ef eq. (1)): one float32 + 1 bit/element (B = 1)."""

    name = "sign"

    def __init__(self, d, blocks=None, xp=np, **kw):
        Codec.__init__(self, d, None, xp, **kw)
        self._setup()
