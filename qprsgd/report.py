"""``qprsgd report``: re-time a logged run under other networks, or draw a sweep's figures.

    qprsgd report RUN.h5    [--bandwidth 5Mbps,100Mbps,10Gbps] [--latency 0.1ms,10ms] [--target 0.9]
    qprsgd report SWEEP_DIR [--bandwidth ...] [--latency ...] [--target ...] [--out DIR]

A run: prints, for every (bandwidth, latency), the modelled time of the whole run and to the
target accuracy (qprsgd/network.py: measured local work + modelled comm), next to the measured
wall time and comm time.  Nothing is re-run.

A sweep folder (``qprsgd sweep``'s output, or any folder of ``*/run.h5``): PNG figures (matplotlib,
Agg) in ``<dir>/report/`` -- training loss and test accuracy vs epoch, vs synchronization round,
vs bits sent, and vs modelled time at each bandwidth (first latency) -- plus ``summary.md`` and
``summary.json``: per label (the sweep's axes without the seed; repeats averaged) the epochs,
rounds, bits and modelled time to the target accuracy at each network, and speed-ups vs the
baseline (``--baseline``; default the label whose algorithm is ``psgd``), and the crossover
bandwidth of each label against ``psgd`` at the run's M and extrapolated to M = 16 … 1024
(qprsgd/crossover.py; figure ``crossover_bandwidth.png``).

Target (when ``--target`` is not given): the config's ``train.target_accuracy`` if every run
sets the same one, else the highest accuracy every run reaches (min over runs of the best
evaluation), so every label has a time.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from typing import Optional

import numpy as np

from . import crossover
from . import network as nw
from .logger import read

DEFAULT_BANDWIDTHS = "5Mbps,100Mbps,10Gbps"
DEFAULT_LATENCIES = "0"


# -- loading --------------------------------------------------------------------------------------
def load_runs(folder: str) -> list[dict]:
    """[{name, label, path, log, terms}] for each run with a run.h5, in sweep order."""
    plan = None
    pj = os.path.join(folder, "sweep.json")
    if os.path.exists(pj):
        with open(pj) as f:
            plan = json.load(f)
    entries = []
    if plan is not None:
        for r in plan["runs"]:
            h5 = os.path.join(folder, r["name"], "run.h5")
            if os.path.exists(h5):
                entries.append((r["name"], r["label"], h5))
    else:
        for h5 in sorted(glob.glob(os.path.join(folder, "*", "run.h5"))):
            entries.append((os.path.basename(os.path.dirname(h5)), None, h5))
    runs = []
    for name, label, h5 in entries:
        log = read(h5)
        if label is None:
            a = log["attrs"]
            label = str(a.get("algorithm", name)) + (f"+{a['codec']}" if a.get("codec") else "")
        runs.append({"name": name, "label": label, "path": h5, "log": log, "terms": nw.row_terms(log)})
    return runs


def _algorithm(log: dict) -> str:
    return str(log["attrs"].get("algorithm", ""))


def _config_target(log: dict) -> Optional[float]:
    import yaml
    try:
        cfg = yaml.safe_load(log["attrs"].get("config_yaml", "")) or {}
    except yaml.YAMLError:
        return None
    return (cfg.get("train") or {}).get("target_accuracy")


def choose_target(runs: list[dict], target: Optional[float]) -> float:
    if target is not None:
        return float(target)
    cfg_t = {_config_target(r["log"]) for r in runs}
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


# -- numbers --------------------------------------------------------------------------------------
def run_numbers(run: dict, target: float, nets: list[nw.Network]) -> dict:
    """To-target numbers of one run: epoch, round, step, bits (None if never reached), times."""
    ev = run["log"]["eval"]
    i = nw.first_reaching(ev, target)
    out = {"name": run["name"], "label": run["label"], "reached": i is not None}
    if i is None:
        out.update(epoch=None, rounds=None, step=None, bits=None)
        out["time"] = {net_name(n): None for n in nets}
    else:
        out.update(epoch=float(ev["epoch"][i]), rounds=int(ev["rounds"][i]), step=int(ev["step"][i]),
                   bits=int(ev["bits_sent"][i]))
        out["time"] = {net_name(n): nw.time_to_target(run["log"], n, target, terms=run["terms"]) for n in nets}
    out["total_time"] = {net_name(n): float(np.sum(run["terms"].time(n))) for n in nets}
    return out


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(runs: list[dict], target: float, nets: list[nw.Network], baseline: Optional[str] = None) -> dict:
    per_run = [run_numbers(r, target, nets) for r in runs]
    labels = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    if baseline is None:
        psgd = [r["label"] for r in runs if _algorithm(r["log"]) == "psgd"]
        baseline = psgd[0] if psgd else None
    rows = []
    for lab in labels:
        rs = [p for p in per_run if p["label"] == lab]
        all_reached = all(p["reached"] for p in rs)
        row = {"label": lab, "runs": len(rs), "reached": sum(p["reached"] for p in rs),
               "epoch": _mean([p["epoch"] for p in rs]) if all_reached else None,
               "rounds": _mean([p["rounds"] for p in rs]) if all_reached else None,
               "bits": _mean([p["bits"] for p in rs]) if all_reached else None,
               "time": {k: (_mean([p["time"][k] for p in rs]) if all_reached else None)
                        for k in map(net_name, nets)}}
        rows.append(row)
    base = next((r for r in rows if r["label"] == baseline), None)
    for r in rows:
        r["speedup"] = {}
        for k in map(net_name, nets):
            b = base["time"][k] if base else None
            r["speedup"][k] = (b / r["time"][k]) if (b is not None and r["time"][k]) else None
        r["bits_ratio"] = (r["bits"] / base["bits"]) if (base and base["bits"] and r["bits"] is not None) else None
    return {"target_accuracy": target, "baseline": baseline, "networks": [net_name(n) for n in nets],
            "labels": rows, "runs": per_run}


def _fmt(v, kind: str = "g") -> str:
    if v is None:
        return "—"
    if kind == "time":
        return f"{v:.3g} s"
    if kind == "x":
        return f"{v:.2f}×"
    if kind == "bits":
        return f"{v / 8 / 2**20:.3g} MiB"
    return f"{v:.3g}"


def summary_markdown(s: dict) -> str:
    nets = s["networks"]
    head = ["label", "runs", "epochs", "rounds", "bits"] + [f"time @{n}" for n in nets] + \
           [f"speed-up @{n}" for n in nets]
    lines = [f"Target test accuracy: **{s['target_accuracy']:.4f}**; baseline for speed-ups: "
             f"`{s['baseline']}`.  Times are modelled (measured compute + codec + α-β comm, "
             "docs/network.md); bits = all ranks, both directions; a dash: not reached by every repeat.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s["labels"]:
        cells = [f"`{r['label']}`", f"{r['reached']}/{r['runs']}", _fmt(r["epoch"]), _fmt(r["rounds"]),
                 _fmt(r["bits"], "bits")] + [_fmt(r["time"][n], "time") for n in nets] + \
                [_fmt(r["speedup"][n], "x") for n in nets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- figures --------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(run: dict, x: str, y: str, net: Optional[nw.Network] = None):
    log, terms = run["log"], run["terms"]
    if y == "loss":
        m = log["metrics"]
        yv = np.asarray(m["train_loss"], float)
        if x == "epoch":
            xv = np.asarray(m["epoch"], float)
        elif x == "round":
            xv = np.asarray(m["rounds"], float)
        elif x == "bits":
            xv = np.asarray(m["bits_sent"], float)
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
        xv = np.asarray(ev["bits_sent"], float)
    else:
        cum = np.concatenate([[0.0], np.cumsum(terms.time(net))])
        idx = np.searchsorted(terms.step, np.asarray(ev["step"]), side="left")
        xv = cum[np.minimum(idx + (np.asarray(ev["step"]) > 0), len(cum) - 1)]
    return xv, yv


XLABEL = {"epoch": "epoch", "round": "synchronization round", "bits": "bits sent (all ranks)",
          "time": "modelled time (s)"}


def draw(runs: list[dict], out: str, nets: list[nw.Network], target: Optional[float] = None) -> list[str]:
    """Write every figure; returns the paths."""
    plt = _plt()
    os.makedirs(out, exist_ok=True)
    labels = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    # time figures: each bandwidth at the first latency
    first_lat = nets[0].link.latency if nets else 0.0
    time_nets = [n for n in nets if n.link.latency == first_lat]
    xs = [("epoch", None), ("round", None), ("bits", None)] + [("time", n) for n in time_nets]
    paths = []
    for y in ("loss", "accuracy"):
        for x, net in xs:
            fig, ax = plt.subplots(figsize=(6, 4))
            seen = set()
            for r in runs:
                xv, yv = _series(r, x, y, net)
                ok = np.isfinite(yv)
                ax.plot(xv[ok], yv[ok], color=colors[r["label"]], lw=1.2,
                        label=None if r["label"] in seen else r["label"])
                seen.add(r["label"])
            if y == "accuracy" and target is not None:
                ax.axhline(target, color="grey", ls=":", lw=1)
            if x == "bits":
                ax.set_xscale("symlog" if any(np.any(_series(r, x, y)[0] <= 0) for r in runs) else "log")
            if y == "loss":
                ax.set_yscale("log")
            ax.set_xlabel(XLABEL[x] + (f" at {net_name(net)}" if net is not None else ""))
            ax.set_ylabel("training loss" if y == "loss" else "test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            suffix = x if net is None else f"time_{nw.format_bandwidth(net.link.bandwidth)}"
            p = os.path.join(out, f"{y}_vs_{suffix}.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def report_sweep(folder: str, bandwidths: str = DEFAULT_BANDWIDTHS, latencies: str = DEFAULT_LATENCIES,
                 target: Optional[float] = None, out: Optional[str] = None, baseline: Optional[str] = None,
                 shared_nic: bool = False) -> dict:
    runs = load_runs(folder)
    if not runs:
        raise ValueError(f"{folder}: no */run.h5 found (run the sweep first)")
    nets = networks(bandwidths, latencies, shared_nic)
    tgt = choose_target(runs, target)
    out = out or os.path.join(folder, "report")
    os.makedirs(out, exist_ok=True)
    s = summarize(runs, tgt, nets, baseline)
    s["figures"] = draw(runs, out, nets, tgt)
    cross = crossover.sweep_crossover(runs, tgt, nets[0].link.latency, out)   # qprsgd/crossover.py
    s["crossover"] = cross["rows"]
    s["crossover_figure"] = cross["figure"]
    md = summary_markdown(s) + "\n" + cross["markdown"]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Report: {os.path.basename(os.path.abspath(folder))}\n\n" + md + "\n")
        f.write("Figures: " + ", ".join(os.path.basename(p) for p in s["figures"]) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    s["markdown"] = md
    return s


def report_run(path: str, bandwidths: str, latencies: str, target: Optional[float],
               shared_nic: bool = False) -> str:
    log = read(path)
    run = {"name": os.path.basename(os.path.dirname(path)), "label": str(log["attrs"].get("algorithm")),
           "log": log, "terms": nw.row_terms(log)}
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
                                               f"{nums['bits'] / 8 / 2**20:.3g} MiB"),
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
    p = sub.add_parser("report", help="re-time a run under other networks, or draw a sweep's figures + summary")
    p.add_argument("path", help="a run's run.h5, or a sweep results folder")
    p.add_argument("--bandwidth", default=DEFAULT_BANDWIDTHS, help=f"comma list (default {DEFAULT_BANDWIDTHS})")
    p.add_argument("--latency", default=DEFAULT_LATENCIES, help="comma list, e.g. 0.1ms,10ms (default 0)")
    p.add_argument("--target", type=float, default=None, help="target test accuracy")
    p.add_argument("--baseline", default=None, help="label the speed-ups are relative to (default: psgd's)")
    p.add_argument("--shared-nic", action="store_true",
                   help="a node's concurrent messages share one NIC (default: one link per neighbour)")
    p.add_argument("--out", default=None, help="figure folder (default SWEEP_DIR/report)")


def main(args) -> int:
    try:
        if os.path.isfile(args.path):
            print(report_run(args.path, args.bandwidth, args.latency, args.target, args.shared_nic))
            return 0
        if not os.path.isdir(args.path):
            raise ValueError(f"{args.path!r} is neither a run.h5 file nor a folder")
        s = report_sweep(args.path, args.bandwidth, args.latency, args.target, args.out, args.baseline,
                         args.shared_nic)
    except ValueError as e:
        print(f"qprsgd report: {e}", file=sys.stderr)
        return 2
    print(s["markdown"])
    print(f"figures: {os.path.dirname(s['figures'][0])} ({len(s['figures'])} PNG files)")
    return 0
