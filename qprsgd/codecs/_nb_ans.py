"""numba-CPU kernels of ``qsgd_ans`` (wire format: qprsgd/codecs/qsgd_ans.py; constants and the
numpy reference: ``_ans_kernels``).

* ``quantize_symbols``: one pass over x in L1-sized pieces -- numpy's PCG64 float32 draws
  generated inline by four interleaved LCG chains (leapfrog: chain j produces outputs j, j + 4,
  ...; the same outputs in the same order as numpy, but four independent 128-bit multiply chains
  instead of one, so the draws are no longer bound by the multiply latency), qsgd's quantizer,
  the symbol map and four interleaved histograms; on up to ``threads`` threads over segments of
  whole chunks, each starting numpy's stream at its first element.
* ``encode_chunks`` / ``decode_chunks``: one chunk per task (``prange``), the chunk's W lanes
  interleaved in one scalar loop -- W independent multiply-add chains in flight, the lanes'
  states in a small local array, branch-free renormalisation (the encoder stores the low word
  unconditionally and moves its pointer by the 0/1 condition; the decoder reads the next word
  unconditionally inside a group where no lane can run past the stream's end, and checks every
  read in the last groups).  Chunk boundaries and lanes are fixed by the format, so the bytes do
  not depend on the thread count.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _ans_kernels as A
from ._nb_core import CHUNK, INV24, U0, U1, U8, U32, U58, U63, U64, _mulhi, njit
from ._nb_qsgd import _quantize32

_inl = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
pjit = numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)

L = np.uint64(A.RANS_L)
MASK = np.uint64(A.M - 1)
SB = np.uint64(A.SCALE_BITS)
M16 = np.uint64(0xFFFF)
M32 = np.uint64(0xFFFFFFFF)
U16 = np.uint64(16)
DFS, DFM = np.uint64(A.DF_SHIFT), np.uint64(A.DF_MASK)
DBS, DBM = np.uint64(A.DB_SHIFT), np.uint64(A.DB_MASK)
EFS, EFM = np.uint64(A.EF_SHIFT), np.uint64(A.EF_MASK)
EBS, EBM = np.uint64(A.EB_SHIFT), np.uint64(A.EB_MASK)
ESS = np.uint64(A.ES_SHIFT)
RTOP = np.uint64(A.RCP_TOP)
LMAX = np.uint64(1 << 31)
RSH = np.uint64(A.RENORM_SHIFT)
UM = np.uint64(A.M)
NL = A.MAX_LANES


# ---- rANS: AVX-512 group loops (LLVM vector IR) ---------------------------------------------------
# One group of the 32-lane format is two 16-lane vectors of 31-bit states.  Decoder: gather the
# slot entries, store 16 values at once, the multiply-add, then the lanes below L take one word
# each *in lane order* -- exactly an expand-load of popcount(mask) consecutive 16-bit words
# (vpexpandw).  Encoder: the lanes above x_max - 1 write their low words in lane order -- a
# register compress (vpcompressw) stored as its first popcount(mask) lanes at p - popcount(mask)
# -- then the reciprocal multiply.  Written with
# LLVM's target-independent masked intrinsics, so they compile anywhere; they are used only where
# the host has AVX-512 VBMI2 (``SIMD``), the scalar loops below run everywhere else.
I1, I16, I32, I64 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.IntType(64)
VL = 16
V1, V16, V32, V64 = (ir.VectorType(t, VL) for t in (I1, I16, I32, I64))
PTR = ir.PointerType()
VPTR = ir.VectorType(PTR, VL)


def _host_simd() -> bool:
    """AVX-512 F/BW/VL/VBMI2 on the CPU numba compiles for (the host, or NUMBA_CPU_NAME with
    NUMBA_CPU_FEATURES when a portable target is asked for)."""
    try:
        from numba.core import config

        want = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi2")
        if config.CPU_NAME and config.CPU_NAME != "host":
            feats = {f.strip() for f in (config.CPU_FEATURES or "").split(",")}
            return all("+" + k in feats for k in want)
        import llvmlite.binding as llvm

        f = llvm.get_host_cpu_features()
        return all(f.get(k, False) for k in want)
    except Exception:  # pragma: no cover - feature query unavailable
        return False


SIMD = _host_simd()


def _splat(ty, v):
    return ir.Constant(ty, [v] * ty.count)


def _fn(mod, name, ret, args):
    return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, args), name)


def _gather64(b, base, idx):
    """<16 x i64> base[idx] (idx: <16 x i32>, unsigned)."""
    bv = b.insert_element(ir.Constant(V64, None), b.ptrtoint(base, I64), ir.Constant(I32, 0))
    bv = b.shuffle_vector(bv, bv, ir.Constant(V32, [0] * VL))
    ptrs = b.inttoptr(b.add(bv, b.shl(b.zext(idx, V64), _splat(V64, 3))), VPTR)
    f = _fn(b.module, "llvm.masked.gather.v16i64.v16p0", V64, [VPTR, I32, V1, V64])
    return b.call(f, [ptrs, ir.Constant(I32, 8), _splat(V1, 1), ir.Constant(V64, None)])


def _perm16(b, lo, hi, idx):
    """<16 x i64> table[idx] for a 16-entry table held in two <8 x i64> registers (lo: entries
    0-7, hi: 8-15; idx < 16): two AVX-512 vpermi2q, no memory access."""
    V8 = ir.VectorType(I64, 8)
    f = _fn(b.module, "llvm.x86.avx512.vpermi2var.q.512", V8, [V8, V8, V8])
    i64 = b.zext(idx, V64)
    parts = []
    for h in range(2):
        ih = b.shuffle_vector(i64, i64, ir.Constant(ir.VectorType(I32, 8),
                                                    list(range(8 * h, 8 * h + 8))))
        parts.append(b.call(f, [lo, ih, hi]))
    return b.shuffle_vector(parts[0], parts[1], ir.Constant(V32, list(range(16))))


def _popc(b, m):
    f = _fn(b.module, "llvm.ctpop.i16", I16, [I16])
    return b.zext(b.call(f, [b.bitcast(m, I16)]), I64)


def _arr(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val)


def _at(b, arr, idx, ety):
    """Pointer to element ``idx`` (i64) of a contiguous array of element type ``ety``."""
    return b.gep(b.bitcast(arr.data, ety.as_pointer()), [idx])


def jump_consts(st) -> np.ndarray:
    """The ``jmp`` argument of :func:`pcg_fill` for PCG64 state row ``st``."""
    from ._pcg64 import PCG_MULT

    m128 = (1 << 128) - 1
    inc = (int(st[2]) << 64) | int(st[3])
    a8 = pow(PCG_MULT, 8, 1 << 128)
    c8 = (inc * sum(pow(PCG_MULT, k, 1 << 128) for k in range(8))) & m128
    m = (1 << 64) - 1
    return np.array([PCG_MULT >> 64, PCG_MULT & m, inc >> 64, inc & m, a8 >> 64, a8 & m,
                     c8 >> 64, c8 & m], dtype=np.uint64)


# ---- draws -------------------------------------------------------------------------------------
@_inl
def _lcg(hi, lo, mhi, mlo, chi, clo):
    """(hi, lo) * (mhi, mlo) + (chi, clo) mod 2^128."""
    t = lo * mlo
    nlo = t + clo
    carry = U1 if nlo < t else U0
    nhi = _mulhi(lo, mlo) + lo * mhi + hi * mlo + chi + carry
    return nhi, nlo


@_inl
def _xsl_rr(hi, lo):
    v = hi ^ lo
    r = hi >> U58
    return (v >> r) | (v << ((U64 - r) & U63))


@_inl
def _f32(w):
    return np.float32(np.int64(w >> U8)) * INV24


@intrinsic
def _pcg8(typingctx, stv, jmp, u, off, m):
    """8 PCG64 chains as <8 x i64> vectors (lane j at output j + 8 i, stv = 8 high then 8 low
    state words, the state of each chain's next output): u[off + 16 i + 2 j + h] = half h of
    output j + 8 i, i < m; stv advanced by 8 m outputs, stv[16:18] = (hi, lo) of the last
    output's state."""
    sig = types.void(stv, jmp, u, types.int64, types.int64)

    def codegen(context, b, signature, args):
        ast, aj, au = (_arr(context, b, signature.args[k], args[k]) for k in range(3))
        off, m = args[3], args[4]
        V8 = ir.VectorType(I64, 8)
        F16 = ir.VectorType(ir.FloatType(), 16)
        phi_ = b.bitcast(_at(b, ast, ir.Constant(I64, 0), I64), V8.as_pointer())
        plo_ = b.bitcast(_at(b, ast, ir.Constant(I64, 8), I64), V8.as_pointer())
        h0, l0 = b.load(phi_, align=8), b.load(plo_, align=8)

        def bc(k):
            v = b.load(_at(b, aj, ir.Constant(I64, k), I64))
            v = b.insert_element(ir.Constant(V8, None), v, ir.Constant(I32, 0))
            return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 8), [0] * 8))

        ahi, alo, chi, clo = bc(4), bc(5), bc(6), bc(7)
        m32 = ir.Constant(V8, [0xFFFFFFFF] * 8)
        s32 = ir.Constant(V8, [32] * 8)
        a0, a1 = b.and_(alo, m32), b.lshr(alo, s32)
        entry = b.block
        fn = b.function
        head = fn.append_basic_block("pcg.head")
        body = fn.append_basic_block("pcg.body")
        done = fn.append_basic_block("pcg.done")
        b.branch(head)
        b.position_at_end(head)
        i = b.phi(I64)
        hi = b.phi(V8)
        lo = b.phi(V8)
        phi_prev = b.phi(V8)
        plo_prev = b.phi(V8)
        b.cbranch(b.icmp_signed("<", i, m), body, done)
        b.position_at_end(body)
        v = b.xor(hi, lo)
        r = b.lshr(hi, ir.Constant(V8, [58] * 8))
        rot = _fn(b.module, "llvm.fshr.v8i64", V8, [V8, V8, V8])
        o = b.call(rot, [v, v, r])
        w = b.lshr(b.bitcast(o, V32), _splat(V32, 8))
        f = b.fmul(b.sitofp(w, F16), ir.Constant(F16, [1.0 / 16777216.0] * 16))
        dst = b.add(off, b.mul(i, ir.Constant(I64, 16)))
        b.store(f, b.bitcast(_at(b, au, dst, ir.FloatType()), F16.as_pointer()), align=4)
        # (hi, lo) * (ahi, alo) + (chi, clo) mod 2^128, lo * alo from 32-bit halves
        l0_, l1_ = b.and_(lo, m32), b.lshr(lo, s32)
        p00, p01 = b.mul(l0_, a0), b.mul(l0_, a1)
        p10, p11 = b.mul(l1_, a0), b.mul(l1_, a1)
        mid = b.add(b.add(b.lshr(p00, s32), b.and_(p01, m32)), b.and_(p10, m32))
        low = b.or_(b.and_(p00, m32), b.shl(mid, s32))
        high = b.add(b.add(p11, b.lshr(p01, s32)), b.add(b.lshr(p10, s32), b.lshr(mid, s32)))
        cross = b.add(b.mul(lo, ahi), b.mul(hi, alo))
        nlo = b.add(low, clo)
        carry = b.zext(b.icmp_unsigned("<", nlo, low), V8)
        nhi = b.add(b.add(high, cross), b.add(chi, carry))
        inext = b.add(i, ir.Constant(I64, 1))
        body_end = b.block
        b.branch(head)
        for ph, a_, b_ in ((i, ir.Constant(I64, 0), inext), (hi, h0, nhi), (lo, l0, nlo),
                           (phi_prev, h0, hi), (plo_prev, l0, lo)):
            ph.add_incoming(a_, entry)
            ph.add_incoming(b_, body_end)
        b.position_at_end(done)
        b.store(hi, phi_, align=8)
        b.store(lo, plo_, align=8)
        b.store(b.extract_element(phi_prev, ir.Constant(I32, 7)),
                _at(b, ast, ir.Constant(I64, 16), I64))
        b.store(b.extract_element(plo_prev, ir.Constant(I32, 7)),
                _at(b, ast, ir.Constant(I64, 17), I64))
        return context.get_dummy_value()

    return sig, codegen


@njit
def pcg_fill(st, jmp, u, n, stv):
    """u[:n] = the next n float32 draws of numpy's ``Generator.random(dtype=float32)`` over
    PCG64 from state row ``st`` (layout of ``_pcg64.state_of``; updated).  jmp = (A, C) of one
    step (hi, lo, hi, lo) followed by (A^8, C (A^7 + ... + A + 1)) for eight leapfrogged
    chains (``_pcg8``); stv: scratch uint64[18]."""
    hi, lo, has, buf = st[0], st[1], st[4], st[5]
    ahi, alo, chi, clo = jmp[0], jmp[1], jmp[2], jmp[3]
    t = 0
    if n > 0 and has != U0:
        u[0] = _f32(buf)
        has = U0
        t = 1
    npair = (n - t) // 2
    m = npair // 8 if npair >= 64 else 0
    if m > 0:
        h, q = hi, lo
        for j in range(8):
            h, q = _lcg(h, q, ahi, alo, chi, clo)
            stv[j] = h
            stv[8 + j] = q
        _pcg8(stv, jmp, u, t, m)
        hi, lo = stv[16], stv[17]
        buf = _xsl_rr(hi, lo) >> U32      # numpy keeps the last high half even when used
        t += 16 * m
    while t + 1 < n:
        hi, lo = _lcg(hi, lo, ahi, alo, chi, clo)
        o = _xsl_rr(hi, lo)
        u[t] = _f32(o & M32)
        u[t + 1] = _f32(o >> U32)
        buf = o >> U32
        t += 2
    if t < n:
        hi, lo = _lcg(hi, lo, ahi, alo, chi, clo)
        o = _xsl_rr(hi, lo)
        u[t] = _f32(o & M32)
        has = U1
        buf = o >> U32
    st[0] = hi
    st[1] = lo
    st[4] = has
    st[5] = buf


# ---- quantize -> symbols -> histogram ------------------------------------------------------------
@_inl
def _sym(xi, ui, r, s32):
    """(symbol as uint32 without escapes, level) of qsgd's quantizer at r = |x| * scale."""
    r = min(r, s32)
    lv = np.int64(r)
    fr = r - np.float32(lv)
    z = np.uint32(lv) + np.uint32(ui < fr)
    sym = (z + z - np.uint32(1) + np.uint32(xi < np.float32(0))) if z != 0 else np.uint32(0)
    return sym, z


@njit
def _qsym(x, u, mode, c, s32, sy):
    """sy[t] = the symbol of element t (no escapes: valid where the level is < Ecap), one
    vectorizable loop per mode (the float32 operations of ``_quantize32``); returns the largest
    level."""
    n = x.shape[0]
    zm = np.uint32(0)
    if mode == 0:
        for t in range(n):
            sy[t] = 0
    elif mode == 1:
        for t in range(n):
            sym, z = _sym(x[t], u[t], abs(x[t]) * c, s32)
            sy[t] = np.uint16(sym)
            zm = max(zm, z)
    else:
        for t in range(n):
            sym, z = _sym(x[t], u[t], (abs(x[t]) / c) * s32, s32)
            sy[t] = np.uint16(sym)
            zm = max(zm, z)
    return zm


@njit
def quantize_symbols(x, u, st, jmp, use_pcg, mode, c, s32, Ecap, syms, counts, escv, res):
    """qsgd's quantizer on x (draws: inline PCG64 from state row ``st``, updated, when
    ``use_pcg``, else ``u``) -> syms[i] (0; 2z - 1 + neg for 1 <= z < Ecap; 2 Ecap - 1 + neg for
    an escaped level, z - Ecap appended to escv), counts[] += the histogram; res = (max level,
    escapes)."""
    d = x.shape[0]
    ub = np.empty(CHUNK, dtype=np.float32)
    zc = np.empty(CHUNK, dtype=np.uint32)
    nc = np.empty(CHUNK, dtype=np.uint32)
    stv = np.empty(18, dtype=np.uint64)
    na = counts.shape[0]
    h4 = np.zeros(4 * na, dtype=np.int32)     # 4 interleaved histograms: no store chains
    zmax = np.int64(0)
    nesc = 0
    for c0 in range(0, d, CHUNK):
        n = min(CHUNK, d - c0)
        if use_pcg:
            pcg_fill(st, jmp, ub, n, stv)
            uc = ub[:n]
        else:
            uc = u[c0:c0 + n]
        sy = syms[c0:c0 + n]
        zm = np.int64(_qsym(x[c0:c0 + n], uc, mode, c, s32, sy))
        zmax = max(zmax, zm)
        if zm >= Ecap:                # escapes in this piece: the levels again, mapped one by one
            _quantize32(x[c0:c0 + n], uc, mode, c, s32, zc, nc)
            for t in range(n):
                z = np.int64(zc[t])
                if z == 0:
                    sym = 0
                elif z < Ecap:
                    sym = 2 * z - 1 + np.int64(nc[t])
                else:
                    sym = 2 * Ecap - 1 + np.int64(nc[t])
                    escv[nesc] = np.uint32(z - Ecap)
                    nesc += 1
                sy[t] = sym
        n4 = n - n % 4
        for t in range(0, n4, 4):
            h4[4 * np.int64(sy[t])] += 1
            h4[4 * np.int64(sy[t + 1]) + 1] += 1
            h4[4 * np.int64(sy[t + 2]) + 2] += 1
            h4[4 * np.int64(sy[t + 3]) + 3] += 1
        for t in range(n4, n):
            h4[4 * np.int64(sy[t])] += 1
    for k in range(na):
        counts[k] += np.int64(h4[4 * k]) + h4[4 * k + 1] + h4[4 * k + 2] + h4[4 * k + 3]
    res[0] = zmax
    res[1] = nesc


@pjit
def quantize_symbols_par(x, u, bounds, states, jmp, use_pcg, mode, c, s32, Ecap, syms, counts,
                         escv, res):
    """``quantize_symbols`` on segments bounds[t]..bounds[t+1]-1, each from its own PCG64 state
    row (``_pcg64.segment_states``: the generator at the segment's first draw), so the draws are
    numpy's stream whatever the split; counts[t] = segment t's histogram, its escapes in
    escv[bounds[t]:], res[t] = (max level, escapes).  Row T-1 ends as the state after all d
    draws."""
    nt = bounds.shape[0] - 1
    for t in numba.prange(nt):
        a = bounds[t]
        b = bounds[t + 1]
        quantize_symbols(x[a:b], u[a:b], states[t], jmp, use_pcg, mode, c, s32, Ecap, syms[a:b],
                         counts[t], escv[a:b], res[t])


@intrinsic
def _dec_fast(typingctx, data, tab, xs, out32, io, base, g1, pe, esc0):
    """Full 32-lane groups io[1] .. g1 - 1 of a chunk from data (byte io[0] on), while a group
    needs no escape and 64 bytes remain before pe; io = (p, g) where it stopped, xs (uint32[32])
    the states.  out32[base + 32 g + j] = the value bits of lane j."""
    sig = types.void(data, tab, xs, out32, io, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, b, signature, args):
        ad, at, ax, ao, aio = (_arr(context, b, signature.args[k], args[k]) for k in range(5))
        base, g1, pe, esc0 = args[5:]
        pio = _at(b, aio, ir.Constant(I64, 0), I64)
        gio = _at(b, aio, ir.Constant(I64, 1), I64)
        px0 = b.bitcast(_at(b, ax, ir.Constant(I64, 0), I32), V32.as_pointer())
        px1 = b.bitcast(_at(b, ax, ir.Constant(I64, 16), I32), V32.as_pointer())
        p0, g0 = b.load(pio), b.load(gio)
        x00, x10 = b.load(px0, align=4), b.load(px1, align=4)
        e0 = b.insert_element(ir.Constant(V32, None), b.trunc(esc0, I32), ir.Constant(I32, 0))
        e0 = b.shuffle_vector(e0, e0, ir.Constant(V32, [0] * VL))
        entry = b.block
        fn = b.function
        head = fn.append_basic_block("dec.head")
        chk = fn.append_basic_block("dec.chk")
        body = fn.append_basic_block("dec.body")
        done = fn.append_basic_block("dec.done")
        b.branch(head)
        b.position_at_end(head)
        p = b.phi(I64)
        g = b.phi(I64)
        x0 = b.phi(V32)
        x1 = b.phi(V32)
        ok = b.and_(b.icmp_signed("<", g, g1),
                    b.icmp_signed("<=", b.add(p, ir.Constant(I64, 64)), pe))
        b.cbranch(ok, chk, done)
        b.position_at_end(chk)
        mk = _splat(V32, A.M - 1)
        s0, s1 = b.and_(x0, mk), b.and_(x1, mk)
        esc = b.or_(b.icmp_unsigned(">=", s0, e0), b.icmp_unsigned(">=", s1, e0))
        anyesc = b.icmp_unsigned("!=", b.bitcast(esc, I16), ir.Constant(I16, 0))
        b.cbranch(anyesc, done, body)
        b.position_at_end(body)
        q = p
        ys = []
        for h, (x, sl) in enumerate(((x0, s0), (x1, s1))):
            e = _gather64(b, at.data, sl)
            val = b.trunc(e, V32)
            o = b.add(base, b.add(b.mul(g, ir.Constant(I64, 32)), ir.Constant(I64, 16 * h)))
            b.store(val, b.bitcast(_at(b, ao, o, I32), V32.as_pointer()), align=4)
            f = b.and_(b.trunc(b.lshr(e, _splat(V64, A.DF_SHIFT)), V32), _splat(V32, A.DF_MASK))
            bias = b.and_(b.trunc(b.lshr(e, _splat(V64, A.DB_SHIFT)), V32),
                          _splat(V32, A.DB_MASK))
            y = b.add(b.mul(f, b.lshr(x, _splat(V32, A.SCALE_BITS))), bias)
            m = b.icmp_unsigned("<", y, _splat(V32, A.RANS_L))
            ef = _fn(b.module, "llvm.masked.expandload.v16i16", V16, [PTR, V1, V16])
            w = b.call(ef, [b.gep(ad.data, [q]), m, ir.Constant(V16, None)])
            y = b.select(m, b.or_(b.shl(y, _splat(V32, 16)), b.zext(w, V32)), y)
            q = b.add(q, b.shl(_popc(b, m), ir.Constant(I64, 1)))
            ys.append(y)
        gn = b.add(g, ir.Constant(I64, 1))
        body_end = b.block
        b.branch(head)
        for phi, a0, a1 in ((p, p0, q), (g, g0, gn), (x0, x00, ys[0]), (x1, x10, ys[1])):
            phi.add_incoming(a0, entry)
            phi.add_incoming(a1, body_end)
        b.position_at_end(done)
        b.store(p, pio)
        b.store(g, gio)
        b.store(x0, px0, align=4)
        b.store(x1, px1, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _enc_fast_gen(perm):
    """The encoder's group loop; ``perm``: the per-symbol entries looked up from registers
    (alphabets of <= 16 symbols; ec padded to 16 entries) instead of gathered."""
    def gen(typingctx, syms, ec, xs, buf, io, a):
        """Full 32-lane groups io[1] - 1 down to 0 of the chunk starting at element a, written
        backwards into the uint16 words buf before word io[0]; io = (p, 0) at the end, xs
        (uint32[32]) the states."""
        sig = types.void(syms, ec, xs, buf, io, types.int64)
        return sig, _enc_codegen(perm)

    gen.__name__ = gen.__qualname__ = "_enc_fast16" if perm else "_enc_fast"
    return gen


def _enc_codegen(perm):
    def codegen(context, b, signature, args):
        asy, ae, ax, abuf, aio = (_arr(context, b, signature.args[k], args[k]) for k in range(5))
        a = args[5]
        if perm:
            V8 = ir.VectorType(I64, 8)
            tlo = b.load(b.bitcast(_at(b, ae, ir.Constant(I64, 0), I64), V8.as_pointer()), align=8)
            thi = b.load(b.bitcast(_at(b, ae, ir.Constant(I64, 8), I64), V8.as_pointer()), align=8)
        pio = _at(b, aio, ir.Constant(I64, 0), I64)
        gio = _at(b, aio, ir.Constant(I64, 1), I64)
        px0 = b.bitcast(_at(b, ax, ir.Constant(I64, 0), I32), V32.as_pointer())
        px1 = b.bitcast(_at(b, ax, ir.Constant(I64, 16), I32), V32.as_pointer())
        p0, g0 = b.load(pio), b.load(gio)
        x00, x10 = b.load(px0, align=4), b.load(px1, align=4)
        entry = b.block
        fn = b.function
        head = fn.append_basic_block("enc.head")
        body = fn.append_basic_block("enc.body")
        done = fn.append_basic_block("enc.done")
        b.branch(head)
        b.position_at_end(head)
        p = b.phi(I64)
        g = b.phi(I64)
        x0 = b.phi(V32)
        x1 = b.phi(V32)
        b.cbranch(b.icmp_signed(">", g, ir.Constant(I64, 0)), body, done)
        b.position_at_end(body)
        gg = b.sub(g, ir.Constant(I64, 1))
        gb = b.add(a, b.mul(gg, ir.Constant(I64, 32)))
        cf = _fn(b.module, "llvm.experimental.vector.compress.v16i16", V16, [V16, V1, V16])
        sf = _fn(b.module, "llvm.masked.store.v16i16.p0", ir.VoidType(), [V16, PTR, I32, V1])
        q = p
        ys = [None, None]
        for h, x in ((1, x1), (0, x0)):
            sp = b.bitcast(_at(b, asy, b.add(gb, ir.Constant(I64, 16 * h)), I16),
                           V16.as_pointer())
            sy = b.zext(b.load(sp, align=2), V32)
            e = _perm16(b, tlo, thi, sy) if perm else _gather64(b, ae.data, sy)
            rcp = b.or_(b.trunc(e, V32), _splat(V32, A.RCP_TOP))
            f = b.add(b.and_(b.trunc(b.lshr(e, _splat(V64, A.EF_SHIFT)), V32),
                             _splat(V32, A.EF_MASK)), _splat(V32, 1))
            bias = b.and_(b.trunc(b.lshr(e, _splat(V64, A.EB_SHIFT)), V32),
                          _splat(V32, A.EB_MASK))
            sh = b.trunc(b.lshr(e, _splat(V64, A.ES_SHIFT)), V32)
            m = b.icmp_unsigned(">=", b.lshr(x, _splat(V32, A.RENORM_SHIFT)), f)
            cnt = _popc(b, m)
            q = b.sub(q, cnt)
            # compress in a register, then a store of the first cnt lanes (a compress-store
            # to memory is microcoded on Zen 4: ~10x slower)
            cw = b.call(cf, [b.trunc(x, V16), m, ir.Constant(V16, None)])
            cv = b.insert_element(ir.Constant(V16, None), b.trunc(cnt, I16), ir.Constant(I32, 0))
            cv = b.shuffle_vector(cv, cv, ir.Constant(V32, [0] * VL))
            pm = b.icmp_unsigned("<", ir.Constant(V16, list(range(VL))), cv)
            b.call(sf, [cw, b.bitcast(_at(b, abuf, q, I16), PTR), ir.Constant(I32, 2), pm])
            x = b.select(m, b.lshr(x, _splat(V32, 16)), x)
            pr = b.mul(b.zext(x, V64), b.zext(rcp, V64))
            qq = b.lshr(b.trunc(b.lshr(pr, _splat(V64, 32)), V32), sh)
            ys[h] = b.add(b.add(x, bias), b.mul(qq, b.sub(_splat(V32, A.M), f)))
        body_end = b.block
        b.branch(head)
        for phi, a0, a1 in ((p, p0, q), (g, g0, gg), (x0, x00, ys[0]), (x1, x10, ys[1])):
            phi.add_incoming(a0, entry)
            phi.add_incoming(a1, body_end)
        b.position_at_end(done)
        b.store(p, pio)
        b.store(g, gio)
        b.store(x0, px0, align=4)
        b.store(x1, px1, align=4)
        return context.get_dummy_value()

    return codegen


_enc_fast = intrinsic(_enc_fast_gen(False))
# the register lookup is an x86 AVX-512 instruction: elsewhere the gather version stands in
_enc_fast16 = intrinsic(_enc_fast_gen(SIMD))


# ---- rANS: per chunk -------------------------------------------------------------------------
@_inl
def _enc_lane(syms, i, ec, xs, j, buf, p):
    """Lane j encodes syms[i] (renormalising first); returns the new word pointer."""
    e = ec[syms[i]]
    f = ((e >> EFS) & EFM) + U1
    x = np.uint64(xs[j])
    need = np.uint64((x >> RSH) >= f)
    buf[p - 1] = np.uint16(x & M16)       # kept only when needed (else overwritten)
    p -= np.int64(need)
    x >>= need << np.uint64(4)
    q = ((x * ((e & (RTOP - U1)) | RTOP)) >> U32) >> (e >> ESS)
    xs[j] = np.uint32(x + ((e >> EBS) & EBM) + q * (UM - f))
    return p


@njit
def encode_chunk(syms, a, n, W, ec, buf, hi, simd):
    """Chunk (elements a..a+n-1, W lanes) written backwards into the uint16 words buf ending at
    buf[hi - 1]; returns its first word (W final states, 2 words each, then the words)."""
    xs = np.empty(NL, dtype=np.uint32)
    io = np.empty(2, dtype=np.int64)
    for j in range(NL):
        xs[j] = A.RANS_L
    p = hi
    G = (n + W - 1) // W
    Gf = n // W
    for g in range(G - 1, Gf - 1, -1):          # the partial last group
        base = a + g * W
        for j in range(n - g * W - 1, -1, -1):
            p = _enc_lane(syms, base + j, ec, xs, j, buf, p)
    if simd and W == NL:
        io[0] = p
        io[1] = Gf
        if ec.shape[0] <= 16:
            _enc_fast16(syms, ec, xs, buf, io, a)
        else:
            _enc_fast(syms, ec, xs, buf, io, a)
        p = io[0]
    else:
        for g in range(Gf - 1, -1, -1):
            base = a + g * W
            for j in range(W - 1, -1, -1):
                p = _enc_lane(syms, base + j, ec, xs, j, buf, p)
    p -= 2 * W
    for j in range(W):
        buf[p + 2 * j] = np.uint16(xs[j] & np.uint32(0xFFFF))
        buf[p + 2 * j + 1] = np.uint16(xs[j] >> np.uint32(16))
    return p


@pjit
def encode_chunks(syms, ca, cn, cw, ec, buf, hi, starts, simd):
    for t in numba.prange(ca.shape[0]):
        starts[t] = encode_chunk(syms, ca[t], cn[t], cw[t], ec, buf, hi[t], simd)


@njit
def _dec_group(data, p, pe, xs, a, base, m, tab, esc0, esc1, out32, escpos, ne):
    """Lanes 0..m-1 of the group at element base; returns (err, p, escapes)."""
    if p + 2 * m <= pe:           # no lane can run past the end: branch-free reads
        for j in range(m):
            x = np.uint64(xs[j])
            slot = x & MASK
            e = tab[slot]
            x = ((e >> DFS) & DFM) * (x >> SB) + ((e >> DBS) & DBM)
            out32[base + j] = np.uint32(e & M32)
            if slot >= esc0:
                escpos[a + ne] = 2 * (base + j) + np.int64(slot >= esc1)
                ne += 1
            need = np.uint64(x < L)
            w = np.uint64(data[p]) | (np.uint64(data[p + 1]) << U8)
            x = (x << (need << np.uint64(4))) | (w & (U0 - need))
            p += 2 * np.int64(need)
            xs[j] = np.uint32(x)
        return A.ERR_OK, p, ne
    for j in range(m):
        x = np.uint64(xs[j])
        slot = x & MASK
        e = tab[slot]
        x = ((e >> DFS) & DFM) * (x >> SB) + ((e >> DBS) & DBM)
        out32[base + j] = np.uint32(e & M32)
        if slot >= esc0:
            escpos[a + ne] = 2 * (base + j) + np.int64(slot >= esc1)
            ne += 1
        if x < L:
            if p + 2 > pe:
                return A.ERR_PASTEND, p, ne
            x = (x << U16) | np.uint64(data[p]) | (np.uint64(data[p + 1]) << U8)
            p += 2
        xs[j] = np.uint32(x)
    return A.ERR_OK, p, ne


@njit
def decode_chunk(data, ps, pe, a, n, W, tab, esc0, esc1, out32, escpos, simd):
    """Chunk (elements a..a+n-1, W lanes) from data[ps:pe] into out32 (tab's value bits); an
    escape slot s >= esc0 records 2 i + (s >= esc1) at escpos[a + j], j from 0.  Returns (err,
    escapes)."""
    if pe - ps < 4 * W:
        return A.ERR_PASTEND, 0
    xs = np.empty(NL, dtype=np.uint32)
    io = np.empty(2, dtype=np.int64)
    for j in range(W):
        q = ps + 4 * j
        x = np.uint64(data[q]) | (np.uint64(data[q + 1]) << U8) | \
            (np.uint64(data[q + 2]) << U16) | (np.uint64(data[q + 3]) << np.uint64(24))
        if x < L or x >= LMAX:
            return A.ERR_STATE, 0
        xs[j] = np.uint32(x)
    p = ps + 4 * W
    ne = 0
    G = (n + W - 1) // W
    g = 0
    if simd and W == NL:
        Gf = n // W
        while g < Gf:
            io[0] = p
            io[1] = g
            _dec_fast(data, tab, xs, out32, io, a, Gf, pe, np.int64(esc0))
            p = io[0]
            g = io[1]
            if g >= Gf or p + 64 > pe:
                break
            err, p, ne = _dec_group(data, p, pe, xs, a, a + g * W, W, tab, esc0, esc1, out32,
                                    escpos, ne)     # a group with an escape
            g += 1
    while g < G:
        err, p, ne = _dec_group(data, p, pe, xs, a, a + g * W, min(W, n - g * W), tab, esc0,
                                esc1, out32, escpos, ne)
        if err != A.ERR_OK:
            return err, ne
        g += 1
    if p != pe:
        return A.ERR_STATE, ne
    for j in range(W):
        if xs[j] != np.uint32(A.RANS_L):
            return A.ERR_STATE, ne
    return A.ERR_OK, ne


@pjit
def decode_chunks(data, offs, ca, cn, cw, tab, esc0, esc1, out32, escpos, res, simd):
    for t in numba.prange(ca.shape[0]):
        err, ne = decode_chunk(data, offs[t], offs[t + 1], ca[t], cn[t], cw[t], tab, esc0, esc1,
                               out32, escpos, simd)
        res[t, 0] = err
        res[t, 1] = ne
