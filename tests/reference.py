"""Single-process references: M simulated workers with exactly the runner's data, init and draws.

``Oracles(cfg_dict, world_size)`` rebuilds what each rank of ``qprsgd run`` would hold -- the
same dataset shard, batch order, initial x_0, learning-rate schedule and codec generators --
without MPI, so a test can apply a paper's update equations in matrix form (one row of X per
worker) and compare them with the parameters an MPI run logged in ``final/params``.
"""
from __future__ import annotations

import numpy as np
import torch

from qprsgd import config
from qprsgd.datasets import BatchStream, shard
from qprsgd.experiment import learning_rate, roles_for, schedule_lengths, build_topology
from qprsgd.models import FlatParams, build_model, loss_fn
from qprsgd.registry import CODECS, DATASETS


class Oracles:
    def __init__(self, raw: dict, world_size: int):
        torch.set_num_threads(1)
        self.cfg = cfg = config.validate(raw)
        self.roles = roles = roles_for(cfg, world_size)
        self.M = M = roles.M
        data = DATASETS.get(cfg.data.name).factory(cfg.data.data_dir, **dict(cfg.data.params))
        self.data = data
        self.shards, self.streams = [], []
        for i, r in enumerate(roles.workers):
            idx = shard(data.y_train, i, M, scheme=cfg.data.shard, alpha=cfg.data.alpha, seed=cfg.seed)
            self.shards.append(idx)
            self.streams.append(BatchStream(len(idx), cfg.train.batch_size, seed=cfg.seed, rank=r))
        self.module = build_model(cfg.model.name, tuple(data.in_shape), data.num_classes, seed=cfg.seed,
                                  **cfg.model.kwargs())
        self.flat = FlatParams(self.module)
        self.loss = loss_fn(self.module)
        self.x0 = self.flat.x_numpy().copy()
        self.d = self.x0.size
        self.spe, self.total_steps = schedule_lengths(cfg.train, len(data.y_train), M)
        self.rngs = [np.random.default_rng([cfg.seed, 1, r]) for r in range(world_size)]
        self.xt = torch.from_numpy(data.x_train)
        self.yt = torch.from_numpy(data.y_train)
        self.topology = build_topology(cfg, M) if cfg.topology is not None else None

    def lr(self, t: int) -> float:
        return learning_rate(self.cfg.train, self.spe, t)

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        """Worker i's stochastic gradient at x on its next batch (a float32 copy)."""
        self.flat.x_numpy()[...] = x
        idx, _ = self.streams[i].next()
        gi = torch.from_numpy(self.shards[i][idx])
        self.module.train()
        self.flat.zero_grad()
        self.loss(self.module(self.xt[gi]), self.yt[gi]).backward()
        return self.flat.grad_numpy().copy()

    def codec(self):
        c = self.cfg.codec
        return CODECS.get(c.name).factory(self.d, self.flat.blocks, **c.kwargs())

    def X0(self) -> np.ndarray:
        return np.tile(self.x0, (self.M, 1))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
