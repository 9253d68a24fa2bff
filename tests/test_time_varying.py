"""Time-varying topologies (qprsgd/topology.py TopologySequence) and gossip on them.

* the sequences' mathematics: one-peer exponential averages exactly after log2 n steps
  (n = 8, 16), base-(k+1) graphs exactly after one period (n = 6, 10, several k), every
  matching / W_k doubly stochastic, W_k a function of (seed, k) alone, validation messages;
* the real algorithm classes on in-process workers: consensus at float precision, one message
  per node per step on the one-peer graph, per-pair references equal bit for bit on both ends,
  and on a constant sequence (a file holding the ring) exactly the static ring's iterates;
* whole runs: kill and resume on matcha is bit-identical (in-process == mpiexec: two
  time-varying configs in tests/test_inprocess.py alg_configs).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run_many, run_qprsgd
from resume_util import check_kill_resume
from test_gossip import simulate
from qprsgd import topology as T
from qprsgd.algorithms.dcd_ecd import DCDPSGD, DPSGD, DPSGDNaiveQ, ECDPSGD
from qprsgd.algorithms.quantized_pr_gossip import DQPRSGD
from qprsgd.algorithms.base import Env
from qprsgd.inprocess import run_workers
from qprsgd.logger import read

EPS32 = float(np.finfo(np.float32).eps)
J = lambda n: np.full((n, n), 1.0 / n)  # noqa: E731


def gossip_only(topo, steps, d=24, seed=0):
    """Pure gossip: d_psgd with zero gradients from different x_i on topo.M in-process workers
    (the real transport); returns (algs, X) with X[t] the M x d models before step t."""
    M = topo.M
    X0 = np.random.default_rng(seed).normal(0, 1, (M, d)).astype(np.float32)
    X = np.zeros((steps + 1, M, d), np.float32)
    algs = [None] * M
    zero = np.zeros(d, np.float32)

    def worker(tr):
        i = tr.rank
        env = Env(comm=tr, d=d, workers=tuple(range(M)), worker_comm=tr, W=topo.W, blocks=(d,),
                  extra={"topology": topo})
        alg = algs[i] = DPSGD(X0[i].copy(), env)
        X[0, i] = alg.x
        for t in range(steps):
            alg.step(t, 0.1, lambda: zero)
            X[t + 1, i] = alg.x

    run_workers(M, worker, timeout=60)
    return algs, X


# ---------------------------------------------------------------------------------------------
# the sequences


@pytest.mark.parametrize("n", [8, 16])
def test_one_peer_exponential_is_exact_after_log2_n_steps(n):
    topo = T.build_topology("one_peer_exponential", n)
    tau = int(np.log2(n))
    assert topo.period == tau and topo.steps_to_exact() == tau
    for k in range(tau):
        W = topo.W_at(k)
        # one peer: i <- i + 2^k, weights 1/2
        for i in range(n):
            assert [int(j) for j in np.flatnonzero(W[i])] == sorted({i, (i + 2**k) % n})
            assert W[i, i] == 0.5
    # every starting phase: tau consecutive steps give J (to float64 precision), fewer do not
    for start in range(tau):
        assert np.abs(topo.product(start, tau) - J(n)).max() < 1e-15
        assert np.abs(topo.product(start, tau - 1) - J(n)).max() >= 1.0 / n
    # the gossip itself: d_psgd with lr = 0 on in-process workers reaches the float32 average
    algs, X = gossip_only(topo, tau, d=24)
    mean = X[0].astype(np.float64).mean(0)
    err = np.abs(X[tau] - mean).max()
    assert err <= 4 * EPS32 * np.abs(X[0]).max(), err
    assert np.abs(X[tau - 1] - mean).max() > 1e-3              # not before
    # one peer per step: tau messages of 4d bytes per worker
    for a in algs:
        assert a.env.worker_comm.ledger.messages["peer"] == tau
        assert a.env.worker_comm.ledger.bytes["peer"] == tau * 4 * 24


def test_one_peer_exponential_without_power_of_two_is_not_exact_but_contracts():
    topo = T.build_topology("one_peer_exponential", 6)
    assert topo.steps_to_exact() is None and 0 < topo.rho_period < 1


@pytest.mark.parametrize("n", [6, 10])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_base_graph_exact_in_finite_steps(n, k):
    topo = T.build_topology("base_graph", n, {"k": k})
    assert topo.steps_to_exact() == topo.period
    assert np.abs(topo.product(0, topo.period) - J(n)).max() < 1e-12
    for W in topo.mats:
        assert np.array_equal(W, W.T) and W.min() >= 0
        np.testing.assert_allclose(W.sum(1), 1, atol=1e-12)
        peers = ((W != 0) & ~np.eye(n, dtype=bool)).sum(1)
        assert peers.max() <= k                                 # maximum degree k
    if k == 1:
        algs, X = gossip_only(topo, topo.period, d=16)
        assert np.abs(X[-2] - X[0].astype(np.float64).mean(0)).max() > 1e-3
        err = np.abs(X[-1] - X[0].astype(np.float64).mean(0)).max()
        assert err <= 8 * EPS32 * np.abs(X[0]).max(), err


def test_base_graph_power_of_k_plus_1_is_the_hypercube():
    assert T.build_topology("base_graph", 8, {"k": 1}).period == 3
    assert T.build_topology("base_graph", 9, {"k": 2}).period == 2


@pytest.mark.parametrize("base,budget", [("ring", 0.5), ("torus", 0.3), ("complete", 0.2)])
def test_matcha_matchings_and_every_W_k_doubly_stochastic(base, budget):
    M = 12
    topo = T.build_topology("matcha", M, {"base": base, "budget": budget, "seed": 4})
    b = T.build_topology(base, M)
    A = (b.W != 0) & ~np.eye(M, dtype=bool)
    ms = T.matching_decomposition(A)
    edges = [e for m in ms for e in m]
    assert len(edges) == len(set(edges)) == A.sum() // 2       # every edge once
    for m in ms:                                               # a matching: each node at most once
        nodes = [i for e in m for i in e]
        assert len(nodes) == len(set(nodes))
    p = np.asarray(topo.meta["p"])
    assert len(p) == len(ms) and p.min() >= 0 and p.max() <= 1
    assert p.sum() <= budget * len(ms) + 1e-9                  # the budget holds
    assert 0 < topo.rho_period < 1
    active = 0
    for k in range(60):
        W = topo.W_at(k)
        assert np.array_equal(W, W.T) and W.min() >= 0
        np.testing.assert_allclose(W.sum(0), 1, atol=1e-12)
        np.testing.assert_allclose(W.sum(1), 1, atol=1e-12)
        assert (((W != 0) & ~A) & ~np.eye(M, dtype=bool)).sum() == 0   # base edges only
        active += int(((W != 0) & ~np.eye(M, dtype=bool)).any())
    assert 0 < active < 60 or budget == 1.0


def test_matcha_full_budget_is_the_static_laplacian_gossip():
    topo = T.build_topology("matcha", 8, {"base": "ring", "budget": 1.0})
    assert topo.meta["p"] == [1.0, 1.0]
    W0 = topo.W_at(0)
    assert all(np.array_equal(W0, topo.W_at(k)) for k in range(10))


def test_same_seed_same_W_k_on_every_rank_in_any_order():
    a = T.build_topology("matcha", 16, {"budget": 0.4, "seed": 7})
    b = T.build_topology("matcha", 16, {"budget": 0.4, "seed": 7})    # another rank's build
    ks = list(range(50))
    Wa = [a.W_at(k) for k in ks]
    Wb = {k: b.W_at(k) for k in reversed(ks)}                       # drawn in another order
    assert all(np.array_equal(Wa[k], Wb[k]) for k in ks)
    assert np.array_equal(a.W_at(1000), b.W_at(1000))                # a resumed run jumps ahead
    c = T.build_topology("matcha", 16, {"budget": 0.4, "seed": 8})
    assert any(not np.array_equal(a.W_at(k), c.W_at(k)) for k in ks)


def test_validation_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        T.build_topology("matcha", 8, {"budget": 1.5})
    with pytest.raises(ValueError, match="budget"):
        T.build_topology("matcha", 8, {"budget": 0})
    with pytest.raises(ValueError, match="needs M >= 2"):
        T.build_topology("one_peer_exponential", 1)
    with pytest.raises(ValueError, match="k"):
        T.build_topology("base_graph", 6, {"k": 0})
    with pytest.raises(ValueError, match="ring.*needs M >= 4"):
        T.build_topology("matcha", 3, {"base": "ring"})
    good = T.build_topology("ring", 5).W
    bad = good.copy()
    bad[0, 0] += 0.1
    bad[0, 1] -= 0.1                                           # rows still sum to 1, columns do not
    np.savez(tmp_path / "s.npz", good, bad)
    with pytest.raises(ValueError, match=r"matrix arr_1 \(W_1\).*not doubly stochastic: column"):
        T.build_topology("matrix_file", 5, {"path": str(tmp_path / "s.npz")})
    np.save(tmp_path / "w.npy", np.stack([good, good]))
    with pytest.raises(ValueError, match="M = 6"):
        T.build_topology("matrix_file", 6, {"path": str(tmp_path / "w.npy")})
    # a file whose matrices never connect the nodes is refused
    np.save(tmp_path / "i.npy", np.eye(5))
    with pytest.raises(ValueError, match="disconnected"):
        T.build_topology("matrix_file", 5, {"path": str(tmp_path / "i.npy")})


def test_npz_order_is_arr_index_not_lexicographic(tmp_path):
    op = T.build_topology("one_peer_exponential", 8)
    mats = [op.mats[k % 3] for k in range(11)]
    np.savez(tmp_path / "m.npz", *mats)          # arr_0 .. arr_10 ("arr_10" < "arr_2" as text)
    f = T.build_topology("matrix_file", 8, {"path": str(tmp_path / "m.npz")})
    assert f.period == 11 and all(np.array_equal(f.W_at(k), mats[k]) for k in range(11))


# ---------------------------------------------------------------------------------------------
# compressed gossip on changing neighbours (in-process workers, the real classes)


def _pairs_agree(algs):
    for a in algs:
        P = a.pairs
        for j in P.inn:
            np.testing.assert_array_equal(P.ref(j), algs[j].pairs.out_ref(a.i))
        for k, j in enumerate(P.out):
            if P.fresh[k]:
                pub = {"dcd_psgd": a.x, "ecd_psgd": getattr(a, "own_estimate", None),
                       "dqpr_sgd": getattr(a, "own_replica", None)}[a.name]
                np.testing.assert_array_equal(P.out_refs[k], pub)


CASES = [(DCDPSGD, dict(codec="stochastic_bits", codec_params={"b": 4})),
         (DCDPSGD, dict(codec="qsgd")),
         (ECDPSGD, dict(codec="stochastic_bits")),
         (DQPRSGD, dict(codec="qsgd", K=2))]
IDS = ["dcd-sb4", "dcd-qsgd", "ecd-sb8", "dqpr-qsgd"]


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
@pytest.mark.parametrize("topo", [T.build_topology("one_peer_exponential", 8),
                                  T.build_topology("matcha", 6, {"budget": 0.5, "seed": 1})],
                         ids=["one_peer8", "matcha6"])
def test_pair_references_equal_bit_for_bit(cls, kw, topo):
    algs, X, _ = simulate(cls, topo, 14, **kw)
    _pairs_agree(algs)
    assert any(not P.fresh.all() for P in (a.pairs for a in algs))    # catch-ups were exercised
    assert np.isfinite(X).all() and np.abs(X[-1] - X[-1].mean(0)).max() > 0


def test_one_peer_dcd_sends_one_payload_per_step():
    topo = T.build_topology("one_peer_exponential", 8)
    algs, _, _ = simulate(DCDPSGD, topo, 9, codec="stochastic_bits", d=32)
    for a in algs:
        assert a.env.worker_comm.ledger.messages["peer"] == 9
        # 8-bit stochastic rounding: two float32 + d bytes per payload
        assert a.env.worker_comm.ledger.bytes["peer"] == 9 * (8 + 32)


@pytest.mark.parametrize("cls,kw", CASES + [(DPSGD, {}), (DPSGDNaiveQ, dict(codec="stochastic_bits"))],
                         ids=IDS + ["d_psgd", "naive"])
def test_constant_sequence_gives_the_static_ring_bit_for_bit(cls, kw, tmp_path):
    """The per-pair path on W_k = ring for every k (a file holding the ring) against main's
    static code path on topology ring: the same iterates, bytes and messages."""
    ring = T.build_topology("ring", 6)
    np.save(tmp_path / "ring.npy", ring.W)
    seq = T.build_topology("matrix_file", 6, {"path": str(tmp_path / "ring.npy")})
    a, Xa, _ = simulate(cls, ring, 12, **kw)
    b, Xb, _ = simulate(cls, seq, 12, **kw)
    np.testing.assert_array_equal(Xa, Xb)
    assert all(getattr(x, "pairs", None) is None for x in a)
    if cls not in (DPSGD, DPSGDNaiveQ):
        assert all(x.pairs is not None and x.pairs.fresh.all() for x in b)
    for x, y in zip(a, b):
        assert dict(x.env.worker_comm.ledger.bytes) == dict(y.env.worker_comm.ledger.bytes)
        assert dict(x.env.worker_comm.ledger.messages) == dict(y.env.worker_comm.ledger.messages)


# ---------------------------------------------------------------------------------------------
# whole runs


def _cfg(M, alg, topo, codec=None, steps=6, batch=4, ckpt=None):
    c = {"seed": 5, "run": {"progress": False},
         "train": {"epochs": 1, "batch_size": batch, "lr": 0.1, "eval_every": 1000, "log_every": 2},
         "model": {"name": "mlp", "hidden": [8]},
         "data": {"name": "digits", "params": {"max_train": M * batch * steps, "max_test": 40}},
         "algorithm": alg, "topology": topo}
    if codec:
        c["codec"] = codec
    if ckpt:
        c["train"]["checkpoint_every"] = ckpt
    return c


def test_fixed_W_algorithm_refuses_a_sequence(tmp_path):
    cfg = _cfg(4, {"name": "easgd"}, {"name": "one_peer_exponential"})
    cfg["topology"] = {"name": "one_peer_exponential"}
    rc, out, err, _ = run_qprsgd(4, cfg, tmp_path, check=False)
    assert rc != 0 and "time-varying" in err


def test_run_logs_per_step_spectra_and_d_pasgd_uses_W_k(tmp_path):
    M = 8
    cfgs = {"dpa": _cfg(M, {"name": "d_pasgd", "tau": 2}, {"name": "one_peer_exponential"}, steps=6)}
    h5 = run_many(M, cfgs, tmp_path)
    r = read(str(h5["dpa"]))
    topo = r["topology"]
    assert topo["W_steps"].shape == (3, M, M)
    np.testing.assert_array_equal(topo["step_messages"], [M, M, M])
    assert int(topo["_attrs"]["W"]["steps_to_exact"]) == 3
    # 6 steps, tau = 2: 3 averaging rounds, one message per worker each
    assert int(r["metrics"]["messages"][-1]) == 3 * M


def test_kill_and_resume_on_matcha_is_bit_identical(tmp_path):
    cfg = _cfg(4, {"name": "dcd_psgd"}, {"name": "matcha", "base": "complete", "budget": 0.5, "seed": 3},
               steps=24, ckpt=8)
    _, _, _, ref = run_qprsgd(4, cfg, tmp_path, name="ref")
    check_kill_resume(4, cfg, tmp_path, "matcha", ref, min_step=8, mpi=False)


# in-process == mpiexec on time-varying topologies: tests/test_inprocess.py alg_configs holds
# d_psgd on one_peer_exponential and dcd_psgd on matcha (run in its existing M = 2, 4, 8 jobs).


def test_qprsgd_topo_prints_period_spectra(tmp_path, capsys):
    import yaml
    from qprsgd.cli import main
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(8, {"name": "dcd_psgd"}, {"name": "one_peer_exponential"})))
    assert main(["topo", str(p), "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "period 3" in out and "steps to exact averaging from step 0: 3" in out
    assert "W_2 ... W_0 - J||_2 = 0" in out and "0<-4" in out          # step 2: i receives from i + 4
    p.write_text(yaml.safe_dump(_cfg(6, {"name": "d_psgd"}, {"name": "base_graph", "k": 1})))
    assert main(["topo", str(p), "--workers", "6"]) == 0
    assert "steps to exact averaging from step 0: 5" in capsys.readouterr().out
