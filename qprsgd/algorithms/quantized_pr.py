"""quantized-pr-sgd (Wu et al.): PSGD, PR-SGD (local SGD) -- and, in the all-reduce family,
QSGD and Quantized-PR-SGD (Algorithm 1).

Notation (paper): M workers, x the model, γ (``lr``) the step size, K local steps per round,
J = 11ᵀ/M.  Steps t are 0-based; the averaging phase follows ALGORITHMS.md: a periodic
algorithm averages after local steps K, 2K, ... (``avg_phase="end"``), or, with
``avg_phase="k0"``, after steps 1, K+1, 2K+1, ... (cooperative-sgd's 0-based k mod τ = 0).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..registry import ALGORITHMS
from .aggregation import WIDTHS, BucketAllGatherMean, make_aggregator
from .base import Algorithm


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_round_end(t: int, K: int, avg_phase: str) -> bool:
    """Does 0-based step t end with an averaging round?  ("end": t+1 ≡ 0 mod K; "k0": t ≡ 0 mod K)."""
    return (t + 1) % K == 0 if avg_phase == "end" else t % K == 0


def average_models(transport, x: np.ndarray) -> np.ndarray:
    """x ← (1/M) Σᵢ xᵢ over the transport's ranks (all-reduce mean, in place): the one averaging
    step of ``pr_sgd`` and of ``pasgd`` on the ``allreduce`` topology, so the two agree bit for bit."""
    return transport.allreduce_mean(x)


def check_period(K, avg_phase: str) -> tuple[int, str]:
    """Validate the local-step period of a periodic algorithm (constructor arguments)."""
    if int(K) < 1:
        raise ValueError(f"K must be >= 1, got {K!r}")
    if avg_phase not in ("end", "k0"):
        raise ValueError(f"avg_phase must be 'end' or 'k0', got {avg_phase!r}")
    return int(K), avg_phase


@ALGORITHMS.register("psgd")
class PSGD(Algorithm):
    """Parallel SGD (quantized-pr-sgd §2; cooperative-sgd eq. (2), A(1, J, 0)).

    Each step:
      1. g_i = ∇f_i(x; ξ_i)                    (stochastic gradient on worker i)
      2. ḡ = (1/M) Σ_i g_i                      (all-reduce mean)
      3. x ← x − γ ḡ                            (identical on every worker)

    Overlap (issue 16): line 2's sum is started bucket by bucket while backward still produces
    line 1 (``grad(on_bucket=...)``, ``train.bucket_mb``) and waited for before line 3.  The 1/M
    is folded into the step: x ← x − fl(γ/M)·Σ_i g_i, one scaling pass in place on g (no divide
    pass, no temporary of size d).  Element-wise the same operations whatever the buckets, so
    bucketed and unbucketed runs give the same iterates (bit for bit where the transport sums in
    a fixed order: in-process, or MPI at M = 2).
    """

    name = "psgd"

    def step(self, t, lr, grad):
        comm = self.env.worker_comm
        pending = []

        def reduce(g, lo, hi):                       # 1. (+ λx) then 2. for this bucket, started now
            self._wd_into(g, lo, hi)
            pending.append(comm.iallreduce_sum(g[lo:hi]))

        g = grad(on_bucket=reduce)                   # 1.
        for r in pending:                            # 2. Σ_i g_i (in place in g)
            r.wait()
        g *= np.float32(lr / comm.size)              # 3. x ← x − (γ/M) Σ_i g_i
        self.x -= g
        self.rounds += 1


class PRSGDParams(_Params):
    K: int = Field(4, ge=1, description="local steps per averaging round (τ)")
    avg_phase: Literal["end", "k0"] = "end"


@ALGORITHMS.register("pr_sgd", params=PRSGDParams)
class PRSGD(Algorithm):
    """Parallel Restarted SGD / local SGD / PASGD (quantized-pr-sgd §3.1; cooperative eq. (3), A(τ, J, 0)).

    From the common point x_0:
      1. repeat K times: x_{k+1} = x_k − γ ∇f(x_k; ξ_k)      (local steps, no communication)
      2. x ← (1/M) Σ_i x_i                                    (all-reduce mean of the models)
    With K = 1 this is PSGD exactly (averaging models after one step = stepping with the mean gradient).
    """

    name = "pr_sgd"

    def __init__(self, x, env, K: int = 4, avg_phase: str = "end"):
        super().__init__(x, env)
        self.K, self.avg_phase = check_period(K, avg_phase)

    def step(self, t, lr, grad):
        g = self._wd(grad())
        g *= np.float32(lr)                                  # 1. local step (in place: g is scratch)
        self.x -= g
        if is_round_end(t, self.K, self.avg_phase):
            average_models(self.env.worker_comm, self.x)     # 2. average the models
            self.rounds += 1


class AggregationParams(_Params):
    aggregation: Literal["allgather", "reduce_scatter", "summable"] = Field(
        "allgather", description="how the workers' compressed vectors are averaged: allgather (the "
        "papers' equations), reduce_scatter (encoded chunks, re-encoded partial sums) or summable "
        "(shared integer grid, integer all-reduce; no codec) -- docs/algorithms-allreduce.md")
    levels: int = Field(1, ge=1, description="summable only: grid levels L per sign (codes -L..L)")
    width: int = Field(16, description="summable only: bits of each integer code in the all-reduce "
                       "(8, 16, 32, 64); M·levels must fit")

    @model_validator(mode="after")
    def _check_aggregation(self):
        if self.width not in WIDTHS:
            raise ValueError(f"width must be one of {WIDTHS}, got {self.width!r}")
        if self.aggregation != "summable":
            # (defaults are tolerated: the normalized config lists every key)
            extra = sorted(k for k in ("levels", "width")
                           if getattr(self, k) != type(self).model_fields[k].default)
            if extra:
                raise ValueError(f"{', '.join('algorithm.' + k for k in extra)} only apply with "
                                 f"algorithm.aggregation = 'summable' (got aggregation = {self.aggregation!r})")
        return self


class _Aggregating(Algorithm):
    """The compressed all-reduce family: the mean of the workers' vectors via ``aggregation``."""

    uses_codec = True
    default_codec = "qsgd"

    @classmethod
    def codec_refusal(cls, params):
        if params is not None and params.aggregation == "summable":
            return ("algorithm.aggregation = 'summable' quantizes onto its own shared integer grid "
                    "(algorithm.levels, algorithm.width), not with a codec")
        return None

    def _init_aggregation(self, aggregation: str, levels: int, width: int) -> None:
        self.aggregation = aggregation
        self.agg = make_aggregator(aggregation, self.env, levels, width, self.xp) if self.env.worker_comm is not None else None


class QSGDParams(AggregationParams):
    per_bucket: bool = Field(
        False, description="encode and all-gather each gradient bucket (train.bucket_mb) as backward "
        "produces it, each with its own codec (per-bucket statistics, e.g. QSGD's norm: a different "
        "compressor, docs/algorithms-allreduce.md); aggregation 'allgather' only")

    @model_validator(mode="after")
    def _check_per_bucket(self):
        if self.per_bucket and self.aggregation != "allgather":
            raise ValueError(f"algorithm.per_bucket = true needs algorithm.aggregation = 'allgather' "
                             f"(got {self.aggregation!r})")
        return self


@ALGORITHMS.register("qsgd", params=QSGDParams)
class QSGD(_Aggregating):
    """Quantized SGD, all-reduce paradigm (quantized-pr-sgd §3.2, eq. (2)–(3), L65–76; Alistarh et al.).

    PSGD with compressed gradients.  Each step, on every worker i:
      1. g_i = ∇f_i(x; ξ_i) (+ λx)               (stochastic gradient; weight decay folded in)
      2. q_i = Q(g_i)                             (encode with the configured codec, draws from env.rng)
      3. send q_i to all, receive q_j ∀j          (allgather of byte payloads: compressed values
                                                   cannot be summed by MPI)
      4. ḡ = (1/M) Σ_j decode(q_j)                (rank order 0..M−1, float32, then ÷M)
      5. x ← x − γ ḡ                              (identical on every worker)
    The codec defaults to ``qsgd`` with its own default level s = ⌈√d⌉ (quantized-pr-sgd L265).
    One communication round per step.  Steps 2–4 are ``aggregation`` (default ``allgather``,
    exactly the above; ``reduce_scatter`` / ``summable``: qprsgd/algorithms/aggregation.py).

    ``per_bucket=True`` (issue 16): lines 1–3 run per gradient bucket while backward produces
    it -- each bucket encoded by its own codec and all-gathered non-blocking -- and line 4 per
    bucket after backward (``aggregation.BucketAllGatherMean``).  One bucket is exactly the
    above; several are a compressor with per-bucket statistics (docs/algorithms-allreduce.md).
    """

    name = "qsgd"

    def __init__(self, x, env, aggregation: str = "allgather", levels: int = 1, width: int = 16,
                 per_bucket: bool = False):
        super().__init__(x, env)
        if per_bucket and aggregation != "allgather":
            raise ValueError(f"per_bucket needs aggregation 'allgather', got {aggregation!r}")
        self._init_aggregation(aggregation, levels, width)
        self.buckets = (BucketAllGatherMean(env.make_codec, env.blocks or (env.d,), self.xp)
                        if per_bucket and env.worker_comm is not None else None)

    def step(self, t, lr, grad):
        env = self.env
        if self.buckets is not None:
            def send(g, lo, hi):                                         # 1.–3. per bucket, as backward
                self._wd_into(g, lo, hi)                                 #        produces it
                self.buckets.post(env.worker_comm, g, lo, hi, env.rng)
            g = grad(on_bucket=send)                                     # 1.
            g_bar = self.buckets.finish(g)                               # 4. (in place: g is scratch)
            g_bar *= np.float32(lr)                                      # 5.
            self.x -= g_bar
            self.rounds += 1
            return
        g = self._wd(grad())                                             # 1.
        g_bar = self.agg.mean(env.worker_comm, g, env.rng)               # 2.–4. (allgather: encode,
        #                                                                  send to all, decode, mean)
        g_bar *= np.float32(lr)                                          # 5. (in place: no temporary)
        self.x -= g_bar
        self.rounds += 1


class QPRSGDParams(AggregationParams):
    K: int = Field(4, ge=1, description="local steps per synchronization round")
    avg_phase: Literal["end", "k0"] = "end"


@ALGORITHMS.register("qpr_sgd", params=QPRSGDParams)
class QPRSGD(_Aggregating):
    """Quantized-PR-SGD, all-reduce paradigm (quantized-pr-sgd Algorithm 1, L114; ALGORITHMS.md §A).

    Worker m, round n (lines as numbered in the paper's box):
      1. for n = 1..N:
      2.   x_{n;0} ← x̃_n
      3.   for k = 0..K−1:
      4.     draw ξ_k                                   (the next batch of this worker's shard)
      5.     x_{n;k+1} ← x_{n;k} − γ ∇f_m(x_{n;k}; ξ_k)  (+ λ x_{n;k} in the gradient)
      7.   g_n ← Q(x_{n;0} − x_{n;K})
      8.   send g_n to all other nodes
      9.   receive g_n^(j), ∀j:  Δ ← (1/M) Σ_j g_n^(j)   (rank order, float32, then ÷M)
     10.   x̃_{n+1} ← x̃_n − Δ
    (The extracted box runs "Receive …: 9 Δ ← … Update … 10 11 end": receiving and averaging are
    line 9, the update line 10, ``end`` line 11.)

    Decisions (docs/algorithms-allreduce.md):
      * Sign: line 5 keeps its minus (L114; the extraction drops it elsewhere, ALGORITHMS.md
        "Known problems"), and line 7 quantizes x_0 − x_K, the sum of the K scaled gradients, so
        line 10 subtracts the mean: with Q = identity, x̃_{n+1} = (1/M) Σ_m x_{n;K}^(m), which is
        PR-SGD's average (``pr_sgd``), up to float rounding.
      * Line 9's "Σ_i … g^(j)" is Σ_j (ALGORITHMS.md).  The sender's own g_n is decoded too, so
        every worker applies the identical Δ (its own quantization error included).
      * Step size: γ is the runner's per-step lr_t (as ``pr_sgd``), so a schedule milestone that
        falls inside a round changes γ for the remaining local steps; with milestones on round
        boundaries this is the paper's per-round γ_n.
      * Weight decay λx is folded into each local gradient (``Algorithm._wd``), as in PSGD; it is
        then quantized with the rest of x_0 − x_K.
      * Rounds end after local steps K, 2K, … (``avg_phase="end"``) or after steps 1, K+1, …
        (``"k0"``), as ``pr_sgd``.  The codec draws once per round (one ``encode`` call).
      * State: x̃ (``x_tilde``) is kept between rounds and checkpointed; after line 10 every worker
        sets x ← x̃ (line 2 of the next round).
    """

    name = "qpr_sgd"

    def __init__(self, x, env, K: int = 4, avg_phase: str = "end", aggregation: str = "allgather",
                 levels: int = 1, width: int = 16):
        super().__init__(x, env)
        self.K, self.avg_phase = check_period(K, avg_phase)
        self._init_aggregation(aggregation, levels, width)
        self.x_tilde = None if x is None else x.copy()   # x̃_1 = x_0 (identical on every worker)

    def step(self, t, lr, grad):
        env = self.env
        # 2. x_{n;0} = x̃_n: x already holds it (set at the end of the previous round / at start)
        g = self._wd(grad())                                             # 4. ξ_k, gradient at x_{n;k}
        g *= np.float32(lr)                                              # 5. x_{n;k+1} (in place)
        self.x -= g
        if not is_round_end(t, self.K, self.avg_phase):
            return
        # 7.–9. g_n = Q(x_{n;0} − x_{n;K}); send g_n, receive all g^(j); Δ = (1/M) Σ_j g^(j)
        # (``aggregation``: allgather is exactly these lines; reduce_scatter / summable replace them)
        delta = self.agg.mean(env.worker_comm, self.x_tilde - self.x, env.rng)
        self.x_tilde -= delta                                            # 10. x̃_{n+1} = x̃_n − Δ
        self.x[...] = self.x_tilde                                       # 2. (next round) x_{n+1;0} = x̃_{n+1}
        self.rounds += 1

    def state_dict(self):
        s = super().state_dict()
        s["x_tilde"] = self.x_tilde
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._load_array(self.x_tilde, state["x_tilde"])
