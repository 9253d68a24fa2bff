"""QSGD (quantized-pr-sgd eq. (2)-(3), wire format of its App. A.4) and two variants.

Quantization (shared by the three codecs; see docs/codecs.md):
  norm = float32(sqrt(sum_i float64(v_i)**2))          -- the float32 that is sent
  r_i  = min(s, abs(v_i) * float32(s / norm))           -- float32 arithmetic
         (when s / norm overflows float32: r_i = min(s, (abs(v_i) / norm) * s))
  l_i  = floor(r_i);  zeta_i = l_i + (U_i < r_i - l_i)
  U    = rng.random(d, dtype=np.float32)                -- exactly d draws, element order
Decoded value: float32(float64(norm) * zeta_i / s) with the sign of v_i (sign(0) = +1).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import CODECS
from . import _bitstream as bs
from . import _numba_kernels as _nk
from .base import Codec, CodecError, Payload

S_MAX = 2**31 - 2  # keeps every gamma code within 63 bits


def ceil_sqrt(d: int) -> int:
    r = math.isqrt(d)
    return r if r * r == d else r + 1


class QSGDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    s: Optional[int] = Field(None, ge=1, le=S_MAX)


def norm_acc(x, use_numba: Optional[bool] = None, absolute: bool = False) -> float:
    """sum_i float64(x_i)**2 (``absolute``: sum_i |float64(x_i)|) in a fixed order that numpy and
    the numba kernel both reproduce exactly, whatever the array's memory alignment (BLAS sums are
    not: their order depends on it, which broke bit-identical runs): 8 accumulators, accumulator j
    adds the terms of x_i, i = j mod 8, sequentially in i (``add.accumulate`` along axis 0 is
    sequential by definition); then ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)).  NaN/Inf in
    x give a non-finite sum; a finite float32 x cannot overflow it (d * 3.4e38**2 < 1.8e308)."""
    if not isinstance(x, np.ndarray):  # cupy: the GPU's scans are not sequential -> host
        x = x.get()
    if use_numba is None:
        use_numba = _nk.enabled()
    acc = np.zeros(8, dtype=np.float64)
    if use_numba:  # the kernels read x as contiguous memory
        x = np.ascontiguousarray(x)
        (_nk.abssum8 if absolute else _nk.sumsq8)(x, acc)
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


def _norm32(x, use_numba: Optional[bool] = None) -> np.float32:
    """float32(sqrt(sum float64(x_i)^2)) with the sum of :func:`norm_acc`."""
    with np.errstate(over="ignore"):     # inf on overflow: callers check and raise CodecError
        return np.float32(math.sqrt(norm_acc(x, use_numba)))


def _xp_of(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy  # pragma: no cover - GPU only

    return cupy  # pragma: no cover


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


class _QSGDBase(Codec):
    unbiased = True
    deterministic = False

    def __init__(self, d, blocks=None, xp=np, s: Optional[int] = None):
        super().__init__(d, blocks, xp)
        self.s = int(s) if s is not None else ceil_sqrt(self.d)
        if not 1 <= self.s <= S_MAX:
            raise ValueError(f"{self.name}: s must be in [1, {S_MAX}], got {self.s}")
        self.nmax = (self.s + 1).bit_length() - 1  # floor(log2(s + 1))
        # "numba": compiled sequential kernels (numpy arrays only); "numpy": the vectorized path
        self.backend = "numba" if (_nk.enabled() and xp is np) else "numpy"
        # numba path: threads for qsgd encode/decode (QPRSGD_CODEC_THREADS, default 2); vectors
        # shorter than par_min_d stay on one thread.  The result does not depend on either.
        self.threads = _nk.threads()
        self.par_min_d = 1 << 17
        self._scratch = {}

    def _nt(self):
        return self.threads if (self.threads > 1 and self.d >= self.par_min_d) else 1

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, s={self.s})"

    # numba path helpers ------------------------------------------------------------------
    def _buf(self, key, n, dtype):
        """A reusable scratch array of >= n elements (the codec owns it; one per thread)."""
        sc = self._thread_scratch()
        b = sc.get(key)
        if b is None or b.shape[0] < n:
            b = np.empty(n, dtype=dtype)
            sc[key] = b
        return b

    def _nb_prepare(self, x, rng):
        """Input checks, norm and draws for the numba encoders, in the numpy path's order
        (NaN/Inf rejected before drawing; a float32 norm overflow raises after the d draws).
        Returns (x, norm, mode, c, u, pcg_state, bit_generator)."""
        if x.ndim != 1 or x.shape[0] != self.d:
            raise CodecError(f"{self.name}: expected a vector of length d={self.d}, "
                             f"got shape {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        acc = norm_acc(x, True)
        if not math.isfinite(acc):  # the sum of squares is finite iff every x_i is
            raise CodecError(f"{self.name}: cannot encode a vector holding NaN or Inf")
        with np.errstate(over="ignore"):
            norm = np.float32(math.sqrt(acc))
        if not math.isfinite(float(norm)):
            draw_uniform32(np, rng, self.d)
            raise CodecError(f"{self.name}: the norm of the input overflows float32")
        state, bg = _nk.pcg64_state(rng)
        if state is None:
            if isinstance(rng, np.random.Generator):
                u = self._buf("u", self.d, np.float32)[:self.d]
                rng.random(out=u, dtype=np.float32)
            else:
                u = np.ascontiguousarray(draw_uniform32(np, rng, self.d), dtype=np.float32)
            state = np.zeros(6, dtype=np.uint64)
        else:
            u = np.zeros(0, dtype=np.float32)
        if norm == 0:
            return x, norm, 0, np.float32(0), u, state, bg
        with np.errstate(over="ignore"):
            c = np.float32(self.s / float(norm))
        if math.isfinite(float(c)):
            return x, norm, 1, c, u, state, bg
        return x, norm, 2, norm, u, state, bg

    def _nb_quantize_pack(self, x, rng, words, runlength):
        x, norm, mode, c, u, state, bg = self._nb_prepare(x, rng)
        norm_be = int.from_bytes(np.float32(norm).astype("<f4").tobytes(), "big")
        nt = self._nt()
        if not runlength and bg is not None and (nt > 1 or self.d >= self.par_min_d):
            return norm_be, self._nb_encode_par(x, mode, c, state, bg, norm_be, words, nt), 0
        nbits, k = _nk.qsgd_quantize_pack(x, u, state, bg is not None, mode, c,
                                          np.float32(self.s), norm_be, words, runlength)
        if bg is not None:
            _nk.pcg64_store(bg, state)
        return norm_be, int(nbits), int(k)

    def _nb_encode_par(self, x, mode, c, state, bg, norm_be, words, nt):
        """qsgd_quantize_pack's stream on nt threads (element segments, jumped-ahead PCG64)."""
        d, ch = self.d, _nk.CHUNK
        bounds = np.array([((d * t // nt) // ch) * ch for t in range(nt)] + [d], dtype=np.int64)
        states = _nk.pcg64_segment_states(state, bounds[:-1])
        per = (np.diff(bounds) * (2 + 2 * self.nmax)) // 64 + 2
        per[0] = 0
        soff = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
        scratch = self._buf("ws", int(soff[-1]) + 1, np.uint64)
        segbits = np.zeros(nt, dtype=np.int64)
        wstate = np.zeros((nt, 3), dtype=np.uint64)
        with _nk.parallel(nt):
            _nk.qsgd_encode_par(x, bounds, states, mode, c, np.float32(self.s), norm_be, words,
                                scratch, soff, segbits, wstate)
        nbits = _nk.qsgd_append(words, scratch, soff, segbits, wstate)
        _nk.pcg64_store(bg, states[-1])
        return int(nbits)

    def _fast(self):
        """The multi-record decode table for (nmax, s), built once per codec."""
        t = self._scratch.get("fast")
        if t is None:
            t = _nk.qsgd_fast_table(self.nmax, self.s)
            self._scratch["fast"] = t
        return t

    def _nb_decode_serial(self, words, end, tab, nsc, out, pos=32, i=0, zbad=False):
        err, info, e, zb = _nk.qsgd_decode_from(words, pos, i, end, self.d, self.nmax, self.s,
                                                tab, nsc, float(self.s), out, *self._fast())
        return err, info, e, bool(zb) or zbad

    def _nb_decode_par(self, words, end, tab, nsc, out, nt):
        """The parallel decoder (see _numba_kernels): (err, info, end_bit, level_bad) exactly as
        the serial decoder.  Anything unexpected -- no resynchronisation, an error, a count
        mismatch, a level > s after the resynchronisation point -- resumes the serial decoder
        from the last true (record start, index)."""
        d, K = self.d, _nk.SPEC_K
        bounds = np.array([32 + ((end - 32) * t) // nt for t in range(nt)] + [end], dtype=np.int64)
        cap = np.minimum(d, np.diff(bounds) // 2 + 2)
        cap[0] = 0
        toff = np.concatenate([[0], np.cumsum(cap)]).astype(np.int64)
        tmp = self._buf("dtmp", int(toff[-1]) + 1, np.float32)
        res = np.zeros((nt, 4), dtype=np.int64)
        starts = np.zeros((nt, K), dtype=np.int64)
        with _nk.parallel(nt):
            _nk.qsgd_decode_par(words, end, d, self.nmax, self.s, tab, nsc, float(self.s), out,
                                tmp, bounds, toff, res, starts, *self._fast())
        n0, p, st0, zl0 = (int(v) for v in res[0])
        if st0 != 0:
            return self._nb_decode_serial(words, end, tab, nsc, out)
        zbad = zl0 >= 0
        i = n0
        if i == d:
            return _nk.ERR_OK, 0, p, zbad
        for t in range(1, nt):
            n, pe, stt, zl = (int(v) for v in res[t])
            k = min(n, K)
            j = int(np.searchsorted(starts[t, :k], p))
            if j >= k or int(starts[t, j]) != p:
                # the segment restarted past p, or p lies between its recorded starts: decode
                # true records until the two parses meet
                p, i, j = (int(v) for v in _nk.qsgd_catchup(
                    words, p, i, end, d, self.nmax, self.s, tab, nsc, float(self.s), out,
                    starts[t], k))
            if j < 0 or zl >= j:
                return self._nb_decode_serial(words, end, tab, nsc, out, p, i, zbad)
            c = n - j
            src = tmp[toff[t] + j:toff[t] + n]
            if t < nt - 1 and (stt != 0 or pe < bounds[t + 1] or i + c > d):
                return self._nb_decode_serial(words, end, tab, nsc, out, p, i, zbad)
            if t == nt - 1 and c != d - i:
                return self._nb_decode_serial(words, end, tab, nsc, out, p, i, zbad)
            with _nk.parallel(nt):
                _nk.pcopy(src, out[i:i + c], nt)
            i += c
            p = pe
        return _nk.ERR_OK, 0, p, zbad

    def _table(self, norm, scale):
        """Decoded magnitudes float32(float64(norm) * scale * zeta / s) for small zeta."""
        nsc = np.float64(norm) * scale
        n = min(self.s + 1, 1 << 16)
        tab = nsc * np.arange(n, dtype=np.float64)
        tab /= self.s
        return tab.astype(np.float32), float(nsc)

    def _nb_words(self, data):
        """The payload in a reusable word buffer with >= 3 zero guard words."""
        nbytes = int(data.shape[0])
        nw = nbytes // 8 + 4
        words = self._buf("dw", self.max_bytes() // 8 + 4, np.uint64)[:nw]
        b = words.view(np.uint8)
        b[:nbytes] = data
        b[nbytes:] = 0
        return words

    def _nb_raise(self, err, info, count):
        if err == _nk.ERR_BADCODE:
            raise CodecError(f"{self.name}: impossible code length at bit {info}")
        if err == _nk.ERR_PASTEND:
            raise CodecError(f"{self.name}: payload truncated (record at bit {info} "
                             "runs past the end)")
        if err == _nk.ERR_SHORT:
            raise CodecError(f"{self.name}: payload truncated ({info} of {count} records)")

    def _finish_bytes(self, data, end):
        """As :meth:`_finish`, from the bytes: no extension, zero padding."""
        nbytes = int(data.shape[0])
        if 8 * nbytes - end >= 8:
            raise CodecError(f"{self.name}: payload extended ({nbytes} bytes, "
                             f"codes end at bit {end})")
        pad = 8 * nbytes - end
        if pad and int(data[-1]) & ((1 << pad) - 1):
            raise CodecError(f"{self.name}: nonzero padding bits")

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
        if not math.isfinite(float(norm)) or norm < 0:
            raise CodecError(f"{self.name}: norm is {norm!r} (must be finite and >= 0)")
        return data, norm

    def _emit(self, norm, codes, lens) -> Payload:
        """Payload = float32 norm, then the codes (``lens`` bits each) MSB-first, zero-padded."""
        xp = self.xp
        nbits = 32 + int(lens.sum())
        words = bs.new_words(xp, nbits)
        bs.pack(xp, words, 32, codes, lens)
        data = bs.words_to_bytes(xp, words, nbits)
        data[:4] = xp.asarray(np.frombuffer(np.float32(norm).astype("<f4").tobytes(), np.uint8))
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

    name = "qsgd"
    scale = 1.0

    def max_bytes(self):
        return (32 + self.d * (2 + 2 * self.nmax) + 7) // 8

    def encode(self, x, rng=None) -> Payload:
        if self.backend == "numba":
            words = self._buf("w", self.max_bytes() // 8 + 2, np.uint64)
            _, nbits, _ = self._nb_quantize_pack(x, rng, words, False)
            return Payload(words.view(np.uint8)[:(nbits + 7) // 8].copy(), nbits)
        x = self._check_input(x)
        u = draw_uniform32(self.xp, rng, self.d)
        return self.encode_with(x, u)

    def encode_with(self, x, u) -> Payload:
        """Encode with given uniforms (the GPU tests feed numpy's draws to cupy)."""
        xp = self.xp
        if self.backend == "numba":
            words = self._buf("w", self.max_bytes() // 8 + 2, np.uint64)
            _, nbits, _ = self._nb_quantize_pack(x, _Given(u), words, False)
            return Payload(words.view(np.uint8)[:(nbits + 7) // 8].copy(), nbits)
        norm, zeta, neg = self.quantize(x, u)
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

    def decode(self, data, out=None):
        if self.backend == "numba":
            return self._nb_decode(data, out)
        norm, zeta, neg = self.decode_levels(data)
        return self._into(self.values(norm, zeta, neg, self.scale), out)

    def _nb_decode(self, data, out=None):
        data, norm = self._header(data)
        nbytes = int(data.shape[0])
        span = 8 * nbytes - 32
        if span < 2 * self.d:
            raise CodecError(f"{self.name}: payload truncated ({span} bits cannot hold "
                             f"{self.d} records)")
        words = self._nb_words(data)
        tab, nsc = self._table(norm, self.scale)
        out = self._out(out)
        nt = self._nt()
        if nt > 1:
            err, info, end, zbad = self._nb_decode_par(words, 8 * nbytes, tab, nsc, out, nt)
        else:
            err, info, end, zbad = self._nb_decode_serial(words, 8 * nbytes, tab, nsc, out)
        self._nb_raise(err, info, self.d)
        self._finish_bytes(data, int(end))
        if zbad:
            raise CodecError(f"{self.name}: level > s={self.s}")
        return out


@CODECS.register("qsgd_scaled", params=QSGDParams)
class QSGDScaled(QSGD):
    """c * Q_s with c = 1 / (1 + d / (4 s^2)) (dist-ef L111); same wire as qsgd; biased."""

    name = "qsgd_scaled"
    unbiased = False

    def __init__(self, d, blocks=None, xp=np, s: Optional[int] = None):
        super().__init__(d, blocks, xp, s)
        self.scale = 1.0 / (1.0 + self.d / (4.0 * self.s * self.s))


@CODECS.register("qsgd_runlength", params=QSGDParams)
class QSGDRunLength(_QSGDBase):
    """Q_s with run-length coding: float32 norm, gamma(k+1) non-zeros, then per non-zero
    gamma(gap+1), sign bit, gamma(zeta)."""

    name = "qsgd_runlength"

    def _nt(self):
        # the gap of each record depends on the previous non-zero: encode and decode stay on
        # one thread (docs/codecs.md)
        return 1

    def max_bytes(self):
        nd = self.d.bit_length()
        return (32 + 2 * nd + 1 + self.d * (2 * nd + 1 + 1 + 2 * self.nmax + 1) + 7) // 8

    def encode(self, x, rng=None) -> Payload:
        if self.backend == "numba":
            return self._nb_encode(x, rng)
        x = self._check_input(x)
        u = draw_uniform32(self.xp, rng, self.d)
        return self.encode_with(x, u)

    def _nb_encode(self, x, rng):
        nmax_rec = 2 * self.d.bit_length() + 2 * self.nmax + 3  # longest record
        rec = self._buf("rec", (self.d * nmax_rec) // 64 + 2, np.uint64)
        norm_be, recbits, k = self._nb_quantize_pack(x, rng, rec, True)
        words = self._buf("w", self.max_bytes() // 8 + 2, np.uint64)
        nbits = int(_nk.runlength_assemble(rec, recbits, norm_be, k, words))
        return Payload(words.view(np.uint8)[:(nbits + 7) // 8].copy(), nbits)

    def encode_with(self, x, u) -> Payload:
        xp = self.xp
        if self.backend == "numba":
            return self._nb_encode(x, _Given(u))
        norm, zeta, neg = self.quantize(x, u)
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
        return self._emit(norm, codes, lens)

    def decode_levels(self, data):
        xp = self.xp
        data, norm = self._header(data)
        nbytes = int(data.shape[0])
        words = bs.bytes_to_words(xp, data)
        end_avail = 8 * nbytes
        if end_avail < 33:
            raise CodecError(f"{self.name}: payload truncated (no count)")
        win0 = bs.window(xp, words, xp.asarray([32], dtype=xp.int64))
        hn = int(bs.gamma_n(xp, win0)[0])
        if hn > self.d.bit_length() or 32 + 2 * hn + 1 > end_avail:
            raise CodecError(f"{self.name}: impossible count code")
        k = int(bs.gamma_value(xp, win0, xp.asarray([hn]))[0]) - 1
        if k > self.d:
            raise CodecError(f"{self.name}: {k} non-zeros > d={self.d}")
        start = 32 + 2 * hn + 1
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

    def decode(self, data, out=None):
        if self.backend == "numba":
            return self._nb_decode(data, out)
        norm, zeta, neg = self.decode_levels(data)
        return self._into(self.values(norm, zeta, neg), out)

    def _nb_decode(self, data, out=None):
        data, norm = self._header(data)
        nbytes = int(data.shape[0])
        end_avail = 8 * nbytes
        if end_avail < 33:
            raise CodecError(f"{self.name}: payload truncated (no count)")
        head = bs.bytes_to_words(np, data[:16])
        win0 = bs.window(np, head, np.asarray([32], dtype=np.int64))
        hn = int(bs.gamma_n(np, win0)[0])
        if hn > self.d.bit_length() or 32 + 2 * hn + 1 > end_avail:
            raise CodecError(f"{self.name}: impossible count code")
        k = int(bs.gamma_value(np, win0, np.asarray([hn]))[0]) - 1
        if k > self.d:
            raise CodecError(f"{self.name}: {k} non-zeros > d={self.d}")
        start = 32 + 2 * hn + 1
        if end_avail - start < 3 * k:
            raise CodecError(f"{self.name}: payload truncated ({end_avail - start} bits cannot "
                             f"hold {k} records)")
        words = self._nb_words(data)
        tab, nsc = self._table(norm, 1.0)
        out = self._out(out, zero=True)
        err, info, end, zbad, ibad = _nk.runlength_decode(
            words, start, end_avail, k, self.d, self.d.bit_length(), self.nmax, self.s, tab, nsc,
            float(self.s), out)
        self._nb_raise(err, info, k)
        self._finish_bytes(data, int(end))
        if zbad:
            raise CodecError(f"{self.name}: level > s={self.s}")
        if ibad:
            raise CodecError(f"{self.name}: index out of range (>= d={self.d})")
        return out
