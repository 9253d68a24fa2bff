"""One owner per output folder; a new run never silently reuses a folder's old run (issue 13, item 3)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, mpi_env
from qprsgd import ownership
from test_config_errors import verdict


def test_second_owner_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qprsgd.ownership import acquire; "
         f"acquire({str(out)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**mpi_env(), "SLURM_JOB_ID": "4242"}, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ownership.FolderInUse) as ei:
            ownership.acquire(str(out))
        msg = str(ei.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "SLURM_JOB_ID=4242" in msg
        # the same refusal reaches qprsgd run as a verdict (exit 2), and the lock stays the holder's
        v = verdict(tmp_path)
        assert not v["ok"] and v["code"] == 2 and f"pid {holder.pid}" in v["error"]
        assert json.loads((out / ownership.LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now (SIGKILL: it could not remove its lock): stale on this host, taken over
    lock = ownership.acquire(str(out))
    assert lock.note and f"pid {holder.pid}" in lock.note
    assert json.loads((out / ownership.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / ownership.LOCK_NAME).exists()


def test_lock_of_another_host_is_never_broken(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ownership.LOCK_NAME).write_text(json.dumps({"host": "node-17.cluster", "pid": 1, "job": "",
                                                       "started": "2026-01-01T00:00:00"}))
    with pytest.raises(ownership.FolderInUse, match="node-17.cluster.*delete the lock file"):
        ownership.acquire(str(out))
    (out / ownership.LOCK_NAME).write_text("")  # killed between create and write
    with pytest.raises(ownership.FolderInUse, match="unreadable"):
        ownership.acquire(str(out))


def test_release_never_removes_another_owners_lock(tmp_path):
    lock = ownership.acquire(str(tmp_path))
    (tmp_path / ownership.LOCK_NAME).write_text(json.dumps({"host": "x", "pid": 7}))
    lock.release()
    assert (tmp_path / ownership.LOCK_NAME).exists()


def _fake_old_run(out):
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "latest.json").write_text('{"step": 5}')
    (out / "checkpoint" / "rank0.step5.npz").write_bytes(b"x")
    (out / "run.h5").write_bytes(b"old")


def test_new_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "out"
    _fake_old_run(out)
    v = verdict(tmp_path)
    assert not v["ok"] and v["code"] == 2 and "already holds a run" in v["error"] and "--force" in v["error"]
    assert (out / "checkpoint" / "latest.json").exists() and (out / "run.h5").read_bytes() == b"old"
    assert not (out / ownership.LOCK_NAME).exists()  # a refused run leaves no lock behind
    # --force clears the old checkpoints and log
    v = verdict(tmp_path, force=True)
    assert v["ok"], v
    from qprsgd import cli
    cli._release_lock()
    assert not (out / "run.h5").exists() and not list((out / "checkpoint").iterdir())


def test_resume_without_checkpoint_is_refused(tmp_path):
    from qprsgd import cli
    out = tmp_path / "out"
    out.mkdir()
    from conftest import write_config
    from test_config_errors import GOOD
    from qprsgd import config
    (out / "config.yaml").write_text(config.validate(GOOD).to_yaml())
    import argparse
    args = argparse.Namespace(config=str(write_config(tmp_path / "c.yaml", GOOD)), set=[], out=str(out),
                              resume=True, force=False)
    v = cli._verdict(args, 2)
    assert not v["ok"] and v["code"] == 2 and "holds no checkpoint" in v["error"], v
    args.force = True
    v = cli._verdict(args, 2)
    assert not v["ok"] and "contradict" in v["error"]
