"""The comm layer's test-and-sleep waiting (QPRSGD_MPI_POLL_SLEEP, set by ``qprsgd netem``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import mpirun
from qprsgd import netem


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("poll", ["0", "2e-4"])
def test_comm_poll_sleep_moves_the_same_data(n, poll):
    """``qprsgd netem`` makes ranks test-and-sleep instead of blocking in MPI
    (QPRSGD_MPI_POLL_SLEEP); every data-moving call must deliver the same bytes either way."""
    rc, out, err = mpirun(n, [str(Path(__file__).with_name("mpi_comm_poll.py")), poll], timeout=120, check=False)
    assert rc == 0, out + err
    assert out.count(" ok") == n, out + err


def test_comm_poll_sleep_env_is_validated(monkeypatch):
    from qprsgd import comm
    monkeypatch.setenv(comm.POLL_ENV, "fast")
    with pytest.raises(ValueError, match="QPRSGD_MPI_POLL_SLEEP.*'fast'"):
        comm.poll_sleep_from_env()
    monkeypatch.setenv(comm.POLL_ENV, "2")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        comm.poll_sleep_from_env()
    monkeypatch.setenv(comm.POLL_ENV, "2e-4")
    assert comm.poll_sleep_from_env() == 2e-4
    assert netem.mpi_env({})["QPRSGD_MPI_POLL_SLEEP"] == "2e-4"
