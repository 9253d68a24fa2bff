"""Compiled (numba) kernels for the sequential hot paths of the codecs.

The numpy kernels in ``_bitstream.py`` stay the reference and the fallback (no numba, or
``xp`` = cupy).  These kernels produce *byte-identical* payloads and *identical* decoded vectors
(tested in tests/test_codecs_numba.py); they exist because the Elias-gamma stream is sequential
and the vectorized parse needs dozens of passes (docs/codecs.md has the measurements).

Selection: ``enabled()`` is True when numba imports, the environment variable
``QPRSGD_NO_NUMBA`` is not ``1`` and the module switch ``USE_NUMBA`` is True.  A codec reads it
once at construction (attribute ``backend``: ``"numba"`` or ``"numpy"``), so tests can build one
codec of each kind side by side.

Bit layout (as in ``_bitstream``): the payload is written as 64-bit words whose big-endian bytes
are the wire bytes; a writer keeps ``acc`` (bits left-aligned) and ``fill`` (bits used), a field
of ``L`` <= 64 bits is or-ed in and full words are stored byte-swapped, so ``words.view(uint8)``
is the wire.  Readers keep the current and next word and the bit offset in the current one.

Random draws: for a ``numpy.random.Generator`` over ``PCG64`` the QSGD encoders generate the
uniforms inline with the *same* algorithm numpy uses (PCG64 XSL-RR step, the 64-bit output
split into two 32-bit halves low half first, ``(u32 >> 8) * 2**-24``), then write the generator
state back, so ``rng.random(d, dtype=np.float32)`` is reproduced bit for bit without the 40 MB
array (tested against numpy, also with a buffered half-word).  Other bit generators draw with
``rng.random(out=scratch, dtype=np.float32)`` and the kernel reads the array.

Error codes returned by the decoders (the Python wrappers raise ``CodecError`` with the numpy
path's messages): see ``ERR_*``.  Every kernel is bounded by the payload length and ``d``: a
decoder advances at least 2 bits per record and stops at the first error, so it cannot hang.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
    HAVE_NUMBA = True
except Exception:  # pragma: no cover - numba is an install requirement; numpy is the fallback
    numba = None
    HAVE_NUMBA = False

USE_NUMBA = os.environ.get("QPRSGD_NO_NUMBA", "") != "1"

# numba's threading layer: ``workqueue`` unless the user names one (env NUMBA_THREADING_LAYER).
# The default choice on these wheels is OpenMP, and launching an OpenMP region from the main
# thread sets the process's OpenMP thread count, which torch's intra-op pool shares: after the
# first codec call a rank configured with ``run.threads: 1`` computed on all cores' worth of
# threads (torch.get_num_threads() went 1 -> 2), and 8 ranks on 2 cores computed 20x slower.
# workqueue is numba's own pool (no OpenMP state) and was as fast here for these one-segment-per-
# thread kernels (qsgd B* 10.0 vs 9.8 Gb/s, block_sign 110 vs 128 Gb/s, 2 threads, noise-level).
if HAVE_NUMBA and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

ERR_OK = 0
ERR_BADCODE = 1      # impossible code length (leading-zero run too long) at bit info
ERR_PASTEND = 2      # record at bit info runs past the end
ERR_SHORT = 3        # stream ended after info records

PCG_MULT_HI = 2549297995355413924
PCG_MULT_LO = 4865540595714422341


def enabled() -> bool:
    """True when the numba kernels are used for numpy-array codecs."""
    return HAVE_NUMBA and USE_NUMBA and os.environ.get("QPRSGD_NO_NUMBA", "") != "1"


def pcg64_state(rng):
    """(uint64[6] state array, bit generator) for a PCG64-driven Generator, else (None, None).

    Layout: [state_hi, state_lo, inc_hi, inc_lo, has_uint32, uinteger]."""
    if not isinstance(rng, np.random.Generator):
        return None, None
    bg = rng.bit_generator
    if type(bg) is not np.random.PCG64:
        return None, None
    st = bg.state
    s, inc = int(st["state"]["state"]), int(st["state"]["inc"])
    m = (1 << 64) - 1
    arr = np.array([s >> 64, s & m, inc >> 64, inc & m, int(st["has_uint32"]),
                    int(st["uinteger"])], dtype=np.uint64)
    return arr, bg


def pcg64_store(bg, arr):
    """Write the state array back into the bit generator."""
    st = bg.state
    st["state"]["state"] = (int(arr[0]) << 64) | int(arr[1])
    st["has_uint32"] = int(arr[4])
    st["uinteger"] = int(arr[5])
    bg.state = st


if HAVE_NUMBA:
    _u64 = types.uint64

    @intrinsic
    def _clz(typingctx, x):
        """Leading zeros of a uint64 (64 for 0)."""
        sig = _u64(_u64)

        def codegen(context, builder, signature, args):
            return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

        return sig, codegen

    @intrinsic
    def _bswap(typingctx, x):
        sig = _u64(_u64)

        def codegen(context, builder, signature, args):
            return builder.bswap(args[0])

        return sig, codegen

    @intrinsic
    def _bswap32(typingctx, x):
        sig = types.uint32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bswap(args[0])

        return sig, codegen

    @intrinsic
    def _mulhi(typingctx, a, b):
        """High 64 bits of the 128-bit product of two uint64."""
        sig = _u64(_u64, _u64)

        def codegen(context, builder, signature, args):
            i128 = ir.IntType(128)
            p = builder.mul(builder.zext(args[0], i128), builder.zext(args[1], i128))
            return builder.trunc(builder.lshr(p, ir.Constant(i128, 64)), ir.IntType(64))

        return sig, codegen

    def _make_lanes8(square):
        @intrinsic
        def lanes8(typingctx, x, start, nrows, acc):
            """acc[j] += f(float64(x[start + 8 r + j])) for r = 0..nrows-1, lane j in order of r
            (f = |.| or the square): one <8 x double> accumulator, i.e. exactly the IEEE
            operations, in the same order per lane, of 8 scalar accumulators (no reassociation,
            no fused multiply-add) -- numba does not vectorize the scalar form (SLP is off).
            x: contiguous float32; acc: 8 contiguous float64."""
            sig = types.void(x, types.int64, types.int64, acc)

            def codegen(context, builder, signature, args):
                xa = context.make_array(signature.args[0])(context, builder, args[0])
                aa = context.make_array(signature.args[3])(context, builder, args[3])
                v8f = ir.VectorType(ir.FloatType(), 8)
                v8i = ir.VectorType(ir.IntType(32), 8)
                v8d = ir.VectorType(ir.DoubleType(), 8)
                basev = builder.bitcast(builder.gep(xa.data, [args[1]]), v8f.as_pointer())
                accp = builder.bitcast(aa.data, v8d.as_pointer())
                slot = cgutils.alloca_once(builder, v8d)
                builder.store(builder.load(accp, align=8), slot)
                mask = ir.Constant(v8i, [0x7FFFFFFF] * 8)
                with cgutils.for_range(builder, args[2]) as loop:
                    v = builder.load(builder.gep(basev, [loop.index]), align=4)
                    if square:
                        w = builder.fpext(v, v8d)
                        w = builder.fmul(w, w)
                    else:
                        a = builder.bitcast(builder.and_(builder.bitcast(v, v8i), mask), v8f)
                        w = builder.fpext(a, v8d)
                    builder.store(builder.fadd(builder.load(slot), w), slot)
                builder.store(builder.load(slot), accp, align=8)
                return context.get_dummy_value()

            return sig, codegen
        return lanes8

    _lanes8_abs = _make_lanes8(False)
    _lanes8_sq = _make_lanes8(True)

    @intrinsic
    def _signbyte(typingctx, x, i):
        """MSB-first byte of the bits (x[i + t] < 0), t = 0..7 (x contiguous float32)."""
        sig = types.uint8(x, types.int64)

        def codegen(context, builder, signature, args):
            xa = context.make_array(signature.args[0])(context, builder, args[0])
            v8f = ir.VectorType(ir.FloatType(), 8)
            p = builder.bitcast(builder.gep(xa.data, [args[1]]), v8f.as_pointer())
            v = builder.load(p, align=4)
            m = builder.fcmp_ordered("<", v, ir.Constant(v8f, [0.0] * 8))
            b = builder.bitcast(m, ir.IntType(8))          # bit t = lane t
            rev = builder.module.declare_intrinsic("llvm.bitreverse", [ir.IntType(8)])
            return builder.call(rev, [b])                   # lane 0 -> MSB

        return sig, codegen

    @intrinsic
    def _expand8(typingctx, out, i, byte, sc):
        """out[i + t] = sc | (bit t of ``byte``, MSB first) << 31 for t = 0..7 (out contiguous
        uint32)."""
        sig = types.void(out, types.int64, types.uint8, types.uint32)

        def codegen(context, builder, signature, args):
            oa = context.make_array(signature.args[0])(context, builder, args[0])
            v8i = ir.VectorType(ir.IntType(32), 8)
            i1x8 = ir.VectorType(ir.IntType(1), 8)
            rev = builder.module.declare_intrinsic("llvm.bitreverse", [ir.IntType(8)])
            bits = builder.bitcast(builder.call(rev, [args[2]]), i1x8)   # lane t = bit 7 - t
            w = builder.shl(builder.zext(bits, v8i), ir.Constant(v8i, [31] * 8))
            scv = builder.insert_element(ir.Constant(v8i, ir.Undefined), args[3],
                                         ir.Constant(ir.IntType(32), 0))
            scv = builder.shuffle_vector(scv, ir.Constant(v8i, ir.Undefined),
                                         ir.Constant(v8i, [0] * 8))
            p = builder.bitcast(builder.gep(oa.data, [args[1]]), v8i.as_pointer())
            builder.store(builder.or_(w, scv), p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    njit = numba.njit(cache=True, nogil=True, error_model="numpy")
    U0 = np.uint64(0)
    U1 = np.uint64(1)
    U8 = np.uint64(8)
    U32 = np.uint64(32)
    U58 = np.uint64(58)
    U63 = np.uint64(63)
    U64 = np.uint64(64)
    MHI = np.uint64(PCG_MULT_HI)
    MLO = np.uint64(PCG_MULT_LO)
    INV24 = np.float32(1.0 / 16777216.0)

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _pcg_next64(hi, lo, ihi, ilo):
        """One PCG64 step (state <- state * M + inc, 128-bit) and its XSL-RR output."""
        t = lo * MLO
        nlo = t + ilo
        carry = U1 if nlo < t else U0
        nhi = _mulhi(lo, MLO) + lo * MHI + hi * MLO + ihi + carry
        v = nhi ^ nlo
        r = nhi >> U58
        out = (v >> r) | (v << ((U64 - r) & U63))
        return nhi, nlo, out

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _put32(out32, j, acc, fill, code, ln):
        """Append ``code`` of ``ln`` <= 32 bits (fill < 32 on entry and exit), branch-free: the
        top 32 bits of ``acc`` are always stored at out32[j] (big-endian), and j advances once
        they are complete.  Returns (j, acc, fill)."""
        acc |= code << (U64 - fill - ln)
        fill += ln
        out32[j] = _bswap32(np.uint32(acc >> U32))
        f = fill >> np.uint64(5)
        j += np.int64(f)
        acc <<= f << np.uint64(5)
        fill -= f << np.uint64(5)
        return j, acc, fill

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _put(out32, j, acc, fill, code, ln):
        """Append ``code`` of ``ln`` (1..64) bits; returns (j, acc, fill)."""
        if ln > U32:
            j, acc, fill = _put32(out32, j, acc, fill, code >> U32, ln - U32)
            return _put32(out32, j, acc, fill, code & np.uint64(0xFFFFFFFF), U32)
        return _put32(out32, j, acc, fill, code, ln)

    @njit
    def pcg64_fill_f32(state, out):
        """out[:] = rng.random(n, dtype=float32) for the PCG64 state array (updated in place);
        used by the tests to prove the inline generator equals numpy's."""
        hi, lo, ihi, ilo = state[0], state[1], state[2], state[3]
        has = state[4]
        buf = state[5]
        for i in range(out.shape[0]):
            if has != U0:
                w = buf
                has = U0
            else:
                hi, lo, r = _pcg_next64(hi, lo, ihi, ilo)
                w = r & np.uint64(0xFFFFFFFF)
                buf = r >> U32
                has = U1
            out[i] = np.float32(np.int64(w >> U8)) * INV24
        state[0] = hi
        state[1] = lo
        state[4] = has
        state[5] = buf

    CHUNK = 2048  # elements per L1-resident piece of the encoder

    @njit
    def _pcg_chunk(hi, lo, ihi, ilo, has, buf, u, n):
        """u[:n] = the next n float32 uniforms (numpy's Generator.random(dtype=float32))."""
        for t in range(n):
            if has != U0:
                w = buf
                has = U0
            else:
                hi, lo, r64 = _pcg_next64(hi, lo, ihi, ilo)
                w = r64 & np.uint64(0xFFFFFFFF)
                buf = r64 >> U32
                has = U1
            u[t] = np.float32(np.int64(w >> U8)) * INV24
        return hi, lo, has, buf

    @njit
    def _quantize_chunk(x, u, mode, c, s32, zeta, neg):
        """zeta[t], neg[t] for the chunk (branch-free, vectorizable)."""
        for t in range(x.shape[0]):
            xi = x[t]
            a = abs(xi)
            if mode == 1:
                r = a * c
            else:
                r = (a / c) * s32
            r = min(r, s32)
            lv = np.int64(r)  # r >= 0: truncation is floor
            fr = r - np.float32(lv)
            z = lv + (1 if u[t] < fr else 0)
            zeta[t] = np.uint64(z if mode != 0 else 0)
            neg[t] = U1 if xi < np.float32(0) else U0

    @njit
    def qsgd_quantize_pack(x, u, state, use_pcg, mode, c, s32, norm_be, words, runlength):
        """Quantize (docs/codecs.md, qsgd) and pack, in L1-sized chunks: draws (inline PCG64
        when ``use_pcg``, else ``u``), quantization, then the bit writer.

        mode 0: norm == 0 (every level 0, the d draws are still made); 1: r = |x| * c;
        2: r = (|x| / c) * s32 (c is then the norm).  ``runlength`` False: the qsgd stream
        (norm, then sign + gamma(zeta + 1) per element), returns (nbits, 0).  True: only the
        records gamma(i - prev), sign, gamma(zeta) of the non-zero levels, from bit 0, returns
        (record bits, k)."""
        d = x.shape[0]
        hi, lo, ihi, ilo = state[0], state[1], state[2], state[3]
        has = state[4]
        buf = state[5]
        ub = np.empty(CHUNK, dtype=np.float32)
        zeta = np.empty(CHUNK, dtype=np.uint64)
        neg = np.empty(CHUNK, dtype=np.uint64)
        out32 = words.view(np.uint32)
        wi = 0
        acc = U0
        fill = U0
        if not runlength:
            wi, acc, fill = _put32(out32, wi, acc, fill, np.uint64(norm_be), U32)
        total = U0
        k = 0
        prev = -1
        for c0 in range(0, d, CHUNK):
            n = min(CHUNK, d - c0)
            if use_pcg:
                hi, lo, has, buf = _pcg_chunk(hi, lo, ihi, ilo, has, buf, ub, n)
                uc = ub[:n]
            else:
                uc = u[c0:c0 + n]
            _quantize_chunk(x[c0:c0 + n], uc, mode, c, s32, zeta, neg)
            if not runlength:
                for t in range(n):
                    kk = zeta[t] + U1
                    nn = U63 - _clz(kk)
                    ln = nn + nn + np.uint64(2)
                    wi, acc, fill = _put(out32, wi, acc, fill, kk | (neg[t] << (ln - U1)), ln)
                    total += ln
            else:
                for t in range(n):
                    z = zeta[t]
                    if z != U0:
                        i = c0 + t
                        g = np.uint64(i - prev)
                        prev = i
                        k += 1
                        n1 = U63 - _clz(g)
                        l1 = n1 + n1 + U1
                        wi, acc, fill = _put(out32, wi, acc, fill, g, l1)
                        n2 = U63 - _clz(z)
                        l2 = n2 + n2 + np.uint64(2)
                        wi, acc, fill = _put(out32, wi, acc, fill, z | (neg[t] << (l2 - U1)), l2)
                        total += l1 + l2
        out32[wi] = _bswap32(np.uint32(acc >> U32))  # the partial last word (zero padded)
        state[0] = hi
        state[1] = lo
        state[4] = has
        state[5] = buf
        if runlength:
            return np.int64(total), k
        return np.int64(total) + 32, k

    @njit
    def runlength_assemble(rec, recbits, norm_be, k, words):
        """norm (32 bits), gamma(k + 1), then ``recbits`` bits of ``rec`` (wire words)."""
        out32 = words.view(np.uint32)
        rec32 = rec.view(np.uint32)
        j = 0
        acc = U0
        fill = U0
        j, acc, fill = _put32(out32, j, acc, fill, np.uint64(norm_be), U32)
        kk = np.uint64(k + 1)
        n = U63 - _clz(kk)
        j, acc, fill = _put(out32, j, acc, fill, kk, n + n + U1)
        nfull = recbits // 32
        for t in range(nfull):
            j, acc, fill = _put32(out32, j, acc, fill, np.uint64(_bswap32(rec32[t])), U32)
        rem = np.uint64(recbits - 32 * nfull)
        if rem != U0:
            j, acc, fill = _put32(out32, j, acc, fill,
                                  np.uint64(_bswap32(rec32[nfull])) >> (U32 - rem), rem)
        out32[j] = _bswap32(np.uint32(acc >> U32))
        return 32 + 2 * np.int64(n) + 1 + recbits

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _window(cur, nxt, off):
        # 64 stream bits at bit ``off`` of ``cur`` (off in 0..63), followed by ``nxt``
        return (cur << off) | ((nxt >> U1) >> (U63 - off))

    @njit
    def qsgd_decode(words, end, d, nmax, s, tab, nsc, sd, out):
        """Parse d records sign + gamma(zeta + 1) from bit 32 of the wire words (byte-swapped on
        load; ``words`` has >= 2 zero guard words).  Writes ±value into out (``tab[zeta]`` when
        zeta < len(tab), else float32(nsc * zeta / sd)).  Returns (err, info, end_bit, level_bad)."""
        pos = 32
        cur = _bswap(words[0])
        nxt = _bswap(words[1])
        wi = 2
        off = U32
        zbad = False
        ntab = tab.shape[0]
        su = np.uint64(s)
        nm = np.uint64(nmax)
        for i in range(d):
            if pos >= end:
                return ERR_SHORT, i, pos, zbad
            win = _window(cur, nxt, off)
            body = win << U1
            n = _clz(body)
            if n > nm:
                return ERR_BADCODE, pos, pos, zbad
            ln = n + n + np.uint64(2)
            if pos + np.int64(ln) > end:
                return ERR_PASTEND, pos, pos, zbad
            zeta = (body >> (U63 - n - n)) - U1
            if zeta > su:
                zbad = True
                v = np.float32(0)
            elif zeta < np.uint64(ntab):
                v = tab[zeta]
            else:
                v = np.float32((nsc * np.float64(zeta)) / sd)
            out[i] = -v if (win >> U63) != U0 else v
            pos += np.int64(ln)
            off += ln
            if off >= U64:
                off -= U64
                cur = nxt
                nxt = _bswap(words[wi])
                wi += 1
        return ERR_OK, 0, pos, zbad

    @njit
    def runlength_decode(words, start, end, k, d, nd, nmax, s, tab, nsc, sd, out):
        """Parse k records gamma(i - prev), sign, gamma(zeta) from bit ``start``; out must be
        zero.  Returns (err, info, end_bit, level_bad, index_bad)."""
        pos = start
        wi = start // 64
        cur = _bswap(words[wi])
        nxt = _bswap(words[wi + 1])
        wi += 2
        off = np.uint64(start % 64)
        zbad = False
        ibad = False
        idx = -1
        ntab = tab.shape[0]
        su = np.uint64(s)
        nm = np.uint64(nmax)
        ndm = np.uint64(min(nd, 31))
        for j in range(k):
            if pos >= end:
                return ERR_SHORT, j, pos, zbad, ibad
            win = _window(cur, nxt, off)
            n1 = _clz(win)
            if n1 > ndm:
                return ERR_BADCODE, pos, pos, zbad, ibad
            l1 = n1 + n1 + U1
            gap = win >> (U64 - l1)
            # second window: the sign bit and gamma(zeta), l1 bits further
            o2 = off + l1
            if o2 >= U64:
                w2 = _window(nxt, _bswap(words[wi]), o2 - U64)
            else:
                w2 = _window(cur, nxt, o2)
            body = w2 << U1
            n2 = _clz(body)
            if n2 > nm:
                return ERR_BADCODE, pos, pos, zbad, ibad
            l2 = n2 + n2 + np.uint64(2)
            ln = l1 + l2
            if pos + np.int64(ln) > end:
                return ERR_PASTEND, pos, pos, zbad, ibad
            zeta = body >> (U63 - n2 - n2)
            idx += np.int64(gap)
            if zeta > su:
                zbad = True
            elif idx >= d:
                ibad = True
            else:
                if zeta < np.uint64(ntab):
                    v = tab[zeta]
                else:
                    v = np.float32((nsc * np.float64(zeta)) / sd)
                out[idx] = -v if (w2 >> U63) != U0 else v
            pos += np.int64(ln)
            off += ln
            while off >= U64:
                off -= U64
                cur = nxt
                nxt = _bswap(words[wi])
                wi += 1
        return ERR_OK, 0, pos, zbad, ibad

    @njit
    def sumsq8(x, acc):
        """acc[j] += float64(x[i])**2 for i = j mod 8, sequentially in i (8 accumulators); the
        numpy path computes the same sums with add.accumulate along axis 0 (see qsgd.norm_acc).
        x contiguous."""
        d = x.shape[0]
        n8 = d - d % 8
        _lanes8_sq(x, 0, n8 // 8, acc)
        for i in range(n8, d):
            v = np.float64(x[i])
            acc[i - n8] += v * v

    @njit
    def abssum8(x, acc):
        """acc[j] += |float64(x[i])| for i = j mod 8, sequentially in i (as sumsq8, with |.|)."""
        d = x.shape[0]
        n8 = d - d % 8
        _lanes8_abs(x, 0, n8 // 8, acc)
        for i in range(n8, d):
            acc[i - n8] += abs(np.float64(x[i]))

    @njit
    def sign_pack(x, out):
        """out[j] = MSB-first bits (x[8j + t] < 0); returns False if x holds NaN/Inf."""
        d = x.shape[0]
        nfull = d // 8
        z = np.float32(0)  # becomes NaN iff some x is NaN or Inf (x * 0)
        for j in range(nfull):
            b = 0
            base = 8 * j
            for t in range(8):
                xi = x[base + t]
                z += xi * np.float32(0)
                b = (b << 1) | (1 if xi < np.float32(0) else 0)
            out[j] = b
        if d % 8:
            b = 0
            for t in range(8):
                i = 8 * nfull + t
                bit = 0
                if i < d:
                    xi = x[i]
                    z += xi * np.float32(0)
                    bit = 1 if xi < np.float32(0) else 0
                b = (b << 1) | bit
            out[nfull] = b
        return z == np.float32(0)

    @njit
    def sign_unpack(bits, offsets, scales_u32, out_u32):
        """out bits = scale bits of the element's block | sign bit << 31."""
        nb = offsets.shape[0] - 1
        for b in range(nb):
            sc = scales_u32[b]
            for i in range(offsets[b], offsets[b + 1]):
                bit = (np.uint32(bits[i >> 3]) >> np.uint32(7 - (i & 7))) & np.uint32(1)
                out_u32[i] = sc | (bit << np.uint32(31))


# --------------------------------------------------------------------------------------------
# Multi-threaded kernels (numba ``parallel=True``, one ``prange`` iteration per segment).
#
# Every kernel below produces exactly the bytes / values of the single-thread kernels above,
# whatever the thread count: the work is split into segments whose results do not depend on how
# many threads run them, and the segments are combined in a fixed order.
#   * block_sign: the L1 norm of a block is summed by ONE thread in the order of ``abssum8``
#     (threads own whole blocks; a single block -- the ``sign`` codec -- is one thread's job);
#     sign bits and the decode expansion are split into byte-aligned element ranges.
#   * qsgd encode: segment t starts the PCG64 stream at its first element's draw (the state is
#     jumped ahead with the LCG's O(log n) advance, ``pcg64_segment_states``), writes its own
#     bitstream from bit 0, and the segments' bitstreams are concatenated in order.
#   * qsgd decode: segment 0 parses from bit 32; segment t >= 1 parses speculatively from the
#     middle of the stream (restarting one bit later after an impossible code while it has not
#     yet recorded ``SPEC_K`` record starts) into scratch.  Segment 0's parse ends at the first
#     true record start p >= its stop bit; if p is one of segment 1's recorded starts, segment
#     1's records from there on are the true ones (the stream is deterministic from a record
#     start) and are copied into place; otherwise -- or on any error, count mismatch or level >
#     s -- the serial decoder resumes from the last true (position, index) and reports exactly
#     what the single-thread decoder reports.
# --------------------------------------------------------------------------------------------

# Every call of a ``parallel=True`` kernel holds this lock: numba's workqueue threading layer
# (the fallback when neither TBB nor OpenMP loads) aborts the process on concurrent launches,
# and a codec may be used from several Python threads at once.
PAR_LOCK = threading.Lock()


@contextlib.contextmanager
def parallel(nt: int):
    """Hold :data:`PAR_LOCK` and run the ``parallel=True`` kernels called inside on ``nt`` threads.

    Without the ``set_num_threads``, a region launches numba's whole pool (``NUMBA_NUM_THREADS``,
    the machine's core count) whatever ``prange`` covers, and with the OpenMP layer the idle pool
    threads busy-wait after the region: with 8 ranks on 2 cores and one codec thread each, that
    made every rank's torch compute 20x slower (0.15 s vs 0.007 s per step, R3's MLP).  A
    one-thread region wakes no pool thread.  ``set_num_threads`` is per calling thread, and the
    previous value is restored."""
    with PAR_LOCK:
        prev = numba.get_num_threads()
        numba.set_num_threads(max(1, min(int(nt), numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            numba.set_num_threads(prev)

_M128 = (1 << 128) - 1
_M64 = (1 << 64) - 1
PCG_MULT = (PCG_MULT_HI << 64) | PCG_MULT_LO


def threads() -> int:
    """Codec threads: env ``QPRSGD_CODEC_THREADS`` (default 2), at least 1.  Under mpiexec with
    several ranks per node, these threads compete with the ranks for cores (docs/codecs.md)."""
    v = os.environ.get("QPRSGD_CODEC_THREADS", "2")
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"QPRSGD_CODEC_THREADS must be an integer, got {v!r}") from None
    if n < 1:
        raise ValueError(f"QPRSGD_CODEC_THREADS must be >= 1, got {n}")
    return n


def _lcg_advance(state: int, inc: int, n: int) -> int:
    """state after n steps of state <- state * PCG_MULT + inc (mod 2**128), in O(log n)."""
    am, ap, cm, cp = 1, 0, PCG_MULT, inc
    while n:
        if n & 1:
            am = (am * cm) & _M128
            ap = (ap * cm + cp) & _M128
        cp = ((cm + 1) * cp) & _M128
        cm = (cm * cm) & _M128
        n >>= 1
    return (am * state + ap) & _M128


def _xsl_rr(state: int) -> int:
    v = ((state >> 64) ^ state) & _M64
    r = state >> 122
    return ((v >> r) | (v << ((64 - r) & 63))) & _M64


def pcg64_segment_states(state, starts):
    """Per-segment PCG64 state rows (layout of :func:`pcg64_state`) for float32 draws: row t is
    the generator as it stands before draw number ``starts[t]`` of ``rng.random(n, float32)``."""
    s0 = (int(state[0]) << 64) | int(state[1])
    inc = (int(state[2]) << 64) | int(state[3])
    has, buf = int(state[4]), int(state[5])
    out = np.zeros((len(starts), 6), dtype=np.uint64)
    for t, e in enumerate(starts):
        e = int(e)
        if e == 0:
            st, h, b = s0, has, buf
        else:
            m = e - 1 if has else e     # draws served by fresh 64-bit outputs before element e
            q, odd = divmod(m, 2)
            if odd:                     # the low half of output q was used: its high half waits
                st = _lcg_advance(s0, inc, q + 1)
                h, b = 1, _xsl_rr(st) >> 32
            else:
                st = _lcg_advance(s0, inc, q)
                h, b = 0, 0
        out[t] = [st >> 64, st & _M64, state[2], state[3], h, b]
    return out


if HAVE_NUMBA:
    pjit = numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
    SPEC_K = 1024   # record starts a speculative decode segment remembers


    # ---- block_sign / sign ------------------------------------------------------------------
    @njit
    def _abs_acc(x, p, q, ph, acc):
        """acc[(ph + i - p) % 8] += |float64(x[i])| for i in p..q-1, sequentially in i (the
        order of ``abssum8`` when ph is the phase of p relative to its block start)."""
        i = p
        while i < q and (ph + i - p) % 8 != 0:
            acc[(ph + i - p) % 8] += abs(np.float64(x[i]))
            i += 1
        n8 = i + ((q - i) // 8) * 8
        _lanes8_abs(x, i, (q - i) // 8, acc)
        for k in range(n8, q):
            acc[k - n8] += abs(np.float64(x[k]))

    @njit
    def _pack_bytes(x, j0, j1, out):
        """out[j] = MSB-first bits (x[8j + t] < 0) for the full bytes j0..j1-1."""
        for j in range(j0, j1):
            out[j] = _signbyte(x, 8 * j)

    SIGN_CHUNK = 1 << 14   # elements per L2-resident piece: L1 sum, then sign bits, same pass

    @pjit
    def block_sign_encode(x, offsets, tb, acc8, sums, out):
        """Per-block L1 sums (float64 in the order of ``abssum8``: ``sums[b]``) and the packed
        sign bits of x (``out``, MSB-first), in one pass over memory: x is walked in global
        pieces of SIGN_CHUNK elements; each piece is added to its blocks' 8 accumulators
        (``acc8[b]``) and then packed while it is in cache.  Thread t owns blocks
        tb[t]..tb[t+1]-1 (a block is summed by one thread, sequentially) and packs the bytes that
        lie wholly inside its element range; the bytes that straddle two threads' ranges and the
        zero-padded last byte are packed afterwards.  Returns False when a sum is not finite."""
        nt = tb.shape[0] - 1
        for t in numba.prange(nt):
            _block_sign_task(t, x, offsets, tb, acc8, out)
        return _block_sign_finish(x, offsets, tb, acc8, sums, out)

    @njit
    def _block_sign_task(t, x, offsets, tb, acc8, out):
        """Thread t's blocks of block_sign_encode."""
        b0, b1 = tb[t], tb[t + 1]
        if b0 < b1:
            lo, hi = offsets[b0], offsets[b1]
            for b in range(b0, b1):
                acc8[b, :] = 0.0
            b = b0
            c0 = (lo // SIGN_CHUNK) * SIGN_CHUNK
            while c0 < hi:
                c1 = c0 + SIGN_CHUNK
                p = max(c0, lo)
                q = min(c1, hi)
                while p < q:
                    while offsets[b + 1] <= p:
                        b += 1
                    e = min(q, offsets[b + 1])
                    _abs_acc(x, p, e, (p - offsets[b]) % 8, acc8[b])
                    p = e
                _pack_bytes(x, (max(c0, lo) + 7) // 8, q // 8, out)
                c0 = c1

    @njit
    def _block_sign_finish(x, offsets, tb, acc8, sums, out):
        """block_sign_encode's serial tail (kept out of the parallel function)."""
        d = x.shape[0]
        nt = tb.shape[0] - 1
        nb = offsets.shape[0] - 1
        # bytes straddling a thread boundary, and the padded last byte
        for t in range(1, nt):
            p = offsets[tb[t]]
            if p % 8 != 0 and p < d:
                j = p // 8
                v = 0
                for k in range(8):
                    i = 8 * j + k
                    v = (v << 1) | (1 if i < d and x[i] < np.float32(0) else 0)
                out[j] = v
        if d % 8:
            j = d // 8
            v = 0
            for k in range(8):
                i = 8 * j + k
                v = (v << 1) | (1 if i < d and x[i] < np.float32(0) else 0)
            out[j] = v
        ok = True
        for b in range(nb):
            a = acc8[b]
            s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
            sums[b] = s
            if not np.isfinite(s):
                ok = False
        return ok

    @pjit
    def block_sign_decode(bits, offsets, scales_u32, bounds, out_u32):
        """out bits = scale bits of the element's block | sign bit << 31; thread t writes the
        elements bounds[t]..bounds[t+1]-1 (bounds are multiples of 8 except the last = d)."""
        nt = bounds.shape[0] - 1
        for t in numba.prange(nt):
            p, q = bounds[t], bounds[t + 1]
            if p >= q:
                continue
            b = np.searchsorted(offsets, p, side="right") - 1
            while p < q:
                e = min(q, offsets[b + 1])
                sc = scales_u32[b]
                i = p
                while i < e and (i & 7) != 0:
                    bit = (np.uint32(bits[i >> 3]) >> np.uint32(7 - (i & 7))) & np.uint32(1)
                    out_u32[i] = sc | (bit << np.uint32(31))
                    i += 1
                for j in range(i >> 3, e >> 3):
                    _expand8(out_u32, 8 * j, bits[j], sc)
                i = max(i, (e >> 3) << 3)
                while i < e:
                    bit = (np.uint32(bits[i >> 3]) >> np.uint32(7 - (i & 7))) & np.uint32(1)
                    out_u32[i] = sc | (bit << np.uint32(31))
                    i += 1
                p = e
                b += 1

    # ---- qsgd encode ------------------------------------------------------------------------
    @njit
    def _quantize32(x, u, mode, c, s32, zeta, neg):
        """``_quantize_chunk`` into uint32 levels / signs, one loop per mode (vectorizes); the
        same float32 operations, so the same levels (zeta <= float32(s) + 1 < 2**32)."""
        n = x.shape[0]
        if mode == 0:
            for t in range(n):
                zeta[t] = np.uint32(0)
                neg[t] = np.uint32(x[t] < np.float32(0))
        elif mode == 1:
            for t in range(n):
                xi = x[t]
                r = min(abs(xi) * c, s32)
                lv = np.int64(r)
                fr = r - np.float32(lv)
                zeta[t] = np.uint32(lv) + np.uint32(u[t] < fr)
                neg[t] = np.uint32(xi < np.float32(0))
        else:
            for t in range(n):
                xi = x[t]
                r = min((abs(xi) / c) * s32, s32)
                lv = np.int64(r)
                fr = r - np.float32(lv)
                zeta[t] = np.uint32(lv) + np.uint32(u[t] < fr)
                neg[t] = np.uint32(xi < np.float32(0))

    @njit
    def _codes(zeta, neg, n, cs, ls):
        """cs[t], ls[t] = sign + gamma(zeta[t] + 1) code and its length, t < n."""
        for t in range(n):
            kk = np.uint64(zeta[t]) + U1
            nn = U63 - _clz(kk)
            ln = nn + nn + np.uint64(2)
            cs[t] = kk | (np.uint64(neg[t]) << (ln - U1))
            ls[t] = ln

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _gput(out32, wi, acc, fill, g, gl, item, L):
        """Append an item of L (1..64) bits through the 64-bit group register (g, gl): the
        writer is called only when the group is full."""
        if gl + L > U64:
            wi, acc, fill = _put(out32, wi, acc, fill, g, gl)
            return wi, acc, fill, item, L
        if gl == U0:        # L may be 64 only here: no shift by 64
            return wi, acc, fill, item, L
        return wi, acc, fill, (g << L) | item, gl + L

    @njit
    def _qsgd_encode_seg(x, a, b, st, mode, c, s32, out32, wi, acc, fill, ub, zeta, neg, cs, ls):
        """Quantize and pack elements a..b-1 (a multiple of CHUNK) with the inline PCG64 from
        state row ``st`` (updated), appending to the writer (out32, wi, acc, fill).  The codes
        of 8 elements are merged into one item when they fit in 64 bits (almost always at
        s = sqrt(d)), and items go through a 64-bit group register."""
        hi, lo, ihi, ilo = st[0], st[1], st[2], st[3]
        has = st[4]
        buf = st[5]
        total = U0
        g = U0
        gl = U0
        for c0 in range(a, b, CHUNK):
            n = min(CHUNK, b - c0)
            hi, lo, has, buf = _pcg_chunk(hi, lo, ihi, ilo, has, buf, ub, n)
            _quantize32(x[c0:c0 + n], ub[:n], mode, c, s32, zeta, neg)
            _codes(zeta, neg, n, cs, ls)
            n8 = n - n % 8
            for q in range(0, n8, 8):
                L = ls[q] + ls[q + 1] + ls[q + 2] + ls[q + 3] + ls[q + 4] + ls[q + 5] + \
                    ls[q + 6] + ls[q + 7]
                total += L
                if L <= U64:
                    item = U0
                    for k in range(8):
                        item = (item << ls[q + k]) | cs[q + k]
                    wi, acc, fill, g, gl = _gput(out32, wi, acc, fill, g, gl, item, L)
                else:
                    for k in range(8):
                        wi, acc, fill, g, gl = _gput(out32, wi, acc, fill, g, gl, cs[q + k],
                                                     ls[q + k])
            for k in range(n8, n):
                total += ls[k]
                wi, acc, fill, g, gl = _gput(out32, wi, acc, fill, g, gl, cs[k], ls[k])
        if gl != U0:
            wi, acc, fill = _put(out32, wi, acc, fill, g, gl)
        st[0] = hi
        st[1] = lo
        st[4] = has
        st[5] = buf
        return wi, acc, fill, total

    @pjit
    def qsgd_encode_par(x, bounds, states, mode, c, s32, norm_be, words, scratch, soff, segbits,
                        wstate):
        """The qsgd stream of ``qsgd_quantize_pack`` (inline PCG64 draws) with the elements
        split into segments bounds[t]..bounds[t+1]-1 (multiples of CHUNK): segment 0 writes the
        norm and its records into ``words``; segment t >= 1 writes its records from bit 0 of
        ``scratch`` words soff[t]..; :func:`qsgd_append` then appends them in order (writer
        states in ``wstate``).  ``states[t]`` is the generator at the segment's first draw
        (``pcg64_segment_states``); on return row T-1 holds the state after all d draws."""
        nt = bounds.shape[0] - 1
        for t in numba.prange(nt):
            _qsgd_encode_task(t, x, bounds, states, mode, c, s32, norm_be, words, scratch, soff,
                              segbits, wstate)

    @njit
    def _qsgd_encode_task(t, x, bounds, states, mode, c, s32, norm_be, words, scratch, soff,
                          segbits, wstate):
        """Segment t of qsgd_encode_par (a function of its own: numba's parfor lowering
        mishandled the branch-assigned output array when this was inlined in the prange body)."""
        ub = np.empty(CHUNK, dtype=np.float32)
        zeta = np.empty(CHUNK, dtype=np.uint32)
        neg = np.empty(CHUNK, dtype=np.uint32)
        cs = np.empty(CHUNK, dtype=np.uint64)
        ls = np.empty(CHUNK, dtype=np.uint64)
        if t == 0:
            o32 = words.view(np.uint32)
            wi, acc, fill = _put32(o32, 0, U0, U0, np.uint64(norm_be), U32)
        else:
            o32 = scratch.view(np.uint32)[2 * soff[t]:2 * soff[t + 1]]
            wi, acc, fill = 0, U0, U0
        wi, acc, fill, tot = _qsgd_encode_seg(x, bounds[t], bounds[t + 1], states[t], mode,
                                              c, s32, o32, wi, acc, fill, ub, zeta, neg, cs, ls)
        o32[wi] = _bswap32(np.uint32(acc >> U32))
        segbits[t] = np.int64(tot)
        wstate[t, 0] = np.uint64(wi)
        wstate[t, 1] = acc
        wstate[t, 2] = fill

    @njit
    def qsgd_append(words, scratch, soff, segbits, wstate):
        """Append the bitstreams of segments 1.. (scratch) after segment 0's (words); returns
        nbits."""
        nt = segbits.shape[0]
        out32 = words.view(np.uint32)
        wi = np.int64(wstate[0, 0])
        acc = wstate[0, 1]
        fill = wstate[0, 2]
        for t in range(1, nt):
            r32 = scratch.view(np.uint32)[2 * soff[t]:2 * soff[t + 1]]
            rb = segbits[t]
            nfull = rb // 32
            for k in range(nfull):
                wi, acc, fill = _put32(out32, wi, acc, fill, np.uint64(_bswap32(r32[k])), U32)
            rem = np.uint64(rb - 32 * nfull)
            if rem != U0:
                wi, acc, fill = _put32(out32, wi, acc, fill,
                                       np.uint64(_bswap32(r32[nfull])) >> (U32 - rem), rem)
        out32[wi] = _bswap32(np.uint32(acc >> U32))
        total = 32
        for t in range(nt):
            total += segbits[t]
        return total

    # ---- qsgd decode ------------------------------------------------------------------------
    FAST_BITS = 12   # lookahead of the multi-record decode table
    FAST_MAX = 6     # records per table entry (12 bits hold at most 6 two-bit records)

    @njit
    def qsgd_fast_table(nmax, s):
        """Multi-record table for the qsgd stream: entry w (the next FAST_BITS stream bits)
        holds cnt complete records (sign + gamma(zeta + 1)) read greedily from w and their total
        length bits, as meta[w] = bits | cnt << 4, and zs[w, k] = zeta_k << 1 | sign_k (uint8:
        zeta <= 62; the tables take 28 KB, L1-resident).  A record is only taken into an
        entry when it is valid (n <= nmax, zeta <= s); cnt = 0 sends the decoder to the
        one-record path, which reports errors exactly as before."""
        nw = 1 << FAST_BITS
        meta = np.zeros(nw, dtype=np.uint8)
        zs = np.zeros((nw, FAST_MAX), dtype=np.uint8)
        for w in range(nw):
            p = 0
            k = 0
            while k < FAST_MAX and p + 2 <= FAST_BITS:
                sign = (w >> (FAST_BITS - 1 - p)) & 1
                n = 0
                while p + 1 + n < FAST_BITS and ((w >> (FAST_BITS - 2 - p - n)) & 1) == 0:
                    n += 1
                ln = 2 * n + 2
                if p + ln > FAST_BITS or n > nmax:
                    break
                v = (w >> (FAST_BITS - p - ln)) & ((1 << (n + 1)) - 1)
                zeta = v - 1
                if zeta > s:
                    break
                zs[w, k] = (zeta << 1) | sign
                p += ln
                k += 1
            meta[w] = p | (k << 4)
        return meta, zs

    @njit
    def _qsgd_parse(words, pos, stop, end, cap, spec, nmax, s, tab, nsc, sd, vals, starts,
                    fmeta, fzs):
        """Parse records from bit ``pos`` while the record start is < stop, at most ``cap``,
        values into vals[0..]: the table path (up to FAST_MAX records per lookup, always storing
        FAST_MAX values -- the extra ones are overwritten by the next records) while at least
        FAST_BITS bits remain before ``stop`` and FAST_MAX values fit, else one record at a time.
        ``spec``: a speculative start -- the first SPEC_K record starts are recorded in
        ``starts`` (one record at a time), and an impossible code among them restarts the
        parse one bit later.  Returns (n, pos, status, zlast): status 0 = reached stop/cap,
        1 = impossible code (info: its position is pos), 2 = record past the end; zlast =
        index of the last record with level > s (-1 if none)."""
        ntab = tab.shape[0]
        su = np.uint64(s)
        nm = np.uint64(nmax)
        fb = np.uint64(64 - FAST_BITS)
        stab = np.zeros(128, dtype=np.float32)  # stab[zeta << 1 | sign] = ±tab[zeta]
        for z in range(min(64, ntab)):
            stab[2 * z] = tab[z]
            stab[2 * z + 1] = -tab[z]
        fast_stop = stop - FAST_BITS
        fast_cap = cap - FAST_MAX
        while True:
            wi = pos // 64
            cur = _bswap(words[wi])
            nxt = _bswap(words[wi + 1])
            wi += 2
            off = np.uint64(pos % 64)
            n_rec = 0
            zlast = -1
            status = 0
            restart = False
            while pos < stop and n_rec < cap:
                win = _window(cur, nxt, off)
                if pos <= fast_stop and n_rec <= fast_cap and (not spec or n_rec >= SPEC_K):
                    e = np.int64(win >> fb)
                    mt = np.int64(fmeta[e])
                    c = mt >> 4
                    if c != 0:
                        for k in range(FAST_MAX):
                            vals[n_rec + k] = stab[fzs[e, k]]
                        n_rec += c
                        ln = np.uint64(mt & 15)
                        pos += np.int64(ln)
                        off += ln
                        if off >= U64:
                            off -= U64
                            cur = nxt
                            nxt = _bswap(words[wi])
                            wi += 1
                        continue
                body = win << U1
                n = _clz(body)
                if n > nm:
                    if spec and n_rec < SPEC_K:
                        restart = True
                    status = 1
                    break
                ln = n + n + np.uint64(2)
                if pos + np.int64(ln) > end:
                    status = 2
                    break
                zeta = (body >> (U63 - n - n)) - U1
                if zeta > su:
                    zlast = n_rec
                    v = np.float32(0)
                elif zeta < np.uint64(ntab):
                    v = tab[zeta]
                else:
                    v = np.float32((nsc * np.float64(zeta)) / sd)
                vals[n_rec] = -v if (win >> U63) != U0 else v
                if spec and n_rec < SPEC_K:
                    starts[n_rec] = pos
                pos += np.int64(ln)
                n_rec += 1
                off += ln
                if off >= U64:
                    off -= U64
                    cur = nxt
                    nxt = _bswap(words[wi])
                    wi += 1
            if restart:
                pos += 1
                if pos >= stop:
                    return 0, pos, 1, -1
                continue
            return n_rec, pos, status, zlast

    @njit
    def qsgd_decode_from(words, pos, i0, end, d, nmax, s, tab, nsc, sd, out, fmeta, fzs):
        """The decoder resumed at a true record start (record i0 begins at bit ``pos``), with
        the table path.  Returns (err, info, end_bit, level_bad) exactly as ``qsgd_decode``."""
        starts = np.zeros(1, dtype=np.int64)
        n, p, st, zl = _qsgd_parse(words, pos, end, end, d - i0, False, nmax, s, tab, nsc, sd,
                                   out[i0:], starts, fmeta, fzs)
        zbad = zl >= 0
        if st == 1:
            return ERR_BADCODE, p, p, zbad
        if st == 2:
            return ERR_PASTEND, p, p, zbad
        if n < d - i0:
            return ERR_SHORT, i0 + n, p, zbad
        return ERR_OK, 0, p, zbad

    @njit
    def qsgd_catchup(words, pos, i, end, d, nmax, s, tab, nsc, sd, out, starts, k):
        """Resynchronise with a speculative segment: decode true records one at a time from
        (pos, i) into out until pos is one of the segment's recorded starts starts[0..k-1]
        (sorted).  Returns (pos, i, j) with starts[j] == pos, or j = -1 when the true parse
        passes the last recorded start, meets an error or a level > s, or reaches d records
        (the caller then resumes the serial decoder from the returned (pos, i))."""
        if k == 0:
            return pos, i, -1
        j = 0
        wi = pos // 64
        cur = _bswap(words[wi])
        nxt = _bswap(words[wi + 1])
        wi += 2
        off = np.uint64(pos % 64)
        ntab = tab.shape[0]
        su = np.uint64(s)
        nm = np.uint64(nmax)
        while i < d and pos <= starts[k - 1]:
            while starts[j] < pos:
                j += 1
            if starts[j] == pos:
                return pos, i, j
            win = _window(cur, nxt, off)
            body = win << U1
            n = _clz(body)
            if n > nm:
                break
            ln = n + n + np.uint64(2)
            if pos + np.int64(ln) > end:
                break
            zeta = (body >> (U63 - n - n)) - U1
            if zeta > su:
                break
            elif zeta < np.uint64(ntab):
                v = tab[zeta]
            else:
                v = np.float32((nsc * np.float64(zeta)) / sd)
            out[i] = -v if (win >> U63) != U0 else v
            i += 1
            pos += np.int64(ln)
            off += ln
            if off >= U64:
                off -= U64
                cur = nxt
                nxt = _bswap(words[wi])
                wi += 1
        return pos, i, -1

    @pjit
    def qsgd_decode_par(words, end, d, nmax, s, tab, nsc, sd, out, tmp, bounds, toff, res,
                        starts, fmeta, fzs):
        """Segment 0 parses from bit 32 into out; segment t >= 1 speculatively from bit
        bounds[t] into tmp[toff[t]:toff[t+1]], each while the record start is < bounds[t+1].
        res[t] = (n, final pos, status, zlast); the merge is in QSGD._nb_decode_par."""
        nt = bounds.shape[0] - 1
        for t in numba.prange(nt):
            _qsgd_decode_task(t, words, end, d, nmax, s, tab, nsc, sd, out, tmp, bounds, toff,
                              res, starts, fmeta, fzs)

    @njit
    def _qsgd_decode_task(t, words, end, d, nmax, s, tab, nsc, sd, out, tmp, bounds, toff, res,
                          starts, fmeta, fzs):
        if t == 0:
            n, p, stt, zl = _qsgd_parse(words, 32, bounds[1], end, d, False, nmax, s, tab, nsc,
                                        sd, out, starts[0], fmeta, fzs)
        else:
            n, p, stt, zl = _qsgd_parse(words, bounds[t], bounds[t + 1], end,
                                        toff[t + 1] - toff[t], True, nmax, s, tab, nsc, sd,
                                        tmp[toff[t]:toff[t + 1]], starts[t], fmeta, fzs)
        res[t, 0] = n
        res[t, 1] = p
        res[t, 2] = stt
        res[t, 3] = zl

    @pjit
    def pcopy(src, dst, nt):
        """dst[:] = src (same length) in nt contiguous pieces."""
        n = src.shape[0]
        for t in numba.prange(nt):
            a = (n * t) // nt
            b = (n * (t + 1)) // nt
            dst[a:b] = src[a:b]


# ---- stochastic_bits ----------------------------------------------------------------------------
# One thread, sequential in element order.  Arithmetic as the numpy path (docs/codecs.md):
# q = (float64(x_i) - m) * scale, clipped to [0, L], zeta = floor(q) + (float64(U_i) < q - floor(q));
# fields of b bits MSB-first from byte 8 (bytes 0..7 = m, M are written by the caller).
if HAVE_NUMBA:
    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _sbits_level(xv, uv, m64, scale, lv):
        """zeta for one element (scale = 0 when M == m: every level is 0)."""
        q = (np.float64(xv) - m64) * scale
        q = min(max(q, 0.0), lv)
        fl = np.floor(q)
        return np.int64(fl) + (1 if np.float64(uv) < q - fl else 0)

    @njit
    def _sbits_draws(hi, lo, ihi, ilo, has, buf, u, n):
        """u[:n] = the next n float32 uniforms, as ``_pcg_chunk`` (numpy's order: a buffered
        high half first, then both halves of each 64-bit output, low half first), two per
        step in the steady state; (has, buf) end as numpy's (has_uint32, uinteger)."""
        t = 0
        if has != U0 and n > 0:
            u[0] = np.float32(np.int64(buf >> U8)) * INV24
            has = U0
            t = 1
        while t + 1 < n:
            hi, lo, r = _pcg_next64(hi, lo, ihi, ilo)
            u[t] = np.float32(np.int64((r & np.uint64(0xFFFFFFFF)) >> U8)) * INV24
            u[t + 1] = np.float32(np.int64(r >> np.uint64(40))) * INV24
            buf = r >> U32      # numpy leaves the consumed high half in ``uinteger``
            t += 2
        if t < n:
            hi, lo, r = _pcg_next64(hi, lo, ihi, ilo)
            u[t] = np.float32(np.int64((r & np.uint64(0xFFFFFFFF)) >> U8)) * INV24
            buf = r >> U32
            has = U1
        return hi, lo, has, buf

    @njit
    def sbits_encode(x, u, state, use_pcg, b, m64, scale, out):
        """Levels of x (draws: inline PCG64 from ``state``, updated, when ``use_pcg``; else
        ``u``) packed as b-bit fields MSB-first into out[8:] (zero-padded last byte); scale = 0
        when M == m."""
        d = x.shape[0]
        lv = np.float64((1 << b) - 1)
        ub = np.empty(CHUNK, dtype=np.float32)
        hi, lo, ihi, ilo = state[0], state[1], state[2], state[3]
        has = state[4]
        buf = state[5]
        p = 8
        acc = 0
        nb = 0
        for c0 in range(0, d, CHUNK):
            n = min(CHUNK, d - c0)
            if use_pcg:
                hi, lo, has, buf = _sbits_draws(hi, lo, ihi, ilo, has, buf, ub, n)
                uc = ub[:n]
            else:
                uc = u[c0:c0 + n]
            xc = x[c0:c0 + n]
            if b == 8:
                for t in range(n):
                    out[p + t] = np.uint8(_sbits_level(xc[t], uc[t], m64, scale, lv))
                p += n
            elif b == 16:
                for t in range(n):
                    z = _sbits_level(xc[t], uc[t], m64, scale, lv)
                    out[p + 2 * t] = np.uint8(z >> 8)
                    out[p + 2 * t + 1] = np.uint8(z & 255)
                p += 2 * n
            else:
                for t in range(n):           # nb < 8 on entry: acc holds nb + b <= 23 bits
                    acc = (acc << b) | _sbits_level(xc[t], uc[t], m64, scale, lv)
                    nb += b
                    while nb >= 8:
                        nb -= 8
                        out[p] = np.uint8((acc >> nb) & 255)
                        p += 1
                    acc &= (1 << nb) - 1
        if nb > 0:
            out[p] = np.uint8((acc << (8 - nb)) & 255)
        state[0] = hi
        state[1] = lo
        state[4] = has
        state[5] = buf

    @njit
    def sbits_decode(data, b, tab, out):
        """out[i] = tab[zeta_i], zeta_i the i-th b-bit field of data[8:] (length checked by the
        caller); tab[z] = float32(m + z * step) has 2^b entries, so every field is in range."""
        d = out.shape[0]
        if b == 8:
            for i in range(d):
                out[i] = tab[data[8 + i]]
        elif b == 16:
            for i in range(d):
                out[i] = tab[(np.int64(data[8 + 2 * i]) << 8) | np.int64(data[9 + 2 * i])]
        else:
            p = 8
            acc = 0
            nb = 0
            mask = (1 << b) - 1
            for i in range(d):
                while nb < b:
                    acc = ((acc << 8) | np.int64(data[p])) & 0xFFFFFF
                    p += 1
                    nb += 8
                nb -= b
                out[i] = tab[(acc >> nb) & mask]
