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

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Optional, Sequence, Union

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
