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
import signal
import threading
import time
from contextlib import contextmanager
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


CHANNELS = ("allreduce", "allgather", "peer", "up", "down", "other")
"""Columns of ``metrics/channel_bytes`` and ``metrics/channel_messages`` (see qprsgd/comm.py)."""


@contextmanager
def _sigint_deferred():
    """Hold back Ctrl-C (SIGINT) while a write is half done: the signal stays pending and Python
    raises KeyboardInterrupt right after the block, so the file always holds whole rows."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
            with _sigint_deferred(), h5py.File(path, "a") as f:
                for group, n in resume_rows.items():
                    for ds in f[group].values():
                        if isinstance(ds, h5py.Dataset) and ds.shape[0] > n:
                            ds.resize(n, axis=0)
                if "final" in f:
                    del f["final"]

    # -- writing ---------------------------------------------------------------------------
    def set_attrs(self, **attrs) -> None:
        with _sigint_deferred(), h5py.File(self.path, "a") as f:
            for k, v in attrs.items():
                f.attrs[k] = v

    def write_array(self, name: str, data: np.ndarray, attrs: Optional[dict] = None) -> None:
        """Write (or replace) a whole dataset, e.g. ``topology/W`` or ``final/params``."""
        with _sigint_deferred(), h5py.File(self.path, "a") as f:
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
        with _sigint_deferred():        # a row and its per-rank columns are buffered together
            self._buf[group].append(row)
            if group == "metrics":
                self._buf["per_rank"].append(per_rank)
        if len(self._buf["metrics"]) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not any(self._buf.values()):
            return
        with _sigint_deferred(), h5py.File(self.path, "a") as f:
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
            # cleared inside the block: a Ctrl-C held back until its end must not see these rows again
            self._buf = {"metrics": [], "eval": [], "per_rank": []}

    def rows(self) -> dict:
        """Rows already in the file (after a flush): what a checkpoint records."""
        self.flush()
        with h5py.File(self.path, "r") as f:
            return {g: int(f[g]["step"].shape[0]) for g in ("metrics", "eval")}


class Columns(dict):
    """One HDF5 group read back: ``{column: numpy array}``, and the datasets' HDF5 attributes in
    ``.attrs`` (``{column: {attr: value}}``).

    Only datasets are keys, so a group of 1-D columns goes straight into
    ``pandas.DataFrame(log["eval"])`` (2-D columns such as ``metrics/channel_bytes`` need
    ``qprsgd.results``, which splits them into one column each).  For code written before this
    class, ``group["_attrs"]`` and ``group.get("_attrs")`` still return ``.attrs``; ``"_attrs"``
    is not a key, so iteration and ``len`` see columns only.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.attrs: dict = {}

    def __missing__(self, key):
        if key == "_attrs":
            return self.attrs
        raise KeyError(key)

    def get(self, key, default=None):
        if key == "_attrs":
            return self.attrs
        return super().get(key, default)


def read_attrs(path: str) -> dict:
    """The run's file attributes only (``completed``, ``final_step``, ``config_yaml``, ...)."""
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read(path: str) -> dict:
    """Read a run log into plain numpy arrays: ``{'attrs': {...}, 'metrics': Columns, 'eval':
    Columns, ...}`` (one :class:`Columns` per group; datasets at the file's root under 'root')."""
    out: dict = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                grp, _, leaf = name.rpartition("/")
                g = out.setdefault(grp or "root", Columns())
                g[leaf] = obj[()]
                if len(obj.attrs):
                    g.attrs[leaf] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}

        f.visititems(visit)
    return out


def now() -> float:
    return time.perf_counter()
