"""Report: every figure from a tiny sweep, and summary numbers recomputed from the HDF5 files."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from conftest import mpirun
from qprsgd import report, sweep as sw

pytestmark = pytest.mark.mpi

BASE = {"seed": 0, "run": {"progress": False},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.3, "eval_every": 2, "log_every": 1},
        "model": {"name": "mlp", "hidden": [16]},
        "data": {"name": "digits", "params": {"max_train": 128, "max_test": 64}},
        "algorithm": {"name": "psgd"}}
BWS, LATS = "5Mbps,10Gbps", "0,10ms"


def recompute_time(h5: str, target: float, bw: float, lat: float) -> float:
    """Independent re-timing for allreduce-only runs, straight from the HDF5 columns."""
    with h5py.File(h5, "r") as f:
        M = int(f.attrs["world_size"])
        chans = f["metrics/channel_bytes"].attrs["channels"].split(",")
        k = chans.index("allreduce")
        cb = np.diff(np.concatenate([[0], f["metrics/channel_bytes"][:, k]]))
        cm = np.diff(np.concatenate([[0], f["metrics/channel_messages"][:, k]]))
        local = np.maximum(f["metrics/t_compute"][:] + f["metrics/t_codec"][:],
                           f["metrics/t_step"][:] - f["metrics/t_comm"][:])
        steps = f["metrics/step"][:]
        acc, estep = f["eval/test_accuracy"][:], f["eval/step"][:]
    calls = cm / M
    n = np.where(cm > 0, cb / np.maximum(cm, 1), 0)
    row = local + calls * (2 * (M - 1) * lat + 2 * (M - 1) / M * n * 8 / bw)
    s = estep[np.flatnonzero(acc >= target)[0]]
    return float(row[steps <= s].sum()) if s > 0 else 0.0


def test_report_from_tiny_sweep(tmp_path):
    spec = {"name": "tiny", "base": BASE, "ranks": 2,
            "grid": {"algorithm": [{"name": "psgd"}, {"name": "pr_sgd", "K": 2}], "seed": [0, 1]}}
    runs = sw.expand(spec)
    out = str(tmp_path / "tiny")
    sw.prepare(spec, runs, out)
    # all four runs in ONE mpiexec job (the same `qprsgd run CONFIG --out DIR` path --local uses)
    specs = [f"{r.name}={os.path.join(r.folder, 'config.yaml')}" for r in runs]
    mpirun(2, ["tests/mpi_runs.py", out] + specs, timeout=240)
    s = report.report_sweep(out, BWS, LATS)
    rep = os.path.join(out, "report")
    # every figure: loss/accuracy x epoch, round, bits, time at each bandwidth
    want = {f"{y}_vs_{x}.png" for y in ("loss", "accuracy") for x in ("epoch", "round", "bits", "time_5Mbps",
                                                                      "time_10Gbps")}
    assert {os.path.basename(p) for p in s["figures"]} == want
    for f in want:
        p = os.path.join(rep, f)
        assert os.path.getsize(p) > 1000
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(rep, "summary.md")).read()
    summ = json.load(open(os.path.join(rep, "summary.json")))
    assert summ["baseline"] == "psgd" and "`pr_sgd_K2`" in md
    tgt = summ["target_accuracy"]
    # default target: the best accuracy every run reaches
    best = []
    for r in runs:
        with h5py.File(os.path.join(r.folder, "run.h5"), "r") as f:
            best.append(float(np.nanmax(f["eval/test_accuracy"][:])))
    assert tgt == pytest.approx(min(best))
    # per label: bits and time to target = mean over seeds of numbers recomputed from the files
    for lab in summ["labels"]:
        members = [r for r in runs if r.label == lab["label"]]
        assert lab["runs"] == len(members) == 2
        bits, times = [], {}
        for r in members:
            h5 = os.path.join(r.folder, "run.h5")
            with h5py.File(h5, "r") as f:
                i = np.flatnonzero(f["eval/test_accuracy"][:] >= tgt)[0]
                bits.append(int(f["eval/bits_sent"][i]))
            for bw in (5e6, 10e9):
                for lat in (0.0, 0.01):
                    times.setdefault((bw, lat), []).append(recompute_time(h5, tgt, bw, lat))
        assert lab["bits"] == pytest.approx(np.mean(bits))
        for (bw, lat), ts in times.items():
            key = f"{'5Mbps' if bw == 5e6 else '10Gbps'}/{'0ms' if lat == 0 else '10ms'}"
            assert lab["time"][key] == pytest.approx(np.mean(ts), rel=1e-9)
            base = next(x for x in summ["labels"] if x["label"] == "psgd")["time"][key]
            assert lab["speedup"][key] == pytest.approx(base / np.mean(ts), rel=1e-9)
        # the markdown table shows the same numbers
        assert f"`{lab['label']}` | 2/2" in md
        assert f"{lab['time']['5Mbps/0ms']:.3g} s" in md
    # a single run: re-timing table printed for every network
    text = report.report_run(os.path.join(runs[0].folder, "run.h5"), BWS, LATS, tgt)
    for key in ("5Mbps/0ms", "5Mbps/10ms", "10Gbps/0ms", "10Gbps/10ms"):
        assert key in text
