"""CUDA Python kernels (numba.cuda) of ``qsgd_ans`` (wire format: qprsgd/codecs/qsgd_ans.py;
constants and the numpy reference: ``_ans_kernels``): the same bytes and decoded values as the
CPU backends (tests/cuda_sim_check.py runs them in numba's simulator).

Mapping to the format:

* symbols: one thread per element (qsgd's float32 quantizer, as ``_cuda_kernels.qsgd_codes``),
  the symbol counts in a shared-memory histogram per block (atomics), then one atomic add per
  non-zero bin into the global histogram; the largest level by atomic max.  The frequency table
  is built on the host from the counts (2E + 1 numbers).  Escapes (rare) are compacted in element
  order by a per-1024-element count, a host prefix sum and a per-block write.
* rANS: **one block per chunk, one thread per lane** (up to 32).  The lanes of a chunk share one
  stream in which, group by group, the lanes that renormalise read (decoder) or write (encoder)
  one 16-bit word each in lane order; each step the block ORs the lanes' "needs a word" bits into
  a shared word (atomics, one barrier; three rotating words so one barrier per step suffices),
  and a lane's word is at p + 2 * popc(mask & lanes below it).  The escapes of a group are
  numbered the same way.  The encoder writes each chunk backwards into its own region of a
  scratch buffer; one block per chunk then copies the streams into the payload.
* draws: as the other CUDA backends, a numpy ``Generator`` on the host (``rng.random(d,
  dtype=float32)``), copied, so the generator state after encode is the CPU backends'.
"""
from __future__ import annotations

import math

import numpy as np

from . import _ans_kernels as A
from . import _cuda_kernels as K
from .base import CodecError, Payload

cuda = K.cuda
NA_MAX = 2 * 1024 + 1          # 2 E_MAX + 1: the largest alphabet
PER = 1024                     # elements per block of the escape compaction
SYM_TPB, SYM_EPT = 64, 32      # symbol kernel: threads per block, elements per thread
COPY_TPB = 64                  # copy kernels: threads per block (strided loops)


@cuda.jit
def ans_symbols(x, u, mode, c, s32, Ecap, syms, zeta, hist, zmax):
    """syms[i] = the symbol of element i (qsgd's quantizer; Ecap as the encoder's symbol map),
    zeta[i] its level (grid-stride loop); hist += the counts; zmax = max(zmax, level)."""
    sh = cuda.shared.array(NA_MAX, np.int32)
    smax = cuda.shared.array(1, np.uint32)
    tid = cuda.threadIdx.x
    na = 2 * Ecap + 1
    k = tid
    while k < na:
        sh[k] = 0
        k += cuda.blockDim.x
    if tid == 0:
        smax[0] = 0
    cuda.syncthreads()
    i = cuda.grid(1)
    zm = np.uint32(0)
    while i < x.shape[0]:
        xi = x[i]
        a = abs(xi)
        z = np.uint32(0)
        if mode != 0:
            if mode == 1:
                r = a * c
            else:
                r = (a / c) * s32
            if r > s32:        # (no builtin min/max in kernels: see _cuda_kernels)
                r = s32
            lv = np.int64(r)
            fr = r - np.float32(lv)
            z = np.uint32(lv)
            if u[i] < fr:
                z += np.uint32(1)
        neg = 0
        if xi < np.float32(0):
            neg = 1
        s = 0
        if z != 0:
            if z < Ecap:
                s = 2 * np.int64(z) - 1 + neg
            else:
                s = 2 * Ecap - 1 + neg
        syms[i] = s
        zeta[i] = z
        cuda.atomic.add(sh, s, 1)
        if z > zm:
            zm = z
        i += cuda.gridsize(1)
    cuda.atomic.max(smax, 0, zm)
    cuda.syncthreads()
    k = tid
    while k < na:
        if sh[k] != 0:
            cuda.atomic.add(hist, k, np.int64(sh[k]))
        k += cuda.blockDim.x
    if tid == 0:
        cuda.atomic.max(zmax, 0, smax[0])


@cuda.jit
def esc_count(syms, lim, per, cnt):
    """cnt[b] = escapes (symbols >= lim) among elements b per .. (b + 1) per - 1."""
    b = cuda.grid(1)
    n = syms.shape[0]
    a = b * per
    if a >= n:
        return
    m = 0
    e = a + per
    if e > n:
        e = n
    for i in range(a, e):
        if syms[i] >= lim:
            m += 1
    cnt[b] = m


@cuda.jit
def esc_write(syms, zeta, lim, Ecap, per, offs, ev):
    """ev[offs[b] + r] = level - Ecap of the r-th escape of block b (element order)."""
    b = cuda.grid(1)
    n = syms.shape[0]
    a = b * per
    if a >= n:
        return
    o = offs[b]
    e = a + per
    if e > n:
        e = n
    for i in range(a, e):
        if syms[i] >= lim:
            ev[o] = zeta[i] - np.uint32(Ecap)
            o += 1


@cuda.jit
def ans_encode(syms, ca, cn, cw, ec, buf, cap, starts):
    """Block t encodes chunk t, thread j its lane j: the stream written backwards (bytes, 16-bit
    words little-endian) ending at buf[2 (t + 1) cap]; starts[t] = its first word."""
    t = cuda.blockIdx.x
    j = cuda.threadIdx.x
    sm = cuda.shared.array(3, np.uint32)
    if j == 0:
        sm[0] = 0
        sm[1] = 0
        sm[2] = 0
    cuda.syncthreads()
    a = ca[t]
    n = cn[t]
    W = cw[t]
    G = (n + W - 1) // W
    bit = np.uint32(1) << np.uint32(j)
    below = bit - np.uint32(1)
    x = np.uint64(A.RANS_L)
    p = (t + 1) * cap
    for it in range(G):
        g = G - 1 - it
        k = g * W + j
        act = j < W and k < n
        need = False
        e = np.uint64(0)
        f = np.uint64(0)
        if act:
            e = ec[syms[a + k]]
            f = ((e >> np.uint64(A.EF_SHIFT)) & np.uint64(A.EF_MASK)) + np.uint64(1)
            need = (x >> np.uint64(A.RENORM_SHIFT)) >= f
        sl = it % 3
        if need:
            cuda.atomic.or_(sm, sl, bit)
        cuda.syncthreads()
        m = sm[sl]
        if j == 0:
            sm[(it + 2) % 3] = 0
        cnt = cuda.popc(m)
        if need:
            q = 2 * (p - cnt + cuda.popc(m & below))
            buf[q] = np.uint8(x & np.uint64(255))
            buf[q + 1] = np.uint8((x >> np.uint64(8)) & np.uint64(255))
            x >>= np.uint64(16)
        p -= cnt
        if act:
            rcp = (e & np.uint64(A.RCP_TOP - 1)) | np.uint64(A.RCP_TOP)
            q64 = ((x * rcp) >> np.uint64(32)) >> (e >> np.uint64(A.ES_SHIFT))
            x = x + ((e >> np.uint64(A.EB_SHIFT)) & np.uint64(A.EB_MASK)) + \
                q64 * (np.uint64(A.M) - f)
    p -= 2 * W
    if j < W:
        q = 4 * j + 2 * p
        for b in range(4):
            buf[q + b] = np.uint8((x >> np.uint64(8 * b)) & np.uint64(255))
    if j == 0:
        starts[t] = p


@cuda.jit
def copy_streams(buf, starts, cap, offs, out):
    """Block t copies chunk t's stream (bytes 2 starts[t] .. 2 (t + 1) cap - 1 of buf) to
    out[offs[t]:]."""
    t = cuda.blockIdx.x
    src = 2 * starts[t]
    n = 2 * (t + 1) * cap - src
    o = offs[t]
    k = cuda.threadIdx.x
    while k < n:
        out[o + k] = buf[src + k]
        k += cuda.blockDim.x


@cuda.jit
def put_strided(src, dst, base):
    """dst[base:base + len(src)] = src (one block, strided)."""
    k = cuda.threadIdx.x
    while k < src.shape[0]:
        dst[base + k] = src[k]
        k += cuda.blockDim.x


@cuda.jit
def u32_bytes(v, out, base):
    i = cuda.grid(1)
    if i < v.shape[0]:
        w = v[i]
        for b in range(4):
            out[base + 4 * i + b] = np.uint8((w >> np.uint32(8 * b)) & np.uint32(255))


@cuda.jit
def ans_decode(data, offs, ca, cn, cw, tab, esc0, esc1, out32, escpos, res):
    """Block t decodes chunk t from data[offs[t]:offs[t + 1]], thread j its lane j; res[t] =
    (error, escapes) with the CPU decoder's codes, the escapes' 2 i + sign at escpos[a_t:]."""
    t = cuda.blockIdx.x
    j = cuda.threadIdx.x
    sm = cuda.shared.array(6, np.uint32)       # (needs a word, escape) x 3 rotating steps
    if j == 0:
        for k in range(6):
            sm[k] = 0
    cuda.syncthreads()
    ps = offs[t]
    pe = offs[t + 1]
    a = ca[t]
    n = cn[t]
    W = cw[t]
    if pe - ps < 4 * W:
        if j == 0:
            res[t, 0] = A.ERR_PASTEND
            res[t, 1] = 0
        return
    L = np.uint64(A.RANS_L)
    x = L
    bad = 0
    if j < W:
        q = ps + 4 * j
        x = np.uint64(data[q]) | (np.uint64(data[q + 1]) << np.uint64(8)) | \
            (np.uint64(data[q + 2]) << np.uint64(16)) | (np.uint64(data[q + 3]) << np.uint64(24))
        if x < L or x >= np.uint64(1 << 31):
            bad = 1
    if cuda.syncthreads_or(bad):
        if j == 0:
            res[t, 0] = A.ERR_STATE
            res[t, 1] = 0
        return
    bit = np.uint32(1) << np.uint32(j)
    below = bit - np.uint32(1)
    p = ps + 4 * W
    ne = 0
    G = (n + W - 1) // W
    for g in range(G):
        k = g * W + j
        act = j < W and k < n
        need = False
        isesc = False
        slot = np.uint64(0)
        if act:
            slot = x & np.uint64(A.M - 1)
            e = tab[slot]
            f = (e >> np.uint64(A.DF_SHIFT)) & np.uint64(A.DF_MASK)
            x = f * (x >> np.uint64(A.SCALE_BITS)) + \
                ((e >> np.uint64(A.DB_SHIFT)) & np.uint64(A.DB_MASK))
            out32[a + k] = np.uint32(e & np.uint64(0xFFFFFFFF))
            isesc = slot >= esc0
            need = x < L
        sl = g % 3
        if need:
            cuda.atomic.or_(sm, 2 * sl, bit)
        if isesc:
            cuda.atomic.or_(sm, 2 * sl + 1, bit)
        cuda.syncthreads()
        mn = sm[2 * sl]
        me = sm[2 * sl + 1]
        if j == 0:
            nx = (g + 2) % 3
            sm[2 * nx] = 0
            sm[2 * nx + 1] = 0
        if isesc:
            neg = 0
            if slot >= esc1:
                neg = 1
            escpos[a + ne + cuda.popc(me & below)] = 2 * (a + k) + neg
        ne += cuda.popc(me)
        cnt = cuda.popc(mn)
        if p + 2 * cnt > pe:
            if j == 0:
                res[t, 0] = A.ERR_PASTEND
                res[t, 1] = ne
            return
        if need:
            q = p + 2 * cuda.popc(mn & below)
            x = (x << np.uint64(16)) | np.uint64(data[q]) | (np.uint64(data[q + 1]) << np.uint64(8))
        p += 2 * cnt
    bad = 0
    if (j < W and x != L) or p != pe:
        bad = 1
    if cuda.syncthreads_or(bad):
        if j == 0:
            res[t, 0] = A.ERR_STATE
            res[t, 1] = ne
        return
    if j == 0:
        res[t, 0] = A.ERR_OK
        res[t, 1] = ne


@cuda.jit
def scatter_f32(out, idx, vals):
    i = cuda.grid(1)
    if i < idx.shape[0]:
        out[idx[i]] = vals[i]


class QSGDAnsCuda:
    """``qsgd_ans`` on the GPU (module docstring); the codec does the table and header work on
    the host (a few kB)."""

    def __init__(self, c):
        self.c = c
        self._plan_dev = None

    def _plan(self):
        c = self.c
        key = (c.chunk_elems, c.lane_elems)
        if self._plan_dev is None or self._plan_dev[0] != key:
            pl = c.plan
            self._plan_dev = (key, tuple(cuda.to_device(np.ascontiguousarray(v)) for v in pl),
                              max(1, int(pl[2].max())))
        return self._plan_dev[1], self._plan_dev[2]

    def _norm(self, xd):
        c = self.c
        acc = float(K.fixed_sums(xd, cuda.to_device(np.array([0, c.d], np.int64)), 1, True)[0])
        if not math.isfinite(acc):
            raise CodecError(f"{c.name}: cannot encode a vector holding NaN or Inf")
        with np.errstate(over="ignore"):
            return np.float32(math.sqrt(acc))

    def encode(self, x, rng, u):
        from .qsgd import draw_uniform32

        c = self.c
        d = c.d
        if x.ndim != 1 or x.shape[0] != d:
            raise CodecError(f"{c.name}: expected a vector of length d={d}, "
                             f"got shape {tuple(x.shape)}")
        xd = K.dev(x)
        norm = self._norm(xd)
        if u is None:
            u = draw_uniform32(np, rng, d)
        if hasattr(u, "__cuda_array_interface__"):
            ud = K.dev(u)
        else:
            ud = np.ascontiguousarray(u, dtype=np.float32)
        if ud.shape != (d,):
            raise CodecError(f"expected {d} uniforms, got shape {tuple(ud.shape)}")
        if not math.isfinite(float(norm)):
            raise CodecError(f"{c.name}: the norm of the input overflows float32")
        mode, cc = 0, np.float32(0)
        if norm != 0:
            with np.errstate(over="ignore"):
                cc = np.float32(c.s / float(norm))
            mode, cc = (1, cc) if math.isfinite(float(cc)) else (2, norm)
        Ecap = c.ecap
        syms = K.empty(d, np.uint16)
        zeta = K.empty(d, np.uint32)
        hist = K.zeros(NA_MAX, np.int64)
        zmax = K.zeros(1, np.uint32)
        ans_symbols[-(-d // (SYM_TPB * SYM_EPT)), SYM_TPB](xd, ud, mode, cc,
                               np.float32(c.s), Ecap, syms, zeta, hist, zmax)
        counts = K.host(hist)[:2 * Ecap + 1]
        E, freq, cum = c._tables(counts, int(K.host(zmax)[0]))
        nesc = int(counts[2 * Ecap - 1] + counts[2 * Ecap])
        ec = cuda.to_device(A.enc_tables(freq, cum))
        (ca, cn, cw), bd = self._plan()
        nch = c.nch
        cap = c.chunk_elems + 2 * A.MAX_LANES + 2          # words per chunk's region
        buf = K.empty(2 * nch * cap, np.uint8)
        starts_d = K.empty(nch, np.int64)
        ans_encode[nch, bd](syms, ca, cn, cw, ec, buf, cap, starts_d)
        starts = K.host(starts_d)
        hi = (np.arange(nch, dtype=np.int64) + 1) * cap
        lens = 2 * (hi - starts)
        head = c._head(norm, E, freq, lens)
        h = head.shape[0]
        total = h + int(lens.sum()) + 4 * nesc
        out = K.empty(total, np.uint8)
        put_strided[1, COPY_TPB](cuda.to_device(head), out, 0)
        offs = h + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        copy_streams[nch, COPY_TPB](buf, starts_d, cap, cuda.to_device(offs), out)
        if nesc:
            nb = (d + PER - 1) // PER
            cnt = K.empty(nb, np.int64)
            lim = 2 * Ecap - 1
            esc_count[K.grid(nb)](syms, lim, PER, cnt)
            eo = np.concatenate([[0], np.cumsum(K.host(cnt))[:-1]]).astype(np.int64)
            ev = K.empty(nesc, np.uint32)
            esc_write[K.grid(nb)](syms, zeta, lim, Ecap, PER, cuda.to_device(eo), ev)
            u32_bytes[K.grid(nesc)](ev, out, total - 4 * nesc)
        return Payload(K.wrap(out, c.xp), 8 * total)

    def decode(self, data, out=None):
        c = self.c
        data, norm = c._header(data)
        n = int(data.shape[0])
        head = K.host(data[:min(n, c.head_max())])
        E, freq, cum, offs = c._parse(head, n)
        tab, esc0, esc1 = c._dec_table(norm, E, freq, cum)
        out = c._out(out)
        od = K.dev(out)
        (ca, cn, cw), bd = self._plan()
        nch = c.nch
        escpos = K.empty(c.d, np.int64)
        res = K.zeros(2 * nch, np.int64)
        dd = K.dev(data)
        ans_decode[nch, bd](dd, cuda.to_device(offs), ca, cn, cw, cuda.to_device(tab),
                            np.uint64(esc0), np.uint64(esc1), od.view(np.uint32), escpos,
                            res.reshape((nch, 2)))
        r = K.host(res).reshape((nch, 2))
        nesc = c._check(r, offs, n)
        if nesc:
            end = int(offs[-1])
            v = c._escape_values(K.host(data[end:]), E, norm)
            a = c.plan[0]
            pos = np.concatenate([K.host(escpos[int(a[t]):int(a[t]) + int(r[t, 1])])
                                  for t in range(nch) if r[t, 1]])
            vals = np.where((pos & 1) == 1, -v, v).astype(np.float32)
            scatter_f32[K.grid(nesc)](od, cuda.to_device(pos >> 1), cuda.to_device(vals))
        if isinstance(out, np.ndarray) and od is not out and hasattr(od, "copy_to_host"):
            od.copy_to_host(out)
        return out
