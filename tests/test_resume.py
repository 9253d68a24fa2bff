"""A run killed with SIGKILL mid-way and resumed ends bit-identical to an uninterrupted run."""
from __future__ import annotations

import pytest

from conftest import run_many
from resume_util import check_kill_resume

pytestmark = pytest.mark.mpi


def cfg(alg: dict) -> dict:
    return {"seed": 5, "run": {"progress": False},
            "train": {"epochs": 30, "batch_size": 8, "lr": 0.05, "eval_every": 200, "log_every": 7,
                      "checkpoint_every": 50, "schedule": {"kind": "step", "milestones": [10, 20]}},
            "model": {"name": "mlp", "hidden": [16]}, "data": {"name": "digits"}, "algorithm": alg}


ALGS = {"psgd": {"name": "psgd"}, "pr_sgd": {"name": "pr_sgd", "K": 3}}


@pytest.mark.parametrize("name", sorted(ALGS))
def test_sigkill_resume_bit_identical(name, tmp_path):
    n = 2
    ref = run_many(n, {name: cfg(ALGS[name])}, tmp_path)[name]
    step = check_kill_resume(n, cfg(ALGS[name]), tmp_path, name, ref, min_step=100)
    assert step >= 100
