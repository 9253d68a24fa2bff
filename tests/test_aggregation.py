"""``algorithm.aggregation`` for qsgd / qpr_sgd (qprsgd/algorithms/aggregation.py).

* The transport's new operations (``alltoall_bytes``, ``allreduce_sum_int``, ``allreduce_max``):
  results in rank order, exact integer sums, counts per channel.
* ``reduce_scatter`` and ``summable`` runs (in-process, M = 1, 2, 4) equal single-process
  references of their equations (Oracles: same gradients, same draws) ≤ 1e-6 relative, with the
  logged bytes equal to the references' payloads at every row.
* Unbiasedness and variance (Monte Carlo over draws, M = 4): reduce_scatter with the unbiased
  qsgd codec, summable (exact variance formula).
* A summable config whose code sum could overflow is refused naming algorithm.levels/width.
* The network model's alltoall cost and its re-timing from a log's channel counts.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import final_params, run_many
from qprsgd import config
from qprsgd import network as nw
from qprsgd.algorithms.aggregation import (ReduceScatterMean, SummableMean, check_summable, chunk_blocks,
                                           chunk_bounds)
from qprsgd.inprocess import WorkerFailed, run_workers
from qprsgd.logger import CHANNELS, read
from qprsgd.registry import CODECS
from reference import Oracles, rel_err


# ---------------------------------------------------------------------------------------------
# transport operations

def test_transport_alltoall_intsum_max_counted():
    M = 3

    def target(t):
        sends = [np.full(t.rank + j + 1, 10 * t.rank + j, np.uint8) for j in range(M)]
        got = t.alltoall_bytes(sends)
        ints = np.array([100, -7, 2 ** 12], np.int16) * (t.rank + 1)
        t.allreduce_sum_int(ints)
        mx = t.allreduce_max([float(t.rank), -float(t.rank)])
        with pytest.raises(ValueError, match="signed integer"):
            t.allreduce_sum_int(np.zeros(2, np.float32))
        return [g.tolist() for g in got], ints.tolist(), mx.tolist(), dict(t.ledger.bytes), dict(t.ledger.messages)
    for r, (got, ints, mx, b, m) in enumerate(run_workers(M, target, timeout=60)):
        assert got == [[10 * i + r] * (i + r + 1) for i in range(M)]       # from rank i, rank order
        assert ints == [600, -42, 6 * 2 ** 12]
        assert mx == [2.0, 0.0]
        assert b["alltoall"] == sum(r + j + 1 for j in range(M) if j != r) and m["alltoall"] == M - 1
        assert b["allreduce"] == 6 + 16 and m["allreduce"] == 2


def test_chunks():
    assert chunk_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert chunk_blocks((4, 2, 4), 3, 6) == (1, 2)
    assert chunk_blocks((4, 2, 4), 6, 8) == (2,)


# ---------------------------------------------------------------------------------------------
# runs against references

def cfg(alg: dict, codec=None, **train) -> dict:
    t = {"epochs": 1, "batch_size": 8, "lr": 0.2, "eval_every": 1000, "log_every": 1, "weight_decay": 0.01,
         "schedule": {"kind": "step", "milestones": [0.5], "gamma": 0.1}}
    t.update(train)
    c = {"seed": 4, "run": {"progress": False}, "train": t, "model": {"name": "mlp", "hidden": [6]},
         "data": {"name": "digits", "params": {"max_train": 288, "max_test": 40}}, "algorithm": alg}
    if codec is not None:
        c["codec"] = codec
    return c


CONFIGS = {
    "qsgd_rs": cfg({"name": "qsgd", "aggregation": "reduce_scatter"}),
    "qpr_rs": cfg({"name": "qpr_sgd", "K": 3, "aggregation": "reduce_scatter"}),
    "qpr_rs_id": cfg({"name": "qpr_sgd", "K": 3, "aggregation": "reduce_scatter"}, {"name": "identity"}),
    "qsgd_sum": cfg({"name": "qsgd", "aggregation": "summable", "levels": 3, "width": 8}),
    "qpr_sum": cfg({"name": "qpr_sgd", "K": 3, "aggregation": "summable", "levels": 20, "width": 16}),
    "pr": cfg({"name": "pr_sgd", "K": 3}),
}


def ref_rs_mean(o: Oracles, V: list, M: int):
    """Equations of reduce_scatter over the M rows of V; returns (mean, bytes per worker, nbits)."""
    c = o.cfg.codec
    f = CODECS.get(c.name).factory
    bounds = chunk_bounds(o.d, M)
    codecs = [f(hi - lo, chunk_blocks(o.flat.blocks, lo, hi), **c.kwargs()) for lo, hi in bounds]
    P = [[codecs[j].encode(V[i][lo:hi], o.rngs[i]) for j, (lo, hi) in enumerate(bounds)] for i in range(M)]
    out = np.empty(o.d, np.float32)
    sent = np.zeros(M, np.int64)
    nbits = 0
    for j, (lo, hi) in enumerate(bounds):
        S = np.zeros(hi - lo, np.float32)
        for i in range(M):
            S += codecs[j].decode(P[i][j].data)
            nbits += P[i][j].nbits
            if i != j:
                sent[i] += P[i][j].nbytes
        q = codecs[j].encode(S, o.rngs[j])
        nbits += q.nbits
        sent[j] += q.nbytes
        out[lo:hi] = codecs[j].decode(q.data)
    out /= np.float32(M)
    return out, int(sent.sum()) if M > 1 else 0, nbits


def ref_sum_mean(V: list, rngs, M: int, levels: int, width: int):
    s = max(float(np.max(np.abs(v))) for v in V)
    total = np.zeros(V[0].size, np.int64)
    if s > 0:
        for i in range(M):
            total += np.floor((V[i].astype(np.float64) / s) * levels + rngs[i].random(V[i].size)).astype(np.int64)
    assert np.abs(total).max() <= 2 ** (width - 1) - 1
    out = (total.astype(np.float64) * (s / levels) / M).astype(np.float32)
    return out, (M * (V[0].size * width // 8 + 8) if M > 1 else 0), M * V[0].size * width


def ref_run(o: Oracles, name: str):
    """(X, per-step cumulative (bytes, payload bits)) for qsgd (K = 1, gradient) or qpr_sgd."""
    alg = o.cfg.algorithm.kwargs()
    K = alg.get("K", 1)
    wd = o.cfg.train.weight_decay
    M = o.M
    X, xt = o.X0(), o.x0.copy()
    cum, nb, bits = [], 0, 0
    for t in range(o.total_steps):
        G = []
        for i in range(M):
            g = o.grad(i, X[i]) + np.float32(wd) * X[i]
            G.append(g)
            if name.startswith("qpr"):
                X[i] -= np.float32(o.lr(t)) * g
        if name.startswith("qpr") and (t + 1) % K != 0:
            cum.append((nb, bits))
            continue
        V = [xt - X[i] for i in range(M)] if name.startswith("qpr") else G
        if alg["aggregation"] == "reduce_scatter":
            mean, b, n = ref_rs_mean(o, V, M)
        else:
            mean, b, n = ref_sum_mean(V, o.rngs, M, alg["levels"], alg["width"])
        nb, bits = nb + b, bits + n
        if name.startswith("qpr"):
            xt -= mean
            X[:] = xt
        else:
            X -= np.float32(o.lr(t)) * mean
        cum.append((nb, bits))
    return X, np.array(cum)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_runs_equal_references(M, tmp_path):
    cfgs = dict(CONFIGS)
    if M != 4:
        cfgs.pop("qpr_rs_id")
    h5 = run_many(M, cfgs, tmp_path)
    for name in [k for k in cfgs if k != "pr"]:
        o = Oracles(cfgs[name], M)
        assert o.total_steps >= 9 and o.lr(o.total_steps - 1) < o.lr(0)
        X, cum = ref_run(o, name)
        got = final_params(h5[name])
        assert rel_err(got, X) <= 1e-6, (name, rel_err(got, X))
        m = read(str(h5[name]))["metrics"]
        steps = m["step"]
        np.testing.assert_array_equal(m["bits_sent"], 8 * cum[steps - 1, 0], err_msg=name)
        np.testing.assert_array_equal(m["payload_bits"], cum[steps - 1, 1], err_msg=name)
        cb = m["channel_bytes"]
        used = {"alltoall", "allgather"} if "rs" in name else {"allreduce"}
        assert not np.delete(cb, [CHANNELS.index(c) for c in used], axis=1).any(), name
        if M > 1:
            assert all(cb[-1, CHANNELS.index(c)] > 0 for c in used), name
    if M == 4:
        # reduce_scatter with Q = identity is PR-SGD up to float rounding (chunk sums in rank order)
        assert rel_err(final_params(h5["qpr_rs_id"]), final_params(h5["pr"])) <= 1e-5
        # and the quantization is in effect: the qsgd runs differ from it
        assert rel_err(final_params(h5["qpr_rs"]), final_params(h5["pr"])) > 1e-4
        m = read(str(h5["qpr_rs_id"]))["metrics"]
        d = Oracles(cfgs["pr"], M).d
        # identity: per worker per round (M−1)/M·4d alltoall + 4d/M allgather = 4d bytes in all
        assert m["bits_sent"][-1] == 8 * 4 * d * M * m["rounds"][-1]


# ---------------------------------------------------------------------------------------------
# unbiasedness and variance

def _trials(agg_factory, V: np.ndarray, n: int, seed: int):
    """n aggregations of the rows of V on len(V) in-process workers; returns (n, d) results (rank 0)."""
    M = V.shape[0]

    def target(t):
        agg = agg_factory()
        rng = np.random.default_rng([seed, t.rank])
        out = np.empty((n, V.shape[1]))
        for k in range(n):
            out[k] = agg.mean(t, V[t.rank].copy(), rng)
        return out
    res = run_workers(M, target, timeout=120)
    for r in res[1:]:
        np.testing.assert_array_equal(r, res[0])        # identical on every worker
    return res[0]


def test_reduce_scatter_unbiased_and_variance():
    M, d, n = 4, 10, 800
    rng = np.random.default_rng(0)
    V = rng.normal(size=(M, d)).astype(np.float32)
    f = CODECS.get("qsgd").factory
    out = _trials(lambda: ReduceScatterMean(lambda dd, b: f(dd, b, s=2), d, (d,), M), V, n, 1)
    vbar = V.astype(np.float64).mean(0)
    se = out.std(0) / np.sqrt(n)
    z = np.abs(out.mean(0) - vbar) / se
    assert z.max() < 4.5, z                               # unbiased (d = 10 coordinates, 4.5 σ)
    # variance bound of docs/algorithms-allreduce.md: ω = min(d_j/s², √d_j/s) per chunk
    om = max(min((hi - lo) / 4, np.sqrt(hi - lo) / 2) for lo, hi in chunk_bounds(d, M))
    bound = om * (1 + om) / M ** 2 * float((V.astype(np.float64) ** 2).sum()) + om * float(vbar @ vbar)
    var = float(((out - vbar) ** 2).sum(1).mean())
    assert 0 < var <= bound, (var, bound)


def test_summable_unbiased_and_exact_variance():
    M, d, n, L = 4, 12, 1500, 2
    rng = np.random.default_rng(1)
    V = rng.normal(size=(M, d)).astype(np.float32)
    out = _trials(lambda: SummableMean(d, L, 8, M), V, n, 2)
    vbar = V.astype(np.float64).mean(0)
    s = float(np.abs(V).max())
    y = V.astype(np.float64) / s * L
    p = y - np.floor(y)
    var_coord = (s / L) ** 2 * (p * (1 - p)).sum(0) / M ** 2          # exact per coordinate
    emp = out.var(0)
    z = np.abs(out.mean(0) - vbar) / np.sqrt(var_coord / n)
    assert z.max() < 4.5, z
    # empirical variance matches the formula (relative error of a variance estimate ~ √(2/n))
    np.testing.assert_allclose(emp.sum(), var_coord.sum(), rtol=6 * np.sqrt(2 / n) + 0.02)
    assert var_coord.sum() <= d * s ** 2 / (4 * L ** 2 * M)


def test_summable_overflow_refused(tmp_path):
    check_summable(1, 8, 127)
    with pytest.raises(ValueError, match=r"algorithm\.levels = 1 with algorithm\.width = 8 cannot sum 128"):
        check_summable(1, 8, 128)
    with pytest.raises(ValueError, match=r"at most 6553 workers"):
        check_summable(5, 16, 7000)
    # through a run: every worker refuses at build time, naming the keys
    c = cfg({"name": "qsgd", "aggregation": "summable", "levels": 50, "width": 8})
    with pytest.raises(WorkerFailed, match=r"algorithm\.levels = 50 with algorithm\.width = 8"):
        _build_only(3, c, tmp_path)


def _build_only(M, raw, tmp):
    from qprsgd.experiment import build
    conf = config.validate(raw)
    run_workers(M, lambda t: build(conf, t, out_dir=str(tmp)) and None, timeout=60)


def test_config_keys():
    ok = config.validate({"algorithm": {"name": "qpr_sgd", "aggregation": "summable", "levels": 4, "width": 32}})
    assert ok.codec is None and ok.algorithm.kwargs()["aggregation"] == "summable"
    assert config.validate({"algorithm": {"name": "qsgd"}}).algorithm.kwargs()["aggregation"] == "allgather"
    for raw, pat in [({"algorithm": {"name": "qsgd", "aggregation": "ring"}}, r"algorithm\.aggregation"),
                     ({"algorithm": {"name": "qsgd", "levels": 3}}, r"algorithm\.levels only apply"),
                     ({"algorithm": {"name": "qsgd", "aggregation": "summable", "width": 12}}, r"width must be one of"),
                     ({"algorithm": {"name": "qsgd", "aggregation": "summable"}, "codec": {"name": "qsgd"}},
                      r"codec: algorithm\.aggregation = 'summable'")]:
        with pytest.raises(config.ConfigError, match=pat):
            config.validate(raw)


# ---------------------------------------------------------------------------------------------
# network model

def test_alltoall_cost_and_retiming():
    net = nw.Network.simple(8e6, 1e-3)          # β = 1e-6 s/byte
    sizes = [[0, 100, 200], [300, 0, 100], [100, 100, 0]]
    # node 0 sends 300 receives 400; node 1 sends 400 receives 200; node 2 sends 200 receives 300
    assert net.alltoall(sizes) == pytest.approx(2e-3 + 400e-6)
    # re-timing: one alltoall of equal chunks n on M ranks: (M−1)α + (M−1) n β
    M, n = 4, 1000.0
    cb = np.zeros((1, len(CHANNELS)))
    cm = np.zeros((1, len(CHANNELS)))
    cb[0, CHANNELS.index("alltoall")] = M * (M - 1) * n
    cm[0, CHANNELS.index("alltoall")] = M * (M - 1)
    log = {"attrs": {"world_size": M, "workers": list(range(M))},
           "metrics": {"channel_bytes": cb, "channel_messages": cm, "step": np.array([1]),
                       "t_compute": np.zeros(1), "t_codec": np.zeros(1), "t_comm": np.zeros(1),
                       "t_step": np.zeros(1), "_attrs": {"channel_bytes": {"channels": ",".join(CHANNELS)}}}}
    T = nw.row_terms(log)
    assert T.comm(net)[0] == pytest.approx(net.alltoall(np.full((M, M), n)))
