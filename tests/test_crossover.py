"""The crossover-bandwidth solver (qprsgd/crossover.py) on inputs with known answers, the pattern
costs against the network model, the extrapolation in M, and the table in ``qprsgd report``."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run_many
from qprsgd import crossover as cx
from qprsgd import network as nw


def T(C, L, N, B, alpha=0.0):
    return C + alpha * L + N * nw.Link(alpha, B).beta


@pytest.mark.parametrize("alpha", [0.0, 1e-3])
def test_solver_known_answers(alpha):
    # a: 2 s more local work, 9e8 fewer bytes, 10 more latency terms
    Ca, La, Na, Cb, Lb, Nb = 12.0, 30.0, 1e8, 10.0, 20.0, 1e9
    c = cx.crossover(Ca, La, Na, Cb, Lb, Nb, alpha)
    assert c.faster == "below"
    assert c.bandwidth == pytest.approx(8 * 9e8 / (2.0 + 10 * alpha))
    assert T(Ca, La, Na, c.bandwidth, alpha) == pytest.approx(T(Cb, Lb, Nb, c.bandwidth, alpha))
    assert T(Ca, La, Na, 0.5 * c.bandwidth, alpha) < T(Cb, Lb, Nb, 0.5 * c.bandwidth, alpha)
    assert T(Ca, La, Na, 2 * c.bandwidth, alpha) > T(Cb, Lb, Nb, 2 * c.bandwidth, alpha)
    assert cx.crossover(9.0, 0, 1e8, 10.0, 0, 1e9).faster == "always"
    assert cx.crossover(11.0, 0, 2e9, 10.0, 0, 1e9).faster == "never"
    up = cx.crossover(5.0, 0, 2e9, 10.0, 0, 1e9)            # less local work, more bytes
    assert up.faster == "above" and up.bandwidth == pytest.approx(8 * 1e9 / 5.0)
    assert T(5.0, 0, 2e9, 2 * up.bandwidth) < T(10.0, 0, 1e9, 2 * up.bandwidth)
    # efficiency e scales the crossover by 1/e
    assert cx.crossover(Ca, 0, Na, Cb, 0, Nb, efficiency=0.5).bandwidth == pytest.approx(2 * 8 * 9e8 / 2.0)


def test_pattern_terms_match_network_model():
    net = nw.Network.simple(8e6, 1e-3)
    a, b = net.link.latency, net.link.beta
    for M in (2, 5, 16):
        n = 1200.0
        L, N = cx.pattern_terms("ring_allreduce", M, n)
        assert a * L + b * N == pytest.approx(net.ring_allreduce(n, M))
        L, N = cx.pattern_terms("allgather", M, n)
        assert a * L + b * N == pytest.approx(net.allgather([n] * M))
        L, N = cx.pattern_terms("reduce_scatter", M, n)
        chunk = n / M
        assert a * L + b * N == pytest.approx(net.alltoall(np.full((M, M), chunk)) + net.allgather([chunk] * M))
        L, N = cx.pattern_terms("summable", M, n)
        assert a * L + b * N == pytest.approx(net.ring_allreduce(8, M) + net.ring_allreduce(n - 8, M))


def test_extrapolation_allgather_stops_paying_reduce_scatter_does_not():
    """QSGD at b = 3.3 bits/element against fp32 ring all-reduce: allgather's byte term (M−1)·b/8
    overtakes 2(M−1)/M·4 at M ≥ 2·32/3.3 ≈ 19.4 workers; reduce_scatter's 2(M−1)/M·b/8 never does."""
    d, R, M0 = 1_000_000, 100, 4
    b = 3.3

    def prof(label, pattern, n, C):
        L, N = cx.pattern_terms(pattern, M0, n)
        return cx.Profile(label, pattern, M0, C, R, n, R * L, R * N)
    psgd = prof("psgd", "ring_allreduce", 4.0 * d, 10.0)
    ag = prof("qsgd", "allgather", b * d / 8, 12.0)
    rs = prof("qsgd_rs", "reduce_scatter", b * d / 8, 14.0)
    rows = {r["label"]: r for r in cx.table([psgd, ag, rs], psgd, Ms=(16, 19, 20, 64, 1024))}
    assert rows["qsgd"]["at"][16].faster == "below"
    assert rows["qsgd"]["at"][19].faster == "below" and rows["qsgd"]["at"][20].faster == "never"
    assert rows["qsgd"]["at"][64].faster == "never"
    for M in (4, 16, 64, 1024):
        assert rows["qsgd_rs"]["at"][M].faster == "below"
    # known value at M = 1024: ΔN = R·2(M−1)/M·(4 − b/8)·d, ΔC = 4 s
    M = 1024
    want = 8 * R * 2 * (M - 1) / M * (4 - b / 8) * d / 4.0
    assert rows["qsgd_rs"]["at"][M].bandwidth == pytest.approx(want)
    # summable widens its integers with M: width 8, L = 1 holds 127 workers; at 1024 int16
    sm = cx.Profile("sum", "summable", 4, 11.0, R, d + 8.0, 0, 0, levels=1, width=8)
    L, N = sm.terms_at(1024)
    assert N == pytest.approx(R * 2 * 1023 / 1024 * (2 * d + 8))
    assert cx.summable_width(127, 1) == 8 and cx.summable_width(128, 1) == 16


def test_report_prints_crossover_table(tmp_path):
    from qprsgd.report import report_sweep
    base = {"seed": 2, "run": {"progress": False},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.3, "eval_every": 3, "log_every": 1},
            "model": {"name": "mlp", "hidden": [8]},
            "data": {"name": "digits", "params": {"max_train": 160, "max_test": 60}}}
    cfgs = {"psgd": {**base, "algorithm": {"name": "psgd"}},
            "qsgd_rs": {**base, "algorithm": {"name": "qsgd", "aggregation": "reduce_scatter"}}}
    run_many(2, cfgs, tmp_path)
    s = report_sweep(str(tmp_path))     # target: the best accuracy both runs reach
    assert "Crossover bandwidth vs `psgd`" in s["markdown"]
    row = next(r for r in s["crossover"] if r["label"].startswith("qsgd"))
    assert row["pattern"] == "reduce_scatter" and row["M"] == 2
    assert set(row["at"]) == {"2", "16", "64", "256", "1024"}
    assert s["crossover_figure"].endswith("crossover_bandwidth.png")
    import os
    assert os.path.getsize(s["crossover_figure"]) > 1000
