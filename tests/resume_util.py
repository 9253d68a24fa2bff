"""Kill-and-resume harness: SIGKILL a real job after its first checkpoint, resume it, and
compare with an uninterrupted run of the same config.  The job is an mpiexec job
(``mpi=True``) or one ``qprsgd run --workers n`` process (in-process backend)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MPIEXEC, ROOT, final_params, mpi_env, mpirun, write_config
from qprsgd.logger import read


def _cmd(n: int, args: list, mpi: bool) -> list:
    if mpi:
        return [MPIEXEC, "-n", str(n), sys.executable, "-m", "qprsgd.cli", *map(str, args)]
    return [sys.executable, "-m", "qprsgd.cli", *map(str, args), "--workers", str(n)]


def kill_after_checkpoint(n: int, cfg_path: Path, out_dir: Path, min_step: int, timeout: float = 120,
                          mpi: bool = True) -> int:
    """Start ``qprsgd run``; SIGKILL the whole job once a checkpoint at step >= min_step exists."""
    cmd = _cmd(n, ["run", cfg_path, "--out", out_dir], mpi)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mpi_env(), cwd=ROOT,
                         start_new_session=True)
    latest = out_dir / "checkpoint" / "latest.json"
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"run ended (rc {p.returncode}) before it could be killed:\n{err.decode()[-2000:]}")
            if latest.exists():
                try:
                    step = json.loads(latest.read_text())["step"]
                except (ValueError, KeyError):
                    step = -1
                if step >= min_step:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    return step
            time.sleep(0.002)
        pytest.fail("no checkpoint appeared in time")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def assert_same_run(got_h5: Path, reference_h5: Path) -> None:
    """The resumed run's final parameters and logged rows equal the uninterrupted run's, bit for bit."""
    got, ref = read(str(got_h5)), read(str(reference_h5))
    np.testing.assert_array_equal(got["final"]["params"], ref["final"]["params"])
    for k in ("step", "bits_sent", "bits_up", "bits_down", "messages", "rounds", "train_loss"):
        np.testing.assert_array_equal(got["metrics"][k], ref["metrics"][k], err_msg=k)
    for k in ("step", "test_loss", "test_accuracy", "bits_sent"):
        np.testing.assert_array_equal(got["eval"][k], ref["eval"][k], err_msg=k)


def check_kill_resume(n: int, cfg: dict, tmp_path: Path, name: str, reference_h5: Path, min_step: int,
                      mpi: bool = False, damage_log: str = ""):
    """Kill a run after a checkpoint, check its log is readable, resume; final params and the
    logged bits/steps must equal the uninterrupted reference run bit for bit.  ``damage_log``
    ("delete" or "truncate") damages run.h5 before the resume: the checkpoint rebuilds it."""
    cfg_path = write_config(tmp_path / f"{name}-killed.yaml", cfg)
    out_dir = tmp_path / f"{name}-killed"
    step = kill_after_checkpoint(n, cfg_path, out_dir, min_step, mpi=mpi)
    partial = read(str(out_dir / "run.h5"))  # readable after SIGKILL
    assert "final" not in partial
    assert len(partial["metrics"]["step"]) >= 1
    h5 = out_dir / "run.h5"
    if damage_log == "delete":
        h5.unlink()
    elif damage_log == "truncate":
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 3])
    args = ["run", cfg_path, "--out", out_dir, "--resume"]
    if mpi:
        mpirun(n, ["-m", "qprsgd.cli", *map(str, args)], timeout=180)
    else:
        p = subprocess.run(_cmd(n, args, False), capture_output=True, text=True, env=mpi_env(), cwd=ROOT,
                           timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out_dir / "run.h5", reference_h5)
    return step


def check_stop_resume(n: int, cfg: dict, tmp_path: Path, name: str, reference_h5: Path, min_step: int):
    """In-process exact-resume check (no interpreter start-up): run n in-process workers and stop
    them after ``min_step + 1`` steps (past a checkpoint at >= min_step; nothing after it is
    finalised, as in a killed run), then ``qprsgd run --resume --workers n`` must end bit-identical
    to the uninterrupted reference.  The SIGKILL versions are check_kill_resume (a real kill of a
    real process: tests/test_resume.py in the default run, every algorithm under ``make test-all``)."""
    from conftest import inprocess
    from qprsgd import config as C
    from qprsgd.cli import _run
    from qprsgd.experiment import load_data
    from qprsgd.inprocess import run_workers
    cfg_path = write_config(tmp_path / f"{name}-stopped.yaml", cfg)
    out_dir = tmp_path / f"{name}-stopped"
    out_dir.mkdir(parents=True)
    c = C.load(str(cfg_path), [])
    data = load_data(c)
    run_workers(n, lambda t: _run(c, t, str(out_dir), None, data=data, backend="inprocess",
                                  stop_after=min_step + 1), timeout=300)
    latest = json.loads((out_dir / "checkpoint" / "latest.json").read_text())
    assert latest["step"] >= min_step
    partial = read(str(out_dir / "run.h5"))
    assert "final" not in partial
    inprocess(n, ["run", cfg_path, "--out", out_dir, "--resume"])
    assert_same_run(out_dir / "run.h5", reference_h5)
    return latest["step"]
