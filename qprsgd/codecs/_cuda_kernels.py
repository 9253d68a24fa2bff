"""CUDA Python kernels (numba.cuda) of the ``cuda`` backends: the same wire formats, bytes and
decoded values as the CPU backends (tests/test_codecs_cuda.py runs every kernel in numba's CUDA
simulator, ``NUMBA_ENABLE_CUDASIM=1``, on small vectors and compares byte for byte).

Arrays: device arrays of any library with ``__cuda_array_interface__`` (CuPy, torch) are used in
place (``cuda.as_cuda_array``, no copy); under the simulator numpy arrays stand in.

Exactness: float sums whose order matters (the block L1 norms of ``sign``, QSGD's sum of
squares) use the CPU's fixed order -- 8 lanes, lane j adding the elements i = j mod 8 of its
block sequentially, then ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) -- one thread per
lane, so they are as exact as the CPU's and slower than a tree reduction (a block of n elements
costs n / 8 dependent adds); everything else is one thread per element or per output byte.
Min/max and integer prefix sums do not depend on the order.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

TPB = 256


def dev(a):
    """A device view of ``a`` (no copy) when it has ``__cuda_array_interface__``; a contiguous
    host array otherwise (the simulator's stand-in; on a GPU numba copies it around the call)."""
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)
    return np.ascontiguousarray(a)


def host(a) -> np.ndarray:
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def wrap(a, xp):
    """A kernel's output as the codec's array type: numpy (copied to the host; under the
    simulator it is one already) or CuPy / another CAI library (zero-copy)."""
    if xp is np:
        return host(a)
    return xp.asarray(a)


def empty(n: int, dtype):
    return cuda.device_array(int(n), dtype=dtype)


def zeros(n: int, dtype):
    return cuda.to_device(np.zeros(int(n), dtype=dtype))


def grid(n: int) -> tuple[int, int]:
    return (max(1, (int(n) + TPB - 1) // TPB), TPB)


# ---- fixed-order float64 sums (8 lanes per segment) ---------------------------------------------
@cuda.jit
def lanes8(x, offsets, square, acc):
    """acc[b, j] = sum over i = offsets[b] + j + 8 r < offsets[b + 1] of f(float64(x[i]))
    (f = |.| or the square), sequentially in r: thread (b, j)."""
    t = cuda.grid(1)
    nb = offsets.shape[0] - 1
    if t >= 8 * nb:
        return
    b = t // 8
    j = t % 8
    s = 0.0
    i = offsets[b] + j
    e = offsets[b + 1]
    while i < e:
        v = np.float64(x[i])
        if square:
            s += v * v
        else:
            s += abs(v)
        i += 8
    acc[b, j] = s


def fixed_sums(x, offsets_dev, nb: int, square: bool) -> np.ndarray:
    """Host float64 per-segment sums in the CPU order (see module docstring)."""
    acc = cuda.device_array((nb, 8), dtype=np.float64)
    lanes8[grid(8 * nb)](x, offsets_dev, square, acc)
    a = acc.copy_to_host()
    return ((a[:, 0] + a[:, 1]) + (a[:, 2] + a[:, 3])) + ((a[:, 4] + a[:, 5]) + (a[:, 6] + a[:, 7]))


# ---- sign / block_sign ----------------------------------------------------------------------------
@cuda.jit
def sign_bytes(x, out, base):
    """out[base + j] = MSB-first bits (x[8 j + t] < 0), zero-padded past the end."""
    j = cuda.grid(1)
    d = x.shape[0]
    if j >= (d + 7) // 8:
        return
    v = 0
    for t in range(8):
        i = 8 * j + t
        bit = 0
        if i < d:
            if x[i] < np.float32(0):
                bit = 1
        v = (v << 1) | bit
    out[base + j] = v


@cuda.jit
def sign_expand(data, base, offsets, scales_u32, out_u32):
    """out_u32[i] = scale bits of i's block | sign bit << 31 (block found by binary search)."""
    i = cuda.grid(1)
    if i >= out_u32.shape[0]:
        return
    lo = 0
    hi = offsets.shape[0] - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if offsets[mid] <= i:
            lo = mid
        else:
            hi = mid - 1
    bit = (np.uint32(data[base + (i >> 3)]) >> np.uint32(7 - (i & 7))) & np.uint32(1)
    out_u32[i] = scales_u32[lo] | (bit << np.uint32(31))


@cuda.jit
def put_bytes(src, dst, base):
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[base + i] = src[i]


# ---- identity ---------------------------------------------------------------------------------------
@cuda.jit
def copy_u8(src, dst):
    i = cuda.grid(1)
    if i < src.shape[0]:
        dst[i] = src[i]


# ---- stochastic_bits --------------------------------------------------------------------------------
@cuda.jit
def sbits_levels(x, u, m64, scale, lv, zeta):
    """zeta_i = floor(q) + (U_i < q - floor(q)), q = clip((float64(x_i) - m) * scale, 0, L)."""
    i = cuda.grid(1)
    if i >= x.shape[0]:
        return
    q = (np.float64(x[i]) - m64) * scale
    if q < 0.0:        # clip to [0, L] (no builtin min/max: numba's built-in numba.cuda cannot
        q = 0.0        # compile them for a device)
    if q > lv:
        q = lv
    fl = math.floor(q)
    z = np.int64(fl)
    if np.float64(u[i]) < q - fl:
        z += 1
    zeta[i] = z


@cuda.jit
def pack_fields(zeta, b, out, base):
    """out[base + j] = byte j of the MSB-first b-bit fields of zeta (zero-padded): one thread
    per output byte, gathering the fields that overlap it."""
    j = cuda.grid(1)
    d = zeta.shape[0]
    nbytes = (b * d + 7) // 8
    if j >= nbytes:
        return
    v = 0
    p0 = 8 * j
    for t in range(8):
        p = p0 + t
        i = p // b
        bit = 0
        if i < d:
            k = p - i * b                       # bit k of field i, MSB first
            bit = (zeta[i] >> (b - 1 - k)) & 1
        v = (v << 1) | bit
    out[base + j] = v


@cuda.jit
def unpack_fields(data, base, b, tab, out):
    """out[i] = tab[field i] (b-bit fields MSB-first from data[base])."""
    i = cuda.grid(1)
    if i >= out.shape[0]:
        return
    z = np.int64(0)
    p = i * b
    for k in range(b):
        q = p + k
        bit = np.int64((data[base + (q >> 3)] >> (7 - (q & 7))) & 1)
        z = (z << 1) | bit
    out[i] = tab[z]


# ---- qsgd ------------------------------------------------------------------------------------------
@cuda.jit
def block_scan(length, pos, totals, per):
    """Exclusive prefix sum of ``length`` within blocks of ``per`` elements (one thread per
    block, sequential); totals[b] = the block's sum."""
    b = cuda.grid(1)
    n = length.shape[0]
    a = b * per
    if a >= n:
        return
    s = 0
    e = a + per
    if e > n:
        e = n
    for i in range(a, e):
        pos[i] = s
        s += length[i]
    totals[b] = s


@cuda.jit
def add_offsets(pos, offs, per, base):
    i = cuda.grid(1)
    if i < pos.shape[0]:
        pos[i] += offs[i // per] + base


@cuda.jit
def write_codes(code, length, pos, words):
    """OR code i (length[i] <= 64 bits) into the big-endian-bit uint32 words at bit pos[i]
    (atomic: neighbouring codes share words)."""
    i = cuda.grid(1)
    if i >= code.shape[0]:
        return
    L = length[i]
    p = pos[i]
    v = code[i]
    # emit from the most significant end, at most 32 bits per step
    while L > 0:
        w = p >> 5
        off = p & 31
        room = 32 - off
        take = room if room < L else L
        piece = np.uint32((v >> np.uint64(L - take)) & np.uint64((1 << take) - 1))
        cuda.atomic.or_(words, w, piece << np.uint32(room - take))
        p += take
        L -= take


@cuda.jit
def words_to_bytes(words, out, nbytes):
    j = cuda.grid(1)
    if j < nbytes:
        out[j] = (words[j >> 2] >> np.uint32(8 * (3 - (j & 3)))) & np.uint32(255)


# ---- randk -----------------------------------------------------------------------------------------
@cuda.jit
def gather_scale(x, idx, f, vals, bad):
    """vals[j] = x[idx[j]] * f (float32 product); bad[0] = 1 if a product is not finite."""
    j = cuda.grid(1)
    if j >= idx.shape[0]:
        return
    v = x[idx[j]] * f
    vals[j] = v
    if not math.isfinite(v):
        bad[0] = 1
