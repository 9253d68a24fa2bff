"""Every gossip algorithm, SIGKILLed after a checkpoint and resumed, ends bit-identical to an
uninterrupted run (replicas / estimates and the codec generator are in the checkpoint)."""
from __future__ import annotations

import pytest

from conftest import run_many
from resume_util import check_kill_resume

pytestmark = pytest.mark.mpi

N = 2
W2 = [[0.625, 0.375], [0.375, 0.625]]


def cfg(alg: dict, codec=None) -> dict:
    c = {"seed": 6, "run": {"progress": False},
         "train": {"epochs": 12, "batch_size": 8, "lr": 0.1, "eval_every": 60, "log_every": 7,
                   "checkpoint_every": 40, "schedule": {"kind": "step", "milestones": [4, 8]}},
         "model": {"name": "mlp", "hidden": [16]},
         "data": {"name": "digits", "params": {"max_train": 600, "max_test": 100}},
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
    "dqpr_sgd": cfg({"name": "dqpr_sgd", "K": 3}, {"name": "qsgd"}),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("gossip-ref")
    return run_many(N, ALGS, root, timeout=400)


@pytest.mark.parametrize("name", sorted(ALGS))
def test_gossip_sigkill_resume_bit_identical(name, references, tmp_path):
    step = check_kill_resume(N, ALGS[name], tmp_path, name, references[name], min_step=80)
    assert step >= 80
