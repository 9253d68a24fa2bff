"""MPI driver: every data-moving Comm call with poll_sleep = argv[1] seconds (0 = block in MPI),
checked against values derived from rank and size.  Exits 1 naming the first mismatch."""
import sys

import numpy as np
from mpi4py import MPI

from qprsgd.comm import Comm


def payload(r: int, n: int) -> np.ndarray:
    return ((np.arange(5 + 3 * r + n) * (r + 7)) % 251).astype(np.uint8)


def main() -> int:
    c = Comm(MPI.COMM_WORLD, poll_sleep=float(sys.argv[1]))
    r, n = c.rank, c.size
    bad = []
    x = np.full(1000, float(r + 1), np.float32)
    c.allreduce_mean(x)
    if not np.allclose(x, (n + 1) / 2):
        bad.append("allreduce_mean")
    got = c.allgather_bytes(payload(r, 0))
    if [g.tobytes() for g in got] != [payload(j, 0).tobytes() for j in range(n)]:
        bad.append("allgather_bytes")
    nb = sorted({(r - 1) % n, (r + 1) % n} - {r})
    got = c.neighbor_exchange(payload(r, 1), nb)
    if sorted(got) != nb or any(got[j].tobytes() != payload(j, 1).tobytes() for j in nb):
        bad.append("neighbor_exchange")
    got = c.gather_bytes(payload(r, 2), root=0)
    if r == 0 and (sorted(got) != list(range(n)) or any(got[j].tobytes() != payload(j, 2).tobytes() for j in got)):
        bad.append("gather_bytes")
    dests = list(range(1, n))
    got = c.scatter_bytes({j: payload(j, 3) for j in dests} if r == 0 else None, root=0, dests=dests)
    if r in dests and got.tobytes() != payload(r, 3).tobytes():
        bad.append("scatter_bytes")
    got = c.broadcast_bytes(payload(0, 4) if r == 0 else None, root=0, dests=dests)
    if r in dests and got.tobytes() != payload(0, 4).tobytes():
        bad.append("broadcast_bytes")
    if bad:
        print(f"rank {r}/{n} poll_sleep {c.poll_sleep}: wrong {bad}", flush=True)
        return 1
    print(f"rank {r} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
