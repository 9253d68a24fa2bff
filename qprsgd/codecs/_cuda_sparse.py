"""CUDA backends (numba.cuda kernels and backend objects) of the sparsifiers ``topk`` and
``bernoulli_p`` (wire format: qprsgd/codecs/sparse.py).  Same payload bytes, decoded vectors and
generator state as the CPU backends; tests/cuda_sim_check.py runs every kernel here in numba's
CUDA simulator against the numpy backend.

Both encoders end in one *ordered* compaction: the kept elements are marked in a bitmap of
ceil(d / 32) uint32 words (bit j of word w is element 32 w + j), the words' popcounts get an
exclusive prefix sum (``PER`` words per thread, sequentially, then the per-thread totals summed on
the host), and one thread per word writes its kept elements' indices and values at their rank --
so the records come out in ascending index order without a sort, and the ordering costs a pass
over d / 8 bytes, not over x.

topk, exact (the first k of a full sort by (-|x_i|, i), as the CPU backends):
  1. threshold t on the magnitude bits: the CPU backends' strided sample (``sample`` elements,
     gathered on the device; only they cross to the host) and its order statistic
     (``sparse.sample_threshold``); t = 0 for d <= 4 ``sample``;
  2. one filtering pass: every element with |x| bits >= t appends its key
     (~|x| bits) << 32 | i -- ascending key = descending magnitude, ties by ascending index, all
     keys distinct -- to a candidate list through a per-block shared counter and one global atomic
     per block (candidate order is arbitrary); the same pass flags NaN/Inf; if fewer than k
     candidates pass, the pass is repeated with t = 0;
  3. radix select of the k-th smallest candidate key, 8 bits per pass from the top: a
     256-bin histogram (shared memory per block, then global atomics) of the candidates that
     match the digits chosen so far; the host picks the bin where the running count reaches the
     remaining rank and stops as soon as that bin holds exactly the remaining rank (typically
     after the 3-4 magnitude digits; ties need index digits, at most 8 passes);
  4. the candidates with key <= that bound -- exactly k, keys being distinct -- set their bit in
     the bitmap (atomic OR), then the ordered compaction writes indices and raw value bits.
  To the host: the sample (when d > 4 ``sample``), the candidate count and NaN flag, one
  256-count histogram per radix pass, the per-thread popcount totals.

bernoulli_p: a NaN/Inf flag pass over x (before drawing, as the CPU: an error leaves the generator
untouched); the uniforms are drawn on the host by the numpy ``Generator`` (``rng.random(d,
dtype=float32)``, as every CUDA backend here) and copied to the device; one thread per bitmap
word sets bit j iff U_i < float32(p); the ordered compaction writes the indices and
float32(float64(x_i) / p), flagging a non-finite quotient.  To the host: the NaN flag, the
popcount totals (their sum is the count k), the overflow flag.

Decode (both, and through ``unpack``): one thread per record checks index range, strict increase
(against the previous record) and finiteness into three flags; the host raises the CPU's
CodecError for the first one set, in the CPU's order; then out is zeroed and one thread per
record writes the value bits at its index.

Records are written as uint32 / float32 words through views of the payload bytes: the wire is
little-endian, as every CUDA device (and the simulator's x86 host) is.
"""
from __future__ import annotations

import math

import numpy as np

from . import _cuda_kernels as K
from .base import CodecError
from .sparse import _SAMPLE, sample_threshold

cuda = K.cuda

PER = 256          # bitmap words per thread in the popcount prefix sum
_MASK = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)
_ALL = (1 << 64) - 1


def grid(n: int) -> tuple[int, int]:
    """Launch shape for n threads: the fewest blocks of at most ``K.TPB`` threads, each a
    multiple of 32 threads and as even as that allows (a small launch gets one small block and
    few idle threads: the simulator runs every thread as a Python thread)."""
    n = max(1, int(n))
    nb = (n + K.TPB - 1) // K.TPB
    per = (n + nb - 1) // nb
    return (nb, 32 * ((per + 31) // 32))


def to_dev(a):
    """A device array of ``a``: zero-copy for ``__cuda_array_interface__`` arrays, one host ->
    device copy otherwise (so a numpy input crosses once, not around every kernel)."""
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)
    return cuda.to_device(np.ascontiguousarray(a))


def as_f32(c, x):
    """x as a contiguous float32 device vector of length c.d (CodecError on another shape, the
    CPU backends' message); converted with the codec's array module when it is another dtype
    or strided."""
    if x.ndim != 1 or x.shape[0] != c.d:
        raise CodecError(f"{c.name}: expected a vector of length d={c.d}, "
                         f"got shape {tuple(x.shape)}")
    if hasattr(x, "__cuda_array_interface__"):
        xd = cuda.as_cuda_array(x)
        if xd.dtype == np.float32 and xd.is_c_contiguous():
            return xd
        xp = c.xp
        return cuda.as_cuda_array(xp.ascontiguousarray(xp.asarray(x), dtype=xp.float32))
    return cuda.to_device(np.ascontiguousarray(x, dtype=np.float32))


def _scratch(c, name, n, dtype):
    """A per-thread device buffer of the codec (allocated once; the codec may be shared by
    threads)."""
    sc = c._thread_scratch()
    key = "cuda_" + name
    a = sc.get(key)
    if a is None:
        a = sc[key] = K.empty(n, dtype)
    return a


# ---- kernels ---------------------------------------------------------------------------------
@cuda.jit
def zero(a):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = 0


@cuda.jit
def nonfinite_flag(xb, flag):
    """flag[0] = 1 if some |x| bits >= 0x7f800000 (NaN or Inf)."""
    i = cuda.grid(1)
    if i < xb.shape[0] and (xb[i] & _MASK) >= _INF:
        flag[0] = 1


@cuda.jit
def gather_sample(xb, step, out):
    """out[j] = |x| bits of element j * step (the CPU's strided sample)."""
    j = cuda.grid(1)
    if j < out.shape[0]:
        out[j] = xb[j * step] & _MASK


@cuda.jit
def filter_keys(xb, t, keys, res):
    """Append key (~a) << 32 | i of every element with a = |x_i| bits >= t to keys[res[0]...]
    (res[0] counts them; order arbitrary); res[1] = 1 if some a >= 0x7f800000.  Each block counts
    its candidates in shared memory and reserves its range with one global atomic."""
    sh = cuda.shared.array(2, np.int64)
    tid = cuda.threadIdx.x
    i = cuda.grid(1)
    if tid == 0:
        sh[0] = 0
    cuda.syncthreads()
    slot = -1
    key = np.uint64(0)
    if i < xb.shape[0]:
        a = xb[i] & _MASK
        if a >= _INF:
            res[1] = 1
        if a >= t:
            key = ((np.uint64(0xFFFFFFFF) - np.uint64(a)) << np.uint64(32)) | np.uint64(i)
            slot = cuda.atomic.add(sh, 0, 1)
    cuda.syncthreads()
    if tid == 0:
        sh[1] = cuda.atomic.add(res, 0, sh[0])
    cuda.syncthreads()
    if slot >= 0:
        keys[sh[1] + slot] = key


@cuda.jit
def radix_hist(keys, n, shift, mask, prefix, hist):
    """hist[b] += #{candidates j < n : keys[j] & mask == prefix, digit (keys[j] >> shift) & 255
    == b}: a shared-memory histogram per block, added to the global one."""
    sh = cuda.shared.array(256, np.int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for b in range(tid, 256, nt):
        sh[b] = 0
    cuda.syncthreads()
    j = cuda.grid(1)
    if j < n:
        key = keys[j]
        if (key & mask) == prefix:
            cuda.atomic.add(sh, np.int64((key >> shift) & np.uint64(255)), 1)
    cuda.syncthreads()
    for b in range(tid, 256, nt):
        if sh[b] != 0:
            cuda.atomic.add(hist, b, np.int64(sh[b]))


@cuda.jit
def mark_le(keys, n, bound, words):
    """Set bit i of the bitmap for every candidate with key <= bound (i = the key's low word)."""
    j = cuda.grid(1)
    if j < n:
        key = keys[j]
        if key <= bound:
            i = np.int64(key & np.uint64(0xFFFFFFFF))
            cuda.atomic.or_(words, i >> 5, np.uint32(1 << (i & 31)))


@cuda.jit
def keep_words(u, p32, words):
    """words[w] bit j = (U_i < p32), i = 32 w + j < d (bernoulli_p's keep decision)."""
    w = cuda.grid(1)
    if w >= words.shape[0]:
        return
    d = u.shape[0]
    v = np.uint32(0)
    for j in range(32):
        i = 32 * w + j
        if i < d and u[i] < p32:
            v |= np.uint32(1 << j)
    words[w] = v


@cuda.jit
def popc_scan(words, pos, totals, per):
    """pos[w] = popcounts of the earlier words of w's run of ``per`` words; totals[r] = run r's
    popcount (one thread per run, sequentially)."""
    r = cuda.grid(1)
    a = r * per
    n = words.shape[0]
    if a >= n:
        return
    e = a + per
    if e > n:
        e = n
    s = 0
    for w in range(a, e):
        pos[w] = s
        s += cuda.popc(words[w])
    totals[r] = s


@cuda.jit
def emit(words, pos, offs, per, xb, xf, mode, p, d, k, h4, out32, outf, bad):
    """Ordered compaction: word w's set bits i (ascending) get rank o = offs[w // per] + pos[w] +
    (earlier set bits of w); record o is index i at out32[h4 + o] and its value at word h4 + k + o:
    the raw bits of x_i (mode 0, topk) or float32(float64(x_i) / p) (mode 1, bernoulli_p; bad[0] = 1
    if one is not finite).  Thread 0 writes the header words d (and k when h4 == 2)."""
    w = cuda.grid(1)
    if w == 0:
        out32[0] = d
        if h4 == 2:
            out32[1] = k
    if w >= words.shape[0]:
        return
    m = words[w]
    if m == 0:
        return
    o = offs[w // per] + pos[w]
    for j in range(32):
        if (m >> np.uint32(j)) & np.uint32(1):
            i = 32 * w + j
            out32[h4 + o] = i
            if mode == 0:
                out32[h4 + k + o] = xb[i]
            else:
                v = np.float32(np.float64(xf[i]) / p)
                if not math.isfinite(v):
                    bad[0] = 1
                outf[h4 + k + o] = v
            o += 1


@cuda.jit
def check_records(data, h, k, d, res):
    """Record j (index at bytes h + 4 j, value at h + 4 k + 4 j, little-endian): res[0] = 1 if an
    index >= d, res[1] = 1 if not above the previous index, res[2] = 1 if a value is NaN/Inf."""
    j = cuda.grid(1)
    if j >= k:
        return
    q = h + 4 * j
    i = (np.uint32(data[q]) | (np.uint32(data[q + 1]) << np.uint32(8))
         | (np.uint32(data[q + 2]) << np.uint32(16))
         | (np.uint32(data[q + 3]) << np.uint32(24)))
    if np.int64(i) >= d:
        res[0] = 1
    if j > 0:
        q -= 4
        prev = (np.uint32(data[q]) | (np.uint32(data[q + 1]) << np.uint32(8))
                | (np.uint32(data[q + 2]) << np.uint32(16))
                | (np.uint32(data[q + 3]) << np.uint32(24)))
        if i <= prev:
            res[1] = 1
    q = h + 4 * k + 4 * j
    if (data[q + 3] & 0x7F) == 0x7F and (data[q + 2] & 0x80) != 0:
        res[2] = 1


@cuda.jit
def scatter_records(data, h, k, out32):
    """out32[index of record j] = value bits of record j (records already checked)."""
    j = cuda.grid(1)
    if j >= k:
        return
    q = h + 4 * j
    i = (np.int64(data[q]) | (np.int64(data[q + 1]) << 8) | (np.int64(data[q + 2]) << 16)
         | (np.int64(data[q + 3]) << 24))
    q = h + 4 * k + 4 * j
    out32[i] = (np.uint32(data[q]) | (np.uint32(data[q + 1]) << np.uint32(8))
                | (np.uint32(data[q + 2]) << np.uint32(16))
                | (np.uint32(data[q + 3]) << np.uint32(24)))


# ---- shared host steps -----------------------------------------------------------------------
def _compact(c, words, xd, mode, p, h4, k_expected=None):
    """The ordered compaction of the bitmap ``words`` into a fresh payload (uint8 device array of
    4 h4 + 8 k bytes) and k; ``mode``/``p`` as :func:`emit`; CodecError when a bernoulli_p
    quotient overflows."""
    nw = int(words.shape[0])
    nr = (nw + PER - 1) // PER
    pos = _scratch(c, "pos", nw, np.int64)
    totals = _scratch(c, "totals", nr, np.int64)
    popc_scan[grid(nr)](words, pos, totals, PER)
    t = K.host(totals)
    k = int(t.sum())
    if k_expected is not None and k != k_expected:  # keys are distinct: cannot happen
        raise RuntimeError(f"{c.name}: selected {k} of k={k_expected}")
    offs = np.zeros(nr, dtype=np.int64)
    np.cumsum(t[:-1], out=offs[1:])
    out = K.empty(4 * h4 + 8 * k, np.uint8)
    bad = K.zeros(1, np.int32)
    emit[grid(nw)](words, pos, cuda.to_device(offs), PER, xd.view(np.uint32), xd, mode,
                   np.float64(p), c.d, k, h4, out.view(np.uint32), out.view(np.float32), bad)
    if mode == 1 and int(K.host(bad)[0]):
        raise CodecError(f"{c.name}: z/p overflows float32")
    return out, k


class _SparseCuda:
    """Device decode shared by the sparse families (the codec checks the d field and length)."""

    def __init__(self, c):
        self.c = c

    def unpack(self, data, k, h, out):
        c = self.c
        dd = to_dev(data)
        if k:
            res = K.zeros(3, np.int32)
            check_records[grid(k)](dd, h, k, c.d, res)
            r = K.host(res)
            for code in range(3):
                if r[code]:
                    raise c._record_error(code)
        out = c._out(out)
        on_dev = hasattr(out, "__cuda_array_interface__")
        od = cuda.as_cuda_array(out) if on_dev else K.empty(c.d, np.float32)
        o32 = od.view(np.uint32)
        zero[grid(c.d)](o32)
        if k:
            scatter_records[grid(k)](dd, h, k, o32)
        if not on_dev:
            od.copy_to_host(out)
        return out


class TopkCuda(_SparseCuda):
    """topk: sampled threshold, filtering pass with block-aggregated atomic compaction, radix
    select of the k-th key, bitmap + ordered compaction (module docstring)."""

    #: the strided sample's size; a threshold is used for d > 4 ``sample``.  A class attribute
    #: so that the simulator test can shrink it to reach the threshold path on small vectors
    #: (only speed depends on it: the selection is exact).
    sample = _SAMPLE

    def __init__(self, c):
        super().__init__(c)
        #: what the last encode did (threshold t, candidates of the first filtering pass,
        #: whether it fell back to t = 0, radix passes), for tests and benchmarks
        self.last = None

    def encode(self, x):
        c = self.c
        d, k = c.d, c.k
        xd = as_f32(c, x)
        xb = xd.view(np.uint32)
        t = 0
        if d > 4 * self.sample:
            smp = _scratch(c, f"sample{self.sample}", self.sample, np.uint32)
            gather_sample[grid(self.sample)](xb, d // self.sample, smp)
            t = sample_threshold(K.host(smp), k, d)
        keys = _scratch(c, "keys", d, np.uint64)
        n = n_first = self._filter(xb, t, keys)
        if n < k:
            n = self._filter(xb, 0, keys)
        bound, passes = self._kth(keys, n, k) if n > k else (_ALL, 0)
        self.last = {"t": t, "candidates": n_first, "fallback": n_first < k, "passes": passes}
        words = _scratch(c, "words", (d + 31) // 32, np.uint32)
        zero[grid(words.shape[0])](words)
        mark_le[grid(n)](keys, n, np.uint64(bound), words)
        out, _ = _compact(c, words, xd, 0, 1.0, 1, k_expected=k)
        return K.wrap(out, c.xp)

    def _filter(self, xb, t, keys) -> int:
        res = K.zeros(2, np.int64)
        filter_keys[grid(xb.shape[0])](xb, np.uint32(t), keys, res)
        n, nonfinite = (int(v) for v in K.host(res))
        if nonfinite:
            raise CodecError(f"{self.c.name}: cannot encode a vector holding NaN or Inf")
        return n

    @staticmethod
    def _kth(keys, n: int, k: int) -> tuple[int, int]:
        """(bound, passes): the largest key value b such that exactly k of the n distinct
        candidate keys are <= b, by radix select 8 bits at a time from the top."""
        hist = K.zeros(8 * 256, np.int64)
        prefix = mask = 0
        rank = k                                    # the bound's rank among the keys left
        for p, shift in enumerate(range(56, -8, -8)):
            row = hist[256 * p:256 * (p + 1)]
            radix_hist[grid(n)](keys, n, np.uint64(shift), np.uint64(mask), np.uint64(prefix), row)
            h = K.host(row)
            cum = np.cumsum(h)
            b = int(np.searchsorted(cum, rank))     # first bin whose running count reaches rank
            rank -= int(cum[b] - h[b])
            prefix |= b << shift
            mask |= 255 << shift
            if int(h[b]) == rank:
                return prefix | ((1 << shift) - 1), p + 1
        raise RuntimeError("topk: radix select found no bound (duplicate keys)")


class BernoulliCuda(_SparseCuda):
    """bernoulli_p: NaN flag pass, host draws copied over, keep bitmap from U < float32(p),
    ordered compaction with the float64 division (module docstring)."""

    def encode(self, x, rng):
        from .qsgd import draw_uniform32

        c = self.c
        xd = as_f32(c, x)
        flag = K.zeros(1, np.int32)
        nonfinite_flag[grid(c.d)](xd.view(np.uint32), flag)
        if int(K.host(flag)[0]):
            raise CodecError(f"{c.name}: cannot encode a vector holding NaN or Inf")
        u = to_dev(draw_uniform32(c.xp, rng, c.d))
        words = _scratch(c, "words", (c.d + 31) // 32, np.uint32)
        keep_words[grid(words.shape[0])](u, np.float32(c.p), words)
        out, k = _compact(c, words, xd, 1, c.p, 2)
        return K.wrap(out, c.xp), k
