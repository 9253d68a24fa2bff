"""In-process cluster: M workers in one Python process, one thread each, exchanging through
shared memory with the same :class:`~qprsgd.transport.TransportBase` operations as MPI.

Why threads.  An algorithm's ``step()`` is straight-line code that blocks inside transport
calls (a neighbour exchange in the middle of DCD-PSGD's step, a gather to a server in
dist-EF-SGD); running it unchanged needs an execution context per worker that can block there.
Threads give that with no rewrite of any algorithm, share one torch import and one copy of the
dataset, and the heavy work inside a step (torch forward/backward, numpy, numba kernels)
releases the GIL, so two cores are used.  Processes would cost a torch import each (the
reason this backend exists); a generator-based scheduler would need every ``step()`` rewritten.

Why results cannot depend on thread timing.  Nothing a worker computes reads shared mutable
state except through this transport, and every value the transport returns is fixed by the
program, not by arrival order:
  * point-to-point messages are matched by (group, source, destination, tag) and delivered
    first-in first-out per key, exactly MPI's non-overtaking rule; tags follow call order;
  * a collective waits for every member, then the last to arrive combines the contributions
    *in rank order* (allreduce: Σ in rank order 0..M−1 in the buffer's dtype, then ÷ M;
    allgather: the list in rank order) and every member reads the same result.
MPI's own ``Allreduce`` picks its summation order, so float all-reduces agree with an
``mpiexec`` run to rounding (bit for bit at M = 2, where a + b is the only order); everything
whose order the project fixes (payload decoding, neighbour mixing, servers) agrees bit for bit.

Bounded waits and failure.  Every wait is bounded by ``timeout`` seconds and names the ranks
that did not arrive.  A worker that raises marks the cluster failed; every other worker's next
(or current) wait raises :class:`~qprsgd.transport.PeerFailed`; :func:`run_workers` re-raises
the first real exception with its rank, so the run ends with that message and a non-zero exit.

Each worker has its own torch module, generator, data stream, codec, algorithm and ledger,
built by the same ``experiment.build`` as under MPI; torch runs one intra-op thread per worker
(the workers are the parallelism).
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import defaultdict, deque
from typing import Callable, Optional, Sequence

import numpy as np

from .transport import Ledger, PeerFailed, TransportBase, TransportError


class LocalTimeout(TransportError):
    """A wait outlived the cluster's timeout."""


class _Slot:
    __slots__ = ("values", "arrived", "result", "done", "readers")

    def __init__(self, n: int):
        self.values = [None] * n
        self.arrived = [False] * n
        self.result = None
        self.done = False
        self.readers = 0


class LocalCluster:
    """Shared state of M in-process workers: mailboxes, collective slots, failure, timeout."""

    def __init__(self, size: int, timeout: float = 600.0):
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        if not (float(timeout) > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.size = int(size)
        self.timeout = float(timeout)
        self.lock = threading.Lock()
        self.cv = [threading.Condition(self.lock) for _ in range(self.size)]  # one per world rank
        self.mail: dict = defaultdict(deque)   # (group, src, dst, tag) -> payloads, FIFO
        self.slots: dict = {}                  # (group, seq) -> _Slot
        self.failed: Optional[tuple[int, BaseException]] = None
        # tests may set a list here: every point-to-point message is appended as
        # (channel, source world rank, destination world rank, payload copy)
        self.trace: Optional[list] = None

    def fail(self, rank: int, exc: BaseException) -> None:
        """Mark the cluster failed (first failure wins) and wake every waiting worker."""
        with self.lock:
            if self.failed is None:
                self.failed = (rank, exc)
            for c in self.cv:
                c.notify_all()

    def _wait(self, me: int, ready: Callable[[], bool], what: str, missing: Callable[[], list]) -> None:
        """Wait (lock held) until ``ready()``; raise on a peer's failure or after the timeout."""
        deadline = time.monotonic() + self.timeout
        cv = self.cv[me]
        while True:
            if self.failed is not None:
                r, e = self.failed
                raise PeerFailed(f"rank {me}: stopped because rank {r} failed ({type(e).__name__}: {e})")
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise LocalTimeout(f"rank {me} of {self.size}: {what} did not complete within run.timeout = "
                                   f"{self.timeout:g} s; rank(s) {missing()} did not arrive")
            cv.wait(min(left, 5.0))


class LocalTransport(TransportBase):
    """One worker's view of a group of the in-process cluster (ranks 0..size-1 of the group)."""

    def __init__(self, cluster: LocalCluster, members: Sequence[int], world_rank: int,
                 group_id=("world",), ledger: Optional[Ledger] = None):
        self.cluster = cluster
        self.members = tuple(int(m) for m in members)
        self.world_rank = int(world_rank)
        self.rank = self.members.index(self.world_rank)
        self.size = len(self.members)
        self.group = group_id
        self._seq = 0
        self._init_base(ledger)

    # -- point-to-point ------------------------------------------------------------------------
    def _isend(self, data, dest, tag, channel):
        c = self.cluster
        payload = np.array(data, dtype=np.uint8, copy=True)   # the receiver owns its copy
        with c.lock:
            if c.trace is not None:
                c.trace.append((channel, self.world_rank, self.members[dest], payload.copy()))
            if c.failed is not None:
                r, e = c.failed
                raise PeerFailed(f"rank {self.world_rank}: stopped because rank {r} failed "
                                 f"({type(e).__name__}: {e})")
            c.mail[(self.group, self.rank, dest, tag)].append(payload)
            c.cv[self.members[dest]].notify_all()
        return None   # delivered: nothing to wait for

    def _take(self, source, tag) -> np.ndarray:
        c = self.cluster
        key = (self.group, source, self.rank, tag)
        with c.lock:
            c._wait(self.world_rank, lambda: bool(c.mail.get(key)),
                    f"receive from rank {source} (world rank {self.members[source]})",
                    lambda: [self.members[source]])
            q = c.mail[key]
            payload = q.popleft()
            if not q:
                del c.mail[key]
        return payload

    def _irecv(self, buf, source, tag):
        return ("recv", buf, source, tag)

    def _recv_unknown(self, source, tag) -> np.ndarray:
        return self._take(source, tag)

    def _waitall(self, handles) -> None:
        for h in handles:
            if h is None:
                continue
            _, buf, source, tag = h
            payload = self._take(source, tag)
            if payload.nbytes != buf.nbytes:
                raise TransportError(f"rank {self.rank}: expected {buf.nbytes} bytes from rank {source}, "
                                     f"got {payload.nbytes}")
            buf[...] = payload

    # -- collectives ---------------------------------------------------------------------------
    def _collective(self, value, combine: Callable[[list], object], what: str):
        """Every member contributes ``value``; the last to arrive computes ``combine(values in
        rank order)``; every member returns that same result."""
        c = self.cluster
        key = (self.group, self._seq)
        self._seq += 1
        with c.lock:
            if c.failed is not None:
                r, e = c.failed
                raise PeerFailed(f"rank {self.world_rank}: stopped because rank {r} failed "
                                 f"({type(e).__name__}: {e})")
            slot = c.slots.get(key)
            if slot is None:
                slot = c.slots[key] = _Slot(self.size)
            slot.values[self.rank] = value
            slot.arrived[self.rank] = True
            if all(slot.arrived):
                slot.result = combine(slot.values)
                slot.done = True
                for m in self.members:
                    c.cv[m].notify_all()
            else:
                c._wait(self.world_rank, lambda: slot.done, what,
                        lambda: [self.members[k] for k, a in enumerate(slot.arrived) if not a])
            result = slot.result
            slot.readers += 1
            if slot.readers == self.size:
                del c.slots[key]
        return result

    def _allreduce_sum(self, buf) -> None:
        def total(vals):
            acc = np.array(vals[0], copy=True)
            for v in vals[1:]:
                acc += v
            return acc
        buf[...] = self._collective(buf.copy(), total, "allreduce")

    def _allgather_payloads(self, data) -> list[np.ndarray]:
        def frozen(vals):
            out = []
            for v in vals:
                v = np.array(v, dtype=np.uint8, copy=True)
                v.flags.writeable = False
                out.append(v)
            return out
        return list(self._collective(data, frozen, "allgather"))

    def bcast_bytes(self, data: Optional[bytes], root: int = 0) -> bytes:
        return self._collective(bytes(data) if self.rank == root else None,
                                lambda vals: vals[root], "broadcast")

    def allreduce_scalars(self, values: Sequence[float], op: str = "sum") -> np.ndarray:
        red = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]

        def reduce(vals):
            acc = np.array(vals[0], dtype=np.float64, copy=True)
            for v in vals[1:]:
                acc = red(acc, v)
            return acc
        return np.array(self._collective(np.asarray(values, dtype=np.float64), reduce,
                                         "scalar reduction"), copy=True)

    def gather_rows(self, values: Sequence[float], root: int = 0) -> Optional[np.ndarray]:
        out = self._collective(np.asarray(values, dtype=np.float64),
                               lambda vals: np.stack(vals), "gather")
        return np.array(out, copy=True) if self.rank == root else None

    def gather_vectors(self, x: np.ndarray, root: int = 0) -> Optional[np.ndarray]:
        out = self._collective(np.array(x, copy=True), lambda vals: np.stack(vals), "gather")
        return out if self.rank == root else None

    def barrier(self) -> None:
        self._collective(None, lambda vals: None, "barrier")

    def local_size(self) -> int:
        return self.size   # every in-process worker shares this node

    def local_rank(self) -> int:
        return self.rank

    def cuda_aware(self) -> bool:
        return False       # no MPI: device vectors are always staged

    def split(self, color: int, key: Optional[int] = None) -> Optional["LocalTransport"]:
        """Collective: members with the same color >= 0 form a sub-group ordered by (key, rank);
        color < 0 returns None.  The sub-group reports into the same ledger."""
        seq = self._seq

        def plan(vals):
            groups: dict[int, list] = {}
            for r, (col, k) in enumerate(vals):
                if col >= 0:
                    groups.setdefault(col, []).append((k, r))
            return {col: [self.members[r] for _, r in sorted(v)] for col, v in groups.items()}

        groups = self._collective((int(color), self.rank if key is None else int(key)), plan, "split")
        if color < 0:
            return None
        return LocalTransport(self.cluster, groups[int(color)], self.world_rank,
                              group_id=(self.group, seq, int(color)), ledger=self.ledger)


class WorkerFailed(RuntimeError):
    """An in-process run ended because worker ``rank`` raised; the message is that exception's."""

    def __init__(self, rank: int, exc: BaseException, tb: str):
        self.rank, self.exc, self.tb = rank, exc, tb
        super().__init__(f"worker {rank} failed: {type(exc).__name__}: {exc}")


def run_workers(size: int, target: Callable[[LocalTransport], object], timeout: float = 600.0,
                name: str = "qprsgd-worker") -> list:
    """Run ``target(transport)`` for ranks 0..size-1, one thread each; return their results in
    rank order.  If any raises, every other worker is stopped at its next wait and
    :class:`WorkerFailed` carries the first real exception (never a hang)."""
    cluster = LocalCluster(size, timeout)
    results: list = [None] * size
    errors: dict[int, tuple[BaseException, str]] = {}

    def body(r: int):
        t = LocalTransport(cluster, range(size), r)
        try:
            results[r] = target(t)
        except PeerFailed as e:
            errors.setdefault(r, (e, ""))
        except BaseException as e:   # noqa: BLE001 -- recorded, re-raised by the caller thread
            errors[r] = (e, traceback.format_exc())
            cluster.fail(r, e)

    threads = [threading.Thread(target=body, args=(r,), name=f"{name}-{r}", daemon=True) for r in range(size)]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
    except KeyboardInterrupt:
        # Ctrl-C reaches the main thread: stop every worker at its next wait, give them a moment
        # to unwind (worker 0 flushes its log), then let the caller report it
        cluster.fail(-1, KeyboardInterrupt("interrupted (Ctrl-C)"))
        for th in threads:
            th.join(10)
        raise
    if cluster.failed is not None:
        r, _ = cluster.failed
        e, tb = errors[r]
        raise WorkerFailed(r, e, tb)
    return results
