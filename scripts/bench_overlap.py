#!/usr/bin/env python
"""Gradient buckets overlapped with backward vs one all-reduce after backward (issue 16).

    python scripts/bench_overlap.py [--ranks 2,4] [--models mlp,resnet20] [--algs psgd,sgdm]
                                    [--bucket-mb 1] [--steps 40] [--reps 3]

For each (model, ranks, algorithm) it runs ``mpiexec -n N qprsgd run`` with ``train.bucket_mb = 0``
(A: the whole gradient all-reduced after backward) and with ``--bucket-mb`` (B: each bucket's
all-reduce posted from the backward hooks; ``qsgd``: B is ``per_bucket: true``, each bucket
encoded and all-gathered from the hooks -- a different compressor, so its B/A also carries the
per-bucket codec's cost; the parameter-server algorithms ``signsgd_mv``, ``signum_mv``,
``dist_ef_blocksgd``, ``dist_ef_blocksgdm`` (rank 0 doubling as server, default codecs): B pushes
each bucket to the server from the hooks, the same iterates), interleaved A B B A A B ... ``--reps`` times, and
prints the medians over reps of the per-step time (``metrics/t_step``) and of the exposed
communication time of the rank that waited least (``metrics/t_comm_min``: posting + waiting; the
max over ranks is mostly waiting for a slower peer), the ratio B/A of the step times (< 1:
overlap pays), and the share of A's communication time that B hid behind backward:
1 − t_comm_min(B)/t_comm_min(A).
Same seed, data and model in A and B: for psgd, sgdm and the parameter-server algorithms above
their iterates are equal (tests/test_buckets.py, tests/test_buckets_ps.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_step import config as step_config, write_cifar  # noqa: E402


def measure(model: str, n: int, alg: str, bucket_mb: float, steps: int, tmp: str, tag: str) -> tuple:
    from qprsgd.logger import read
    cfg = step_config(model, steps, n, tmp)
    cfg["algorithm"] = {"name": alg}
    if alg == "qsgd" and bucket_mb > 0:
        cfg["algorithm"]["per_bucket"] = True     # B: encode + all-gather per bucket
    cfg["train"]["bucket_mb"] = bucket_mb
    path = os.path.join(tmp, f"{tag}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    out = os.path.join(tmp, tag)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    subprocess.run([mpiexec, "-n", str(n), sys.executable, "-m", "qprsgd.cli", "run", path, "--out", out],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    m = read(os.path.join(out, "run.h5"))["metrics"]
    k = m["steps"][1:].sum()                      # first row: warm-up
    return m["t_step"][1:].sum() / k * 1e3, m["t_comm_min"][1:].sum() / k * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--models", default="mlp,resnet20")
    ap.add_argument("--algs", default="psgd,sgdm")
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"{'model':9s} {'ranks':>5s} {'alg':17s} {'step A ms':>9s} {'step B ms':>9s} {'B/A':>6s} "
          f"{'comm A ms':>9s} {'comm B ms':>9s} {'hidden':>7s}   (A: bucket_mb 0, B: bucket_mb {a.bucket_mb:g})")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(tmp)
        for model in a.models.split(","):
            steps = a.steps if model == "mlp" else max(10, a.steps // 2)
            for n in (int(r) for r in a.ranks.split(",")):
                for alg in a.algs.split(","):
                    res = {"A": [], "B": []}
                    for rep in range(a.reps):
                        for side in ("AB" if rep % 2 == 0 else "BA"):
                            mb = 0.0 if side == "A" else a.bucket_mb
                            res[side].append(measure(model, n, alg, mb, steps, tmp, f"{model}-{n}-{alg}-{side}{rep}"))
                    sa = statistics.median(s for s, _ in res["A"])
                    sb = statistics.median(s for s, _ in res["B"])
                    ca = statistics.median(c for _, c in res["A"])
                    cb = statistics.median(c for _, c in res["B"])
                    worst = max(worst, sb / sa)
                    hidden = f"{100 * (1 - cb / ca):6.0f}%" if ca > 0 else "    n/a"
                    print(f"{model:9s} {n:5d} {alg:17s} {sa:9.2f} {sb:9.2f} {sb / sa:6.3f} {ca:9.2f} {cb:9.2f} "
                          f"{hidden}", flush=True)
    print(f"worst B/A: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
