"""HDF5 run log: the only module that imports h5py.  Rank 0 writes; schema in docs/logging.md.

Rows are buffered in memory and appended in one resize + write per group when ``flush()`` is
called (the worker loop flushes every ``flush_rows`` rows, at every evaluation, checkpoint and
at the end).  The writer holds the file open in SWMR mode (see :class:`Logger`), so readers
never block it and a SIGKILL leaves a file that a SWMR reader (:func:`open_log`, :func:`read`)
opens with every flushed row.

Resume: the rows logged up to a checkpoint are saved in the checkpoint (:meth:`Logger.snapshot`)
and a resumed run writes a fresh run.h5 from them (``Logger(path, ..., restore=snapshot)``), so
rows logged after the checkpoint (which the resumed run logs again, identically) are not
duplicated and a damaged or deleted run.h5 does not lose the run.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import h5py
import numpy as np

from .interrupt import deferred

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
    "bits_to_host": ("i8", "cumulative bits copied from device to host memory (run.device cuda / sim: "
                           "what the transport was handed; 0 on the CPU), all ranks"),
    "messages": ("i8", "cumulative messages handed to MPI, all ranks"),
    "wall_time": ("f8", "seconds since the run (or resumed run) started, on rank 0, plus time before resume"),
    "t_compute": ("f8", "seconds in forward/backward over this row's steps (max over ranks)"),
    "t_codec": ("f8", "seconds in encode/decode over this row's steps (max over ranks)"),
    "t_comm": ("f8", "seconds inside MPI over this row's steps (max over ranks)"),
    "t_comm_min": ("f8", "seconds inside MPI over this row's steps (min over ranks: the rank that "
                         "waited least for the others, closest to pure transfer time)"),
    "t_step": ("f8", "seconds for this row's steps (max over ranks)"),
    "t_copy": ("f8", "seconds copying vectors between device and host memory over this row's steps "
                     "(run.device cuda / sim; 0 on the CPU; max over ranks)"),
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


def _open_write(path: str, mode: str):
    # locking=False: the writer never takes (or waits for) HDF5's file lock, so a reader holding
    # the file -- with or without SWMR -- can never make the writer's open fail
    return h5py.File(path, mode, libver="latest", locking=False)


class Logger:
    """Rank 0's writer.  The file is created once (complete, under a temporary name, then renamed
    into place) and held open for the whole run in HDF5 SWMR mode (single writer, multiple
    readers): rows are appended with resize + write + flush, which SWMR readers see safely.
    ``write_array``/``set_attrs`` (topology at the start, final parameters and attrs at the end)
    leave SWMR mode for a moment (SWMR cannot create objects) and the next flush re-enters it.

    ``restore`` (a :meth:`snapshot` saved with a checkpoint) writes the rows logged before that
    checkpoint into the new file: a resumed run rebuilds its log from the checkpoint and never
    depends on the old run.h5 (which may be damaged, truncated or deleted).
    """

    def __init__(self, path: str, *, attrs: Optional[dict] = None, world_size: int = 1,
                 restore: Optional[dict] = None, arrays: Optional[dict] = None, flush_rows: int = 100):
        self.path = path
        self.world_size = world_size
        self.flush_rows = flush_rows
        self._buf = {"metrics": [], "eval": [], "per_rank": []}
        self._rows = {"metrics": 0, "eval": 0}
        tmp = path + ".tmp"
        f = _open_write(tmp, "w")
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["completed"] = False
        f.attrs["final_step"] = -1
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        for group, cols in (("metrics", METRIC_COLUMNS), ("eval", EVAL_COLUMNS)):
            g = f.create_group(group)
            for name, (dt, desc) in cols.items():
                ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
                ds.attrs["description"] = desc
        g = f["metrics"]
        for name, desc, width in _PER_RANK(world_size):
            ds = g.create_dataset(name, shape=(0, width), maxshape=(None, width), dtype="i8", chunks=(256, width))
            ds.attrs["description"] = desc
            if name.startswith("channel"):
                ds.attrs["channels"] = ",".join(CHANNELS)
        for name, (data, ds_attrs) in (arrays or {}).items():  # e.g. topology/W: before SWMR starts
            ds = f.create_dataset(name, data=data)
            for k, v in ds_attrs.items():
                ds.attrs[k] = v
        if restore:
            self._restore(f, restore)
        f.flush()
        f.swmr_mode = True  # readers may open it (swmr=True) from the moment it has its name
        os.replace(tmp, path)  # the open handle follows the rename
        self._f = f

    def _restore(self, f, snap: dict) -> None:
        for key, arr in snap.items():
            _, group, name = key.split("/", 2)
            ds = f[group][name]
            arr = np.asarray(arr)
            if arr.shape[1:] != ds.shape[1:]:
                raise ValueError(f"logger: checkpoint column {key} has shape {arr.shape}, the log {ds.shape}")
            ds.resize(arr.shape[0], axis=0)
            ds[...] = arr
        for group in ("metrics", "eval"):
            self._rows[group] = int(f[group]["step"].shape[0])

    # -- the open file ---------------------------------------------------------------------------
    def _swmr(self):
        if not self._f.swmr_mode:
            self._f.swmr_mode = True
        return self._f

    def _plain(self):
        """The file outside SWMR mode (to create objects): close and reopen it."""
        if self._f.swmr_mode:
            self._f.close()
            self._f = _open_write(self.path, "a")
        return self._f

    def close(self) -> None:
        if self._f is not None and self._f.id.valid:
            self.flush()
            self._f.close()

    # -- writing ---------------------------------------------------------------------------
    def set_attrs(self, **attrs) -> None:
        with deferred():
            f = self._plain()
            for k, v in attrs.items():
                f.attrs[k] = v
            f.flush()

    def write_array(self, name: str, data: np.ndarray, attrs: Optional[dict] = None) -> None:
        """Write (or replace) a whole dataset, e.g. ``topology/W`` or ``final/params``."""
        with deferred():
            f = self._plain()
            if name in f:
                del f[name]
            ds = f.create_dataset(name, data=data)
            for k, v in (attrs or {}).items():
                ds.attrs[k] = v
            f.flush()

    def record(self, group: str, row: dict, per_rank: Optional[tuple] = None) -> None:
        cols = METRIC_COLUMNS if group == "metrics" else EVAL_COLUMNS
        missing = set(cols) - set(row)
        extra = set(row) - set(cols)
        if missing or extra:
            raise ValueError(f"logger.record({group}): missing {sorted(missing)}, unknown {sorted(extra)}")
        with deferred():        # a row and its per-rank columns are buffered together
            self._buf[group].append(row)
            if group == "metrics":
                self._buf["per_rank"].append(per_rank)
        if len(self._buf["metrics"]) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not any(self._buf.values()):
            return
        with deferred():
            f = self._swmr()
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
                self._rows[group] += len(rows)
            pr = self._buf["per_rank"]
            if pr and pr[0] is not None:
                g = f["metrics"]
                for i, (name, _, _) in enumerate(_PER_RANK(self.world_size)):
                    ds = g[name]
                    n = ds.shape[0]
                    ds.resize(n + len(pr), axis=0)
                    ds[n:] = np.array([p[i] for p in pr], dtype="i8")
            f.flush()
            # cleared inside the block: a Ctrl-C held back until its end must not see these rows again
            self._buf = {"metrics": [], "eval": [], "per_rank": []}

    def rows(self) -> dict:
        """Rows written so far (after a flush): what a checkpoint records."""
        self.flush()
        return dict(self._rows)

    def snapshot(self) -> dict:
        """Every row written so far as ``{'log/<group>/<column>': array}`` (after a flush): saved
        with a checkpoint and given back as ``restore=`` when the run resumes."""
        self.flush()
        out = {}
        for group in ("metrics", "eval"):
            for name, ds in self._f[group].items():
                out[f"log/{group}/{name}"] = ds[()]
        return out


def _PER_RANK(world_size: int):
    return (("messages_per_rank", "cumulative messages each rank handed to MPI", world_size),
            ("bytes_per_rank", "cumulative bytes each rank handed to MPI", world_size),
            ("channel_bytes", "cumulative bytes handed to MPI per channel, summed over ranks", len(CHANNELS)),
            ("channel_messages", "cumulative messages per channel, summed over ranks", len(CHANNELS)))


def open_log(path: str, retries: int = 20):
    """Open a run log for reading -- also while its run is writing it.

    The reader recipe (docs/logging.md): ``h5py.File(path, "r", swmr=True)``.  A SWMR reader
    never blocks the writer and sees every flushed row (call ``ds.refresh()`` on a dataset to see
    rows appended after opening).  At the very end of a run the writer leaves SWMR mode for a
    moment to add ``final/params``; an open during that moment fails and is retried here.  A
    finished file, or one in an older format, is opened plainly."""
    last = None
    for i in range(retries + 1):
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError as e:
            last = e
        try:
            return h5py.File(path, "r", locking=False)
        except OSError as e:
            last = e
        if i < retries:
            time.sleep(0.05 * (i + 1))
    raise last


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
    """The run's file attributes only (``completed``, ``final_step``, ``config_yaml``, ...);
    safe while the run writes the file (:func:`open_log`)."""
    with open_log(path) as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def run_state(path: str) -> dict:
    """What a run's log says about its state, reading only attributes and last rows (cheap on big
    logs, and without HDF5 file locking so a log that rank 0 is appending to can be inspected):
    ``completed`` (the run reached its end), ``world_size``, ``last_step`` (last metrics row, 0 if
    none), ``final_step``, ``diverged`` and its ``divergence`` message.  Safe while the run writes
    (:func:`open_log`).  Raises OSError when the file cannot be read."""
    with open_log(path) as f:
        a = f.attrs
        step = f["metrics/step"] if "metrics/step" in f else None
        last = int(step[-1]) if step is not None and step.shape[0] else 0
        div = a.get("divergence", "")
        return {"completed": bool(a.get("completed", False)),
                "world_size": int(a["world_size"]) if "world_size" in a else None,
                "last_step": last, "final_step": int(a["final_step"]) if "final_step" in a else None,
                "diverged": bool(a.get("diverged", False)),
                "divergence": div.decode() if isinstance(div, bytes) else str(div)}


def read(path: str) -> dict:
    """Read a run log into plain numpy arrays: ``{'attrs': {...}, 'metrics': Columns, 'eval':
    Columns, ...}`` (one :class:`Columns` per group; datasets at the file's root under 'root').

    Safe while the run writes the file (SWMR, see :func:`open_log`); rows are whole rows."""
    out: dict = {}
    with open_log(path) as f:
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                grp, _, leaf = name.rpartition("/")
                g = out.setdefault(grp or "root", Columns())
                g[leaf] = obj[()]
                if len(obj.attrs):
                    g.attrs[leaf] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}

        f.visititems(visit)
    # a log read while its run writes it may catch a flush between two columns: keep the rows
    # that every column of a group already holds, so a reader always sees whole rows
    for group in ("metrics", "eval"):
        cols = {k: v for k, v in out.get(group, {}).items() if k != "_attrs" and np.ndim(v) >= 1}
        if cols:
            n = min(len(v) for v in cols.values())
            for k, v in cols.items():
                out[group][k] = v[:n]
    return out


def now() -> float:
    return time.perf_counter()
