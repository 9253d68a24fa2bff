#!/usr/bin/env python
"""Bits per worker per round against M, for every aggregation of qsgd and for PowerSGD.

Measured: each configuration runs two steps in-process (``qprsgd run --workers M``) at M = 2, 4, 8,
16 on an MLP [512] on digits (d = 38,410; qsgd s = ⌈√d⌉ = 196); from each log:

* ``sent`` -- bits per element one worker hands to the transport per round (the ledger's count);
* ``wire`` -- bits per element per round on the busiest link of the α-β model (``row_terms``' byte
  term N × 8 / d: ring all-reduce 2(M−1)/M·n, allgather (M−1)·n, alltoall + allgather of chunk
  sums 2(M−1)/M·n), i.e. what sets the time at low bandwidth.

Modelled (M = 64 … 1024): ``crossover.pattern_terms`` with the per-worker bytes measured at M = 16
(summable: its integers widen to hold M·levels).

    nice -n 10 python scripts/bits_vs_m.py [--ms 2,4,8,16] [--out /tmp/bits_vs_m]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qprsgd import crossover as cx, network as nw  # noqa: E402
from qprsgd.cli import main as cli  # noqa: E402
from qprsgd.logger import read  # noqa: E402

CONFIGS = {
    "fp32 ring all-reduce (psgd)": ({"name": "psgd"}, "ring_allreduce"),
    "qsgd allgather": ({"name": "qsgd"}, "allgather"),
    "qsgd reduce_scatter": ({"name": "qsgd", "aggregation": "reduce_scatter"}, "reduce_scatter"),
    "summable L=1 (int8)": ({"name": "qsgd", "aggregation": "summable", "levels": 1, "width": 8}, "summable"),
    "powersgd r=2": ({"name": "powersgd", "rank": 2}, "powersgd"),
}
BATCH, STEPS = 8, 2


def run(alg: dict, M: int, out: str) -> dict:
    cfg = {"seed": 1, "run": {"progress": False},
           "train": {"epochs": 1, "batch_size": BATCH, "lr": 0.05, "eval_every": 1000, "log_every": 1},
           "model": {"name": "mlp", "hidden": [512]},
           "data": {"name": "digits", "params": {"max_train": M * BATCH * STEPS, "max_test": 20}},
           "algorithm": alg}
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, "config.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli(["run", p, "--out", out, "--workers", str(M)])
    if rc:
        raise SystemExit(f"run failed: {out}")
    return read(os.path.join(out, "run.h5"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="2,4,8,16")
    ap.add_argument("--model-ms", default="64,256,1024")
    ap.add_argument("--out", default="/tmp/bits_vs_m")
    a = ap.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    mms = [int(m) for m in a.model_ms.split(",")]
    print(f"| configuration | " + " | ".join(f"M = {m} sent / wire" for m in ms) + " | "
          + " | ".join(f"M = {m} wire (model)" for m in mms) + " |")
    print("|---|" + "---|" * (len(ms) + len(mms)))
    for name, (alg, pattern) in CONFIGS.items():
        cells, last = [], None
        for M in ms:
            log = run(alg, M, os.path.join(a.out, f"{alg['name']}_{alg.get('aggregation', '')}_M{M}"))
            d = int(log["attrs"]["d"])
            met = log["metrics"]
            R = float(met["rounds"][-1])
            sent = float(np.asarray(met["channel_bytes"])[-1].sum()) / M / R
            T = nw.row_terms(log)
            wire = float(T.N.sum()) / R
            cells.append(f"{8 * sent / d:.3g} / {8 * wire / d:.3g}")
            last = (M, sent, d, alg)
        M0, n, d, alg = last
        prof = cx.Profile(name, pattern, M0, 0.0, 1.0, n, 0.0, 0.0, int(alg.get("levels", 1)),
                          int(alg.get("width", 16)))
        mod = [f"{8 * prof.terms_at(M)[1] / d:.3g}" for M in mms]
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(mod) + " |", flush=True)
    print(f"\n(d = {d}; bits per element per worker per round; 'sent': handed to the transport, "
          f"'wire': the α-β model's byte term on the busiest link)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
