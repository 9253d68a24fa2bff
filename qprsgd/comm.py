"""The comm layer: the only module that imports mpi4py.

A :class:`Comm` wraps an mpi4py communicator that is passed in (never a module-level
``COMM_WORLD``).  It moves float buffers and byte payloads and knows nothing about
compression.  It counts what it hands to MPI:

* ``bytes_sent[channel]`` -- payload bytes this rank handed to MPI to send, per channel.
  Point-to-point sends count once per destination; a collective counts this rank's send
  buffer once per call (allreduce: the buffer; allgather/gather: this rank's payload).
  Channels: ``allreduce``, ``allgather``, ``peer`` (neighbour exchange), ``up`` (worker ->
  server) and ``down`` (server -> workers), or any name a caller passes.
* ``messages_sent[channel]`` -- the number of such sends.
* ``seconds`` -- wall time spent inside MPI calls.

What a collective really puts on the wire (a ring allreduce moves 2(M-1)/M of the buffer per
rank) is the network model's job (qprsgd/network.py), from these message sizes.

Measured choice: ``Allreduce`` of float buffers uses the buffer interface in place
(``MPI.IN_PLACE``), which avoids one of MPICH's two temporary copies.

Waiting: by default a rank waits inside MPI (``Waitall``, blocking ``Allreduce``), which
busy-polls.  With ``poll_sleep`` > 0 (constructor, or env ``QPRSGD_MPI_POLL_SLEEP`` in seconds)
the data-moving calls post non-blocking requests and test them every ``poll_sleep`` seconds,
sleeping between tests.  ``qprsgd netem`` sets it (2e-4): there all ranks and the kernel's shaped
network stack share a few cores, and four ranks spinning on two cores starved the TCP/tbf path
(measured comm 1.28-1.38x the rate's model, see docs/network.md).  On a real cluster leave it 0.
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from mpi4py import MPI


def world():
    """The world communicator, for the entry point only (cli/experiment)."""
    return MPI.COMM_WORLD


def install_abort_on_error(mpi_comm) -> None:
    """An uncaught exception on any rank prints which rank failed and aborts the whole job.

    Without this a raise on one rank while another waits in ``Recv`` hangs forever.
    """
    if getattr(sys.excepthook, "_qprsgd_abort", False):
        return
    prev = sys.excepthook

    def hook(etype, value, tb):
        try:
            sys.stderr.write(f"[qprsgd] rank {mpi_comm.Get_rank()} of {mpi_comm.Get_size()} failed:\n")
            prev(etype, value, tb)
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            if mpi_comm.Get_size() > 1:
                mpi_comm.Abort(1)

    hook._qprsgd_abort = True
    sys.excepthook = hook


def abort(mpi_comm, code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    mpi_comm.Abort(code)


class Request:
    """A handle on a non-blocking exchange; ``wait()`` returns its result."""

    def __init__(self, finish):
        self._finish = finish
        self._done = False
        self._result = None

    def wait(self):
        if not self._done:
            self._result = self._finish()
            self._done = True
        return self._result


def _u8(data) -> np.ndarray:
    a = np.asarray(data)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise TypeError("payloads must be 1-D uint8 arrays")
    return np.ascontiguousarray(a)


POLL_ENV = "QPRSGD_MPI_POLL_SLEEP"


def poll_sleep_from_env() -> float:
    """Seconds between request tests from env ``QPRSGD_MPI_POLL_SLEEP`` (default 0: block in MPI)."""
    v = os.environ.get(POLL_ENV, "0") or "0"
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"{POLL_ENV} must be a number of seconds >= 0, got {v!r}") from None
    if not (f >= 0.0 and f < 1.0):
        raise ValueError(f"{POLL_ENV} must be in [0, 1) seconds, got {v!r}")
    return f


class Comm:
    """Transport for one group of ranks.  See the module docstring for what is counted."""

    def __init__(self, mpi_comm, poll_sleep: Optional[float] = None):
        if poll_sleep is not None and not (0.0 <= float(poll_sleep) < 1.0):
            raise ValueError(f"poll_sleep must be in [0, 1) seconds, got {poll_sleep!r}")
        self.poll_sleep = poll_sleep_from_env() if poll_sleep is None else float(poll_sleep)
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.messages_sent: dict[str, int] = defaultdict(int)
        self.seconds = 0.0
        self._tag = 100

    # -- accounting ------------------------------------------------------------------------
    def _count(self, channel: str, nbytes: int, messages: int = 1) -> None:
        self.bytes_sent[channel] += int(nbytes)
        self.messages_sent[channel] += int(messages)

    def _waitall(self, reqs) -> None:
        if self.poll_sleep <= 0.0:
            MPI.Request.Waitall(reqs)
            return
        while not MPI.Request.Testall(reqs):
            time.sleep(self.poll_sleep)

    def total_bytes(self) -> int:
        return int(sum(self.bytes_sent.values()))

    def _next_tag(self) -> int:
        # every rank calls the same sequence of exchanges, so tags agree without negotiation
        self._tag = 100 + (self._tag - 99) % 30000
        return self._tag

    # -- small control messages (not counted: not part of the algorithm's traffic) ---------
    def bcast_bytes(self, data: Optional[bytes], root: int = 0) -> bytes:
        n = np.array([len(data) if self.rank == root else 0], dtype=np.int64)
        self.mpi.Bcast(n, root=root)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.mpi.Bcast(buf, root=root)
        return buf.tobytes()

    def allreduce_scalars(self, values: Sequence[float], op: str = "sum") -> np.ndarray:
        a = np.asarray(values, dtype=np.float64)
        out = np.empty_like(a)
        self.mpi.Allreduce(a, out, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op])
        return out

    def gather_rows(self, values: Sequence[float], root: int = 0) -> Optional[np.ndarray]:
        """Gather one float64 row per rank to root (size x len(values)); None elsewhere."""
        a = np.asarray(values, dtype=np.float64)
        out = np.empty((self.size, a.size), dtype=np.float64) if self.rank == root else None
        self.mpi.Gather(a, out, root=root)
        return out

    def gather_vectors(self, x: np.ndarray, root: int = 0) -> Optional[np.ndarray]:
        """Gather one equal-length vector per rank to root (size x n); None elsewhere.  Not counted."""
        a = np.ascontiguousarray(x)
        out = np.empty((self.size, a.size), dtype=a.dtype) if self.rank == root else None
        self.mpi.Gather(a, out, root=root)
        return out

    def local_size(self) -> int:
        """How many ranks of this group share this rank's node (``COMM_TYPE_SHARED``)."""
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_size()
        finally:
            node.Free()

    def barrier(self) -> None:
        self.mpi.Barrier()

    def split(self, color: int, key: Optional[int] = None) -> "Comm":
        """``Comm_Split``: ranks with the same color form a sub-group (color < 0: none)."""
        c = self.mpi.Split(MPI.UNDEFINED if color < 0 else color, self.rank if key is None else key)
        return Comm(c, self.poll_sleep) if c != MPI.COMM_NULL else None

    # -- float buffers ---------------------------------------------------------------------
    def allreduce_mean(self, buf: np.ndarray, channel: str = "allreduce", count: bool = True) -> np.ndarray:
        """In-place mean over the group of a contiguous float buffer; returns ``buf``.

        ``count=False`` is for measurement traffic (evaluation), which is not the algorithm's.
        """
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_mean needs a contiguous buffer")
        t = time.perf_counter()
        if self.size > 1:
            if self.poll_sleep > 0.0:
                self._waitall([self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)])
            else:
                self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if count:
                self._count(channel, buf.nbytes)
        buf /= self.size
        self.seconds += time.perf_counter() - t
        return buf

    # -- byte payloads ---------------------------------------------------------------------
    def allgather_bytes(self, data, channel: str = "allgather") -> list[np.ndarray]:
        """Every rank's payload, in rank order (variable sizes).

        Sizes travel by ``Allgather``; payloads by point-to-point ``Irecv``/``Isend`` with every
        other rank, all posted at once.  Measured (scripts/bench_comm.py): MPICH's ``Allgatherv``
        of 10 MB took 3.5 s at 4 oversubscribed ranks, this exchange 47 ms.  Counted as one
        collective: this rank's payload once per call (the network model charges the M - 1 copies).
        """
        data = _u8(data)
        t = time.perf_counter()
        sizes = np.empty(self.size, dtype=np.int64)
        self.mpi.Allgather(np.array([data.nbytes], dtype=np.int64), sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        parts = [out[o:o + s] for o, s in zip(offsets, sizes)]
        tag = self._next_tag()
        reqs = [self.mpi.Irecv(parts[j], source=j, tag=tag) for j in range(self.size) if j != self.rank]
        reqs += [self.mpi.Isend(data, dest=j, tag=tag) for j in range(self.size) if j != self.rank]
        parts[self.rank][...] = data
        self._waitall(reqs)
        if self.size > 1:
            self._count(channel, data.nbytes)
        self.seconds += time.perf_counter() - t
        return parts

    def _post_sends(self, data: np.ndarray, dests: Iterable[int], tag: int, channel: str):
        reqs = []
        for j in dests:
            if j == self.rank:
                continue
            reqs.append(self.mpi.Isend(data, dest=j, tag=tag))
            self._count(channel, data.nbytes)
        return reqs

    def _recv_from(self, sources: Iterable[int], tag: int) -> dict[int, np.ndarray]:
        out = {}
        status = MPI.Status()
        for j in sources:
            if j == self.rank:
                continue
            if self.poll_sleep > 0.0:
                while not self.mpi.Iprobe(source=j, tag=tag, status=status):
                    time.sleep(self.poll_sleep)
            else:
                self.mpi.Probe(source=j, tag=tag, status=status)
            buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            self.mpi.Recv(buf, source=j, tag=tag)
            out[j] = buf
        return out

    def ineighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> Request:
        """Non-blocking: send ``data`` to each neighbour, receive one payload from each.

        Returns a :class:`Request`; ``wait()`` gives ``{rank: payload}``.
        """
        data = _u8(data)
        tag = self._next_tag()
        t = time.perf_counter()
        sends = self._post_sends(data, neighbors, tag, channel)
        self.seconds += time.perf_counter() - t

        def finish():
            t0 = time.perf_counter()
            got = self._recv_from(neighbors, tag)
            self._waitall(sends)
            self.seconds += time.perf_counter() - t0
            return got

        return Request(finish)

    def isendrecv_bytes(self, sends: Mapping[int, np.ndarray], recvs: Mapping[int, int],
                        channel: Union[str, Mapping[int, str]] = "peer") -> Request:
        """Non-blocking sparse exchange: ``Isend`` ``sends[j]`` to each rank j (a different payload
        per destination) and ``Irecv`` exactly ``recvs[j]`` bytes from each rank j, all posted now.

        ``channel`` is one name, or a name per destination rank.  The payloads are copied, so the
        caller may reuse its buffers at once.  ``wait()`` completes every request and returns
        ``{source: payload}``.  Every rank of the group must call the same sequence of exchanges
        (tags are matched by call order), with empty mappings where it has nothing to move.
        """
        tag = self._next_tag()
        t = time.perf_counter()
        bufs = {j: np.empty(int(n), dtype=np.uint8) for j, n in recvs.items() if j != self.rank}
        reqs = [self.mpi.Irecv(b, source=j, tag=tag) for j, b in bufs.items()]
        keep = []
        for j, data in sends.items():
            if j == self.rank:
                continue
            a = _u8(data).copy()
            keep.append(a)
            reqs.append(self.mpi.Isend(a, dest=j, tag=tag))
            self._count(channel if isinstance(channel, str) else channel[j], a.nbytes)
        self.seconds += time.perf_counter() - t

        def finish():
            t0 = time.perf_counter()
            self._waitall(reqs)
            keep.clear()
            self.seconds += time.perf_counter() - t0
            return bufs

        return Request(finish)

    def neighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> dict[int, np.ndarray]:
        """Isend ``data`` to every neighbour j != self, receive each one's payload."""
        return self.ineighbor_exchange(data, neighbors, channel).wait()

    def gather_bytes(self, data, root: int, sources: Optional[Sequence[int]] = None,
                     channel: str = "up") -> Optional[dict[int, np.ndarray]]:
        """Point-to-point gather of payloads from ``sources`` (default: all ranks) to ``root``.

        At root returns ``{rank: payload}`` (its own included if it is a source); elsewhere None.
        """
        srcs = list(range(self.size)) if sources is None else list(sources)
        tag = self._next_tag()
        t = time.perf_counter()
        result = None
        if self.rank == root:
            result = self._recv_from(srcs, tag)
            if root in srcs:
                result[root] = _u8(data).copy()
            result = {j: result[j] for j in srcs}
        elif self.rank in srcs:
            req = self._post_sends(_u8(data), [root], tag, channel)
            self._waitall(req)
        self.seconds += time.perf_counter() - t
        return result

    def scatter_bytes(self, payloads: Optional[dict[int, np.ndarray]], root: int,
                      dests: Optional[Sequence[int]] = None, channel: str = "down") -> Optional[np.ndarray]:
        """Root sends ``payloads[j]`` to each j in ``dests``; each dest returns what it got."""
        dsts = list(range(self.size)) if dests is None else list(dests)
        tag = self._next_tag()
        t = time.perf_counter()
        got = None
        if self.rank == root:
            reqs = []
            for j in dsts:
                if j != root:
                    reqs += self._post_sends(_u8(payloads[j]), [j], tag, channel)
            self._waitall(reqs)
            if root in dsts:
                got = _u8(payloads[root]).copy()
        elif self.rank in dsts:
            got = self._recv_from([root], tag)[root]
        self.seconds += time.perf_counter() - t
        return got

    def broadcast_bytes(self, data, root: int, dests: Optional[Sequence[int]] = None,
                        channel: str = "down") -> Optional[np.ndarray]:
        """Root sends the same payload to each dest (point-to-point, counted per dest)."""
        dsts = list(range(self.size)) if dests is None else list(dests)
        payloads = {j: data for j in dsts} if self.rank == root else None
        return self.scatter_bytes(payloads, root, dsts, channel)
