"""QSGD (quantized-pr-sgd eq. (2)-(3), wire format of its App. A.4) and two variants.

Quantization (shared by the three codecs; see docs/codecs.md):
  norm = float32(sqrt(sum_i float64(v_i)**2))          -- the float32 that is sent
  r_i  = min(s, abs(v_i) * float32(s / norm))           -- float32 arithmetic
         (when s / norm overflows float32: r_i = min(s, (abs(v_i) / norm) * s))
  l_i  = floor(r_i);  zeta_i = l_i + (U_i < r_i - l_i)
  U    = rng.random(d, dtype=np.float32)                -- exactly d draws, element order
Decoded value: float32(float64(norm) * zeta_i / s) with the sign of v_i (sign(0) = +1).

Backends: ``numpy`` (``_QNumpy``, the vectorized reference in this module), ``numba``
(``_qsgd_numba``, kernels in ``_nb_qsgd``; qsgd/qsgd_scaled on up to ``threads`` threads) and
``cuda`` (``_cuda_qsgd``: parallel encoders, a segment-parallel speculative decoder).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import CODECS
from . import _bitstream as bs
from .base import Codec, CodecError, Payload

S_MAX = 2**31 - 2  # keeps every gamma code within 63 bits


def ceil_sqrt(d: int) -> int:
    r = math.isqrt(d)
    return r if r * r == d else r + 1


class QSGDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    s: Optional[int] = Field(None, ge=1, le=S_MAX)


def norm_acc(x, use_numba: bool = False, absolute: bool = False) -> float:
    """sum_i float64(x_i)**2 (``absolute``: sum_i |float64(x_i)|) in a fixed order that numpy and
    the numba kernel both reproduce exactly, whatever the array's memory alignment (BLAS sums are
    not: their order depends on it, which broke bit-identical runs): 8 accumulators, accumulator j
    adds the terms of x_i, i = j mod 8, sequentially in i (``add.accumulate`` along axis 0 is
    sequential by definition); then ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)).  NaN/Inf in
    x give a non-finite sum; a finite float32 x cannot overflow it (d * 3.4e38**2 < 1.8e308)."""
    if not isinstance(x, np.ndarray):  # cupy: the GPU's scans are not sequential -> host
        x = x.get()
    acc = np.zeros(8, dtype=np.float64)
    if use_numba:  # the kernels read x as contiguous memory
        x = np.ascontiguousarray(x)
        from . import _nb_core

        (_nb_core.abssum8 if absolute else _nb_core.sumsq8)(x, acc)
    else:
        step = 1 << 16
        for i in range(0, x.shape[0], step):
            c = x[i:i + step].astype(np.float64)
            if absolute:
                np.abs(c, out=c)
            else:
                c *= c
            pad = (-c.shape[0]) % 8
            rows = (c.shape[0] + pad) // 8
            buf = np.zeros((rows + 1, 8)) if pad else np.empty((rows + 1, 8))
            buf[0] = acc
            buf[1:].reshape(-1)[:c.shape[0]] = c
            acc = np.add.accumulate(buf, axis=0)[-1]
    a = [float(v) for v in acc]
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


def _norm32(x, use_numba: bool = False) -> np.float32:
    """float32(sqrt(sum float64(x_i)^2)) with the sum of :func:`norm_acc`."""
    with np.errstate(over="ignore"):     # inf on overflow: callers check and raise CodecError
        return np.float32(math.sqrt(norm_acc(x, use_numba)))


def draw_uniform32(xp, rng, n: int):
    """n uniforms in [0, 1) as float32: ``rng.random(n, dtype=np.float32)``.

    A numpy Generator also drives the cupy path (drawn on the host, then copied), so numpy and
    cupy produce identical payloads for the same seed; a cupy Generator is used as is.
    """
    if isinstance(rng, np.random.Generator):
        u = rng.random(n, dtype=np.float32)
        return u if xp is np else xp.asarray(u)
    if rng is None:
        raise CodecError("stochastic codec needs an explicit rng (numpy.random.Generator)")
    return rng.random(n, dtype=xp.float32)


class _Given:
    """Stands in for an rng in ``encode_with``: ``random(out=...)`` copies given uniforms."""

    def __init__(self, u):
        self.u = u

    def random(self, n=None, dtype=np.float32, out=None):
        u = np.asarray(self.u, dtype=np.float32)
        if u.shape != (n,):
            raise CodecError(f"expected {n} uniforms, got shape {u.shape}")
        return u


class _QNumpy:
    """The vectorized backend of the QSGD family (any array module): the reference quantizer
    (:meth:`_QSGDBase.quantize`), then the codec's packer / parser."""

    def __init__(self, c):
        self.c = c

    def encode(self, x, rng):
        c = self.c
        x = c._check_input(x)
        u = draw_uniform32(c.xp, rng, c.d)
        return self.encode_with(x, u)

    def encode_with(self, x, u):
        c = self.c
        return c.pack(*c.quantize(x, u))

    def decode(self, data, out):
        c = self.c
        norm, zeta, neg = c.decode_levels(data)
        return c._into(c.values(norm, zeta, neg, c.scale), out)


def _numba_qsgd(c):
    from ._qsgd_numba import QSGDNumba

    return QSGDNumba(c)


def _cuda_qsgd(c):
    from ._cuda_qsgd import QSGDCuda

    return QSGDCuda(c)


def _cuda_runlength(c):
    from ._cuda_qsgd import RunLengthCuda

    return RunLengthCuda(c)


def _numba_runlength(c):
    from ._qsgd_numba import RunLengthNumba

    return RunLengthNumba(c)


class _QSGDBase(Codec):
    unbiased = True
    deterministic = False
    scale = 1.0
    par_min_d = 1 << 17  # numba: shorter vectors stay on one thread
    IMPLS = {"numpy": _QNumpy, "numba": _numba_qsgd}

    def __init__(self, d, blocks=None, xp=np, s: Optional[int] = None, **kw):
        super().__init__(d, blocks, xp, **kw)
        self.s = int(s) if s is not None else ceil_sqrt(self.d)
        if not 1 <= self.s <= S_MAX:
            raise ValueError(f"{self.name}: s must be in [1, {S_MAX}], got {self.s}")
        self.nmax = (self.s + 1).bit_length() - 1  # floor(log2(s + 1))
        self._make_impl()

    def _nt(self):
        return self.impl.nt() if hasattr(self.impl, "nt") else 1

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, s={self.s})"

    # quantization ------------------------------------------------------------------------
    def quantize(self, x, u):
        """(norm float32, zeta uint64, negative bool) from the input and the d uniforms ``u``."""
        xp = self.xp
        norm = _norm32(x)
        if not math.isfinite(float(norm)):
            raise CodecError(f"{self.name}: the norm of the input overflows float32")
        neg = x < 0
        if norm == 0:
            return norm, xp.zeros(self.d, dtype=xp.uint64), neg
        r = xp.abs(x)
        with np.errstate(over="ignore"):  # a tiny norm overflows s/norm: handled just below
            c = np.float32(self.s / float(norm))
        if math.isfinite(float(c)):
            r *= c
        else:
            r /= norm
            r *= np.float32(self.s)
        xp.minimum(r, np.float32(self.s), out=r)
        lvl = xp.floor(r)
        r -= lvl
        zeta = lvl.astype(xp.uint64)
        zeta += (u < r)
        return norm, zeta, neg

    def values(self, norm, zeta, neg, scale: float = 1.0):
        xp = self.xp
        out = (np.float64(norm) * scale) * zeta.astype(xp.float64)
        out /= self.s
        out = out.astype(xp.float32)
        out[neg] *= -1
        return out

    def _into(self, v, out):
        """The numpy path's decoded vector ``v``, copied into ``out`` when one is given."""
        if out is None:
            return v
        out = self._out(out)
        out[...] = v
        return out

    def _header(self, data):
        data = self._as_bytes(data)
        if data.shape[0] < 4:
            raise CodecError(f"{self.name}: payload truncated (no norm)")
        if data.shape[0] > self.max_bytes():
            raise CodecError(f"{self.name}: payload extended ({data.shape[0]} bytes > maximum "
                             f"{self.max_bytes()} for d={self.d}, s={self.s})")
        norm = np.frombuffer(bytes(self.xp.asnumpy(data[:4]) if self.xp is not np else data[:4]),
                             dtype="<f4")[0]
        if not math.isfinite(float(norm)) or np.signbit(norm):
            # -0.0 included: the encoder never sends it (a square root of a sum of squares), and
            # it would decode to zeros of a sign that depends on the kernel's arithmetic
            raise CodecError(f"{self.name}: norm is {norm!r} (must be finite and >= +0.0)")
        return data, norm

    def _emit(self, norm, codes, lens, start: int = 32, extra=None) -> Payload:
        """Payload = float32 norm (then the bytes of ``extra``, up to bit ``start``), then the
        codes (``lens`` bits each) MSB-first, zero-padded."""
        xp = self.xp
        nbits = start + int(lens.sum())
        words = bs.new_words(xp, nbits)
        bs.pack(xp, words, start, codes, lens)
        data = bs.words_to_bytes(xp, words, nbits)
        data[:4] = xp.asarray(np.frombuffer(np.float32(norm).astype("<f4").tobytes(), np.uint8))
        if extra is not None:
            data[4:start // 8] = xp.asarray(np.frombuffer(extra.tobytes(), np.uint8))
        return Payload(data, nbits)

    def _finish(self, words, nbytes, end):
        """Check the end of the parse against the buffer: no extension, zero padding."""
        if 8 * nbytes - end >= 8:
            raise CodecError(f"{self.name}: payload extended ({nbytes} bytes, "
                             f"codes end at bit {end})")
        if end < 8 * nbytes:
            rest = bs.window(self.xp, words, self.xp.asarray([end], dtype=self.xp.int64))
            if int(rest[0] >> np.uint64(64 - (8 * nbytes - end))) != 0:
                raise CodecError(f"{self.name}: nonzero padding bits")


@CODECS.register("qsgd", params=QSGDParams)
class QSGD(_QSGDBase):
    """QSGD Q_s: float32 norm, then per element a sign bit and Elias-gamma(zeta + 1)."""

    IMPLS = {"numpy": _QNumpy, "numba": _numba_qsgd, "cuda": _cuda_qsgd}
    name = "qsgd"
    scale = 1.0

    def max_bytes(self):
        return (32 + self.d * (2 + 2 * self.nmax) + 7) // 8

    def encode(self, x, rng=None) -> Payload:
        return self.impl.encode(x, rng)

    def encode_with(self, x, u) -> Payload:
        """Encode with given uniforms ``u`` (d float32 values) in place of the d draws."""
        return self.impl.encode_with(x, u)

    def decode(self, data, out=None):
        return self.impl.decode(data, out)

    def pack(self, norm, zeta, neg) -> Payload:
        """The payload of quantized levels (the numpy backend's packer)."""
        xp = self.xp
        k = zeta + np.uint64(1)
        n = bs.gamma_len_n(xp, k)
        lens = 2 * n + 2
        codes = k | (neg.astype(xp.uint64) << (2 * n + 1).astype(xp.uint64))
        return self._emit(norm, codes, lens)

    def decode_levels(self, data):
        """(norm, zeta, negative) read from a payload, validated."""
        xp = self.xp
        data, norm = self._header(data)
        nbytes = int(data.shape[0])
        words = bs.bytes_to_words(xp, data)
        nmax = self.nmax

        def reclen(pos):
            n = bs.gamma_n(xp, bs.window(xp, words, pos + 1))
            return 2 * n + 2, n > nmax

        pos, lens = bs.parse_records(xp, words, 32, 8 * nbytes, self.d, reclen, 2, what=self.name)
        end = int(pos[-1] + lens[-1])
        self._finish(words, nbytes, end)
        win = bs.window(xp, words, pos)
        neg = (win >> np.uint64(63)).astype(xp.bool_)
        body = win << np.uint64(1)
        n = (lens - 2) // 2
        zeta = bs.gamma_value(xp, body, n) - np.uint64(1)
        if bool((zeta > np.uint64(self.s)).any()):
            raise CodecError(f"{self.name}: level > s={self.s}")
        return norm, zeta, neg


@CODECS.register("qsgd_scaled", params=QSGDParams)
class QSGDScaled(QSGD):
    """c * Q_s with c = 1 / (1 + d / (4 s^2)) (dist-ef L111); same wire as qsgd; biased."""

    name = "qsgd_scaled"
    unbiased = False

    def __init__(self, d, blocks=None, xp=np, s: Optional[int] = None, **kw):
        super().__init__(d, blocks, xp, s, **kw)
        self.scale = 1.0 / (1.0 + self.d / (4.0 * self.s * self.s))


@CODECS.register("qsgd_runlength", params=QSGDParams)
class QSGDRunLength(_QSGDBase):
    """Q_s with run-length coding: float32 norm, uint32 d, gamma(k+1) non-zeros, then per
    non-zero gamma(gap+1), sign bit, gamma(zeta).  (The d field makes a payload for another d a
    CodecError: the records alone would decode under any larger d.)"""

    name = "qsgd_runlength"
    IMPLS = {"numpy": _QNumpy, "numba": _numba_runlength, "cuda": _cuda_runlength}

    def max_bytes(self):
        nd = self.d.bit_length()
        return (64 + 2 * nd + 1 + self.d * (2 * nd + 1 + 1 + 2 * self.nmax + 1) + 7) // 8

    def _header(self, data):
        data, norm = super()._header(data)
        if data.shape[0] < 8:
            raise CodecError(f"{self.name}: payload truncated (no d)")
        h = data[4:8] if self.xp is np else self.xp.asnumpy(data[4:8])
        d = int(np.frombuffer(bytes(h), dtype="<u4")[0])
        if d != self.d:
            raise CodecError(f"{self.name}: payload is for d={d}, this codec has d={self.d}")
        return data, norm

    def encode(self, x, rng=None) -> Payload:
        return self.impl.encode(x, rng)

    def encode_with(self, x, u) -> Payload:
        """Encode with given uniforms ``u`` (d float32 values) in place of the d draws."""
        return self.impl.encode_with(x, u)

    def decode(self, data, out=None):
        return self.impl.decode(data, out)

    def pack(self, norm, zeta, neg) -> Payload:
        """The payload of quantized levels (the numpy backend's packer)."""
        xp = self.xp
        idx = xp.flatnonzero(zeta)
        k = int(idx.shape[0])
        gap = xp.diff(idx, prepend=-1).astype(xp.uint64)  # gap + 1 = distance to previous
        z = zeta[idx]
        ng = bs.gamma_len_n(xp, gap)
        nz = bs.gamma_len_n(xp, z)
        # one record = gamma(gap+1) | sign | gamma(zeta) ; pack as two fields per record
        hdr_n = (k + 1).bit_length() - 1
        codes = xp.empty(2 * k + 1, dtype=xp.uint64)
        lens = xp.empty(2 * k + 1, dtype=xp.int64)
        codes[0] = k + 1
        lens[0] = 2 * hdr_n + 1
        lens[1::2] = 2 * ng + 1
        codes[1::2] = gap
        lens[2::2] = 2 * nz + 2
        codes[2::2] = z | (neg[idx].astype(xp.uint64) << (2 * nz + 1).astype(xp.uint64))
        return self._emit(norm, codes, lens, start=64, extra=np.uint32(self.d).astype("<u4"))

    def decode_levels(self, data):
        xp = self.xp
        data, norm = self._header(data)
        nbytes = int(data.shape[0])
        words = bs.bytes_to_words(xp, data)
        end_avail = 8 * nbytes
        if end_avail < 65:
            raise CodecError(f"{self.name}: payload truncated (no count)")
        win0 = bs.window(xp, words, xp.asarray([64], dtype=xp.int64))
        hn = int(bs.gamma_n(xp, win0)[0])
        if hn > self.d.bit_length() or 64 + 2 * hn + 1 > end_avail:
            raise CodecError(f"{self.name}: impossible count code")
        k = int(bs.gamma_value(xp, win0, xp.asarray([hn]))[0]) - 1
        if k > self.d:
            raise CodecError(f"{self.name}: {k} non-zeros > d={self.d}")
        start = 64 + 2 * hn + 1
        nmax, nd = self.nmax, self.d.bit_length()

        def reclen(pos):
            n1 = bs.gamma_n(xp, bs.window(xp, words, pos))
            p2 = pos + 2 * n1 + 2
            n2 = bs.gamma_n(xp, bs.window(xp, words, xp.minimum(p2, end_avail)))
            return 2 * n1 + 2 * n2 + 3, (n1 > nd) | (n2 > nmax)

        pos, lens = bs.parse_records(xp, words, start, end_avail, k, reclen, 3, what=self.name)
        end = int(pos[-1] + lens[-1]) if k else start
        self._finish(words, nbytes, end)
        zeta = xp.zeros(self.d, dtype=xp.uint64)
        neg = xp.zeros(self.d, dtype=xp.bool_)
        if k:
            w1 = bs.window(xp, words, pos)
            n1 = bs.gamma_n(xp, w1)
            gap = bs.gamma_value(xp, w1, n1)
            p2 = pos + 2 * n1 + 1
            w2 = bs.window(xp, words, p2)
            sg = (w2 >> np.uint64(63)).astype(xp.bool_)
            body = w2 << np.uint64(1)
            n2 = bs.gamma_n(xp, body)
            z = bs.gamma_value(xp, body, n2)
            if bool((z > np.uint64(self.s)).any()):
                raise CodecError(f"{self.name}: level > s={self.s}")
            idx = xp.cumsum(gap.astype(xp.int64)) - 1
            if int(idx[-1]) >= self.d:
                raise CodecError(f"{self.name}: index out of range (>= d={self.d})")
            zeta[idx] = z
            neg[idx] = sg
        return norm, zeta, neg


