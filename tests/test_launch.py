"""The launch check: the world size MPI reports against what the launcher announced."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qprsgd import launch
from qprsgd.config import ConfigError, validate

from conftest import ROOT, mpi_env, write_config

MPICH = "MPICH Version:      5.0.2\nMPICH Release date: ..."
OMPI = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4"

SRUN = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}


def test_announced_prefers_the_launcher_that_started_the_rank():
    assert launch.announced({}) is None
    assert launch.announced({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}) is None     # batch script, no step
    la = launch.announced(SRUN)
    assert (la.size, la.launcher, la.source) == (2, "srun", "SLURM_STEP_NUM_TASKS")
    la = launch.announced({"SLURM_STEP_ID": "3", "SLURM_NTASKS": "5"})
    assert (la.size, la.source) == (5, "SLURM_NTASKS")
    # hydra inside an srun step of 1 task: hydra's count wins
    la = launch.announced(dict(SRUN, SLURM_STEP_NUM_TASKS="1", PMI_SIZE="4", MPI_LOCALNRANKS="4"))
    assert (la.size, la.launcher, la.detail) == (4, "pmi", "hydra's mpiexec")
    la = launch.announced(dict(SRUN, PMI_SIZE="2", SLURM_MPI_TYPE="pmi2"))
    assert la.detail == "srun (--mpi=pmi2)"
    # Open MPI's mpirun in an allocation: its daemons' srun step has one task per node
    la = launch.announced(dict(SRUN, SLURM_STEP_NUM_TASKS="1", OMPI_COMM_WORLD_SIZE="8"))
    assert (la.size, la.launcher) == (8, "openmpi")
    assert launch.announced({"PMI_SIZE": "x"}) is None


@pytest.mark.parametrize("env,library,words", [
    (dict(SRUN, SLURM_MPI_TYPE="none"), MPICH, ["srun (--mpi=none) started 2", "MPI sees 1", "srun --mpi=pmi2"]),
    (dict(SRUN, SLURM_MPI_TYPE="pmix"), MPICH, ["started 2", "srun --mpi=pmi2", "MPICH Version"]),
    (dict(SRUN, SLURM_MPI_TYPE="none"), OMPI, ["srun --mpi=pmix", "Open MPI v4.1.4"]),
    (dict(SRUN), "Some MPI 1.0", ["srun --mpi=list"]),
    ({"PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}, OMPI, ["hydra's mpiexec started 2", "Open MPI's mpirun",
                                                       "MPI4PY_LIBMPI"]),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, MPICH, ["Open MPI's mpirun started 2", "bin/mpiexec"]),
])
def test_mismatch_names_cause_and_fix(env, library, words):
    msg = launch.check(env, 1, library=library)
    assert msg is not None and "Nothing was written" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_match_and_pin():
    assert launch.check(SRUN, 2, library=MPICH) is None
    assert launch.check({}, 1) is None                              # plain `python -m qprsgd.cli run`
    assert launch.check({}, 3) is None                              # a launcher we cannot read: no claim
    assert launch.check(SRUN, 2, pinned=2) is None
    msg = launch.check(SRUN, 2, pinned=4)
    assert msg.startswith("run.ranks: the config pins 4 processes but MPI sees 2") and "srun -n 4" in msg
    msg = launch.check({}, 1, pinned=2)
    assert "no launcher announced" in msg
    # the launcher's mismatch is the cause named first
    assert launch.check(SRUN, 1, pinned=1).startswith("srun started 2")
    with pytest.raises(ValueError, match="world_size"):
        launch.check({}, 0)


def test_srun_mpi_for_library():
    assert launch.srun_mpi_for(MPICH) == "pmi2"
    assert launch.srun_mpi_for("Intel(R) MPI Library 2021.10") == "pmi2"
    assert launch.srun_mpi_for(OMPI) == "pmix"
    assert launch.srun_mpi_for("Something else") is None


def test_run_ranks_config_key():
    assert validate({"run": {"ranks": 4}}).run.ranks == 4
    assert validate({}).run.ranks is None
    with pytest.raises(ConfigError, match=r"run\.ranks: .*greater than or equal to 1.*got 0"):
        validate({"run": {"ranks": 0}})


def test_mpi_library_probe_names_the_loaded_library():
    before = "mpi4py.MPI" in sys.modules
    info = launch.mpi_library(env=os.environ)
    assert "error" not in info, info
    assert info["abi"] in ("mpich", "openmpi")
    assert info["library"] and info["file"] and os.path.exists(info["file"])
    assert ("mpi4py.MPI" in sys.modules) == before             # read in a child, not here


BASE = {"seed": 0, "run": {"progress": False},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.1, "eval_every": 5, "log_every": 1},
        "model": {"name": "mlp", "hidden": [8]},
        "data": {"name": "digits", "params": {"max_train": 64, "max_test": 32}},
        "algorithm": {"name": "psgd"}}


@pytest.mark.parametrize("extra_env,sets,words", [
    (dict(SRUN, SLURM_MPI_TYPE="none"), ["--set", "run.ranks=1"],
     ["srun (--mpi=none) started 2", "MPI sees 1", "--mpi=pmi2"]),
])
def test_singleton_refuses_and_writes_nothing(tmp_path, extra_env, sets, words):
    """A real MPI process that is a 1-rank world while srun announced 2 tasks (run.ranks pinned
    to 1 does not excuse it): exit 2 with the message, and no run folder.  (The same refusal
    under a real srun and a real hydra + Open MPI: tests/test_cluster.py.)"""
    cfg = write_config(tmp_path / "c.yaml", BASE)
    env = {k: v for k, v in mpi_env().items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_"))}
    env.update(extra_env)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "qprsgd.cli", "run", str(cfg), "--out", str(out), *sets],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    assert not out.exists()


def test_bundled_mpich_is_an_extra_that_make_installs():
    """`pip install -e .` without [mpich] leaves no requirement on the MPICH wheel (so dropping it
    for the site MPI leaves nothing broken); `make venv` installs it."""
    import configparser
    c = configparser.ConfigParser()
    c.read(ROOT / "setup.cfg")
    reqs = [x.strip() for x in c["options"]["install_requires"].splitlines() if x.strip()]
    assert not [r for r in reqs if r.lower().startswith("mpich")] and any(r.startswith("mpi4py") for r in reqs)
    assert c["options.extras_require"]["mpich"].strip().startswith("mpich")
    assert "'.[test,mpich]'" in (ROOT / "Makefile").read_text()
