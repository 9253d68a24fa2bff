"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-r power iteration with warm start,
error feedback and momentum; two all-reduce-mean rounds per step.  docs/algorithms-allreduce.md
("PowerSGD") has the equations and the decisions where the paper leaves a choice.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import ALGORITHMS
from .base import Algorithm


class PowerSGDParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(2, ge=1, description="rank r of the approximation of each weight matrix (clamped to "
                      "min(n, m) per matrix)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="momentum λ (m ← λm + Δ'; x ← x − γ(Δ' + m))")
    start_steps: int = Field(0, ge=0, description="steps at the start that all-reduce the uncompressed "
                             "gradient (no error feedback) before compression begins")


def orthogonalize(P: np.ndarray) -> np.ndarray:
    """Gram–Schmidt (modified: each column against the finished ones, left to right) in float64,
    returned as float32.  A column that becomes zero stays zero.  Pure and sequential, so equal
    inputs give equal outputs on every worker."""
    A = P.astype(np.float64, copy=True)          # (on P's device)
    for k in range(A.shape[1]):
        col = A[:, k]
        for j in range(k):
            col -= float(A[:, j] @ col) * A[:, j]
        nrm = float(np.sqrt(col @ col))
        if nrm > 0.0:
            col /= nrm
        else:
            col[...] = 0.0
    return A.astype(np.float32)


class _Layout:
    """Which parameter tensors are compressed (≥ 2-D: reshaped to n × m, n = first dimension) and
    which are sent uncompressed (1-D), with their offsets in x and in the two all-reduce buffers."""

    def __init__(self, blocks, shapes, rank: int):
        if len(shapes) != len(blocks):
            raise ValueError("powersgd needs the parameter shapes (env.shapes) for every block")
        self.mats = []      # (offset, n, m, r, p_off, q_off)
        self.vecs = []      # (offset, size, p_off)
        off = p = q = 0
        for size, shape in zip(blocks, shapes):
            size = int(size)
            if len(shape) >= 2:
                n = int(shape[0])
                m = size // n
                r = min(int(rank), n, m)
                self.mats.append((off, n, m, r, p, q))
                p += n * r
                q += m * r
            else:
                self.vecs.append((off, size, None))
            off += size
        for k, (o, s, _) in enumerate(self.vecs):      # vectors after every P in the first buffer
            self.vecs[k] = (o, s, p)
            p += s
        self.p_len, self.q_len = p, q


@ALGORITHMS.register("powersgd", params=PowerSGDParams)
class PowerSGD(Algorithm):
    """PowerSGD, Vogels et al. 2019: Algorithm 1 (rank-r compression) inside Algorithm 2 (error
    feedback with momentum).  Worker w, step t, every weight matrix M_w = Δ_w reshaped n × m:

      1. g_w = ∇f_w(x) (+ λ_wd x);  Δ_w = g_w + e_w                        (Alg. 2 l. 6–7)
      2. P_w = Δ_w Q                      (Q ∈ R^{m×r}: the previous step's Q, warm start)
      3. P = ALL_REDUCE_MEAN(P_w)         (round 1; 1-D tensors ride along uncompressed)
      4. P̂ = ORTHOGONALIZE(P)            (Gram–Schmidt, float64, identical on every worker)
      5. Q_w = Δ_wᵀ P̂;  Q = ALL_REDUCE_MEAN(Q_w)                (round 2)
      6. Δ' = P̂ Qᵀ;  e_w = Δ_w − Δ'       (1-D tensors: Δ' = their mean, e = 0)
      7. m ← λ m + Δ';  x ← x − γ (Δ' + m)                       (Alg. 2 l. 12–13)
    Q_0: i.i.d. standard normal, drawn from a generator every worker seeds alike
    (``default_rng([seed, 7])``), matrices in parameter order.  For t < ``start_steps`` steps 2–6
    are replaced by Δ' = ALL_REDUCE_MEAN(g_w) (uncompressed; e stays 0, Q is kept).
    """

    name = "powersgd"

    def __init__(self, x, env, rank: int = 2, momentum: float = 0.9, start_steps: int = 0):
        super().__init__(x, env)
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank!r}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if int(start_steps) < 0:
            raise ValueError(f"start_steps must be >= 0, got {start_steps!r}")
        self.rank, self.momentum, self.start_steps = int(rank), float(momentum), int(start_steps)
        self.layout = _Layout(env.blocks, env.shapes, self.rank)
        qrng = np.random.default_rng([int(env.seed), 7])       # shared by every worker
        xp = self.xp                                            # state on x's device
        self.Q = [xp.asarray(qrng.standard_normal((m, r)).astype(np.float32))
                  for _, _, m, r, _, _ in self.layout.mats]
        self.e = xp.zeros(env.d, dtype=np.float32)              # error feedback memory e_w
        self.m = xp.zeros(env.d, dtype=np.float32)              # momentum m
        self._p = xp.empty(self.layout.p_len, dtype=np.float32)
        self._q = xp.empty(self.layout.q_len, dtype=np.float32)

    def _compressed_mean(self, D: np.ndarray) -> np.ndarray:
        """Steps 2–6 on Δ_w = D: returns Δ' and updates e_w and the warm-start Q."""
        comm, L = self.env.worker_comm, self.layout
        P, Qb = self._p, self._q
        for (o, n, m, r, po, _), Q in zip(L.mats, self.Q):
            P[po:po + n * r].reshape(n, r)[...] = D[o:o + n * m].reshape(n, m) @ Q      # 2.
        for o, s, po in L.vecs:
            P[po:po + s] = D[o:o + s]
        comm.allreduce_mean(P)                                                          # 3.
        Ph = []
        for o, n, m, r, po, qo in L.mats:
            ph = orthogonalize(P[po:po + n * r].reshape(n, r))                          # 4.
            Ph.append(ph)
            Qb[qo:qo + m * r].reshape(m, r)[...] = D[o:o + n * m].reshape(n, m).T @ ph  # 5.
        comm.allreduce_mean(Qb)
        out = np.empty_like(D)
        for k, ((o, n, m, r, po, qo), ph) in enumerate(zip(L.mats, Ph)):
            Q = Qb[qo:qo + m * r].reshape(m, r).copy()
            self.Q[k] = Q                                                               # warm start
            out[o:o + n * m] = (ph @ Q.T).reshape(-1)                                   # 6. Δ' = P̂ Qᵀ
        for o, s, po in L.vecs:
            out[o:o + s] = P[po:po + s]
        self.e[...] = D - out                                                           # 6. e_w
        for o, s, _ in L.vecs:
            self.e[o:o + s] = 0.0
        return out

    def step(self, t, lr, grad):
        g = self._wd(grad())                                                            # 1.
        if t < self.start_steps:
            dp = self.env.worker_comm.allreduce_mean(g.astype(np.float32, copy=True))
        else:
            dp = self._compressed_mean(g + self.e)                                      # 1.–6.
        self.m *= np.float32(self.momentum)                                             # 7.
        self.m += dp
        self.x -= np.float32(lr) * (dp + self.m)
        self.rounds += 1

    def state_dict(self):
        s = super().state_dict()
        s.update({"e": self.e, "m": self.m})
        for k, Q in enumerate(self.Q):
            s[f"Q{k}"] = Q
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._load_array(self.e, state["e"])
        self._load_array(self.m, state["m"])
        for k, Q in enumerate(self.Q):
            self._load_array(Q, state[f"Q{k}"])

    @staticmethod
    def bytes_per_round(blocks, shapes, rank: int) -> tuple[int, int]:
        """(round-1, round-2) bytes one worker all-reduces per compressed step (float32)."""
        L = _Layout(blocks, shapes, rank)
        return 4 * L.p_len, 4 * L.q_len
