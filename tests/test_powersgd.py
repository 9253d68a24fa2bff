"""PowerSGD (Vogels et al. 2019, Algorithms 1–2) against a single-process reference.

* In-process runs at M = 1, 2, 4 (rank 1 and 2, with start-up steps, momentum, weight decay,
  across a learning-rate drop) equal the paper's equations applied to the same gradients,
  ≤ 1e-6 relative; the workers' models are identical.
* Logged bytes: both all-reduce rounds, 4·(Σ n r + 1-D sizes) + 4·Σ m r per worker and
  compressed step (4d during start-up), at every row.
* Orthogonalisation: orthonormal columns, deterministic, zero columns stay zero.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import final_params, run_many
from qprsgd import config
from qprsgd.algorithms.powersgd import PowerSGD, orthogonalize
from qprsgd.logger import CHANNELS, read
from reference import Oracles, rel_err


def cfg(rank=1, start=0, momentum=0.9, **train) -> dict:
    t = {"epochs": 1, "batch_size": 8, "lr": 0.05, "eval_every": 1000, "log_every": 1, "weight_decay": 0.01,
         "schedule": {"kind": "step", "milestones": [0.5], "gamma": 0.1}}
    t.update(train)
    return {"seed": 6, "run": {"progress": False}, "train": t, "model": {"name": "mlp", "hidden": [6]},
            "data": {"name": "digits", "params": {"max_train": 288, "max_test": 40}},
            "algorithm": {"name": "powersgd", "rank": rank, "start_steps": start, "momentum": momentum}}


CONFIGS = {"r1": cfg(1), "r2_start": cfg(2, start=3, momentum=0.5)}


def ref_orth(P):
    A = P.astype(np.float64)
    for k in range(A.shape[1]):
        for j in range(k):
            A[:, k] -= float(A[:, j] @ A[:, k]) * A[:, j]
        n = np.sqrt(A[:, k] @ A[:, k])
        A[:, k] = A[:, k] / n if n > 0 else 0.0
    return A.astype(np.float32)


def ref_powersgd(o: Oracles):
    """The paper's equations, M workers in one process; all-reduce mean = Σ in rank order ÷ M."""
    a = o.cfg.algorithm.kwargs()
    r, lam, start = a["rank"], a["momentum"], a["start_steps"]
    wd = o.cfg.train.weight_decay
    M, d = o.M, o.d
    shapes, blocks = o.flat.shapes, o.flat.blocks
    offs = np.concatenate([[0], np.cumsum(blocks)])
    mats = [(int(offs[k]), s[0], int(blocks[k]) // s[0]) for k, s in enumerate(shapes) if len(s) >= 2]
    vecs = [(int(offs[k]), int(blocks[k])) for k, s in enumerate(shapes) if len(s) < 2]
    g_ = np.random.default_rng([o.cfg.seed, 7])
    Qs = [g_.standard_normal((m, min(r, n, m))).astype(np.float32) for _, n, m in mats]
    x = o.x0.copy()
    E = np.zeros((M, d), np.float32)
    mom = np.zeros(d, np.float32)

    def mean(rows):
        acc = rows[0].copy()
        for v in rows[1:]:
            acc += v
        return acc / np.float32(M)
    cum, nb = [], 0
    for t in range(o.total_steps):
        G = [o.grad(i, x) + np.float32(wd) * x for i in range(M)]
        if t < start:
            dp = mean(G)
            nb += M * 4 * d
        else:
            D = [G[i] + E[i] for i in range(M)]
            dp = np.empty(d, np.float32)
            for k, (off, n, m) in enumerate(mats):
                Mi = [Di[off:off + n * m].reshape(n, m) for Di in D]
                P = mean([Mi[i] @ Qs[k] for i in range(M)])
                Ph = ref_orth(P)
                Qs[k] = mean([Mi[i].T @ Ph for i in range(M)])
                dp[off:off + n * m] = (Ph @ Qs[k].T).reshape(-1)
                nb += M * 4 * (n + m) * Qs[k].shape[1]
            for off, s in vecs:
                dp[off:off + s] = mean([Di[off:off + s] for Di in D])
                nb += M * 4 * s
            for i in range(M):
                E[i] = D[i] - dp
                for off, s in vecs:
                    E[i][off:off + s] = 0
        mom = np.float32(lam) * mom + dp
        x -= np.float32(o.lr(t)) * (dp + mom)
        cum.append(nb if M > 1 else 0)
    return np.tile(x, (M, 1)), np.array(cum)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_powersgd_equals_reference(M, tmp_path):
    h5 = run_many(M, CONFIGS, tmp_path)
    for name, c in CONFIGS.items():
        o = Oracles(c, M)
        assert o.total_steps >= 9 and o.lr(o.total_steps - 1) < o.lr(0)
        X, cum = ref_powersgd(o)
        got = final_params(h5[name])
        assert rel_err(got, X) <= 1e-6, (name, rel_err(got, X))
        np.testing.assert_array_equal(got, np.tile(got[0], (M, 1)))     # same model on every worker
        m = read(str(h5[name]))["metrics"]
        np.testing.assert_array_equal(m["bits_sent"], 8 * cum[m["step"] - 1], err_msg=name)
        ar = CHANNELS.index("allreduce")
        assert not np.delete(m["channel_bytes"], ar, axis=1).any()
        if M > 1:
            # two all-reduce rounds per compressed step, one per start-up step
            s = c["algorithm"]["start_steps"]
            assert m["channel_messages"][-1, ar] == M * (s + 2 * (o.total_steps - s))
            assert name != "r1" or m["bits_sent"][-1] < 0.5 * 32 * o.d * M * o.total_steps   # it compresses
    # compression is in effect: rank 1 differs from plain momentum SGD on the mean gradient
    assert rel_err(final_params(h5["r1"]), final_params(h5["r2_start"])) > 1e-4


def test_orthogonalize():
    rng = np.random.default_rng(0)
    P = rng.normal(size=(7, 3)).astype(np.float32)
    Ph = orthogonalize(P)
    np.testing.assert_allclose(Ph.T.astype(np.float64) @ Ph, np.eye(3), atol=1e-6)
    np.testing.assert_array_equal(Ph, orthogonalize(P.copy()))
    # span preserved: P = Ph R with R upper triangular
    R = Ph.T.astype(np.float64) @ P
    np.testing.assert_allclose(np.tril(R, -1), 0, atol=1e-5)
    Z = np.zeros((4, 2), np.float32)
    Z[:, 0] = 1
    assert not orthogonalize(Z)[:, 1].any()


def test_bytes_and_config():
    # mlp [6] on digits: W1 6×64, b1, W2 10×6, b2: rank 2 → P: 6·2 + 10·2 + 6 + 10, Q: 64·2 + 6·2
    p, q = PowerSGD.bytes_per_round((384, 6, 60, 10), ((6, 64), (6,), (10, 6), (10,)), 2)
    assert (p, q) == (4 * (12 + 20 + 16), 4 * (128 + 12))
    assert config.validate({"algorithm": {"name": "powersgd"}}).algorithm.kwargs() == \
        {"rank": 2, "momentum": 0.9, "start_steps": 0}
    for bad, key in [({"rank": 0}, "algorithm.rank"), ({"momentum": 1.0}, "algorithm.momentum"),
                     ({"start_steps": -1}, "algorithm.start_steps")]:
        with pytest.raises(config.ConfigError, match=key):
            config.validate({"algorithm": {"name": "powersgd", **bad}})
    with pytest.raises(config.ConfigError, match="codec"):
        config.validate({"algorithm": {"name": "powersgd"}, "codec": {"name": "qsgd"}})
