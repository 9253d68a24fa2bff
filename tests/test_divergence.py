"""Divergence stops the run with exit 3 and one message naming step, loss and lr; the log keeps
completed=False and the sweep marks the run 'diverged' (issue 13, item 6)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from qprsgd.divergence import EXIT_DIVERGED, Detector, Diverged, explain


class FakeComm:
    """Stands for the world: the MAX reduction over ranks' 'my model is not finite' flags."""

    def __init__(self, others_bad=0.0):
        self.others_bad = others_bad
        self.calls = 0

    def allreduce_scalars(self, values, op="sum"):
        assert op == "max"
        self.calls += 1
        return np.array([max(values[0], self.others_bad)])


X = np.ones(5, np.float32)


def test_finite_decreasing_loss_carries_on():
    d = Detector()
    for t, loss in enumerate([2.3, 1.5, 0.7, 0.2, 1e-6, 3.0]):
        d.check(t, loss, 0.1, X, FakeComm())


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_naming_step_loss_lr(loss):
    d = Detector()
    d.check(10, 2.3, 0.5, X, FakeComm())
    with pytest.raises(Diverged) as ei:
        d.check(20, loss, 0.5, X, FakeComm())
    msg = str(ei.value)
    assert "step 20" in msg and f"train loss {loss}" in msg and "lr 0.5" in msg and "not finite" in msg


def test_exploding_loss_stops():
    d = Detector(factor=1e4)
    d.check(1, 2.0, 3.0, X, FakeComm())
    d.check(2, 19999.0, 3.0, X, FakeComm())  # just under 1e4 x the first row
    with pytest.raises(Diverged, match="exploded"):
        d.check(3, 20001.0, 3.0, X, FakeComm())
    # the reference is the untrained model's loss when given
    d = Detector(factor=1e4)
    d.reference(2.3)
    with pytest.raises(Diverged, match="starting loss 2.3"):
        d.check(1, 3.9e8, 1000.0, X, FakeComm())
    d.reference(float("nan"))  # ignored
    assert d.first == 2.3
    # a first loss near 0 is floored: ordinary noise afterwards is not an explosion
    d = Detector(factor=1e4, floor=1e-3)
    d.check(1, 1e-9, 0.1, X, FakeComm())
    d.check(2, 5.0, 0.1, X, FakeComm())
    with pytest.raises(Diverged):
        d.check(3, 11.0, 0.1, X, FakeComm())


def test_non_finite_model_anywhere_stops_every_rank():
    # this rank's model is fine but another rank's is not: the shared reduction stops this rank too
    d = Detector()
    with pytest.raises(Diverged, match="parameters are no longer finite"):
        d.check(7, 1.0, 0.1, X, FakeComm(others_bad=1.0))
    bad = X.copy()
    bad[3] = np.nan
    with pytest.raises(Diverged, match="parameters"):
        Detector().check(7, 1.0, 0.1, bad, FakeComm())


def test_row_without_gradients_checks_the_model_only():
    d = Detector()
    d.check(1, 2.0, 0.1, X, FakeComm())
    d.check(2, None, 0.1, X, FakeComm())  # no loss this row: nothing to judge
    with pytest.raises(Diverged, match="parameters"):
        d.check(3, None, 0.1, X, FakeComm(others_bad=1.0))


def test_detector_arguments_are_checked():
    for kw in ({"factor": 1.0}, {"factor": float("inf")}, {"floor": 0.0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Detector(**kw)


def test_explain_maps_failures_of_non_finite_models_only():
    bad = X.copy()
    bad[0] = np.inf
    d = explain(ValueError("codec: norm is not finite"), bad, 12, 0.3)
    assert isinstance(d, Diverged) and "step 12" in str(d) and "codec: norm" in str(d)
    assert explain(ValueError("a bug"), X, 12, 0.3) is None  # a finite model: a real failure
    e = Diverged(1, 2.0, 3.0, "x")
    assert explain(e, X, 1, 3.0) is e


@pytest.mark.mpi
def test_diverging_run_exits_3_and_sweep_marks_it(tmp_path):
    """A real 2-rank run at lr 1000 under `qprsgd sweep --local`: exit 3 with one message, run.h5
    holds its rows with completed=False, index.csv says diverged, and the sweep does not fail."""
    from conftest import mpi_env, ROOT
    import subprocess
    import sys
    import yaml
    spec = {"name": "dv", "ranks": 2,
            "base": {"seed": 0, "run": {"progress": False},
                     "train": {"epochs": 3, "batch_size": 8, "lr": 1000.0, "log_every": 5, "eval_every": 50},
                     "model": {"name": "mlp", "hidden": [16]},
                     "data": {"name": "digits", "params": {"max_train": 400, "max_test": 50}},
                     "algorithm": {"name": "psgd"}},
            "grid": {"seed": [0]}}
    (tmp_path / "dv.yaml").write_text(yaml.safe_dump(spec))
    p = subprocess.run([sys.executable, "-m", "qprsgd.cli", "sweep", str(tmp_path / "dv.yaml"), "--local",
                        "--out", str(tmp_path / "dv")], capture_output=True, text=True, env=mpi_env(),
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr  # a diverged run is a result, not a failed sweep
    rows = list(csv.DictReader(open(tmp_path / "dv" / "index.csv")))
    assert [r["status"] for r in rows] == ["diverged"]
    folder = tmp_path / "dv" / rows[0]["folder"]
    log = (folder / "stdout.log").read_text()
    assert log.count("qprsgd: the run diverged at step") == 1 and "lr 1000" in log and "Traceback" not in log
    from qprsgd.logger import read
    h = read(str(folder / "run.h5"))
    assert not h["attrs"]["completed"] and h["attrs"]["diverged"] and "final" not in h
    last = h["metrics"]["train_loss"][-1]
    assert h["metrics"]["step"][-1] < h["attrs"]["total_steps"]
    assert not np.isfinite(last) or last > 1e4 * h["eval"]["test_loss"][0]
    assert not (folder / ".qprsgd.lock").exists()
    assert EXIT_DIVERGED == 3
