"""Shared test helpers: running real MPI jobs under mpiexec with a timeout."""
from __future__ import annotations

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


def run_qprsgd(n: int, cfg: dict, tmp_path: Path, name: str = "run", extra=(), timeout: float = 180,
               check: bool = True):
    """Write cfg, run ``qprsgd run`` on n ranks into tmp_path/name; return (rc, out, err, h5 path)."""
    cfg_path = write_config(tmp_path / f"{name}.yaml", cfg)
    out_dir = tmp_path / name
    rc, out, err = mpirun(n, ["-m", "qprsgd.cli", "run", str(cfg_path), "--out", str(out_dir), *extra],
                          timeout=timeout, check=check)
    return rc, out, err, out_dir / "run.h5"


def run_many(n: int, cfgs: dict, tmp_path: Path, timeout: float = 240) -> dict:
    """Run several configs in one mpiexec job; returns {name: path of run.h5}."""
    specs = []
    for name, cfg in cfgs.items():
        specs.append(f"{name}={write_config(tmp_path / f'{name}.yaml', cfg)}")
    mpirun(n, [str(ROOT / "tests" / "mpi_runs.py"), str(tmp_path)] + specs, timeout=timeout)
    return {name: tmp_path / name / "run.h5" for name in cfgs}


def final_params(h5_path) -> "np.ndarray":
    from qprsgd.logger import read
    return read(str(h5_path))["final"]["params"]
