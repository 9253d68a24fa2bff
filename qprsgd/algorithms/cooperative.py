"""cooperative-sgd (Wang & Joshi): the Cooperative SGD framework A(τ, W, v) and its family.

Notation (paper §3.1): m (= M) workers with models x⁽ⁱ⁾, v auxiliary variables z⁽ᵃ⁾ (no
gradient: G's aux columns are 0, eq. (9)), X = [x⁽¹⁾ … x⁽ᵐ⁾, z⁽¹⁾ … z⁽ᵛ⁾] (eq. (8)), a
symmetric (m+v)×(m+v) mixing matrix W with W1 = 1 and ζ < 1 (Assumption 5), η (``lr``) the step
size, τ (``tau``) the number of local steps per averaging.  Every member runs

    X_{k+1} = (X_k − ηG_k) W_k                        rule (10), ``mix_rule: step_then_mix`` (default)
    X_{k+1} = X_k W_k − ηG_k                          Remark 1,  ``mix_rule: mix_then_step``

with W_k = W on averaging steps and W_k = I otherwise (eq. (7)).  Default rule (10), the one the
paper analyses and the only one for which A(1, J, 0) is fully synchronous SGD (ALGORITHMS.md,
conventions).  Averaging phase (ALGORITHMS.md): ``avg_phase: end`` averages after 0-based steps
τ−1, 2τ−1, … (the paper's k mod τ = 0 with k counted from 1), ``avg_phase: k0`` after steps
0, τ, 2τ, ….  Node i's column mixes as x⁽ⁱ⁾ ← Σⱼ Wⱼᵢ yⱼ = Σⱼ Wᵢⱼ yⱼ (W symmetric), formed by
the shared mixing component (``mixing``: ascending j, float64 accumulation, one rounding to
float32) -- the same numerics as the gossip family, so ``d_pasgd`` with τ = 1 equals ``d_psgd``
under the same rule bit for bit.

Registry entries (one engine, thin entries; each checks its topology at build time):

  cooperative          A(τ, W, v), any W      aux node M+k on worker k mod M; with a grouped topology
                                              (``hierarchical``) a_g on group g's first worker
  pasgd                A(τ, J, 0), eq. (3)    topology ``allreduce`` (all-reduce transport) or ``complete``
  d_pasgd              A(τ, W, 0), §6.1       any worker topology (v = 0); τ = 1 is D-PSGD (eq. (6) with mix_then_step)
  easgd                A(τ, W_α, 1), (11)     topology ``elastic``; z on ``env.server`` (run.server)
  generalized_elastic  A(τ, W′, 1), (23)      topology ``generalized_elastic``; z on ``env.server``
  hierarchical         A(τ, W_h, q), §6.3     topology ``hierarchical``; a_g on group g's first worker

EASGD under rule (10): x⁽ⁱ⁾ ← (1−α)(x⁽ⁱ⁾ − ηgᵢ) + αz, z ← (1 − mα)z + αΣᵢ(x⁽ⁱ⁾ − ηgᵢ); under
Remark 1 it is the familiar eq. (4)–(5) (x⁽ⁱ⁾ ← x⁽ⁱ⁾ − ηgᵢ − α(x⁽ⁱ⁾ − z), z ← (1−mα)z + mαx̄).

Hierarchical (§6.3, Fig. 6; the paper gives no equations, implementer's choice = the topology
layer's W_h): group g of n_g workers owns the auxiliary node a_g = M+g;
W_h[i, a_g] = W_h[a_g, i] = 1/(n_g+1) for i ∈ g, W_h[i, i] = n_g/(n_g+1),
W_h[a_g, a_h] = 1/q (g ≠ h), W_h[a_g, a_g] = 1 − n_g/(n_g+1) − (q−1)/q.  So on an averaging step a
worker moves towards its group's node, a_g averages its group with the other groups' nodes, and
nothing else moves.  a_g lives on the first (lowest) worker of g.  Transport runs over
sub-groups that the experiment builds from :meth:`Cooperative.comm_groups`: one per group (the
group's workers, a_g's host included: worker ↔ a_g traffic) and one of the q hosts of the a_g
(a_g ↔ a_h traffic).

Transport.  Without auxiliary nodes (v = 0) a worker mixes through ``mixing.NeighborMixer`` on
the workers' group.  With auxiliary nodes, a rank sends a node's value only to ranks hosting a
node j with Wᵢⱼ ≠ 0 (all posted at once with the transport's ``isendrecv_bytes``),
uncompressed float32.  Channels: ``up`` =
a worker's value going to a rank that uses it only for auxiliary nodes (worker → z), ``down`` =
an auxiliary value going to a rank that uses it only for workers (z → worker), ``peer``
otherwise.  ``pasgd`` on the ``allreduce`` topology (W = J) averages with one all-reduce on the
workers' communicator, exactly as ``pr_sgd``, so the two give bit-identical iterates.

Non-blocking (``nonblocking: true``; §3.3 "Non-blocking Execution", L139).  The auxiliary
variables have no gradient, so between averagings they are constant: on the averaging step
from x_{jτ} the workers need only the auxiliary values computed at the *previous* averaging.
Each averaging therefore (a) exchanges the workers' values, (b) updates every node (workers
with the auxiliary values they already hold), (c) posts the new auxiliary values to the ranks
that need them.  Blocking waits for (c) before the next local step, i.e. the workers wait for
the z update and its broadcast; non-blocking waits for it only at the next averaging step, so
the z update and broadcast overlap the workers' τ local steps.  The arithmetic is the same, so
the iterates are bit-identical.  A pending exchange is completed before a checkpoint.

State (``state_dict``): the rounds, this rank's auxiliary values (``aux<node>``) and its copies
of the remote auxiliary values it mixes with (``cache<node>``); the initial values of all nodes
are x₀ (all models start at the same point, Theorem 1).  On a dedicated server rank (not a
worker) the first hosted z is stored in ``x`` itself, so its ``final/params`` row is z.

Benchmark knobs (default 0, off): ``aux_delay_s`` sleeps in every auxiliary update (a slow z
update), ``compute_delay_s`` sleeps after every gradient (heavier local compute).
"""
from __future__ import annotations

import time
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..registry import ALGORITHMS
from .base import Algorithm
from .mixing import NeighborMixer, combine
from .quantized_pr import average_models, is_round_end


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CooperativeParams(_Params):
    tau: int = Field(1, ge=1, description="local steps per averaging (τ)")
    mix_rule: Literal["step_then_mix", "mix_then_step"] = Field(
        "step_then_mix", description="step_then_mix: X ← (X − ηG)W (rule (10)); mix_then_step: X ← XW − ηG (Remark 1)")
    avg_phase: Literal["end", "k0"] = Field("end", description="end: average after steps τ, 2τ, …; k0: 0-based k mod τ = 0")
    nonblocking: bool = Field(False, description="auxiliary updates overlap the next local steps (§3.3)")
    aux_delay_s: float = Field(0.0, ge=0, description="benchmark only: sleep in every auxiliary update")
    compute_delay_s: float = Field(0.0, ge=0, description="benchmark only: sleep after every gradient")


class PeriodicParams(CooperativeParams):
    tau: int = Field(4, ge=1, description="local steps per averaging (τ)")


class NoAuxParams(_Params):
    tau: int = Field(4, ge=1, description="local steps per averaging (τ)")
    mix_rule: Literal["step_then_mix", "mix_then_step"] = "step_then_mix"
    avg_phase: Literal["end", "k0"] = "end"
    compute_delay_s: float = Field(0.0, ge=0, description="benchmark only: sleep after every gradient")


_F32 = np.dtype(np.float32)


class _Route:
    """One communicator this rank uses and what moves over it in each averaging round."""

    def __init__(self, comm, members):
        self.comm = comm
        self.local = {r: k for k, r in enumerate(members)}  # world rank -> rank in ``comm``
        self.wsend: dict[int, list] = {}   # local dest -> my worker nodes it needs
        self.wrecv: dict[int, list] = {}   # local source -> its worker nodes I need
        self.wchan: dict[int, str] = {}
        self.asend: dict[int, list] = {}   # local dest -> my aux nodes it needs
        self.arecv: dict[int, list] = {}   # local source -> its aux nodes I need
        self.achan: dict[int, str] = {}


class Cooperative(Algorithm):
    """Cooperative SGD A(τ, W, v) (cooperative-sgd §3, Algorithm = eq. (7)–(10), Remark 1).

    Per step k (0-based t), on the nodes this rank hosts:
      1. gᵢ = ∇f(x⁽ⁱ⁾; ξ)          worker nodes only; auxiliary nodes have g = 0        (eq. (9))
      2. not an averaging step (W_k = I, eq. (7)):  x⁽ⁱ⁾ ← x⁽ⁱ⁾ − ηgᵢ                 (local step)
      3. averaging step (W_k = W):
         a. yᵢ = x⁽ⁱ⁾ − ηgᵢ (rule (10)) or yᵢ = x⁽ⁱ⁾ (Remark 1); exchange the workers' yᵢ with
            the ranks whose nodes have Wᵢⱼ ≠ 0
         b. every hosted node j:  X[:, j] ← Σₖ Wₖⱼ yₖ, with the auxiliary yₖ = zₖ held since the
            previous averaging; Remark 1 then subtracts ηgⱼ on workers
         c. post the new auxiliary values to the ranks that mix with them; blocking: wait now;
            ``nonblocking``: wait at the next averaging step (3a)
    """

    name = "cooperative"
    needs_topology = True
    default_topology = "ring"
    mixing_rule = "cooperative"
    time_varying_ok = True               # v = 0 only: W_k of averaging round k (self.rounds)
    topologies: Optional[tuple] = None   # allowed topology names (None: any)
    require_J = False
    require_no_aux = False

    def __init__(self, x, env, tau: int = 1, mix_rule: str = "step_then_mix", avg_phase: str = "end",
                 nonblocking: bool = False, aux_delay_s: float = 0.0, compute_delay_s: float = 0.0):
        super().__init__(x, env)
        if int(tau) < 1:
            raise ValueError(f"tau must be >= 1, got {tau}")
        if mix_rule not in ("step_then_mix", "mix_then_step"):
            raise ValueError(f"mix_rule must be 'step_then_mix' or 'mix_then_step', got {mix_rule!r}")
        if avg_phase not in ("end", "k0"):
            raise ValueError(f"avg_phase must be 'end' or 'k0', got {avg_phase!r}")
        self.tau = int(tau)
        self.mix_rule = mix_rule
        self.avg_phase = avg_phase
        self.nonblocking = bool(nonblocking)
        self.aux_delay_s = float(aux_delay_s)
        self.compute_delay_s = float(compute_delay_s)

        topo = env.extra.get("topology")
        if topo is None or env.W is None:
            raise ValueError(f"algorithm {self.name!r} needs a topology section (a mixing matrix W)")
        self.topo = topo
        self.W = np.asarray(env.W, dtype=np.float64)
        self.M = M = env.M
        self.n = n = self.W.shape[0]
        self.v = n - M
        self._check_topology(topo)

        # placement: node -> world rank
        self.host = list(env.workers) + self._aux_hosts(topo)
        me = env.rank
        self.my_nodes = [i for i in range(n) if self.host[i] == me]
        self.my_worker = env.worker_index if env.is_worker else None
        self.my_aux = [a for a in self.my_nodes if a >= M]
        # non-zero pattern of W (ascending j), for the auxiliary-node transport
        self._w = {i: [(j, float(self.W[j, i])) for j in range(n) if self.W[j, i] != 0.0]
                   for i in self.my_nodes}

        # the transport: one all-reduce (W = J), the shared neighbour mixer (v = 0), or routes
        self.allreduce = topo.name == "allreduce"
        self.mixer = None
        if not self.allreduce and self.v == 0 and self.my_worker is not None:
            self.mixer = NeighborMixer(env.worker_comm, self.my_worker, self.W[self.my_worker], env.d)
        # time-varying topology (v = 0 by construction): averaging round r mixes with W_r
        self.seq = topo if getattr(topo, "time_varying", False) else None
        if self.seq is not None:
            if self.mixer is None:
                raise ValueError(f"topology: {topo.name!r} is time-varying; algorithm {self.name!r} "
                                 f"mixes it only without auxiliary nodes (v = 0)")
            self.mixer.set_matrix(self.seq.W_at(0))
        self.routes = [] if (self.allreduce or self.v == 0) else self._routes(topo)

        # node values: own auxiliary variables and copies of the remote ones; all start at x₀
        x0 = x.astype(np.float32, copy=True) if x is not None else np.zeros(env.d, np.float32)
        self.z: dict[int, np.ndarray] = {}
        for k, a in enumerate(self.my_aux):
            if k == 0 and not env.is_worker and x is not None:
                self.z[a] = x            # a dedicated server's model buffer holds its z
            else:
                self.z[a] = x0.copy()
        self.cache: dict[int, np.ndarray] = {}
        for r in self.routes:
            for nodes in r.arecv.values():
                for a in nodes:
                    self.cache[a] = x0.copy()
        self._pending: list = []

    # -- configuration ------------------------------------------------------------------------
    def _check_topology(self, topo) -> None:
        if self.topologies is not None and topo.name not in self.topologies:
            raise ValueError(f"topology.name: algorithm {self.name!r} needs topology "
                             f"{' or '.join(map(repr, self.topologies))}, got {topo.name!r}")
        if self.require_no_aux and self.v:
            raise ValueError(f"topology: algorithm {self.name!r} is A(τ, W, 0): the topology must have no "
                             f"auxiliary nodes, got {topo.name!r} with v = {self.v}")
        if self.require_J and not np.allclose(self.W, 1.0 / self.M, rtol=0, atol=1e-12):
            raise ValueError(f"topology: algorithm {self.name!r} is A(τ, J, 0): W must be J "
                             f"(topology allreduce or complete), got {topo.name!r}")
        if topo.name == "allreduce" and self.v:
            raise ValueError("topology: 'allreduce' cannot carry auxiliary nodes")

    def _aux_hosts(self, topo) -> list[int]:
        """World rank of each auxiliary node M .. M+v-1 (here: hosted by workers)."""
        w = self.env.workers
        if topo.groups is not None:
            if len(topo.groups) != self.v:
                raise ValueError(f"topology {topo.name!r}: {len(topo.groups)} groups but v = {self.v}")
            return [w[min(g)] for g in topo.groups]
        return [w[k % self.M] for k in range(self.v)]

    @classmethod
    def comm_groups(cls, topology, workers: tuple, server) -> list[tuple]:
        """Grouped topologies (``hierarchical``): one group per worker group g (its workers, a_g's
        host among them) and one of the a_g hosts; world ranks, ascending.  Others: none."""
        groups = getattr(topology, "groups", None)
        if groups is None:
            return []
        out = [tuple(sorted(workers[i] for i in g)) for g in groups]
        out.append(tuple(sorted({workers[min(g)] for g in groups})))
        return out

    def _routes(self, topo) -> list[_Route]:
        """Communicators and, per round, which node values go where (Wᵢⱼ ≠ 0 only)."""
        env, W, n, M = self.env, self.W, self.n, self.M
        size = env.comm.size
        if topo.groups is None:
            comms = [(env.comm, list(range(size)))]
        else:
            # the experiment built one group per entry of comm_groups (None where not a member)
            member_lists = self.comm_groups(topo, tuple(env.workers), env.server)
            comms = [(g, list(members)) for g, members in zip(env.groups, member_lists) if g is not None]
        routes = [_Route(c, members) for c, members in comms]
        nodes_at: dict[int, list] = {}
        for i in range(n):
            nodes_at.setdefault(self.host[i], []).append(i)
        me = env.rank
        mine = nodes_at.get(me, [])

        def route_to(r):
            for rt in routes:
                if r in rt.local:
                    return rt
            raise ValueError(f"no communicator joins ranks {me} and {r} though W couples their nodes")

        for r, theirs in sorted(nodes_at.items()):
            if r == me:
                continue
            # what r needs from me: my nodes j with W[i, j] != 0 for some i at r
            users = {j: [i for i in theirs if W[i, j] != 0.0] for j in mine}
            sw = [j for j in mine if j < M and users[j]]
            sa = [j for j in mine if j >= M and users[j]]
            # what I need from r
            need = {j: [i for i in mine if W[i, j] != 0.0] for j in theirs}
            rw = [j for j in theirs if j < M and need[j]]
            ra = [j for j in theirs if j >= M and need[j]]
            if not (sw or sa or rw or ra):
                continue
            rt = route_to(r)
            k = rt.local[r]
            if sw:
                rt.wsend[k] = sw
                rt.wchan[k] = "up" if all(i >= M for j in sw for i in users[j]) else "peer"
            if sa:
                rt.asend[k] = sa
                rt.achan[k] = "down" if all(i < M for j in sa for i in users[j]) else "peer"
            if rw:
                rt.wrecv[k] = rw
            if ra:
                rt.arecv[k] = ra
        return routes

    # -- the step ------------------------------------------------------------------------------
    def step(self, t, lr, grad):
        eta = np.float32(lr)
        g = None
        if self.my_worker is not None:
            g = self._wd(grad())                                     # 1. gradient (workers only)
            if self.compute_delay_s:
                time.sleep(self.compute_delay_s)
        if not is_round_end(t, self.tau, self.avg_phase):
            if g is not None:
                self.x -= eta * g                                    # 2. local step, W_k = I
            return
        rule10 = self.mix_rule == "step_then_mix"
        if self.allreduce:                                           # 3. W = J: one all-reduce
            if rule10:
                self.x -= eta * g
                average_models(self.env.worker_comm, self.x)
            else:
                y = self.x.copy()
                average_models(self.env.worker_comm, y)
                self.x[...] = y
                self.x -= eta * g
            self.rounds += 1
            return
        if self.mixer is not None:                                   # 3. v = 0: neighbour mixing
            if self.seq is not None:
                self.mixer.set_matrix(self.seq.W_at(self.rounds))    # W_k of this round
            if rule10:
                self.x -= eta * g                                    # 3a. y = x − ηg
                self.mixer.mix_models(self.x, out=self.x)            # 3b. x ← Σⱼ Wᵢⱼ yⱼ
            else:
                mixed = self.mixer.mix_models(self.x)                # 3b. Σⱼ Wᵢⱼ xⱼ
                self.x[...] = mixed
                self.x -= eta * g                                    # Remark 1: XW − ηG
            self.rounds += 1
            return
        if g is not None and rule10:
            self.x -= eta * g                                        # 3a. y = x − ηg (rule (10))
        self._finish_pending()                                       # auxiliary values of the last round
        vals = self._exchange_workers()                              # 3a. the workers' y
        new = {i: combine(self._w[i], vals, self.env.d) for i in self.my_nodes}   # 3b. X[:, i] ← Σⱼ Wⱼᵢ yⱼ
        for i, val in new.items():
            if i < self.M:
                self.x[...] = val
                if not rule10:
                    self.x -= eta * g                                # Remark 1: XW − ηG
            else:
                self.z[i][...] = val
        if self.my_aux and self.aux_delay_s:
            time.sleep(self.aux_delay_s)
        self._post_aux()                                             # 3c. send the new z
        if not self.nonblocking:
            self._finish_pending()
        self.rounds += 1

    def _values(self) -> dict[int, np.ndarray]:
        vals = dict(self.cache)
        vals.update(self.z)
        if self.my_worker is not None:
            vals[self.my_worker] = self.x
        return vals

    def _exchange_workers(self) -> dict[int, np.ndarray]:
        d = self.env.d
        vals = self._values()
        reqs = []
        for rt in self.routes:
            sends = {k: np.concatenate([vals[j] for j in nodes]).view(np.uint8) for k, nodes in rt.wsend.items()}
            recvs = {k: 4 * d * len(nodes) for k, nodes in rt.wrecv.items()}
            reqs.append((rt, rt.comm.isendrecv_bytes(sends, recvs, rt.wchan)))
        for rt, req in reqs:
            for k, buf in req.wait().items():
                arr = buf.view(np.float32)
                for p, j in enumerate(rt.wrecv[k]):
                    vals[j] = arr[p * d:(p + 1) * d]
        return vals

    def _post_aux(self) -> None:
        d = self.env.d
        for rt in self.routes:
            sends = {k: np.concatenate([self.z[a] for a in nodes]).view(np.uint8) for k, nodes in rt.asend.items()}
            recvs = {k: 4 * d * len(nodes) for k, nodes in rt.arecv.items()}
            self._pending.append((rt, rt.comm.isendrecv_bytes(sends, recvs, rt.achan)))

    def _finish_pending(self) -> None:
        d = self.env.d
        for rt, req in self._pending:
            for k, buf in req.wait().items():
                arr = buf.view(np.float32)
                for p, a in enumerate(rt.arecv[k]):
                    self.cache[a][...] = arr[p * d:(p + 1) * d]
        self._pending = []

    def finish(self) -> None:
        """The last round's auxiliary exchange may still be in flight (non-blocking): complete it."""
        self._finish_pending()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        self._finish_pending()
        st = super().state_dict()
        for a, z in self.z.items():
            st[f"aux{a}"] = z.copy()
        for a, z in self.cache.items():
            st[f"cache{a}"] = z.copy()
        return st

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._pending = []
        for a, z in self.z.items():
            self._load_array(z, state[f"aux{a}"])
        for a, z in self.cache.items():
            self._load_array(z, state[f"cache{a}"])


@ALGORITHMS.register("cooperative", params=CooperativeParams)
class CooperativeSGD(Cooperative):
    """Cooperative SGD A(τ, W, v) over any topology (cooperative-sgd §3, eq. (10))."""


class _ServerHosted(Cooperative):
    """A(τ, W, 1) with z on ``env.server`` (run.server: rank0 doubles as z's host, or a dedicated rank)."""

    needs_server = True
    time_varying_ok = False

    def _aux_hosts(self, topo) -> list[int]:
        if self.v != 1:
            raise ValueError(f"topology: algorithm {self.name!r} has one auxiliary variable z, got v = {self.v}")
        return [self.env.server]


@ALGORITHMS.register("pasgd", params=PeriodicParams)
class PASGD(Cooperative):
    """PASGD = A(τ, J, 0) (cooperative-sgd eq. (3)): τ local steps, then X ← XJ (same iterates as pr_sgd)."""

    name = "pasgd"
    time_varying_ok = False
    default_topology = "allreduce"
    topologies = ("allreduce", "complete")
    require_J = True


@ALGORITHMS.register("d_pasgd", params=NoAuxParams)
class DPASGD(Cooperative):
    """Decentralized periodic averaging A(τ, W, 0) (cooperative-sgd §6.1); τ = 1 is D-PSGD (eq. (6) under mix_then_step; rule (10) under the default)."""

    name = "d_pasgd"
    require_no_aux = True


@ALGORITHMS.register("easgd", params=CooperativeParams)
class EASGD(_ServerHosted):
    """EASGD = A(τ, W_α, 1) (cooperative-sgd eq. (4)–(5), (11)); synchronous (τ = 1), periodic, non-blocking."""

    name = "easgd"
    default_topology = "elastic"
    topologies = ("elastic",)


@ALGORITHMS.register("generalized_elastic", params=CooperativeParams)
class GeneralizedElastic(_ServerHosted):
    """Generalized elastic averaging A(τ, W′, 1) (cooperative-sgd §6.2, eq. (23))."""

    name = "generalized_elastic"
    default_topology = "generalized_elastic"
    topologies = ("generalized_elastic",)


@ALGORITHMS.register("hierarchical", params=PeriodicParams)
class Hierarchical(Cooperative):
    """Hierarchical averaging A(τ, W_h, q) (cooperative-sgd §6.3, Fig. 6): groups average through their
    own auxiliary node a_g (on the group's first worker), the a_g average among themselves.

    W_h (topology ``hierarchical``): W_h[i, a_g] = 1/(n_g+1) for i ∈ g, W_h[i, i] = n_g/(n_g+1),
    W_h[a_g, a_h] = 1/q (g ≠ h), W_h[a_g, a_g] = 1 − n_g/(n_g+1) − (q−1)/q.  Transport over one
    sub-group per group and one of the q auxiliary hosts (``comm_groups``; built by the experiment).
    """

    name = "hierarchical"
    time_varying_ok = False
    default_topology = "hierarchical"
    topologies = ("hierarchical",)
