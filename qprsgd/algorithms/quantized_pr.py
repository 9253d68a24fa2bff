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
from pydantic import BaseModel, ConfigDict, Field

from ..registry import ALGORITHMS
from .base import Algorithm


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_round_end(t: int, K: int, avg_phase: str) -> bool:
    """Does 0-based step t end with an averaging round?  ("end": t+1 ≡ 0 mod K; "k0": t ≡ 0 mod K)."""
    return (t + 1) % K == 0 if avg_phase == "end" else t % K == 0


@ALGORITHMS.register("psgd")
class PSGD(Algorithm):
    """Parallel SGD (quantized-pr-sgd §2; cooperative-sgd eq. (2), A(1, J, 0)).

    Each step:
      1. g_i = ∇f_i(x; ξ_i)                    (stochastic gradient on worker i)
      2. ḡ = (1/M) Σ_i g_i                      (all-reduce mean)
      3. x ← x − γ ḡ                            (identical on every worker)
    """

    name = "psgd"

    def step(self, t, lr, grad):
        g = self._wd(grad())                         # 1.
        self.env.worker_comm.allreduce_mean(g)       # 2.  (in place: g is scratch)
        self.x -= np.float32(lr) * g                 # 3.
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
        self.K = K
        self.avg_phase = avg_phase

    def step(self, t, lr, grad):
        g = self._wd(grad())
        self.x -= np.float32(lr) * g                         # 1. local step
        if is_round_end(t, self.K, self.avg_phase):
            self.env.worker_comm.allreduce_mean(self.x)      # 2. average the models
            self.rounds += 1
