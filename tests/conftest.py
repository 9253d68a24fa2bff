"""Shared test helpers: runs in-process (``qprsgd run --workers N`` inside this pytest process:
no torch import per worker) by default, or real MPI jobs under mpiexec with a timeout
(``mpi=True``: for what only MPI can show -- aborts, launch, the MPI transport itself, and
in-process-equals-MPI)."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"


def mpi_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def mpirun(n: int, args: list[str], timeout: float = 120, cwd=None, check: bool = True):
    """Run ``python args...`` on n ranks under mpiexec; kill the whole group on timeout."""
    cmd = [MPIEXEC, "-n", str(n), sys.executable] + [str(a) for a in args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=mpi_env(), cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(map(str, args))} timed out after {timeout}s (deadlock?)\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    if check and p.returncode != 0:
        pytest.fail(f"mpiexec -n {n} {' '.join(map(str, args))} exited {p.returncode}\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    return p.returncode, out, err


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def inprocess(n: int, args: list[str], check: bool = True):
    """``qprsgd <args> --workers n`` in this process (n worker threads); (rc, stdout, stderr)."""
    from qprsgd.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args] + ["--workers", str(n)])
    if check and rc != 0:
        pytest.fail(f"qprsgd {' '.join(map(str, args))} --workers {n} exited {rc}\n"
                    f"stdout:\n{out.getvalue()}\nstderr:\n{err.getvalue()}")
    return rc, out.getvalue(), err.getvalue()


def run_qprsgd(n: int, cfg: dict, tmp_path: Path, name: str = "run", extra=(), timeout: float = 180,
               check: bool = True, mpi: bool = False):
    """Write cfg, run ``qprsgd run`` on n workers into tmp_path/name (in-process, or n MPI
    ranks with ``mpi=True``); return (rc, out, err, h5 path)."""
    cfg_path = write_config(tmp_path / f"{name}.yaml", cfg)
    out_dir = tmp_path / name
    args = ["run", str(cfg_path), "--out", str(out_dir), *extra]
    if mpi:
        rc, out, err = mpirun(n, ["-m", "qprsgd.cli", *args], timeout=timeout, check=check)
    else:
        rc, out, err = inprocess(n, args, check=check)
    return rc, out, err, out_dir / "run.h5"


def run_many(n: int, cfgs: dict, tmp_path: Path, timeout: float = 240, mpi: bool = False) -> dict:
    """Run several configs on n workers: in-process one after another, or (``mpi=True``) in one
    mpiexec job (torch imported once per rank); returns {name: path of run.h5}."""
    specs = []
    for name, cfg in cfgs.items():
        specs.append(f"{name}={write_config(tmp_path / f'{name}.yaml', cfg)}")
    if mpi:
        mpirun(n, [str(ROOT / "tests" / "mpi_runs.py"), str(tmp_path)] + specs, timeout=timeout)
    else:
        for spec in specs:
            name, path = spec.split("=", 1)
            inprocess(n, ["run", path, "--out", str(tmp_path / name)])
    return {name: tmp_path / name / "run.h5" for name in cfgs}


def final_params(h5_path) -> "np.ndarray":
    from qprsgd.logger import read
    return read(str(h5_path))["final"]["params"]


@pytest.fixture(scope="session", autouse=True)
def _numba_kernels_compiled_once():
    """Compile every codec's numba kernels once (or load them from numba's on-disk cache), in this
    process, before any test starts: in a fresh clone the cache is empty, and the 2-4 ranks of
    each early mpiexec test would otherwise all compile the same kernels at the same time.  Two
    groups at once (tests/warm_numba.py), one in a subprocess: compiling holds one core."""
    from qprsgd.codecs.backends import numba_importable
    if not numba_importable():
        return
    from warm_numba import warm

    other = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_numba.py"), "a"], env=mpi_env(),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        warm("b")
    finally:
        out = other.communicate(timeout=600)[0]
    if other.returncode != 0:
        pytest.fail(f"tests/warm_numba.py a exited {other.returncode}:\n{out[-3000:]}")
