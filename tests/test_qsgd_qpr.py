"""QSGD and Quantized-PR-SGD (quantized-pr-sgd §3.2, Algorithm 1) under real MPI.

* Each equals a single-process reference of its equations over the same gradients and the same
  codec draws (``Oracles.codec()``, ``Oracles.rngs[rank]`` in the runner's call order), on 1, 2
  and 4 ranks, across a learning-rate drop, ≤ 1e-6 relative.
* ``qpr_sgd`` with the ``identity`` codec equals ``pr_sgd``.
* Logged bits (``metrics/bits_sent``, ``channel_bytes``, ``payload_bits``) equal the bytes of the
  payloads that were handed to MPI, at every logged step.
* A run SIGKILLed after a checkpoint and resumed is bit-identical to an uninterrupted run.

All runs of one rank count go through ONE ``run_many`` job (module-scoped cache).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import final_params, run_many
from qprsgd import config
from qprsgd.logger import CHANNELS, read
from qprsgd.registry import CODECS
from reference import Oracles, rel_err
from resume_util import check_kill_resume, check_stop_resume

pytestmark = pytest.mark.mpi

HAVE_QSGD = "qsgd" in CODECS.names()
NEEDS_QSGD = pytest.mark.skipif(not HAVE_QSGD, reason="codec 'qsgd' not registered yet (issue 8)")
RANKS = [1, 2, 4]
WD = 0.01


def base_cfg(alg: dict, codec: dict, **train) -> dict:
    t = {"epochs": 1, "batch_size": 8, "lr": 0.2, "eval_every": 1000, "log_every": 1,
         "schedule": {"kind": "step", "milestones": [0.5], "gamma": 0.1}}
    t.update(train)
    return {"seed": 3, "run": {"progress": False}, "train": t, "model": {"name": "mlp", "hidden": [16]},
            "data": {"name": "digits", "params": {"max_train": 300, "max_test": 60}},
            "algorithm": alg, "codec": codec}


ID = {"name": "identity"}
QS = {"name": "qsgd"}


def configs() -> dict:
    c = {
        "qsgd_id": base_cfg({"name": "qsgd"}, ID),
        "qpr_id": base_cfg({"name": "qpr_sgd", "K": 3}, ID),
        "pr": {k: v for k, v in base_cfg({"name": "pr_sgd", "K": 3}, ID).items() if k != "codec"},
        "qpr_id_k0_wd": base_cfg({"name": "qpr_sgd", "K": 3, "avg_phase": "k0"}, ID, weight_decay=WD),
    }
    if HAVE_QSGD:
        c["qsgd_q_wd"] = base_cfg({"name": "qsgd"}, QS, weight_decay=WD)
        c["qpr_q"] = base_cfg({"name": "qpr_sgd", "K": 3}, QS)
    return c


def resume_cfg(alg: dict) -> dict:
    # short and tiny (d = 310): qsgd's decoder walks each payload segment record by record.
    # K = 3 with checkpoints every 10 steps: the kill lands mid-round, so x̃ must be restored.
    return {"seed": 5, "run": {"progress": False},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.05, "eval_every": 15, "log_every": 4,
                      "checkpoint_every": 10, "weight_decay": WD,
                      "schedule": {"kind": "step", "milestones": [1]}},
            "model": {"name": "mlp", "hidden": [4]},
            "data": {"name": "digits", "params": {"max_train": 300, "max_test": 60}}, "algorithm": alg,
            "codec": QS if HAVE_QSGD else ID}


RESUME = {"resume_qsgd": resume_cfg({"name": "qsgd"}), "resume_qpr": resume_cfg({"name": "qpr_sgd", "K": 3})}

_cache: dict = {}


def _get_runs(n: int, tmp_path_factory):
    """(n, configs, {name: run.h5}): every config run on n ranks in ONE mpiexec job, once per session."""
    if n not in _cache:
        cfgs = configs()
        if n == 2:
            cfgs.update(RESUME)  # the uninterrupted references of the resume tests
        tmp = tmp_path_factory.mktemp(f"qsgd_qpr_n{n}")
        _cache[n] = (n, cfgs, run_many(n, cfgs, tmp, timeout=300))
    return _cache[n]


@pytest.fixture(scope="module", params=RANKS)
def runs(request, tmp_path_factory):
    return _get_runs(request.param, tmp_path_factory)


# -- references: the equations, one row per worker ------------------------------------------
def _mean_decoded(codec, payloads, d):
    acc = np.zeros(d, dtype=np.float32)
    for p in payloads:                      # rank order 0..M−1
        acc += codec.decode(p.data)
    return acc / np.float32(len(payloads))


def ref_qsgd(o: Oracles, wd: float = 0.0):
    """x ← x − γ_t (1/M) Σ_i Q(∇f_i(x) + λx).  Returns (X, per-step cumulative (bytes, nbits))."""
    codec, x = o.codec(), o.x0.copy()
    cum, nbytes, nbits = [], 0, 0
    for t in range(o.total_steps):
        P = []
        for i, r in enumerate(o.roles.workers):
            g = o.grad(i, x)
            if wd:
                g = g + wd * x
            P.append(codec.encode(g, o.rngs[r]))
        x -= np.float32(o.lr(t)) * _mean_decoded(codec, P, o.d)
        nbytes += sum(p.nbytes for p in P)
        nbits += sum(p.nbits for p in P)
        cum.append((nbytes, nbits))
    return np.tile(x, (o.M, 1)), np.array(cum)


def ref_qpr(o: Oracles, K: int, phase: str = "end", wd: float = 0.0):
    """K local steps x_i ← x_i − γ_t(∇f_i(x_i) + λx_i) from x̃; g_i = Q(x̃ − x_i); x̃ ← x̃ − mean g; X = x̃."""
    codec, X, xt = o.codec(), o.X0(), o.x0.copy()
    cum, nbytes, nbits = [], 0, 0
    for t in range(o.total_steps):
        for i in range(o.M):
            g = o.grad(i, X[i])
            if wd:
                g = g + wd * X[i]
            X[i] -= np.float32(o.lr(t)) * g
        if ((t + 1) % K == 0) if phase == "end" else (t % K == 0):
            P = [codec.encode(xt - X[i], o.rngs[r]) for i, r in enumerate(o.roles.workers)]
            xt -= _mean_decoded(codec, P, o.d)
            X[:] = xt
            nbytes += sum(p.nbytes for p in P)
            nbits += sum(p.nbits for p in P)
        cum.append((nbytes, nbits))
    return X, np.array(cum)


REFS = {
    "qsgd_id": lambda o: ref_qsgd(o),
    "qpr_id": lambda o: ref_qpr(o, 3),
    "qpr_id_k0_wd": lambda o: ref_qpr(o, 3, "k0", WD),
    "qsgd_q_wd": lambda o: ref_qsgd(o, WD),
    "qpr_q": lambda o: ref_qpr(o, 3),
}


def _check_bits(h5, o: Oracles, cum: np.ndarray):
    """Every logged row: bits = 8 × payload bytes handed to MPI, all in the allgather channel."""
    m = read(str(h5))["metrics"]
    steps = m["step"]
    assert len(steps) == o.total_steps                       # log_every = 1
    wire = cum[steps - 1, 0] if o.M > 1 else np.zeros(len(steps), np.int64)  # one rank: nothing crosses MPI
    np.testing.assert_array_equal(m["bits_sent"], 8 * wire)
    ag = CHANNELS.index("allgather")
    np.testing.assert_array_equal(m["channel_bytes"][:, ag], wire)
    others = np.delete(m["channel_bytes"], ag, axis=1)
    assert not others.any()
    assert not m["bits_up"].any() and not m["bits_down"].any()
    np.testing.assert_array_equal(m["payload_bits"], cum[steps - 1, 1])  # unpadded codec bits, every rank
    return m


def _compare(runs, names):
    n, cfgs, h5 = runs
    checked = 0
    for name in names:
        o = Oracles(cfgs[name], n)
        assert o.total_steps >= 9 and o.lr(o.total_steps - 1) < o.lr(0)  # several steps, across the lr drop
        X, cum = REFS[name](o)
        got = final_params(h5[name])
        assert rel_err(got, X) <= 1e-6, name
        m = _check_bits(h5[name], o, cum)
        if o.M > 1:
            assert m["bits_sent"][-1] > 0
        checked += 1
    return checked


def test_identity_codec_equals_reference(runs):
    """qsgd/qpr_sgd with identity (incl. weight decay, avg_phase k0) equal their references."""
    n, cfgs, h5 = runs
    assert _compare(runs, ["qsgd_id", "qpr_id", "qpr_id_k0_wd"]) == 3
    # identity wire: 32 d bits per worker per round (M > 1)
    o = Oracles(cfgs["qpr_id"], n)
    m = read(str(h5["qpr_id"]))["metrics"]
    assert m["rounds"][-1] == o.total_steps // 3
    assert m["bits_sent"][-1] == (32 * o.d * n * (o.total_steps // 3) if n > 1 else 0)
    mq = read(str(h5["qsgd_id"]))["metrics"]
    assert mq["rounds"][-1] == o.total_steps


@NEEDS_QSGD
def test_qsgd_codec_equals_reference(runs):
    """With the stochastic qsgd codec: same draws as Oracles.rngs[rank], ≤ 1e-6 relative."""
    n, cfgs, h5 = runs
    assert _compare(runs, ["qsgd_q_wd", "qpr_q"]) == 2
    # the quantization is really in effect: the iterates differ from the identity runs
    if n > 1:
        assert rel_err(final_params(h5["qpr_q"]), final_params(h5["qpr_id"])) > 1e-4
        m, mi = read(str(h5["qpr_q"]))["metrics"], read(str(h5["qpr_id"]))["metrics"]
        assert m["bits_sent"][-1] < 0.5 * mi["bits_sent"][-1]


def test_qpr_identity_equals_pr_sgd(runs):
    """Quantized-PR-SGD with Q = identity is PR-SGD: x̃ − mean(x̃ − x_i) = mean x_i."""
    n, cfgs, h5 = runs
    a, b = final_params(h5["qpr_id"]), final_params(h5["pr"])
    assert rel_err(a, b) <= 1e-6
    if n > 1:  # not a vacuous comparison (one worker: local SGD is SGD)
        assert rel_err(a, final_params(h5["qsgd_id"])) > 1e-4
    ma, mb = read(str(h5["qpr_id"]))["metrics"], read(str(h5["pr"]))["metrics"]
    np.testing.assert_array_equal(ma["rounds"], mb["rounds"])
    np.testing.assert_array_equal(ma["bits_sent"], mb["bits_sent"])  # 4d bytes per rank and round either way


@pytest.mark.parametrize("how", ["stop", pytest.param("kill", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(RESUME))
def test_sigkill_resume_bit_identical(name, how, tmp_path, tmp_path_factory):
    """Exact resume: stopped in-process (default run) or SIGKILLed (make test-all)."""
    n = 2
    ref = _get_runs(n, tmp_path_factory)[2][name]
    check = check_stop_resume if how == "stop" else check_kill_resume
    step = check(n, RESUME[name], tmp_path, name, ref, min_step=10)
    assert step >= 10


def test_config_defaults_and_errors():
    for alg in ("qsgd", "qpr_sgd"):
        if HAVE_QSGD:
            assert config.validate({"algorithm": {"name": alg}}).codec.name == "qsgd"
        assert config.validate({"algorithm": {"name": alg}, "codec": ID}).codec.name == "identity"
    c = config.validate({"algorithm": {"name": "qpr_sgd"}, "codec": ID})
    assert c.algorithm.kwargs() == {"K": 4, "avg_phase": "end", "aggregation": "allgather", "levels": 1,
                                    "width": 16}
    with pytest.raises(config.ConfigError, match=r"algorithm\.K"):
        config.validate({"algorithm": {"name": "qpr_sgd", "K": 0}, "codec": ID})
    with pytest.raises(config.ConfigError, match=r"algorithm\.avg_phase"):
        config.validate({"algorithm": {"name": "qpr_sgd", "avg_phase": "start"}, "codec": ID})
