"""A run killed with SIGKILL mid-way and resumed ends bit-identical to an uninterrupted run:
psgd as a real mpiexec job (its reference run in-process: at 2 workers the backends agree bit
for bit), pr_sgd as one ``qprsgd run --workers 2`` process."""
from __future__ import annotations

import pytest

from conftest import run_many
from resume_util import check_kill_resume


def cfg(alg: dict) -> dict:
    return {"seed": 5, "run": {"progress": False},
            "train": {"epochs": 4, "batch_size": 8, "lr": 0.05, "eval_every": 200, "log_every": 7,
                      "checkpoint_every": 50, "schedule": {"kind": "step", "milestones": [1.5, 3]}},
            "model": {"name": "mlp", "hidden": [16]}, "data": {"name": "digits"}, "algorithm": alg}


ALGS = {"psgd": {"name": "psgd"}, "pr_sgd": {"name": "pr_sgd", "K": 3}}


# (pr_sgd in-process under make test-all: make test keeps the real case, SIGKILL under mpiexec)
@pytest.mark.parametrize("name,mpi", [("psgd", True), pytest.param("pr_sgd", False, marks=pytest.mark.slow)])
def test_sigkill_resume_bit_identical(name, mpi, tmp_path):
    n = 2
    ref = run_many(n, {name: cfg(ALGS[name])}, tmp_path)[name]
    step = check_kill_resume(n, cfg(ALGS[name]), tmp_path, name, ref, min_step=100, mpi=mpi)
    assert step >= 100
