"""qprsgd.topology: builders, checks, spectral quantities and the pre-flight report."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from qprsgd import topology as T
from qprsgd.registry import TOPOLOGIES


def build(name, M, **params):
    return T.build_topology(name, M, params)


def eig_desc(W):
    return np.sort(np.linalg.eigvalsh(W))[::-1]


def ring_rho_mu(M):
    """Closed form: eigenvalues of the 1/3-ring are 1/3 + 2/3 cos(2 pi k / M), k = 0..M-1."""
    lam = 1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(1, M) / M)  # k >= 1: all but lambda_1
    return np.max(np.abs(lam)), np.max(np.abs(lam - 1)), np.sort(lam)[::-1]


# ---------------------------------------------------------------------------------- registry


def test_registry_has_every_builder_with_strict_params():
    names = {"allreduce", "complete", "ring", "torus", "matrix", "file", "elastic", "generalized_elastic",
             "hierarchical"}
    assert names <= set(TOPOLOGIES.names())
    for n in names:
        entry = TOPOLOGIES.get(n)
        assert entry.params is not None and entry.params.model_config.get("extra") == "forbid"
    with pytest.raises(ValidationError):
        T.build_topology("ring", 8, {"bogus": 1})
    # factory(M, **params.model_dump()) is the calling convention
    e = TOPOLOGIES.get("torus")
    t = e.factory(8, **e.params(rows=2).model_dump())
    assert t.meta == {"rows": 2, "cols": 4}


# ---------------------------------------------------------------------------------- checks


def test_check_accepts_good_matrices_under_both_rules():
    for t in (build("ring", 8), build("torus", 9), build("complete", 5), build("allreduce", 3)):
        T.check_mixing(t.W, "gossip")
        T.check_mixing(t.W, "cooperative")


def test_check_rejects_asymmetric_naming_max_asymmetry():
    W = build("ring", 6).W.copy()
    W[0, 1] += 0.1
    W[0, 0] -= 0.1  # keep row 0 stochastic so asymmetry is the first failure
    for rule in ("gossip", "cooperative"):
        with pytest.raises(ValueError, match=r"not symmetric: max \|W\[i,j\] - W\[j,i\]\| = 0\.1 .*W\[0, 1\]"):
            T.check_mixing(W, rule)


def test_check_rejects_row_sum_naming_the_row():
    W = build("ring", 6).W.copy()
    W[3, 3] += 1e-6  # symmetric, but row 3 sums to 1 + 1e-6
    for rule in ("gossip", "cooperative"):
        with pytest.raises(ValueError, match=r"not row-stochastic: row 3 sums to 1\.000001"):
            T.check_mixing(W, rule)
    # within the stated 1e-9 tolerance it passes
    W = build("ring", 6).W.copy()
    W[3, 3] += 1e-11
    T.check_mixing(W, "gossip")


def test_check_rejects_disconnected_naming_components():
    W = np.kron(np.eye(2), np.full((4, 4), 0.25))  # two separate K4 blocks
    for rule in ("gossip", "cooperative"):
        with pytest.raises(ValueError, match=r"disconnected: 2 components \[0, 1, 2, 3\]; \[4, 5, 6, 7\]"):
            T.check_mixing(W, rule)
    with pytest.raises(ValueError, match="disconnected"):
        T.check_mixing(np.eye(3), "cooperative")


def test_negative_entry_rejected_by_gossip_accepted_by_cooperative():
    t = build("elastic", 8, alpha=0.2)  # 1 - m alpha = -0.6 on z's diagonal (ALGORITHMS.md)
    assert t.W[8, 8] == pytest.approx(-0.6)
    T.check_mixing(t.W, "cooperative")
    with pytest.raises(ValueError, match=r"negative entry W\[8, 8\] = -0\.6"):
        T.check_mixing(t.W, "gossip")
    h = build("hierarchical", 8, groups=2)
    T.check_mixing(h.W, "cooperative")
    with pytest.raises(ValueError, match=r"negative entry W\[8, 8\]"):
        T.check_mixing(h.W, "gossip")


def test_check_rejects_zeta_at_least_one():
    # connected, non-negative, doubly stochastic, but bipartite: lambda_n = -1
    M = 6
    W = np.zeros((M, M))
    for i in range(M):
        W[i, (i + 1) % M] = W[i, (i - 1) % M] = 0.5
    for rule in ("gossip", "cooperative"):
        with pytest.raises(ValueError, match=r"zeta = rho = .* = 1 is not < 1.*lambda_n = -1"):
            T.check_mixing(W, rule)
    # negative entries making |lambda_n| > 1 (W_alpha with alpha > 2/(m+1)): cooperative rejects
    W = T._elastic_W(np.eye(8), 0.3)
    with pytest.raises(ValueError, match=r"zeta = rho = .* = 1\.7 is not < 1"):
        T.check_mixing(W, "cooperative")


def test_check_rejects_shape_and_nonfinite_and_bad_rule():
    with pytest.raises(ValueError, match="square"):
        T.check_mixing(np.ones((2, 3)) / 3)
    W = np.full((3, 3), 1 / 3)
    W[1, 2] = W[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"W\[1, 2\] = nan is not finite"):
        T.check_mixing(W)
    with pytest.raises(ValueError, match="unknown mixing rule"):
        T.check_mixing(np.full((3, 3), 1 / 3), "push-sum")


# ---------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("M", [4, 5, 6, 7, 8, 9, 16, 33])
def test_ring_spectrum_matches_closed_form(M):
    t = build("ring", M)
    rho, mu, lam = ring_rho_mu(M)
    assert t.rho == pytest.approx(rho, abs=1e-12)
    assert t.zeta == pytest.approx(rho, abs=1e-12)
    assert t.mu == pytest.approx(mu, abs=1e-12)
    np.testing.assert_allclose(t.eigenvalues, np.concatenate([[1.0], lam]), atol=1e-12)
    assert t.neighbors(0) == sorted({1, M - 1})
    assert t.neighbors(M - 1) == sorted({0, M - 2})
    np.testing.assert_allclose(t.W.diagonal(), 1 / 3)


def test_ring_figures_from_algorithms_md():
    r8, r16, r7 = build("ring", 8), build("ring", 16), build("ring", 7)
    assert round(r8.rho, 3) == 0.805 and r8.mu == pytest.approx(4 / 3)
    assert round(r16.rho, 3) == 0.949 and r16.mu == pytest.approx(4 / 3)
    assert round(r7.mu, 3) == 1.267 and round(r7.zeta, 3) == 0.749
    # DCD bounds 0.073 (M = 8), 0.019 (M = 16); D-Q-PR-SGD needs s > 6.8 sqrt(d) for M = 8
    assert round(T.dcd_alpha_bound(r8.rho, r8.mu), 3) == 0.073
    assert round(T.dcd_alpha_bound(r16.rho, r16.mu), 3) == 0.019
    assert T.dcd_alpha_bound(r8.rho, r8.mu, strict=True) == pytest.approx(
        (1 - r8.rho) / (2 * math.sqrt(2) * r8.mu))
    assert round(T.dqpr_min_s(1, r8.rho, r8.mu), 1) == 6.8


def test_ring_small_M_rejected():
    with pytest.raises(ValueError, match=r"M >= 4.*J = 11\^T/3"):
        build("ring", 3)
    for M in (1, 2):
        with pytest.raises(ValueError, match="M >= 4"):
            build("ring", M)


@pytest.mark.parametrize("M,rows", [(4, None), (6, None), (8, None), (9, None), (12, 3), (12, 2), (16, None),
                                    (20, 4), (7, None), (10, 1), (2, None)])
def test_torus_spectrum_matches_closed_form(M, rows):
    t = build("torus", M, rows=rows)
    r, c = t.meta["rows"], t.meta["cols"]
    assert r * c == M
    if rows is None:
        assert r == max(k for k in range(1, int(math.isqrt(M)) + 1) if M % k == 0)
    a, b = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    lam = ((1 + 2 * np.cos(2 * np.pi * a / r) + 2 * np.cos(2 * np.pi * b / c)) / 5).ravel()
    lam = np.sort(lam)[::-1][1:]
    np.testing.assert_allclose(t.eigenvalues[1:], lam, atol=1e-12)
    assert t.rho == pytest.approx(max(abs(lam[0]), abs(lam[-1])), abs=1e-12)
    assert t.mu == pytest.approx(np.max(np.abs(lam - 1)), abs=1e-12)
    T.check_mixing(t.W, "gossip")


def test_torus_neighbours_and_coinciding_neighbours():
    t = build("torus", 12, rows=3)  # 3 x 4, node (i, j) = 4 i + j
    assert t.neighbors(0) == [1, 3, 4, 8]
    assert np.allclose(t.W[0, [0, 1, 3, 4, 8]], 0.2)
    t = build("torus", 8)  # 2 x 4: up and down neighbour coincide -> 2/5
    assert (t.meta["rows"], t.meta["cols"]) == (2, 4)
    assert t.neighbors(0) == [1, 3, 4]
    assert t.W[0, 4] == pytest.approx(0.4) and t.W[0, 1] == pytest.approx(0.2) and t.W[0, 0] == pytest.approx(0.2)
    t = build("torus", 5)  # prime: 1 x 5, the lazy ring 3/5 self
    assert t.W[0, 0] == pytest.approx(0.6) and t.neighbors(0) == [1, 4]
    with pytest.raises(ValueError, match="does not divide"):
        build("torus", 12, rows=5)


@pytest.mark.parametrize("M", [1, 2, 5, 8])
def test_complete_and_allreduce_are_J(M):
    for name in ("complete", "allreduce"):
        t = build(name, M)
        np.testing.assert_array_equal(t.W, np.full((M, M), 1.0 / M))
        assert t.rho == pytest.approx(0, abs=1e-12) and t.mu == pytest.approx(1 if M > 1 else 0, abs=1e-12)
        assert t.neighbors(0) == list(range(1, M))
        assert t.v == 0 and t.name == name


def test_topology_record():
    t = build("ring", 8)
    assert t.W.dtype == np.float64 and t.W.shape == (8, 8) and (t.M, t.v, t.n) == (8, 0, 8)
    with pytest.raises(ValueError):
        t.W[0, 0] = 1.0  # read-only
    with pytest.raises(IndexError):
        t.neighbors(8)
    with pytest.raises(ValueError, match=r"W is 3x3 but M \+ v"):
        T.Topology("x", np.eye(3), 2)


# ---------------------------------------------------------------------------------- elastic, W', W_h

GRID_M = [2, 3, 4, 7, 8, 16]


@pytest.mark.parametrize("m", GRID_M)
def test_elastic_zeta_and_best_alpha(m):
    for alpha in np.linspace(0.01, 2 / (m + 1) - 0.01, 9):
        t = build("elastic", m, alpha=float(alpha))
        assert (t.M, t.v, t.n) == (m, 1, m + 1)
        assert t.zeta == pytest.approx(T.elastic_zeta(alpha, m), abs=1e-12)
        assert t.zeta == pytest.approx(max(abs(1 - alpha), abs(1 - (m + 1) * alpha)), abs=1e-12)
        np.testing.assert_allclose(t.W[:m, :m], (1 - alpha) * np.eye(m))
        np.testing.assert_allclose(t.W[m, :m], alpha)
        assert t.W[m, m] == pytest.approx(1 - m * alpha)
    best = build("elastic", m, alpha="best")
    assert best.meta["alpha"] == pytest.approx(2 / (m + 2))
    assert best.zeta == pytest.approx(m / (m + 2), abs=1e-12)
    grid = np.linspace(1e-3, 2 / (m + 1) - 1e-3, 2001)
    zetas = [T.spectrum(T._elastic_W(np.eye(m), a)).rho for a in grid]
    assert min(zetas) >= m / (m + 2) - 1e-12
    assert grid[int(np.argmin(zetas))] == pytest.approx(2 / (m + 2), abs=2e-3)


def test_elastic_divergence_threshold():
    m = 8
    assert T.elastic_max_alpha(m) == pytest.approx(2 / 9)  # 0.2222, cooperative Fig. 4
    with pytest.raises(ValueError, match=r"alpha = 0.25 >= 2/\(m\+1\)"):
        build("elastic", m, alpha=0.25)
    t = build("elastic", m, alpha=0.25, allow_divergent=True)
    assert t.zeta == pytest.approx(T.elastic_zeta(0.25, m)) and t.zeta > 1
    assert T.report(t).elastic["diverges"] is True
    with pytest.raises((ValueError, ValidationError)):
        build("elastic", m, alpha=0.0)
    with pytest.raises(ValueError, match="M >= 2"):  # eq. (20) needs m >= 2
        build("elastic", 1, alpha=0.5)


@pytest.mark.parametrize("m,base,bp", [(4, "ring", {}), (8, "ring", {}), (7, "ring", {}), (16, "ring", {}),
                                       (8, "torus", {}), (12, "torus", {"rows": 3}), (6, "complete", {})])
def test_generalized_elastic_closed_forms(m, base, bp):
    zb = build(base, m, **bp).zeta
    for alpha in np.linspace(0.01, 2 / (m + 1) - 0.01, 9):
        t = build("generalized_elastic", m, base=base, base_params=bp, alpha=float(alpha))
        assert t.zeta == pytest.approx(max((1 - alpha) * zb, abs(1 - (m + 1) * alpha)), abs=1e-12)
        assert t.zeta == pytest.approx(T.generalized_elastic_zeta(alpha, m, zb), abs=1e-12)
    best = build("generalized_elastic", m, base=base, base_params=bp, alpha="best")
    assert best.meta["alpha"] == pytest.approx((1 + zb) / (m + 1 + zb))
    assert best.zeta == pytest.approx(m * zb / (m + 1 + zb), abs=1e-12)
    assert best.zeta <= zb + 1e-12
    bw = build(base, m, **bp).W
    grid = np.linspace(1e-3, 2 / (m + 1) - 1e-3, 1001)
    zetas = [T.spectrum(T._elastic_W(bw, a)).rho for a in grid]
    assert min(zetas) >= m * zb / (m + 1 + zb) - 1e-12


def test_generalized_elastic_rejects_aux_base():
    with pytest.raises(ValueError, match="worker topology"):
        build("generalized_elastic", 8, base="hierarchical", base_params={"groups": 2}, alpha=0.1)


def test_hierarchical_paper_figures_and_exact_W():
    h = build("hierarchical", 8, groups=2)  # 2 groups x 4 workers
    assert round(h.zeta, 3) == 0.894 and h.zeta == pytest.approx(2 / math.sqrt(5))
    assert (h.M, h.v) == (8, 2) and h.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    W = np.zeros((10, 10))
    for g in range(2):
        for i in range(4 * g, 4 * g + 4):
            W[i, i], W[i, 8 + g], W[8 + g, i] = 0.8, 0.2, 0.2
    W[8, 9] = W[9, 8] = 0.5
    W[8, 8] = W[9, 9] = -0.3
    np.testing.assert_allclose(h.W, W, atol=1e-15)
    assert h.neighbors(8) == [0, 1, 2, 3, 9] and h.neighbors(0) == [8]
    h4 = build("hierarchical", 8, groups=4)  # 4 groups x 2 workers
    # ALGORITHMS.md's 0.817 is sqrt(2/3) = 0.81650 rounded half-up at 4 digits, then to 3
    assert h4.zeta == pytest.approx(0.817, abs=1e-3) and h4.zeta == pytest.approx(math.sqrt(2 / 3))
    assert h4.W[8, 8] == pytest.approx(1 - 2 / 3 - 3 / 4)
    assert h4.W[8, 9] == pytest.approx(0.25) and h4.group_of(5) == 2


@pytest.mark.parametrize("q,ng", [(2, 2), (3, 5), (5, 3), (8, 1), (6, 6)])
def test_hierarchical_zeta_closed_form(q, ng):
    """Equal groups, q >= 2: zeta(W_h) = sqrt(n_g/(n_g+1)) (docs/topology.md)."""
    assert build("hierarchical", q * ng, groups=q).zeta == pytest.approx(math.sqrt(ng / (ng + 1)), abs=1e-12)


def test_hierarchical_explicit_and_uneven_groups():
    h = build("hierarchical", 5, groups=[[4, 0], [1, 2, 3]])
    assert h.groups == ((0, 4), (1, 2, 3))
    assert h.W[0, 5] == pytest.approx(1 / 3) and h.W[1, 6] == pytest.approx(1 / 4)
    T.check_mixing(h.W, "cooperative")
    assert build("hierarchical", 7, groups=3).groups == ((0, 1, 2), (3, 4), (5, 6))
    for bad in ([[0, 1], [1, 2, 3, 4]], [[0, 1], [2, 3]], [[0, 1, 2, 3, 4, 5]], [[], [0, 1, 2, 3, 4]]):
        with pytest.raises(ValueError, match="hierarchical"):
            build("hierarchical", 5, groups=bad)
    with pytest.raises(ValueError, match="between 1 and M"):
        build("hierarchical", 5, groups=6)


# ---------------------------------------------------------------------------------- user matrices


def test_matrix_builder():
    W = [[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]]
    t = build("matrix", 3, W=W)
    np.testing.assert_array_equal(t.W, np.array(W))
    assert t.neighbors(0) == [1] and t.neighbors(1) == [0, 2]
    with pytest.raises(ValueError, match="not symmetric"):
        build("matrix", 3, W=[[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.25, 0.0, 0.75]])
    with pytest.raises(ValueError, match=r"3x3 but the run has M = 4"):
        build("matrix", 4, W=W)
    with pytest.raises(ValueError, match="square"):
        build("matrix", 2, W=[[1.0, 0.0], [0.0]])
    e = build("elastic", 4, alpha=0.3).W.tolist()
    t = build("matrix", 4, W=e, aux=1)
    assert (t.M, t.v) == (4, 1)


def test_file_builder(tmp_path):
    W = build("torus", 9).W
    p = tmp_path / "w.npy"
    np.save(p, W)
    t = build("file", 9, path=str(p))
    np.testing.assert_array_equal(t.W, W)
    assert t.rho == pytest.approx(build("torus", 9).rho)


def test_file_refuses_object_array(tmp_path):
    p = tmp_path / "obj.npy"
    arr = np.empty((2, 2), dtype=object)
    arr[:] = 0.5
    np.save(p, arr, allow_pickle=True)
    with pytest.raises(ValueError, match="cannot be loaded without pickle"):
        build("file", 2, path=str(p))
    # the same numbers as floats load fine
    np.save(tmp_path / "ok.npy", np.full((2, 2), 0.5))
    assert build("file", 2, path=str(tmp_path / "ok.npy")).rho == pytest.approx(0)


def test_file_bad_content(tmp_path):
    p = tmp_path / "asym.npy"
    np.save(p, np.array([[0.5, 0.5], [0.3, 0.7]]))
    with pytest.raises(ValueError, match="not symmetric"):
        build("file", 2, path=str(p))
    with pytest.raises(ValueError, match="cannot read"):
        build("file", 2, path=str(tmp_path / "missing.npy"))


# ---------------------------------------------------------------------------------- report


def test_report_dcd_verdicts():
    t = build("ring", 8)
    bound = (1 - t.rho) / (2 * t.mu)
    r = T.report(t, bound * 0.99)
    assert r.dcd["ok"] and r.dcd["condition"] > 0 and not r.dcd["ok_strict"]
    r = T.report(t, bound * 1.01)
    assert not r.dcd["ok"] and r.dcd["condition"] < 0
    assert T.report(t, bound / math.sqrt(2) * 0.99).dcd["ok_strict"]
    assert r.neighbours[0] == [1, 7] and r.rho == t.rho and r.mu == t.mu and r.zeta == t.zeta
    assert r.to_dict()["dcd"]["alpha"] == pytest.approx(bound * 1.01)
    assert r["rho"] == t.rho and dict(r.items())["mu"] == t.mu  # mapping access
    assert T.report(t, alpha=bound * 1.01).dcd == r.dcd  # keyword alias
    # J: rho = 0, mu = 1 -> bound 1/2; a single node: mu = 0, any alpha
    j = build("complete", 4)
    assert T.report(j, 0.49).dcd["ok"] and not T.report(j, 0.51).dcd["ok"]
    assert T.report(build("allreduce", 1), 10.0).dcd["ok"]


def test_report_dqpr_condition():
    t = build("ring", 8)
    d = 10_000
    smin = t.mu * math.sqrt(d) / (1 - t.rho)
    assert T.report(t, d=d, s=smin * 1.01).dqpr["ok"]
    assert not T.report(t, d=d, s=math.sqrt(d)).dqpr["ok"]  # s = sqrt(d) never satisfies it


def test_format_report_lines():
    t = build("ring", 8)
    ok = T.format_report(t, 0.05)
    assert "WARNING" not in ok and "rho" in ok and "mu" in ok and "zeta" in ok
    assert "0.804738" in ok and "1.33333" in ok and "DCD-PSGD Theorem 1: OK" in ok
    assert "0: self 0.3333; 1 (0.3333), 7 (0.3333)" in ok
    bad = T.format_report(t, 0.1)
    warn = [ln for ln in bad.splitlines() if ln.startswith("WARNING")]
    assert len(warn) == 1 and "DCD-PSGD Theorem 1" in warn[0] and "0.0732" in warn[0]
    assert T.format_report(t, alpha=0.1) == bad
    plain = T.format_report(t)
    assert "WARNING" not in plain and "0.0732233" in plain
    h = T.format_report(build("hierarchical", 8, groups=2))
    assert "8*: self -0.3" in h and "gossip rule (entries in [0, 1]): NOT satisfied" in h
    e = T.format_report(build("elastic", 8, alpha=0.25, allow_divergent=True))
    assert "WARNING: zeta >= 1" in e
