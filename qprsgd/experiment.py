"""Build everything once: roles, transport groups, topology, model, data shard, codec, algorithm.

The entry point hands :func:`build` this worker's world transport (MPI's ``comm.Comm`` under
mpiexec, ``inprocess.LocalTransport`` for ``qprsgd run --workers M``); everything below is the
same for both.  Groups: the workers' group (``env.worker_comm``) and the groups the algorithm
declares (``Algorithm.comm_groups``, e.g. hierarchical averaging's) are split here, never by an
algorithm.  Counting: the world transport's :class:`~qprsgd.transport.Ledger` is the run's one
ledger on this worker: every group split from it and the codec wrapper report into it.

Roles.  With M = world size, every rank is a worker.  An algorithm with a server role
(``needs_server``) and ``run.server: dedicated`` uses the last rank as the server and the
other M - 1 ranks as workers; with ``run.server: rank0`` rank 0 is both a worker and the
server.  Workers get ``env.worker_comm``, a sub-communicator of the workers only.

Seeds.  Every stochastic object owns its generator: the model initialisation uses
``seed`` (identical x_0 on every rank), the data order ``[seed, rank, epoch]`` (datasets.py),
the codec draws ``np.random.default_rng([seed, 1, rank])``.  Nothing is seeded globally.
"""
from __future__ import annotations

import functools
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .algorithms.base import Algorithm, Env
from .buckets import cap_bytes, plan as bucket_plan
from .codecs.base import Payload
from .config import Config
from .devices import SimArray, Stager, check_device, gpu_for_rank, to_device, to_host
from .registry import ALGORITHMS, CODECS, DATASETS, MODELS, TOPOLOGIES
from .transport import Ledger, Staged


class TimedCodec:
    """Wraps a codec: encode/decode seconds and the unpadded bits encoded go to the ledger."""

    def __init__(self, codec, ledger: Ledger):
        self._codec = codec
        self.ledger = ledger

    @property
    def seconds(self) -> float:
        return self.ledger.codec_seconds

    @property
    def payload_bits(self) -> int:
        return self.ledger.payload_bits

    def encode(self, x, rng=None):
        t = time.perf_counter()
        p = self._codec.encode(x, rng)
        self.ledger.add_codec(time.perf_counter() - t, int(p.nbits))
        return p

    def decode(self, data, out=None):
        t = time.perf_counter()
        out = self._codec.decode(data, out=out)
        self.ledger.add_codec(time.perf_counter() - t)
        return out

    def __getattr__(self, name):
        return getattr(self._codec, name)


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit, read once per process (the code this process loaded)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Placement:
    """Where the algorithm's x and the gradient live (issue 19): the model's own flat buffers, on
    the model's device, with no copy.

      ``cpu``   numpy views of the torch CPU buffers (writing ``x`` updates the model)
      ``cuda``  CuPy views of the torch CUDA buffers (DLPack): algorithm, state and codec run on
                the GPU; only what the transport sends crosses to the host (transport.Staged)
      ``sim``   :class:`qprsgd.devices.SimArray` views of the CPU buffers: the GPU code path on
                the CPU, for tests (docs/gpu.md)
      ``cuda_host``  the model on the GPU, x and the gradient as host copies: before every
                forward pass x goes up, after backward the whole gradient comes down (2 × 4d
                bytes per step, counted as copies).  The path before issue 19, kept to measure
                the device path against (scripts/bench_step.py).
    ``device_name`` is what the HDF5 attributes record.
    """

    def __init__(self, flat, kind: str, ledger: Optional[Ledger] = None):
        self.flat = flat
        self.kind = check_device(kind)
        self.ledger = ledger if ledger is not None else Ledger()
        if kind == "cuda_host":
            self.x = flat.flat.detach().cpu().numpy().copy()
            self.g = np.empty_like(self.x)
            dev = flat.flat.device
            self.device_name = f"{dev} {torch.cuda.get_device_name(dev)} (host state)"
        elif kind == "cuda":
            import cupy

            self.x = cupy.from_dlpack(flat.flat.detach())
            self.g = cupy.from_dlpack(flat.grad)
            dev = flat.flat.device
            self.device_name = f"{dev} {torch.cuda.get_device_name(dev)}"
        else:
            x, g = flat.x_numpy(), flat.grad_numpy()
            self.x, self.g = (SimArray(x), SimArray(g)) if kind == "sim" else (x, g)
            self.device_name = "sim (cpu)" if kind == "sim" else "cpu"

    @property
    def on_device(self) -> bool:
        """Are x and the algorithm's state device arrays (cuda, sim)?"""
        return self.kind in ("cuda", "sim")

    def before_forward(self) -> None:
        """cuda_host: x up to the model (counted); the other placements share x with it."""
        if self.kind == "cuda_host":
            t = time.perf_counter()
            self.flat.flat.copy_(torch.from_numpy(self.x))
            self.ledger.add_copy(self.x.nbytes, time.perf_counter() - t, down=False)

    def after_backward(self) -> None:
        """The gradient is complete before anything outside torch's stream reads it (cuda), or
        copied down (cuda_host: ``.cpu()`` synchronises the stream; counted)."""
        if self.kind == "cuda":
            torch.cuda.current_stream().synchronize()
        elif self.kind == "cuda_host":
            t = time.perf_counter()
            self.g[...] = self.flat.grad.detach().cpu().numpy()
            self.ledger.add_copy(self.g.nbytes, time.perf_counter() - t, down=True)

    def bucket_ready(self) -> None:
        """Called by a gradient-bucket hook during backward before the bucket is handed to the
        algorithm (cuda: the hook runs as soon as the accumulation into the flat gradient is
        *queued*; waiting for the device makes the bucket's values final before a codec kernel,
        a host copy or a CUDA-aware MPI reads them).  The wait is the rest of backward's queued
        kernels, so the loop counts it as compute."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.flat.flat.device)

    def host_x(self) -> np.ndarray:
        """x on the host: the buffer itself on the CPU, a copy from a device (logs, checkpoints)."""
        return to_host(self.x)

    def load_x(self, h: np.ndarray) -> None:
        """x ← a host vector (a checkpoint's)."""
        to_device(np.asarray(h, dtype=np.float32), self.x, out=self.x)
        self.before_forward()


class SimCodec:
    """The codec of a ``run.device: sim`` run: the configured CPU codec working on the SimArrays'
    backing memory -- as the codec's CUDA backend works on the GPU's memory, with no copy --
    with payloads and decoded vectors handed back as device arrays.  (The CUDA kernels
    themselves are checked byte for byte in numba's simulator, tests/test_codecs_cuda.py.)"""

    def __init__(self, codec):
        self._codec = codec

    @staticmethod
    def _mem(a):
        return a._a if isinstance(a, SimArray) else a

    def encode(self, x, rng=None):
        p = self._codec.encode(self._mem(x), rng)
        return Payload(SimArray(np.asarray(p.data)), p.nbits)

    def decode(self, data, out=None):
        r = self._codec.decode(self._mem(data), out=None if out is None else self._mem(out))
        return out if out is not None else SimArray(r)

    def __getattr__(self, name):
        return getattr(self._codec, name)


def codec_for_device(factory, d: int, blocks, kind: str, threads: int, kw: dict):
    """The configured codec for vectors of placement ``kind``: the CPU backends on the CPU (and,
    wrapped in :class:`SimCodec`, under ``sim``); on a GPU its CUDA backend on CuPy arrays (the
    numpy backend, on CuPy arrays, where a codec has no CUDA one)."""
    if kind == "cuda":
        import cupy

        backend = "cuda" if "cuda" in getattr(factory, "IMPLS", {}) else "numpy"
        return factory(int(d), tuple(blocks), xp=cupy, backend=backend, **kw)
    c = factory(int(d), tuple(blocks), threads=threads, **kw)
    return SimCodec(c) if kind == "sim" else c


@dataclass
class Roles:
    world_size: int
    workers: tuple
    server: Optional[int]

    @property
    def M(self) -> int:
        return len(self.workers)


def roles_for(cfg: Config, world_size: int) -> Roles:
    cls = ALGORITHMS.get(cfg.algorithm.name).factory
    if getattr(cls, "needs_server", False):
        if cfg.run.server == "dedicated":
            if world_size < 2:
                raise ValueError("run.server: 'dedicated' needs at least 2 processes (M workers + 1 server); "
                                 f"got world size {world_size}")
            return Roles(world_size, tuple(range(world_size - 1)), world_size - 1)
        return Roles(world_size, tuple(range(world_size)), 0)
    return Roles(world_size, tuple(range(world_size)), None)


def build_topology(cfg: Config, M: int):
    """Build and check the mixing matrix for M workers (pure math, no MPI)."""
    if cfg.topology is None:
        return None
    entry = TOPOLOGIES.get(cfg.topology.name)
    topo = entry.factory(M, **cfg.topology.kwargs())
    cls = ALGORITHMS.get(cfg.algorithm.name).factory
    if getattr(topo, "time_varying", False):
        # a sequence W_k: its builder checked every W_k (doubly stochastic, entries >= 0) and the
        # contraction over a period (docs/topology.md); the algorithm must mix with W_k
        if not getattr(cls, "time_varying_ok", False):
            ok = sorted(n for n in ALGORITHMS.names() if getattr(ALGORITHMS.get(n).factory, "time_varying_ok", False))
            raise ValueError(f"topology.name: {cfg.topology.name!r} is time-varying; algorithm "
                             f"{cfg.algorithm.name!r} needs a fixed W (time-varying topologies run with: "
                             f"{', '.join(ok)})")
        return topo
    rule = getattr(cls, "mixing_rule", "gossip")
    from .topology import check_mixing, check_mixing_structure
    if cfg.topology.kwargs().get("allow_divergent"):
        # the user asked for ζ ≥ 1 on purpose (e.g. EASGD's α above 2/(m+1), cooperative-sgd §5.1):
        # keep the structural checks (symmetric, doubly stochastic), skip ζ < 1
        check_mixing_structure(topo.W)
    else:
        check_mixing(topo.W, rule)
    return topo


def model_size(cfg: Config) -> tuple[int, tuple]:
    """(d, blocks) of the configured model on the configured dataset (builds both, no MPI)."""
    from .models import FlatParams, build_model
    data = DATASETS.get(cfg.data.name).factory(cfg.data.data_dir, **dict(cfg.data.params))
    module = build_model(cfg.model.name, tuple(data.in_shape), data.num_classes, seed=cfg.seed,
                         **cfg.model.kwargs())
    flat = FlatParams(module)
    return flat.d, tuple(flat.blocks)


def check_cuda_streams(environ) -> None:
    """run.device cuda: torch and CuPy must share the legacy default stream (qprsgd orders the
    model's kernels, the codecs' and the copies by that); CuPy's per-thread default stream
    (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM``, off unless set) would break that, so it is refused."""
    v = environ.get("CUPY_CUDA_PER_THREAD_DEFAULT_STREAM", "")
    if v not in ("", "0"):
        raise ValueError(f"run.device: 'cuda' with the environment variable "
                         f"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM={v!r}: qprsgd's device path needs "
                         "torch and CuPy on the legacy default stream; unset it (or set it to 0)")


def preflight(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run on rank 0 before any rank starts work."""
    roles = roles_for(cfg, world_size)
    if cfg.run.device in ("cuda", "cuda_host") and not torch.cuda.is_available():
        raise ValueError(f"run.device: {cfg.run.device!r} but torch sees no CUDA device (got torch "
                         f"{torch.__version__}); use run.device: cpu")
    if cfg.run.device == "cuda":
        check_cuda_streams(os.environ)
    try:
        build_topology(cfg, roles.M)
    except ValueError as e:
        raise ValueError(f"topology ({cfg.topology.name}, M={roles.M}): {e}") from None


@dataclass
class Experiment:
    cfg: Config
    comm: Any            # this worker's world transport (qprsgd.transport.TransportBase)
    roles: Roles
    module: Any
    flat: Any
    data: Any
    train_idx: np.ndarray
    test_idx: np.ndarray
    stream: Any
    codec: Optional[TimedCodec]
    algorithm: Algorithm
    topology: Any
    steps_per_epoch: int
    total_steps: int
    out_dir: str
    loss_name: str
    placement: Placement
    backend: str = "mpi"
    gpu_mpi: str = "host"    # how device vectors reach the transport: host (cpu), staged, cuda_aware
    bucket_hooks: bool = True  # gradient buckets handed over during backward (bucket_hooks())

    @property
    def ledger(self) -> Ledger:
        return self.comm.ledger

    @property
    def is_worker(self) -> bool:
        return self.comm.rank in self.roles.workers

    def lr_at(self, t: int) -> float:
        return learning_rate(self.cfg.train, self.steps_per_epoch, t)


def learning_rate(train, steps_per_epoch: int, t: int) -> float:
    """η_t for 0-based step t: linear warm-up over ``warmup_epochs``, then ×gamma at each milestone
    epoch passed (the decay applies from step round(milestone × steps_per_epoch) on)."""
    s = train.schedule
    lr = train.lr
    warm = int(round(s.warmup_epochs * steps_per_epoch))
    if t < warm:
        return lr * (t + 1) / warm
    if s.kind == "step":
        n = sum(1 for m in s.milestones if t >= int(round(m * steps_per_epoch)))
        lr = lr * (s.gamma ** n)
    return lr


def schedule_lengths(train, n_train: int, M: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps): an epoch is one pass of all M workers over the training
    set, ``n_train // (M × batch_size)`` steps; each worker cycles its own shard."""
    spe = max(1, n_train // (M * train.batch_size))
    return spe, max(1, int(round(train.epochs * spe)))


def bucket_hooks(kind: str, n_buckets: int) -> bool:
    """Are the gradient buckets (train.bucket_mb) handed to the algorithm during backward, from
    torch's post-accumulate-grad hooks (qprsgd/buckets.py), or all after backward?

    During backward on cpu, sim and cuda when there is more than one bucket (cuda: each bucket
    after a device wait, :meth:`Placement.bucket_ready`; the loop runs backward on the calling
    thread, ``torch.autograd.set_multithreading_enabled(False)``, so the hooks -- and the MPI
    calls they make -- stay on the main thread).  After backward on cuda_host (the algorithm's
    gradient is the host copy made then -- the baseline without overlap).  The run's HDF5
    attribute ``bucket_hooks``; it never changes the iterates."""
    return kind != "cuda_host" and n_buckets > 1


def load_data(cfg: Config):
    """The configured dataset (every worker's shard is cut from it; in-process workers share it)."""
    return DATASETS.get(cfg.data.name).factory(cfg.data.data_dir, **dict(cfg.data.params))


def build(cfg: Config, comm, out_dir: str, data=None, topology=None, backend: str = "mpi") -> Experiment:
    """Build an experiment on this worker.  ``comm`` is its world transport (see the module
    docstring).  In-process workers share what is identical for all of them and costly to make
    M times: ``data`` (the loaded dataset) and ``topology`` (the checked mixing matrix, pure
    math); under MPI each rank builds its own."""
    if backend not in ("mpi", "inprocess"):
        raise ValueError(f"backend must be 'mpi' or 'inprocess', got {backend!r}")
    roles = roles_for(cfg, comm.size)
    rank = comm.rank
    if backend == "mpi":
        torch.set_num_threads(cfg.run.threads)
        # codec kernels (numba) run this many threads; by default the node's cores are shared out
        # between the ranks on the node, so codec threads do not oversubscribe them
        ct = cfg.run.codec_threads or max(1, (os.cpu_count() or 1) // comm.local_size())
    else:
        # in-process: the workers are the parallelism; one torch thread, one codec thread each
        # unless run.codec_threads says otherwise (docs/architecture.md)
        torch.set_num_threads(1)
        ct = cfg.run.codec_threads or 1

    # groups: the workers' (None on a dedicated server), then those the algorithm declares
    wc = comm.split(0 if rank in roles.workers else -1)
    topo = build_topology(cfg, roles.M) if topology is None else topology
    cls = ALGORITHMS.get(cfg.algorithm.name).factory
    groups = tuple(comm.split(0 if rank in members else -1)
                   for members in cls.comm_groups(topo, roles.workers, roles.server))

    # data: every worker loads the dataset and keeps its shard (the partition is identical everywhere)
    from .datasets import BatchStream, shard
    if data is None:
        data = load_data(cfg)
    M = roles.M
    if rank in roles.workers:
        i = roles.workers.index(rank)
        train_idx = shard(data.y_train, i, M, scheme=cfg.data.shard, alpha=cfg.data.alpha, seed=cfg.seed)
        test_idx = shard(data.y_test, i, M, scheme="iid", seed=cfg.seed + 1)
    else:
        train_idx = np.zeros(0, dtype=np.int64)
        test_idx = np.zeros(0, dtype=np.int64)
    steps_per_epoch, total_steps = schedule_lengths(cfg.train, len(data.y_train), M)
    if rank in roles.workers and len(train_idx) < cfg.train.batch_size:
        raise ValueError(f"worker {rank}: shard of {len(train_idx)} samples is smaller than "
                         f"train.batch_size={cfg.train.batch_size}")
    stream = BatchStream(len(train_idx), cfg.train.batch_size, seed=cfg.seed, rank=rank) \
        if rank in roles.workers else None

    # model: identical x_0 on every rank (seeded by cfg.seed alone)
    from .models import FlatParams, build_model
    module = build_model(cfg.model.name, tuple(data.in_shape), data.num_classes, seed=cfg.seed,
                         **cfg.model.kwargs())
    kind = cfg.run.device
    if kind in ("cuda", "cuda_host"):   # one rank per GPU, by node-local rank (COMM_TYPE_SHARED)
        gpu = gpu_for_rank(comm.local_rank(), comm.local_size(), torch.cuda.device_count(),
                           cfg.run.share_gpus)
        torch.cuda.set_device(gpu)
        if kind == "cuda":
            import cupy

            cupy.cuda.Device(gpu).use()
        module = module.to(torch.device("cuda", gpu))
    flat = FlatParams(module)
    placement = Placement(flat, kind, comm.ledger)
    loss_name = getattr(module, "loss_name", "cross_entropy")

    # device vectors reach the transport through host staging (or, with a CUDA-aware MPI, the
    # float all-reduces directly); every group the algorithm sees is wrapped the same way
    gpu_mpi = "host"          # cpu, cuda_host: the algorithm's vectors are host arrays
    if placement.on_device:
        direct = kind == "cuda" and (cfg.run.gpu_mpi == "cuda_aware" or
                                     (cfg.run.gpu_mpi == "auto" and comm.cuda_aware()))
        gpu_mpi = "cuda_aware" if direct else "staged"
        stage = Stager(kind, comm.ledger)
        comm = Staged(comm, stage, direct)
        wc = None if wc is None else Staged(wc, stage, direct)
        groups = tuple(None if g is None else Staged(g, stage, direct) for g in groups)

    codec = None
    if cfg.codec is not None:
        centry = CODECS.get(cfg.codec.name)
        raw = codec_for_device(centry.factory, flat.d, flat.blocks, kind, ct, cfg.codec.kwargs())
        raw.warmup()  # JIT compile / cache load now, not in step 0's t_codec
        codec = TimedCodec(raw, comm.ledger)

        def make_codec(d, blocks, _f=centry.factory, _kw=cfg.codec.kwargs()):
            return TimedCodec(codec_for_device(_f, d, blocks, kind, ct, _kw), comm.ledger)
    else:
        make_codec = None
    env = Env(
        comm=comm, d=flat.d, workers=roles.workers, server=roles.server, worker_comm=wc,
        codec=codec, rng=np.random.default_rng([cfg.seed, 1, rank]),
        W=None if topo is None else topo.W, blocks=tuple(flat.blocks),
        weight_decay=cfg.train.weight_decay,
        extra={} if topo is None else {"topology": topo},
        groups=groups, make_codec=make_codec, shapes=tuple(flat.shapes), seed=cfg.seed,
        buckets=tuple((lo, hi) for lo, hi, _ in bucket_plan(flat.blocks, cap_bytes(cfg.train.bucket_mb))),
    )
    algo = cls(placement.x, env, **cfg.algorithm.kwargs())
    return Experiment(cfg, comm, roles, module, flat, data, train_idx, test_idx, stream, codec, algo,
                      topo, steps_per_epoch, total_steps, out_dir, loss_name, placement, backend,
                      gpu_mpi, bucket_hooks(kind, len(env.buckets)))


def run_attrs(cfg: Config, exp: Experiment) -> dict:
    return {
        "config_yaml": cfg.to_yaml(),
        "version": __version__,
        "git_commit": git_commit(),
        "world_size": exp.comm.size,
        "backend": exp.backend,
        "device": exp.cfg.run.device,
        "device_name": exp.placement.device_name,
        "gpu_mpi": exp.gpu_mpi,
        "bucket_hooks": int(exp.bucket_hooks),
        "workers": np.asarray(exp.roles.workers, dtype=np.int64),
        "server": -1 if exp.roles.server is None else exp.roles.server,
        "algorithm": cfg.algorithm.name,
        "codec": "" if cfg.codec is None else cfg.codec.name,
        "d": exp.flat.d,
        "blocks": np.asarray(exp.flat.blocks, dtype=np.int64),
        "steps_per_epoch": exp.steps_per_epoch,
        "total_steps": exp.total_steps,
        "batch_size": cfg.train.batch_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
