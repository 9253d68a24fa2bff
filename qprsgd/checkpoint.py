"""Atomic, pickle-free checkpoints.

Layout under ``OUT/checkpoint/``: one ``rank{r}.step{t}.npz`` per rank (written to a temporary
name, then ``os.replace``d), and ``latest.json`` naming the step every rank has finished
writing -- rank 0 replaces it only after a barrier, so a kill at any moment leaves either the
previous complete checkpoint or the new one.  Files are read with ``allow_pickle=False``;
generator states are stored as JSON text, never pickled.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

import numpy as np


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


def load_rank(out_dir: str, rank: int, step: int) -> tuple[dict[str, np.ndarray], dict]:
    path = rank_file(out_dir, rank, step)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing (was the world size changed?)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
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
