"""The crossover bandwidth: below which bandwidth does an algorithm reach the target accuracy
sooner than the baseline (PSGD)?  Pure functions of the α-β network model (qprsgd/network.py)
and the runs' measured local times; ``qprsgd report SWEEP_DIR`` prints the table and draws it.

Time to target of a run on a homogeneous network of latency α and bandwidth B (payload share e):

    T(B) = C + α·L + N·β,  β = 8/(e·B)  seconds per byte,

with C the measured local work (compute + codec + the algorithm's arithmetic) up to the target
evaluation, and L, N the latency and byte terms of the traffic up to it (``network.row_terms``).
Algorithm a beats baseline b iff  ΔC := (C_a + αL_a) − (C_b + αL_b) < ΔN·8/(eB),  ΔN := N_b − N_a:

* ΔN > 0 (a moves fewer bytes) and ΔC > 0: a is faster below B* = 8ΔN/(e·ΔC)   ("below");
* ΔN > 0 and ΔC ≤ 0: faster at every bandwidth ("always");
* ΔN < 0 and ΔC < 0: faster above B* = 8ΔN/(e·ΔC)                          ("above");
* ΔN ≤ 0 and ΔC ≥ 0: never faster ("never").  (ΔN = 0, ΔC < 0: "always".)

Extrapolation to other worker counts M′ (16, 64, 256, 1024): each algorithm's per-round traffic
follows its communication pattern's cost (``pattern_terms``), with n = the bytes one worker hands
to the transport per round measured in the run (for ``summable`` the integer width grows to the
narrowest that holds M′·levels); C and the number of rounds to the target are the run's.  That
assumes weak scaling -- the same per-worker batch, the same steps to the target and the same
per-step local time at M′ -- which a real run at M′ may not show: the extrapolated figures say how
the communication pattern alone moves the crossover.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import network as nw

EXTRAPOLATE_M = (16, 64, 256, 1024)
_WIDTHS = (8, 16, 32, 64)


def format_bps(bps: float) -> str:
    """3 significant digits: 739kbps, 12.7Mbps, 3.6Gbps."""
    for unit, f in (("Tbps", 1e12), ("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)):
        if bps >= f:
            return f"{bps / f:.3g}{unit}"
    return f"{bps:.3g}bps"


@dataclass(frozen=True)
class Crossover:
    """``faster``: 'below' / 'above' ``bandwidth`` (bits/s), 'always' or 'never'."""

    faster: str
    bandwidth: Optional[float] = None

    def text(self) -> str:
        if self.faster == "always":
            return "always"
        if self.faster == "never":
            return "never"
        return ("< " if self.faster == "below" else "> ") + format_bps(self.bandwidth)


def crossover(C_a: float, L_a: float, N_a: float, C_b: float, L_b: float, N_b: float,
              alpha: float = 0.0, efficiency: float = 1.0) -> Crossover:
    """Where T_a(B) = C_a + αL_a + 8N_a/(eB) drops below T_b(B) (module docstring)."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    dC = (C_a + alpha * L_a) - (C_b + alpha * L_b)
    dN = N_b - N_a
    if dN > 0:
        return Crossover("always") if dC <= 0 else Crossover("below", 8.0 * dN / (efficiency * dC))
    if dN < 0:
        return Crossover("never") if dC >= 0 else Crossover("above", 8.0 * dN / (efficiency * dC))
    return Crossover("always") if dC < 0 else Crossover("never")


# -- patterns ---------------------------------------------------------------------------------------
def pattern_terms(pattern: str, M: int, n: float) -> tuple[float, float]:
    """(L, N) of one round on M workers when each worker hands n bytes to the transport:

    ring_allreduce (psgd, pr_sgd: the fp32 vector): 2(M−1), 2(M−1)/M·n;
    allgather: M−1, (M−1)·n;  reduce_scatter (alltoall then allgather of the chunk sums):
    2(M−1), 2(M−1)/M·n;  summable and powersgd (two ring all-reduces): 4(M−1), 2(M−1)/M·n."""
    M = int(M)
    if M <= 1:
        return 0.0, 0.0
    if pattern == "ring_allreduce":
        return 2.0 * (M - 1), 2.0 * (M - 1) / M * n
    if pattern == "allgather":
        return float(M - 1), (M - 1) * float(n)
    if pattern == "reduce_scatter":
        return 2.0 * (M - 1), 2.0 * (M - 1) / M * n
    if pattern in ("summable", "powersgd"):
        return 4.0 * (M - 1), 2.0 * (M - 1) / M * n
    raise ValueError(f"unknown pattern {pattern!r}")


def summable_width(M: int, levels: int) -> int:
    """The narrowest integer width whose signed range holds M·levels."""
    for w in _WIDTHS:
        if int(M) * int(levels) <= 2 ** (w - 1) - 1:
            return w
    raise ValueError(f"no integer width holds M·levels = {int(M) * int(levels)}")


def pattern_of(algorithm: str, params: dict) -> Optional[str]:
    """The communication pattern of an algorithm's rounds, or None where not modelled here."""
    if algorithm in ("psgd", "pr_sgd", "pasgd"):
        return "ring_allreduce"
    if algorithm in ("qsgd", "qpr_sgd"):
        return params.get("aggregation", "allgather")
    if algorithm == "powersgd":
        return "powersgd"
    return None


@dataclass(frozen=True)
class Profile:
    """One run up to the target: local seconds C, rounds R, per-round bytes per worker n, the
    run's M and pattern, and its (L, N) to the target from the log."""

    label: str
    pattern: Optional[str]
    M: int
    C: float
    R: float
    n: float
    L: float
    N: float
    levels: int = 1
    width: int = 16

    def terms_at(self, M: int) -> tuple[float, float]:
        """(L, N) to the target at M workers (the log's own at the run's M)."""
        if int(M) == self.M:
            return self.L, self.N
        if self.pattern is None:
            raise ValueError(f"{self.label}: no pattern to extrapolate from")
        n = self.n
        if self.pattern == "summable":
            w = summable_width(M, self.levels)
            n = (n - 8.0) * w / self.width + 8.0
        l, b = pattern_terms(self.pattern, M, n)
        return self.R * l, self.R * b


def profile(label: str, log: dict, terms: nw.RowTerms, target: float) -> Optional[Profile]:
    """A run's profile to the target accuracy, or None if it never reaches it."""
    import yaml
    ev = log["eval"]
    i = nw.first_reaching(ev, target)
    if i is None:
        return None
    step = float(ev["step"][i])
    idx = int(np.searchsorted(terms.step, step, side="left"))
    idx = min(idx, len(terms.step) - 1)
    sl = slice(0, idx + 1) if step > 0 else slice(0, 0)
    attrs = log.get("attrs", {})
    M = len(np.atleast_1d(attrs.get("workers", [0])))
    met = log["metrics"]
    R = float(met["rounds"][idx]) if step > 0 else 0.0
    nbytes = float(np.asarray(met["channel_bytes"])[idx].sum()) if step > 0 else 0.0
    cfg = yaml.safe_load(attrs.get("config_yaml", "") or "{}") or {}
    params = {k: v for k, v in (cfg.get("algorithm") or {}).items() if k != "name"}
    alg = str(attrs.get("algorithm", ""))
    return Profile(label, pattern_of(alg, params), M, float(np.sum(terms.local[sl])), R,
                   nbytes / M / R if R > 0 else 0.0, float(np.sum(terms.L[sl])), float(np.sum(terms.N[sl])),
                   int(params.get("levels", 1)), int(params.get("width", 16)))


def table(profiles: list[Profile], baseline: Profile, alpha: float = 0.0, efficiency: float = 1.0,
          Ms: tuple = EXTRAPOLATE_M) -> list[dict]:
    """Per profile (not the baseline): the crossover at the run's M and at each M′ of ``Ms``."""
    rows = []
    for p in profiles:
        if p is baseline:
            continue
        row = {"label": p.label, "M": p.M, "pattern": p.pattern, "at": {}}
        for M in (p.M,) + tuple(m for m in Ms if m != p.M):
            try:
                La, Na = p.terms_at(M)
                Lb, Nb = baseline.terms_at(M)
            except ValueError:
                row["at"][M] = None
                continue
            row["at"][M] = crossover(p.C, La, Na, baseline.C, Lb, Nb, alpha, efficiency)
        rows.append(row)
    return rows


def markdown(rows: list[dict], baseline_label: str, target: float, alpha: float) -> str:
    Ms = sorted({m for r in rows for m in r["at"]})
    head = (f"## Crossover bandwidth vs `{baseline_label}` (target accuracy {target:.4g}, latency "
            f"{nw.format_latency(alpha)})\n\n"
            "Bandwidth below which the algorithm reaches the target sooner ('> B': only above B). "
            "At the run's M from the log; at other M extrapolated from the pattern's cost with the "
            "run's local time and rounds (qprsgd/crossover.py).\n\n")
    lines = ["| label | pattern | run M | " + " | ".join(f"M = {m}" for m in Ms) + " |",
             "|---|---|---|" + "---|" * len(Ms)]
    for r in rows:
        cells = []
        for m in Ms:
            c = r["at"].get(m)
            cells.append("—" if c is None else c.text() + (" (run)" if m == r["M"] else ""))
        lines.append(f"| {r['label']} | {r['pattern'] or '—'} | {r['M']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def as_json(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        at = {}
        for m, c in r["at"].items():
            at[str(m)] = None if c is None else {"faster": c.faster, "bandwidth_bps": c.bandwidth}
        out.append({"label": r["label"], "M": r["M"], "pattern": r["pattern"], "at": at})
    return out


def draw(rows: list[dict], path: str, baseline_label: str) -> Optional[str]:
    """Crossover bandwidth vs M (log-log), one line per label; 'always' / 'never' are not drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for r in rows:
        pts = sorted((m, c.bandwidth) for m, c in r["at"].items()
                     if c is not None and c.faster == "below" and c.bandwidth and math.isfinite(c.bandwidth))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["label"])
        run = r["at"].get(r["M"])
        if run is not None and run.faster == "below":
            ax.plot([r["M"]], [run.bandwidth], marker="s", color="k", ms=7, fillstyle="none")
        drawn = True
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers M")
    ax.set_ylabel(f"faster than {baseline_label} below (bit/s)")
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("crossover bandwidth (square: measured M)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_crossover(runs: list[dict], target: float, alpha: float, out: str,
                    baseline_algorithm: str = "psgd") -> dict:
    """``report``'s one call: the crossover table (markdown, JSON) and figure of a sweep's runs
    (``{label, log, terms}`` each; the first run of each label) against the first ``psgd`` run."""
    seen, profiles, base = set(), [], None
    for r in runs:
        if r["label"] in seen:
            continue
        seen.add(r["label"])
        p = profile(r["label"], r["log"], r["terms"], target)
        if p is None:
            continue
        profiles.append(p)
        if base is None and str(r["log"]["attrs"].get("algorithm", "")) == baseline_algorithm:
            base = p
    if base is None:
        return {"markdown": f"(no crossover table: no `{baseline_algorithm}` run reaches the target)\n",
                "rows": [], "figure": None}
    rows = table(profiles, base, alpha)
    fig = draw(rows, os.path.join(out, "crossover_bandwidth.png"), base.label)
    return {"markdown": markdown(rows, base.label, target, alpha), "rows": as_json(rows), "figure": fig}
