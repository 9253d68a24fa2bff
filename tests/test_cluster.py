"""The cluster path, run for real: Debian's SLURM (slurmctld + slurmd + munge, one node, started
here) and Debian's Open MPI and MPICH loaded through mpi4py's MPI4PY_LIBMPI.

Marked ``cluster`` (not in the default run): ``make test-cluster`` installs the Debian packages
and runs these.  Each test skips, naming what is missing, where the packages are absent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, mpi_env
from slurm_local import LocalSlurm, missing as slurm_missing

pytestmark = pytest.mark.cluster

LIBDIR = "/usr/lib/x86_64-linux-gnu"
OMPI_LIB = f"{LIBDIR}/libmpi.so.40"          # Debian's Open MPI 4.1 (libopenmpi3)
MPICH_LIB = f"{LIBDIR}/libmpich.so.12"       # Debian's MPICH 4.0 (libmpich12)

CFG = {"seed": 0, "run": {"progress": False, "name": "c"},
       "train": {"epochs": 1, "batch_size": 16, "lr": 0.1, "eval_every": 2, "log_every": 1},
       "model": {"name": "mlp", "hidden": [8]},
       "data": {"name": "digits", "params": {"max_train": 64, "max_test": 32}},
       "algorithm": {"name": "qpr_sgd", "K": 2}}


def clean_env(**extra) -> dict:
    """This interpreter's environment without launcher or MPI-choosing variables."""
    env = {k: v for k, v in mpi_env().items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_", "MPI4PY_"))}
    env.update(extra)
    return env


def qprsgd(args, env, cwd, timeout=180, python=sys.executable):
    p = subprocess.run([python, "-m", "qprsgd.cli", *map(str, args)], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def read_log(h5) -> dict:
    from qprsgd.logger import read
    return read(str(h5))


def site_python(tmp: Path) -> str:
    """A venv WITHOUT the bundled MPICH wheel (what `pip install -e .` without the [mpich] extra
    gives): its own prefix (mpi4py looks for libmpi under <prefix>/lib first, and finds nothing
    there), the other packages seen through a .pth file."""
    venv = tmp / "site-venv"
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        sp = next((venv / "lib").glob("python3*/site-packages"))
        import sysconfig
        (sp / "lead.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    assert not (venv / "lib" / "libmpi.so.12").exists()
    return str(py)


# -- Open MPI and MPICH from Debian, launched from the hostfile script --------------------------------
def hostfile_run(tmp: Path, name: str, hosts: str, env: dict, python: str) -> Path:
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG, sort_keys=False))
    (tmp / f"hosts.{name}").write_text(hosts + "\n")
    env = dict(env, HOSTFILE=str(tmp / f"hosts.{name}"), NTASKS="2", TASKS_PER_NODE="2", QPRSGD_PYTHON=python)
    out = tmp / name
    p = subprocess.run(["bash", str(ROOT / "jobs" / "mpirun_hostfile.sh"), str(cfg), str(out),
                        "--set", "train.lr=0.05"], env=env, cwd=tmp, capture_output=True, text=True,
                       timeout=300, start_new_session=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return out / "run.h5"


@pytest.mark.skipif(not (os.path.exists(OMPI_LIB) and os.path.exists("/usr/bin/mpirun.openmpi")),
                    reason="Debian's Open MPI absent (apt-get install openmpi-bin libopenmpi-dev)")
def test_debian_openmpi_and_mpich_give_the_bundled_mpich_result(tmp_path):
    """One 2-rank Q-PR-SGD run three ways: the bundled MPICH (venv's hydra mpiexec), Debian's
    Open MPI (MPI4PY_LIBMPI=libmpi.so.40, Open MPI's mpirun with -x forwarding) and Debian's MPICH
    (libmpich.so.12 under the name libmpi.so.12, its mpiexec.mpich), the last two from a venv
    without the bundled MPICH.  Losses, accuracies and bits must be identical."""
    site = site_python(tmp_path)
    runs = {"bundled": hostfile_run(tmp_path, "bundled", "localhost:2", clean_env(), sys.executable)}
    env = clean_env(MPI4PY_LIBMPI=OMPI_LIB, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    MPIRUN_ARGS="--oversubscribe")
    runs["openmpi"] = hostfile_run(tmp_path, "openmpi", "localhost slots=2", env, site)
    if os.path.exists(MPICH_LIB) and os.path.exists("/usr/bin/mpiexec.mpich"):
        abi = tmp_path / "mpich-abi"
        abi.mkdir()
        (abi / "libmpi.so.12").symlink_to(MPICH_LIB)
        env = clean_env(MPI4PY_LIBMPI=str(abi / "libmpi.so.12"), LD_LIBRARY_PATH=str(abi),
                        MPIRUN="/usr/bin/mpiexec.mpich")
        runs["mpich"] = hostfile_run(tmp_path, "mpich", "localhost:2", env, site)
    logs = {k: read_log(v) for k, v in runs.items()}
    ref = logs["bundled"]
    for k, log in logs.items():
        assert log["attrs"]["world_size"] == 2 and log["attrs"]["completed"], k
        for col in ("train_loss", "bits_sent", "rounds"):
            np.testing.assert_array_equal(log["metrics"][col], ref["metrics"][col], err_msg=f"{k} {col}")
        for col in ("test_loss", "test_accuracy", "bits_sent"):
            np.testing.assert_array_equal(log["eval"][col], ref["eval"][col], err_msg=f"{k} {col}")
    assert ref["metrics"]["bits_sent"][-1] > 0
    # which library each run loaded, as `qprsgd doctor` tells it (from the same environments)
    rc, out, _ = qprsgd(["doctor"], clean_env(MPI4PY_LIBMPI=OMPI_LIB), tmp_path, python=site)
    assert rc == 0 and "Open MPI v4.1" in out and "ABI: openmpi" in out and "srun --mpi=pmix" in out
    rc, out, _ = qprsgd(["doctor"], clean_env(), tmp_path)
    assert rc == 0 and "[the bundled MPICH wheel]" in out and "ABI: mpich" in out and "srun --mpi=pmi2" in out


@pytest.mark.skipif(not os.path.exists(OMPI_LIB), reason="Debian's Open MPI absent")
def test_hydra_with_openmpi_loaded_refuses(tmp_path):
    """The issue's silent singleton: the venv's hydra mpiexec while mpi4py loads Open MPI.  Each
    process is a 1-rank world; both refuse with the cause, and nothing is written."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG, sort_keys=False))
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "qprsgd.cli", "run", str(cfg), "--out",
                        str(tmp_path / "out")], env=clean_env(MPI4PY_LIBMPI=OMPI_LIB), cwd=tmp_path,
                       capture_output=True, text=True, timeout=180, start_new_session=True)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("hydra's mpiexec started 2 processes") == 2 and "Open MPI" in p.stderr
    assert not (tmp_path / "out").exists()


# -- SLURM ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    s = LocalSlurm(str(root), cpus=8, timeout=90)
    with s:
        yield s


def slurm_env(slurm, **extra) -> dict:
    env = clean_env(**extra)
    env["SLURM_CONF"] = slurm.env["SLURM_CONF"]
    return env


def test_submit_runs_under_srun_with_the_detected_mpi(slurm, tmp_path):
    """`qprsgd submit --submit` from a shell where mpi4py loads Debian's Open MPI (if present,
    else the bundled MPICH): the script says srun --mpi=pmix (pmi2), the job finishes, and the
    log holds world_size 2."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG, sort_keys=False))
    if os.path.exists(OMPI_LIB):
        env, python, plugin = slurm_env(slurm, MPI4PY_LIBMPI=OMPI_LIB), site_python(tmp_path), "pmix"
    else:
        env, python, plugin = slurm_env(slurm), sys.executable, "pmi2"
    rc, out, err = qprsgd(["submit", cfg, "--nodes", 1, "--ntasks-per-node", 2, "--time", "00:05:00",
                           "--out", tmp_path / "job", "--submit"], env, tmp_path, python=python)
    assert rc == 0, out + err
    assert f"srun --mpi={plugin}" in out
    job = out.strip().split("submitted job ")[1].split()[0]
    slurm.wait_job(job, 300)
    script = (tmp_path / "job" / "job.sbatch").read_text()
    assert python in script and (plugin != "pmix" or f"export MPI4PY_LIBMPI={OMPI_LIB}" in script)
    log_text = (tmp_path / "job" / f"slurm-{job}.out").read_text()
    assert (tmp_path / "job" / "exit.rc").read_text().strip() == "0", log_text + slurm.logs()
    log = read_log(tmp_path / "job" / "run.h5")
    assert log["attrs"]["world_size"] == 2 and log["attrs"]["completed"]
    assert yaml.safe_load(log["attrs"]["config_yaml"])["run"]["ranks"] == 2


def test_srun_without_mpi_plugin_refuses(slurm, tmp_path):
    """srun --mpi=none with the bundled MPICH (the issue's silent singletons): both tasks refuse
    with the cause and the fix; no results; exit code 2 recorded."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG, sort_keys=False))
    rc, out, err = qprsgd(["submit", cfg, "--nodes", 1, "--ntasks-per-node", 2, "--mpi", "none",
                           "--out", tmp_path / "job", "--submit"], slurm_env(slurm), tmp_path)
    assert rc == 0, out + err
    job = out.strip().split("submitted job ")[1].split()[0]
    slurm.wait_job(job, 300)
    log_text = (tmp_path / "job" / f"slurm-{job}.out").read_text()
    assert log_text.count("srun started 2 processes (SLURM_STEP_NUM_TASKS=2) but MPI sees 1") == 2, log_text
    assert "use srun --mpi=pmi2" in log_text
    assert (tmp_path / "job" / "exit.rc").read_text().strip() != "0"
    assert not (tmp_path / "job" / "run.h5").exists()


def test_sweep_array_to_completion_and_status(slurm, tmp_path):
    """`qprsgd sweep --slurm --submit` (bundled MPICH: srun --mpi=pmi2) runs a 4-task array of
    2-rank and 1-rank runs; --status reads every run done, with the planned world size."""
    spec = {"name": "arr", "base": CFG, "grid": {"ranks": [2, 1], "seed": [0]},
            "zip": {"algorithm": [{"name": "qpr_sgd", "K": 2}, {"name": "psgd"}]}}
    sp = tmp_path / "sw.yaml"
    sp.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = slurm_env(slurm)
    rc, out, err = qprsgd(["sweep", sp, "--slurm", "--submit", "--time", "00:05:00", "--out", tmp_path / "res"],
                          env, tmp_path)
    assert rc == 0, out + err
    assert "srun --mpi=pmi2" in out
    job = out.strip().split("submitted job array ")[1].split()[0]
    slurm.wait_job(job, 480)
    rc, out, err = qprsgd(["sweep", sp, "--status", "--out", tmp_path / "res"], env, tmp_path)
    plan = json.loads((tmp_path / "res" / "sweep.json").read_text())["runs"]
    assert rc == 0, out + err + "".join(
        (tmp_path / "res" / r["name"] / "stdout.log").read_text() for r in plan
        if (tmp_path / "res" / r["name"] / "stdout.log").exists()) + slurm.logs()
    assert out.count(" done ") == 4
    for r in plan:
        log = read_log(tmp_path / "res" / r["name"] / "run.h5")
        assert log["attrs"]["world_size"] == r["ranks"] and log["attrs"]["completed"]
        assert (tmp_path / "res" / r["name"] / "slurm_job").read_text().startswith(f"{job}_")


@pytest.mark.skipif(not (os.path.exists(OMPI_LIB) and os.path.exists(MPICH_LIB)),
                    reason="Debian's Open MPI and MPICH absent")
def test_which_library_mpi4py_loads(tmp_path):
    """The library-loading facts docs/cluster.md states, each asked of mpi4py (no MPI initialised)."""
    from qprsgd.launch import mpi_library
    site = site_python(tmp_path)
    abi = tmp_path / "mpich-abi"
    abi.mkdir()
    (abi / "libmpi.so.12").symlink_to(MPICH_LIB)

    def lib(python=sys.executable, **env):
        info = mpi_library(env=clean_env(**env), python=python)
        return info.get("library") or info["error"]

    assert lib().startswith("MPICH Version:") and "5." in lib().split("\n")[0]   # the bundled wheel
    assert lib(site).startswith("Open MPI v4.1")             # without the wheel, nothing set: Debian's Open MPI
    assert lib(site, MPI4PY_LIBMPI=OMPI_LIB).startswith("Open MPI v4.1")
    assert lib(MPI4PY_LIBMPI=OMPI_LIB).startswith("Open MPI v4.1")            # also beside the wheel
    assert lib(MPI4PY_MPIABI="openmpi").startswith("Open MPI v4.1")
    assert "libmpi.so.12" in lib(site, MPI4PY_LIBMPI=MPICH_LIB)               # fails: the name mpi4py needs
    assert "Version:\t4.0" in lib(site, MPI4PY_LIBMPI=str(abi / "libmpi.so.12"), LD_LIBRARY_PATH=str(abi))
    assert "Version:\t4.0" in lib(MPI4PY_LIBMPI=str(abi / "libmpi.so.12"), LD_LIBRARY_PATH=str(abi))
    assert "5.0" in lib(LD_LIBRARY_PATH=str(abi)).split("\n")[0]              # alone: still the bundled one
    assert not os.path.exists("/usr/lib/libmpi.so")          # $(dirname $(which mpicc))/../lib/libmpi.so
