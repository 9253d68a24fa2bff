"""Checkpoints are bound to their run and damaged state is refused with one message (issue 13,
item 4); a resume rebuilds run.h5 from the checkpoint, so a deleted log does not lose the run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import mpirun, run_qprsgd
from qprsgd import checkpoint as ckpt
from qprsgd import config
from qprsgd.logger import read

CFG = {"seed": 3, "run": {"progress": False},
       "train": {"epochs": 2, "batch_size": 8, "lr": 0.05, "checkpoint_every": 20, "log_every": 7,
                 "eval_every": 30},
       "model": {"name": "mlp", "hidden": [8]},
       "data": {"name": "digits", "params": {"max_train": 400, "max_test": 100}},
       "algorithm": {"name": "pr_sgd", "K": 3}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One real 2-rank run that wrote checkpoints (the last one before its final step)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    rc, out, err, h5 = run_qprsgd(2, CFG, tmp, name="run", timeout=240)
    return tmp / "run"


def copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


YAML = config.validate(CFG).to_yaml()


@pytest.mark.mpi
def test_intact_checkpoint_verifies(finished, tmp_path):
    d = copy(finished, tmp_path)
    info = ckpt.verify(str(d), YAML, 2)
    assert info["step"] > 0 and info["fingerprint"]["world_size"] == 2


def _latest(d):
    return d / "checkpoint" / "latest.json"


def _edit_latest(d, fn):
    info = json.loads(_latest(d).read_text())
    fn(info)
    _latest(d).write_text(json.dumps(info))


def _rank_file(d, r):
    return d / "checkpoint" / f"rank{r}.step{json.loads(_latest(d).read_text())['step']}.npz"


DAMAGE = {
    "other-config": (lambda d: None, dict(yaml=YAML.replace("lr: 0.05", "lr: 0.06")), "different config"),
    "other-world": (lambda d: None, dict(world=3), "different world size"),
    "other-code": (lambda d: _edit_latest(d, lambda i: i["fingerprint"].update(git_commit="0" * 40)), {},
                   "different code (git commit)"),
    "no-fingerprint": (lambda d: _edit_latest(d, lambda i: i.pop("fingerprint")), {}, "no fingerprint"),
    "garbled-latest": (lambda d: _latest(d).write_text('{"step": 16'), {}, "is damaged (JSONDecodeError"),
    "rows-0": (lambda d: _edit_latest(d, lambda i: i["rows"].update(metrics=0)), {}, "is damaged"),
    "rows-wrong": (lambda d: _edit_latest(d, lambda i: i["rows"].update(metrics=2)), {}, "inconsistent"),
    "truncated-npz": (lambda d: _rank_file(d, 1).write_bytes(_rank_file(d, 1).read_bytes()[:300]), {},
                      "rank1.step"),
    "flipped-byte": (lambda d: _flip(_rank_file(d, 0)), {}, "damaged"),
    "missing-rank": (lambda d: _rank_file(d, 1).unlink(), {}, "is missing"),
    "no-checkpoint": (lambda d: _latest(d).unlink(), {}, "holds no checkpoint"),
}


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.mpi
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_or_foreign_checkpoint_refused(finished, tmp_path, case):
    damage, kw, words = DAMAGE[case]
    d = copy(finished, tmp_path)
    damage(d)
    with pytest.raises(ckpt.CheckpointError) as ei:
        ckpt.verify(str(d), kw.get("yaml", YAML), kw.get("world", 2))
    assert words in str(ei.value) and len(str(ei.value)) < 1000, str(ei.value)


@pytest.mark.mpi
def test_resume_rebuilds_a_deleted_log_exactly(finished, tmp_path):
    """Resume from the last checkpoint with run.h5 deleted: the rebuilt log and final parameters
    equal the uninterrupted run's bit for bit."""
    d = copy(finished, tmp_path)
    ref = read(str(finished / "run.h5"))
    (d / "run.h5").unlink()
    rc, out, err = mpirun(2, ["-m", "qprsgd.cli", "run", str(finished.parent / "run.yaml"), "--out", str(d),
                              "--resume"], timeout=240)
    got = read(str(d / "run.h5"))
    assert got["attrs"]["completed"]
    np.testing.assert_array_equal(got["final"]["params"], ref["final"]["params"])
    for g in ("metrics", "eval"):
        for k, v in ref[g].items():
            if k != "_attrs" and k not in ("wall_time", "t_compute", "t_codec", "t_comm", "t_comm_min", "t_step"):
                np.testing.assert_array_equal(got[g][k], v, err_msg=f"{g}/{k}")
