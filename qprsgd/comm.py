"""The MPI transport: the only module that imports mpi4py.

:class:`Comm` implements the algorithms' :class:`~qprsgd.algorithms.base.Transport` over an
mpi4py communicator that is passed in (never a module-level ``COMM_WORLD``): the operations and
their byte counting are :class:`~qprsgd.transport.TransportBase`'s; this module supplies MPI's
point-to-point and collective primitives.  It knows nothing about compression.  Importing it
imports ``mpi4py.MPI``, which initialises MPI: only the entry point of a run imports it
(``qprsgd run``), never config validation, sweeps, reports or the algorithms.

Measured choice: ``Allreduce`` of float buffers runs in place (``MPI.IN_PLACE``), which avoids
one of MPICH's two temporary copies.

Waiting.  Every wait is bounded by ``timeout`` seconds (``run.timeout``): requests are tested in
a loop, and a wait that outlives the bound raises :class:`TransportTimeout` naming the operation
and the rank(s) that did not arrive; the abort hook then ends the whole job.  For a
point-to-point wait the missing rank is the peer.  For a collective MPI cannot say who is
missing, so the timed-out rank asks: it announces itself to every other rank on a side
communicator (``Dup`` of the group, made at construction) and names the ranks it does not hear
from within a grace period (``_GRACE`` s) -- live ranks stuck in the same collective time out
at about the same moment and announce themselves too; a frozen or dead rank does not.  The
cost on the hot path is one clock read every 256 tests of a pending request.  Between tests a
rank spins for ``_SPIN`` tests (as MPI's own ``Wait`` does: the fastest answer when every rank
has its own core), then calls ``sched_yield`` before each further test: with more ranks than
cores a waiting rank hands its core to the peer it waits for instead of holding it (measured:
4 ranks on 2 cores, digits MLP, psgd 20.5 -> 0.93 ms per step, 2 ranks unchanged at 0.36 ms;
docs/performance.md).  Or, with ``poll_sleep`` > 0 (``qprsgd netem`` sets 2e-4 s through the environment variable
``QPRSGD_MPI_POLL_SLEEP``), sleeps: there all ranks and the kernel's shaped network share a few
cores, and spinning ranks starved the TCP/tbf path (docs/network.md).  On a cluster leave it 0.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Optional, Sequence

import numpy as np

from mpi4py import MPI

from . import interrupt
from .transport import Ledger, Request, TransportBase, TransportError  # noqa: F401 (re-export)


class TransportTimeout(TransportError):
    """A wait outlived ``run.timeout``."""


_SPIN = 64           # tests of a pending request before a spinning rank starts yielding its core
_ABORT_DRAIN = 0.2   # seconds a failing rank waits for its report to reach the launcher
_GRACE = 3.0          # seconds a timed-out rank listens for the others' announcements
_ALIVE_TAG = 31_999   # side-communicator tag of "I timed out too" announcements


def world():
    """The world communicator, for the entry point only (cli)."""
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
            # One write of the whole report, then a short pause: MPI_Abort makes the launcher kill
            # every process, and a report written in pieces could lose its tail on the way through
            # the launcher's stdio forwarding (seen with MPICH's hydra: the header arrived, the
            # traceback did not).
            head = f"[qprsgd] rank {mpi_comm.Get_rank()} of {mpi_comm.Get_size()} failed:\n"
            if prev is sys.__excepthook__:
                text = head + "".join(traceback.format_exception(etype, value, tb))
                sys.stdout.flush()
                sys.stderr.flush()
                os.write(2, text.encode("utf-8", "replace"))
            else:
                sys.stderr.write(head)
                prev(etype, value, tb)
                sys.stderr.flush()
                sys.stdout.flush()
        finally:
            if mpi_comm.Get_size() > 1:
                time.sleep(_ABORT_DRAIN)
                mpi_comm.Abort(1)

    hook._qprsgd_abort = True
    sys.excepthook = hook


def abort(mpi_comm, code: int = 1) -> None:
    """Flush, give the launcher a moment to forward what was printed, then abort the job."""
    sys.stdout.flush()
    sys.stderr.flush()
    if mpi_comm.Get_size() > 1:
        time.sleep(_ABORT_DRAIN)
    mpi_comm.Abort(code)


POLL_ENV = "QPRSGD_MPI_POLL_SLEEP"


def library_facts() -> dict:
    """The MPI library this process loaded: ``library`` (``MPI_Get_library_version``),
    ``standard``, ``abi`` (which mpi4py extension: ``mpich``/``openmpi``), ``mpi4py`` (version).
    ``launch.mpi_library`` answers with these inside a running job."""
    import mpi4py
    return {"library": MPI.Get_library_version().strip(), "standard": "%d.%d" % MPI.Get_version(),
            "abi": os.path.basename(MPI.__file__).split(".")[1], "mpi4py": mpi4py.__version__}


def poll_sleep_from_env() -> float:
    """Seconds between request tests from env ``QPRSGD_MPI_POLL_SLEEP`` (default 0: spin)."""
    v = os.environ.get(POLL_ENV, "0") or "0"
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"{POLL_ENV} must be a number of seconds >= 0, got {v!r}") from None
    if not (f >= 0.0 and f < 1.0):
        raise ValueError(f"{POLL_ENV} must be in [0, 1) seconds, got {v!r}")
    return f


_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


class _Gather:
    """State of one posted :meth:`Comm.iallgather_bytes`."""

    def __init__(self, data: np.ndarray, size: int):
        self.data = data
        self.mine = np.array([data.nbytes], dtype=np.int64)
        self.sizes = np.empty(size, dtype=np.int64)
        self.sreq = None
        self.tag = 0
        self.others: list = []
        self.sends: list = []
        self.recvs: Optional[list] = None
        self.parts: Optional[list] = None


class Comm(TransportBase):
    """MPI transport for one group of ranks.  See the module docstring."""

    def __init__(self, mpi_comm, poll_sleep: Optional[float] = None, ledger: Optional[Ledger] = None,
                 timeout: Optional[float] = None):
        if poll_sleep is not None and not (0.0 <= float(poll_sleep) < 1.0):
            raise ValueError(f"poll_sleep must be in [0, 1) seconds, got {poll_sleep!r}")
        if timeout is not None and not (float(timeout) > 0):
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.poll_sleep = poll_sleep_from_env() if poll_sleep is None else float(poll_sleep)
        self.timeout = None if timeout is None else float(timeout)
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        # side channel for failure diagnosis only (bounded runs): a collective Dup now
        self._side = mpi_comm.Dup() if self.timeout is not None and self.size > 1 else None
        self._inflight: list = []    # posted non-blocking requests, for progress()
        self._gathers: list = []     # iallgather_bytes not yet waited for
        self._init_base(ledger)

    # -- bounded waiting ---------------------------------------------------------------------
    def _who(self, peers) -> str:
        if not peers:
            missing = self._missing_ranks()
            if missing is None:
                return ""
            if not missing:
                return "; every rank of this group is alive and also timed out (a deadlock?)"
            return f"; rank(s) {', '.join(map(str, missing))} of this group did not arrive"
        return f"; rank(s) {', '.join(str(p) for p in sorted(set(peers)))} of this group did not arrive"

    def _missing_ranks(self) -> Optional[list]:
        """After a collective timed out: the ranks that do not announce themselves within
        ``_GRACE`` seconds (see the module docstring); None without a side channel."""
        if self._side is None:
            return None
        mark = np.zeros(1, np.uint8)
        for j in range(self.size):
            if j != self.rank:
                self._side.Isend(mark, dest=j, tag=_ALIVE_TAG)   # never waited: the job aborts next
        heard = {self.rank}
        status = MPI.Status()
        buf = np.empty(1, np.uint8)
        deadline = time.monotonic() + _GRACE
        while time.monotonic() < deadline and len(heard) < self.size:
            while self._side.Iprobe(source=MPI.ANY_SOURCE, tag=_ALIVE_TAG, status=status):
                self._side.Recv(buf, source=status.Get_source(), tag=_ALIVE_TAG)
                heard.add(status.Get_source())
            time.sleep(0.01)
        return sorted(set(range(self.size)) - heard)

    def _wait(self, reqs, what: str, peers: Sequence[int] = ()) -> None:
        """Complete ``reqs`` (``peers[k]``: the rank request k waits on, if point-to-point); spin or
        sleep between tests; raise after ``timeout`` seconds naming who did not arrive."""
        if not reqs:
            return
        if self.timeout is None and self.poll_sleep <= 0.0:
            MPI.Request.Waitall(reqs)
            return
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        n = 0
        while not MPI.Request.Testall(reqs):
            if self.poll_sleep > 0.0:
                time.sleep(self.poll_sleep)
            elif n >= _SPIN:
                os.sched_yield()
            n += 1
            if (n & 255) != 0:
                continue
            interrupt.check()
            if deadline is not None and time.monotonic() > deadline:
                pending = [p for r, p in zip(reqs, peers) if not r.Test()] if peers else []
                raise TransportTimeout(
                    f"rank {self.rank} of {self.size}: {what} did not complete within run.timeout = "
                    f"{self.timeout:g} s{self._who(pending)} (a frozen or lost rank?)")

    def _waitall(self, handles) -> None:
        reqs = [h for h, _ in handles]
        self._wait(reqs, "point-to-point exchange", [p for _, p in handles])
        if reqs and self._inflight:
            done = set(map(id, reqs))
            self._inflight = [r for r in self._inflight if id(r) not in done]

    # -- primitives ----------------------------------------------------------------------------
    # point-to-point requests stay in ``_inflight`` until waited, so progress() (called from the
    # backward hooks) also advances a per-bucket push posted to a parameter server
    def _isend(self, data, dest, tag, channel):
        req = self.mpi.Isend(data, dest=dest, tag=tag)
        self._inflight.append(req)
        return (req, dest)

    def _irecv(self, buf, source, tag):
        req = self.mpi.Irecv(buf, source=source, tag=tag)
        self._inflight.append(req)
        return (req, source)

    def _recv_unknown(self, source, tag) -> np.ndarray:
        status = MPI.Status()
        if self.timeout is None and self.poll_sleep <= 0.0:
            self.mpi.Probe(source=source, tag=tag, status=status)
        else:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            n = 0
            while not self.mpi.Iprobe(source=source, tag=tag, status=status):
                if self.poll_sleep > 0.0:
                    time.sleep(self.poll_sleep)
                elif n >= _SPIN:
                    os.sched_yield()
                n += 1
                if (n & 255) != 0:
                    continue
                interrupt.check()
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportTimeout(
                        f"rank {self.rank} of {self.size}: receive from rank {source} did not complete "
                        f"within run.timeout = {self.timeout:g} s{self._who([source])} (a frozen or lost rank?)")
        buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
        self.mpi.Recv(buf, source=source, tag=tag)
        return buf

    def _allreduce_sum(self, buf) -> None:
        if self.timeout is None and self.poll_sleep <= 0.0:
            self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        else:
            self._wait([self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)], "allreduce")

    def _iallreduce_post(self, buf):
        req = self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self._inflight.append(req)
        return req

    def _iallreduce_wait(self, req) -> None:
        self._wait([req], "allreduce (bucket)")
        self._inflight = [r for r in self._inflight if r is not req]

    def _iallgather_post(self, data):
        # sizes by Iallgather and the payload to every other rank, posted now; the receives as
        # soon as the sizes are known: in progress() (called from the backward hooks) or at the wait
        h = _Gather(data, self.size)
        h.sreq = self.mpi.Iallgather(h.mine, h.sizes)
        h.tag = self._next_tag()
        h.others = [j for j in range(self.size) if j != self.rank]
        h.sends = [self.mpi.Isend(data, dest=j, tag=h.tag) for j in h.others]
        self._inflight += [h.sreq] + h.sends
        self._gathers.append(h)
        return h

    def _post_gather_recvs(self, h) -> None:
        offsets = np.concatenate([[0], np.cumsum(h.sizes)[:-1]])
        out = np.empty(int(h.sizes.sum()), dtype=np.uint8)
        h.parts = [out[o:o + s] for o, s in zip(offsets, h.sizes)]
        h.recvs = [self.mpi.Irecv(h.parts[j], source=j, tag=h.tag) for j in h.others]
        h.parts[self.rank][...] = h.data
        self._inflight += h.recvs

    def _iallgather_wait(self, h) -> list:
        self._wait([h.sreq], "allgather (sizes)")
        if h.recvs is None:
            self._post_gather_recvs(h)
        self._wait(h.recvs + h.sends, "allgather", h.others + h.others)
        done = set(map(id, [h.sreq] + h.sends + h.recvs))
        self._inflight = [r for r in self._inflight if id(r) not in done]
        self._gathers = [g for g in self._gathers if g is not h]
        return h.parts

    def progress(self) -> None:
        if self._inflight:
            MPI.Request.Testall(self._inflight)
        for h in self._gathers:
            if h.recvs is None and h.sreq.Test():
                self._post_gather_recvs(h)

    def _allgather_payloads(self, data) -> list[np.ndarray]:
        # sizes by Iallgather; payloads point-to-point, all posted at once (the non-blocking
        # exchange, waited for at once).  Measured (scripts/bench_comm.py): MPICH's Allgatherv of
        # 10 MB took 3.5 s at 4 oversubscribed ranks, this exchange 47 ms.
        return self._iallgather_wait(self._iallgather_post(data))

    # -- control traffic (not counted) ---------------------------------------------------------
    def bcast_bytes(self, data: Optional[bytes], root: int = 0) -> bytes:
        n = np.array([len(data) if self.rank == root else 0], dtype=np.int64)
        self._wait([self.mpi.Ibcast(n, root=root)], "broadcast")
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self._wait([self.mpi.Ibcast(buf, root=root)], "broadcast")
        return buf.tobytes()

    def allreduce_scalars(self, values: Sequence[float], op: str = "sum") -> np.ndarray:
        a = np.asarray(values, dtype=np.float64)
        out = np.empty_like(a)
        self._wait([self.mpi.Iallreduce(a, out, op=_OPS[op])], "scalar reduction")
        return out

    def gather_rows(self, values: Sequence[float], root: int = 0) -> Optional[np.ndarray]:
        """Gather one float64 row per rank to root (size x len(values)); None elsewhere."""
        a = np.asarray(values, dtype=np.float64)
        out = np.empty((self.size, a.size), dtype=np.float64) if self.rank == root else None
        self._wait([self.mpi.Igather(a, out, root=root)], "gather")
        return out

    def gather_vectors(self, x: np.ndarray, root: int = 0) -> Optional[np.ndarray]:
        """Gather one equal-length vector per rank to root (size x n); None elsewhere."""
        a = np.ascontiguousarray(x)
        out = np.empty((self.size, a.size), dtype=a.dtype) if self.rank == root else None
        self._wait([self.mpi.Igather(a, out, root=root)], "gather")
        return out

    def local_size(self) -> int:
        """How many ranks of this group share this rank's node (``COMM_TYPE_SHARED``)."""
        return self._node()[1]

    def local_rank(self) -> int:
        """This rank's index among the ranks of this group on its node (``COMM_TYPE_SHARED``,
        ordered by rank): the GPU it binds to under ``run.device: cuda``."""
        return self._node()[0]

    def _node(self) -> tuple[int, int]:
        """(rank, size) in this group's node-local sub-group (split, read, freed)."""
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank(), node.Get_size()
        finally:
            node.Free()

    def cuda_aware(self) -> bool:
        """Does the MPI library read and write CUDA device memory?  Open MPI answers through
        ``MPIX_Query_cuda_support()``, MPICH through ``MPIX_GPU_query_support(CUDA, &flag)``;
        a library with neither is taken as not CUDA-aware (the staged path, always correct)."""
        import ctypes

        try:
            lib = ctypes.CDLL(MPI.__file__)
        except OSError:
            return False
        f = getattr(lib, "MPIX_Query_cuda_support", None)
        if f is not None:
            f.restype = ctypes.c_int
            return bool(f())
        g = getattr(lib, "MPIX_GPU_query_support", None)
        if g is not None:
            flag = ctypes.c_int(0)
            g.restype = ctypes.c_int
            # MPIX_GPU_SUPPORT_CUDA is 0 in MPICH's mpi.h (4.x)
            if g(ctypes.c_int(0), ctypes.byref(flag)) == 0:
                return bool(flag.value)
        return False

    def barrier(self) -> None:
        self._wait([self.mpi.Ibarrier()], "barrier")

    def split(self, color: int, key: Optional[int] = None) -> Optional["Comm"]:
        """``Comm_Split``: ranks with the same color form a sub-group (color < 0: none, returns
        None).  The sub-group reports into the same ledger."""
        c = self.mpi.Split(MPI.UNDEFINED if color < 0 else color, self.rank if key is None else key)
        if c == MPI.COMM_NULL:
            return None
        return Comm(c, self.poll_sleep, ledger=self.ledger, timeout=self.timeout)


__all__ = ["Comm", "Request", "TransportTimeout", "world", "install_abort_on_error", "abort",
           "poll_sleep_from_env", "POLL_ENV"]
