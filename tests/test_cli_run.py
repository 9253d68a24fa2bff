"""`qprsgd run`: pre-flight warnings, honest --resume refusals, and a clean Ctrl-C under mpiexec."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest
import yaml

from conftest import MPIEXEC, ROOT, mpi_env, mpirun
from qprsgd import config

pytestmark = pytest.mark.mpi

TINY = {"seed": 0, "run": {"progress": False},
        "train": {"epochs": 0.5, "batch_size": 8, "lr": 0.1, "eval_every": 5, "log_every": 1},
        "model": {"name": "logreg"},
        "data": {"name": "digits", "params": {"max_train": 128, "max_test": 32}},
        "algorithm": {"name": "dcd_psgd"}, "codec": {"name": "stochastic_bits", "b": 2},
        "topology": {"name": "complete"}}

DRIVER = """
import json, os, sys
from qprsgd.cli import main
cfg, done, changed, res = sys.argv[1:5]
rcs = [main(["run", cfg, "--out", done]),
       main(["run", cfg, "--out", done, "--resume"]),
       main(["run", cfg, "--out", changed, "--resume", "--set", "train.lr=0.5",
             "--set", "model.name=mlp", "--set", "model.hidden=[8]"])]
from mpi4py import MPI      # already initialised by the first run
with open(os.path.join(res, f"rc.{MPI.COMM_WORLD.Get_rank()}"), "w") as f:
    json.dump(rcs, f)      # a file per rank: the ranks' stdout lines may interleave
"""


def test_warnings_and_resume_messages(tmp_path):
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(TINY))
    done, changed = tmp_path / "done", tmp_path / "changed"
    changed.mkdir()                 # a run folder whose saved config is the original one
    (changed / "config.yaml").write_text(config.load(str(cfgp), []).to_yaml())
    rc, out, err = mpirun(2, ["-c", DRIVER, cfgp, done, changed, tmp_path], timeout=180)
    rcs = [json.loads((tmp_path / f"rc.{r}").read_text()) for r in range(2)]
    assert rcs == [[0, 2, 2]] * 2, out + err        # each rank: done, finished, config differs
    # run prints topo's pre-flight warning (2-bit rounding breaks DCD-PSGD's Theorem 1), once
    assert err.count("qprsgd: WARNING: DCD-PSGD Theorem 1 condition broken") == 1, err
    # resuming a finished run says so
    with h5py.File(done / "run.h5", "r") as f:
        steps = int(f.attrs["final_step"])
    assert f"--resume: {done} is finished (it completed all {steps} steps" in err
    # a changed config: every differing key with both values, and how to resume with the original
    line = next(x for x in err.splitlines() if "the config differs" in x)
    for key, old, new in (("train.lr", "0.1", "0.5"), ("model.name", "'logreg'", "'mlp'"),
                          ("model.hidden", "(absent)", "[8]")):
        assert f"{key}: {old} in {changed / 'config.yaml'}, {new} now" in line, line
    assert f"mpiexec -n 2 qprsgd run {changed / 'config.yaml'} --out {changed} --resume" in line
    assert "Traceback" not in err


def test_ctrl_c_one_line_and_files_kept(tmp_path):
    cfg = dict(TINY, codec={"name": "stochastic_bits", "b": 8}, model={"name": "mlp", "hidden": [32]})
    cfg["train"] = dict(TINY["train"], epochs=500, checkpoint_every=10, eval_every=20, log_every=5)
    cfg["data"] = {"name": "digits"}
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    p = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "qprsgd.cli", "run", str(cfgp), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(), cwd=ROOT,
                         start_new_session=True)
    latest = out / "checkpoint" / "latest.json"
    try:
        deadline = time.monotonic() + 120
        while not latest.exists() or json.loads(latest.read_text())["step"] < 20:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)           # what a terminal's Ctrl-C sends to mpiexec
        o, e = p.communicate(timeout=60)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    assert p.returncode == 130, (p.returncode, o, e)
    ours = [x for x in e.splitlines() if not x.startswith("[mpiexec@")]   # mpiexec's own notice aside
    assert len(ours) == 1 and ours[0].startswith("qprsgd: interrupted (Ctrl-C) at step "), e
    assert "Traceback" not in e + o and "MPI_Abort" not in e and "BAD TERMINATION" not in e + o
    step = json.loads(latest.read_text())["step"]
    assert f"last checkpoint: step {step}" in ours[0]
    assert f"qprsgd run {out / 'config.yaml'} --out {out} --resume" in ours[0]
    # what was written stays: a readable log holding at least the rows of the checkpoint
    ck = json.loads(latest.read_text())
    with h5py.File(out / "run.h5", "r") as f:
        n = f["metrics/step"].shape[0]
        assert n >= ck["rows"]["metrics"] and f["eval/step"].shape[0] >= ck["rows"]["eval"]
        assert list(f["metrics/step"][:]) == [5 * (i + 1) for i in range(n)]   # whole rows, no gaps
        assert not f.attrs.get("completed", False)
