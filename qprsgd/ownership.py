"""One owner per output folder: ``OUT/.qprsgd.lock``.

``qprsgd run`` (rank 0) creates the lock file atomically (``O_CREAT | O_EXCL``) before it touches
anything in the folder and removes it when the run ends (done, refused, diverged or a caught
error).  It holds JSON ``{host, pid, job, started, argv}``; ``job`` is the batch system's job id
(``SLURM_JOB_ID``, ``PBS_JOBID``, ``LSB_JOBID``) or empty.

A second job into the same folder is refused, naming the owner.  Stale locks -- a job that was
killed (SIGKILL, node failure, MPI abort) cannot remove its lock -- are handled explicitly:

* same host, and the owner pid no longer exists: the lock is stale; it is taken over and a
  note names the dead owner (safe: a dead process writes nothing);
* another host: this host cannot see that process, so the lock is never broken automatically;
  the message names the owner and says to delete the lock file once that job is known to be
  gone (e.g. ``squeue -j JOB`` shows nothing);
* an unreadable lock file (a job killed between creating and writing it): refused, naming the file.

Decision: no time-based expiry -- a long run on another host must never lose its folder.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

LOCK_NAME = ".qprsgd.lock"
JOB_ENV = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class FolderInUse(ValueError):
    """The output folder is owned by another (live, or unverifiable) job."""


def job_id() -> str:
    for k in JOB_ENV:
        if os.environ.get(k):
            return f"{k}={os.environ[k]}"
    return ""


def lock_path(out_dir: str) -> str:
    return os.path.join(out_dir, LOCK_NAME)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(owner: dict) -> str:
    job = f", job {owner['job']}" if owner.get("job") else ""
    return f"host {owner.get('host')!s:.80}, pid {owner.get('pid')!s:.20}{job:.80}, since {owner.get('started')!s:.40}"


@dataclass
class Lock:
    path: str
    owner: dict
    note: Optional[str] = None  # set when a stale lock was taken over

    def release(self) -> None:
        """Remove the lock if it is still ours (never another job's)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                cur = json.load(f)
        except (OSError, ValueError):
            return
        if cur.get("host") == self.owner["host"] and cur.get("pid") == self.owner["pid"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def acquire(out_dir: str) -> Lock:
    """Create ``out_dir`` (if needed) and take its lock, or raise :class:`FolderInUse`."""
    os.makedirs(out_dir, exist_ok=True)
    path = lock_path(out_dir)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": " ".join(sys.argv)[:500]}
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:
                raise FolderInUse(f"--out {out_dir}: lock file {path} exists but is unreadable; if no job "
                                  f"uses this folder, delete it") from None
            if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                    and not _alive(owner["pid"]):
                if _take_stale(path, owner):
                    note = f"took over the stale lock of a dead job ({_describe(owner)})"
                continue
            raise FolderInUse(f"--out {out_dir} is in use by another job ({_describe(owner)}); lock file "
                              f"{path}. Wait for it, choose another --out, or delete the lock file if that "
                              f"job is gone") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return Lock(path, me, note)
    raise FolderInUse(f"--out {out_dir}: could not take the lock {path} (another job keeps taking it)")


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.loads(f.read(4096))
        return owner if isinstance(owner, dict) else None
    except FileNotFoundError:
        return {}  # released meanwhile: the caller retries
    except (OSError, ValueError):
        return None


def _take_stale(path: str, owner: dict) -> bool:
    """Move a stale lock aside atomically; put it back if it turned out not to be that owner's."""
    if not owner:
        return False
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != owner:  # another job took the folder between our read and rename
        os.rename(aside, path)
        return False
    os.remove(aside)
    return True
