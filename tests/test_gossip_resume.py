"""Every gossip algorithm, SIGKILLed after a checkpoint and resumed, ends bit-identical to an
uninterrupted run (replicas / estimates and the codec generator are in the checkpoint)."""
from __future__ import annotations

import pytest

from conftest import run_many
from resume_util import check_kill_resume, check_stop_resume

pytestmark = pytest.mark.mpi

N = 2
W2 = [[0.625, 0.375], [0.375, 0.625]]


def cfg(alg: dict, codec=None) -> dict:
    c = {"seed": 6, "run": {"progress": False},
         "train": {"epochs": 6, "batch_size": 8, "lr": 0.1, "eval_every": 30, "log_every": 7,
                   "checkpoint_every": 20, "schedule": {"kind": "step", "milestones": [2, 4]}},
         "model": {"name": "mlp", "hidden": [16]},
         "data": {"name": "digits", "params": {"max_train": 400, "max_test": 100}},
         "algorithm": alg, "topology": {"name": "matrix", "W": W2}}
    if codec is not None:
        c["codec"] = codec
    return c


SB8 = {"name": "stochastic_bits", "b": 8}
ALGS = {
    "d_psgd": cfg({"name": "d_psgd"}),
    "d_psgd_naive_q": cfg({"name": "d_psgd_naive_q"}, SB8),
    "dcd_psgd": cfg({"name": "dcd_psgd"}, SB8),
    "ecd_psgd": cfg({"name": "ecd_psgd"}, SB8),
    "dqpr_sgd": cfg({"name": "dqpr_sgd", "K": 3}, SB8),
}
# every gossip algorithm, in the default run (issue 5: bit-exact resume for every algorithm)
@pytest.mark.parametrize("how", ["stop", pytest.param("kill", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(ALGS))
def test_gossip_sigkill_resume_bit_identical(name, how, tmp_path):
    """Exact resume: stopped in-process (default run) or SIGKILLed (make test-all)."""
    (tmp_path / "ref").mkdir()
    ref = run_many(N, {name: ALGS[name]}, tmp_path / "ref", timeout=300)[name]
    check = check_stop_resume if how == "stop" else check_kill_resume
    step = check(N, ALGS[name], tmp_path, name, ref, min_step=40)
    assert step >= 40
