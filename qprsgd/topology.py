"""Mixing matrices (topologies), their checks, and the spectral pre-flight report.

Pure numpy: no MPI, no torch.  Every builder is registered in
:data:`qprsgd.registry.TOPOLOGIES` with a pydantic params model and is called as
``factory(M, **params.model_dump())``; it returns a :class:`Topology`.

Nodes ``0 .. M-1`` are the workers, nodes ``M .. M+v-1`` the auxiliary nodes (EASGD's centre
``z``, the hierarchical group nodes ``a_g``).  ``W`` is the symmetric ``n x n`` matrix,
``n = M + v``, of cooperative-sgd eq. (10): ``X <- (X - eta G) W`` with the nodes' models as the
columns of ``X``.

Spectral quantities (``lambda_1 = 1`` is the consensus eigenvalue, eigenvector ``1``; the
others ``lambda_2 >= ... >= lambda_n`` are W's eigenvalues on the complement of ``1``):

* ``rho`` = ``max(|lambda_2|, |lambda_n|)`` -- dcd-ecd-psgd Assumption 1.3 (L109),
  quantized-pr-sgd Theorem 2;
* ``zeta`` -- cooperative-sgd eq. (16)/(24)/(70): the very same number, ``max(|lambda_2|,
  |lambda_{m+v}|)`` = ``||W - J||_op``; kept as an alias so code can use each paper's letter;
* ``mu`` = ``max_{i>=2} |lambda_i - 1|`` -- dcd-ecd-psgd Theorem 1 (L200).

Tolerance: every check uses an absolute tolerance ``TOL = 1e-9``.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .registry import TOPOLOGIES

__all__ = [
    "TOL",
    "Topology",
    "Spectrum",
    "spectrum",
    "check_mixing",
    "check_mixing_structure",
    "build_topology",
    "TopologyReport",
    "report",
    "format_report",
    "dcd_alpha_bound",
    "dcd_condition",
    "dqpr_min_s",
    "dqpr_condition",
    "elastic_zeta",
    "elastic_best_alpha",
    "elastic_min_zeta",
    "elastic_max_alpha",
    "generalized_elastic_zeta",
    "generalized_elastic_best_alpha",
    "generalized_elastic_min_zeta",
    "zeta_tau",
    "most_square_rows",
    "split_groups",
    "TopologySequence",
    "check_step_matrix",
    "SequenceReport",
    "sequence_report",
    "format_sequence_report",
    "matching_decomposition",
    "matcha_probabilities",
    "matcha_alpha",
]

TOL = 1e-9  # absolute tolerance of every check in this module

Rule = Literal["gossip", "cooperative"]


# --------------------------------------------------------------------------------------------
# spectrum


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a symmetric W with ``W1 = 1``: ``eigenvalues[0]`` is the consensus
    eigenvalue 1 (of the eigenvector ``1``), the rest are ``lambda_2 >= ... >= lambda_n``."""

    eigenvalues: np.ndarray
    rho: float
    mu: float

    @property
    def zeta(self) -> float:
        return self.rho


def _others(W: np.ndarray) -> np.ndarray:
    """Eigenvalues of symmetric W other than the consensus one, descending.

    The consensus eigenvalue is removed as the one closest to 1 (it is exactly 1 when W1 = 1);
    a second eigenvalue 1 (disconnected W) or one above 1 (possible with negative entries)
    therefore stays among the others and makes rho >= 1, as it should.
    """
    lam = np.linalg.eigvalsh(0.5 * (W + W.T))[::-1]
    if lam.size == 0:
        return lam
    k = int(np.argmin(np.abs(lam - 1.0)))
    return np.delete(lam, k)


def spectrum(W: np.ndarray) -> Spectrum:
    """rho (= zeta) and mu of a symmetric W with W1 = 1 (no other check is made here).

    With one node there is no lambda_2: rho = mu = 0 (already in consensus).
    """
    W = np.asarray(W, dtype=np.float64)
    others = _others(W)
    if others.size == 0:
        return Spectrum(np.ones(W.shape[0]), 0.0, 0.0)
    rho = float(max(abs(others[0]), abs(others[-1])))
    mu = float(np.max(np.abs(others - 1.0)))
    eig = np.concatenate([[1.0], others])
    eig.flags.writeable = False
    return Spectrum(eig, rho, mu)


# --------------------------------------------------------------------------------------------
# the Topology record


@dataclass(frozen=True, eq=False)
class Topology:
    """A mixing matrix over ``M`` workers and ``v`` auxiliary nodes (indices ``M .. M+v-1``).

    ``groups``: for ``hierarchical``, the worker indices of each group ``g`` (whose auxiliary
    node is ``M + g``); None otherwise.  ``meta``: the builder's resolved parameters (e.g.
    ``alpha``, ``rows``/``cols``, ``base``), for logs and algorithms.
    """

    name: str
    W: np.ndarray
    M: int
    v: int = 0
    groups: Optional[tuple[tuple[int, ...], ...]] = None
    meta: dict = field(default_factory=dict)

    time_varying: ClassVar[bool] = False   # True for a TopologySequence (W_k changes with k)

    def W_at(self, k: int) -> np.ndarray:
        """The mixing matrix of gossip step k: always ``W`` for a static topology."""
        return self.W

    def __post_init__(self) -> None:
        W = np.array(self.W, dtype=np.float64)  # own copy
        if W.ndim != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"topology {self.name!r}: W must be square, got shape {W.shape}")
        if self.M < 1 or self.v < 0:
            raise ValueError(f"topology {self.name!r}: need M >= 1 and v >= 0, got M={self.M}, v={self.v}")
        if W.shape[0] != self.M + self.v:
            raise ValueError(
                f"topology {self.name!r}: W is {W.shape[0]}x{W.shape[0]} but M + v = "
                f"{self.M} + {self.v} = {self.M + self.v}"
            )
        W.flags.writeable = False
        object.__setattr__(self, "W", W)

    @property
    def n(self) -> int:
        """Number of nodes, M + v."""
        return self.M + self.v

    @property
    def aux_nodes(self) -> range:
        return range(self.M, self.M + self.v)

    def is_aux(self, i: int) -> bool:
        return self.M <= i < self.M + self.v

    def neighbors(self, i: int) -> list[int]:
        """Nodes ``j != i`` with ``W[i, j] != 0``, ascending."""
        if not 0 <= i < self.n:
            raise IndexError(f"node {i} out of range 0..{self.n - 1}")
        row = self.W[i]
        return [int(j) for j in np.flatnonzero(row) if j != i]

    neighbours = neighbors

    def group_of(self, i: int) -> Optional[int]:
        """Index g of the group holding worker i (hierarchical only), else None."""
        if self.groups is None:
            return None
        for g, members in enumerate(self.groups):
            if i in members:
                return g
        return None

    @cached_property
    def _spectrum(self) -> Spectrum:
        return spectrum(self.W)

    @property
    def eigenvalues(self) -> np.ndarray:
        """1 (consensus) then lambda_2 >= ... >= lambda_n."""
        return self._spectrum.eigenvalues

    @property
    def rho(self) -> float:
        """max(|lambda_2|, |lambda_n|) (dcd-ecd-psgd L109)."""
        return self._spectrum.rho

    @property
    def zeta(self) -> float:
        """cooperative-sgd's zeta = max(|lambda_2|, |lambda_{m+v}|) -- equal to rho."""
        return self._spectrum.rho

    @property
    def mu(self) -> float:
        """max_{i>=2} |lambda_i - 1| (dcd-ecd-psgd L200)."""
        return self._spectrum.mu

    def check(self, rule: Rule = "cooperative") -> None:
        """:func:`check_mixing` on this W (ValueError when it fails)."""
        check_mixing(self.W, rule, name=self.name)

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, M={self.M}, v={self.v}, rho={self.rho:.6g}, mu={self.mu:.6g})"


# --------------------------------------------------------------------------------------------
# checks


def _components(W: np.ndarray, tol: float) -> list[list[int]]:
    """Connected components of the graph with an edge i-j where |W[i, j]| > tol (i != j)."""
    n = W.shape[0]
    adj = np.abs(W) > tol
    seen = np.zeros(n, dtype=bool)
    comps: list[list[int]] = []
    for s in range(n):
        if seen[s]:
            continue
        stack, comp = [s], []
        seen[s] = True
        while stack:
            u = stack.pop()
            comp.append(u)
            for w in np.flatnonzero(adj[u] | adj[:, u]):
                if not seen[w]:
                    seen[w] = True
                    stack.append(int(w))
        comps.append(sorted(comp))
    return comps


def _fmt_nodes(nodes: Sequence[int], limit: int = 12) -> str:
    nodes = list(nodes)
    s = ", ".join(str(i) for i in nodes[:limit])
    return "[" + s + (", ..." if len(nodes) > limit else "") + "]"


def check_mixing(W, rule: Rule = "cooperative", *, tol: float = TOL, name: Optional[str] = None) -> None:
    """Validate a mixing matrix; raise ValueError naming the first property that fails.

    ``rule="cooperative"`` (cooperative-sgd Assumption 5, L160): W square and finite,
    ``W = W^T``, ``W1 = 1``, connected and ``zeta = max(|lambda_2|, |lambda_n|) < 1``;
    negative entries are allowed (W_alpha's ``1 - m alpha``, W_h's centre diagonals).

    ``rule="gossip"`` (dcd-ecd-psgd Assumption 1.3, quantized-pr-sgd L176): additionally every
    entry in ``[0, 1]`` -- i.e. W symmetric doubly stochastic, and ``rho < 1``.

    All comparisons use the absolute tolerance ``tol`` (default ``TOL = 1e-9``): asymmetry
    ``|W_ij - W_ji| <= tol``, ``|sum_j W_ij - 1| <= tol``, entries ``>= -tol`` and
    ``<= 1 + tol``, ``zeta <= 1 - tol``; an edge of the connectivity graph is ``|W_ij| > tol``.
    """
    if rule not in ("gossip", "cooperative"):
        raise ValueError(f"unknown mixing rule {rule!r}; use 'gossip' or 'cooperative'")
    what = f"mixing matrix {name!r}" if name else "mixing matrix"
    W = np.asarray(W)
    if W.dtype == object or not np.issubdtype(W.dtype, np.number) or np.issubdtype(W.dtype, np.complexfloating):
        raise ValueError(f"{what}: must be a real numeric array, got dtype {W.dtype}")
    W = W.astype(np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"{what}: must be a non-empty square 2-D matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        i, j = np.argwhere(~np.isfinite(W))[0]
        raise ValueError(f"{what}: entry W[{i}, {j}] = {W[i, j]} is not finite")
    asym = np.abs(W - W.T)
    if asym.max() > tol:
        i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
        raise ValueError(
            f"{what} is not symmetric: max |W[i,j] - W[j,i]| = {asym.max():.3g} > tol {tol:g} "
            f"at W[{i}, {j}] = {float(W[i, j])!r} vs W[{j}, {i}] = {float(W[j, i])!r}"
        )
    dev = np.abs(W.sum(axis=1) - 1.0)
    if dev.max() > tol:
        i = int(np.argmax(dev))
        raise ValueError(
            f"{what} is not row-stochastic: row {i} sums to {float(W[i].sum())!r} (W1 = 1 needs 1 within "
            f"tol {tol:g}); {int((dev > tol).sum())} row(s) off"
        )
    if rule == "gossip":
        if W.min() < -tol:
            i, j = np.unravel_index(int(np.argmin(W)), W.shape)
            raise ValueError(
                f"{what}: negative entry W[{i}, {j}] = {float(W[i, j])!r}; the gossip rule needs every "
                f"entry in [0, 1] (the cooperative rule allows it)"
            )
        if W.max() > 1 + tol:
            i, j = np.unravel_index(int(np.argmax(W)), W.shape)
            raise ValueError(
                f"{what}: entry W[{i}, {j}] = {float(W[i, j])!r} > 1; the gossip rule needs every entry in [0, 1]"
            )
    comps = _components(W, tol)
    if len(comps) > 1:
        parts = "; ".join(_fmt_nodes(c) for c in comps[:4]) + ("; ..." if len(comps) > 4 else "")
        raise ValueError(
            f"{what} is disconnected: {len(comps)} components {parts} "
            f"(lambda_2 = 1, so rho = zeta = 1; models never reach consensus)"
        )
    sp = spectrum(W)
    if sp.rho > 1 - tol:
        others = sp.eigenvalues[1:]
        culprit = (
            f"lambda_n = {others[-1]:.6g}" if abs(others[-1]) >= abs(others[0]) else f"lambda_2 = {others[0]:.6g}"
        )
        raise ValueError(
            f"{what}: zeta = rho = max(|lambda_2|, |lambda_n|) = {sp.rho:.6g} is not < 1 "
            f"(within tol {tol:g}); {culprit}"
        )


# --------------------------------------------------------------------------------------------
# closed forms and theorem pre-flights


def dcd_alpha_bound(rho: float, mu: float, strict: bool = False) -> float:
    """Largest compression alpha for DCD-PSGD: (1-rho)/(2 mu) from Theorem 1's
    (1-rho)^2 - 4 mu^2 alpha^2 > 0 (dcd-ecd L196), or the stricter (1-rho)/(2 sqrt2 mu) of
    L270/L790 when ``strict``.  ``inf`` when mu = 0 (a single node); W = J has mu = 1, bound 1/2."""
    if mu <= 0:
        return math.inf
    return (1.0 - rho) / ((2.0 * math.sqrt(2.0) if strict else 2.0) * mu)


def dcd_condition(rho: float, mu: float, alpha: float) -> float:
    """Theorem 1's (1-rho)^2 - 4 mu^2 alpha^2; it must be > 0."""
    return (1.0 - rho) ** 2 - 4.0 * mu**2 * alpha**2


def dqpr_min_s(d: int, rho: float, mu: float) -> float:
    """Smallest QSGD level s with d mu^2 < s^2 (1-rho)^2 (quantized-pr-sgd Theorem 2): the
    condition holds for s > mu sqrt(d) / (1-rho)."""
    if rho >= 1:
        return math.inf
    return mu * math.sqrt(d) / (1.0 - rho)


def dqpr_condition(d: int, s: float, rho: float, mu: float) -> float:
    """quantized-pr-sgd Theorem 2's s^2 (1-rho)^2 - d mu^2; it must be > 0."""
    return s**2 * (1.0 - rho) ** 2 - d * mu**2


def elastic_zeta(alpha: float, m: int) -> float:
    """zeta(W_alpha) = max(|1-alpha|, |1-(m+1)alpha|) (cooperative-sgd eq. (20)); m >= 2 (with one
    worker the eigenvalue 1-alpha, of multiplicity m-1, does not exist)."""
    return max(abs(1.0 - alpha), abs(1.0 - (m + 1) * alpha))


def elastic_best_alpha(m: int) -> float:
    """alpha = 2/(m+2) minimises zeta(W_alpha) (cooperative-sgd Lemma 1)."""
    return 2.0 / (m + 2)


def elastic_min_zeta(m: int) -> float:
    """min_alpha zeta(W_alpha) = m/(m+2) (Lemma 1)."""
    return m / (m + 2.0)


def elastic_max_alpha(m: int) -> float:
    """zeta(W_alpha) < 1 iff 0 < alpha < 2/(m+1) (cooperative-sgd L250); above: no convergence."""
    return 2.0 / (m + 1)


def generalized_elastic_zeta(alpha: float, m: int, zeta: float) -> float:
    """zeta' of W' = [[(1-alpha)W, alpha 1], [alpha 1^T, 1-m alpha]] (cooperative-sgd eq. (25)):
    max((1-alpha) zeta, |1-(m+1)alpha|), for 0 <= alpha <= 1 (|1-alpha| zeta in general)."""
    return max(abs(1.0 - alpha) * zeta, abs(1.0 - (m + 1) * alpha))


def generalized_elastic_best_alpha(m: int, zeta: float) -> float:
    """alpha = (1+zeta)/(m+1+zeta) minimises zeta' (cooperative-sgd L313)."""
    return (1.0 + zeta) / (m + 1.0 + zeta)


def generalized_elastic_min_zeta(m: int, zeta: float) -> float:
    """min_alpha zeta' = m zeta/(m+1+zeta) (cooperative-sgd L313)."""
    return m * zeta / (m + 1.0 + zeta)


def zeta_tau(tau: int) -> float:
    """zeta_tau = sqrt(1 - 2/(tau+1)) (cooperative-sgd eq. (22)): D-PSGD with zeta <= zeta_tau has
    an error floor no higher than PASGD with period tau."""
    return math.sqrt(1.0 - 2.0 / (tau + 1))


# --------------------------------------------------------------------------------------------
# builders

_Alpha = Union[float, Literal["best"]]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllreduceParams(_Params):
    pass


class CompleteParams(_Params):
    pass


class RingParams(_Params):
    pass


class TorusParams(_Params):
    rows: Optional[int] = Field(default=None, ge=1, description="grid rows r (r*c = M); default: most square")


class MatrixParams(_Params):
    W: list[list[float]] = Field(description="the (M+aux) x (M+aux) matrix, row by row")
    aux: int = Field(default=0, ge=0, description="auxiliary nodes: the last `aux` rows/columns")


class FileParams(_Params):
    path: str = Field(description=".npy file holding the (M+aux) x (M+aux) matrix")
    aux: int = Field(default=0, ge=0, description="auxiliary nodes: the last `aux` rows/columns")


class ElasticParams(_Params):
    alpha: _Alpha = Field(description="elastic weight; 'best' = 2/(m+2)")
    allow_divergent: bool = Field(default=False, description="build even if zeta >= 1 (alpha >= 2/(m+1))")


class GeneralizedElasticParams(_Params):
    base: str = Field(description="registry name of the worker topology W (v = 0), e.g. ring")
    base_params: dict[str, Any] = Field(default_factory=dict, description="params of the base topology")
    alpha: _Alpha = Field(description="elastic weight; 'best' = (1+zeta)/(m+1+zeta)")
    allow_divergent: bool = Field(default=False, description="build even if zeta' >= 1")


class HierarchicalParams(_Params):
    groups: Union[int, list[list[int]]] = Field(
        description="number of groups q (contiguous, as even as possible) or explicit lists of worker indices"
    )


def _J(M: int) -> np.ndarray:
    return np.full((M, M), 1.0 / M)


def _require_M(M: int, name: str, minimum: int = 1) -> int:
    if isinstance(M, bool) or int(M) != M or M < minimum:
        raise ValueError(f"topology {name!r} needs M >= {minimum} workers, got M = {M!r}")
    return int(M)


def _finish(topo: Topology, allow_divergent: bool = False) -> Topology:
    """Every builder's W must satisfy the cooperative rule (or, when ``allow_divergent``, all of
    it except zeta < 1)."""
    try:
        topo.check("cooperative")
    except ValueError:
        if not allow_divergent:
            raise
        check_mixing_structure(topo.W, name=topo.name)
    return topo


def check_mixing_structure(W, *, tol: float = TOL, name: Optional[str] = None) -> None:
    """The cooperative checks without the spectral one: square, finite, symmetric, W1 = 1."""
    what = f"mixing matrix {name!r}" if name else "mixing matrix"
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{what}: must be square, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{what}: has non-finite entries")
    if np.abs(W - W.T).max() > tol:
        raise ValueError(f"{what} is not symmetric (max asymmetry {np.abs(W - W.T).max():.3g})")
    dev = np.abs(W.sum(axis=1) - 1.0)
    if dev.max() > tol:
        i = int(np.argmax(dev))
        raise ValueError(f"{what} is not row-stochastic: row {i} sums to {float(W[i].sum())!r}")


@TOPOLOGIES.register("allreduce", params=AllreduceParams)
def allreduce(M: int) -> Topology:
    """J = 11^T/M: exact averaging (all-reduce), cooperative-sgd A(tau, J, 0); rho = mu = 0."""
    M = _require_M(M, "allreduce")
    return _finish(Topology("allreduce", _J(M), M))


@TOPOLOGIES.register("complete", params=CompleteParams)
def complete(M: int) -> Topology:
    """Complete graph, uniform weights 1/M on self and every other node: the same matrix as J,
    but meant to be run as gossip (every node exchanges with all others)."""
    M = _require_M(M, "complete")
    return _finish(Topology("complete", _J(M), M))


@TOPOLOGIES.register("ring", params=RingParams)
def ring(M: int) -> Topology:
    """Ring with weight 1/3 on self and on each of the two neighbours i-1, i+1 (mod M); M >= 4."""
    if isinstance(M, (int, np.integer)) and not isinstance(M, bool) and 1 <= M <= 3:
        if M == 3:
            raise ValueError(
                "topology 'ring' needs M >= 4 workers: the 1/3-ring on 3 workers is J = 11^T/3; "
                "use topology 'complete' (gossip) or 'allreduce'"
            )
        raise ValueError(
            f"topology 'ring' needs M >= 4 workers, got M = {M}: with {M} worker(s) the two ring "
            f"neighbours coincide; use 'complete' or 'allreduce'"
        )
    M = _require_M(M, "ring", 4)
    W = np.zeros((M, M))
    for i in range(M):
        W[i, i] = W[i, (i - 1) % M] = W[i, (i + 1) % M] = 1.0 / 3.0
    return _finish(Topology("ring", W, M))


def most_square_rows(M: int) -> int:
    """The largest divisor r of M with r <= sqrt(M) (r x c grid, c = M/r >= r)."""
    r = math.isqrt(M)
    while M % r:
        r -= 1
    return r


def _cycle_adjacency(k: int) -> np.ndarray:
    """P + P^T for the cyclic shift P on k nodes: coinciding neighbours add up (k = 2: 2P;
    k = 1: 2I, i.e. the two 'neighbours' are the node itself)."""
    P = np.roll(np.eye(k), 1, axis=1)
    return P + P.T


@TOPOLOGIES.register("torus", params=TorusParams)
def torus(M: int, rows: Optional[int] = None) -> Topology:
    """2-D torus r x c (r c = M), weight 1/5 on self and on each of the 4 neighbours; a
    neighbour met twice (r or c = 2) gets 2/5, a neighbour that is the node itself (r or c = 1)
    adds 2/5 to the diagonal: W = (I + A_r (x) I_c + I_r (x) A_c)/5, A_k = P_k + P_k^T."""
    M = _require_M(M, "torus", 2)
    r = most_square_rows(M) if rows is None else int(rows)
    if r < 1 or M % r:
        raise ValueError(f"topology 'torus': rows = {rows} does not divide M = {M}")
    c = M // r
    W = (np.eye(M) + np.kron(_cycle_adjacency(r), np.eye(c)) + np.kron(np.eye(r), _cycle_adjacency(c))) / 5.0
    return _finish(Topology("torus", W, M, meta={"rows": r, "cols": c}))


def _user_matrix(W: np.ndarray, M: int, aux: int, name: str, source: str) -> Topology:
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"topology {name!r}: {source} must be a square 2-D matrix, got shape {W.shape}")
    if W.shape[0] != M + aux:
        raise ValueError(
            f"topology {name!r}: {source} is {W.shape[0]}x{W.shape[1]} but the run has M = {M} workers "
            f"+ aux = {aux} auxiliary nodes = {M + aux}"
        )
    return _finish(Topology(name, W, M, aux))


@TOPOLOGIES.register("matrix", params=MatrixParams)
def matrix(M: int, W: list[list[float]], aux: int = 0) -> Topology:
    """A user W given inline (list of rows); the last ``aux`` nodes are auxiliary."""
    M = _require_M(M, "matrix")
    rows = [list(r) for r in W]
    if not rows or any(len(r) != len(rows) for r in rows):
        raise ValueError(
            f"topology 'matrix': W must be square, got row lengths {[len(r) for r in rows]} for {len(rows)} rows"
        )
    return _user_matrix(np.asarray(rows, dtype=np.float64), M, aux, "matrix", "W")


@TOPOLOGIES.register("file", params=FileParams)
def file(M: int, path: str, aux: int = 0) -> Topology:
    """A user W from a ``.npy`` file, loaded with ``allow_pickle=False``."""
    M = _require_M(M, "file")
    path = os.fspath(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays, or a pickle file
        raise ValueError(
            f"topology 'file': {path} cannot be loaded without pickle ({e}); save a plain float "
            f"array with np.save(path, W.astype(np.float64))"
        ) from None
    except OSError as e:
        raise ValueError(f"topology 'file': cannot read {path}: {e}") from None
    if not isinstance(arr, np.ndarray):  # .npz archive
        arr.close()
        raise ValueError(f"topology 'file': {path} is an .npz archive; give a single-array .npy file")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"topology 'file': {path} holds dtype {arr.dtype}; need a real numeric matrix")
    return _user_matrix(arr.astype(np.float64), M, aux, "file", path)


def _elastic_W(base: np.ndarray, alpha: float) -> np.ndarray:
    m = base.shape[0]
    W = np.empty((m + 1, m + 1))
    W[:m, :m] = (1.0 - alpha) * base
    W[:m, m] = W[m, :m] = alpha
    W[m, m] = 1.0 - m * alpha
    return W


def _check_alpha(alpha: float, name: str) -> float:
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"topology {name!r}: alpha must be > 0, got {alpha} (alpha = 0 gives zeta = 1)")
    return alpha


@TOPOLOGIES.register("elastic", params=ElasticParams)
def elastic(M: int, alpha: _Alpha, allow_divergent: bool = False) -> Topology:
    """EASGD's W_alpha (cooperative-sgd eq. (11)): worker rows 1-alpha on the diagonal and alpha
    to z; z's row alpha to each worker and 1 - m alpha on its diagonal.  v = 1 (z = node M)."""
    M = _require_M(M, "elastic", 2)
    a = elastic_best_alpha(M) if alpha == "best" else _check_alpha(alpha, "elastic")
    if not allow_divergent and a >= elastic_max_alpha(M):
        raise ValueError(
            f"topology 'elastic': alpha = {a:g} >= 2/(m+1) = {elastic_max_alpha(M):g} for m = {M}: "
            f"zeta(W_alpha) = {elastic_zeta(a, M):.6g} >= 1 (cooperative-sgd L250; EASGD does not "
            f"converge); set allow_divergent: true to build it anyway"
        )
    topo = Topology("elastic", _elastic_W(np.eye(M), a), M, 1, meta={"alpha": a})
    return _finish(topo, allow_divergent)


@TOPOLOGIES.register("generalized_elastic", params=GeneralizedElasticParams)
def generalized_elastic(
    M: int, base: str, alpha: _Alpha, base_params: Optional[dict] = None, allow_divergent: bool = False
) -> Topology:
    """W' = [[(1-alpha) W, alpha 1], [alpha 1^T, 1 - m alpha]] (cooperative-sgd eq. (23)) over a
    worker topology W (``base``, v = 0); the centre is node M."""
    M = _require_M(M, "generalized_elastic")
    b = build_topology(base, M, base_params or {})
    if b.time_varying:
        raise ValueError(
            f"topology 'generalized_elastic': base {base!r} is a time-varying sequence; W' needs one fixed "
            f"worker matrix (auxiliary-node topologies keep a static W)"
        )
    if b.v != 0:
        raise ValueError(
            f"topology 'generalized_elastic': base {base!r} has {b.v} auxiliary node(s); the base must "
            f"be a worker topology (v = 0), e.g. ring, torus, complete, matrix"
        )
    z = b.zeta
    a = generalized_elastic_best_alpha(M, z) if alpha == "best" else _check_alpha(alpha, "generalized_elastic")
    zp = generalized_elastic_zeta(a, M, z)
    if not allow_divergent and zp >= 1 - TOL:
        raise ValueError(
            f"topology 'generalized_elastic': alpha = {a:g} gives zeta' = max((1-alpha) zeta, "
            f"|1-(m+1) alpha|) = {zp:.6g} >= 1 (base zeta = {z:.6g}, m = {M}); need alpha < 2/(m+1) = "
            f"{2.0 / (M + 1):g}; set allow_divergent: true to build it anyway"
        )
    topo = Topology(
        "generalized_elastic",
        _elastic_W(np.asarray(b.W), a),
        M,
        1,
        meta={"alpha": a, "base": b.name, "base_zeta": z, **{f"base_{k}": v for k, v in b.meta.items()}},
    )
    return _finish(topo, allow_divergent)


def split_groups(M: int, groups: Union[int, Sequence[Sequence[int]]]) -> tuple[tuple[int, ...], ...]:
    """Worker groups for ``hierarchical``: q contiguous blocks (the first M mod q one larger), or
    an explicit partition of 0..M-1 (each group sorted; group order kept)."""
    if isinstance(groups, (int, np.integer)) and not isinstance(groups, bool):
        q = int(groups)
        if not 1 <= q <= M:
            raise ValueError(f"topology 'hierarchical': groups = {q} must be between 1 and M = {M}")
        return tuple(tuple(int(i) for i in b) for b in np.array_split(np.arange(M), q))
    out = tuple(tuple(sorted(int(i) for i in g)) for g in groups)
    if not out or any(len(g) == 0 for g in out):
        raise ValueError(f"topology 'hierarchical': every group needs at least one worker, got {groups!r}")
    flat = [i for g in out for i in g]
    missing = sorted(set(range(M)) - set(flat))
    extra = sorted(set(flat) - set(range(M)))
    dup = sorted({i for i in flat if flat.count(i) > 1})
    if missing or extra or dup:
        raise ValueError(
            f"topology 'hierarchical': groups must partition workers 0..{M - 1}; missing {missing}, "
            f"out of range {extra}, repeated {dup}"
        )
    return out


@TOPOLOGIES.register("hierarchical", params=HierarchicalParams)
def hierarchical(M: int, groups: Union[int, list[list[int]]]) -> Topology:
    """W_h of A(tau, W_h, q) (cooperative-sgd §6.3, implementer's choice): one auxiliary node
    a_g = M+g per group g of n_g workers; W_h[i, a_g] = 1/(n_g+1) for i in g, W_h[a_g, a_h] = 1/q
    (g != h); diagonals complete the row sums (workers n_g/(n_g+1); a_g: 1 - n_g/(n_g+1) -
    (q-1)/q, negative for q >= 2, n_g >= 2)."""
    M = _require_M(M, "hierarchical")
    gs = split_groups(M, groups)
    q = len(gs)
    n = M + q
    W = np.zeros((n, n))
    for g, members in enumerate(gs):
        a = M + g
        w = 1.0 / (len(members) + 1)
        for i in members:
            W[i, a] = W[a, i] = w
        for h in range(q):
            if h != g:
                W[a, M + h] = 1.0 / q
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return _finish(Topology("hierarchical", W, M, q, groups=gs, meta={"q": q, "sizes": [len(g) for g in gs]}))


def build_topology(name: str, M: int, params: Optional[dict] = None) -> Topology:
    """Validate ``params`` with the registered model and build: ``factory(M, **model_dump())``."""
    entry = TOPOLOGIES.get(name)
    params = dict(params or {})
    if entry.params is not None:
        params = entry.params(**params).model_dump()
    return entry.factory(M, **params)


# --------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class TopologyReport:
    """What ``qprsgd topo`` shows; ``to_dict()`` gives plain JSON-able values."""

    name: str
    M: int
    v: int
    eigenvalues: list[float]
    rho: float
    mu: float
    zeta: float
    neighbours: dict[int, list[int]]
    weights: dict[int, dict[int, float]]   # node -> {j: W[i, j]} for j = i and its neighbours
    gossip_ok: bool                         # passes the gossip rule (entries in [0, 1], ...)
    gossip_problem: Optional[str]
    groups: Optional[list[list[int]]]
    meta: dict
    dcd: dict                               # DCD-PSGD Theorem 1 pre-flight
    dqpr: dict                              # D-Q-PR-SGD Theorem 2 pre-flight
    elastic: Optional[dict]                 # W_alpha / W' closed forms (cooperative-sgd)

    _FIELDS = (
        "name", "M", "v", "eigenvalues", "rho", "mu", "zeta", "neighbours", "weights", "gossip_ok",
        "gossip_problem", "groups", "meta", "dcd", "dqpr", "elastic",
    )

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    # read-only mapping access, so callers may treat the report as a dict
    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def __getitem__(self, key: str):
        if key not in self._FIELDS:
            raise KeyError(key)
        return getattr(self, key)


def _one_alpha(alpha_codec: Optional[float], alpha: Optional[float]) -> Optional[float]:
    if alpha_codec is not None and alpha is not None and float(alpha_codec) != float(alpha):
        raise ValueError(f"give the codec alpha once (alpha_codec={alpha_codec}, alpha={alpha})")
    return alpha_codec if alpha_codec is not None else alpha


def report(
    topo: Topology,
    alpha_codec: Optional[float] = None,
    *,
    alpha: Optional[float] = None,
    d: Optional[int] = None,
    s: Optional[float] = None,
) -> TopologyReport:
    """Spectral pre-flight of a topology.

    ``alpha_codec`` (or keyword ``alpha``, the same thing): the codec's compression alpha of
    dcd-ecd Assumption 1.5 (L194), a float (codec knowledge stays outside); ``d``, ``s``: the
    dimension and QSGD level for quantized-pr-sgd Theorem 2.
    """
    if topo.time_varying:
        raise ValueError(f"topology {topo.name!r} is time-varying: its spectra are per step and per period; "
                         f"use sequence_report / format_sequence_report")
    alpha_codec = _one_alpha(alpha_codec, alpha)
    rho, mu = topo.rho, topo.mu
    bound, strict = dcd_alpha_bound(rho, mu), dcd_alpha_bound(rho, mu, strict=True)
    dcd: dict[str, Any] = {"bound": bound, "strict_bound": strict, "alpha": None}
    if alpha_codec is not None:
        a = float(alpha_codec)
        cond = dcd_condition(rho, mu, a)
        dcd.update(alpha=a, condition=cond, ok=bool(cond > 0), ok_strict=bool(a <= strict))
    dqpr: dict[str, Any] = {"min_s_over_sqrt_d": dqpr_min_s(1, rho, mu), "d": d, "s": s}
    if d is not None:
        dqpr["min_s"] = dqpr_min_s(d, rho, mu)
        if s is not None:
            cond = dqpr_condition(d, s, rho, mu)
            dqpr.update(condition=cond, ok=bool(cond > 0))
    el: Optional[dict] = None
    if topo.name == "elastic":
        m, a = topo.M, topo.meta["alpha"]
        el = {
            "alpha": a,
            "zeta_closed_form": elastic_zeta(a, m),
            "best_alpha": elastic_best_alpha(m),
            "min_zeta": elastic_min_zeta(m),
            "max_alpha": elastic_max_alpha(m),
            "diverges": bool(a >= elastic_max_alpha(m)),
        }
    elif topo.name == "generalized_elastic":
        m, a, z = topo.M, topo.meta["alpha"], topo.meta["base_zeta"]
        el = {
            "alpha": a,
            "base_zeta": z,
            "zeta_closed_form": generalized_elastic_zeta(a, m, z),
            "best_alpha": generalized_elastic_best_alpha(m, z),
            "min_zeta": generalized_elastic_min_zeta(m, z),
            "max_alpha": elastic_max_alpha(m),
            "diverges": bool(generalized_elastic_zeta(a, m, z) >= 1),
        }
    try:
        check_mixing(topo.W, "gossip", name=topo.name)
        gossip_ok, problem = True, None
    except ValueError as e:
        gossip_ok, problem = False, str(e)
    neigh = {i: topo.neighbors(i) for i in range(topo.n)}
    weights = {i: {j: float(topo.W[i, j]) for j in sorted([i, *neigh[i]])} for i in range(topo.n)}
    return TopologyReport(
        name=topo.name,
        M=topo.M,
        v=topo.v,
        eigenvalues=[float(x) for x in topo.eigenvalues],
        rho=rho,
        mu=mu,
        zeta=topo.zeta,
        neighbours=neigh,
        weights=weights,
        gossip_ok=gossip_ok,
        gossip_problem=problem,
        groups=None if topo.groups is None else [list(g) for g in topo.groups],
        meta=dict(topo.meta),
        dcd=dcd,
        dqpr=dqpr,
        elastic=el,
    )


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.6g}"


def format_report(
    topo: Topology,
    alpha_codec: Optional[float] = None,
    *,
    alpha: Optional[float] = None,
    d: Optional[int] = None,
    s: Optional[float] = None,
    max_nodes: int = 64,
) -> str:
    """Human-readable :func:`report` for ``qprsgd topo``: neighbours with weights, rho, mu, zeta,
    and a verdict line for DCD-PSGD Theorem 1 given the codec's alpha (a line starting with
    ``WARNING:`` when the condition is broken)."""
    r = report(topo, _one_alpha(alpha_codec, alpha), d=d, s=s)
    meta = ", ".join(f"{k} = {v}" for k, v in r.meta.items())
    out = [f"topology {r.name}: M = {r.M} workers, v = {r.v} auxiliary node(s), n = {r.M + r.v}"
           + (f" ({meta})" if meta else "")]
    if r.groups is not None:
        out.append("groups: " + "; ".join(f"a{g} = node {r.M + g}: {g_}" for g, g_ in enumerate(r.groups)))
    out.append("neighbours (j != i with W[i, j] != 0) and weights:")
    for i in range(min(topo.n, max_nodes)):
        tag = f"{i}*" if topo.is_aux(i) else f"{i}"
        nb = ", ".join(f"{j} ({r.weights[i][j]:.4g})" for j in r.neighbours[i]) or "none"
        out.append(f"  {tag:>5}: self {r.weights[i][i]:.4g}; {nb}")
    if topo.n > max_nodes:
        out.append(f"  ... ({topo.n - max_nodes} more nodes)")
    if topo.v:
        out.append("  (* = auxiliary node)")
    eig = r.eigenvalues
    shown = ", ".join(f"{x:.4g}" for x in eig[:8]) + (f", ..., {eig[-1]:.4g}" if len(eig) > 8 else "")
    out.append(f"eigenvalues (lambda_1 = 1 first): {shown}")
    out.append(f"rho  = max(|lambda_2|, |lambda_n|)   = {r.rho:.6g}   (dcd-ecd-psgd L109, quantized-pr-sgd Thm 2)")
    out.append(f"mu   = max_(i>=2) |lambda_i - 1|     = {r.mu:.6g}   (dcd-ecd-psgd L200)")
    out.append(f"zeta = max(|lambda_2|, |lambda_m+v|) = {r.zeta:.6g}   (cooperative-sgd eq. (16); = rho)")
    out.append("gossip rule (entries in [0, 1]): " + ("satisfied" if r.gossip_ok else f"NOT satisfied: {r.gossip_problem}"))
    dcd = r.dcd
    bounds = f"(1-rho)/(2 mu) = {_g(dcd['bound'])}, stricter (1-rho)/(2 sqrt2 mu) = {_g(dcd['strict_bound'])}"
    if dcd["alpha"] is None:
        out.append(f"DCD-PSGD Theorem 1 needs codec alpha < {bounds} (give the codec's alpha to check)")
    elif not dcd["ok"]:
        out.append(
            f"WARNING: DCD-PSGD Theorem 1 condition broken: alpha = {dcd['alpha']:.6g} >= {bounds}; "
            f"(1-rho)^2 - 4 mu^2 alpha^2 = {dcd['condition']:.4g} <= 0: DCD-PSGD may diverge "
            f"(ECD-PSGD has no such bound)"
        )
    elif not dcd["ok_strict"]:
        out.append(
            f"DCD-PSGD Theorem 1: OK, alpha = {dcd['alpha']:.6g} < (1-rho)/(2 mu) = {_g(dcd['bound'])} "
            f"(margin {dcd['condition']:.4g}); but above the stricter (1-rho)/(2 sqrt2 mu) = "
            f"{_g(dcd['strict_bound'])} of dcd-ecd L270/L790"
        )
    else:
        out.append(
            f"DCD-PSGD Theorem 1: OK, alpha = {dcd['alpha']:.6g} < {bounds} "
            f"(margin (1-rho)^2 - 4 mu^2 alpha^2 = {dcd['condition']:.4g})"
        )
    q = r.dqpr
    line = f"D-Q-PR-SGD Theorem 2 (d mu^2 < s^2 (1-rho)^2) needs s > {_g(q['min_s_over_sqrt_d'])} sqrt(d)"
    if q.get("min_s") is not None:
        line += f" = {_g(q['min_s'])} for d = {q['d']}"
    if q.get("ok") is not None:
        line = ("" if q["ok"] else "WARNING: ") + line + (
            f"; s = {q['s']:g}: " + ("holds" if q["ok"] else "violated")
        )
    out.append(line)
    if r.elastic is not None:
        e = r.elastic
        if r.name == "elastic":
            out.append(
                f"EASGD W_alpha: zeta = max(|1-alpha|, |1-(m+1)alpha|) = {e['zeta_closed_form']:.6g} at alpha = "
                f"{e['alpha']:.6g}; best alpha = 2/(m+2) = {e['best_alpha']:.6g} (zeta = m/(m+2) = "
                f"{e['min_zeta']:.6g}); admissible alpha < 2/(m+1) = {e['max_alpha']:.6g}"
            )
        else:
            out.append(
                f"W': zeta' = max((1-alpha) zeta, |1-(m+1)alpha|) = {e['zeta_closed_form']:.6g} at alpha = "
                f"{e['alpha']:.6g} (base zeta = {e['base_zeta']:.6g}); best alpha = (1+zeta)/(m+1+zeta) = "
                f"{e['best_alpha']:.6g} (zeta' = m zeta/(m+1+zeta) = {e['min_zeta']:.6g})"
            )
        if e["diverges"]:
            out.append(f"WARNING: zeta >= 1 at alpha = {e['alpha']:.6g}: no convergence (cooperative-sgd L250)")
    return "\n".join(out)


# ============================================================================================
# time-varying topologies: a sequence W_0, W_1, ... (docs/topology.md, "Time-varying topologies")
#
# Convention: worker i's model after gossip step k is  x_i <- sum_j W_k[i, j] x_j  (rows mix),
# i.e. X <- W_k X with the models as rows; W_k[i, j] != 0 (j != i) means j sends to i at step k.
# Every W_k is doubly stochastic (entries >= 0, rows and columns sum to 1) but need not be
# symmetric: the one-peer and static exponential graphs of Ying et al. are directed.  The
# record's ``W`` is the mean matrix (over one period, or the expectation for random sequences):
# its non-zero pattern is the union of the supports, i.e. every pair that ever communicates.


def check_step_matrix(W, M: int, *, where: str, name: str, tol: float = TOL) -> np.ndarray:
    """One W_k of a sequence: an M x M real, finite, doubly stochastic matrix (entries >= 0,
    row and column sums 1 within ``tol``); symmetry is not required.  ``where`` names the matrix
    in the message (e.g. "matrix 3 of file x.npz").  Returns it as float64."""
    what = f"topology {name!r}: {where}"
    W = np.asarray(W)
    if W.dtype == object or not (np.issubdtype(W.dtype, np.integer) or np.issubdtype(W.dtype, np.floating)):
        raise ValueError(f"{what} has dtype {W.dtype}; need a real numeric matrix")
    W = W.astype(np.float64)
    if W.shape != (M, M):
        raise ValueError(f"{what} has shape {W.shape}; the run has M = {M} workers (need {M} x {M})")
    if not np.all(np.isfinite(W)):
        i, j = np.argwhere(~np.isfinite(W))[0]
        raise ValueError(f"{what}: entry [{i}, {j}] = {W[i, j]} is not finite")
    if W.min() < -tol:
        i, j = np.unravel_index(int(np.argmin(W)), W.shape)
        raise ValueError(f"{what} is not doubly stochastic: negative entry [{i}, {j}] = {W[i, j]!r}")
    for axis, kind in ((1, "row"), (0, "column")):
        dev = np.abs(W.sum(axis=axis) - 1.0)
        if dev.max() > tol:
            i = int(np.argmax(dev))
            raise ValueError(
                f"{what} is not doubly stochastic: {kind} {i} sums to {float(W.sum(axis=axis)[i])!r} "
                f"(need 1 within tol {tol:g})"
            )
    return W


def _sigma(W: np.ndarray) -> float:
    """||W - J||_2 (largest singular value): the contraction of step W on the disagreement."""
    n = W.shape[0]
    return float(np.linalg.norm(W - 1.0 / n, 2)) if n > 1 else 0.0


@dataclass(frozen=True, eq=False)
class TopologySequence(Topology):
    """A time-varying topology: ``W_at(k)`` is W_k, a function of k (and the seed) alone.

    Periodic sequences hold their ``mats`` (W_k = mats[k mod period]); random ones
    (``period = None``) draw W_k from ``sample(k)``, which must build its own generator from
    (seed, k) -- no state is carried from one step to the next, so every rank, and a resumed
    run, get the same W_k for the same k.  ``W`` is the mean matrix (its support = the union of
    the supports).  ``rho_bound``: for random sequences, the quantity whose being < 1 makes the
    sequence converge in expectation (MATCHA: ||E[W_k^T W_k] - J||_2).
    """

    period: Optional[int] = None
    mats: tuple = ()
    sample: Optional[Callable[[int], np.ndarray]] = None
    rho_bound: Optional[float] = None

    time_varying: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.v != 0:
            raise ValueError(f"topology {self.name!r}: time-varying topologies are worker graphs (v = 0)")
        if self.period is None and self.sample is None:
            raise ValueError(f"topology {self.name!r}: a sequence needs matrices (period) or a sampler")
        if self.period is not None:
            if self.period < 1 or len(self.mats) != self.period:
                raise ValueError(f"topology {self.name!r}: period {self.period} but {len(self.mats)} matrices")
            mats = []
            for m in self.mats:
                m = np.array(m, dtype=np.float64)
                m.flags.writeable = False
                mats.append(m)
            object.__setattr__(self, "mats", tuple(mats))

    def W_at(self, k: int) -> np.ndarray:
        k = int(k)
        if k < 0:
            raise ValueError(f"step k must be >= 0, got {k}")
        if self.period is not None:
            return self.mats[k % self.period]
        return self.sample(k)

    def support(self) -> np.ndarray:
        """Boolean M x M: j -> i ever communicates (W_k[i, j] != 0 for some k, j != i)."""
        A = np.abs(self.W) > 0
        np.fill_diagonal(A, False)
        return A

    def in_peers(self, i: int) -> list[int]:
        """The j != i that ever send to i (ascending)."""
        return [int(j) for j in np.flatnonzero(self.support()[i])]

    def out_peers(self, i: int) -> list[int]:
        """The j != i that i ever sends to (ascending)."""
        return [int(j) for j in np.flatnonzero(self.support()[:, i])]

    def product(self, start: int, steps: int) -> np.ndarray:
        """W_{start+steps-1} ... W_{start+1} W_start (X <- W_k X applied in order)."""
        P = np.eye(self.M)
        for k in range(start, start + steps):
            P = self.W_at(k) @ P
        return P

    def steps_to_exact(self, start: int = 0, limit: Optional[int] = None, tol: float = 1e-9) -> Optional[int]:
        """Smallest t >= 1 with W_{start+t-1} ... W_start = J (max abs deviation <= tol), or None
        if none within ``limit`` steps (default: 2 periods, 64 steps for random sequences)."""
        limit = (2 * self.period if self.period is not None else 64) if limit is None else int(limit)
        P = np.eye(self.M)
        J = 1.0 / self.M
        for t in range(1, limit + 1):
            P = self.W_at(start + t - 1) @ P
            if np.abs(P - J).max() <= tol:
                return t
        return None

    @property
    def rho_period(self) -> float:
        """||W_{tau-1} ... W_0 - J||_2 over one period (random sequences: ``rho_bound``)."""
        if self.period is None:
            return float(self.rho_bound) if self.rho_bound is not None else float("nan")
        return _sigma(self.product(0, self.period))

    def __repr__(self) -> str:
        return (f"TopologySequence(name={self.name!r}, M={self.M}, period={self.period}, "
                f"rho_period={self.rho_period:.6g})")


def _finish_seq(topo: TopologySequence, name: str) -> TopologySequence:
    """Every matrix of one period is doubly stochastic (periodic; random samplers check their
    own draws), and the sequence contracts: rho of the period product (or ``rho_bound``) < 1."""
    if topo.period is not None:
        for k, m in enumerate(topo.mats):
            check_step_matrix(m, topo.M, where=f"W_{k} (step {k} of the period)", name=name)
    comps = _components(topo.W, 0.0)
    if len(comps) > 1:
        parts = "; ".join(_fmt_nodes(c) for c in comps[:4])
        raise ValueError(f"topology {name!r}: the union of the graphs is disconnected ({len(comps)} "
                         f"components {parts}); the models never reach consensus")
    r = topo.rho_period
    if topo.M > 1 and not r < 1 - TOL:
        raise ValueError(f"topology {name!r}: the sequence does not contract: rho over one period = {r:.6g} "
                         f"is not < 1")
    return topo


def _mean(mats) -> np.ndarray:
    return np.mean(np.stack([np.asarray(m, dtype=np.float64) for m in mats]), axis=0)


def _periodic(name: str, M: int, mats: list, meta: dict) -> TopologySequence:
    topo = TopologySequence(name, _mean(mats), M, period=len(mats), mats=tuple(mats), meta=meta)
    return _finish_seq(topo, name)


def _log2_ceil(M: int) -> int:
    return max(1, (M - 1).bit_length())


class ExponentialParams(_Params):
    pass


class OnePeerExponentialParams(_Params):
    pass


class BaseGraphParams(_Params):
    k: int = Field(1, ge=1, description="maximum degree (peers per node per step); the graph is 'base-(k+1)'")


class MatchaParams(_Params):
    base: str = Field("ring", description="registry name of the static base graph whose edges are decomposed")
    base_params: dict[str, Any] = Field(default_factory=dict, description="params of the base topology")
    budget: float = Field(0.5, gt=0, le=1, description="communication budget C_b in (0, 1]: expected share "
                          "of the base graph's matchings used per step")
    seed: int = Field(0, description="seed of the activation draws: W_k depends on (seed, k) only")


class MatrixFileParams(_Params):
    path: str = Field(description=".npz (arrays in order arr_0, arr_1, ... or sorted key order) or .npy "
                      "(one M x M matrix, or a T x M x M stack): the period W_0 .. W_{T-1}")


@TOPOLOGIES.register("exponential", params=ExponentialParams)
def exponential(M: int) -> TopologySequence:
    """Static exponential graph (Ying et al. 2021): node i receives from i + 2^m (mod M),
    m = 0 .. tau-1, tau = ceil(log2 M); weight 1/(tau+1) on self and each of them.  Directed
    (not symmetric for most M), so it runs as a sequence of period 1."""
    M = _require_M(M, "exponential", 2)
    tau = _log2_ceil(M)
    W = np.zeros((M, M))
    for i in range(M):
        W[i, i] += 1.0 / (tau + 1)
        for m in range(tau):
            W[i, (i + 2**m) % M] += 1.0 / (tau + 1)
    return _periodic("exponential", M, [W], {"tau": tau, "static": True})


@TOPOLOGIES.register("one_peer_exponential", params=OnePeerExponentialParams)
def one_peer_exponential(M: int) -> TopologySequence:
    """One-peer exponential graph (Ying et al. 2021): at step k node i averages with the one node
    i + 2^(k mod tau) (mod M), weight 1/2 each, tau = ceil(log2 M).  One message per node per
    step; exact averaging after tau steps when M is a power of two."""
    M = _require_M(M, "one_peer_exponential", 2)
    tau = _log2_ceil(M)
    mats = []
    for m in range(tau):
        W = np.zeros((M, M))
        for i in range(M):
            W[i, i] += 0.5
            W[i, (i + 2**m) % M] += 0.5
        mats.append(W)
    return _periodic("one_peer_exponential", M, mats, {"tau": tau, "power_of_two": M & (M - 1) == 0})


def _group_average(M: int, groups) -> np.ndarray:
    """W averaging each group exactly (weight 1/|g| inside g); nodes in no group keep their value."""
    W = np.eye(M)
    for g in groups:
        g = list(g)
        if len(g) > 1:
            W[np.ix_(g, g)] = 1.0 / len(g)
    return W


def _factor(n: int, k: int) -> Optional[list[int]]:
    """n as a product of factors in 2..k+1 (largest first), or None if a prime factor > k+1."""
    out, r = [], n
    for f in range(k + 1, 1, -1):
        while r % f == 0:
            out.append(f)
            r //= f
    return out if r == 1 else None


def _hypercube_steps(nodes: list[int], k: int) -> list[list[list[int]]]:
    """The k-peer hyper-hypercube on ``nodes`` (len = product of factors <= k+1): phase l groups
    the nodes that differ only in mixed-radix digit l; each phase is a list of groups."""
    n = len(nodes)
    if n == 1:
        return []
    fs = _factor(n, k)
    assert fs is not None
    phases, stride = [], 1
    for f in fs:
        groups = []
        for base in range(n):
            if (base // stride) % f == 0:
                groups.append([nodes[base + stride * a] for a in range(f)])
        phases.append(groups)
        stride *= f
    return phases


def base_graph_matrices(M: int, k: int) -> list[np.ndarray]:
    """A finite sequence of symmetric doubly stochastic M x M matrices, each node with at most
    k peers per matrix, whose product is exactly J (docs/topology.md, base_graph)."""
    if M == 1:
        return [np.eye(1)]
    if _factor(M, k) is not None:                        # hyper-hypercube alone
        return [_group_average(M, ph) for ph in _hypercube_steps(list(range(M)), k)]
    # blocks = the base-(k+1) digits of M, largest first: M = sum a_l (k+1)^{p_l}
    b = k + 1
    sizes, r, p = [], M, 0
    while b ** (p + 1) <= M:
        p += 1
    while r:
        a = r // b**p
        if a:
            sizes.append(a * b**p)
            r -= a * b**p
        p -= 1
    blocks, s = [], 0
    for n in sizes:
        blocks.append(list(range(s, s + n)))
        s += n
    cubes = [_hypercube_steps(bl, k) for bl in blocks]
    mats = []
    # 1. every block averages internally, in parallel
    for t in range(max(len(c) for c in cubes)):
        mats.append(_group_average(M, [g for c in cubes if t < len(c) for g in c[t]]))
    # 2. fold the tail (blocks l+1.., already in consensus) into block l, smallest first: each tail
    #    node pairs with its own node of block l, weight s/(r+s), which puts the tail at the mean of
    #    both; block l keeps the rest of the mass, so its mean is that mean too; re-average block l
    for l in range(len(blocks) - 2, -1, -1):
        tail = [i for bl in blocks[l + 1:] for i in bl]
        head = blocks[l]
        rn, sn = len(tail), len(head)
        W = np.eye(M)
        w = sn / (rn + sn)
        for a, i in enumerate(tail):
            j = head[a]
            W[i, i] = W[j, j] = 1.0 - w
            W[i, j] = W[j, i] = w
        mats.append(W)
        for ph in cubes[l]:
            mats.append(_group_average(M, ph))
    return mats


@TOPOLOGIES.register("base_graph", params=BaseGraphParams)
def base_graph(M: int, k: int = 1) -> TopologySequence:
    """Base-(k+1) graph after Takezawa et al. 2023: a finite cycle of symmetric matrices, at most
    k peers per node per step, exact averaging after one period for every M (our construction,
    docs/topology.md: hyper-hypercubes on the base-(k+1) digit blocks of M, then folding)."""
    M = _require_M(M, "base_graph", 2)
    if int(k) < 1:
        raise ValueError(f"topology 'base_graph': k = {k} must be >= 1 (k = peers per node per step)")
    k = min(int(k), M - 1)
    mats = base_graph_matrices(M, k)
    return _periodic("base_graph", M, mats, {"k": k})


# -- MATCHA ----------------------------------------------------------------------------------


def matching_decomposition(A: np.ndarray) -> list[list[tuple[int, int]]]:
    """Edges of the undirected graph A (i < j, lexicographic) coloured greedily: each edge gets
    the smallest colour free at both ends; each colour is a matching (at most 2 Delta - 1)."""
    n = A.shape[0]
    used: list[set] = [set() for _ in range(n)]
    colours: list[list[tuple[int, int]]] = []
    for i in range(n):
        for j in range(i + 1, n):
            if A[i, j] or A[j, i]:
                c = 0
                while c in used[i] or c in used[j]:
                    c += 1
                if c == len(colours):
                    colours.append([])
                colours[c].append((i, j))
                used[i].add(c)
                used[j].add(c)
    return colours


def _laplacian(M: int, edges) -> np.ndarray:
    L = np.zeros((M, M))
    for i, j in edges:
        L[i, i] += 1
        L[j, j] += 1
        L[i, j] -= 1
        L[j, i] -= 1
    return L


def _lambda2(L: np.ndarray) -> tuple[float, np.ndarray]:
    lam, vec = np.linalg.eigh(L)
    return float(lam[1]), vec[:, 1]


def _project_capped_simplex(y: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection onto {p in [0, 1]^m, sum p = total} (bisection on the shift)."""
    lo, hi = float(y.min() - 1.0), float(y.max())
    for _ in range(55):                       # the bracket (width <= 2 + spread) shrinks to ~1e-16
        mid = 0.5 * (lo + hi)
        if np.clip(y - mid, 0, 1).sum() > total:
            lo = mid
        else:
            hi = mid
    return np.clip(y - 0.5 * (lo + hi), 0, 1)


def matcha_probabilities(Ls: list[np.ndarray], budget: float, iters: int = 200) -> np.ndarray:
    """MATCHA's activation probabilities: maximise the algebraic connectivity
    lambda_2(sum_j p_j L_j) subject to sum_j p_j <= budget * m, 0 <= p_j <= 1 (Wang et al. 2019).
    lambda_2 is concave in p; we use projected super-gradient ascent (gradient u^T L_j u of the
    Fiedler vector u; step 0.5/sqrt(t) on the normalised gradient), starting from p_j = budget,
    keeping the best iterate; it stops early when the projection undoes a step."""
    m = len(Ls)
    if budget >= 1.0:
        return np.ones(m)
    total = budget * m
    p = np.full(m, budget)
    best, best_val = p.copy(), _lambda2(sum(pj * L for pj, L in zip(p, Ls)))[0]
    for t in range(1, iters + 1):
        val, u = _lambda2(sum(pj * L for pj, L in zip(p, Ls)))
        if val > best_val + 1e-15:
            best, best_val = p.copy(), val
        g = np.array([u @ L @ u for L in Ls])
        gn = np.linalg.norm(g)
        if gn == 0:
            break
        p_new = _project_capped_simplex(p + (0.5 / math.sqrt(t)) * g / gn, total)
        if np.abs(p_new - p).max() < 1e-12:   # the projection undoes the step: p is optimal
            break
        p = p_new
    val = _lambda2(sum(pj * L for pj, L in zip(p, Ls)))[0]
    return p if val > best_val else best


def _matcha_rho(alpha: float, Lbar: np.ndarray, Q: np.ndarray) -> float:
    """||E[W^T W] - J||_2 with Q = Lbar^2 + sum_j p_j (1 - p_j) L_j^2 (E[W^T W] - J is PSD)."""
    M = Lbar.shape[0]
    EWW = np.eye(M) - 2 * alpha * Lbar + alpha**2 * Q
    return float(np.linalg.eigvalsh(EWW - 1.0 / M)[-1])


def matcha_alpha(Ls: list[np.ndarray], p: np.ndarray, alpha_max: float) -> tuple[float, float]:
    """(alpha, rho): the alpha in (0, alpha_max] minimising rho = ||E[W^T W] - J||_2 for
    W = I - alpha sum_j B_j L_j, B_j ~ Bernoulli(p_j) independent.  E[W^T W] = I - 2 alpha Lbar
    + alpha^2 (Lbar^2 + sum_j p_j (1 - p_j) L_j^2), Lbar = sum_j p_j L_j; rho is convex in alpha
    (a maximum of convex quadratics), minimised by golden-section search."""
    M = Ls[0].shape[0]
    Lbar = sum(pj * L for pj, L in zip(p, Ls))
    Lvar = sum(pj * (1 - pj) * (L @ L) for pj, L in zip(p, Ls)) if len(Ls) else np.zeros((M, M))
    Lvar = Lbar @ Lbar + Lvar
    a, b = 0.0, float(alpha_max)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _matcha_rho(c, Lbar, Lvar), _matcha_rho(d, Lbar, Lvar)
    for _ in range(60):                       # 0.618^60 ~ 3e-13 of the interval
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _matcha_rho(c, Lbar, Lvar)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _matcha_rho(d, Lbar, Lvar)
    alpha = 0.5 * (a + b)
    return alpha, _matcha_rho(alpha, Lbar, Lvar)


@TOPOLOGIES.register("matcha", params=MatchaParams)
def matcha(M: int, base: str = "ring", base_params: Optional[dict] = None, budget: float = 0.5,
           seed: int = 0) -> TopologySequence:
    """MATCHA (Wang et al. 2019): the base graph's edges split into matchings G_1..G_m; at step k
    matching j is active with probability p_j (independently, drawn from a generator seeded by
    (seed, k)); W_k = I - alpha sum_{active j} L_j.  p maximises lambda_2 of the expected
    Laplacian under the budget sum p_j <= C_b m; alpha minimises ||E[W^T W] - J||_2 within
    (0, 1/max degree] (so every W_k is non-negative)."""
    M = _require_M(M, "matcha", 2)
    budget = float(budget)
    if not (0 < budget <= 1):
        raise ValueError(f"topology 'matcha': budget = {budget} must be in (0, 1]")
    b = build_topology(base, M, base_params or {})
    if b.time_varying or b.v != 0:
        raise ValueError(f"topology 'matcha': base {base!r} must be a static worker topology (v = 0), "
                         f"e.g. ring, torus, complete, matrix")
    A = (np.abs(b.W) > 0) & ~np.eye(M, dtype=bool)
    if not np.array_equal(A, A.T):
        raise ValueError(f"topology 'matcha': base {base!r} is not an undirected graph")
    matchings = matching_decomposition(A)
    if not matchings:
        raise ValueError(f"topology 'matcha': base {base!r} has no edges for M = {M}")
    Ls = [_laplacian(M, e) for e in matchings]
    alpha_max = 1.0 / float(A.sum(1).max())
    # a few hundred small (M x M) eigenproblems: one BLAS thread each is fastest, and a threaded
    # BLAS on a busy node can be 100x slower (measured: 0.36 s per 64 x 64 eigh under load)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        p = matcha_probabilities(Ls, budget)
        alpha, rho = matcha_alpha(Ls, p, alpha_max)
    Lstack = np.stack(Ls)
    pv = p.copy()
    pv.flags.writeable = False

    @functools.lru_cache(maxsize=16)        # in-process workers share the record: draw once per k
    def sample(k: int) -> np.ndarray:
        on = np.random.default_rng([int(seed), int(k)]).random(len(pv)) < pv
        W = np.eye(M) - alpha * Lstack[on].sum(axis=0)
        W.flags.writeable = False
        return W

    Wmean = np.eye(M) - alpha * np.tensordot(pv, Lstack, axes=1)
    meta = {"base": b.name, "budget": budget, "seed": int(seed), "matchings": len(matchings),
            "p": [float(x) for x in p], "alpha": alpha, "expected_share": float(p.sum() / len(p))}
    topo = TopologySequence("matcha", Wmean, M, meta=meta, sample=sample, rho_bound=rho)
    return _finish_seq(topo, "matcha")


def _load_matrix_stack(path: str, M: int) -> list[np.ndarray]:
    path = os.fspath(path)
    try:
        obj = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"topology 'matrix_file': {path} cannot be loaded without pickle ({e})") from None
    except OSError as e:
        raise ValueError(f"topology 'matrix_file': path = {path}: cannot read it: {e}") from None
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.ndim == 2:
            items = [("W", arr)]
        elif arr.ndim == 3:
            items = [(f"[{t}]", arr[t]) for t in range(arr.shape[0])]
        else:
            raise ValueError(f"topology 'matrix_file': {path} holds shape {arr.shape}; need M x M or T x M x M")
    else:
        with obj:
            keys = list(obj.files)

            def order(k):
                tail = k[4:] if k.startswith("arr_") else ""
                return (0, int(tail), k) if tail.isdigit() else (1, 0, k)
            items = [(k, obj[k]) for k in sorted(keys, key=order)]
    if not items:
        raise ValueError(f"topology 'matrix_file': {path} holds no matrix")
    return [check_step_matrix(m, M, where=f"matrix {key} (W_{t}) of {path}", name="matrix_file")
            for t, (key, m) in enumerate(items)]


@TOPOLOGIES.register("matrix_file", params=MatrixFileParams)
def matrix_file(M: int, path: str) -> TopologySequence:
    """A periodic sequence from a file: W_k = the (k mod T)-th matrix (each doubly stochastic,
    directed allowed)."""
    M = _require_M(M, "matrix_file")
    mats = _load_matrix_stack(path, M)
    return _periodic("matrix_file", M, mats, {"path": os.fspath(path), "period": len(mats)})


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceReport:
    """Spectral quantities of a sequence (``qprsgd topo``, the pre-flight, the HDF5 log)."""

    name: str
    M: int
    period: Optional[int]
    rho_period: float                 # ||W_{tau-1}..W_0 - J||_2 (random: MATCHA's ||E[W^T W] - J||_2)
    rho_per_step: float               # rho_period^(1/period): the average contraction per step
    steps_to_exact: Optional[int]     # from step 0 (None: not within 2 periods / 64 steps)
    step_sigma: list[float]           # ||W_k - J||_2 for the reported steps
    step_messages: list[int]          # messages of step k: off-diagonal non-zeros of W_k
    step_max_degree: list[int]        # max over nodes of the peers node i receives from at step k
    meta: dict

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _step_stats(W: np.ndarray) -> tuple[float, int, int]:
    A = (W != 0) & ~np.eye(W.shape[0], dtype=bool)
    return _sigma(W), int(A.sum()), int(A.sum(1).max()) if W.shape[0] else 0


def sequence_report(topo: TopologySequence, steps: Optional[int] = None) -> SequenceReport:
    """Per-step spectra of W_0 .. W_{steps-1} (default: one period; random: 64 steps) and the
    period product's rho and steps to exact averaging."""
    n = (topo.period if topo.period is not None else 64) if steps is None else int(steps)
    stats = [_step_stats(topo.W_at(k)) for k in range(n)]
    r = topo.rho_period
    per = topo.period
    rps = r ** (1.0 / per) if per and r >= 0 else float("nan")
    return SequenceReport(
        name=topo.name, M=topo.M, period=per, rho_period=r, rho_per_step=rps,
        steps_to_exact=topo.steps_to_exact(0),
        step_sigma=[s[0] for s in stats], step_messages=[s[1] for s in stats],
        step_max_degree=[s[2] for s in stats], meta=dict(topo.meta),
    )


def format_sequence_report(topo: TopologySequence, max_nodes: int = 16, max_steps: int = 8) -> str:
    """Text of ``qprsgd topo`` for a time-varying topology."""
    r = sequence_report(topo)
    meta = ", ".join(f"{k} = {v}" for k, v in r.meta.items() if k != "p")
    out = [f"topology {r.name}: time-varying, M = {r.M} workers, "
           + (f"period {r.period}" if r.period else "random (W_k drawn from (seed, k))")
           + (f" ({meta})" if meta else "")]
    if "p" in r.meta:
        out.append("activation probabilities p_j: " + ", ".join(f"{x:.3g}" for x in r.meta["p"]))
    shown = min(len(r.step_sigma), max_steps)
    for k in range(shown):
        W = topo.W_at(k)
        rows = []
        for i in range(min(topo.M, max_nodes)):
            src = [int(j) for j in np.flatnonzero(W[i]) if j != i]
            rows.append(f"{i}<-{','.join(map(str, src)) or '-'}")
        more = " ..." if topo.M > max_nodes else ""
        out.append(f"  W_{k}: ||W_k - J||_2 = {r.step_sigma[k]:.4g}, {r.step_messages[k]} messages, "
                   f"max {r.step_max_degree[k]} peer(s); receives: {' '.join(rows)}{more}")
    if len(r.step_sigma) > shown:
        out.append(f"  ... ({len(r.step_sigma) - shown} more steps)")
    if r.period is not None:
        out.append(f"rho of one period = ||W_{r.period - 1} ... W_0 - J||_2 = {r.rho_period:.6g} "
                   f"(per step {r.rho_per_step:.6g})")
    else:
        out.append(f"rho = ||E[W_k^T W_k] - J||_2 = {r.rho_period:.6g} (MATCHA's contraction in expectation)")
    out.append("steps to exact averaging from step 0: "
               + (str(r.steps_to_exact) if r.steps_to_exact is not None else "none (asymptotic only)"))
    mean_msgs = float(np.mean(r.step_messages)) if r.step_messages else 0.0
    out.append(f"messages per step (all nodes, mean over the steps shown): {mean_msgs:.4g}")
    out.append("DCD-PSGD Theorem 1 / D-Q-PR-SGD Theorem 2 assume one fixed symmetric W: no verdict for a "
               "sequence (compressed gossip on it uses per-pair references, docs/algorithms-gossip.md)")
    return "\n".join(out)
