"""numba-CPU kernels of the sign family (``sign``, ``block_sign``): the fused L1-sum + sign-bit
encoder and the expanding decoder, on up to T threads (wire format: qprsgd/codecs/sign.py).

Whatever the thread count the bytes and values are the same: the L1 norm of a block is summed by
ONE thread in the order of ``abssum8`` (threads own whole blocks; a single block -- the ``sign``
codec -- is one thread's job); sign bits and the decode expansion are split into byte-aligned
element ranges."""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._nb_core import _lanes8_abs, njit, pjit


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
