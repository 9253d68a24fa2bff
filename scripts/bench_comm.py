#!/usr/bin/env python
"""Comm-layer benchmark: what the runner's transport costs against raw MPI and memcpy.

    mpiexec -n 2 python scripts/bench_comm.py [--mb 40] [--repeat 10]

Prints (rank 0), best of ``--repeat``, for a float32 buffer of ``--mb`` MB:
memcpy (numpy, into a reused buffer), Send/Recv of the buffer (rank 0 -> 1), MPI Allreduce
out of place and in place (what ``Comm.allreduce_mean`` uses), and ``Comm.allgather_bytes``
of the same bytes; each also as GB/s and as a ratio to memcpy.  The ``bounded`` rows are the
same operations with every wait bounded (``Comm(timeout=...)``, as ``qprsgd run`` uses them:
non-blocking MPI calls completed by a test loop with a deadline).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qprsgd.comm import Comm, world  # noqa: E402


def best(fn, repeat, comm):
    ts = []
    for _ in range(repeat):
        comm.barrier()
        t = time.perf_counter()
        fn()
        comm.barrier()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=40.0)
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    w = world()
    c = Comm(w)
    n = int(a.mb * 1e6 / 4)
    buf = np.ones(n, np.float32)
    out = np.empty_like(buf)
    nbytes = buf.nbytes
    res = {}
    res["memcpy"] = best(lambda: np.copyto(out, buf), a.repeat, c)
    if c.size >= 2:
        def sendrecv():
            if c.rank == 0:
                w.Send(buf, dest=1, tag=7)
            elif c.rank == 1:
                w.Recv(out, source=0, tag=7)
        res["Send/Recv 0->1"] = best(sendrecv, a.repeat, c)
    from mpi4py import MPI
    res["Allreduce (out of place)"] = best(lambda: w.Allreduce(buf, out, op=MPI.SUM), a.repeat, c)
    res["Allreduce (IN_PLACE)"] = best(lambda: w.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM), a.repeat, c)
    res["Comm.allreduce_mean"] = best(lambda: c.allreduce_mean(out), a.repeat, c)
    # what a run uses: every wait bounded by run.timeout (Iallreduce + a test loop)
    cb = Comm(w, timeout=600.0)
    res["Comm.allreduce_mean bounded"] = best(lambda: cb.allreduce_mean(out), a.repeat, c)
    u8 = buf.view(np.uint8)
    res["Comm.allgather_bytes"] = best(lambda: c.allgather_bytes(u8), a.repeat, c)
    res["Comm.allgather_bytes bounded"] = best(lambda: cb.allgather_bytes(u8), a.repeat, c)
    small = np.ones(1000, np.float32)
    res["allreduce_mean 4 kB"] = best(lambda: c.allreduce_mean(small), a.repeat, c)
    res["allreduce_mean 4 kB bounded"] = best(lambda: cb.allreduce_mean(small), a.repeat, c)
    if c.rank == 0:
        print(f"{c.size} ranks, {nbytes / 1e6:.1f} MB float32, best of {a.repeat}")
        print(f"{'operation':28s} {'ms':>8s} {'GB/s':>8s} {'÷ memcpy':>9s}")
        mc = nbytes / res["memcpy"] / 1e9
        for k, t in res.items():
            gbs = nbytes / t / 1e9
            print(f"{k:28s} {t * 1e3:8.2f} {gbs:8.2f} {gbs / mc:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
