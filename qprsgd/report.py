"""``qprsgd report``: re-time a logged run under other networks, or report a folder of runs.

    qprsgd report RUN/run.h5 [--bandwidth 5Mbps,100Mbps,10Gbps] [--latency 0.1ms,10ms] [--target 0.9]
    qprsgd report FOLDER     [--bandwidth ...] [--latency ...] [--target ...] [--out DIR] [--format png,svg,pdf]

A run.h5: prints, for every (bandwidth, latency), the modelled time of the whole run and to the
target accuracy (qprsgd/network.py: measured local work + modelled comm), next to the measured
wall time and comm time.  Nothing is re-run.

A folder (a sweep's results, a single run's folder, or any folder of ``*/run.h5``):

* **Comparable sets.**  Runs are only compared when they share the model, the data, the number
  of workers M and the schedule (``model.*``, ``data.*`` except ``data_dir``, M,
  ``train.epochs``, ``train.batch_size``, ``train.schedule.*``).  A folder holding several such
  sets gets one report per set (``<out>/<set>/``, named by what differs, e.g. ``M4-epochs10``)
  and the terminal lists what differs between the sets.
* **Labels.**  Inside a set, runs that differ only in ``seed`` are repeats of one *label*; every
  other config key that takes two or more values in the set (algorithm and its parameters,
  codec, topology, ``train.lr``, ...) is part of the label: ``qpr_sgd K=4 codec=qsgd``.
  Bookkeeping keys (``run.*`` but ``run.server``, ``train.eval_every``, ``log_every``,
  ``checkpoint_every``, ``target_accuracy``, ``data.data_dir``) never split or join runs.
* **Repeats** are averaged; tables show the mean and, over two or more repeats, the min–max
  range; figures draw the mean with a min–max band.
* **Files** in each set's folder: ``summary.md`` (the full table), ``summary.csv`` (one row per
  label, mean/min/max of every number), ``summary.json`` and the figures: training loss
  (smoothed; the raw mean faint) and test accuracy (with the target line) against epochs,
  rounds, bits and modelled time at each bandwidth (first latency), ``time_to_target`` (bars
  per network) and ``overview`` (accuracy vs rounds and bits, and the bars).  PNG by default;
  ``--format png,svg,pdf`` writes each figure in each format.
* **The terminal** shows the few columns that answer the question: per label, rounds and bits to
  the target and, at each network, the modelled time to it with the speed-up over the baseline.

Baseline (``--baseline LABEL``): default the first label whose algorithm is ``psgd``.  Target
(``--target``): else the config's ``train.target_accuracy`` if every run of the set has the
same one, else the highest accuracy every run of the set reaches.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import crossover
from . import network as nw
from .logger import read
from .results import ResultsError, config_of, find_runs, flatten

DEFAULT_BANDWIDTHS = "5Mbps,100Mbps,10Gbps"
DEFAULT_LATENCIES = "0"
FORMATS = ("png", "svg", "pdf")


# -- loading --------------------------------------------------------------------------------------
def load_runs(folder: str) -> list[dict]:
    """``[{name, path, log, terms, cfg, M, label}]`` for each run.h5 under ``folder`` (sweep order).

    ``cfg`` is the run's normalized config flattened to dotted keys, plus ``M``.  ``label`` is the
    sweep's label (or algorithm+codec) until :func:`comparable_sets` relabels the runs by what
    differs (the reproduction scripts call :func:`summarize` on the sweep's labels directly)."""
    try:
        entries = find_runs(folder)
    except ResultsError as e:
        raise ValueError(str(e)) from None
    if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "run.h5")):
        from .sweep import done_only
        entries = done_only(folder, entries)   # only runs that are done with their planned world size
    runs = []
    for name, sweep_label, h5 in entries:
        log = read(h5)
        cfg = flatten(config_of(log))
        a = log["attrs"]
        workers = a.get("workers")
        M = int(len(np.atleast_1d(workers))) if workers is not None else int(a.get("world_size", 1))
        cfg["M"] = M
        label = sweep_label or (str(a.get("algorithm", name)) + (f"+{a['codec']}" if a.get("codec") else ""))
        runs.append({"name": name, "label": label, "path": h5, "log": log, "terms": nw.row_terms(log),
                     "cfg": cfg, "M": M})
    return runs


def _algorithm(log: dict) -> str:
    return str(log["attrs"].get("algorithm", ""))


# -- grouping -------------------------------------------------------------------------------------
_MISSING = "—"
_IGNORED = ("run.", "train.eval_every", "train.log_every", "train.checkpoint_every",
            "train.target_accuracy", "data.data_dir")
_CONTEXT = ("M", "model.", "data.", "train.epochs", "train.batch_size", "train.schedule.")
_LABEL_ORDER = ("algorithm.", "codec.", "topology.", "train.", "run.")


def key_class(key: str) -> str:
    """'seed' (repeats), 'ignore' (bookkeeping), 'context' (must match to compare), or 'variant'."""
    if key == "seed":
        return "seed"
    if key == "run.server":
        return "variant"
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in _IGNORED):
        return "ignore"
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in _CONTEXT):
        return "context"
    return "variant"


def _val(cfg: dict, key: str):
    v = cfg.get(key, _MISSING)
    return _MISSING if v is None else v


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass
class CompSet:
    """Runs that may be compared: same model, data, M and schedule."""

    context: dict                          # context key -> value shared by every run of the set
    runs: list
    name: str = ""                         # folder name (what differs from the other sets)
    labels: list = field(default_factory=list)


def _differing(cfgs: list[dict], keys: list[str]) -> list[str]:
    return [k for k in keys if len({json.dumps(_val(c, k), default=str) for c in cfgs}) > 1]


def _ordered(keys) -> list[str]:
    def rank(k):
        for i, p in enumerate(_LABEL_ORDER):
            if k.startswith(p):
                return i
        return len(_LABEL_ORDER)
    ks = list(dict.fromkeys(keys))
    return sorted(ks, key=lambda k: (rank(k), 0 if k.endswith(".name") else 1, ks.index(k)))


def _short_names(keys: list[str]) -> dict:
    leaves = [k.split(".")[-1] for k in keys]
    out = {}
    for k, leaf in zip(keys, leaves):
        if leaf == "name":
            out[k] = k.split(".")[0]
        else:
            out[k] = leaf if leaves.count(leaf) == 1 else k
    return out


def label_runs(runs: list[dict]) -> list[str]:
    """Give each run of one comparable set its label (see the module docstring); returns the
    labels in order of first appearance."""
    cfgs = [r["cfg"] for r in runs]
    variant = _ordered(k for c in cfgs for k in c if key_class(k) == "variant")
    shown = [k for k in variant if k != "algorithm.name"
             and len({json.dumps(c[k], default=str) for c in cfgs if _val(c, k) != _MISSING}) > 1]

    def make(c, keys, with_missing=False):
        short = _short_names(keys)
        parts = [str(_val(c, "algorithm.name"))]
        for k in keys:
            v = _val(c, k)
            if v != _MISSING or with_missing:
                parts.append(f"{short[k]}={_show(v) if v != _MISSING else 'none'}")
        return " ".join(parts)

    for r in runs:
        r["label"] = make(r["cfg"], shown)
    # two different variants must never share a label: add every key that tells them apart
    by_label: dict = {}
    for r in runs:
        sig = json.dumps({k: _val(r["cfg"], k) for k in variant}, default=str, sort_keys=True)
        by_label.setdefault(r["label"], {}).setdefault(sig, []).append(r)
    for lab, sigs in by_label.items():
        if len(sigs) > 1:
            members = [r for rs in sigs.values() for r in rs]
            extra = [k for k in _differing([r["cfg"] for r in members], variant) if k not in shown]
            for r in members:
                r["label"] = make(r["cfg"], shown + extra, with_missing=True) if extra else r["label"]
    labels = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    return labels


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "set"


def comparable_sets(runs: list[dict]) -> list[CompSet]:
    """Split runs into comparable sets (in order of first appearance) and label each set's runs."""
    ckeys = list(dict.fromkeys(k for r in runs for k in r["cfg"] if key_class(k) == "context"))
    sets: dict = {}
    for r in runs:
        sig = json.dumps({k: _val(r["cfg"], k) for k in ckeys}, default=str, sort_keys=True)
        sets.setdefault(sig, []).append(r)
    out = []
    for members in sets.values():
        ctx = {k: _val(members[0]["cfg"], k) for k in ckeys}
        out.append(CompSet(ctx, members))
    diff = differences(out)
    for cs in out:
        cs.name = _slug("-".join(f"{k.split('.')[-1]}{_show(cs.context[k])}" for k in diff)) if diff else ""
        cs.labels = label_runs(cs.runs)
    names = [cs.name for cs in out]
    for i, cs in enumerate(out):            # names must be unique folder names
        if names.count(cs.name) > 1:
            cs.name = f"{cs.name}-{i + 1}"
    return out


def differences(sets: list[CompSet]) -> list[str]:
    """Context keys whose value is not the same in every set."""
    if len(sets) < 2:
        return []
    keys = list(dict.fromkeys(k for s in sets for k in s.context))
    return [k for k in keys if len({json.dumps(s.context.get(k, _MISSING), default=str) for s in sets}) > 1]


def describe_differences(sets: list[CompSet]) -> str:
    return "; ".join(f"{k} = " + " | ".join(dict.fromkeys(_show(s.context.get(k, _MISSING)) for s in sets))
                     for k in differences(sets))


# -- target and networks --------------------------------------------------------------------------
def choose_target(runs: list[dict], target: Optional[float]) -> float:
    if target is not None:
        return float(target)
    cfg_t = {r["cfg"].get("train.target_accuracy") for r in runs}
    if len(cfg_t) == 1 and None not in cfg_t:
        return float(cfg_t.pop())
    best = [np.nanmax(np.asarray(r["log"]["eval"]["test_accuracy"], float)) for r in runs
            if len(r["log"]["eval"]["step"])]
    best = [b for b in best if math.isfinite(b)]
    if not best:
        raise ValueError("no run has a finite test accuracy; pass --target")
    return float(min(best))


def networks(bandwidths: str, latencies: str, shared_nic: bool = False) -> list[nw.Network]:
    bws = nw.parse_list(bandwidths, nw.parse_bandwidth)
    lats = nw.parse_list(latencies, nw.parse_latency)
    return [nw.Network.simple(b, l, shared_nic=shared_nic) for b in bws for l in lats]


def net_name(net: nw.Network) -> str:
    return f"{nw.format_bandwidth(net.link.bandwidth)}/{nw.format_latency(net.link.latency)}"


def _bw_text(name: str) -> str:
    """'5Mbps' -> '5 Mb/s' (figure labels)."""
    return re.sub(r"([0-9.]+)([kMGT]?)bps", r"\1 \2b/s", name)


def _net_title(net: nw.Network) -> str:
    lat = net.link.latency
    return (f"{_bw_text(nw.format_bandwidth(net.link.bandwidth))}, "
            f"latency {nw.format_latency(lat) if lat else '0'}"
            + (", shared NIC" if net.shared_nic else ""))


# -- numbers --------------------------------------------------------------------------------------
def run_numbers(run: dict, target: float, nets: list[nw.Network]) -> dict:
    """To-target numbers of one run: epoch, round, step, bits (None if never reached), times."""
    ev = run["log"]["eval"]
    i = nw.first_reaching(ev, target)
    acc = np.asarray(ev["test_accuracy"], float)
    out = {"name": run["name"], "label": run["label"], "seed": run["cfg"].get("seed"), "reached": i is not None,
           "final_accuracy": float(acc[-1]) if len(acc) else None,
           "best_accuracy": float(np.nanmax(acc)) if len(acc) and np.isfinite(acc).any() else None}
    if i is None:
        out.update(epoch=None, rounds=None, step=None, bits=None)
        out["time"] = {net_name(n): None for n in nets}
    else:
        out.update(epoch=float(ev["epoch"][i]), rounds=int(ev["rounds"][i]), step=int(ev["step"][i]),
                   bits=int(ev["bits_sent"][i]))
        out["time"] = {net_name(n): nw.time_to_target(run["log"], n, target, terms=run["terms"]) for n in nets}
    out["total_time"] = {net_name(n): float(np.sum(run["terms"].time(n))) for n in nets}
    return out


def _stats(vals) -> Optional[dict]:
    """mean/min/max/std over repeats, or None when a value is missing (a repeat never reached)."""
    if not vals or any(v is None for v in vals):
        return None
    a = np.asarray(vals, float)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "std": float(a.std()),
            "n": int(a.size)}


def _mean(st: Optional[dict]) -> Optional[float]:
    return None if st is None else st["mean"]


def summarize(runs: list[dict], target: float, nets: list[nw.Network], baseline: Optional[str] = None,
              labels: Optional[list] = None) -> dict:
    """Per label (runs of one comparable set, already labelled): numbers to ``target``.

    Each label's ``epoch``, ``rounds``, ``bits``, ``final_accuracy``, ``time[net]`` and
    ``total_time[net]`` are means over its repeats (None unless every repeat reached the target);
    ``spread`` holds the same keys as ``{mean, min, max, std, n}``."""
    per_run = [run_numbers(r, target, nets) for r in runs]
    if labels is None:
        labels = list(dict.fromkeys(r["label"] for r in runs))
    note = None
    if baseline is None:
        psgd = [r["label"] for r in runs if r["cfg"].get("algorithm.name") == "psgd"]
        baseline = psgd[0] if psgd else None
        if len(set(psgd)) > 1:
            note = f"several psgd labels; the first, `{baseline}`, is the baseline (--baseline to choose)"
    elif baseline not in labels:
        note = f"baseline `{baseline}` is not a label of this set: no speed-ups"
        baseline = None
    knames = [net_name(n) for n in nets]
    rows = []
    for lab in labels:
        rs = [p for p in per_run if p["label"] == lab]
        row = {"label": lab, "runs": len(rs), "reached": sum(p["reached"] for p in rs),
               "seeds": [p["seed"] for p in rs]}
        spread = {key: _stats([p[key] for p in rs]) for key in ("epoch", "rounds", "bits", "final_accuracy")}
        spread["time"] = {k: _stats([p["time"][k] for p in rs]) for k in knames}
        spread["total_time"] = {k: _stats([p["total_time"][k] for p in rs]) for k in knames}
        for key in ("epoch", "rounds", "bits", "final_accuracy"):
            row[key] = _mean(spread[key])
        row["time"] = {k: _mean(v) for k, v in spread["time"].items()}
        row["total_time"] = {k: _mean(v) for k, v in spread["total_time"].items()}
        row["spread"] = spread
        rows.append(row)
    base = next((r for r in rows if r["label"] == baseline), None)
    for r in rows:
        r["speedup"] = {}
        for k in knames:
            b, t = base["time"][k] if base else None, r["time"][k]
            r["speedup"][k] = (b / t) if (b is not None and t) else None
        b, t = base["bits"] if base else None, r["bits"]
        r["bits_ratio"] = (t / b) if (b and t is not None) else None
    return {"target_accuracy": target, "baseline": baseline, "baseline_note": note, "networks": knames,
            "labels": rows, "runs": per_run}


# -- tables ---------------------------------------------------------------------------------------
def _num(v: Optional[float], kind: str) -> str:
    if v is None:
        return "—"
    if kind == "time":
        return f"{v:.3g} s"
    if kind == "x":
        return f"{v:.2f}×"
    if kind == "bits":
        return _bits(v)
    if kind == "acc":
        return f"{v:.3f}"
    return f"{v:.3g}"


def _bits(b: float) -> str:
    for unit, f in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b:.3g} bit"


def _cell(st: Optional[dict], kind: str, spread: bool = True) -> str:
    """Mean, and over two or more repeats the min–max range."""
    if st is None:
        return "—"
    text = _num(st["mean"], kind)
    if spread and st["n"] > 1 and st["max"] > st["min"]:
        lo, hi = _num(st["min"], kind), _num(st["max"], kind)
        unit = ""
        for u in (" s", " Gbit", " Mbit", " kbit", " bit"):
            if lo.endswith(u) and hi.endswith(u):
                lo, hi, unit = lo[: -len(u)], hi[: -len(u)], u
                break
        text += f" ({lo}–{hi}{unit})"
    return text


def _net_header(nets_names: list[str]) -> list[str]:
    """Network column names: the latency only when some latency is not 0."""
    if all(n.endswith("/0ms") for n in nets_names):
        return [n[:-4] for n in nets_names]
    return nets_names


def context_line(cs: "CompSet", target: Optional[float] = None) -> str:
    c = cs.context
    data = str(c.get("data.name", "?"))
    extra = [f"{k.split('.')[-1]}={_show(v)}" for k, v in c.items()
             if k.startswith("data.params.") and v != _MISSING]
    if c.get("data.shard") == "dirichlet":
        extra.append(f"dirichlet α={_show(c.get('data.alpha'))}")
    model = str(c.get("model.name", "?"))
    margs = [f"{k.split('.')[-1]}={_show(v)}" for k, v in c.items()
             if k.startswith("model.") and k != "model.name" and v != _MISSING]
    parts = [data + (f" ({', '.join(extra)})" if extra else ""),
             model + (f" ({', '.join(margs)})" if margs else ""),
             f"M = {c.get('M')}",
             f"{_show(c.get('train.epochs'))} epochs, batch {c.get('train.batch_size')}/worker"]
    if target is not None:
        parts.append(f"target accuracy {target:.2f}")
    return " · ".join(parts)


def terminal_table(s: dict) -> str:
    """The few columns that answer the question: rounds and bits to the target, and the modelled
    time to it at each network with the speed-up over the baseline."""
    nets = s["networks"]
    head = ["label", "reached", "rounds", "bits"] + [f"@{h}" for h in _net_header(nets)]
    rows = []
    for r in s["labels"]:
        cells = [r["label"], f"{r['reached']}/{r['runs']}", _num(r["rounds"], "g"), _num(r["bits"], "bits")]
        for k in nets:
            t, x = r["time"][k], r["speedup"][k]
            cells.append(_num(t, "time") + ("" if x is None else f" {_num(x, 'x')}"))
        rows.append(cells)
    w = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))
    lines = [fmt(head), "  ".join("-" * x for x in w)] + [fmt(c) for c in rows]
    return "\n".join(lines)


def summary_markdown(s: dict, context: str = "") -> str:
    nets = s["networks"]
    hn = _net_header(nets)
    head = (["label", "runs", "epochs", "rounds", "bits", "final acc."] + [f"time @{n}" for n in hn]
            + [f"speed-up @{n}" for n in hn])
    intro = (f"{context + '. ' if context else ''}Target test accuracy **{s['target_accuracy']:.4f}**; "
             f"speed-ups relative to `{s['baseline']}`. " if s["baseline"] else
             f"{context + '. ' if context else ''}Target test accuracy **{s['target_accuracy']:.4f}**; "
             "no baseline (no psgd run; --baseline LABEL). ")
    intro += ("Numbers are to the first evaluation at or above the target; mean over repeats (seeds), "
              "(min–max) when there are several. Times are modelled: measured compute + codec + α-β comm "
              "(docs/network.md). Bits: all ranks, both directions. A dash: not reached by every repeat.")
    if s.get("baseline_note"):
        intro += f" Note: {s['baseline_note']}."
    lines = [intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["labels"]:
        sp = r["spread"]
        cells = ([f"`{r['label']}`", f"{r['reached']}/{r['runs']}", _cell(sp["epoch"], "g"), _cell(sp["rounds"], "g"),
                  _cell(sp["bits"], "bits"), _cell(sp["final_accuracy"], "acc")]
                 + [_cell(sp["time"][n], "time") for n in nets] + [_num(r["speedup"][n], "x") for n in nets])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(s: dict, path: str) -> None:
    """One row per label: mean/min/max of every number (empty: not reached by every repeat)."""
    cols = ["label", "runs", "reached", "seeds"]
    stats = ["mean", "min", "max", "std"]
    keys = [("epoch", None), ("rounds", None), ("bits", None), ("final_accuracy", None)]
    keys += [("time", n) for n in s["networks"]] + [("total_time", n) for n in s["networks"]]
    for k, n in keys:
        cols += [f"{k}{'@' + n if n else ''}_{st}" for st in stats]
    cols += [f"speedup@{n}" for n in s["networks"]] + ["bits_ratio"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target_accuracy", "baseline"] + cols)
        for r in s["labels"]:
            row = [s["target_accuracy"], s["baseline"] or "", r["label"], r["runs"], r["reached"],
                   " ".join(str(x) for x in r["seeds"])]
            for k, n in keys:
                st = r["spread"][k][n] if n else r["spread"][k]
                row += ["" if st is None else st[x] for x in stats]
            row += ["" if r["speedup"][n] is None else r["speedup"][n] for n in s["networks"]]
            row.append("" if r["bits_ratio"] is None else r["bits_ratio"])
            w.writerow(row)


# -- figures --------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(run: dict, x: str, y: str, net: Optional[nw.Network] = None):
    """(x, y) of one run: y 'loss' (metrics rows) or 'accuracy' (evaluations); x 'epoch', 'round',
    'bits' (Mbit) or 'time' (modelled seconds on ``net``)."""
    log, terms = run["log"], run["terms"]
    if y == "loss":
        m = log["metrics"]
        yv = np.asarray(m["train_loss"], float)
        if x == "epoch":
            xv = np.asarray(m["epoch"], float)
        elif x == "round":
            xv = np.asarray(m["rounds"], float)
        elif x == "bits":
            xv = np.asarray(m["bits_sent"], float) / 1e6
        else:
            xv = np.cumsum(terms.time(net))
        return xv, yv
    ev = log["eval"]
    yv = np.asarray(ev["test_accuracy"], float)
    if x == "epoch":
        xv = np.asarray(ev["epoch"], float)
    elif x == "round":
        xv = np.asarray(ev["rounds"], float)
    elif x == "bits":
        xv = np.asarray(ev["bits_sent"], float) / 1e6
    else:
        cum = np.concatenate([[0.0], np.cumsum(terms.time(net))])
        steps = np.asarray(ev["step"])
        idx = np.searchsorted(terms.step, steps, side="left")
        xv = np.where(steps > 0, cum[np.minimum(idx + 1, len(cum) - 1)], 0.0)
    return xv, yv


XLABEL = {"epoch": "epoch", "round": "synchronization rounds", "bits": "bits sent, all ranks (Mbit)",
          "time": "modelled time (s)"}


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` rows (shorter at the ends; NaNs ignored)."""
    y = np.asarray(y, float)
    if window <= 1 or y.size < 3:
        return y
    ok = np.isfinite(y)
    k = np.ones(int(window))
    num = np.convolve(np.where(ok, y, 0.0), k, mode="same")
    den = np.convolve(ok.astype(float), k, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _aggregate(curves: list) -> tuple:
    """Mean x, mean y, min y, max y over repeats (truncated to the shortest)."""
    n = min(len(c[0]) for c in curves)
    xs = np.vstack([c[0][:n] for c in curves])
    ys = np.vstack([c[1][:n] for c in curves])
    with np.errstate(invalid="ignore"):
        return xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)


def choose_scale(values) -> str:
    """'log' when the positive values span more than a factor 30, else 'linear'."""
    v = np.asarray([x for x in np.ravel(values) if np.isfinite(x) and x > 0], float)
    if v.size < 2:
        return "linear"
    return "log" if v.max() / v.min() > 30 else "linear"


def _plain(v, _pos=None) -> str:
    """A tick label as a plain number: 0.05, 2, 300, 1e6, 2.5e-4."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.6g}"
    e = int(math.floor(math.log10(abs(v))))
    m = f"{v / 10 ** e:.2g}"
    if m in ("10", "-10"):
        m, e = m[:-1], e + 1
    return f"{m}e{e}"


def set_axis(ax, which: str, values) -> str:
    """Linear or log from the data, with plain tick labels (0.5, 2, 100, 1e6 -- never 2.35×10⁰)."""
    import matplotlib.ticker as mt
    scale = choose_scale(values)
    axis = ax.xaxis if which == "x" else ax.yaxis
    if scale == "log":
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        v = np.asarray([x for x in np.ravel(values) if np.isfinite(x) and x > 0], float)
        decades = math.log10(v.max() / v.min()) if v.size else 1
        subs = (1.0,) if decades > 4 else ((1.0, 2.0, 5.0) if decades > 1.2 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0))
        axis.set_major_locator(mt.LogLocator(base=10, subs=subs))
        axis.set_major_formatter(mt.FuncFormatter(_plain))
        axis.set_minor_formatter(mt.NullFormatter())
    else:
        fmt = mt.ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)
    return scale


class Figures:
    """Draws one comparable set's figures into ``out`` in each of ``formats``."""

    def __init__(self, runs: list[dict], labels: list[str], out: str, nets: list[nw.Network], target: float,
                 context: str, summary: dict, formats=("png",)):
        self.plt = _plt()
        self.runs, self.labels, self.out, self.nets = runs, labels, out, nets
        self.target, self.context, self.summary, self.formats = target, context, summary, tuple(formats)
        self.colors = {lab: self.plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
        self.paths: list[str] = []

    def _members(self, lab):
        return [r for r in self.runs if r["label"] == lab]

    def _save(self, fig, stem: str) -> None:
        for ext in self.formats:
            p = os.path.join(self.out, f"{stem}.{ext}")
            fig.savefig(p, dpi=120 if ext == "png" else None)
            self.paths.append(p)
        self.plt.close(fig)

    def curves(self, ax, x: str, y: str, net=None, legend=True) -> None:
        allx, ally = [], []
        agg = {lab: _aggregate([_series(r, x, y, net) for r in self._members(lab)]) for lab in self.labels}
        xlog = x != "epoch" and choose_scale(np.concatenate([a[0] for a in agg.values()]) if agg else []) == "log"
        for lab in self.labels:
            mx, my, lo, hi = agg[lab]
            c = self.colors[lab]
            n = len(self._members(lab))
            name = lab + (f" (mean of {n})" if n > 1 else "")
            if xlog:                   # a log axis cannot show x = 0 (the evaluation before step 1)
                keep = mx > 0
                mx, my, lo, hi = mx[keep], my[keep], lo[keep], hi[keep]
            if y == "loss":
                w = max(1, len(my) // 25)
                ax.plot(mx, my, color=c, lw=0.7, alpha=0.25)
                sm = smooth(my, w)
                ax.plot(mx, sm, color=c, lw=1.6, label=name)
                if n > 1:
                    ax.fill_between(mx, smooth(lo, w), smooth(hi, w), color=c, alpha=0.15, lw=0)
                ally.append(my)
            else:
                ax.plot(mx, my, color=c, lw=1.4, marker="o", ms=2.5, label=name)
                if n > 1:
                    ax.fill_between(mx, lo, hi, color=c, alpha=0.15, lw=0)
                ally.append(my)
            allx.append(mx)
        if x == "epoch":
            set_axis(ax, "x", [1, 2])                              # epochs: always linear
        else:
            set_axis(ax, "x", np.concatenate(allx) if allx else [])
        if y == "loss":
            set_axis(ax, "y", np.concatenate(ally) if ally else [])
            ax.set_ylabel("training loss (smoothed; raw faint)")
        else:
            set_axis(ax, "y", [0.5, 1])                            # accuracy: always linear
            ax.axhline(self.target, color="0.3", ls="--", lw=1, label=f"target {self.target:.2f}")
            ax.set_ylabel("test accuracy")
            top = np.nanmax(np.concatenate(ally)) if ally else 1.0
            ax.set_ylim(max(0.0, ax.get_ylim()[0]), min(1.0, max(top, self.target) + 0.03))
        ax.set_xlabel(XLABEL[x])
        ax.grid(alpha=0.3, which="major")
        if legend:
            ax.legend(fontsize=7, loc="best")

    def line_figure(self, x: str, y: str, net=None) -> None:
        fig, ax = self.plt.subplots(figsize=(6.4, 4.3))
        self.curves(ax, x, y, net)
        sub = ("network: " + _net_title(net) + " (α-β model)") if net is not None else (
            "bits: all ranks, both directions" if x == "bits" else "")
        ax.set_title(self.context + ("\n" + sub if sub else ""), fontsize=8.5)
        fig.tight_layout()
        suffix = x if net is None else f"time_{nw.format_bandwidth(net.link.bandwidth)}"
        self._save(fig, f"{y}_vs_{suffix}")

    def bars(self, ax) -> None:
        rows = {r["label"]: r for r in self.summary["labels"]}
        nets = self.summary["networks"]
        names = _net_header(nets)
        k = len(self.labels)
        width = 0.8 / max(k, 1)
        vals = []
        for i, lab in enumerate(self.labels):
            r = rows[lab]
            means, err_lo, err_hi = [], [], []
            for n in nets:
                st = r["spread"]["time"][n]
                means.append(np.nan if st is None else st["mean"])
                err_lo.append(0 if st is None else st["mean"] - st["min"])
                err_hi.append(0 if st is None else st["max"] - st["mean"])
            xs = np.arange(len(nets)) + (i - (k - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(means, nan=0.0), width * 0.92, color=self.colors[lab], label=lab,
                   yerr=[err_lo, err_hi] if r["runs"] > 1 else None, capsize=2, error_kw={"lw": 0.8})
            for xx, m in zip(xs, means):
                if np.isfinite(m):
                    ax.annotate(f"{m:.2g}", (xx, m), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6)
                else:
                    ax.annotate("not reached", (xx, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                                textcoords="offset points", ha="center", va="bottom", fontsize=6, rotation=90)
            vals += [m for m in means if np.isfinite(m)]
        ax.set_xticks(np.arange(len(nets)))
        ax.set_xticklabels([_bw_text(n) for n in names])
        ax.set_xlabel("network bandwidth" + ("" if names == [n[:-4] for n in nets] else " / latency"))
        set_axis(ax, "y", vals)
        ax.set_ylabel(f"modelled time to accuracy {self.target:.2f} (s)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    def bar_figure(self) -> None:
        fig, ax = self.plt.subplots(figsize=(6.4, 4.3))
        self.bars(ax)
        ax.set_title(self.context + "\nmeasured compute + codec, α-β modelled communication", fontsize=8.5)
        fig.tight_layout()
        self._save(fig, "time_to_target")

    def overview(self) -> None:
        fig, axs = self.plt.subplots(1, 3, figsize=(14, 4.2))
        self.curves(axs[0], "round", "accuracy", legend=False)
        axs[0].set_title("accuracy vs synchronization rounds", fontsize=9)
        self.curves(axs[1], "bits", "accuracy", legend=False)
        axs[1].set_title("accuracy vs bits sent (all ranks)", fontsize=9)
        self.bars(axs[2])
        axs[2].set_title("modelled time to target", fontsize=9)
        fig.suptitle(self.context, fontsize=10)
        fig.tight_layout()
        self._save(fig, "overview")

    def stems(self) -> list[tuple]:
        """Every figure: (file stem, how to draw it)."""
        first_lat = self.nets[0].link.latency if self.nets else 0.0
        time_nets = [n for n in self.nets if n.link.latency == first_lat]
        out = []
        for y in ("loss", "accuracy"):
            for x in ("epoch", "round", "bits"):
                out.append((f"{y}_vs_{x}", lambda x=x, y=y: self.line_figure(x, y)))
            for n in time_nets:
                out.append((f"{y}_vs_time_{nw.format_bandwidth(n.link.bandwidth)}",
                            lambda n=n, y=y: self.line_figure("time", y, n)))
        out.append(("time_to_target", self.bar_figure))
        out.append(("overview", self.overview))
        return out

    def draw_all(self, only: Optional[tuple] = None) -> list[str]:
        stems = self.stems()
        known = [st for st, _ in stems]
        bad = [x for x in (only or ()) if x not in known and x not in ("loss", "accuracy")]
        if bad:
            raise ValueError(f"--figures: unknown {bad}; known: all, none, loss, accuracy, {', '.join(known)}")
        for stem, fn in stems:
            if only is None or stem in only or stem.split("_vs_")[0] in only:
                fn()
        return self.paths


def draw(runs: list[dict], out: str, nets: list[nw.Network], target: float, summary: dict,
         context: str = "", formats=("png",), labels: Optional[list] = None,
         only: Optional[tuple] = None) -> list[str]:
    """Write the figures of one comparable set (``only``: file stems, or 'loss'/'accuracy' for all
    of that kind; default every figure); returns the paths."""
    os.makedirs(out, exist_ok=True)
    labels = labels or list(dict.fromkeys(r["label"] for r in runs))
    return Figures(runs, labels, out, nets, target, context, summary, formats).draw_all(only)


# -- folder reports -------------------------------------------------------------------------------
def parse_formats(text: str) -> tuple:
    fm = tuple(dict.fromkeys(t.strip().lower() for t in str(text).split(",") if t.strip()))
    bad = [f for f in fm if f not in FORMATS]
    if not fm or bad:
        raise ValueError(f"--format: a comma list of {', '.join(FORMATS)} (got {text!r})")
    return fm


def parse_figures(text: str) -> Optional[tuple]:
    """'all' -> None (every figure); 'none' -> (); else the comma list."""
    t = str(text).strip()
    if t.lower() == "all":
        return None
    if t.lower() == "none":
        return ()
    return tuple(x.strip() for x in t.split(",") if x.strip())


def report_set(cs: CompSet, out: str, nets: list[nw.Network], target: Optional[float],
               baseline: Optional[str], formats=("png",), title: str = "", only: Optional[tuple] = None) -> dict:
    tgt = choose_target(cs.runs, target)
    os.makedirs(out, exist_ok=True)
    s = summarize(cs.runs, tgt, nets, baseline, cs.labels)
    ctx = context_line(cs, tgt)
    s["context"] = ctx
    s["context_keys"] = {k: v for k, v in cs.context.items()}
    s["figures"] = draw(cs.runs, out, nets, tgt, s, ctx, formats, cs.labels, only)
    md = summary_markdown(s, ctx)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Report: {title}\n\n" + md + "\n")
        f.write("Figures: " + ", ".join(os.path.basename(p) for p in s["figures"]) + "\n")
    write_csv(s, os.path.join(out, "summary.csv"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1, default=str)
    s["markdown"] = md
    s["table"] = terminal_table(s)
    s["out"] = out
    return s


def report_sweep(folder: str, bandwidths: str = DEFAULT_BANDWIDTHS, latencies: str = DEFAULT_LATENCIES,
                 target: Optional[float] = None, out: Optional[str] = None, baseline: Optional[str] = None,
                 shared_nic: bool = False, formats=("png",), only: Optional[tuple] = None) -> dict:
    """Report a folder of runs: one report per comparable set.  Returns ``{'sets': [summary, ...],
    'differences': text}``; with a single set its summary's keys are also at the top level."""
    runs = load_runs(folder)
    nets = networks(bandwidths, latencies, shared_nic)
    out = out or os.path.join(folder, "report")
    sets = comparable_sets(runs)
    title = os.path.basename(os.path.abspath(folder))
    summaries = []
    for cs in sets:
        sub = out if len(sets) == 1 else os.path.join(out, cs.name)
        s = report_set(cs, sub, nets, target, baseline, formats, title, only)
        # the crossover bandwidth of each label against psgd (qprsgd/crossover.py)
        tgt = choose_target(cs.runs, target)
        cross = crossover.sweep_crossover(cs.runs, tgt, nets[0].link.latency, sub)
        s["crossover"] = cross["rows"]
        s["crossover_figure"] = cross["figure"]
        if cross["markdown"]:
            with open(os.path.join(sub, "summary.md"), "a") as f:
                f.write("\n" + cross["markdown"] + "\n")
            s["markdown"] = s.get("markdown", "") + "\n" + cross["markdown"]
        summaries.append(s)
    res = {"sets": summaries, "differences": describe_differences(sets)}
    if len(sets) == 1:
        res.update(summaries[0])
    return res


def report_run(path: str, bandwidths: str, latencies: str, target: Optional[float],
               shared_nic: bool = False) -> str:
    """The re-timing table of one run.h5."""
    log = read(path)
    run = {"name": os.path.basename(os.path.dirname(path)), "label": str(log["attrs"].get("algorithm")),
           "log": log, "terms": nw.row_terms(log), "cfg": flatten(config_of(log))}
    nets = networks(bandwidths, latencies, shared_nic)
    tgt = choose_target([run], target)
    nums = run_numbers(run, tgt, nets)
    m = log["metrics"]
    lines = [f"{path}: {log['attrs'].get('algorithm')} on {log['attrs'].get('world_size')} ranks, "
             f"d = {log['attrs'].get('d')}, {int(m['step'][-1]) if len(m['step']) else 0} steps",
             f"measured: wall {float(m['wall_time'][-1]) if len(m['step']) else 0:.3g} s, "
             f"comm {float(np.sum(m['t_comm'])):.3g} s, local work {float(np.sum(run['terms'].local)):.3g} s",
             f"target accuracy {tgt:.4f}: " + ("not reached" if not nums["reached"] else
                                               f"epoch {nums['epoch']:.3g}, round {nums['rounds']}, "
                                               f"{_bits(nums['bits'])}"),
             "", f"{'network':>22}  {'comm (s)':>10}  {'run (s)':>10}  {'to target (s)':>13}"]
    for n in nets:
        k = net_name(n)
        comm = float(np.sum(run["terms"].comm(n)))
        tt = nums["time"][k]
        lines.append(f"{k:>22}  {comm:10.4g}  {nums['total_time'][k]:10.4g}  "
                     f"{('—' if tt is None else f'{tt:.4g}'):>13}")
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("report", help="re-time a run under other networks, or report a folder of runs "
                                      "(figures + summary per comparable set)")
    p.add_argument("path", help="a run's run.h5, a run folder, or a sweep results folder")
    p.add_argument("--bandwidth", default=DEFAULT_BANDWIDTHS, help=f"comma list (default {DEFAULT_BANDWIDTHS})")
    p.add_argument("--latency", default=DEFAULT_LATENCIES, help="comma list, e.g. 0.1ms,10ms (default 0)")
    p.add_argument("--target", type=float, default=None, help="target test accuracy")
    p.add_argument("--baseline", default=None, help="label the speed-ups are relative to (default: psgd's)")
    p.add_argument("--shared-nic", action="store_true",
                   help="a node's concurrent messages share one NIC (default: one link per neighbour)")
    p.add_argument("--out", default=None, help="report folder (default FOLDER/report)")
    p.add_argument("--format", default="png", help="figure formats, comma list of png, svg, pdf (default png)")
    p.add_argument("--figures", default="all",
                   help="which figures: 'all' (default), 'none', or a comma list of file stems "
                        "(overview, time_to_target, accuracy_vs_bits, ...) or kinds (loss, accuracy)")


def main(args) -> int:
    try:
        if os.path.isfile(args.path):
            print(report_run(args.path, args.bandwidth, args.latency, args.target, args.shared_nic))
            return 0
        if not os.path.isdir(args.path):
            raise ValueError(f"{args.path!r} is neither a run.h5 file nor a folder")
        res = report_sweep(args.path, args.bandwidth, args.latency, args.target, args.out, args.baseline,
                           args.shared_nic, parse_formats(args.format), parse_figures(args.figures))
    except ValueError as e:
        print(f"qprsgd report: {e}", file=sys.stderr)
        return 2
    sets = res["sets"]
    if len(sets) > 1:
        print(f"{len(sets)} sets of runs that cannot be compared with each other (they differ in "
              f"{res['differences']}): one report each.\n")
    for s in sets:
        print(s["context"] + (f"; speed-ups vs {s['baseline']}" if s["baseline"] else ""))
        print(s["table"])
        print(f"full table: {os.path.join(s['out'], 'summary.md')} (and summary.csv); "
              f"{len(s['figures'])} figure file{'' if len(s['figures']) == 1 else 's'} in {s['out']}\n")
    return 0
