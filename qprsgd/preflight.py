"""Pre-flight: every check of a run that needs more than the config text, done on rank 0 (and by
``qprsgd sweep`` for each run) before any rank starts work.

:func:`check_run` runs :func:`qprsgd.experiment.preflight` (roles, CUDA, topology for the world
size) and then the checks that need the data set and the model size d:

* the data set loads (e.g. mnist's files exist and parse) -- its error names the file;
* every worker's training shard (the exact partition the run will use) holds at least
  ``train.batch_size`` samples, and every test shard at least one;
* the codec can be built for this d (e.g. top-k ``k <= d``).

Each failure is a :class:`qprsgd.config.ConfigError` naming the key, the value and what is
allowed, so the caller exits 2.  Data sets are loaded once per process per (name, data_dir,
params) -- a sweep of many runs on one data set loads it once.
"""
from __future__ import annotations

import json
from functools import lru_cache

from .config import Config, ConfigError, brief, cut
from .registry import CODECS, DATASETS


@lru_cache(maxsize=4)
def _dataset(name: str, data_dir, params_json: str):
    return DATASETS.get(name).factory(data_dir, **json.loads(params_json))


def load_data(cfg: Config):
    """The configured data set (cached); a missing or malformed file is a ConfigError."""
    try:
        return _dataset(cfg.data.name, cfg.data.data_dir, json.dumps(dict(cfg.data.params), sort_keys=True))
    except ValueError as e:  # DatasetError / DatasetFileNotFoundError are ValueErrors
        raise ConfigError([f"data: {cfg.data.name!r} cannot be loaded: {cut(str(e), 600)}"]) from None


def check_shards(cfg: Config, data, M: int) -> None:
    """Every worker's shard must hold a full batch (the exact partition ``experiment.build`` uses)."""
    from .datasets import partition
    bs = cfg.train.batch_size
    try:
        train = partition(data.y_train, M, scheme=cfg.data.shard, alpha=cfg.data.alpha, seed=cfg.seed)
        test = partition(data.y_test, M, scheme="iid", seed=cfg.seed + 1) if len(data.y_test) else None
    except ValueError as e:
        raise ConfigError([f"data: cannot split {data.n_train} training / {data.n_test} test samples "
                           f"over {M} workers: {e}"]) from None
    sizes = [len(s) for s in train]
    small = min(sizes)
    if small < bs:
        w = sizes.index(small)
        raise ConfigError([
            f"train.batch_size: {bs} is larger than worker {w}'s training shard of {small} samples "
            f"({data.n_train} samples over {M} workers, shard: {cfg.data.shard}); allowed: "
            f"batch_size <= {small} (or more data / fewer workers)"])
    if test is None or min(len(s) for s in test) < 1:
        raise ConfigError([f"data: {data.n_test} test samples cannot give each of {M} workers one "
                           f"(data.params.max_test or the split)"])


def check_codec(cfg: Config, data) -> None:
    """Build the codec for the model's d (and blocks): its constructor checks k <= d and the like."""
    if cfg.codec is None:
        return
    from .models import FlatParams, build_model
    module = build_model(cfg.model.name, tuple(data.in_shape), data.num_classes, seed=cfg.seed,
                         **cfg.model.kwargs())
    flat = FlatParams(module)
    try:
        CODECS.get(cfg.codec.name).factory(flat.d, tuple(flat.blocks), **cfg.codec.kwargs())
    except ValueError as e:
        raise ConfigError([f"codec: {cut(str(e), 400)} (model {cfg.model.name!r} has d = {flat.d} "
                           f"parameters; got codec {brief(cfg.codec.kwargs())})"]) from None


def check_run(cfg: Config, world_size: int) -> None:
    """All pre-flight checks for ``cfg`` on ``world_size`` ranks; raises ConfigError/ValueError."""
    from .experiment import preflight, roles_for
    preflight(cfg, world_size)
    M = roles_for(cfg, world_size).M
    data = load_data(cfg)
    check_shards(cfg, data, M)
    check_codec(cfg, data)
