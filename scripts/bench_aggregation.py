#!/usr/bin/env python
"""One round of each aggregation under mpiexec, as ratios to an fp32 all-reduce in the same run.

    python scripts/bench_aggregation.py [--ns 2,4,8] [--d 1000000] [--repeat 5]

The driver starts ``mpiexec -n N`` for each N of ``--ns`` (each rank: ``--worker``).  Every rank
holds a Gaussian float32 vector of length d; timed, best of ``--repeat`` (barrier before and after):

* ``fp32 allreduce``: ``Comm.allreduce_mean`` of the vector (the baseline);
* ``allgather`` / ``reduce_scatter``: the qsgd codec (s = ⌈√d⌉) through
  ``qprsgd.algorithms.aggregation`` -- encode, exchange, decode, sum: the whole round;
* ``summable``: levels 1, width 8 (scale all-reduce, rounding, integer all-reduce, rescale).

Printed (rank 0): seconds, bytes handed to the transport by rank 0 per round, and both as ratios
to the fp32 all-reduce.  Time here is this machine's (ranks on shared cores, shared-memory
transport): it measures the local work of each pattern more than a network's cost; the network
model (qprsgd/network.py) gives the latter.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(a) -> int:
    from qprsgd.algorithms.aggregation import AllGatherMean, ReduceScatterMean, SummableMean
    from qprsgd.comm import Comm, world
    from qprsgd.registry import CODECS
    QSGD = CODECS.get("qsgd").factory
    c = Comm(world())
    d = a.d
    v = np.random.default_rng([0, c.rank]).normal(size=d).astype(np.float32)
    rng = np.random.default_rng([1, c.rank])
    full = QSGD(d)
    full.warmup()
    aggs = {
        "allgather": AllGatherMean(full, d),
        "reduce_scatter": ReduceScatterMean(lambda n, b: QSGD(n, b), d, (d,), c.size),
        "summable": SummableMean(d, 1, 8, c.size),
    }
    for ag in aggs.values():          # warm-up (numba caches, first-touch pages)
        ag.mean(c, v, rng)
    res = {}

    def timed(fn):
        ts, nb = [], []
        for _ in range(a.repeat):
            b0 = c.ledger.total_bytes()
            c.barrier()
            t = time.perf_counter()
            fn()
            c.barrier()
            ts.append(time.perf_counter() - t)
            nb.append(c.ledger.total_bytes() - b0)
        return min(ts), nb[-1]
    buf = v.copy()
    res["fp32 allreduce"] = timed(lambda: c.allreduce_mean(buf))
    for k, ag in aggs.items():
        res[k] = timed(lambda ag=ag: ag.mean(c, v, rng))
    if c.rank == 0:
        t0, b0 = res["fp32 allreduce"]
        print(f"n = {c.size}, d = {d}, best of {a.repeat}")
        for k, (t, b) in res.items():
            print(f"  {k:16} {t * 1e3:9.2f} ms  {t / t0:6.2f}x   {b:>10} B  {b / b0:6.3f}x", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               QPRSGD_CODEC_THREADS=os.environ.get("QPRSGD_CODEC_THREADS", "1"))
    for n in [int(x) for x in a.ns.split(",")]:
        cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(n), sys.executable,
               os.path.abspath(__file__), "--worker", "--d", str(a.d), "--repeat", str(a.repeat)]
        p = subprocess.run(cmd, env=env, timeout=1200)
        if p.returncode:
            return p.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
