"""numba-CPU backend, shared pieces: the bit-level intrinsics, the MSB-first word writer, the
inline PCG64 float32 generator, the fixed-order float64 sums and the thread policy.

Imported only by the numba backends of the codec families (``_nb_sign``, ``_nb_qsgd``,
``_nb_sbits``); the numpy and CUDA backends never import it.  The backend and its thread count
are chosen when a codec is built (``qprsgd.codecs.backends``), never read from the environment
here.

Bit layout (as in ``_bitstream``): the payload is written as 64-bit words whose big-endian bytes
are the wire bytes; a writer keeps ``acc`` (bits left-aligned) and ``fill`` (bits used), a field
of ``L`` <= 64 bits is or-ed in and full words are stored byte-swapped, so ``words.view(uint8)``
is the wire.  Readers keep the current and next word and the bit offset in the current one.

Random draws: for a ``numpy.random.Generator`` over ``PCG64`` the encoders generate the uniforms
inline with the *same* algorithm numpy uses (``_pcg64``), then write the generator state back.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._pcg64 import PCG_MULT_HI, PCG_MULT_LO


def _drop_stale_cache() -> None:
    """numba's on-disk cache (``cache=True``) is keyed by the source file of each function, so a
    kernel of ``_nb_qsgd`` that calls one of ``_nb_core`` keeps the old machine code when only
    ``_nb_core`` changes.  The kernels are split over several files, so: a hash of all of them
    is kept beside the cache, and when it differs every cached kernel of these files is
    dropped (recompiled on first use).  A read-only install cannot hold stale entries."""
    here = os.path.dirname(os.path.abspath(__file__))
    names = sorted(f for f in os.listdir(here)
                   if (f.startswith("_nb_") or f == "_ans_kernels.py") and f.endswith(".py"))
    h = hashlib.sha256()
    for f in names:
        with open(os.path.join(here, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    digest = h.hexdigest()
    cache = os.path.join(here, "__pycache__")
    stamp = os.path.join(cache, "numba-kernels.sha256")
    with contextlib.suppress(OSError):
        with open(stamp) as fh:
            if fh.read().strip() == digest:
                return
    stems = tuple(f[:-3] + "." for f in names)
    with contextlib.suppress(OSError):
        for f in os.listdir(cache):
            if f.startswith(stems) and (f.endswith(".nbi") or f.endswith(".nbc")):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(cache, f))
        with open(stamp, "w") as fh:
            fh.write(digest)


_drop_stale_cache()


# numba's threading layer: ``workqueue`` unless the user names one (env NUMBA_THREADING_LAYER).
# The default choice on these wheels is OpenMP, and launching an OpenMP region from the main
# thread sets the process's OpenMP thread count, which torch's intra-op pool shares: after the
# first codec call a rank configured with ``run.threads: 1`` computed on all cores' worth of
# threads (torch.get_num_threads() went 1 -> 2), and 8 ranks on 2 cores computed 20x slower.
# workqueue is numba's own pool (no OpenMP state) and was as fast here for these one-segment-per-
# thread kernels (qsgd B* 10.0 vs 9.8 Gb/s, block_sign 110 vs 128 Gb/s, 2 threads, noise-level).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


ERR_OK = 0
ERR_BADCODE = 1      # impossible code length (leading-zero run too long) at bit info
ERR_PASTEND = 2      # record at bit info runs past the end
ERR_SHORT = 3        # stream ended after info records

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


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _window(cur, nxt, off):
    # 64 stream bits at bit ``off`` of ``cur`` (off in 0..63), followed by ``nxt``
    return (cur << off) | ((nxt >> U1) >> (U63 - off))


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

pjit = numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
