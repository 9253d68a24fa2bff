"""What moves bytes between workers, and the one ledger that counts them (no MPI here).

Three pieces:

* :class:`Ledger` -- one per worker per run, owned by the experiment.  Every transport of that
  worker (the world group and every sub-group split from it) and its codec report into it:
  bytes and messages handed to the transport per channel, seconds inside the transport, codec
  seconds and the unpadded bits the codec produced.  The worker loop reads this object only.
* :class:`TransportBase` -- the operations the algorithms use (the :class:`Transport` protocol of
  ``qprsgd.algorithms.base``), written once in terms of a few primitives that a backend
  supplies: tagged point-to-point send/receive and a handful of collectives.  Counting and
  timing happen here, so the MPI backend (``qprsgd.comm.Comm``) and the in-process backend
  (``qprsgd.inprocess.LocalTransport``) count the same bytes by construction.
* :class:`Request` -- a handle on a non-blocking exchange.

What is counted (``bytes_sent[channel]``): payload bytes this rank hands over to be sent.
Point-to-point sends count once per destination; a collective counts this rank's send buffer
once per call (allreduce: the buffer; allgather: this rank's payload; alltoall: each payload sent to
another rank).  Channels:
``allreduce``, ``allgather``, ``alltoall`` (personalised exchange), ``peer`` (neighbour exchange), ``up`` (worker -> server) and
``down`` (server -> workers), or any name a caller passes.  Control traffic (scalar
reductions, broadcasts of the config, gathers of final parameters, evaluation) is not counted
and not timed.  What a collective really puts on a wire is the network model's job
(qprsgd/network.py).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np


class TransportError(RuntimeError):
    """A transport could not complete: a peer failed, or a wait outlived ``run.timeout``."""


class PeerFailed(TransportError):
    """Raised in every waiting worker when another worker of the run failed."""


class Ledger:
    """Bytes, messages and seconds of one worker, per channel: the single owner of the counts.

    ``count_bytes`` is called by transports, ``add_codec`` by the timed codec wrapper.  The
    worker loop reads totals and per-channel rows; checkpoints save and restore the whole state.
    """

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.messages: dict[str, int] = defaultdict(int)
        self.comm_seconds = 0.0
        self.codec_seconds = 0.0
        self.payload_bits = 0
        self.copy_seconds = 0.0   # host/device copies (run.device cuda / sim: Staged, Stager)
        self.copy_bytes = 0       # both directions
        self.copy_down_bytes = 0  # device -> host

    def count_bytes(self, channel: str, nbytes: int, messages: int = 1) -> None:
        self.bytes[channel] += int(nbytes)
        self.messages[channel] += int(messages)

    def add_comm_seconds(self, s: float) -> None:
        self.comm_seconds += s

    def add_codec(self, seconds: float, bits: int = 0) -> None:
        self.codec_seconds += seconds
        self.payload_bits += int(bits)

    def add_copy(self, nbytes: int, seconds: float, down: bool) -> None:
        self.copy_bytes += int(nbytes)
        self.copy_seconds += seconds
        if down:
            self.copy_down_bytes += int(nbytes)

    # -- reading ------------------------------------------------------------------------------
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))

    def total_messages(self) -> int:
        return int(sum(self.messages.values()))

    def channel_rows(self, channels: Sequence[str]) -> tuple[list[int], list[int]]:
        """(bytes, messages) per name in ``channels``; names not listed add to ``"other"``."""
        b = dict.fromkeys(channels, 0)
        m = dict.fromkeys(channels, 0)
        for ch, v in self.bytes.items():
            b[ch if ch in b else "other"] += v
        for ch, v in self.messages.items():
            m[ch if ch in m else "other"] += v
        return [b[k] for k in channels], [m[k] for k in channels]

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "messages": dict(self.messages),
                "comm_seconds": self.comm_seconds, "codec_seconds": self.codec_seconds,
                "payload_bits": self.payload_bits, "copy_seconds": self.copy_seconds,
                "copy_bytes": self.copy_bytes, "copy_down_bytes": self.copy_down_bytes}

    def load_state_dict(self, s: dict) -> None:
        self.bytes.clear()
        self.bytes.update({k: int(v) for k, v in s["bytes"].items()})
        self.messages.clear()
        self.messages.update({k: int(v) for k, v in s["messages"].items()})
        self.comm_seconds = float(s["comm_seconds"])
        self.codec_seconds = float(s["codec_seconds"])
        self.payload_bits = int(s["payload_bits"])
        # checkpoints written before issue 19 have no copies: they ran on the CPU path
        self.copy_seconds = float(s.get("copy_seconds", 0.0))
        self.copy_bytes = int(s.get("copy_bytes", 0))
        self.copy_down_bytes = int(s.get("copy_down_bytes", 0))


class Request:
    """A handle on a non-blocking exchange; ``wait()`` returns its result (once computed)."""

    def __init__(self, finish):
        self._finish = finish
        self._done = False
        self._result = None

    def wait(self):
        if not self._done:
            self._result = self._finish()
            self._done = True
        return self._result


def as_payload(data) -> np.ndarray:
    """A payload: a contiguous 1-D uint8 array (what codecs produce)."""
    a = np.asarray(data)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise TypeError("payloads must be 1-D uint8 arrays")
    return np.ascontiguousarray(a)


class TransportBase:
    """The algorithms' operations on top of a backend's primitives; counts into ``ledger``.

    A backend sets ``rank``, ``size``, ``ledger`` and implements:
      ``_isend(data, dest, tag, channel) -> handle``  post a send (``data`` alive until waited)
      ``_irecv(buf, source, tag) -> handle``     post a receive of exactly ``buf.nbytes`` bytes
      ``_recv_unknown(source, tag) -> array``    blocking receive of a payload of unknown size
      ``_waitall(handles)``                      complete handles (bounded by the backend)
      collectives: ``_allreduce_sum(buf)`` in place, ``_allgather_payloads(data)``,
      ``allreduce_scalars``, ``gather_rows``, ``gather_vectors``, ``bcast_bytes``, ``barrier``,
      ``split``, ``local_size``.
    Every rank of a group must call the same sequence of operations (tags follow call order).
    """

    rank: int
    size: int
    ledger: Ledger

    def _init_base(self, ledger: Optional[Ledger]) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self._tag = 100

    def _next_tag(self) -> int:
        # every rank calls the same sequence of exchanges, so tags agree without negotiation
        self._tag = 100 + (self._tag - 99) % 30000
        return self._tag

    @contextlib.contextmanager
    def _timed(self, count: bool = True):
        t = time.perf_counter()
        try:
            yield
        finally:
            if count:
                self.ledger.add_comm_seconds(time.perf_counter() - t)

    def _count(self, channel: str, nbytes: int, messages: int = 1) -> None:
        self.ledger.count_bytes(channel, nbytes, messages)

    # -- compatibility views on the ledger (read-only use) -------------------------------------
    @property
    def bytes_sent(self) -> Mapping[str, int]:
        return self.ledger.bytes

    @property
    def messages_sent(self) -> Mapping[str, int]:
        return self.ledger.messages

    @property
    def seconds(self) -> float:
        return self.ledger.comm_seconds

    def total_bytes(self) -> int:
        return self.ledger.total_bytes()

    # -- float buffers -------------------------------------------------------------------------
    def allreduce_mean(self, buf: np.ndarray, channel: str = "allreduce", count: bool = True) -> np.ndarray:
        """In-place mean over the group of a contiguous float buffer; returns ``buf``.

        ``count=False`` is measurement traffic (evaluation): neither bytes nor seconds counted.
        """
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_mean needs a contiguous buffer")
        with self._timed(count):
            if self.size > 1:
                self._allreduce_sum(buf)
                if count:
                    self._count(channel, buf.nbytes)
            buf /= self.size
        return buf

    def iallreduce_sum(self, buf: np.ndarray, channel: str = "allreduce") -> Request:
        """Non-blocking, in place: post buf ← Σ over the group now; ``wait()`` completes it and
        returns ``buf``.  ``buf`` must not be touched until then.  Used per gradient bucket while
        backward still runs (issue 16): every rank posts the same sequence, waits in any order.

        Counted like :meth:`allreduce_mean` (this rank's buffer once, at the post).  The seconds
        counted are the *exposed* ones, posting plus waiting; time the reduction spent in flight
        behind computation is not communication time the step waited for."""
        if not buf.flags.c_contiguous:
            raise ValueError("iallreduce_sum needs a contiguous buffer")
        handle = None
        with self._timed():
            if self.size > 1:
                handle = self._iallreduce_post(buf)
                self._count(channel, buf.nbytes)

        def finish():
            if handle is not None:
                with self._timed():
                    self._iallreduce_wait(handle)
            return buf
        return Request(finish)

    def progress(self) -> None:
        """Let posted non-blocking operations advance.  MPI without an asynchronous progress
        thread moves a non-blocking collective only inside MPI calls: the worker loop calls this
        from its gradient hooks while backward runs.  Not timed (it returns at once)."""

    # backend primitives of iallreduce_sum; default: the blocking reduction at the post
    def _iallreduce_post(self, buf):
        self._allreduce_sum(buf)
        return None

    def _iallreduce_wait(self, handle) -> None:
        pass

    def allreduce_sum_int(self, buf: np.ndarray, channel: str = "allreduce") -> np.ndarray:
        """In place: buf ← Σ over the group of a contiguous signed-integer buffer; returns ``buf``.

        Integer addition is exact and associative, so every backend and every summation order
        gives the same result.  The caller must make sure the sum cannot overflow ``buf``'s
        dtype (MPI wraps silently): the ``summable`` aggregation refuses such configs.  Counted
        like :meth:`allreduce_mean`: this rank's buffer once per call."""
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_sum_int needs a contiguous buffer")
        if buf.dtype.kind != "i":
            raise ValueError(f"allreduce_sum_int needs a signed integer buffer, got {buf.dtype}")
        with self._timed():
            if self.size > 1:
                self._allreduce_sum(buf)
                self._count(channel, buf.nbytes)
        return buf

    def allreduce_max(self, values: Sequence[float], channel: str = "allreduce") -> np.ndarray:
        """Max over the group of a few float64 values, counted as payload traffic (8 bytes per
        value, one call) -- unlike :meth:`allreduce_scalars`, which is uncounted control."""
        a = np.asarray(values, dtype=np.float64)
        with self._timed():
            if self.size > 1:
                out = np.asarray(self.allreduce_scalars(a, "max"), dtype=np.float64)
                self._count(channel, a.nbytes)
            else:
                out = a.copy()
        return out

    # -- byte payloads -------------------------------------------------------------------------
    def alltoall_bytes(self, sends: Sequence, channel: str = "alltoall") -> list[np.ndarray]:
        """Personalised exchange: ``sends[j]`` goes to rank j (``len(sends) == size``; this rank's
        own entry stays here, copied); returns the payload from every rank, in rank order.

        All sends are posted first, then the receives complete in rank order (sizes need not be
        known).  Counted per destination: Σ_{j != rank} len(sends[j]) bytes, size − 1 messages."""
        if len(sends) != self.size:
            raise ValueError(f"alltoall_bytes needs one payload per rank ({self.size}), got {len(sends)}")
        payloads = [as_payload(s) for s in sends]
        tag = self._next_tag()
        with self._timed():
            handles = []
            for j, p in enumerate(payloads):
                if j != self.rank:
                    handles.append(self._isend(p, j, tag, channel))
                    self._count(channel, p.nbytes)
            got = [payloads[j].copy() if j == self.rank else self._recv_unknown(j, tag)
                   for j in range(self.size)]
            self._waitall(handles)
        return got

    def allgather_bytes(self, data, channel: str = "allgather") -> list[np.ndarray]:
        """Every rank's payload, in rank order (variable sizes).  Counted as one collective:
        this rank's payload once per call (the network model charges the M - 1 copies)."""
        data = as_payload(data)
        with self._timed():
            parts = self._allgather_payloads(data)
            if self.size > 1:
                self._count(channel, data.nbytes)
        return parts

    def iallgather_bytes(self, data, channel: str = "allgather") -> Request:
        """Non-blocking :meth:`allgather_bytes`: posted now (this rank's payload goes out while
        the caller computes), ``wait()`` returns every rank's payload in rank order.  Counted
        as :meth:`allgather_bytes` (the payload once, at the post); seconds: posting + waiting."""
        data = as_payload(data)
        with self._timed():
            handle = self._iallgather_post(data)
            if self.size > 1:
                self._count(channel, data.nbytes)

        def finish():
            with self._timed():
                return self._iallgather_wait(handle)
        return Request(finish)

    # backend primitives of iallgather_bytes; default: the blocking exchange at the post
    def _iallgather_post(self, data):
        return self._allgather_payloads(data)

    def _iallgather_wait(self, handle) -> list:
        return handle

    def _post_sends(self, data: np.ndarray, dests: Iterable[int], tag: int, channel: str) -> list:
        handles = []
        for j in dests:
            if j == self.rank:
                continue
            handles.append(self._isend(data, j, tag, channel))
            self._count(channel, data.nbytes)
        return handles

    def _recv_from(self, sources: Iterable[int], tag: int) -> dict[int, np.ndarray]:
        return {j: self._recv_unknown(j, tag) for j in sources if j != self.rank}

    def ineighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> Request:
        """Non-blocking: send ``data`` to each neighbour, receive one payload from each.
        ``wait()`` gives ``{rank: payload}``."""
        data = as_payload(data)
        tag = self._next_tag()
        with self._timed():
            sends = self._post_sends(data, neighbors, tag, channel)

        def finish():
            with self._timed():
                got = self._recv_from(neighbors, tag)
                self._waitall(sends)
            return got

        return Request(finish)

    def neighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> dict[int, np.ndarray]:
        """Send ``data`` to every neighbour j != self, receive each one's payload."""
        return self.ineighbor_exchange(data, neighbors, channel).wait()

    def isparse_exchange(self, sends: Mapping[int, Any], sources: Sequence[int], channel: str = "peer") -> Request:
        """Non-blocking directed exchange (time-varying graphs): send ``sends[j]`` (its own payload
        per destination) to each rank j, receive one payload of any size from each rank in
        ``sources``; the two sets may differ.  ``wait()`` gives ``{source: payload}``."""
        tag = self._next_tag()
        bufs = {j: as_payload(d) for j, d in sends.items() if j != self.rank}
        with self._timed():
            handles = []
            for j, a in bufs.items():
                handles.append(self._isend(a, j, tag, channel))
                self._count(channel, a.nbytes)

        def finish():
            with self._timed():
                got = self._recv_from(sources, tag)
                self._waitall(handles)
            bufs.clear()
            return got

        return Request(finish)

    def isendrecv_bytes(self, sends: Mapping[int, np.ndarray], recvs: Mapping[int, int],
                        channel: Union[str, Mapping[int, str]] = "peer") -> Request:
        """Non-blocking sparse exchange: send ``sends[j]`` to each rank j (a different payload
        per destination) and receive exactly ``recvs[j]`` bytes from each rank j, all posted now.

        ``channel`` is one name, or a name per destination rank.  The payloads are copied, so the
        caller may reuse its buffers at once.  ``wait()`` returns ``{source: payload}``.
        """
        tag = self._next_tag()
        with self._timed():
            bufs = {j: np.empty(int(n), dtype=np.uint8) for j, n in recvs.items() if j != self.rank}
            handles = [self._irecv(b, j, tag) for j, b in bufs.items()]
            for j, data in sends.items():
                if j == self.rank:
                    continue
                a = as_payload(data).copy()
                ch = channel if isinstance(channel, str) else channel[j]
                handles.append(self._isend(a, j, tag, ch))
                self._count(ch, a.nbytes)

        def finish():
            with self._timed():
                self._waitall(handles)
            return bufs

        return Request(finish)

    def gather_bytes(self, data, root: int, sources: Optional[Sequence[int]] = None,
                     channel: str = "up") -> Optional[dict[int, np.ndarray]]:
        """Point-to-point gather of payloads from ``sources`` (default: all ranks) to ``root``.
        At root returns ``{rank: payload}`` (its own included if it is a source); else None."""
        srcs = list(range(self.size)) if sources is None else list(sources)
        tag = self._next_tag()
        result = None
        with self._timed():
            if self.rank == root:
                got = self._recv_from(srcs, tag)
                if root in srcs:
                    got[root] = as_payload(data).copy()
                result = {j: got[j] for j in srcs}
            elif self.rank in srcs:
                self._waitall(self._post_sends(as_payload(data), [root], tag, channel))
        return result

    def scatter_bytes(self, payloads: Optional[dict[int, np.ndarray]], root: int,
                      dests: Optional[Sequence[int]] = None, channel: str = "down") -> Optional[np.ndarray]:
        """Root sends ``payloads[j]`` to each j in ``dests``; each dest returns what it got."""
        dsts = list(range(self.size)) if dests is None else list(dests)
        tag = self._next_tag()
        got = None
        with self._timed():
            if self.rank == root:
                handles = []
                for j in dsts:
                    if j != root:
                        handles += self._post_sends(as_payload(payloads[j]), [j], tag, channel)
                self._waitall(handles)
                if root in dsts:
                    got = as_payload(payloads[root]).copy()
            elif self.rank in dsts:
                got = self._recv_unknown(root, tag)
        return got

    def broadcast_bytes(self, data, root: int, dests: Optional[Sequence[int]] = None,
                        channel: str = "down") -> Optional[np.ndarray]:
        """Root sends the same payload to each dest (point-to-point, counted per dest)."""
        dsts = list(range(self.size)) if dests is None else list(dests)
        payloads = {j: data for j in dsts} if self.rank == root else None
        return self.scatter_bytes(payloads, root, dsts, channel)


_EMPTY = np.zeros(0, dtype=np.uint8)


class Staged:
    """A transport for device arrays (``run.device: cuda`` or ``sim``; issue 19): every operation
    of the inner transport, with the device arrays it is handed copied to host buffers first and
    what it returns copied back to the device, so algorithms see device arrays only and MPI sees
    host memory only.  The only host/device crossings of a training step are these copies (and
    the codec's few header bytes); each is counted in the ledger (``copy_bytes``,
    ``copy_seconds``).  Numpy arrays and scalars pass through untouched and uncounted.

    ``stage`` is the device's :class:`qprsgd.devices.Stager` (pinned buffers on a GPU).
    ``direct_floats``: hand device float buffers of the all-reduces to the inner transport
    as they are (a CUDA-aware MPI reads device memory itself); payloads are always staged.
    Everything not listed here (control traffic, ``progress``, ``ledger``, ``rank``...) is the
    inner transport's own attribute.
    """

    def __init__(self, inner, stage, direct_floats: bool = False):
        self.inner = inner
        self.stage = stage
        self.direct_floats = bool(direct_floats)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    # -- float buffers ---------------------------------------------------------------------
    def _as_is(self, buf) -> bool:
        """Hand ``buf`` to the inner transport as it is: a host array, or a device array with
        ``direct_floats`` (then after the device's stream has finished writing it)."""
        from .devices import is_device

        if not is_device(buf):
            return True
        if self.direct_floats:
            self.stage.sync()
        return self.direct_floats

    def _float_op(self, buf, op):
        if self._as_is(buf):
            return op(buf)
        h = self.stage.down(buf)
        op(h)
        self.stage.up_into(h, buf)
        return buf

    def allreduce_mean(self, buf, channel: str = "allreduce", count: bool = True):
        return self._float_op(buf, lambda b: self.inner.allreduce_mean(b, channel, count))

    def allreduce_sum_int(self, buf, channel: str = "allreduce"):
        return self._float_op(buf, lambda b: self.inner.allreduce_sum_int(b, channel))

    def iallreduce_sum(self, buf, channel: str = "allreduce") -> Request:
        if self._as_is(buf):
            return self.inner.iallreduce_sum(buf, channel)
        h = self.stage.down(buf)
        r = self.inner.iallreduce_sum(h, channel)

        def finish():
            r.wait()
            self.stage.up_into(h, buf)
            return buf
        return Request(finish)

    def allreduce_max(self, values, channel: str = "allreduce"):
        return self.inner.allreduce_max([float(v) for v in values], channel)

    # -- byte payloads -----------------------------------------------------------------------
    def _down(self, data):
        return self.stage.down(data) if data is not None else None

    def _up_dict(self, got: Optional[dict]):
        return None if got is None else {j: self.stage.up(p) for j, p in got.items()}

    def alltoall_bytes(self, sends: Sequence, channel: str = "alltoall") -> list:
        # this rank's own entry never leaves the device (the inner transport gets a stand-in)
        r = self.inner.rank
        hs = [_EMPTY if j == r else self._down(s) for j, s in enumerate(sends)]
        got = self.inner.alltoall_bytes(hs, channel)
        return [sends[j].copy() if j == r else self.stage.up(p) for j, p in enumerate(got)]

    def allgather_bytes(self, data, channel: str = "allgather") -> list:
        return [self.stage.up(p) for p in self.inner.allgather_bytes(self._down(data), channel)]

    def iallgather_bytes(self, data, channel: str = "allgather") -> Request:
        r = self.inner.iallgather_bytes(self._down(data), channel)
        return Request(lambda: [self.stage.up(p) for p in r.wait()])

    def ineighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> Request:
        r = self.inner.ineighbor_exchange(self._down(data), neighbors, channel)
        return Request(lambda: self._up_dict(r.wait()))

    def neighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> dict:
        return self.ineighbor_exchange(data, neighbors, channel).wait()

    def isparse_exchange(self, sends: Mapping[int, Any], sources: Sequence[int], channel: str = "peer") -> Request:
        r = self.inner.isparse_exchange({j: self._down(d) for j, d in sends.items()}, sources, channel)
        return Request(lambda: self._up_dict(r.wait()))

    def isendrecv_bytes(self, sends: Mapping[int, Any], recvs: Mapping[int, int],
                        channel: Union[str, Mapping[int, str]] = "peer") -> Request:
        r = self.inner.isendrecv_bytes({j: self._down(d) for j, d in sends.items()}, recvs, channel)
        return Request(lambda: self._up_dict(r.wait()))

    def gather_bytes(self, data, root: int, sources: Optional[Sequence[int]] = None,
                     channel: str = "up") -> Optional[dict]:
        if self.inner.rank != root:
            return self._up_dict(self.inner.gather_bytes(self._down(data), root, sources, channel))
        got = self.inner.gather_bytes(_EMPTY, root, sources, channel)   # the root's own stays here
        return {j: (data.copy() if j == root else self.stage.up(p)) for j, p in got.items()}

    def scatter_bytes(self, payloads: Optional[dict], root: int, dests: Optional[Sequence[int]] = None,
                      channel: str = "down"):
        got = self.inner.scatter_bytes(None if payloads is None else
                                       {j: self._down(p) for j, p in payloads.items()}, root, dests, channel)
        return None if got is None else self.stage.up(got)

    def broadcast_bytes(self, data, root: int, dests: Optional[Sequence[int]] = None,
                        channel: str = "down"):
        got = self.inner.broadcast_bytes(self._down(data), root, dests, channel)
        return None if got is None else self.stage.up(got)

    def split(self, color: int, key: Optional[int] = None):
        sub = self.inner.split(color, key)
        return None if sub is None else Staged(sub, self.stage, self.direct_floats)
