"""Scaled sign compressors of dist-ef-blocksgdm: eq. (1) (``sign``, one block) and the blockwise
C_B of Alg. 3 (``block_sign``): [ ||v_b||_1 / d_b * sign(v_b) ]_b, sign(0) = +1.

Wire: B little-endian float32 scales (block order), then d sign bits MSB-first (1 = negative),
zero-padded to a byte.  nbits = 32 B + d.  Deterministic, biased.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import CODECS
from . import _numba_kernels as _nk
from .base import Codec, CodecError, Payload
from .qsgd import norm_acc

_CHUNK = 1 << 16  # elements per cache-resident piece


class BlockSignParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: Optional[int] = Field(None, ge=1)


class SignParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def l1_float64(xp, v) -> float:
    """||v||_1 summed in float64 in a fixed order, identical on numpy and numba and independent of
    the array's alignment (see qsgd.norm_acc): the same input always gives the same scale."""
    return norm_acc(v, absolute=True)


@CODECS.register("block_sign", params=BlockSignParams)
class BlockSign(Codec):
    """Blockwise scaled sign C_B (dist-ef Alg. 3): float32 ||v_b||_1/d_b per block + 1 bit/element."""

    name = "block_sign"
    unbiased = False
    deterministic = True

    def __init__(self, d, blocks=None, xp=np, block_size: Optional[int] = None):
        super().__init__(d, blocks, xp)
        if block_size is not None:
            bsz = int(block_size)
            self.blocks = tuple([bsz] * (self.d // bsz) + ([self.d % bsz] if self.d % bsz else []))
        self._setup()

    def _setup(self):
        xp = self.xp
        self.B = len(self.blocks)
        self.offsets = np.concatenate([[0], np.cumsum(self.blocks)]).astype(np.int64)
        self.nbits = 32 * self.B + self.d
        self.nbytes = 4 * self.B + (self.d + 7) // 8
        # "numba": one fused pass (block L1 sums + sign bits) on up to ``threads`` threads, each
        # owning whole blocks, so every block's sum keeps the abssum8 order; "numpy": the
        # vectorized path.  Both give the same bytes and values.
        self.backend = "numba" if (_nk.enabled() and xp is np) else "numpy"
        self.threads = _nk.threads()
        self.par_min_d = 1 << 16
        # numpy path scratch (the codec owns it, one set per calling thread): sign mask and
        # unpacked bits (~2 bytes/element, allocated on first use)
        self._sizes = np.asarray(self.blocks, dtype=np.float64)
        self._plans = {}

    def _nt(self):
        return self.threads if (self.threads > 1 and self.d >= self.par_min_d) else 1

    def _plan(self, nt):
        """(thread -> first block, decode element bounds) for nt threads: blocks split so each
        thread owns about d / nt elements; decode ranges byte-aligned."""
        if nt not in self._plans:
            tb = np.searchsorted(self.offsets[:-1], [self.d * t // nt for t in range(nt)],
                                 side="left")
            tb = np.concatenate([tb, [self.B]]).astype(np.int64)
            tb[0] = 0
            tb = np.maximum.accumulate(tb)
            bounds = [8 * ((self.d * t // nt) // 8) for t in range(nt)] + [self.d]
            self._plans[nt] = (tb, np.asarray(bounds, dtype=np.int64))
        return self._plans[nt]

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, B={self.B})"

    def scales(self, x):
        xp = self.xp
        out = np.empty(self.B, dtype=np.float32)
        for b in range(self.B):
            a, e = int(self.offsets[b]), int(self.offsets[b + 1])
            out[b] = np.float32(l1_float64(xp, x[a:e]) / (e - a))
        return out

    def encode(self, x, rng=None) -> Payload:
        xp = self.xp
        if x.ndim != 1 or x.shape[0] != self.d:
            raise CodecError(f"{self.name}: expected a vector of length d={self.d}, "
                             f"got shape {tuple(x.shape)}")
        x = x.astype(xp.float32, copy=False)
        if self.backend == "numba":
            return self._nb_encode(x)
        sc = self.scales(x)
        # NaN/Inf in x make its block's l1 sum non-finite, so the isfinite pass over x (1/3 of
        # the encode time) is only needed to tell the two errors apart
        if not np.isfinite(sc).all():
            if not bool(xp.isfinite(x).all()):
                raise CodecError(f"{self.name}: cannot encode a vector holding NaN or Inf")
            raise CodecError(f"{self.name}: a block's l1 norm / d_b overflows float32")
        sc_ = self._thread_scratch()
        if "neg" not in sc_:
            sc_["neg"] = xp.empty(self.d, dtype=xp.bool_)
        neg = sc_["neg"]
        xp.less(x, 0, out=neg)
        packed = xp.packbits(neg)
        data = xp.empty(self.nbytes, dtype=xp.uint8)
        data[:4 * self.B] = xp.asarray(sc.astype("<f4").view(np.uint8))
        data[4 * self.B:] = packed
        return Payload(data, self.nbits)

    def _nb_encode(self, x):
        x = np.ascontiguousarray(x)
        data = np.empty(self.nbytes, dtype=np.uint8)
        nt = self._nt()
        tb, _ = self._plan(nt)
        acc8 = np.empty((self.B, 8), dtype=np.float64)
        sums = np.empty(self.B, dtype=np.float64)
        with _nk.parallel(nt):
            _nk.block_sign_encode(x, self.offsets, tb, acc8, sums, data[4 * self.B:])
        with np.errstate(over="ignore", invalid="ignore"):
            sc = (sums / self._sizes).astype(np.float32)
        if not np.isfinite(sc).all():
            if not bool(np.isfinite(x).all()):
                raise CodecError(f"{self.name}: cannot encode a vector holding NaN or Inf")
            raise CodecError(f"{self.name}: a block's l1 norm / d_b overflows float32")
        data[:4 * self.B] = sc.astype("<f4").view(np.uint8)
        return Payload(data, self.nbits)

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
        if not np.isfinite(sc).all() or (sc < 0).any():
            raise CodecError(f"{self.name}: block scales must be finite and >= 0")
        tail = self.d % 8
        if tail and int(data[-1]) & ((1 << (8 - tail)) - 1):
            raise CodecError(f"{self.name}: nonzero padding bits")
        out = self._out(out)
        ou = out.view(xp.uint32)
        su = sc.astype(np.float32).view(np.uint32)
        if self.backend == "numba":
            nt = self._nt()
            _, bounds = self._plan(nt)
            with _nk.parallel(nt):
                _nk.block_sign_decode(np.ascontiguousarray(data[4 * self.B:]), self.offsets, su,
                                      bounds, ou)
            return out
        sc_ = self._thread_scratch()
        if "bits" not in sc_:
            sc_["bits"] = xp.empty(self.d, dtype=xp.uint8)
        bits = sc_["bits"]
        bits[:] = xp.unpackbits(data[4 * self.B:], count=self.d)
        for b in range(self.B):
            a, e = int(self.offsets[b]), int(self.offsets[b + 1])
            sb = np.uint32(su[b])
            for i in range(a, e, _CHUNK):
                j = min(i + _CHUNK, e)
                o = ou[i:j]
                xp.left_shift(bits[i:j], 31, out=o, dtype=xp.uint32, casting="unsafe")
                xp.bitwise_or(o, sb, out=o)
        return out


@CODECS.register("sign", params=SignParams)
class Sign(BlockSign):
    """Scaled sign ||v||_1/d * sign(v) (dist-ef eq. (1)): one float32 + 1 bit/element (B = 1)."""

    name = "sign"

    def __init__(self, d, blocks=None, xp=np):
        Codec.__init__(self, d, None, xp)
        self._setup()
