"""Cooperative SGD A(τ, W, v) and its family under real MPI equal a single-process reference of
the matrix update X_{k+1} = (X_k − ηG_k)W_k (rule (10)) or X_k W_k − ηG_k (Remark 1), including
the auxiliary columns (read from the last checkpoint); the virtual sequence u = X1/(m+v) moves
by −η_eff·mean(g); pasgd equals pr_sgd; non-blocking EASGD equals blocking EASGD bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import final_params, run_many
from reference import Oracles, rel_err
from qprsgd import checkpoint as ckpt
from qprsgd.experiment import roles_for, schedule_lengths
from qprsgd import config as qconfig
from qprsgd.registry import ALGORITHMS

pytestmark = pytest.mark.mpi

N_TRAIN = 400


def cfg(alg: dict, topo: dict | None, steps: int, n: int, server: str = "rank0", **train) -> dict:
    """A tiny run of exactly ``steps`` steps (lr drops ×0.1 half way); checkpoint at steps − 1."""
    raw = {"seed": 3, "run": {"progress": False, "server": server},
           "train": {"batch_size": 8, "lr": 0.2, "eval_every": 1000, "log_every": 4},
           "model": {"name": "mlp", "hidden": [16]},
           "data": {"name": "digits", "params": {"max_train": N_TRAIN, "max_test": 60}}, "algorithm": alg}
    if topo is not None:
        raw["topology"] = topo
    M = roles_for(qconfig.validate(raw), n).M
    spe, _ = schedule_lengths(qconfig.validate(raw).train, N_TRAIN, M)
    ep = steps / spe
    raw["train"].update({"epochs": ep, "checkpoint_every": steps - 1,
                         "schedule": {"kind": "step", "milestones": [ep / 2], "gamma": 0.1}})
    raw["train"].update(train)
    assert schedule_lengths(qconfig.validate(raw).train, N_TRAIN, M)[1] == steps
    return raw


def is_avg(t: int, tau: int, phase: str) -> bool:
    return (t + 1) % tau == 0 if phase == "end" else t % tau == 0


def reference(o: Oracles, tau: int, rule: str, phase: str, upto: int | None = None) -> np.ndarray:
    """Rows = nodes (M workers, then v auxiliary): X_{k+1} = (X_k − ηG_k)W_k or X_k W_k − ηG_k,
    W_k = W on averaging steps, I otherwise; G's auxiliary rows are 0.  Returns X after ``upto`` steps."""
    W = np.asarray(o.topology.W, dtype=np.float64)
    n, M = W.shape[0], o.M
    X = np.tile(o.x0, (n, 1)).astype(np.float32)
    for t in range(o.total_steps if upto is None else upto):
        eta = np.float32(o.lr(t))
        G = np.zeros_like(X)
        for i in range(M):
            G[i] = o.grad(i, X[i])
        if not is_avg(t, tau, phase):
            X = X - eta * G
        elif rule == "step_then_mix":
            X = (W.T @ (X - eta * G).astype(np.float64)).astype(np.float32)
        else:
            X = ((W.T @ X.astype(np.float64)).astype(np.float32) - eta * G)
    return X


def node_hosts(raw: dict, n: int) -> tuple[list, object]:
    """World rank of each node: workers, then auxiliary nodes as the algorithm places them."""
    c = qconfig.validate(raw)
    roles = roles_for(c, n)
    o_topo = Oracles(raw, n).topology
    hosts = list(roles.workers)
    if o_topo.v:
        if getattr(ALGORITHMS.get(c.algorithm.name).factory, "needs_server", False):
            hosts.append(roles.server)
        elif o_topo.groups is not None:
            hosts += [roles.workers[min(g)] for g in o_topo.groups]
        else:
            hosts += [roles.workers[k % roles.M] for k in range(o_topo.v)]
    return hosts, o_topo


def checkpoint_X(out_dir, raw: dict, n: int) -> tuple[int, np.ndarray]:
    """Full X (workers and auxiliary nodes) from the run's last checkpoint."""
    step = ckpt.latest(str(out_dir))["step"]
    hosts, topo = node_hosts(raw, n)
    arrays = {r: ckpt.load_rank(str(out_dir), r, step)[0] for r in set(hosts)}
    rows = []
    for i, r in enumerate(hosts):
        rows.append(arrays[r]["x"] if i < topo.M else arrays[r][f"alg/aux{i}"])
    return step, np.stack(rows)


def ring_or_matrix(M: int) -> dict:
    if M >= 4:
        return {"name": "ring"}
    if M == 3:
        return {"name": "matrix", "W": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]}
    return {"name": "matrix", "W": [[0.7, 0.3], [0.3, 0.7]]}


def members(n: int, steps: int) -> dict:
    """name -> (config, tau, rule, phase); every member, both rules, several placements."""
    out = {}

    def add(name, alg, topo, server="rank0"):
        tau = alg.get("tau", 1)
        out[name] = (cfg(alg, topo, steps, n, server), tau, alg.get("mix_rule", "step_then_mix"),
                     alg.get("avg_phase", "end"))

    ring = ring_or_matrix(n)
    add("coop", {"name": "cooperative", "tau": 2}, ring)
    add("coop_m_k0", {"name": "cooperative", "tau": 3, "mix_rule": "mix_then_step", "avg_phase": "k0"}, ring)
    add("coop_elastic", {"name": "cooperative", "tau": 1}, {"name": "elastic", "alpha": "best"})
    add("pasgd", {"name": "pasgd", "tau": 3}, None)
    add("pasgd_m", {"name": "pasgd", "tau": 3, "mix_rule": "mix_then_step"}, None)
    add("pasgd_complete", {"name": "pasgd", "tau": 2}, {"name": "complete"})
    add("d_pasgd", {"name": "d_pasgd", "tau": 2}, ring)
    add("d_pasgd_m", {"name": "d_pasgd", "tau": 1, "mix_rule": "mix_then_step"}, ring)
    add("easgd", {"name": "easgd"}, {"name": "elastic", "alpha": "best"})
    add("easgd_m", {"name": "easgd", "mix_rule": "mix_then_step"}, {"name": "elastic", "alpha": "best"})
    add("easgd_nb", {"name": "easgd", "tau": 2, "nonblocking": True}, {"name": "elastic", "alpha": 0.2})
    ded = "dedicated" if n >= 3 else "rank0"   # a dedicated z rank needs m >= 2 workers
    add("easgd_ded", {"name": "easgd", "tau": 2}, {"name": "elastic", "alpha": 0.2}, ded)
    add("easgd_ded_nb", {"name": "easgd", "tau": 2, "nonblocking": True}, {"name": "elastic", "alpha": 0.2}, ded)
    gbase = ring_or_matrix(n)
    gtopo = {"name": "generalized_elastic", "base": gbase["name"], "alpha": "best",
             "base_params": {k: v for k, v in gbase.items() if k != "name"}}
    add("gen_elastic", {"name": "generalized_elastic"}, gtopo)
    add("gen_elastic_m_ded", {"name": "generalized_elastic", "mix_rule": "mix_then_step", "nonblocking": True},
        dict(gtopo, base_params={k: v for k, v in ring_or_matrix(n - 1).items() if k != "name"},
             base=ring_or_matrix(n - 1)["name"]) if n > 2 else gtopo, "dedicated" if n > 2 else "rank0")
    q = 2 if n >= 2 else 1
    add("hier", {"name": "hierarchical", "tau": 2}, {"name": "hierarchical", "groups": q})
    add("hier_m_nb", {"name": "hierarchical", "tau": 1, "mix_rule": "mix_then_step", "nonblocking": True},
        {"name": "hierarchical", "groups": [[i] for i in range(n)] if n <= 4 else 4})
    return out


STEPS = 9


@pytest.mark.parametrize("n", [2, 4, pytest.param(8, marks=pytest.mark.slow)])   # 8 under make test-all
def test_members_equal_matrix_reference(n, tmp_path):
    mem = members(n, STEPS)
    cfgs = {k: v[0] for k, v in mem.items()}
    cfgs["pr_sgd"] = cfg({"name": "pr_sgd", "K": 3}, None, STEPS, n)
    if "d_psgd" in ALGORITHMS:
        cfgs["d_psgd"] = cfg({"name": "d_psgd", "mix_rule": "step_then_mix"}, ring_or_matrix(n), STEPS, n)
    h5 = run_many(n, cfgs, tmp_path, timeout=600)
    got = {k: final_params(v) for k, v in h5.items()}
    for name, (raw, tau, rule, phase) in mem.items():
        o = Oracles(raw, n)
        hosts, topo = node_hosts(raw, n)
        ref = reference(o, tau, rule, phase)
        M = topo.M
        # worker rows of final/params; a dedicated server's row is z
        rows = [hosts[i] for i in range(M)]
        assert rel_err(got[name][rows], ref[:M]) <= 1e-6, name
        if raw["run"]["server"] == "dedicated":
            assert rel_err(got[name][hosts[M]], ref[M]) <= 1e-6, name
        # every column, auxiliary ones included, at the last checkpoint
        step, Xc = checkpoint_X(tmp_path / name, raw, n)
        assert step == STEPS - 1
        refc = reference(Oracles(raw, n), tau, rule, phase, upto=step)
        assert rel_err(Xc, refc) <= 1e-6, name
        # the other rule gives different iterates (the test can tell the rules apart)
        other = "mix_then_step" if rule == "step_then_mix" else "step_then_mix"
        assert rel_err(got[name][rows], reference(Oracles(raw, n), tau, other, phase)[:M]) > 1e-5, name
    # PASGD = A(τ, J, 0) is pr_sgd: bit-identical (same all-reduce)
    np.testing.assert_array_equal(got["pasgd"], got["pr_sgd"])
    # non-blocking EASGD = blocking EASGD, bit for bit
    np.testing.assert_array_equal(got["easgd_ded_nb"], got["easgd_ded"])
    if "d_psgd" in got:
        assert rel_err(got["d_psgd"], got["d_pasgd_m"]) > 1e-5 or n == 1
        d1 = cfg({"name": "d_pasgd", "tau": 1}, ring_or_matrix(n), STEPS, n)
        assert rel_err(got["d_psgd"], reference(Oracles(d1, n), 1, "step_then_mix", "end")[:n]) <= 1e-6


def test_nonblocking_bit_identical_and_dpsgd(tmp_path):
    """Blocking vs non-blocking for each member with auxiliary nodes, on 3 ranks (z on rank 0,
    on a dedicated rank, and the hierarchical group nodes); and d_pasgd τ = 1 vs d_psgd."""
    n, steps = 3, 8
    pairs = {
        "e0": ({"name": "easgd", "tau": 1}, {"name": "elastic", "alpha": 0.25}, "rank0"),
        "ed": ({"name": "easgd", "tau": 3, "mix_rule": "mix_then_step"}, {"name": "elastic", "alpha": 0.3},
               "dedicated"),
        "g": ({"name": "generalized_elastic", "tau": 2},
              {"name": "generalized_elastic", "base": "matrix", "alpha": 0.3,
               "base_params": {"W": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]}}, "rank0"),
        "h": ({"name": "hierarchical", "tau": 2}, {"name": "hierarchical", "groups": 2}, "rank0"),
    }
    cfgs = {}
    for k, (alg, topo, server) in pairs.items():
        cfgs[k + "_b"] = cfg(dict(alg, nonblocking=False), topo, steps, n, server)
        cfgs[k + "_nb"] = cfg(dict(alg, nonblocking=True), topo, steps, n, server)
    has_dpsgd = "d_psgd" in ALGORITHMS
    if has_dpsgd:
        W3 = ring_or_matrix(3)
        cfgs["dp"] = cfg({"name": "d_psgd", "mix_rule": "step_then_mix"}, W3, steps, n)
        cfgs["dpa"] = cfg({"name": "d_pasgd", "tau": 1}, W3, steps, n)
    h5 = run_many(n, cfgs, tmp_path, timeout=300)
    for k in pairs:
        a, b = final_params(h5[k + "_b"]), final_params(h5[k + "_nb"])
        np.testing.assert_array_equal(a, b, err_msg=k)
        assert np.abs(a - a[0]).max() > 0  # the models differ: a real multi-model run
        sa = checkpoint_X(tmp_path / (k + "_b"), cfgs[k + "_b"], n)[1]
        sb = checkpoint_X(tmp_path / (k + "_nb"), cfgs[k + "_nb"], n)[1]
        np.testing.assert_array_equal(sa, sb, err_msg=k)
    if not has_dpsgd:
        pytest.skip("d_psgd (qprsgd/algorithms/dcd_ecd.py) is not registered yet: d_pasgd τ=1 vs d_psgd not run")
    # one mixing component: d_pasgd τ = 1 is d_psgd under the same rule, bit for bit
    np.testing.assert_array_equal(final_params(h5["dpa"]), final_params(h5["dp"]))


@pytest.mark.parametrize("rule", ["step_then_mix", "mix_then_step"])
def test_virtual_sequence(rule, tmp_path):
    """u_k = X_k 1/(m+v) obeys u_{k+1} = u_k − η_eff·mean_i g_i(x_k⁽ⁱ⁾), η_eff = mη/(m+v) (eq. (12)–(14)),
    on the real run's columns (two runs: last checkpoints at steps T−1 and T), for an averaging step."""
    n, T = 4, 5   # step T−1 = 4 … transition 4 → 5 is an averaging step for τ = 1; for τ = 5 (end) too
    specs = {
        "easgd": ({"name": "easgd", "tau": 1, "mix_rule": rule}, {"name": "elastic", "alpha": 0.2}, "rank0"),
        "hier": ({"name": "hierarchical", "tau": 5, "mix_rule": rule}, {"name": "hierarchical", "groups": 2},
                 "rank0"),
        "gen": ({"name": "generalized_elastic", "tau": 1, "mix_rule": rule},
                {"name": "generalized_elastic", "base": "matrix", "alpha": 0.3,
                 "base_params": {"W": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]}}, "dedicated"),
    }
    cfgs = {}
    for k, (alg, topo, server) in specs.items():
        for tag, steps in (("a", T), ("b", T + 1)):
            c = cfg(alg, topo, steps, n, server, checkpoint_every=1)
            c["train"]["schedule"] = {"kind": "constant"}
            cfgs[f"{k}_{tag}"] = c
    run_many(n, cfgs, tmp_path, timeout=300)
    for k in specs:
        sa, Xa = checkpoint_X(tmp_path / f"{k}_a", cfgs[f"{k}_a"], n)
        sb, Xb = checkpoint_X(tmp_path / f"{k}_b", cfgs[f"{k}_b"], n)
        assert (sa, sb) == (T - 1, T)
        o = Oracles(cfgs[f"{k}_a"], n)
        m, nv = o.M, Xa.shape[0]
        for i in range(m):
            for _ in range(sa):
                o.streams[i].next()
        g = np.stack([o.grad(i, Xa[i]) for i in range(m)]).astype(np.float64)
        eta = o.lr(sa)
        du = Xb.astype(np.float64).mean(0) - Xa.astype(np.float64).mean(0)
        pred = -eta * m / nv * g.mean(0)
        assert nv > m  # auxiliary nodes present
        assert np.linalg.norm(du - pred) <= 1e-3 * np.linalg.norm(pred), k
        # η (not η_eff) would be wrong
        assert np.linalg.norm(du + eta * g.mean(0)) > 1e-2 * np.linalg.norm(pred), k
        # and the columns really moved apart (not a trivial consensus)
        assert np.abs(Xb - Xb.mean(0)).max() > 1e-4


def test_topology_errors():
    """Each named member refuses a topology that is not its A(τ, W, v) (checked at build time)."""
    from qprsgd.experiment import build_topology
    bad = [
        ({"name": "easgd"}, {"name": "ring"}, "needs topology 'elastic'"),
        ({"name": "generalized_elastic"}, {"name": "elastic", "alpha": 0.2}, "needs topology 'generalized_elastic'"),
        ({"name": "pasgd"}, {"name": "ring"}, "needs topology 'allreduce' or 'complete'"),
        ({"name": "d_pasgd"}, {"name": "elastic", "alpha": 0.2}, "no auxiliary nodes"),
        ({"name": "hierarchical"}, {"name": "ring"}, "needs topology 'hierarchical'"),
    ]
    for alg, topo, msg in bad:
        raw = {"algorithm": alg, "topology": topo}
        t = build_topology(qconfig.validate(raw), 4)
        cls = ALGORITHMS.get(alg["name"]).factory
        with pytest.raises(ValueError, match=msg):
            cls._check_topology(_Probe(cls, t), t)
        assert cls.mixing_rule == "cooperative"
    # the auxiliary node placement: z on the server where the class says so
    assert ALGORITHMS.get("easgd").factory.needs_server
    assert ALGORITHMS.get("generalized_elastic").factory.needs_server
    assert not ALGORITHMS.get("hierarchical").factory.needs_server


class _Probe:
    """Just enough of an instance for ``_check_topology``."""

    def __init__(self, cls, topo):
        self.name = cls.name
        self.topologies = cls.topologies
        self.require_J = cls.require_J
        self.require_no_aux = cls.require_no_aux
        self.W = np.asarray(topo.W)
        self.M = topo.M
        self.v = topo.v


# -- SIGKILL resume: z, the remote auxiliary copies, a pending non-blocking exchange, group comms --
def resume_cfg(alg: dict, topo: dict | None, server: str = "rank0") -> dict:
    raw = {"seed": 5, "run": {"progress": False, "server": server},
           "train": {"epochs": 2, "batch_size": 8, "lr": 0.05, "eval_every": 30, "log_every": 7,
                     "checkpoint_every": 10, "schedule": {"kind": "step", "milestones": [1]}},
           "model": {"name": "mlp", "hidden": [16]}, "data": {"name": "digits", "params": {"max_train": 600}},
           "algorithm": alg}
    if topo is not None:
        raw["topology"] = topo
    return raw


RESUME = {
    "easgd_nb_ded": (3, resume_cfg({"name": "easgd", "tau": 3, "nonblocking": True},
                                   {"name": "elastic", "alpha": 0.3}, "dedicated")),
    "hierarchical": (3, resume_cfg({"name": "hierarchical", "tau": 2, "nonblocking": True},
                                   {"name": "hierarchical", "groups": 2})),
    "easgd_rank0": (2, resume_cfg({"name": "easgd", "mix_rule": "mix_then_step"}, {"name": "elastic", "alpha": 0.3})),
    "cooperative": (3, resume_cfg({"name": "cooperative", "tau": 2},
                                  {"name": "matrix", "W": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]})),
    "pasgd": (2, resume_cfg({"name": "pasgd", "tau": 3}, None)),
    "d_pasgd": (2, resume_cfg({"name": "d_pasgd", "tau": 2}, {"name": "matrix", "W": [[0.7, 0.3], [0.3, 0.7]]})),
    "generalized_elastic": (3, resume_cfg(
        {"name": "generalized_elastic", "nonblocking": True},
        {"name": "generalized_elastic", "base": "matrix", "alpha": "best",
         "base_params": {"W": [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]}})),
}


@pytest.mark.parametrize("how", ["stop", pytest.param("kill", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(RESUME))
def test_sigkill_resume_bit_identical(name, how, tmp_path):
    """Exact resume: stopped in-process (default run) or SIGKILLed (make test-all)."""
    from resume_util import check_kill_resume, check_stop_resume
    n, raw = RESUME[name]
    ref = run_many(n, {name: raw}, tmp_path)[name]
    check = check_stop_resume if how == "stop" else check_kill_resume
    step = check(n, raw, tmp_path, name, ref, min_step=20)
    assert step >= 20
