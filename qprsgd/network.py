"""Network model (pure math): α-β cost of each communication pattern, and re-timing of a logged run.

A message of n bytes over a link of latency α (seconds) and bandwidth B (bits/s) takes

    T(n) = α + 8 n / (e B)

where e (``efficiency``, default 1) is the share of the line rate left for payload (TCP over
Ethernet with a 1500-byte MTU: e = 1448/1514 ≈ 0.956; ``TCP_GOODPUT``).  Links are full duplex.
Costs of the patterns qprsgd's comm layer uses (M = ranks taking part, β = 8/(eB) s/byte):

=====================  =============================================  ===============================
pattern                cost of one call                               comm.py call / channel
=====================  =============================================  ===============================
ring allreduce         2(M−1) α + 2(M−1)/M · n β                       ``allreduce_mean`` / allreduce
allgather (variable)   (M−1) α + (Σⱼ nⱼ − minⱼ nⱼ) β                   ``allgather_bytes`` / allgather
alltoall (personal.)   (M−1) α + maxᵢ max(Σⱼ nᵢⱼ, Σⱼ nⱼᵢ) β            ``alltoall_bytes`` / alltoall
integer allreduce      as ring allreduce (n = the integer buffer)      ``allreduce_sum_int`` / allreduce
neighbour exchange     maxᵢ (α + maxⱼ nᵢⱼ β)  (per-link)               ``neighbor_exchange`` / peer
                       maxᵢ (α + Σⱼ nᵢⱼ β)    (shared NIC)
server incast          α + Σⱼ nⱼ β  (the server's downlink)            ``gather_bytes`` / up
server broadcast       α + Σⱼ nⱼ β  (the server's uplink)              ``scatter/broadcast_bytes`` / down
=====================  =============================================  ===============================

Decisions:

* Ring allreduce: reduce-scatter then allgather, each M−1 steps of n/M bytes per rank (the
  bandwidth-optimal algorithm MPI uses for large buffers).
* Allgather of variable payloads: M−1 ring steps (latency), and the last rank must receive
  every payload but its own over its one incoming link: Σ n − min n bytes (a pipelined ring
  reaches this bound).  Equal payloads give the textbook (M−1)(α + nβ).
* Alltoall (``reduce_scatter`` aggregation's first stage): pairwise exchange, M−1 steps; each
  node's one full-duplex NIC carries everything it sends and everything it receives, so the
  busiest node's larger direction sets the byte term.
* Neighbour exchange: all sends are posted at once.  Default ``shared_nic=False`` (the brief's
  "links in parallel"): each neighbour pair has its own full-duplex link, so a node's time is
  α plus its largest message.  ``shared_nic=True``: a node's messages share one NIC (one
  shaped veth under ``qprsgd netem``, or one NIC per cluster node) and its time is α plus the
  sum.  The step ends when the slowest node is done.
* Server: every worker sends at once; the server's one link carries M·n bytes (the 15-worker
  observation of dist-ef: the server's link is the bottleneck); the α terms overlap.
* Heterogeneous links (``inter``/``groups``): a message between two groups uses the slow
  inter-group link; a ring that crosses groups runs at its slowest link; a neighbour exchange
  takes the max over nodes of each node's per-link times.

The time of a step = measured local work (compute + codec + the algorithm's own arithmetic)
+ modelled comm (``retime``).  Everything here is linear in (α, β) for a homogeneous network, so
``row_terms`` returns, per metrics row, the number of latency terms L and of byte terms N, and a
network's comm time is α L + β N.  ``fit_alpha_beta`` fits a machine's effective (α, β) to
measured comm times (docs/network.md: calibration).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

TCP_GOODPUT = 1448.0 / 1514.0
"""Payload share of the line rate for TCP/IPv4 with timestamps over Ethernet (MTU 1500)."""

_BW_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_LAT_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


# -- parsing ----------------------------------------------------------------------------------
def parse_bandwidth(text: str) -> float:
    """'5Mbps' / '100mbit' / '10Gbps' / '1.4Gbit/s' / '2e6' -> bits per second."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)(bps|bit/s|bits/s|bit|b/s)?", s)
    if not m or (m.group(2) and not m.group(3)):
        raise ValueError(f"bandwidth {text!r}: expected a number with a unit such as 5Mbps, 100Mbit, 10Gbps")
    value = float(m.group(1)) * _BW_UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"bandwidth {text!r}: must be positive")
    return value


def parse_latency(text: str) -> float:
    """'0.1ms' / '10ms' / '5us' / '0' / '0.002s' -> seconds (a bare number is seconds)."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|µs|ns)?", s)
    if not m:
        raise ValueError(f"latency {text!r}: expected a number with a unit such as 0.1ms, 10ms, 5us")
    return float(m.group(1)) * _LAT_UNITS[m.group(2) or "s"]


def parse_list(text: str, parse: Callable[[str], float]) -> list[float]:
    """Comma-separated list: ``parse_list('5Mbps,100Mbps', parse_bandwidth)``."""
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    return [parse(t) for t in items]


def format_bandwidth(bps: float) -> str:
    for unit, f in (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)):
        if bps >= f:
            return f"{bps / f:g}{unit}"
    return f"{bps:g}bps"


def format_latency(sec: float) -> str:
    if sec == 0:
        return "0ms"
    if sec >= 1:
        return f"{sec:g}s"
    if sec >= 1e-3:
        return f"{sec * 1e3:g}ms"
    return f"{sec * 1e6:g}us"


# -- the model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One full-duplex link: latency α (s), line rate (bits/s), payload share ``efficiency``."""

    latency: float
    bandwidth: float
    efficiency: float = 1.0

    def __post_init__(self):
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0 s, got {self.latency!r}")
        if self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0 bit/s, got {self.bandwidth!r}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency!r}")

    @property
    def beta(self) -> float:
        """Seconds per payload byte."""
        return 8.0 / (self.bandwidth * self.efficiency)

    def message(self, nbytes: float) -> float:
        return self.latency + nbytes * self.beta


@dataclass(frozen=True)
class Network:
    """Links between ranks: ``link`` everywhere, or ``inter`` between ranks of different ``groups``.

    ``groups[r]`` is rank r's group (e.g. the hierarchical topology's groups); ``shared_nic``:
    a node's concurrent messages share one NIC (see the module docstring).
    """

    link: Link
    inter: Optional[Link] = None
    groups: Optional[tuple] = None
    shared_nic: bool = False

    @staticmethod
    def simple(bandwidth: float, latency: float = 0.0, efficiency: float = 1.0, shared_nic: bool = False):
        return Network(Link(latency, bandwidth, efficiency), shared_nic=shared_nic)

    def link_between(self, i: int, j: int) -> Link:
        if self.inter is None or self.groups is None:
            return self.link
        return self.link if self.groups[i] == self.groups[j] else self.inter

    def _ring_link(self, ranks: Sequence[int]) -> Link:
        """The slowest link on the ring through ``ranks`` (the ring advances at its pace)."""
        ranks = list(ranks)
        links = [self.link_between(ranks[k], ranks[(k + 1) % len(ranks)]) for k in range(len(ranks))]
        return max(links, key=lambda l: (l.beta, l.latency)) if links else self.link

    # -- collective patterns (one call) --------------------------------------------------------
    def ring_allreduce(self, nbytes: float, M: int, ranks: Optional[Sequence[int]] = None) -> float:
        """2(M−1) α + 2(M−1)/M · n β."""
        if M <= 1:
            return 0.0
        l = self._ring_link(ranks if ranks is not None else range(M))
        return 2 * (M - 1) * l.latency + 2 * (M - 1) / M * nbytes * l.beta

    def allgather(self, sizes: Sequence[float], ranks: Optional[Sequence[int]] = None) -> float:
        """(M−1) α + (Σ n − min n) β for payload sizes n_0..n_{M−1}."""
        M = len(sizes)
        if M <= 1:
            return 0.0
        l = self._ring_link(ranks if ranks is not None else range(M))
        return (M - 1) * l.latency + (float(sum(sizes)) - float(min(sizes))) * l.beta

    def alltoall(self, sizes) -> float:
        """``sizes[i][j]`` bytes from rank i to rank j (diagonal ignored):
        (M−1) α + maxᵢ max(Σ_{j≠i} nᵢⱼ, Σ_{j≠i} nⱼᵢ) β."""
        n = np.array(sizes, dtype=float)
        M = n.shape[0]
        if M <= 1:
            return 0.0
        np.fill_diagonal(n, 0.0)
        l = self._ring_link(range(M))
        return (M - 1) * l.latency + float(max(n.sum(1).max(), n.sum(0).max())) * l.beta

    def neighbor_exchange(self, messages: dict) -> float:
        """``messages[i] = {j: nbytes}`` (what node i sends to j); all posted at once, full duplex.

        A node is done when its sends are out and its receives are in; per-link: α plus the
        largest message on any of its links; shared NIC: α plus the sum over its sends (or
        over its receives, whichever is larger).
        """
        recv: dict = {}
        for i, out in messages.items():
            for j, n in out.items():
                recv.setdefault(j, {})[i] = n
        worst = 0.0
        for node in set(messages) | set(recv):
            out = messages.get(node, {})
            inc = recv.get(node, {})
            if self.shared_nic:
                t_out = sum(self.link_between(node, j).beta * n for j, n in out.items())
                t_in = sum(self.link_between(j, node).beta * n for j, n in inc.items())
                lat = max([self.link_between(node, j).latency for j in out] +
                          [self.link_between(j, node).latency for j in inc] + [0.0])
                t = lat + max(t_out, t_in)
            else:
                t = max([self.link_between(node, j).message(n) for j, n in out.items()] +
                        [self.link_between(j, node).message(n) for j, n in inc.items()] + [0.0])
            worst = max(worst, t)
        return worst

    def incast(self, sizes: Sequence[float], server: int = 0, senders: Optional[Sequence[int]] = None) -> float:
        """Server receives n_j from each sender at once: α + Σ n β over the server's link."""
        senders = list(range(1, len(sizes) + 1)) if senders is None else list(senders)
        if not sizes:
            return 0.0
        links = [self.link_between(j, server) for j in senders]
        slow = max(links, key=lambda l: l.beta)
        return max(l.latency for l in links) + float(sum(sizes)) * slow.beta

    def broadcast(self, sizes: Sequence[float], server: int = 0, dests: Optional[Sequence[int]] = None) -> float:
        """Server sends n_j to each dest (point-to-point): α + Σ n β over the server's link."""
        return self.incast(sizes, server, dests)

    def hierarchical_allreduce(self, nbytes: float, groups: Sequence[Sequence[int]]) -> float:
        """Reduce inside each group (ring), allreduce among group leaders over the inter link,
        broadcast inside each group: 2·ring_intra + ring_inter(among leaders) (one reading of
        cooperative-sgd §6.3's two-level averaging; an implementer's choice)."""
        intra = max((Network(self.link).ring_allreduce(nbytes, len(g)) for g in groups), default=0.0)
        inter = Network(self.inter or self.link).ring_allreduce(nbytes, len(groups))
        return intra + inter


# -- re-timing a logged run ------------------------------------------------------------------
CHANNEL_ORDER = ("allreduce", "allgather", "alltoall", "peer", "up", "down", "other")


@dataclass
class RowTerms:
    """Per metrics row: latency terms L and byte terms N (per-link and shared-NIC), local seconds."""

    L: np.ndarray
    N: np.ndarray
    N_shared: np.ndarray
    local: np.ndarray
    t_comm: np.ndarray
    step: np.ndarray
    per_channel: dict = field(default_factory=dict)
    t_comm_min: Optional[np.ndarray] = None   # min over ranks (logs before schema column: None)

    def comm(self, net: Network) -> np.ndarray:
        """Modelled comm seconds per row on a homogeneous network."""
        l = net.link
        return l.latency * self.L + l.beta * (self.N_shared if net.shared_nic else self.N)

    def time(self, net: Network) -> np.ndarray:
        """Modelled seconds per row: measured local work + modelled comm."""
        return self.local + self.comm(net)


def _degrees(W: Optional[np.ndarray], n_ranks: int) -> Optional[np.ndarray]:
    if W is None:
        return None
    W = np.asarray(W)
    A = (np.abs(W) > 0) & ~np.eye(W.shape[0], dtype=bool)
    deg = A.sum(1)[:n_ranks]
    return deg.astype(float)


def row_terms(log: dict) -> RowTerms:
    """(L, N) per metrics row from a run log read with ``qprsgd.logger.read``.

    Uses the per-row increments of ``metrics/channel_bytes`` and ``channel_messages`` (summed
    over ranks), the run's roles (attrs ``workers``, ``server``, ``world_size``) and, for the
    ``peer`` channel, the degrees of ``topology/W``.  Per channel (Δb bytes, Δm messages):

    * allreduce: c = Δm/M calls of n = Δb/Δm bytes: L = 2(M−1)c, N = 2(M−1)/M · n c.  A step
      whose gradient went in buckets (``train.bucket_mb``) is c calls, one per bucket, each
      charged in full: the model gives no credit for the part hidden behind backward.
    * allgather: c = Δm/M calls of Σn = Δb/c bytes: L = (M−1)c, N = (M−1)/M · Δb
      (mean payload for min n: exact for equal payloads; the log holds no per-call minimum).
    * alltoall: c = Δm/(M(M−1)) calls: L = (M−1)c, N = Δb/M (the mean rank's sent bytes: exact
      for equal chunks; the log holds no per-rank maximum).
    * peer: c = Δm/Σᵢdegᵢ exchanges of mean message n = Δb/Δm: L = c, N = n c (per link),
      N = max deg · n c (shared NIC).  Time-varying topologies (``topology/step_messages``):
      Σᵢdegᵢ and max deg are the per-step means of the messages and of the busiest node's peers.  Without W: each rank's messages are sent one after
      another: L = Δm/P, N = Δb/P.
    * up / down: c = Δm/S calls (S = workers other than the server): L = c, N = Δb.
    * other: as peer without W.
    """
    attrs = log.get("attrs", {})
    met = log["metrics"]
    P = int(attrs.get("world_size", 1))
    workers = list(np.atleast_1d(attrs.get("workers", list(range(P)))))
    M = max(len(workers), 1)
    server = attrs.get("server", None)
    server = None if server is None or (isinstance(server, (int, np.integer)) and server < 0) else server
    S = len([w for w in workers if server is None or int(w) != int(server)]) or 1
    W = log.get("topology", {}).get("W")
    deg = _degrees(W, M)
    step_msgs = log.get("topology", {}).get("step_messages")
    if step_msgs is not None and len(step_msgs):
        # time-varying topology: an exchange is one gossip step; its messages and the busiest
        # node's peers are the per-step means over the logged steps (W's support is the union)
        per_exchange = float(np.mean(step_msgs))
        max_deg = float(np.mean(log["topology"]["step_max_degree"]))
    elif deg is not None:
        per_exchange, max_deg = float(deg.sum()), float(deg.max())
    else:
        per_exchange = max_deg = 0.0
    cb = np.asarray(met["channel_bytes"], dtype=float)
    cm = np.asarray(met["channel_messages"], dtype=float)
    names = met.get("_attrs", {}).get("channel_bytes", {}).get("channels", ",".join(CHANNEL_ORDER))
    names = names.decode() if isinstance(names, bytes) else str(names)
    names = names.split(",")
    db = np.diff(np.vstack([np.zeros((1, cb.shape[1])), cb]), axis=0)
    dm = np.diff(np.vstack([np.zeros((1, cm.shape[1])), cm]), axis=0)
    nrows = cb.shape[0]
    L = np.zeros(nrows)
    N = np.zeros(nrows)
    Ns = np.zeros(nrows)
    per = {}
    for k, ch in enumerate(names):
        b, m = db[:, k], dm[:, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.where(m > 0, b / np.maximum(m, 1), 0.0)
        if ch == "allreduce":
            c = m / M
            l_, n_ = 2 * (M - 1) * c, 2 * (M - 1) / M * n * c
            ns_ = n_
        elif ch == "allgather":
            c = m / M
            l_, n_ = (M - 1) * c, (M - 1) / M * b
            ns_ = n_
        elif ch == "alltoall":
            c = m / (M * (M - 1)) if M > 1 else 0.0 * m
            l_, n_ = (M - 1) * c, b / M
            ns_ = n_
        elif ch == "peer" and per_exchange > 0:
            c = m / per_exchange
            l_, n_ = c, n * c
            ns_ = max_deg * n * c
        elif ch in ("up", "down"):
            l_, n_ = m / S, b
            ns_ = n_
        else:
            l_, n_ = m / P, b / P
            ns_ = n_
        L += l_
        N += n_
        Ns += ns_
        per[ch] = (l_, n_, ns_)
    t_compute = np.asarray(met["t_compute"], dtype=float)
    t_codec = np.asarray(met["t_codec"], dtype=float)
    t_comm = np.asarray(met["t_comm"], dtype=float)
    t_step = np.asarray(met["t_step"], dtype=float)
    local = np.maximum(t_compute + t_codec, t_step - t_comm)
    t_min = np.asarray(met["t_comm_min"], dtype=float) if "t_comm_min" in met else None
    return RowTerms(L, N, Ns, local, t_comm, np.asarray(met["step"]), per, t_min)


def time_to_step(terms: RowTerms, net: Network, step: float) -> float:
    """Modelled seconds until the metrics row that reaches ``step`` (inclusive)."""
    t = terms.time(net)
    idx = np.searchsorted(terms.step, step, side="left")
    if idx >= len(t):
        return float(np.sum(t))
    return float(np.sum(t[: idx + 1]))


def first_reaching(eval_rows: dict, target: float, column: str = "test_accuracy") -> Optional[int]:
    """Index of the first eval row with ``column >= target`` (loss: ``<=``), or None."""
    v = np.asarray(eval_rows[column], dtype=float)
    hit = (v <= target) if column.endswith("loss") else (v >= target)
    idx = np.flatnonzero(hit & np.isfinite(v))
    return int(idx[0]) if idx.size else None


def time_to_target(log: dict, net: Network, target: float, column: str = "test_accuracy",
                   terms: Optional[RowTerms] = None) -> Optional[float]:
    """Modelled seconds to the first evaluation at which ``column`` reaches ``target``."""
    i = first_reaching(log["eval"], target, column)
    if i is None:
        return None
    step = float(log["eval"]["step"][i])
    if step <= 0:
        return 0.0
    return time_to_step(terms or row_terms(log), net, step)


def fit_alpha_beta(L: np.ndarray, N: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Least squares (α, β) ≥ 0 for t ≈ α L + β N (β in seconds per byte)."""
    A = np.column_stack([np.asarray(L, float), np.asarray(N, float)])
    t = np.asarray(t, float)
    sol, *_ = np.linalg.lstsq(A, t, rcond=None)
    a, b = float(sol[0]), float(sol[1])
    if a < 0 or b < 0:  # 1-parameter fits on the boundary
        cands = []
        for col in (0, 1):
            x = A[:, col]
            v = float(x @ t / (x @ x)) if x @ x > 0 else 0.0
            v = max(v, 0.0)
            p = (v, 0.0) if col == 0 else (0.0, v)
            cands.append((float(np.sum((A @ np.array(p) - t) ** 2)), p))
        a, b = min(cands)[1]
    return a, b


def network_from_fit(alpha: float, beta: float) -> Network:
    """The Network whose (α, β) are a fit's (β seconds per byte)."""
    if beta <= 0:
        beta = 1e-15
    return Network(Link(alpha, 8.0 / beta))


def nonfinite_to_none(x) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)
