"""PSGD and PR-SGD under real MPI equal single-process references of their update equations."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import final_params, run_many
from reference import Oracles, rel_err

pytestmark = pytest.mark.mpi


def base_cfg(alg: dict, **train) -> dict:
    t = {"epochs": 1, "batch_size": 8, "lr": 0.2, "eval_every": 1000, "log_every": 5,
         "schedule": {"kind": "step", "milestones": [0.5], "gamma": 0.1}}
    t.update(train)
    return {"seed": 3, "run": {"progress": False}, "train": t, "model": {"name": "mlp", "hidden": [16]},
            "data": {"name": "digits", "params": {"max_train": 400, "max_test": 100}}, "algorithm": alg}


def ref_psgd(o: Oracles) -> np.ndarray:
    """x_{t+1} = x_t − γ_t (1/M) Σ_i ∇f_i(x_t; ξ_{t,i})."""
    x = o.x0.copy()
    for t in range(o.total_steps):
        G = np.stack([o.grad(i, x) for i in range(o.M)])
        x -= np.float32(o.lr(t)) * (G.sum(0, dtype=np.float32) / np.float32(o.M))
    return np.tile(x, (o.M, 1))


def ref_prsgd(o: Oracles, K: int, phase: str = "end") -> np.ndarray:
    """K local steps x_i ← x_i − γ∇f_i(x_i), then X ← X J (average)."""
    X = o.X0()
    for t in range(o.total_steps):
        for i in range(o.M):
            X[i] -= np.float32(o.lr(t)) * o.grad(i, X[i])
        if ((t + 1) % K == 0) if phase == "end" else (t % K == 0):
            X[:] = X.sum(0, dtype=np.float32) / np.float32(o.M)
    return X


@pytest.mark.parametrize("n", [1, 2, 4])
def test_psgd_and_prsgd_equal_reference(n, tmp_path):
    cfgs = {
        "psgd": base_cfg({"name": "psgd"}),
        "pr1": base_cfg({"name": "pr_sgd", "K": 1}),
        "pr3": base_cfg({"name": "pr_sgd", "K": 3}),
        "pr3k0": base_cfg({"name": "pr_sgd", "K": 3, "avg_phase": "k0"}),
    }
    h5 = run_many(n, cfgs, tmp_path)
    got = {k: final_params(v) for k, v in h5.items()}
    o = Oracles(cfgs["psgd"], n)
    assert o.total_steps >= 6  # several steps, across the lr drop at half an epoch
    ref = ref_psgd(o)
    assert rel_err(got["psgd"], ref) <= 1e-6
    # K = 1: PR-SGD with plain SGD is PSGD
    assert rel_err(got["pr1"], ref) <= 1e-6
    assert rel_err(got["pr3"], ref_prsgd(Oracles(cfgs["pr3"], n), 3)) <= 1e-6
    assert rel_err(got["pr3k0"], ref_prsgd(Oracles(cfgs["pr3k0"], n), 3, "k0")) <= 1e-6
    if n > 1:
        # a wrong reference must fail: K = 3 iterates are not PSGD's
        assert rel_err(got["pr3"], ref) > 1e-4
