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
from .config import Config
from .registry import ALGORITHMS, CODECS, DATASETS, MODELS, TOPOLOGIES
from .transport import Ledger


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


class HostMirror:
    """Where the algorithm's x lives.

    On the CPU, ``x`` *is* the model's flat parameter buffer (a numpy view: no copies).  With
    ``run.device: cuda`` the model computes on the GPU and the algorithm, codec and comm work on a
    host copy: ``to_device()`` uploads x before a forward pass, ``grad_to_host()`` downloads the
    flat gradient after backward (``.cpu()`` synchronises the stream, so MPI never sees a
    half-written buffer).  This is host staging; see docs/performance.md for what it costs.
    """

    def __init__(self, flat):
        self.flat = flat
        self.on_gpu = flat.flat.device.type != "cpu"
        if self.on_gpu:
            self.x = flat.flat.detach().cpu().numpy().copy()
            self._g = np.empty_like(self.x)
        else:
            self.x = flat.x_numpy()

    def to_device(self) -> None:
        if self.on_gpu:
            self.flat.flat.copy_(torch.from_numpy(self.x))

    def host_grad(self) -> np.ndarray:
        """The host array :meth:`grad_to_host` fills and returns (the same object every step)."""
        return self._g if self.on_gpu else self.flat.grad_numpy()

    def grad_to_host(self) -> np.ndarray:
        if self.on_gpu:
            self._g[...] = self.flat.grad.detach().cpu().numpy()
            return self._g
        return self.flat.grad_numpy()


def cuda_device(rank_on_node: int):
    """The GPU for this rank (local ranks round-robin over visible devices), or a clear error."""
    if not torch.cuda.is_available():
        raise ValueError("run.device: 'cuda' but torch sees no CUDA device (got torch "
                         f"{torch.__version__}); use run.device: cpu")
    return torch.device("cuda", rank_on_node % torch.cuda.device_count())


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


def preflight(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run on rank 0 before any rank starts work."""
    roles = roles_for(cfg, world_size)
    if cfg.run.device == "cuda":
        cuda_device(0)
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
    mirror: HostMirror
    backend: str = "mpi"

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
    if cfg.run.device == "cuda":
        local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK",
                                   os.environ.get("SLURM_LOCALID", rank))))
        module = module.to(cuda_device(local))
    flat = FlatParams(module)
    mirror = HostMirror(flat)
    loss_name = getattr(module, "loss_name", "cross_entropy")

    codec = None
    if cfg.codec is not None:
        centry = CODECS.get(cfg.codec.name)
        raw = centry.factory(flat.d, flat.blocks, threads=ct, **cfg.codec.kwargs())
        raw.warmup()  # JIT compile / cache load now, not in step 0's t_codec
        codec = TimedCodec(raw, comm.ledger)

        def make_codec(d, blocks, _f=centry.factory, _kw=cfg.codec.kwargs()):
            return TimedCodec(_f(int(d), tuple(blocks), threads=ct, **_kw), comm.ledger)
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
    algo = cls(mirror.x, env, **cfg.algorithm.kwargs())
    return Experiment(cfg, comm, roles, module, flat, data, train_idx, test_idx, stream, codec, algo,
                      topo, steps_per_epoch, total_steps, out_dir, loss_name, mirror, backend)


def run_attrs(cfg: Config, exp: Experiment) -> dict:
    return {
        "config_yaml": cfg.to_yaml(),
        "version": __version__,
        "git_commit": git_commit(),
        "world_size": exp.comm.size,
        "backend": exp.backend,
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
