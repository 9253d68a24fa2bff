"""MPI driver of :func:`qprsgd.netem.calibrate`: a ring of concurrent point-to-point transfers.

FLOWS = 1: every rank sends NBYTES to rank + 1 and receives NBYTES from rank - 1 at the same time
(each NIC: one flow out, one in).  FLOWS = 2: to and from both ring neighbours (two out, two in:
the decentralized algorithms' pattern).  Through the comm layer, REPS times after one unmeasured
warm-up (connection set-up, TCP slow start).  Rank 0 prints one line
``ring_seconds <median over reps of the slowest rank's time>``.

    python -m qprsgd.netem_probe NBYTES REPS [FLOWS]
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .comm import Comm, world


def main(argv: list[str]) -> int:
    nbytes, reps = int(argv[0]), int(argv[1])
    flows = int(argv[2]) if len(argv) > 2 else 1
    if flows not in (1, 2):
        raise ValueError(f"FLOWS must be 1 or 2, got {flows}")
    both = flows == 2
    if nbytes < 1 or reps < 1:
        raise ValueError(f"NBYTES and REPS must be >= 1, got {nbytes}, {reps}")
    c = Comm(world())
    if c.size < (3 if both else 2):
        raise ValueError(f"the ring probe with {flows} flow(s) per NIC needs >= {3 if both else 2} ranks")
    right, left = (c.rank + 1) % c.size, (c.rank - 1) % c.size
    buf = np.zeros(nbytes, dtype=np.uint8)
    times = []
    for i in range(reps + 1):
        c.barrier()
        t = time.perf_counter()
        if both:
            c.isendrecv_bytes({right: buf, left: buf}, {left: nbytes, right: nbytes}).wait()
        else:
            c.isendrecv_bytes({right: buf}, {left: nbytes}).wait()
        dt = float(c.allreduce_scalars([time.perf_counter() - t], op="max")[0])
        if i:
            times.append(dt)
    if c.rank == 0:
        print(f"ring_seconds {float(np.median(times)):.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
