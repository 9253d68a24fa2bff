"""numba-CPU backend of the QSGD family (wire formats and quantizer: qprsgd/codecs/qsgd.py): the
Python side of the kernels in ``_nb_qsgd`` -- input checks and draws in the numpy backend's
order, scratch buffers owned by the codec, the thread plan and the merge of the parallel
decoder's segments.  Byte-identical payloads and identical decoded vectors to the numpy backend
(tests/test_codecs_numba.py, tests/test_codecs_parallel.py)."""
from __future__ import annotations

import math

import numpy as np

from . import _bitstream as bs
from . import _nb_core as C
from . import _nb_qsgd as K
from . import _pcg64
from .base import CodecError, Payload
from .qsgd import _Given, draw_uniform32, norm_acc


class QSGDNumba:
    """``qsgd`` / ``qsgd_scaled``: compiled encoder and decoder, on up to ``threads`` threads
    for d >= ``par_min_d`` (the result does not depend on the thread count)."""

    def __init__(self, c):
        self.c = c
        self.d, self.s, self.nmax, self.name = c.d, c.s, c.nmax, c.name
        self._scratch = {}

    def nt(self):
        return self.c.threads if (self.c.threads > 1 and self.d >= self.c.par_min_d) else 1

    def _buf(self, key, n, dtype):
        """A reusable scratch array of >= n elements (the codec owns it; one per thread)."""
        sc = self.c._thread_scratch()
        b = sc.get(key)
        if b is None or b.shape[0] < n:
            b = np.empty(n, dtype=dtype)
            sc[key] = b
        return b

    def prepare(self, x, rng):
        """Input checks, norm and draws for the numba encoders, in the numpy path's order
        (NaN/Inf rejected before drawing; a float32 norm overflow raises after the d draws).
        Returns (x, norm, mode, c, u, pcg_state, bit_generator)."""
        if x.ndim != 1 or x.shape[0] != self.d:
            raise CodecError(f"{self.name}: expected a vector of length d={self.d}, "
                             f"got shape {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        acc = norm_acc(x, use_numba=True)
        if not math.isfinite(acc):  # the sum of squares is finite iff every x_i is
            raise CodecError(f"{self.name}: cannot encode a vector holding NaN or Inf")
        with np.errstate(over="ignore"):
            norm = np.float32(math.sqrt(acc))
        if not math.isfinite(float(norm)):
            draw_uniform32(np, rng, self.d)
            raise CodecError(f"{self.name}: the norm of the input overflows float32")
        state, bg = _pcg64.state_of(rng)
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

    def quantize_pack(self, x, rng, words, runlength):
        x, norm, mode, c, u, state, bg = self.prepare(x, rng)
        norm_be = int.from_bytes(np.float32(norm).astype("<f4").tobytes(), "big")
        nt = self.nt()
        if not runlength and bg is not None and (nt > 1 or self.d >= self.c.par_min_d):
            return norm_be, self.encode_par(x, mode, c, state, bg, norm_be, words, nt), 0
        nbits, k = K.qsgd_quantize_pack(x, u, state, bg is not None, mode, c,
                                          np.float32(self.s), norm_be, words, runlength)
        if bg is not None:
            _pcg64.store(bg, state)
        return norm_be, int(nbits), int(k)

    def encode_par(self, x, mode, c, state, bg, norm_be, words, nt):
        """qsgd_quantize_pack's stream on nt threads (element segments, jumped-ahead PCG64)."""
        d, ch = self.d, C.CHUNK
        bounds = np.array([((d * t // nt) // ch) * ch for t in range(nt)] + [d], dtype=np.int64)
        states = _pcg64.segment_states(state, bounds[:-1])
        per = (np.diff(bounds) * (2 + 2 * self.nmax)) // 64 + 2
        per[0] = 0
        soff = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
        scratch = self._buf("ws", int(soff[-1]) + 1, np.uint64)
        segbits = np.zeros(nt, dtype=np.int64)
        wstate = np.zeros((nt, 3), dtype=np.uint64)
        with C.parallel(nt):
            K.qsgd_encode_par(x, bounds, states, mode, c, np.float32(self.s), norm_be, words,
                                scratch, soff, segbits, wstate)
        nbits = K.qsgd_append(words, scratch, soff, segbits, wstate)
        _pcg64.store(bg, states[-1])
        return int(nbits)

    def _fast(self):
        """The multi-record decode table for (nmax, s), built once per codec."""
        t = self._scratch.get("fast")
        if t is None:
            t = K.qsgd_fast_table(self.nmax, self.s)
            self._scratch["fast"] = t
        return t

    def decode_serial(self, words, end, tab, nsc, out, pos=32, i=0, zbad=False):
        err, info, e, zb = K.qsgd_decode_from(words, pos, i, end, self.d, self.nmax, self.s,
                                                tab, nsc, float(self.s), out, *self._fast())
        return err, info, e, bool(zb) or zbad

    def decode_par(self, words, end, tab, nsc, out, nt):
        """The parallel decoder (see _nb_qsgd): (err, info, end_bit, level_bad) exactly as
        the serial decoder.  Anything unexpected -- no resynchronisation, an error, a count
        mismatch, a level > s after the resynchronisation point -- resumes the serial decoder
        from the last true (record start, index)."""
        d, SK = self.d, K.SPEC_K
        bounds = np.array([32 + ((end - 32) * t) // nt for t in range(nt)] + [end], dtype=np.int64)
        cap = np.minimum(d, np.diff(bounds) // 2 + 2)
        cap[0] = 0
        toff = np.concatenate([[0], np.cumsum(cap)]).astype(np.int64)
        tmp = self._buf("dtmp", int(toff[-1]) + 1, np.float32)
        res = np.zeros((nt, 4), dtype=np.int64)
        starts = np.zeros((nt, SK), dtype=np.int64)
        with C.parallel(nt):
            K.qsgd_decode_par(words, end, d, self.nmax, self.s, tab, nsc, float(self.s), out,
                                tmp, bounds, toff, res, starts, *self._fast())
        n0, p, st0, zl0 = (int(v) for v in res[0])
        if st0 != 0:
            return self.decode_serial(words, end, tab, nsc, out)
        zbad = zl0 >= 0
        i = n0
        if i == d:
            return C.ERR_OK, 0, p, zbad
        for t in range(1, nt):
            n, pe, stt, zl = (int(v) for v in res[t])
            k = min(n, SK)
            j = int(np.searchsorted(starts[t, :k], p))
            if j >= k or int(starts[t, j]) != p:
                # the segment restarted past p, or p lies between its recorded starts: decode
                # true records until the two parses meet
                p, i, j = (int(v) for v in K.qsgd_catchup(
                    words, p, i, end, d, self.nmax, self.s, tab, nsc, float(self.s), out,
                    starts[t], k))
            if j < 0 or zl >= j:
                return self.decode_serial(words, end, tab, nsc, out, p, i, zbad)
            c = n - j
            src = tmp[toff[t] + j:toff[t] + n]
            if t < nt - 1 and (stt != 0 or pe < bounds[t + 1] or i + c > d):
                return self.decode_serial(words, end, tab, nsc, out, p, i, zbad)
            if t == nt - 1 and c != d - i:
                return self.decode_serial(words, end, tab, nsc, out, p, i, zbad)
            with C.parallel(nt):
                K.pcopy(src, out[i:i + c], nt)
            i += c
            p = pe
        return C.ERR_OK, 0, p, zbad

    def _table(self, norm, scale):
        """Decoded magnitudes float32(float64(norm) * scale * zeta / s) for small zeta."""
        nsc = np.float64(norm) * scale
        n = min(self.s + 1, 1 << 16)
        tab = nsc * np.arange(n, dtype=np.float64)
        tab /= self.s
        return tab.astype(np.float32), float(nsc)

    def words(self, data):
        """The payload in a reusable word buffer with >= 3 zero guard words."""
        nbytes = int(data.shape[0])
        nw = nbytes // 8 + 4
        words = self._buf("dw", self.c.max_bytes() // 8 + 4, np.uint64)[:nw]
        b = words.view(np.uint8)
        b[:nbytes] = data
        b[nbytes:] = 0
        return words

    def raise_err(self, err, info, count):
        if err == C.ERR_BADCODE:
            raise CodecError(f"{self.name}: impossible code length at bit {info}")
        if err == C.ERR_PASTEND:
            raise CodecError(f"{self.name}: payload truncated (record at bit {info} "
                             "runs past the end)")
        if err == C.ERR_SHORT:
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

    def encode(self, x, rng):
        words = self._buf("w", self.c.max_bytes() // 8 + 2, np.uint64)
        _, nbits, _ = self.quantize_pack(x, rng, words, False)
        return Payload(words.view(np.uint8)[:(nbits + 7) // 8].copy(), nbits)

    def encode_with(self, x, u):
        return self.encode(x, _Given(u))

    def decode(self, data, out=None):
        data, norm = self.c._header(data)
        nbytes = int(data.shape[0])
        span = 8 * nbytes - 32
        if span < 2 * self.d:
            raise CodecError(f"{self.name}: payload truncated ({span} bits cannot hold "
                             f"{self.d} records)")
        words = self.words(data)
        tab, nsc = self._table(norm, self.c.scale)
        out = self.c._out(out)
        nt = self.nt()
        if nt > 1:
            err, info, end, zbad = self.decode_par(words, 8 * nbytes, tab, nsc, out, nt)
        else:
            err, info, end, zbad = self.decode_serial(words, 8 * nbytes, tab, nsc, out)
        self.raise_err(err, info, self.d)
        self._finish_bytes(data, int(end))
        if zbad:
            raise CodecError(f"{self.name}: level > s={self.s}")
        return out


class RunLengthNumba(QSGDNumba):
    """``qsgd_runlength``: one thread (the gap of each record depends on the previous non-zero)."""

    def nt(self):
        return 1

    def encode(self, x, rng):
        nmax_rec = 2 * self.d.bit_length() + 2 * self.nmax + 3  # longest record
        rec = self._buf("rec", (self.d * nmax_rec) // 64 + 2, np.uint64)
        norm_be, recbits, k = self.quantize_pack(x, rng, rec, True)
        words = self._buf("w", self.c.max_bytes() // 8 + 2, np.uint64)
        d_be = int.from_bytes(np.uint32(self.d).astype("<u4").tobytes(), "big")
        nbits = int(K.runlength_assemble(rec, recbits, norm_be, d_be, k, words))
        return Payload(words.view(np.uint8)[:(nbits + 7) // 8].copy(), nbits)

    def encode_with(self, x, u):
        return self.encode(x, _Given(u))

    def decode(self, data, out=None):
        data, norm = self.c._header(data)
        nbytes = int(data.shape[0])
        end_avail = 8 * nbytes
        if end_avail < 65:
            raise CodecError(f"{self.name}: payload truncated (no count)")
        head = bs.bytes_to_words(np, data[:24])
        win0 = bs.window(np, head, np.asarray([64], dtype=np.int64))
        hn = int(bs.gamma_n(np, win0)[0])
        if hn > self.d.bit_length() or 64 + 2 * hn + 1 > end_avail:
            raise CodecError(f"{self.name}: impossible count code")
        k = int(bs.gamma_value(np, win0, np.asarray([hn]))[0]) - 1
        if k > self.d:
            raise CodecError(f"{self.name}: {k} non-zeros > d={self.d}")
        start = 64 + 2 * hn + 1
        if end_avail - start < 3 * k:
            raise CodecError(f"{self.name}: payload truncated ({end_avail - start} bits cannot "
                             f"hold {k} records)")
        words = self.words(data)
        tab, nsc = self._table(norm, 1.0)
        out = self.c._out(out, zero=True)
        err, info, end, zbad, ibad = K.runlength_decode(
            words, start, end_avail, k, self.d, self.d.bit_length(), self.nmax, self.s, tab, nsc,
            float(self.s), out)
        self.raise_err(err, info, k)
        self._finish_bytes(data, int(end))
        if zbad:
            raise CodecError(f"{self.name}: level > s={self.s}")
        if ibad:
            raise CodecError(f"{self.name}: index out of range (>= d={self.d})")
        return out
