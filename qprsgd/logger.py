"""HDF5 run log: the only module that imports h5py.  Rank 0 writes; schema in docs/logging.md.

Rows are buffered in memory and appended in one resize + write per group when ``flush()`` is
called (the worker loop flushes every ``flush_rows`` rows, at every evaluation, checkpoint and
at the end).  Each flush opens the file, appends, and closes it again, so a SIGKILL at any
other moment leaves a complete, readable file holding every flushed row.

Resume: ``Logger(path, ..., resume_rows={'metrics': n, 'eval': m})`` truncates each group to
the rows that existed at the checkpoint, so rows logged after it (which the resumed run will
log again, identically) are not duplicated.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import h5py
import numpy as np

SCHEMA_VERSION = 1

METRIC_COLUMNS = {
    # name: (dtype, description)
    "step": ("i8", "global step t after which the row was taken (1-based count of steps done)"),
    "epoch": ("f8", "passes over the training data (step / steps_per_epoch)"),
    "rounds": ("i8", "communication (synchronization) rounds completed"),
    "lr": ("f8", "learning rate used at this step"),
    "train_loss": ("f8", "mean training loss over workers and over the steps of this row"),
    "bits_sent": ("i8", "cumulative bits handed to MPI to send, all ranks, both directions"),
    "bits_up": ("i8", "cumulative bits worker -> server"),
    "bits_down": ("i8", "cumulative bits server -> workers"),
    "payload_bits": ("i8", "cumulative unpadded codec bits encoded (all ranks)"),
    "messages": ("i8", "cumulative messages handed to MPI, all ranks"),
    "wall_time": ("f8", "seconds since the run (or resumed run) started, on rank 0, plus time before resume"),
    "t_compute": ("f8", "seconds in forward/backward over this row's steps (max over ranks)"),
    "t_codec": ("f8", "seconds in encode/decode over this row's steps (max over ranks)"),
    "t_comm": ("f8", "seconds inside MPI over this row's steps (max over ranks)"),
    "t_comm_min": ("f8", "seconds inside MPI over this row's steps (min over ranks: the rank that "
                         "waited least for the others, closest to pure transfer time)"),
    "t_step": ("f8", "seconds for this row's steps (max over ranks)"),
    "steps": ("i8", "number of steps this row covers"),
}
EVAL_COLUMNS = {
    "step": ("i8", "steps done"),
    "epoch": ("f8", "passes over the data"),
    "rounds": ("i8", "communication rounds completed"),
    "test_loss": ("f8", "test loss summed over workers' test shards / samples"),
    "test_accuracy": ("f8", "correct / samples over workers' test shards"),
    "bits_sent": ("i8", "cumulative bits at this evaluation"),
    "wall_time": ("f8", "seconds, as in metrics"),
    "consensus": ("f8", "mean_i ||x_i - mean x||^2 / ||mean x||^2 over workers (0 when models agree)"),
}


CHANNELS = ("allreduce", "allgather", "alltoall", "peer", "up", "down", "other")
"""Columns of ``metrics/channel_bytes`` and ``metrics/channel_messages`` (see qprsgd/comm.py)."""


class Logger:
    def __init__(self, path: str, *, attrs: Optional[dict] = None, world_size: int = 1,
                 resume_rows: Optional[dict] = None, flush_rows: int = 100):
        self.path = path
        self.world_size = world_size
        self.flush_rows = flush_rows
        self._buf = {"metrics": [], "eval": [], "per_rank": []}
        if resume_rows is None:
            tmp = path + ".tmp"
            with h5py.File(tmp, "w") as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                for k, v in (attrs or {}).items():
                    f.attrs[k] = v
                for group, cols in (("metrics", METRIC_COLUMNS), ("eval", EVAL_COLUMNS)):
                    g = f.create_group(group)
                    for name, (dt, desc) in cols.items():
                        ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
                        ds.attrs["description"] = desc
                g = f["metrics"]
                for name, desc, width in (
                        ("messages_per_rank", "cumulative messages each rank handed to MPI", world_size),
                        ("bytes_per_rank", "cumulative bytes each rank handed to MPI", world_size),
                        ("channel_bytes", "cumulative bytes handed to MPI per channel, summed over ranks",
                         len(CHANNELS)),
                        ("channel_messages", "cumulative messages per channel, summed over ranks", len(CHANNELS))):
                    ds = g.create_dataset(name, shape=(0, width), maxshape=(None, width),
                                          dtype="i8", chunks=(256, width))
                    ds.attrs["description"] = desc
                    if name.startswith("channel"):
                        ds.attrs["channels"] = ",".join(CHANNELS)
            os.replace(tmp, path)
        else:
            with h5py.File(path, "a") as f:
                for group, n in resume_rows.items():
                    for ds in f[group].values():
                        if isinstance(ds, h5py.Dataset) and ds.shape[0] > n:
                            ds.resize(n, axis=0)
                if "final" in f:
                    del f["final"]

    # -- writing ---------------------------------------------------------------------------
    def set_attrs(self, **attrs) -> None:
        with h5py.File(self.path, "a") as f:
            for k, v in attrs.items():
                f.attrs[k] = v

    def write_array(self, name: str, data: np.ndarray, attrs: Optional[dict] = None) -> None:
        """Write (or replace) a whole dataset, e.g. ``topology/W`` or ``final/params``."""
        with h5py.File(self.path, "a") as f:
            if name in f:
                del f[name]
            ds = f.create_dataset(name, data=data)
            for k, v in (attrs or {}).items():
                ds.attrs[k] = v

    def record(self, group: str, row: dict, per_rank: Optional[tuple] = None) -> None:
        cols = METRIC_COLUMNS if group == "metrics" else EVAL_COLUMNS
        missing = set(cols) - set(row)
        extra = set(row) - set(cols)
        if missing or extra:
            raise ValueError(f"logger.record({group}): missing {sorted(missing)}, unknown {sorted(extra)}")
        self._buf[group].append(row)
        if group == "metrics":
            self._buf["per_rank"].append(per_rank)
        if len(self._buf["metrics"]) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not any(self._buf.values()):
            return
        with h5py.File(self.path, "a") as f:
            for group, cols in (("metrics", METRIC_COLUMNS), ("eval", EVAL_COLUMNS)):
                rows = self._buf[group]
                if not rows:
                    continue
                g = f[group]
                for name, (dt, _) in cols.items():
                    ds = g[name]
                    n = ds.shape[0]
                    ds.resize(n + len(rows), axis=0)
                    ds[n:] = np.array([r[name] for r in rows], dtype=dt)
            pr = self._buf["per_rank"]
            if pr and pr[0] is not None:
                g = f["metrics"]
                for i, name in enumerate(("messages_per_rank", "bytes_per_rank", "channel_bytes",
                                          "channel_messages")):
                    ds = g[name]
                    n = ds.shape[0]
                    ds.resize(n + len(pr), axis=0)
                    ds[n:] = np.array([p[i] for p in pr], dtype="i8")
            f.flush()
        self._buf = {"metrics": [], "eval": [], "per_rank": []}

    def rows(self) -> dict:
        """Rows already in the file (after a flush): what a checkpoint records."""
        self.flush()
        with h5py.File(self.path, "r") as f:
            return {g: int(f[g]["step"].shape[0]) for g in ("metrics", "eval")}


def read(path: str) -> dict:
    """Read a run log into plain numpy arrays: {'attrs': {...}, 'metrics': {...}, 'eval': {...}, ...}."""
    out: dict = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                grp, _, leaf = name.rpartition("/")
                out.setdefault(grp or "root", {})[leaf] = obj[()]
                for k, v in obj.attrs.items():
                    out.setdefault(grp or "root", {}).setdefault("_attrs", {}).setdefault(leaf, {})[k] = v

        f.visititems(visit)
    return out


def now() -> float:
    return time.perf_counter()
