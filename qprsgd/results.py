"""Results as pandas DataFrames: a run, a sweep, or any folder of runs.

    from qprsgd import results
    res = results.load("results/demo")          # a sweep folder, a run folder or a run.h5
    res.runs      # one row per run: name, label, status, run attributes and every config key
    res.metrics   # one row per (run, metrics row); 2-D columns split: channel_bytes.allreduce, ...
    res.eval      # one row per (run, evaluation)

    qprsgd export results/demo --csv      # results/demo/export/{runs,metrics,eval}.csv
    qprsgd export results/demo --parquet  # the same as Parquet (needs pyarrow: pip install 'qprsgd[parquet]')

Columns of ``runs``:

* ``run`` (the folder name), ``label`` (the sweep's label, or the algorithm and codec),
  ``path`` (the run.h5), ``completed`` (the run wrote its final parameters);
* the run's HDF5 attributes (``algorithm``, ``codec``, ``world_size``, ``d``, ``steps_per_epoch``,
  ``total_steps``, ``git_commit``, ...); ``M`` = number of workers; array attributes
  (``workers``, ``blocks``) as JSON text;
* every key of the normalized config, dotted (``train.lr``, ``algorithm.K``, ``model.hidden``);
  a list value is JSON text; ``config_yaml`` itself is left out (its keys are all there);
* headline numbers: ``final_accuracy``, ``best_accuracy``, ``final_test_loss``, ``steps``,
  ``rounds``, ``bits_sent``, ``wall_time`` (the last evaluation).

``metrics`` and ``eval`` start with the ``run`` column, then the columns of docs/logging.md.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .logger import EVAL_COLUMNS, METRIC_COLUMNS, read


class ResultsError(ValueError):
    pass


# -- finding runs --------------------------------------------------------------------------------
def find_runs(path: str) -> list[tuple[str, Optional[str], str]]:
    """``[(name, sweep label or None, run.h5)]`` for a run.h5, a run folder or a folder of runs.

    A sweep folder (with ``sweep.json``) lists its runs in sweep order, with their labels;
    another folder lists ``*/run.h5`` in name order."""
    if os.path.isfile(path):
        if not path.endswith(".h5"):
            raise ResultsError(f"{path!r} is a file but not an HDF5 run log (run.h5)")
        return [(os.path.basename(os.path.dirname(os.path.abspath(path))), None, path)]
    if not os.path.isdir(path):
        raise ResultsError(f"{path!r} does not exist")
    own = os.path.join(path, "run.h5")
    if os.path.exists(own):
        return [(os.path.basename(os.path.abspath(path)), None, own)]
    entries = []
    pj = os.path.join(path, "sweep.json")
    if os.path.exists(pj):
        with open(pj) as f:
            plan = json.load(f)
        for r in plan.get("runs", []):
            h5 = os.path.join(path, r["name"], "run.h5")
            if os.path.exists(h5):
                entries.append((r["name"], r.get("label"), h5))
    else:
        for h5 in sorted(glob.glob(os.path.join(path, "*", "run.h5"))):
            entries.append((os.path.basename(os.path.dirname(h5)), None, h5))
    if not entries:
        raise ResultsError(f"{path}: no run.h5 here nor in any sub-folder (run the sweep first)")
    return entries


# -- flattening ----------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mapping -> ``{dotted.key: value}``; lists become JSON text, None stays None."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = "{}"
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def config_of(log: dict) -> dict:
    """The run's normalized config (from the ``config_yaml`` attribute) as a nested dict."""
    import yaml
    text = log["attrs"].get("config_yaml", "")
    try:
        cfg = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def _plain(v):
    if isinstance(v, np.ndarray):
        return json.dumps(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def columns_of(group, order: tuple = ()) -> dict:
    """A log group as 1-D columns: a 2-D dataset ``x`` becomes ``x.<name>`` per column (the
    dataset's ``channels`` attribute names them) or ``x.<index>``.  Columns named in ``order``
    come first, in that order."""
    attrs = getattr(group, "attrs", {}) or {}
    out = {}
    names = [n for n in order if n in group] + sorted(n for n in group if n not in order)
    for name in names:
        arr = group[name]
        a = np.asarray(arr)
        if a.ndim == 1:
            out[name] = a
        elif a.ndim == 2:
            names = attrs.get(name, {}).get("channels")
            names = str(names).split(",") if names else [str(i) for i in range(a.shape[1])]
            if len(names) != a.shape[1]:
                names = [str(i) for i in range(a.shape[1])]
            for i, n in enumerate(names):
                out[f"{name}.{n}"] = a[:, i]
        # scalars and higher dimensions are not per-row columns: left out
    return out


def run_row(name: str, label: Optional[str], h5: str, log: dict) -> dict:
    a = log["attrs"]
    row = {"run": name,
           "label": label or (str(a.get("algorithm", name)) + (f"+{a['codec']}" if a.get("codec") else "")),
           "path": h5, "completed": bool(a.get("completed", False))}
    for k, v in a.items():
        if k in ("config_yaml", "completed"):
            continue
        row[k] = _plain(v)
    workers = a.get("workers")
    row["M"] = int(len(np.atleast_1d(workers))) if workers is not None else int(a.get("world_size", 1))
    row.update(flatten(config_of(log)))
    ev = log.get("eval", {})
    n = len(ev.get("step", []))
    acc = np.asarray(ev.get("test_accuracy", []), float)
    row.update(final_accuracy=float(acc[-1]) if n else np.nan,
               best_accuracy=float(np.nanmax(acc)) if n and np.isfinite(acc).any() else np.nan,
               final_test_loss=float(ev["test_loss"][-1]) if n else np.nan,
               steps=int(ev["step"][-1]) if n else 0, rounds=int(ev["rounds"][-1]) if n else 0,
               bits_sent=int(ev["bits_sent"][-1]) if n else 0,
               wall_time=float(ev["wall_time"][-1]) if n else np.nan)
    return row


# -- loading -------------------------------------------------------------------------------------
@dataclass
class Results:
    runs: "object"      # pandas.DataFrame, one row per run
    metrics: "object"   # pandas.DataFrame, long: run + metrics columns
    eval: "object"      # pandas.DataFrame, long: run + eval columns

    def run(self, name: str) -> "Results":
        """The rows of one run."""
        return Results(self.runs[self.runs["run"] == name].reset_index(drop=True),
                       self.metrics[self.metrics["run"] == name].reset_index(drop=True),
                       self.eval[self.eval["run"] == name].reset_index(drop=True))


def load(path: str) -> Results:
    """A run.h5, a run folder, a sweep folder or any folder of ``*/run.h5`` as DataFrames."""
    import pandas as pd
    rows, mets, evs = [], [], []
    for name, label, h5 in find_runs(path):
        log = read(h5)
        rows.append(run_row(name, label, h5, log))
        for group, acc in (("metrics", mets), ("eval", evs)):
            cols = columns_of(log.get(group, {}), tuple(METRIC_COLUMNS if group == "metrics" else EVAL_COLUMNS))
            df = pd.DataFrame(cols)
            df.insert(0, "run", name)
            acc.append(df)
    runs = pd.DataFrame(rows)
    return Results(runs, pd.concat(mets, ignore_index=True), pd.concat(evs, ignore_index=True))


# -- export --------------------------------------------------------------------------------------
FORMATS = ("csv", "parquet")


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def export(path: str, fmt: str = "csv", out: Optional[str] = None) -> list[str]:
    """Write ``runs``, ``metrics`` and ``eval`` as CSV or Parquet files; returns their paths.

    ``out`` defaults to ``<folder>/export`` (a run.h5's folder for a file).  Parquet needs
    pyarrow (an optional dependency: ``pip install 'qprsgd[parquet]'``); without it this
    raises ResultsError before writing anything."""
    if fmt not in FORMATS:
        raise ResultsError(f"format: one of {', '.join(FORMATS)} (got {fmt!r})")
    if fmt == "parquet" and not parquet_available():
        raise ResultsError("--parquet needs pyarrow, which is not installed "
                           "(pip install 'qprsgd[parquet]' or pip install pyarrow); --csv needs nothing more")
    res = load(path)
    if out is None:
        folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
        out = os.path.join(folder, "export")
    os.makedirs(out, exist_ok=True)
    paths = []
    for name in ("runs", "metrics", "eval"):
        df = getattr(res, name)
        p = os.path.join(out, f"{name}.{fmt}")
        if fmt == "csv":
            df.to_csv(p, index=False)
        else:
            df.to_parquet(p, index=False)
        paths.append(p)
    return paths


def read_export(folder: str, fmt: str = "csv") -> Results:
    """Read back what :func:`export` wrote."""
    import pandas as pd
    rd = pd.read_csv if fmt == "csv" else pd.read_parquet
    return Results(*(rd(os.path.join(folder, f"{n}.{fmt}")) for n in ("runs", "metrics", "eval")))


# -- CLI -----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's or a sweep's runs, metrics and eval tables as CSV or Parquet")
    p.add_argument("path", help="a run.h5, a run folder or a sweep results folder")
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv", help="comma-separated text")
    fmt.add_argument("--parquet", dest="fmt", action="store_const", const="parquet",
                     help="Apache Parquet (needs pyarrow)")
    p.add_argument("--out", default=None, help="folder for the files (default PATH/export)")


def main(args) -> int:
    import sys
    try:
        paths = export(args.path, args.fmt, args.out)
    except ResultsError as e:
        print(f"qprsgd export: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0
