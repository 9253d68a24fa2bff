"""Sparsifiers: ``topk`` (dist-ef L46), ``randk`` (beyond the papers), ``bernoulli_p``
(dcd-ecd footnote 2).

Index coding (all three): absolute element indices as little-endian uint32, strictly increasing;
values as little-endian float32 in the same order.
  topk, randk (k fixed by the config):  [uint32 d][k uint32 indices][k float32 values]  nbits = 32 + 64 k
  bernoulli_p (k random):               [uint32 d][uint32 k][k uint32 indices][k float32]
                                                                                 nbits = 64 + 64 k
Decoding rejects a payload for another d (the d field), a wrong length, indices >= d or not
strictly increasing, non-finite values.

Backends (``backend=``, see :mod:`.backends`; all give the same bytes, decoded vectors and
generator state):
  topk         numpy (vectorized: sampled threshold, ``flatnonzero``, ``partition`` of the keys),
               numba (``_nb_topk.py``: the same selection, one fused filter + NaN pass),
               cuda (``_cuda_sparse.py``: the same threshold, a filtering pass with block-aggregated
               atomic compaction, radix select of the k-th key, bitmap + ordered compaction)
  randk        numpy, cuda (``_cuda_backends.py``: host ``rng.choice``, device gather/scale/pack)
  bernoulli_p  numpy, cuda (``_cuda_sparse.py``: host draws copied over, keep bitmap, ordered
               compaction with the float64 division)
Decoding runs on the device for topk and bernoulli_p with the cuda backend (``unpack``: checks
into flags, then zero and scatter), with the array module otherwise.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..registry import CODECS
from .base import Codec, CodecError, Payload
from .qsgd import draw_uniform32


class KParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: Optional[int] = Field(None, ge=1)
    ratio: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.k is None) == (self.ratio is None):
            raise ValueError("give exactly one of k, ratio")
        return self


class BernoulliParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    p: float = Field(..., gt=0, le=1)


def _host(xp, a):
    return a if xp is np else a.get()


class _Sparse(Codec):
    def _pack(self, idx, vals, header=()):
        """uint32 d, the uint32 ``header`` fields, k uint32 indices, k float32 values (LE)."""
        xp = self.xp
        k = int(idx.shape[0])
        head = np.array((self.d,) + tuple(header), dtype="<u4")
        h = 4 * head.shape[0]
        data = xp.empty(h + 8 * k, dtype=xp.uint8)
        data[:h] = xp.asarray(head.view(np.uint8))
        data[h:h + 4 * k] = idx.astype("<u4").view(xp.uint8)
        data[h + 4 * k:] = vals.astype("<f4").view(xp.uint8)
        return data

    def _check_d(self, data):
        """The payload's d field against the codec's (CodecError: a payload for another d)."""
        if int(data.shape[0]) < 4:
            raise CodecError(f"{self.name}: payload truncated (no d)")
        d = int(np.frombuffer(_host(self.xp, data[:4]).tobytes(), dtype="<u4")[0])
        if d != self.d:
            raise CodecError(f"{self.name}: payload is for d={d}, this codec has d={self.d}")

    def _record_error(self, code: int) -> CodecError:
        """The CodecError of a bad index/value record section, checked in this order: 0 an
        index >= d, 1 indices not strictly increasing, 2 a non-finite value (every backend's
        message)."""
        return CodecError(f"{self.name}: " + ("index out of range (>= d={d})",
                                               "indices not strictly increasing",
                                               "non-finite value (NaN/Inf)")[code].format(d=self.d))

    def _unpack(self, data, k, h, out=None):
        """Check the k records from byte h and scatter them into ``out`` (zeros elsewhere): on
        the device when the backend object has an ``unpack`` (the CUDA ones), else with the
        array module (:meth:`_unpack_xp`)."""
        unpack = getattr(self.impl, "unpack", None)
        if unpack is not None:
            return unpack(data, k, h, out)
        return self._unpack_xp(data, k, h, out)

    def _unpack_xp(self, data, k, h, out=None):
        xp = self.xp
        idx = data[h:h + 4 * k].copy().view("<u4").astype(xp.int64)
        vals = data[h + 4 * k:h + 8 * k].copy().view("<f4").astype(xp.float32)
        if k:
            if int(idx[-1]) >= self.d or int(idx.max()) >= self.d:
                raise self._record_error(0)
            if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise self._record_error(1)
            if not bool(xp.isfinite(vals).all()):
                raise self._record_error(2)
        out = self._out(out, zero=True)
        out[idx] = vals
        return out


class _FixedK(_Sparse):
    def __init__(self, d, blocks=None, xp=np, k: Optional[int] = None, ratio: Optional[float] = None,
                 **kw):
        super().__init__(d, blocks, xp, **kw)
        if k is None and ratio is None:
            raise ValueError(f"{self.name}: give k or ratio")
        self.k = int(k) if k is not None else max(1, math.ceil(float(ratio) * self.d))
        if not 1 <= self.k <= self.d:
            raise ValueError(f"{self.name}: k must be in [1, d={self.d}], got {self.k}")

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, k={self.k})"

    def decode(self, data, out=None):
        data = self._as_bytes(data)
        self._check_d(data)
        n, want = int(data.shape[0]), 4 + 8 * self.k
        if n != want:
            raise CodecError(f"{self.name}: payload {'truncated' if n < want else 'extended'} "
                             f"({n} bytes, expected {want})")
        return self._unpack(data, self.k, 4, out)


_MASK = 0x7FFFFFFF
_SAMPLE = 1 << 16   # elements in the strided sample that sets the filtering threshold


def topk_argpartition(x, k: int):
    """The previous top-k selection (kept as the benchmark's baseline): ``argpartition`` over
    the whole |x|, then a sort of the k indices; ties at the threshold are not broken by index."""
    d = x.shape[0]
    idx = np.argpartition(np.abs(x), d - k)[d - k:]
    idx.sort()
    return idx


def topk_threshold(xb, k: int) -> int:
    """Magnitude-bits threshold t for the filtering pass: a strided sample of ``_SAMPLE``
    elements of ``xb`` (x's float32 bits as uint32; masked to |x| here), its order statistic at rank
    q m + 4 sqrt(q m) + 2 from the top (q = k / d), so about k (1 + 4 / sqrt(q m)) elements
    pass.  0 (every element) for short vectors.  Only speed depends on it: the selection
    among the candidates is exact, and a threshold that lets fewer than k through is retried
    with 0."""
    d = int(xb.shape[0])
    if d <= 4 * _SAMPLE:
        return 0
    return sample_threshold(np.asarray(xb[::d // _SAMPLE][:_SAMPLE]) & np.uint32(_MASK), k, d)


def sample_threshold(sample, k: int, d: int) -> int:
    """:func:`topk_threshold` from the masked magnitude bits of the strided sample (the CUDA
    backend gathers them on the device and brings only them to the host)."""
    m = int(sample.shape[0])
    qm = k * m / d
    r = int(math.ceil(qm + 4 * math.sqrt(qm) + 2))
    if r >= m:
        return 0
    return int(np.partition(sample, m - r)[m - r])


def _keys(xp, ab_c, cand):
    """(~|x| bits) << 32 | index: ascending = descending magnitude, ties by ascending index."""
    a = (xp.bitwise_not(ab_c) & xp.uint32(0xFFFFFFFF)).astype(xp.uint64)
    return (a << xp.uint64(32)) | cand.astype(xp.uint64)


class _TopkNumpy:
    """Vectorized top-k (any array module): threshold from a sample, one filtering pass
    (``flatnonzero``), then ``partition`` of the candidates' keys for the exact k-th key."""

    def __init__(self, c):
        self.c = c

    def encode(self, x):
        return self.c._pack(*self.select(x))

    def select(self, x):
        c, xp = self.c, self.c.xp
        x = c._check_input(x)
        k = c.k
        xb = xp.ascontiguousarray(x).view(xp.uint32)
        t = topk_threshold(xb if xp is np else xb.get(), k)
        ab = xb & xp.uint32(_MASK)
        cand = xp.flatnonzero(ab >= xp.uint32(t))
        if cand.shape[0] < k:
            cand = xp.arange(c.d)
        keys = _keys(xp, ab[cand], cand)
        if cand.shape[0] > k:
            kth = xp.partition(keys, k - 1)[k - 1]
            cand = cand[keys <= kth]
        return cand, x[cand]


class _TopkNumba:
    """The same selection with compiled kernels: one fused filtering + finiteness pass."""

    def __init__(self, c):
        from . import _nb_topk

        self.c, self.k = c, _nb_topk

    def encode(self, x):
        return self.c._pack(*self.select(x))

    def select(self, x):
        c, K = self.c, self.k
        if x.ndim != 1 or x.shape[0] != c.d:
            raise CodecError(f"{c.name}: expected a vector of length d={c.d}, "
                             f"got shape {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        k = c.k
        sc = c._thread_scratch()
        cand = sc.get("cand")
        if cand is None:
            cand = sc["cand"] = np.empty(c.d, dtype=np.int64)
        t = topk_threshold(x.view(np.uint32), k)
        n, finite = K.filter_ge(x, np.uint32(t), cand)
        if not finite:
            raise CodecError(f"{c.name}: cannot encode a vector holding NaN or Inf")
        if n < k:
            n, _ = K.filter_ge(x, np.uint32(0), cand)
        idx = np.empty(k, dtype=np.uint32)
        vals = np.empty(k, dtype=np.float32)
        if n == k:
            kth = np.uint64(2**64 - 1)
        else:
            keys = np.empty(n, dtype=np.uint64)
            K.keys_of(x, cand, n, keys)
            kth = np.partition(keys, k - 1)[k - 1]
        m = K.gather_le(x, cand, n, kth, idx, vals)
        if m != k:  # keys are unique (they hold the index): cannot happen
            raise RuntimeError(f"topk: selected {m} of k={k}")
        return idx, vals


def _cuda_topk(c):
    from ._cuda_sparse import TopkCuda

    return TopkCuda(c)


@CODECS.register("topk", params=KParams)
class TopK(_FixedK):
    """Top-k by magnitude (dist-ef L46): uint32 d, k uint32 indices + k float32 values; biased
    (delta = k/d).  Exact: the k largest |x_i|, ties broken by the lower index -- the first k of
    a full sort by (-|x_i|, i) -- sent in ascending index order."""

    name = "topk"
    unbiased = False
    deterministic = True
    IMPLS = {"numpy": _TopkNumpy, "numba": _TopkNumba, "cuda": _cuda_topk}

    def __init__(self, d, blocks=None, xp=np, k: Optional[int] = None,
                 ratio: Optional[float] = None, **kw):
        super().__init__(d, blocks, xp, k, ratio, **kw)
        self._make_impl()

    def encode(self, x, rng=None) -> Payload:
        return Payload(self.impl.encode(x), 32 + 64 * self.k)


class _RandKNumpy:
    """Gather, scale by float32(d / k) (a float32 product) and pack (any array module)."""

    def __init__(self, c):
        self.c = c

    def encode(self, x, idx):
        c, xp = self.c, self.c.xp
        idx = xp.asarray(idx)
        vals = x[idx] * np.float32(c.d / c.k)
        if not bool(xp.isfinite(vals).all()):
            raise CodecError(f"{c.name}: scaled value overflows float32")
        return c._pack(idx, vals)


def _cuda_randk(c):
    from ._cuda_backends import RandKCuda

    return RandKCuda(c)


@CODECS.register("randk", params=KParams)
class RandK(_FixedK):
    """k uniformly random coordinates scaled by d/k (unbiased): uint32 d, k uint32 indices + k
    float32."""

    name = "randk"
    unbiased = True
    deterministic = False

    @classmethod
    def alpha(cls, d: int, k: Optional[int] = None, ratio: Optional[float] = None) -> float:
        """Compression constant (dcd-ecd L194): E‖C(z) − z‖² = (d/k − 1)‖z‖² exactly."""
        k = int(k) if k is not None else max(1, math.ceil(float(ratio) * d))
        return math.sqrt(d / k - 1.0)

    IMPLS = {"numpy": _RandKNumpy, "cuda": _cuda_randk}

    def __init__(self, d, blocks=None, xp=np, k: Optional[int] = None,
                 ratio: Optional[float] = None, **kw):
        super().__init__(d, blocks, xp, k, ratio, **kw)
        self._make_impl()

    def encode(self, x, rng=None) -> Payload:
        x = self._check_input(x)
        if not isinstance(rng, np.random.Generator):
            raise CodecError(f"{self.name}: needs an explicit numpy.random.Generator")
        idx = np.sort(rng.choice(self.d, size=self.k, replace=False))
        return Payload(self.impl.encode(x, idx), 32 + 64 * self.k)


class _BernoulliNumpy:
    """Vectorized keep decision, gather, float64 division and pack (any array module)."""

    def __init__(self, c):
        self.c = c

    def encode(self, x, rng):
        c, xp = self.c, self.c.xp
        x = c._check_input(x)
        u = draw_uniform32(xp, rng, c.d)
        idx = xp.flatnonzero(u < np.float32(c.p))
        vals = (x[idx].astype(xp.float64) / c.p).astype(xp.float32)
        if not bool(xp.isfinite(vals).all()):
            raise CodecError(f"{c.name}: z/p overflows float32")
        k = int(idx.shape[0])
        return c._pack(idx, vals, header=(k,)), k


def _cuda_bernoulli(c):
    from ._cuda_sparse import BernoulliCuda

    return BernoulliCuda(c)


@CODECS.register("bernoulli_p", params=BernoulliParams)
class BernoulliP(_Sparse):
    """Keep each z_i w.p. p as z_i/p, else 0 (dcd-ecd fn. 2): uint32 d, uint32 count, indices,
    float32."""

    name = "bernoulli_p"
    unbiased = True
    deterministic = False
    IMPLS = {"numpy": _BernoulliNumpy, "cuda": _cuda_bernoulli}

    def __init__(self, d, blocks=None, xp=np, p: float = 0.5, **kw):
        super().__init__(d, blocks, xp, **kw)
        if not 0 < p <= 1:
            raise ValueError(f"bernoulli_p: p must be in (0, 1], got {p!r}")
        self.p = float(p)
        self._make_impl()

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, p={self.p})"

    @classmethod
    def alpha(cls, d: int, p: float = 0.5) -> float:
        """Compression constant (dcd-ecd L194, footnote 2): E‖C(z) − z‖² = ((1 − p)/p)‖z‖² exactly."""
        return math.sqrt((1.0 - p) / p)

    def encode(self, x, rng=None) -> Payload:
        data, k = self.impl.encode(x, rng)
        return Payload(data, 64 + 64 * k)

    def decode(self, data, out=None):
        data = self._as_bytes(data)
        self._check_d(data)
        n = int(data.shape[0])
        if n < 8:
            raise CodecError(f"{self.name}: payload truncated (no count)")
        k = int(np.frombuffer(_host(self.xp, data[4:8]).tobytes(), dtype="<u4")[0])
        if k > self.d:
            raise CodecError(f"{self.name}: count {k} > d={self.d}")
        if n != 8 + 8 * k:
            raise CodecError(f"{self.name}: payload {'truncated' if n < 8 + 8 * k else 'extended'} "
                             f"({n} bytes, count {k} needs {8 + 8 * k})")
        return self._unpack(data, k, 8, out)
