"""dcd-ecd-psgd (Tang et al., "Communication Compression for Decentralized Training"): D-PSGD,
naive compressed D-PSGD, DCD-PSGD (Algorithm 1) and ECD-PSGD (Algorithm 2, eq. (3)–(4)).

Notation (paper): n (= M) workers, W the symmetric doubly stochastic mixing matrix over the
workers, γ (``lr``) the step size, C an unbiased compressor (the configured codec).  Worker i
is world rank ``env.workers[i]`` and rank i of ``env.worker_comm``; it talks only to the j ≠ i
with W_ij ≠ 0, through the shared mixing component (``mixing.NeighborMixer``: point-to-point
sends on the ``peer`` channel, never an allgather).

Conventions shared by every class here (docs/algorithms-gossip.md):

* Steps t are 0-based in the runner; the paper's t is ``t + 1``.
* Mixing Σ_j W_ij v_j: ``mixing.NeighborMixer`` (ascending j, float64 accumulation, one rounding
  to float32; the same component the A(τ, W, v) family uses).  Tests compare at 1e-6.
* Weight decay λx is folded into the local gradient (``Algorithm._wd``).
* Codec draws come from ``env.rng`` only (one ``encode`` per step).
* DCD-PSGD and D-Q-PR-SGD never use a replica of themselves: their own value is exact
  (x̂_i = x_i).  ECD-PSGD does mix its own *estimate* x̃_i (L172), as every holder does.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..registry import ALGORITHMS
from .base import Algorithm
from .mixing import NeighborMixer, from_raw, raw_bytes  # noqa: F401 (raw_bytes/from_raw re-exported)
from .pairs import PairReferences


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GossipAlgorithm(Algorithm):
    """Shared plumbing of the gossip family: the neighbourhood of worker i and the mixing sum."""

    needs_topology = True
    default_topology = "ring"
    mixing_rule = "gossip"
    time_varying_ok = True

    def __init__(self, x, env):
        super().__init__(x, env)
        topo = env.extra.get("topology")
        # a time-varying topology: W_k of gossip round k (self.rounds), docs/topology.md
        self.seq = topo if getattr(topo, "time_varying", False) else None
        W = env.W
        if W is None:
            raise ValueError(f"{self.name}: needs a mixing matrix (the topology section built none)")
        M = env.M
        if W.shape != (M, M):
            raise ValueError(f"topology: {self.name} needs an M x M matrix over the {M} workers and no "
                             f"auxiliary nodes, got shape {W.shape}")
        self.i = env.worker_index
        self.mixer = NeighborMixer(env.worker_comm, self.i, W[self.i], env.d)
        self.pairs = None
        if self.seq is not None:
            self.mixer.set_matrix(self.seq.W_at(0))
        self.neighbors = self.mixer.neighbors     # j ≠ i with W_ij ≠ 0 (ranks of the workers' group)
        self.support = self.mixer.support         # the j of Σ_j W_ij (·)

    def _mix(self, v: dict) -> np.ndarray:
        """Σ_j W_ij v_j over i and its neighbours (``NeighborMixer.mix``)."""
        return self.mixer.mix(v)

    def _exchange(self, data):
        """Post the sends of ``data`` to every neighbour; ``.wait()`` gives {j: payload}."""
        return self.mixer.exchange(data)

    def _decode(self, data) -> np.ndarray:
        return self.env.codec.decode(data).astype(np.float32, copy=False)

    def _neighbor_table(self) -> np.ndarray:
        return np.asarray(self.neighbors, dtype=np.int64)

    # arrays a subclass keeps between steps (replicas, estimates): checkpointed by name
    _state_arrays: tuple = ()
    _tv_arrays: tuple = ()        # of those, the ones the time-varying (per-pair) path keeps too

    def _use_step_matrix(self) -> np.ndarray:
        """Time-varying: point the mixer at W_k of this round; returns W_k."""
        W = self.seq.W_at(self.rounds)
        self.mixer.set_matrix(W)
        return W

    def _pairs(self, x) -> None:
        if self.seq is not None and x is not None:
            self.pairs = PairReferences(self.seq, self.i, x, self.env.worker_comm, self.env.codec, self.env.rng)

    def state_dict(self):
        if self.pairs is not None:
            s = Algorithm.state_dict(self)
            s.update(self.pairs.state_dict())
            for name in self._tv_arrays:
                s[name] = getattr(self, name)
            return s
        s = super().state_dict()
        for name in self._state_arrays:
            s[name] = getattr(self, name)
        s["neighbors"] = self._neighbor_table()
        return s

    def load_state_dict(self, state):
        if self.pairs is not None:
            Algorithm.load_state_dict(self, state)
            self.pairs.load_state_dict(state)
            for name in self._tv_arrays:
                self._load_array(getattr(self, name), state[name])
            return
        super().load_state_dict(state)
        if not np.array_equal(np.asarray(state["neighbors"]), self._neighbor_table()):
            raise ValueError(f"checkpoint was written with neighbours {list(state['neighbors'])}, "
                             f"this topology gives {self.neighbors}")
        for name in self._state_arrays:
            self._load_array(getattr(self, name), state[name])


# --------------------------------------------------------------------------------------------
# D-PSGD


class DPSGDParams(_Params):
    mix_rule: Literal["mix_then_step", "step_then_mix"] = "mix_then_step"


@ALGORITHMS.register("d_psgd", params=DPSGDParams)
class DPSGD(GossipAlgorithm):
    """Decentralized parallel SGD (dcd-ecd-psgd §3, L80–88: X_{t+1} = X_t W − γ G(X_t);
    cooperative-sgd eq. (6) / A(1, W, 0)).  Uncompressed: float32 models cross MPI (32 d bits
    to each neighbour).

    ``mix_rule = "mix_then_step"`` (default; the paper's form), worker i, each step:
      1. g_i = ∇F_i(x_i; ξ_i)                      (at x_i, before mixing)
      2. send x_i to the neighbours, receive x_j
      3. x_i ← Σ_j W_ij x_j − γ g_i

    ``mix_rule = "step_then_mix"`` (cooperative-sgd eq. (10), X ← (X − γG)W):
      1. g_i = ∇F_i(x_i; ξ_i)
      2. y_i = x_i − γ g_i
      3. send y_i to the neighbours, receive y_j
      4. x_i ← Σ_j W_ij y_j
    With W = J the second rule is PSGD (``psgd``) up to float rounding.
    """

    name = "d_psgd"

    def __init__(self, x, env, mix_rule: str = "mix_then_step"):
        super().__init__(x, env)
        if mix_rule not in ("mix_then_step", "step_then_mix"):
            raise ValueError(f"mix_rule must be 'mix_then_step' or 'step_then_mix', got {mix_rule!r}")
        self.mix_rule = mix_rule

    def step(self, t, lr, grad):
        if self.seq is not None:
            self._use_step_matrix()                                      # W_k: this round's peers
        g = self._wd(grad())                                             # 1.
        if self.mix_rule == "mix_then_step":
            mixed = self.mixer.mix_models(self.x)                        # 2. exchange x_j, Σ_j W_ij x_j
            self.x[...] = mixed - np.float32(lr) * g                     # 3.
        else:
            y = self.x - np.float32(lr) * g                              # 2.
            self.mixer.mix_models(y, out=self.x)                         # 3.–4. exchange y_j, Σ_j W_ij y_j
        self.rounds += 1


# --------------------------------------------------------------------------------------------
# naive compressed D-PSGD


@ALGORITHMS.register("d_psgd_naive_q")
class DPSGDNaiveQ(GossipAlgorithm):
    """Naive compressed D-PSGD (dcd-ecd-psgd §4, Fig. 1, L97–101; App. D, L967–971):
    X_{t+1} = C(X_t) W − γ G(X_t).

    Worker i, each step:
      1. g_i = ∇F_i(x_i; ξ_i)                      (at the uncompressed x_i)
      2. q_i = C(x_i)                              (the model itself is compressed)
      3. send q_i to the neighbours, receive q_j
      4. x_i ← Σ_j W_ij C(x_j) − γ g_i             (j = i included: node i mixes its own
                                                    compressed model, ALGORITHMS.md §B)
    The paper's negative result: the compression noise Q_t W does not shrink with γ, so the
    error floor stays put as the step size decays (L101, L971).  Any codec is accepted (the
    paper leaves Fig. 1's compressor unspecified); the default is ``stochastic_bits``.
    """

    name = "d_psgd_naive_q"
    uses_codec = True
    default_codec = "stochastic_bits"

    def step(self, t, lr, grad):
        env = self.env
        if self.seq is not None:
            self._use_step_matrix()                                      # W_k: this round's peers
        g = self._wd(grad())                                             # 1.
        p = env.codec.encode(self.x, env.rng)                            # 2.
        req = self._exchange(p.data)                                     # 3. (sends posted)
        v = {self.i: self._decode(p.data)}
        got = req.wait()                                                 # 3. (receives)
        for j in self.mixer.neighbors:
            v[j] = self._decode(got[j])
        self.x[...] = self._mix(v) - np.float32(lr) * g                  # 4.
        self.rounds += 1


# --------------------------------------------------------------------------------------------
# DCD-PSGD


@ALGORITHMS.register("dcd_psgd")
class DCDPSGD(GossipAlgorithm):
    """DCD-PSGD, difference compression (dcd-ecd-psgd Algorithm 1, L135–160; §4.1, L116–131).

    Worker i keeps replicas x̂_j of its neighbours' models (x̂_j = x_j exactly, footnote 3).
    Input (line 1): x_1^(i) = x_1, x̂_1^(j) = x_1.  Each step t:
      3. sample ξ_t^(i)                                (the next batch of this worker's shard)
      4. g = ∇F_i(x_t^(i); ξ_t^(i))                    (+ λx)
      5. x_{t+½} = Σ_j W_ij x̂_t^(j) − γ g             (x̂_i = x_i; the box's x_t^(j) is the
                                                        replica, ALGORITHMS.md "Known problems")
      6. z_t = x_{t+½} − x_t;  encode C(z_t)
      7. x_{t+1} = x_t + C(z_t)                        (the decoded payload, as the neighbours see it)
      8. send C(z_t) to the neighbours; x̂_{t+1}^(j) = x̂_t^(j) + C(z_t^(j))  (the box's
                                                        C(z^(i)) is C(z^(j)))
    The owner and every holder add the same decoded float32 vector to bit-identical values, so
    x̂^(j) = x^(j) bit for bit at every step (tests/test_gossip.py checks it from checkpoints).
    C must be unbiased (Assumption 1.5, L114): a biased codec is refused at config time.
    """

    name = "dcd_psgd"
    _state_arrays = ("replicas",)
    uses_codec = True
    default_codec = "stochastic_bits"
    needs_unbiased_codec = True

    def __init__(self, x, env):
        super().__init__(x, env)
        # line 1: x̂_1^(j) = x_1 (every worker starts from the same x_1)
        self.replicas = None
        if self.seq is not None:
            self._pairs(x)          # time-varying: per-pair references (qprsgd/algorithms/pairs.py)
        elif x is not None:
            self.replicas = np.tile(x, (len(self.neighbors), 1))

    def replica(self, j: int) -> np.ndarray:
        """Debug accessor: this worker's replica x̂^(j) of neighbour j (a read-only view)."""
        v = (self.pairs.ref(j) if self.pairs is not None else self.replicas[self.neighbors.index(j)]).view()
        v.flags.writeable = False
        return v

    def step(self, t, lr, grad):
        if self.pairs is not None:
            return self._step_time_varying(lr, grad)
        env = self.env
        g = self._wd(grad())                                             # 3.–4.
        v = {j: self.replicas[k] for k, j in enumerate(self.neighbors)}
        v[self.i] = self.x
        x_half = self._mix(v) - np.float32(lr) * g                       # 5.
        z = x_half - self.x                                              # 6.
        p = env.codec.encode(z, env.rng)                                 # 6. C(z_t)
        req = self._exchange(p.data)                                     # 8. send C(z_t)
        self.x += self._decode(p.data)                                   # 7.
        got = req.wait()                                                 # 8. receive C(z^(j))
        for k, j in enumerate(self.neighbors):
            self.replicas[k] += self._decode(got[j])                     # 8. x̂^(j) += C(z^(j))
        self.rounds += 1

    def _step_time_varying(self, lr, grad):
        """Steps 3–8 on W_k with per-pair references h_{j→i} in place of the replicas x̂_j;
        a stale pair's catch-up payload is C(x_{t+1} − h) (docs/algorithms-gossip.md)."""
        env, P = self.env, self.pairs
        self._use_step_matrix()
        g = self._wd(grad())                                             # 3.–4.
        x_half = self._mix(P.mix_values(self.mixer.neighbors, self.x)) - np.float32(lr) * g   # 5.
        z = x_half - self.x                                              # 6.
        p = env.codec.encode(z, env.rng)                                 # 6. C(z_t)
        dz = self._decode(p.data)

        def apply(h, d):
            h += d

        apply(self.x, dz)                                                # 7. x_{t+1} = x_t + C(z_t)
        P.talk(self.seq.W_at(self.rounds + 1), p.data, dz, apply,       # 8. along W_{k+1}
               catchup=lambda h: self.x - h)
        self.rounds += 1


# --------------------------------------------------------------------------------------------
# ECD-PSGD


@ALGORITHMS.register("ecd_psgd")
class ECDPSGD(GossipAlgorithm):
    """ECD-PSGD, extrapolation compression (dcd-ecd-psgd Algorithm 2, L162–190, with eq. (3)–(4),
    L234–238, as fixed by ALGORITHMS.md §B).

    Worker i keeps estimates x̃^(j) of itself and of its neighbours.  Input (line 1):
    x_1^(i) = x_1, x̃_1^(j) = x_1 (uncompressed).  Paper step t = 1, 2, … (runner step t − 1):
      3. sample ξ_t^(i)
      4. g = ∇F_i(x_t^(i); ξ_t^(i))                    (+ λx)
      5. x_{t+½} = Σ_j W_ij x̃_t^(j)                    (j = i included: the own *estimate*, L172)
      6. x_{t+1} = x_{t+½} − γ g
      7. z_{t+1} = (1 − (t+1)/2) x_t + ((t+1)/2) x_{t+1};  encode C(z_{t+1});  send it
      8. every holder of x̃^(j) (j itself included):
           x̃_{t+1}^(j) = (1 − 2/(t+1)) x̃_t^(j) + (2/(t+1)) C(z_{t+1}^(j))
    Step index (the box's 0.5t, 2/t at line 7–8 (L180, L184) use C(z_t) before it exists): we use
    eq. (3)–(4) with the index t+1 on both, so the first update is z_2 = x_2 and x̃_2 = C(x_2)
    (coefficient 1 − 2/2 = 0) -- Lemma 11's a_1 = 0 (L820–832).  With C = identity, x̃ = x up to
    rounding that grows like t·eps (z carries the factor (t+1)/2).  Coefficients are rounded
    to float32 once per step; the update is elementwise float32.
    C must be unbiased (Assumption 1.5): a biased codec is refused at config time.
    """

    name = "ecd_psgd"
    _state_arrays = ("own_estimate", "estimates")
    _tv_arrays = ("own_estimate",)
    uses_codec = True
    default_codec = "stochastic_bits"
    needs_unbiased_codec = True

    def __init__(self, x, env):
        super().__init__(x, env)
        # line 1: x̃_1^(j) = x_1 for the own estimate and every neighbour's
        self.own_estimate = None if x is None else x.copy()
        self.estimates = None
        if self.seq is not None:
            self._pairs(x)          # time-varying: per-pair estimates (qprsgd/algorithms/pairs.py)
        elif x is not None:
            self.estimates = np.tile(x, (len(self.neighbors), 1))

    def estimate(self, j: int) -> np.ndarray:
        """Debug accessor: this worker's estimate x̃^(j) (j = itself or a neighbour), read-only."""
        if self.pairs is not None and j != self.i:
            v = self.pairs.ref(j).view()
            v.flags.writeable = False
            return v
        v = (self.own_estimate if j == self.i else self.estimates[self.neighbors.index(j)]).view()
        v.flags.writeable = False
        return v

    def step(self, t, lr, grad):
        env = self.env
        k = t + 2                          # the paper's t+1 for its step t = runner step + 1
        a = np.float32(k / 2.0)
        one_minus_a = np.float32(1.0 - k / 2.0)
        c = np.float32(2.0 / k)
        one_minus_c = np.float32(1.0 - 2.0 / k)
        g = self._wd(grad())                                             # 3.–4. at x_t
        if self.pairs is not None:
            return self._step_time_varying(lr, g, a, one_minus_a, c, one_minus_c)
        v = {j: self.estimates[n] for n, j in enumerate(self.neighbors)}
        v[self.i] = self.own_estimate
        x_half = self._mix(v)                                            # 5.
        x_next = x_half - np.float32(lr) * g                             # 6.
        z = one_minus_a * self.x + a * x_next                            # 7. z_{t+1}
        p = env.codec.encode(z, env.rng)                                 # 7. C(z_{t+1})
        req = self._exchange(p.data)                                     # 7. send
        self.x[...] = x_next                                             # 6. x_{t+1}
        self.own_estimate[...] = one_minus_c * self.own_estimate + c * self._decode(p.data)  # 8. (j = i)
        got = req.wait()
        for n, j in enumerate(self.neighbors):                           # 8. neighbours' estimates
            self.estimates[n] = one_minus_c * self.estimates[n] + c * self._decode(got[j])
        self.rounds += 1

    def _step_time_varying(self, lr, g, a, one_minus_a, c, one_minus_c):
        """Steps 5–8 on W_k with per-pair estimates h_{j→i}.  A stale pair's catch-up payload is
        C(w), w = a (x_{t+1} − (1 − c) h) (a = 1/c): the holder's update (1 − c) h + c C(w) then
        has mean x_{t+1}, as the fresh update does (docs/algorithms-gossip.md)."""
        env, P = self.env, self.pairs
        self._use_step_matrix()
        x_half = self._mix(P.mix_values(self.mixer.neighbors, self.own_estimate))   # 5.
        x_next = x_half - np.float32(lr) * g                             # 6.
        z = one_minus_a * self.x + a * x_next                            # 7. z_{t+1}
        p = env.codec.encode(z, env.rng)                                 # 7. C(z_{t+1})
        self.x[...] = x_next                                             # 6. x_{t+1}

        def apply(h, d):
            h[...] = one_minus_c * h + c * d

        dz = self._decode(p.data)
        apply(self.own_estimate, dz)                                     # 8. (j = i)
        P.talk(self.seq.W_at(self.rounds + 1), p.data, dz, apply,       # 8. along W_{k+1}
               catchup=lambda h: a * (self.x - one_minus_c * h))
        self.rounds += 1
