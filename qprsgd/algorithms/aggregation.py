"""How the compressed all-reduce family (``qsgd``, ``qpr_sgd``) averages M workers' vectors.

``algorithm.aggregation`` picks one of three patterns; each computes an estimate of
v̄ = (1/M) Σ_i v_i that is identical on every worker (docs/algorithms-allreduce.md, "Aggregation",
has the equations, variances and costs):

* ``allgather`` (default; the papers' equations): every worker encodes its whole vector once,
  the payloads are all-gathered, every worker decodes all M in rank order and averages.
  Per worker b·(M−1) bits per element arrive: grows with M.
* ``reduce_scatter``: the vector is cut into M contiguous chunks (chunk j: ``chunk_bounds``);
  worker i encodes chunk j with a codec of chunk j's length and sends it to worker j
  (``alltoall_bytes``); worker j decodes its M chunks, sums them in rank order (float32),
  encodes the sum again with the same codec and its own draws, and the M encoded sums are
  all-gathered; every worker decodes them and divides by M.  ≈ 2·b·(M−1)/M bits per element.
  No error feedback at either stage (the two algorithms have none under ``allgather`` either):
  with an unbiased codec both stages are unbiased; with a biased one both errors are lost.
* ``summable``: no codec.  One counted all-reduce (max) agrees the scale s = maxᵢ ‖vᵢ‖_∞; each
  worker rounds vᵢ·L/s stochastically (unbiased) onto the integers −L … L (L = ``levels``),
  the codes are summed exactly by an integer all-reduce of ``width``-bit integers, and
  v̄ ≈ (s/L)·Σᵢ qᵢ / M.  A config whose sum M·L could overflow ``width`` bits is refused.

Draws come from the worker's own generator (``env.rng``), in a fixed order documented on each
class, so the single-process references replay them.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

AGGREGATIONS = ("allgather", "reduce_scatter", "summable")
WIDTHS = (8, 16, 32, 64)
_INT = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}


def chunk_bounds(d: int, M: int) -> list[tuple[int, int]]:
    """[lo, hi) of chunk j = 0..M−1: contiguous, the first d mod M chunks one element longer."""
    base, extra = divmod(int(d), int(M))
    out, lo = [], 0
    for j in range(int(M)):
        hi = lo + base + (1 if j < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def chunk_blocks(blocks, lo: int, hi: int) -> tuple[int, ...]:
    """The parameter blocks (sizes, in order) intersected with [lo, hi): the chunk codec's blocks."""
    out, o = [], 0
    for b in blocks:
        a, e = max(o, lo), min(o + int(b), hi)
        if e > a:
            out.append(e - a)
        o += int(b)
    return tuple(out)


def summable_max_workers(levels: int, width: int) -> int:
    """The largest M for which M·levels fits a signed ``width``-bit integer."""
    return (2 ** (int(width) - 1) - 1) // int(levels)


def check_summable(levels: int, width: int, M: int) -> None:
    """Refuse (ValueError naming the keys) a summable config whose code sum could overflow."""
    if int(width) not in WIDTHS:
        raise ValueError(f"algorithm.width must be one of {WIDTHS}, got {width!r}")
    if int(levels) < 1:
        raise ValueError(f"algorithm.levels must be >= 1, got {levels!r}")
    if int(M) * int(levels) > 2 ** (int(width) - 1) - 1:
        raise ValueError(
            f"algorithm.levels = {levels} with algorithm.width = {width} cannot sum {M} workers' codes: "
            f"|Σ q| can reach M·levels = {int(M) * int(levels)} > {2 ** (int(width) - 1) - 1} "
            f"(int{width}); allowed: M·levels ≤ 2^(width−1) − 1, i.e. at most "
            f"{summable_max_workers(levels, width)} workers at these settings -- raise algorithm.width "
            f"or lower algorithm.levels")


def _decoded_mean(codec, payloads, acc: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """acc ← (1/M) Σ_j codec.decode(payloads[j]): rank order, float32 sums from zero, ÷ M (the
    allgather pattern's arithmetic); ``buf`` is decode scratch of acc's length.  Returns acc."""
    acc.fill(0.0)
    for p in payloads:
        acc += codec.decode(p, out=buf)
    acc /= np.float32(len(payloads))
    return acc


class AllGatherMean:
    """(1/M) Σ_j decode(encode_j(v_j)): decoded in rank order 0..M−1, summed in float32, ÷ M.
    Draws: one ``encode`` of the whole vector."""

    kind = "allgather"

    def __init__(self, codec, d: int, xp=np):
        self.codec, self.d = codec, int(d)
        self._acc = xp.empty(self.d, dtype=np.float32)   # scratch, allocated once (x's device)
        self._buf = xp.empty(self.d, dtype=np.float32)

    def mean(self, comm, v: np.ndarray, rng) -> np.ndarray:
        """The mean, in this aggregator's own buffer: valid until the next call (callers may
        scale it in place)."""
        q = self.codec.encode(v, rng)
        received = comm.allgather_bytes(q.data, "allgather")
        return _decoded_mean(self.codec, received, self._acc, self._buf)


class BucketAllGatherMean:
    """``allgather`` per gradient bucket (``qsgd`` with ``per_bucket: true``; issue 16).

    Bucket [lo, hi) (``qprsgd/buckets.py``, handed over while backward runs) has its own codec
    C_b = ``make_codec(hi − lo, blocks ∩ bucket)``: the configured codec and parameters, one left
    at its default taking the default for the bucket's length (qsgd: s = ⌈√(hi − lo)⌉):
      post:   p_b = C_b.encode(v[lo:hi])  (draws bucket by bucket, in bucket order); all-gather p_b,
              non-blocking, posted at once
      finish: v̄[lo:hi] = (1/M) Σ_j C_b.decode(p_b^(j))   (rank order, float32, ÷ M), every bucket
    One bucket covering the whole vector is exactly :class:`AllGatherMean`.  Several buckets are
    a different compressor: a codec with per-vector statistics (QSGD's norm) computes them per
    bucket -- docs/algorithms-allreduce.md states the variance and bits.
    """

    kind = "allgather (per bucket)"

    def __init__(self, make_codec, blocks, xp=np):
        if make_codec is None:
            raise ValueError("algorithm.per_bucket needs a codec (the codec section)")
        self.make_codec, self.blocks, self.xp = make_codec, tuple(blocks), xp
        self._codecs: dict = {}
        self._posted: list = []
        self._buf: Optional[np.ndarray] = None

    def codec_for(self, lo: int, hi: int):
        """Bucket [lo, hi)'s codec (built on first use, kept with its decode scratch)."""
        c = self._codecs.get((lo, hi))
        if c is None:
            c = self._codecs[(lo, hi)] = self.make_codec(hi - lo, chunk_blocks(self.blocks, lo, hi))
        return c

    def post(self, comm, v: np.ndarray, lo: int, hi: int, rng) -> None:
        c = self.codec_for(lo, hi)
        q = c.encode(self.xp.ascontiguousarray(v[lo:hi]), rng)
        self._posted.append((lo, hi, c, comm.iallgather_bytes(q.data, "allgather")))

    def finish(self, out: np.ndarray) -> np.ndarray:
        """Wait for every posted bucket and write its mean into out[lo:hi]; returns ``out``."""
        posted, self._posted = self._posted, []
        if self._buf is None or len(self._buf) < len(out):
            self._buf = self.xp.empty(len(out), dtype=np.float32)  # decode scratch, allocated once
        for lo, hi, c, req in posted:
            _decoded_mean(c, req.wait(), out[lo:hi], self._buf[:hi - lo])
        return out


class ReduceScatterMean:
    """Reduce-scatter of encoded chunks, re-encode of each partial sum, all-gather of the sums.

    Worker r, vector v (chunks ``chunk_bounds(d, M)``, chunk j's codec C_j built by
    ``make_codec(len_j, blocks ∩ chunk j)``: the configured codec with its parameters; one left
    at its default takes the default for the chunk's length, e.g. qsgd's s = ⌈√len_j⌉):
      1. p_j = C_j.encode(v[chunk j])  for j = 0..M−1         (draws in this order; own chunk too)
      2. send p_j to worker j, receive p^(i) from every worker i   (``alltoall``)
      3. S_r = Σ_i C_r.decode(p^(i))   (i = 0..M−1, float32)
      4. q_r = C_r.encode(S_r)                                 (one more draw)
      5. all-gather q_0..q_{M−1};  v̄[chunk j] = C_j.decode(q_j) / M
    """

    kind = "reduce_scatter"

    def __init__(self, make_codec, d: int, blocks, M: int, xp=np):
        if make_codec is None:
            raise ValueError("aggregation 'reduce_scatter' needs a codec (the codec section)")
        if int(d) < int(M):
            raise ValueError(f"algorithm.aggregation = 'reduce_scatter' needs d >= M (one chunk per "
                             f"worker); got d = {d}, M = {M}")
        self.d, self.M, self.xp = int(d), int(M), xp
        self.bounds = chunk_bounds(self.d, self.M)
        self.codecs = [make_codec(hi - lo, chunk_blocks(blocks, lo, hi)) for lo, hi in self.bounds]

    def mean(self, comm, v: np.ndarray, rng) -> np.ndarray:
        if comm.size != self.M:
            raise ValueError(f"reduce_scatter built for {self.M} workers, transport has {comm.size}")
        r = comm.rank
        xp = self.xp
        v = xp.ascontiguousarray(v, dtype=np.float32)
        sends = [self.codecs[j].encode(v[lo:hi], rng).data for j, (lo, hi) in enumerate(self.bounds)]  # 1.
        got = comm.alltoall_bytes(sends, "alltoall")                                                    # 2.
        lo, hi = self.bounds[r]
        mine = self.codecs[r]
        acc = xp.zeros(hi - lo, dtype=np.float32)
        buf = xp.empty(hi - lo, dtype=np.float32)
        for p in got:                                                                                   # 3.
            acc += mine.decode(p, out=buf)
        q = mine.encode(acc, rng)                                                                       # 4.
        parts = comm.allgather_bytes(q.data, "allgather")                                               # 5.
        out = xp.empty(self.d, dtype=np.float32)
        for j, (a, b) in enumerate(self.bounds):
            self.codecs[j].decode(parts[j], out=out[a:b])
        out /= np.float32(self.M)
        return out


class SummableMean:
    """Stochastic rounding onto a grid shared by every worker; the integer codes are summed by MPI.

    Worker i, vector v (d elements), L = ``levels``:
      1. s = max_i ‖v_i‖_∞                       (counted all-reduce of one float64, ``allreduce_max``)
      2. y = (v / s)·L in float64; u ~ U[0,1)^d (``rng.random(d)``, float64);
         q_i = ⌊y + u⌋ ∈ {−L..L}, as ``width``-bit integers       (E[q_i] = y: unbiased)
      3. Σ_i q_i by ``allreduce_sum_int`` (exact, any order)
      4. v̄ ≈ float32( (Σ_i q_i)·(s/L) / M )      (float64 arithmetic, one rounding to float32)
    With s = 0 every code is 0 and v̄ = 0 (no draw is made).
    """

    kind = "summable"

    def __init__(self, d: int, levels: int, width: int, M: int, xp=np):
        check_summable(levels, width, M)
        self.d, self.L, self.width, self.M, self.xp = int(d), int(levels), int(width), int(M), xp
        self.dtype = _INT[self.width]

    def mean(self, comm, v: np.ndarray, rng) -> np.ndarray:
        t0 = time.perf_counter()
        local = float(np.max(np.abs(v))) if v.size else 0.0
        t_local = time.perf_counter() - t0
        s = float(comm.allreduce_max([local], "allreduce")[0])                        # 1.
        t0 = time.perf_counter()
        codes = self.xp.zeros(self.d, dtype=self.dtype)
        if s > 0:
            y = (v.astype(np.float64) / s) * self.L                                    # 2.
            y += self.xp.asarray(rng.random(self.d))   # (host draws, copied to x's device)
            np.floor(y, out=y)
            np.clip(y, -self.L, self.L, out=y)
            codes[...] = y
        t_enc = time.perf_counter() - t0
        comm.allreduce_sum_int(codes, "allreduce")                                     # 3.
        t0 = time.perf_counter()
        out = (codes.astype(np.float64) * (s / self.L) / self.M).astype(np.float32)    # 4.
        # quantizing and rescaling are this pattern's codec work: time and bits into the ledger
        comm.ledger.add_codec(t_local + t_enc + time.perf_counter() - t0, self.d * self.width)
        return out


def make_aggregator(kind: str, env, levels: Optional[int] = None, width: Optional[int] = None, xp=np):
    """The aggregator for ``algorithm.aggregation`` on this worker (``env.M`` workers), its
    scratch on the device of array module ``xp`` (the algorithm's)."""
    if kind == "allgather":
        return AllGatherMean(env.codec, env.d, xp)
    if kind == "reduce_scatter":
        return ReduceScatterMean(env.make_codec, env.d, env.blocks, env.M, xp)
    if kind == "summable":
        return SummableMean(env.d, levels, width, env.M, xp)
    raise ValueError(f"algorithm.aggregation must be one of {AGGREGATIONS}, got {kind!r}")
