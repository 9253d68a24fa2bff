"""``qprsgd netem``: a real tbf-shaped network in namespaces; measured comm vs the model; teardown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import ROOT, mpi_env
from qprsgd import netem
from qprsgd import network as nw

WHY = netem.available()
pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(WHY is not None, reason=f"network namespaces unavailable: {WHY}")]

RATE = 5e6


def ours() -> tuple[set, set]:
    """Namespaces and host interfaces named like netem's (``qpn-``)."""
    ns = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return ({n for n in ns if n.startswith(netem.PREFIX)},
            {l.split(":")[1].strip() for l in links.splitlines() if netem.PREFIX in l})


def cfg(hidden, epochs=1.0, max_train=128, **train):
    t = {"epochs": epochs, "batch_size": 8, "lr": 0.1, "eval_every": 1000, "log_every": 1}
    t.update(train)
    return {"seed": 0, "run": {"progress": False}, "train": t, "model": {"name": "mlp", "hidden": hidden},
            "data": {"name": "digits", "params": {"max_train": max_train, "max_test": 32}},
            "algorithm": {"name": "psgd"}}


def launch(tmp_path, c, name, extra=()):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(c))
    cmd = [sys.executable, "-m", "qprsgd.cli", "netem", "-n", "2", "--rate", "5Mbps", str(p),
           "--out", str(tmp_path / name), "--timeout", "150", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(),
                            cwd=ROOT, start_new_session=True)


@pytest.mark.slow   # a timing assertion: 1.0x alone, 1.19x once inside a full fresh-clone suite run
def test_measured_comm_matches_model_and_nothing_left(tmp_path):
    """2 ranks on 5 Mb/s links: measured comm per metrics row = the α-β model at that rate.

    Model: shared NIC (one shaped veth per rank), goodput = rate x 1448/1514 (TCP/IPv4 headers),
    α = 0.  The first row (MPI connection set-up, TCP slow start) is left out.  Stated
    tolerance: the lower quartile of measured/model over rows within 15 % (rows where no rank was
    descheduled: the link sets the time; measured 1.01-1.09 on a quiet machine, 1.12 with five
    other test suites running), the median within 30 % (a descheduled rank stretches some rows).  Re-timing the run under the network it
    ran on therefore reproduces its measured comm time.  16 steps (15 measured rows): with the
    7 rows of 8 steps, two rows stretched to 1.3x by a descheduled rank moved the lower quartile
    past 1.15 about one run in three (same code before and after, 2026-12-07).
    """
    before = ours()
    p = launch(tmp_path, cfg([1024], max_train=256), "ok")  # d = 76,810: 307 kB per allreduce
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, out + err
    from qprsgd.logger import read
    log = read(str(tmp_path / "ok" / "run.h5"))
    meta = json.load(open(tmp_path / "ok" / "netem.json"))
    assert meta["rate_bps"] == RATE and meta["ranks"] == 2
    terms = nw.row_terms(log)
    assert len(terms.t_comm) >= 6
    model = terms.comm(nw.Network.simple(RATE, 0.0, nw.TCP_GOODPUT, shared_nic=True))
    # sanity: the model's per-row comm is the ring allreduce of 4 d bytes
    d = int(log["attrs"]["d"])
    assert model[1] == pytest.approx(2 * (2 - 1) / 2 * 4 * d * 8 / (RATE * nw.TCP_GOODPUT), rel=1e-6)
    ratio = terms.t_comm[1:] / model[1:]
    assert abs(np.percentile(ratio, 25) - 1) <= 0.15, ratio
    assert abs(np.median(ratio) - 1) <= 0.30, ratio
    # at 5 Mb/s the shaped link, not shared memory, sets the time (an unshaped run: ~1 ms)
    assert np.median(terms.t_comm[1:]) > 0.1
    assert ours() == before


@pytest.mark.slow   # (make test-all: make test keeps test_calibrate_ring_probe_and_nothing_left)
def test_teardown_on_failure_and_on_signal(tmp_path):
    before = ours()
    # a run that fails inside the namespaces (unknown key: every rank exits 2)
    p = launch(tmp_path, cfg([8]), "bad", extra=["--set", "train.no_such_key=1"])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "no_such_key" in err
    assert ours() == before
    # a long run stopped by SIGTERM while it trains: namespaces, links and ranks all go
    p = launch(tmp_path, cfg([512], epochs=50), "long")
    deadline = time.time() + 90
    while time.time() < deadline and not (tmp_path / "long" / "run.h5").exists():
        time.sleep(0.5)
    assert (tmp_path / "long" / "run.h5").exists(), "the run never started"
    inside = [n for n in ours()[0] - before[0]]
    assert len(inside) == 3                                   # switch + 2 ranks
    pids = []
    for ns in inside:
        pids += [int(x) for x in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                text=True).stdout.split()]
    assert pids
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, out + err
    assert ours() == before
    time.sleep(0.5)
    for pid in pids:
        assert not alive(pid), f"process {pid} survived teardown"


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False



def test_calibrate_ring_probe_and_nothing_left():
    """The bare-fabric probe: a ring transfer at 20 Mb/s takes about the rate's time (0.9-2.5x on
    a busy 2-core host; bytes taken for bits would be 8x off), and leaves no namespace behind."""
    before = ours()
    p = netem.calibrate(2, 20e6, nbytes=1 << 19, reps=2)
    assert p["model"] == pytest.approx((1 << 19) * 8 / (20e6 * nw.TCP_GOODPUT))
    assert 0.9 <= p["factor"] <= 2.5, p
    assert ours() == before
