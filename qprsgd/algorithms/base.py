"""What every algorithm is given and must provide.

An algorithm is one class whose ``step()`` reads like the paper's Algorithm box.  It works on
``x``, a float32 numpy view of the model's flat parameter buffer (writing into ``x`` updates
the torch model), calls ``grad()`` at most once per step to get the stochastic gradient at the
current ``x`` on this step's batch, and talks to other ranks only through ``env.comm`` (a
:class:`Transport`: MPI's ``qprsgd.comm.Comm`` or the in-process ``qprsgd.inprocess``) with
payloads produced by ``env.codec``.  It never imports mpi4py, h5py or cupy, never knows which
transport or codec it runs, and never creates communicators: the groups it needs are declared
by :meth:`Algorithm.comm_groups` (pure) and built by the experiment (``env.groups``).

Roles.  ``env.workers`` are the world ranks that compute gradients (the paper's M workers);
``env.server`` is the rank of a parameter server / centre variable, or None.  A dedicated
server rank is not a worker: ``grad`` is None in its ``step``; its ``x`` is still the (unused
unless the algorithm wants it, e.g. as the centre variable z) parameter buffer holding x_0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from ..codecs.base import Codec
from ..devices import array_module, to_device


@runtime_checkable
class Transport(Protocol):
    """What an algorithm may ask of the other workers (qprsgd/transport.py counts and times it).

    Every rank of a group calls the same sequence of operations.  Ranks are ranks of this
    group (0 .. size-1).  Payloads are 1-D uint8 arrays produced by a codec; float buffers are
    contiguous numpy arrays.  Channels name the traffic in the ledger (``peer``, ``up``,
    ``down``, ``allreduce``, ``allgather``, ``alltoall``).
    """

    rank: int
    size: int

    def allreduce_mean(self, buf: np.ndarray, channel: str = "allreduce", count: bool = True) -> np.ndarray:
        """In place: buf ← (Σ over ranks of buf) / size."""

    def allgather_bytes(self, data, channel: str = "allgather") -> list:
        """Every rank's payload, in rank order."""

    def allreduce_sum_int(self, buf: np.ndarray, channel: str = "allreduce") -> np.ndarray:
        """In place: buf ← Σ over ranks of a signed-integer buffer (exact; caller rules out overflow)."""

    def allreduce_max(self, values: Sequence[float], channel: str = "allreduce") -> np.ndarray:
        """Max over ranks of a few float64 values (counted, 8 bytes each)."""

    def alltoall_bytes(self, sends: Sequence, channel: str = "alltoall") -> list:
        """``sends[j]`` to rank j; the payload from every rank, in rank order."""

    def ineighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer"):
        """Send ``data`` to each neighbour; ``.wait()`` gives ``{rank: payload}``."""

    def neighbor_exchange(self, data, neighbors: Sequence[int], channel: str = "peer") -> dict:
        """Blocking :meth:`ineighbor_exchange`."""

    def isparse_exchange(self, sends: Mapping[int, Any], sources: Sequence[int], channel: str = "peer"):
        """Directed: ``sends[j]`` to each j, one payload from each of ``sources``; ``.wait()`` gives them."""

    def isendrecv_bytes(self, sends: Mapping[int, np.ndarray], recvs: Mapping[int, int],
                        channel: Union[str, Mapping[int, str]] = "peer"):
        """A different payload per destination, exact sizes received; ``.wait()`` gives them."""

    def gather_bytes(self, data, root: int, sources: Optional[Sequence[int]] = None,
                     channel: str = "up") -> Optional[dict]:
        """Payloads of ``sources`` at ``root`` (``{rank: payload}``); None elsewhere."""

    def scatter_bytes(self, payloads: Optional[dict], root: int, dests: Optional[Sequence[int]] = None,
                      channel: str = "down") -> Optional[np.ndarray]:
        """``payloads[j]`` from ``root`` to each dest j."""

    def broadcast_bytes(self, data, root: int, dests: Optional[Sequence[int]] = None,
                        channel: str = "down") -> Optional[np.ndarray]:
        """The same payload from ``root`` to each dest."""

    def allreduce_scalars(self, values: Sequence[float], op: str = "sum") -> np.ndarray:
        """Control traffic (not counted): float64 sum/max/min over ranks."""

    def barrier(self) -> None:
        """Control: every rank arrives."""


@dataclass
class Env:
    """The runtime an algorithm runs in (built once by the experiment)."""

    comm: Transport                  # all processes of the run
    d: int                           # number of parameters
    workers: tuple                   # world ranks that compute gradients, ascending
    server: Optional[int] = None     # world rank of the server / centre, or None
    worker_comm: Optional[Transport] = None   # group of the workers (None on a dedicated server)
    codec: Optional[Codec] = None    # the configured compressor (may be None for uncompressed algorithms)
    rng: Optional[np.random.Generator] = None  # this rank's own generator for codec draws
    W: Optional[np.ndarray] = None   # mixing matrix over ``workers`` (+ auxiliary nodes), if any
    blocks: tuple = ()               # parameter-tensor sizes (block boundaries)
    weight_decay: float = 0.0
    extra: dict = field(default_factory=dict)  # topology extras (e.g. groups for hierarchical)
    groups: tuple = ()               # transports of the groups ``comm_groups`` asked for (None where not a member)
    make_codec: Optional[Callable[[int, tuple], Codec]] = None  # the configured codec for another length
                                     # (d', blocks') -- same name and parameters; reduce_scatter's chunks
    shapes: tuple = ()               # parameter-tensor shapes (same order as ``blocks``)
    seed: int = 0                    # the run's seed (for draws every worker must share, e.g. PowerSGD's Q_0)
    buckets: tuple = ()              # the gradient buckets ((lo, hi), ...) in the order grad(on_bucket)
                                     # delivers them (qprsgd/buckets.plan of ``blocks``, train.bucket_mb);
                                     # () = one bucket (0, d).  Known on every rank, a dedicated server
                                     # too (it posts its receives per bucket without computing a gradient)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def is_worker(self) -> bool:
        return self.comm.rank in self.workers

    @property
    def M(self) -> int:
        return len(self.workers)

    @property
    def worker_index(self) -> int:
        """0-based index of this rank among the workers (the paper's i)."""
        return self.workers.index(self.comm.rank)


GradFn = Callable[..., np.ndarray]
"""``grad()`` -> the stochastic gradient g (float32, length d).  ``grad(on_bucket=f)``: also
call ``f(g, lo, hi)`` for each gradient bucket as soon as g[lo:hi] is final -- during backward,
in the same bucket order on every rank, each bucket once before grad() returns (qprsgd/buckets.py;
``train.bucket_mb``).  An algorithm that communicates every step starts its transport there.
g is the algorithm's scratch until its next call: it may be overwritten in place."""


class Algorithm:
    """Base class.  Subclasses implement ``step`` and extend ``state_dict``.

    Class attributes:
      ``needs_unbiased_codec`` -- refuse a biased codec at config time (DCD/ECD-PSGD).
      ``uses_codec`` -- the ``codec`` config section applies.
      ``needs_server`` -- the algorithm has a server / centre role (server placement applies).
      ``needs_topology`` -- a mixing matrix W is used.
    """

    name = "algorithm"
    time_varying_ok = False    # True: accepts a time-varying topology (W_k per gossip round; v = 0)
    needs_unbiased_codec = False
    uses_codec = False
    needs_server = False
    needs_topology = False

    def __init__(self, x: Optional[np.ndarray], env: Env):
        self.x = x
        self.env = env
        # the array module of x's device (numpy, cupy or the device simulator, qprsgd/devices.py):
        # state is allocated with it, so the code the CPU tests run is the code a GPU runs
        self.xp = array_module(x)
        self.rounds = 0  # communication (synchronization) rounds completed

    @classmethod
    def comm_groups(cls, topology, workers: tuple, server: Optional[int]) -> list[tuple]:
        """The sub-groups (tuples of world ranks) this algorithm needs beyond the world and the
        workers' group; the experiment builds a transport for each (``env.groups``, same order).
        Pure: decided from the topology and the roles alone.  Default: none."""
        return []

    @classmethod
    def codec_refusal(cls, params) -> Optional[str]:
        """Why the ``codec`` section does not apply to this algorithm with these (validated)
        parameters, or None when it does (``uses_codec`` algorithms only; config.validate)."""
        return None

    def step(self, t: int, lr: float, grad: Optional[GradFn]) -> None:  # pragma: no cover
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last step (before final parameters are gathered): complete any
        non-blocking exchange still in flight.  Default: nothing to do."""

    # weight decay folded into the gradient (algorithms that treat it otherwise override)
    def _wd(self, g: np.ndarray) -> np.ndarray:
        """g + λx (weight decay folded into the gradient), **in place on g**, which is returned:
        g is the oracle's scratch (the flat gradient buffer), as every caller passes ``grad()``
        straight in.  The float32 result of ``g + λ*x``, without its two d-vector temporaries
        (issue 16; tests/test_buckets.py measures the step's allocations)."""
        self._wd_into(g, 0, self.env.d)
        return g

    def _wd_into(self, g: np.ndarray, lo: int, hi: int) -> None:
        """In place on g[lo:hi]: the same float32 result as :meth:`_wd` (g + fl(λx)), through a
        scratch vector allocated once (no per-step temporaries of size d)."""
        lam = self.env.weight_decay
        if not lam:
            return
        if getattr(self, "_wd_scratch", None) is None:
            self._wd_scratch = self.xp.empty(self.env.d, dtype=np.float32)
        s = self._wd_scratch[lo:hi]
        np.multiply(self.x[lo:hi], lam, out=s)
        g[lo:hi] += s

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: arrays (of x's device; the worker copies
        them to the host) and scalars."""
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])

    @staticmethod
    def _load_array(dst, src) -> None:
        """Checkpoint (host) array ``src`` into state array ``dst`` on its device."""
        src = np.asarray(src)
        if src.shape != dst.shape:
            raise ValueError(f"checkpoint array has shape {src.shape}, expected {dst.shape}")
        to_device(src, dst, out=dst)
