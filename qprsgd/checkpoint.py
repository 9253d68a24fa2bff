"""Atomic, pickle-free checkpoints.

Layout under ``OUT/checkpoint/``: one ``rank{r}.step{t}.npz`` per rank (written to a temporary
name, then ``os.replace``d), and ``latest.json`` naming the step every rank has finished
writing -- rank 0 replaces it only after a barrier, so a kill at any moment leaves either the
previous complete checkpoint or the new one.  Files are read with ``allow_pickle=False``;
generator states are stored as JSON text, never pickled.

A checkpoint is bound to its run: ``latest.json`` holds a :func:`fingerprint` (hash of the
normalized config, world size, package version, git commit) and :func:`verify` -- run on rank 0
before any rank works -- refuses a resume whose fingerprint differs, and refuses damaged state
(garbled ``latest.json``, a missing, truncated or foreign rank file, row counts that disagree
with the saved log) with one :class:`CheckpointError` message.  Rank 0's file also holds every
log row written up to the checkpoint (``log/<group>/<column>``, see
:meth:`qprsgd.logger.Logger.snapshot`), from which a resumed run rebuilds run.h5.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile
from functools import lru_cache
from typing import Any, Optional

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run (the message says why)."""


FINGERPRINT_KEYS = ("config_sha256", "world_size", "version", "git_commit")


def fingerprint(config_yaml: str, world_size: int) -> dict:
    """What binds a checkpoint to its run: the normalized config, the world size, the code."""
    from . import __version__
    return {"config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
            "world_size": int(world_size), "version": __version__, "git_commit": _git_commit()}


@lru_cache(maxsize=1)
def _git_commit() -> str:
    from .experiment import git_commit
    return git_commit()


def _dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoint")


def rank_file(out_dir: str, rank: int, step: int) -> str:
    return os.path.join(_dir(out_dir), f"rank{rank}.step{step}.npz")


def save_rank(out_dir: str, rank: int, step: int, arrays: dict[str, Any], meta: dict) -> None:
    os.makedirs(_dir(out_dir), exist_ok=True)
    path = rank_file(out_dir, rank, step)
    tmp = path + ".tmp.npz"
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload["__meta__"] = np.array(json.dumps(meta))
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(out_dir: str, step: int, info: dict) -> None:
    """Rank 0, after every rank saved ``step``: point latest.json at it, drop older files."""
    d = _dir(out_dir)
    tmp = os.path.join(d, "latest.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, **info}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(d, "latest.json"))
    for p in glob.glob(os.path.join(d, "rank*.step*.npz")):
        if not p.endswith(f".step{step}.npz"):
            os.remove(p)


def latest(out_dir: str) -> Optional[dict]:
    p = os.path.join(_dir(out_dir), "latest.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def holds_run(out_dir: str) -> bool:
    """Whether a folder holds (part of) a run: a log or checkpoint files."""
    return (os.path.exists(os.path.join(out_dir, "run.h5"))
            or bool(glob.glob(os.path.join(_dir(out_dir), "*"))))


def clear(out_dir: str) -> None:
    """``--force``: remove a folder's previous run (log and every checkpoint file)."""
    for p in [os.path.join(out_dir, "run.h5"), os.path.join(out_dir, "run.h5.tmp")] + \
            glob.glob(os.path.join(_dir(out_dir), "*")):
        if os.path.isfile(p) or os.path.islink(p):
            os.remove(p)


def _read_latest(out_dir: str) -> dict:
    p = os.path.join(_dir(out_dir), "latest.json")
    if not os.path.exists(p):
        raise CheckpointError(
            f"--resume: {out_dir} holds no checkpoint ({p} does not exist); run without --resume "
            f"(with --force if the folder holds an old run) to start afresh")
    try:
        with open(p, encoding="utf-8") as f:
            info = json.loads(f.read(1 << 20))
        step = info["step"]
        rows = info["rows"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step {step!r} is not a positive integer")
        if not (isinstance(rows, dict) and all(isinstance(rows.get(g), int) and not isinstance(rows.get(g), bool)
                                               and rows[g] >= 1 for g in ("metrics", "eval"))):
            raise ValueError(f"rows {str(rows)[:200]} is not {{'metrics': n >= 1, 'eval': m >= 1}}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--resume: checkpoint {p} is damaged ({type(e).__name__}: {str(e)[:300]}); "
                              f"start afresh with --force") from None
    return info


def verify(out_dir: str, config_yaml: str, world_size: int) -> dict:
    """Rank 0, before any rank works: the folder's newest checkpoint belongs to this run and is
    whole.  Returns latest.json's content; raises :class:`CheckpointError` naming the problem."""
    info = _read_latest(out_dir)
    step = int(info["step"])
    fp = info.get("fingerprint")
    if not isinstance(fp, dict):
        raise CheckpointError(f"--resume: {out_dir}'s checkpoint carries no fingerprint (written by an "
                              f"older qprsgd?), so it cannot be shown to belong to this run; start afresh with --force")
    mine = fingerprint(config_yaml, world_size)
    what = {"config_sha256": "config (hash of the normalized config)", "world_size": "world size (ranks)",
            "version": "qprsgd version", "git_commit": "code (git commit)"}
    for k in FINGERPRINT_KEYS:
        if fp.get(k) != mine[k]:
            raise CheckpointError(f"--resume: the checkpoint in {out_dir} was written with a different "
                                  f"{what[k]}: {str(fp.get(k))[:80]}, this run has {mine[k]}; resuming would mix "
                                  f"two runs (start afresh with --force)")
    for r in range(world_size):
        path = rank_file(out_dir, r, step)
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: checkpoint file {path} is missing (latest.json names step {step} "
                                  f"for {world_size} ranks); start afresh with --force")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}  # reads every member: the zip CRCs are checked
            meta = json.loads(str(arrays.pop("__meta__")))
            if int(meta["t"]) != step:
                raise ValueError(f"it holds step {meta['t']}, latest.json names {step}")
        except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"--resume: checkpoint file {path} is damaged ({type(e).__name__}: "
                                  f"{str(e)[:300]}); start afresh with --force") from None
        if r == 0:
            _check_log(path, arrays, info["rows"], step)
    return info


def _check_log(path: str, arrays: dict, rows: dict, step: int) -> None:
    for g in ("metrics", "eval"):
        cols = {k: v for k, v in arrays.items() if k.startswith(f"log/{g}/")}
        lens = {len(v) for v in cols.values()}
        if not cols or lens != {rows[g]}:
            raise CheckpointError(f"--resume: checkpoint {path} holds {sorted(lens)} {g} log rows but latest.json "
                                  f"says {rows[g]}; the checkpoint is inconsistent (start afresh with --force)")
    last = int(arrays["log/metrics/step"][-1])
    if last != step:
        raise CheckpointError(f"--resume: checkpoint {path}: the last metrics row is at step {last}, the "
                              f"checkpoint at step {step}; the checkpoint is inconsistent (start afresh with --force)")


def load_log(out_dir: str, step: int) -> dict:
    """The log rows saved with rank 0's checkpoint at ``step`` (for ``Logger(restore=...)``)."""
    with np.load(rank_file(out_dir, 0, step), allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith("log/")}


def load_rank(out_dir: str, rank: int, step: int) -> tuple[dict[str, np.ndarray], dict]:
    path = rank_file(out_dir, rank, step)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing (was the world size changed?)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__" and not k.startswith("log/")}
        meta = json.loads(str(z["__meta__"]))
    return arrays, meta


def rng_state(gen: np.random.Generator) -> str:
    """A numpy Generator's state as JSON text (128-bit integers kept exact)."""
    return json.dumps(gen.bit_generator.state, default=str)


def set_rng_state(gen: np.random.Generator, text: str) -> None:
    st = json.loads(str(text))

    def fix(o):
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, str) and o.lstrip("-").isdigit():
            return int(o)
        return o

    gen.bit_generator.state = fix(st)
