"""A raise on one rank ends the whole job non-zero within seconds, naming the rank; a frozen rank
ends it after run.timeout, named by the others (never a hang)."""
import time

import pytest

from conftest import ROOT, mpirun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [2, 4])
def test_raise_on_one_rank_aborts_job(n):
    t0 = time.perf_counter()
    rc, out, err = mpirun(n, [str(ROOT / "tests" / "mpi_raise_one_rank.py")], timeout=30, check=False)
    elapsed = time.perf_counter() - t0
    assert rc != 0
    assert elapsed < 30
    assert "rank 1 of" in err and "injected failure on rank 1" in err


@pytest.mark.parametrize("kind", ["allreduce", "exchange"])
def test_frozen_rank_is_named_after_timeout(kind):
    t0 = time.perf_counter()
    rc, out, err = mpirun(3, [str(ROOT / "tests" / "mpi_freeze_one_rank.py"), kind, "2"], timeout=60, check=False)
    elapsed = time.perf_counter() - t0
    assert rc != 0
    assert elapsed < 60
    assert "did not complete within run.timeout = 2 s" in err, err
    assert "rank(s) 1 of this group did not arrive" in err, err
