"""The gossip family (d_psgd, d_psgd_naive_q, dcd_psgd, ecd_psgd, dqpr_sgd).

Two layers:
* the real algorithm classes on M in-process workers (``qprsgd.inprocess``: one thread each, the
  real transport) with a quadratic gradient, for invariants that need every worker's state after
  every step (replicas, estimates, the average);
* whole runs (``qprsgd run --workers N``, in-process) on 2, 4 and 8 workers against
  single-process references written in matrix form (rows = workers) over the runner's exact
  gradients and codec draws; replicas and estimates are read back from every worker's checkpoint.
  That the in-process runs equal ``mpiexec`` runs is tests/test_inprocess.py's job.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import final_params, run_many
from reference import Oracles, rel_err
from qprsgd import config
from qprsgd import topology as T
from qprsgd.algorithms.base import Env
from qprsgd.algorithms.dcd_ecd import DCDPSGD, DPSGD, DPSGDNaiveQ, ECDPSGD
from qprsgd.algorithms.quantized_pr_gossip import DQPRSGD
from qprsgd.inprocess import run_workers
from qprsgd.registry import CODECS

EPS32 = float(np.finfo(np.float32).eps)


# ============================================================================================
# in-process harness: the real algorithm classes on the real in-process transport


def simulate(cls, topo, T_steps, lr=0.05, codec=None, codec_params=None, d=40, seed=0, **params):
    """Run ``cls`` on topo.M in-process workers (``qprsgd.inprocess``) for T_steps with
    g_i(x) = a_i ⊙ (x − c_i) + noise_i.

    Returns (algs, X, G): the instances, X[t] (M x d) before step t (t = 0..T), G[t] the gradients.
    """
    M = topo.M
    gen = np.random.default_rng(seed)
    A = gen.uniform(0.5, 2.0, (M, d)).astype(np.float32)
    Cc = gen.normal(0, 1, (M, d)).astype(np.float32)
    x0 = gen.normal(0, 1, d).astype(np.float32)
    X = np.zeros((T_steps + 1, M, d), np.float32)
    G = np.zeros((T_steps, M, d), np.float32)
    algs = [None] * M

    def worker(tr):
        i = tr.rank
        c = None
        if codec is not None:
            c = CODECS.get(codec).factory(d, (d,), **(codec_params or {}))
        env = Env(comm=tr, d=d, workers=tuple(range(M)), worker_comm=tr, codec=c,
                  rng=np.random.default_rng([seed, 1, i]), W=topo.W, blocks=(d,), extra={"topology": topo})
        alg = algs[i] = cls(x0.copy(), env, **params)
        noise = np.random.default_rng([seed, 2, i])
        X[0, i] = alg.x
        for t in range(T_steps):
            def grad(t=t):
                g = A[i] * (alg.x - Cc[i]) + noise.normal(0, 0.1, d).astype(np.float32)
                G[t, i] = g
                return g
            alg.step(t, lr, grad)
            X[t + 1, i] = alg.x

    run_workers(M, worker, timeout=60)
    return algs, X, G


RING6 = T.build_topology("ring", 6)
TORUS8 = T.build_topology("torus", 8, {"rows": 2})


@pytest.mark.parametrize("topo", [RING6, TORUS8], ids=["ring6", "torus2x4"])
@pytest.mark.parametrize("codec,params", [("stochastic_bits", {"b": 4}), ("qsgd", {})])
def test_dcd_replicas_equal_owner_bit_for_bit(topo, codec, params):
    algs, X, _ = simulate(DCDPSGD, topo, 25, codec=codec, codec_params=params)
    for a in algs:
        for j in a.neighbors:
            np.testing.assert_array_equal(a.replica(j), algs[j].x)
    # the replicas moved with their owners (a frozen replica would fail the check above)
    assert np.abs(X[-1] - X[0]).max() > 0.1


def test_dqpr_replicas_equal_owner_bit_for_bit():
    algs, _, _ = simulate(DQPRSGD, RING6, 24, codec="qsgd", K=3)
    for a in algs:
        np.testing.assert_array_equal(a.replica(a.i), a.x)    # round end: x = own x̃
        for j in a.neighbors:
            np.testing.assert_array_equal(a.replica(j), algs[j].replica(j))


def test_ecd_estimates_agree_and_identity_tracks_x():
    algs, X, _ = simulate(ECDPSGD, RING6, 20, codec="stochastic_bits")
    for a in algs:
        for j in a.neighbors:
            np.testing.assert_array_equal(a.estimate(j), algs[j].estimate(j))
    # C = identity: x̃ = x up to rounding growing like t·eps (z carries the factor (t+1)/2)
    for T_steps in (10, 40, 160):
        algs, X, _ = simulate(ECDPSGD, RING6, T_steps, codec="identity")
        scale = float(np.abs(X).max())
        gap = max(float(np.abs(a.estimate(a.i) - a.x).max()) for a in algs)
        assert gap <= 4 * (T_steps + 2) * EPS32 * scale, (T_steps, gap)
    # and with a lossy codec the estimate is not x (the bound above is not vacuous)
    algs, _, _ = simulate(ECDPSGD, RING6, 10, codec="stochastic_bits", codec_params={"b": 4})
    assert max(float(np.abs(a.estimate(a.i) - a.x).max()) for a in algs) > 1e3 * 12 * EPS32


@pytest.mark.parametrize("name,cls,codec,params,T_steps", [
    ("d_psgd", DPSGD, None, {}, 20),
    ("d_psgd_stm", DPSGD, None, {"mix_rule": "step_then_mix"}, 20),
    ("dcd", DCDPSGD, "identity", {}, 20),
    ("ecd", ECDPSGD, "identity", {}, 20),
    ("dqpr", DQPRSGD, "identity", {"K": 4}, 20),
    ("naive_identity", DPSGDNaiveQ, "identity", {}, 20),
])
def test_identity_gossip_preserves_average(name, cls, codec, params, T_steps):
    """mean_i x_T = mean_i x_0 − γ Σ_t mean_i g_i(t)  (W doubly stochastic)."""
    lr = 0.05
    _, X, G = simulate(cls, RING6, T_steps, lr=lr, codec=codec, **params)
    pred = X[0].mean(0) - lr * G.sum(0).mean(0)
    err = float(np.abs(X[-1].mean(0) - pred).max())
    assert err < 1e-5, err
    assert float(np.abs(X[-1] - X[-1].mean(0)).max()) > 1e-3   # the workers do differ


def test_naive_compression_does_not_preserve_average():
    """The control for the test above: C(X)W injects noise into the average."""
    lr = 0.05
    _, X, G = simulate(DPSGDNaiveQ, RING6, 20, lr=lr, codec="stochastic_bits", codec_params={"b": 4})
    pred = X[0].mean(0) - lr * G.sum(0).mean(0)
    assert float(np.abs(X[-1].mean(0) - pred).max()) > 1e-3


def test_dqpr_k1_equals_dcd_with_shared_draws():
    a1, X1, _ = simulate(DCDPSGD, RING6, 25, codec="qsgd")
    a2, X2, _ = simulate(DQPRSGD, RING6, 25, codec="qsgd", K=1)
    assert rel_err(X2[-1], X1[-1]) <= 1e-6
    # not trivially: a different K gives different iterates
    a3, X3, _ = simulate(DQPRSGD, RING6, 25, codec="qsgd", K=2)
    assert rel_err(X3[-1], X1[-1]) > 1e-3


def test_gossip_sends_only_to_neighbours_with_honest_bytes():
    d = 40
    algs, _, _ = simulate(DPSGD, RING6, 3, d=d)
    for a in algs:
        assert a.env.comm.bytes_sent == {"peer": 3 * 2 * 4 * d}
    algs, _, _ = simulate(DCDPSGD, TORUS8, 3, codec="stochastic_bits", d=d)
    for a in algs:      # torus 2x4: 3 distinct neighbours; 64 + 8d bits per payload
        assert len(a.neighbors) == 3
        assert a.env.comm.bytes_sent == {"peer": 3 * 3 * (64 + 8 * d) // 8}


def test_biased_codec_refused_for_dcd_and_ecd():
    base = {"model": {"name": "mlp", "hidden": [16]}, "data": {"name": "digits"}}
    for alg in ("dcd_psgd", "ecd_psgd"):
        with pytest.raises(config.ConfigError, match="unbiased"):
            config.validate({**base, "algorithm": {"name": alg}, "codec": {"name": "topk", "k": 5}})
        cfg = config.validate({**base, "algorithm": {"name": alg}})
        assert cfg.codec.name == "stochastic_bits" and cfg.topology.name == "ring"
    assert config.validate({**base, "algorithm": {"name": "dqpr_sgd"}}).codec.name == "qsgd"
    with pytest.raises(config.ConfigError, match="codec"):
        config.validate({**base, "algorithm": {"name": "d_psgd"}, "codec": {"name": "identity"}})


def test_gossip_rejects_negative_weights():
    """A W with a negative entry passes the cooperative rule (ρ = 0.8) but not the gossip one."""
    W = [[0.6, 0.6, -0.2], [0.6, -0.2, 0.6], [-0.2, 0.6, 0.6]]
    from qprsgd.experiment import build_topology
    raw = {"model": {"name": "mlp", "hidden": [16]}, "data": {"name": "digits"},
           "algorithm": {"name": "dcd_psgd"}, "topology": {"name": "matrix", "W": W}}
    T.check_mixing(np.array(W), "cooperative")
    with pytest.raises(ValueError):
        build_topology(config.validate(raw), 3)


# ============================================================================================
# real MPI runs vs single-process references in matrix form

W2 = [[0.625, 0.375], [0.375, 0.625]]


def cfg(alg: dict, topo: dict, codec=None, epochs=1.0, ckpt=5) -> dict:
    c = {"seed": 4, "run": {"progress": False},
         "train": {"epochs": epochs, "batch_size": 8, "lr": 0.2, "eval_every": 1000, "log_every": 3,
                   "checkpoint_every": ckpt, "schedule": {"kind": "step", "milestones": [epochs / 2], "gamma": 0.5}},
         "model": {"name": "mlp", "hidden": [16]},
         "data": {"name": "digits", "params": {"max_train": 300, "max_test": 60}},
         "algorithm": alg, "topology": topo}
    if codec is not None:
        c["codec"] = codec
    return c


def mixf(W, X):
    return (W @ X.astype(np.float64)).astype(np.float32)


def grads(o, X):
    return np.stack([o.grad(i, X[i]) for i in range(o.M)])


def compress(o, codec, V):
    """Row i through worker i's codec with rank i's generator (what rank i's encode draws)."""
    return np.stack([np.asarray(codec.decode(codec.encode(V[i], o.rngs[i]).data), np.float32)
                     for i in range(o.M)])


def ref_d_psgd(o, rule):
    W, X = o.topology.W, o.X0()
    for t in range(o.total_steps):
        G, lr = grads(o, X), np.float32(o.lr(t))
        X = mixf(W, X) - lr * G if rule == "mix_then_step" else mixf(W, X - lr * G)
    return X


def ref_naive(o):
    """X_{t+1} = C(X_t) W − γ G(X_t)."""
    W, X, C = o.topology.W, o.X0(), o.codec()
    for t in range(o.total_steps):
        G, lr = grads(o, X), np.float32(o.lr(t))
        X = mixf(W, compress(o, C, X)) - lr * G
    return X


def ref_dcd(o):
    """Z = X W − γG − X;  X ← X + C(Z)  (replicas = X)."""
    W, X, C = o.topology.W, o.X0(), o.codec()
    for t in range(o.total_steps):
        G, lr = grads(o, X), np.float32(o.lr(t))
        Z = (mixf(W, X) - lr * G) - X
        X = X + compress(o, C, Z)
    return X


def ref_ecd(o):
    """X_{t+1} = X̃_t W − γG(X_t);  Z = (1 − k/2)X_t + (k/2)X_{t+1};  X̃ ← (1 − 2/k)X̃ + (2/k)C(Z), k = t+2 (0-based t; the paper's t+1)."""
    W, X, C = o.topology.W, o.X0(), o.codec()
    Xt = X.copy()
    for t in range(o.total_steps):
        k = t + 2
        G, lr = grads(o, X), np.float32(o.lr(t))
        Xn = mixf(W, Xt) - lr * G
        Z = np.float32(1 - k / 2) * X + np.float32(k / 2) * Xn
        X = Xn
        Xt = np.float32(1 - 2 / k) * Xt + np.float32(2 / k) * compress(o, C, Z)
    return X


def ref_dqpr(o, K):
    """K local steps; X̃_{n+1} = X̃_n − Q(X̃_n − (X̃_n W − X_{n;0} + X_{n;K}))."""
    W, X, C = o.topology.W, o.X0(), o.codec()
    Xt = X.copy()
    for t in range(o.total_steps):
        X = X - np.float32(o.lr(t)) * grads(o, X)
        if (t + 1) % K == 0:
            Xh = (mixf(W, Xt) - Xt) + X
            Xt = Xt - compress(o, C, Xt - Xh)
            X = Xt.copy()
    return X


SB8 = {"name": "stochastic_bits", "b": 8}
QS = {"name": "qsgd"}


def suite(n: int) -> dict:
    """name -> (config, reference function).  One run_many per rank count."""
    if n == 2:
        topos = {"": {"name": "matrix", "W": W2}}
        epochs = 1.0
    elif n == 4:
        topos = {"": {"name": "ring"}}
        epochs = 1.5
    else:
        topos = {"": {"name": "ring"}, "_torus": {"name": "torus", "rows": 2}}
        epochs = 3.0
    s = {}
    for suf, tp in topos.items():
        s["dcd" + suf] = (cfg({"name": "dcd_psgd"}, tp, SB8, epochs), ref_dcd)
        s["ecd" + suf] = (cfg({"name": "ecd_psgd"}, tp, SB8, epochs), ref_ecd)
        s["dqpr" + suf] = (cfg({"name": "dqpr_sgd", "K": 2}, tp, SB8, epochs), lambda o: ref_dqpr(o, 2))
    tp = topos[""]
    s["dpsgd"] = (cfg({"name": "d_psgd"}, tp, epochs=epochs), lambda o: ref_d_psgd(o, "mix_then_step"))
    s["dpsgd_stm"] = (cfg({"name": "d_psgd", "mix_rule": "step_then_mix"}, tp, epochs=epochs),
                      lambda o: ref_d_psgd(o, "step_then_mix"))
    s["naive"] = (cfg({"name": "d_psgd_naive_q"}, tp, SB8, epochs), ref_naive)
    if n == 4:
        s["dcd_qsgd"] = (cfg({"name": "dcd_psgd"}, tp, QS, epochs), None)   # == dqpr_k1, checked below
        s["dqpr_k1"] = (cfg({"name": "dqpr_sgd", "K": 1}, tp, QS, epochs), lambda o: ref_dqpr(o, 1))
        s["dpsgd_J"] = (cfg({"name": "d_psgd", "mix_rule": "step_then_mix"}, {"name": "allreduce"}, epochs=epochs),
                        None)
        psgd = cfg({"name": "psgd"}, None, epochs=epochs)
        del psgd["topology"]
        s["psgd"] = (psgd, None)
    return s


def load_ckpt(out_dir: Path, n: int):
    import json
    step = json.loads((out_dir / "checkpoint" / "latest.json").read_text())["step"]
    out = []
    for r in range(n):
        with np.load(out_dir / "checkpoint" / f"rank{r}.step{step}.npz", allow_pickle=False) as z:
            out.append({k: z[k] for k in z.files})
    return step, out


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4, 8])
def test_gossip_equals_reference(n, tmp_path):
    s = suite(n)
    h5 = run_many(n, {k: v[0] for k, v in s.items()}, tmp_path, timeout=400)
    got = {k: final_params(v) for k, v in h5.items()}
    for name, (c, ref) in s.items():
        if ref is None:
            continue
        o = Oracles(c, n)
        assert o.total_steps >= 10
        r = ref(o)
        assert rel_err(got[name], r) <= 1e-6, (name, rel_err(got[name], r))
        assert rel_err(got[name], o.X0()) > 1e-3, name      # it trained
    # the workers disagree (gossip, not all-reduce) and compression changed the iterates
    assert rel_err(got["dpsgd"][0], got["dpsgd"][1]) > 1e-5
    assert rel_err(got["dcd"], got["dpsgd"]) > 1e-5

    # DCD / D-Q-PR-SGD: every replica held by a neighbour equals its owner's value bit for bit;
    # ECD: every neighbour's estimate equals the owner's own estimate bit for bit
    for name in [k for k in s if k.startswith(("dcd", "ecd", "dqpr"))]:
        step, ck = load_ckpt(tmp_path / name, n)
        assert 0 < step < Oracles(s[name][0], n).total_steps
        for i in range(n):
            nb = list(ck[i]["alg/neighbors"])
            assert nb, name
            for k, j in enumerate(nb):
                if name.startswith("dcd"):
                    np.testing.assert_array_equal(ck[i]["alg/replicas"][k], ck[j]["x"], err_msg=name)
                elif name.startswith("ecd"):
                    np.testing.assert_array_equal(ck[i]["alg/estimates"][k], ck[j]["alg/own_estimate"],
                                                  err_msg=name)
                else:
                    np.testing.assert_array_equal(ck[i]["alg/replicas"][k], ck[j]["alg/own_replica"],
                                                  err_msg=name)

    # honest bits: D-PSGD sends 32 d bits per neighbour per step
    from qprsgd.logger import read
    r = read(str(h5["dpsgd"]))
    d = got["dpsgd"].shape[1]
    nbrs = 1 if n == 2 else 2
    steps = np.diff(np.concatenate([[0], r["metrics"]["step"]]))
    np.testing.assert_array_equal(np.diff(np.concatenate([[0], r["metrics"]["bits_sent"]])),
                                  steps * n * nbrs * 32 * d)
    assert "W" in r["topology"]

    if n == 4:
        # K = 1 D-Q-PR-SGD is DCD-PSGD (QSGD: shared draws, Q(−z) = −Q(z))
        assert rel_err(got["dqpr_k1"], got["dcd_qsgd"]) <= 1e-6
        assert rel_err(got["dqpr"], got["dcd"]) > 1e-4
        # W = J with step_then_mix is PSGD
        assert rel_err(got["dpsgd_J"], got["psgd"]) <= 1e-6
        assert rel_err(got["dpsgd"], got["psgd"]) > 1e-4
