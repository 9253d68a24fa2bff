"""Readers cannot break a run (issue 13, item 5): a reader holding run.h5 open and polling it, and
`qprsgd report` on the running sweep, while the run writes; the run ends rc 0 with every row."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, mpi_env

pytestmark = pytest.mark.mpi

# holds the log open for as long as it runs, refreshing and re-reading, like a notebook would
POLLER = r"""
import sys, time, h5py
path, stop = sys.argv[1], sys.argv[2]
import os
while not os.path.exists(path):
    time.sleep(0.01)
seen, reads, plain_refused = [], 0, 0
with h5py.File(path, "r", swmr=True) as f:      # the reader recipe (docs/logging.md)
    ds = f["metrics/step"]
    while not os.path.exists(stop):
        ds.refresh()
        steps = ds[()]
        assert (steps[1:] > steps[:-1]).all(), steps   # never a torn or reordered row
        if not seen or len(steps) != seen[-1]:
            seen.append(len(steps))
        reads += 1
        try:                                           # a careless reader: refused, harmlessly
            h5py.File(path, "r").close()
        except OSError:
            plain_refused += 1
        time.sleep(0.005)
print("ROWS", seen[0], seen[-1], len(seen), "READS", reads, "PLAIN_REFUSED", plain_refused, flush=True)
"""


def test_readers_never_block_the_writer(tmp_path):
    spec = {"name": "rd", "ranks": 2,
            "base": {"seed": 0, "run": {"progress": False},
                     "train": {"epochs": 4, "batch_size": 8, "lr": 0.05, "log_every": 1, "eval_every": 5},
                     "model": {"name": "mlp", "hidden": [16]},
                     "data": {"name": "digits", "params": {"max_train": 800, "max_test": 100}},
                     "algorithm": {"name": "psgd"}},
            "grid": {"seed": [0]}}
    (tmp_path / "rd.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "rd"
    sweep = subprocess.Popen([sys.executable, "-m", "qprsgd.cli", "sweep", str(tmp_path / "rd.yaml"), "--local",
                              "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=mpi_env(), cwd=ROOT, start_new_session=True)
    h5 = out / "000-s0" / "run.h5"
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", POLLER, str(h5), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=mpi_env())
    reports = []
    try:
        t0 = time.time()
        while sweep.poll() is None and time.time() - t0 < 300:
            if h5.exists() and len(reports) < 2:  # each report imports matplotlib: keep it to two
                r = subprocess.run([sys.executable, "-m", "qprsgd.cli", "report", str(out), "--out",
                                    str(tmp_path / f"fig{len(reports)}")],
                                   capture_output=True, text=True, env=mpi_env(), cwd=ROOT, timeout=120)
                reports.append((r.returncode, r.stderr[-500:]))
            else:
                time.sleep(0.05)
        sout = sweep.communicate(timeout=300)[0]
    finally:
        stop.touch()
        pout = poller.communicate(timeout=60)[0]
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, sout
    assert poller.returncode == 0, pout
    first, last, distinct = map(int, pout.split("ROWS")[1].split()[:3])
    from qprsgd.logger import read
    log = read(str(h5))
    assert log["attrs"]["completed"] and len(log["metrics"]["step"]) == log["attrs"]["total_steps"]
    assert last == log["attrs"]["total_steps"] and distinct >= 3, pout  # it watched the log grow
    assert reports, "no report ran while the sweep ran"
    assert all(rc in (0, 2) and "Traceback" not in err for rc, err in reports), reports
