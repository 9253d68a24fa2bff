"""quantized-pr-sgd (Wu et al.): D-Quantized-PR-SGD, the gossip paradigm (Algorithm 2, L170–172;
§5, L174–186; recursion eq. (9)).

Notation (paper): M workers, W the mixing matrix (W_ij ∈ [0, 1], symmetric, doubly stochastic,
L176), K local steps per round, γ (``lr``) the step size, Q the quantizer (the configured codec,
``qsgd`` by default).  Mixing, neighbours and the exchange are those of the dcd-ecd gossip
family (``dcd_ecd.GossipAlgorithm``): float64-accumulated Σ_j W_ij v_j over i and its
neighbours, point-to-point sends on the ``peer`` channel.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import ALGORITHMS
from .dcd_ecd import GossipAlgorithm
from .quantized_pr import check_period, is_round_end


class DQPRSGDParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    K: int = Field(4, ge=1, description="local steps per gossip round")
    avg_phase: Literal["end", "k0"] = "end"


@ALGORITHMS.register("dqpr_sgd", params=DQPRSGDParams)
class DQPRSGD(GossipAlgorithm):
    """D-Quantized-PR-SGD (quantized-pr-sgd Algorithm 2, L172), worker m, round n:

      (input) x̃_1^(j) = x_1 for all j                  (own replica and the neighbours')
      1. x_{n;0} ← x̃_n^(m)
      2. for k = 0..K−1:
      3.   draw ξ_k                                      (the next batch of this worker's shard)
      4.   x_{n;k+1} ← x_{n;k} − γ ∇f_m(x_{n;k}; ξ_k)    (+ λ x_{n;k} in the gradient)
      7. x̃_{n+½} ← Σ_j W_mj x̃_n^(j) − x_{n;0} + x_{n;K}
      8. g_n ← Q(x̃_n^(m) − x̃_{n+½})
      9. encode and send g_n to the neighbours
     10. decode g_n^(j) for every j with W_mj ≠ 0       (the box's q_n^(j) is g_n^(j))
     11. x̃_{n+1}^(j) ← x̃_n^(j) − g_n^(j)               (j = m included: the own replica)

    Decisions (docs/algorithms-gossip.md):
      * Rounds end after local steps K, 2K, … (``avg_phase="end"``) or after steps 1, K+1, …
        (``"k0"``), as ``pr_sgd``/``qpr_sgd``; γ is the runner's per-step lr.
      * Every replica x̃^(j), its owner's included, receives the same decoded g^(j), so a
        neighbour's replica equals the owner's x̃^(j) bit for bit.
      * K = 1 is DCD-PSGD (``dcd_psgd``): g_n = Q(−z) with z DCD's difference; with a quantizer
        that depends on |v_i| and the sign only (QSGD) and shared draws, Q(−z) = −Q(z) and the
        iterates agree up to the float rounding of z.
      * Line 7 is evaluated left to right: (Σ_j W_mj x̃^(j) − x_{n;0}) + x_{n;K}.
      * With W = J this is not ``qpr_sgd`` (each node subtracts its own g, not the mean).
    """

    name = "dqpr_sgd"
    _state_arrays = ("own_replica", "replicas")
    _tv_arrays = ("own_replica",)
    uses_codec = True
    default_codec = "qsgd"

    def __init__(self, x, env, K: int = 4, avg_phase: str = "end"):
        super().__init__(x, env)
        self.K, self.avg_phase = check_period(K, avg_phase)
        # input: x̃_1^(j) = x_1 for the own replica and every neighbour's
        self.own_replica = None if x is None else x.copy()
        self.replicas = None
        if self.seq is not None:
            self._pairs(x)          # time-varying: per-pair replicas (qprsgd/algorithms/pairs.py)
        elif x is not None:
            self.replicas = np.tile(x, (len(self.neighbors), 1))

    def replica(self, j: int) -> np.ndarray:
        """Debug accessor: this worker's x̃^(j) (j = itself or a neighbour), read-only."""
        if j == self.i:
            v = self.own_replica.view()
        else:
            v = (self.pairs.ref(j) if self.pairs is not None else self.replicas[self.neighbors.index(j)]).view()
        v.flags.writeable = False
        return v

    def step(self, t, lr, grad):
        env = self.env
        # 1. x_{n;0} = x̃_n^(m): x already holds it (set at the end of the previous round / at start)
        g = self._wd(grad())                                             # 3. ξ_k, gradient at x_{n;k}
        self.x -= np.float32(lr) * g                                     # 4. x_{n;k+1}
        if not is_round_end(t, self.K, self.avg_phase):
            return
        if self.pairs is not None:
            return self._round_time_varying()
        v = {j: self.replicas[n] for n, j in enumerate(self.neighbors)}
        v[self.i] = self.own_replica
        x_half = (self._mix(v) - self.own_replica) + self.x              # 7. x̃_{n+½}
        p = env.codec.encode(self.own_replica - x_half, env.rng)         # 8. g_n = Q(x̃_n − x̃_{n+½})
        req = self._exchange(p.data)                                     # 9. send
        self.own_replica -= self._decode(p.data)                         # 11. (j = m)
        got = req.wait()                                                 # 10. receive g^(j)
        for n, j in enumerate(self.neighbors):
            self.replicas[n] -= self._decode(got[j])                     # 11. x̃^(j) −= g^(j)
        self.x[...] = self.own_replica                                   # 1. (next round) x_{n+1;0}
        self.rounds += 1

    def _round_time_varying(self):
        """Lines 7–11 on W_n (n = this round) with per-pair replicas h_{j→m}; a stale pair's
        catch-up payload is Q(h − x̃_{n+1}^(m)) (docs/algorithms-gossip.md)."""
        env, P = self.env, self.pairs
        self._use_step_matrix()
        v = P.mix_values(self.mixer.neighbors, self.own_replica)
        x_half = (self._mix(v) - self.own_replica) + self.x              # 7. x̃_{n+½}
        p = env.codec.encode(self.own_replica - x_half, env.rng)         # 8. g_n
        gd = self._decode(p.data)

        def apply(h, d):
            h -= d

        apply(self.own_replica, gd)                                      # 11. (j = m)
        P.talk(self.seq.W_at(self.rounds + 1), p.data, gd, apply,       # 9.–11. along W_{n+1}
               catchup=lambda h: h - self.own_replica)
        self.x[...] = self.own_replica                                   # 1. (next round)
        self.rounds += 1
