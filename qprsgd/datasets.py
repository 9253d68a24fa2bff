"""Datasets (numpy only; nothing is ever downloaded), sharding across workers, batch order.

Every builder is registered in :data:`qprsgd.registry.DATASETS` with a pydantic params model and
is called as ``factory(data_dir, **params)`` (raw params are validated by the builder itself).
It returns a :class:`Dataset`.  See docs/data.md for the formats, the split and normalisation
choices, the sharding schemes and the batch order.
"""
from __future__ import annotations

import functools

import gzip
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .registry import DATASETS

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetFileNotFoundError",
    "load_dataset",
    "read_idx",
    "load_cifar_binary",
    "shard",
    "partition",
    "BatchStream",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]


class DatasetError(ValueError):
    """A data file that is missing, truncated or malformed (the message names the file)."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A required data file does not exist (the message names every path tried)."""


@dataclass
class Dataset:
    """In-memory dataset.  Features float32 ``(N, C, H, W)`` or ``(N, F)``; labels int64 (float32
    targets for regression, where ``num_classes == 0``).  ``x_star``: known optimum (lsq only)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    in_shape: tuple
    x_star: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(len(self.y_train))

    @property
    def n_test(self) -> int:
        return int(len(self.y_test))


# --------------------------------------------------------------------------------------------
# params
class _SubsetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_train: Optional[int] = Field(None, ge=1, description="keep the first N training samples")
    max_test: Optional[int] = Field(None, ge=1, description="keep the first N test samples")


class DigitsParams(_SubsetParams):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)


class MNISTParams(_SubsetParams):
    pass


class CIFAR10Params(_SubsetParams):
    normalize: Literal["constants", "train", "none"] = "constants"


class CIFAR100Params(CIFAR10Params):
    label: Literal["fine", "coarse"] = "fine"


class LSQParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(1000, ge=1)
    n_test: int = Field(200, ge=1)
    dim: int = Field(50, ge=1)
    noise: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)
    max_train: Optional[int] = Field(None, ge=1)
    max_test: Optional[int] = Field(None, ge=1)


def _subset(ds: Dataset, max_train: Optional[int], max_test: Optional[int]) -> Dataset:
    if max_train is not None:
        ds.x_train, ds.y_train = ds.x_train[:max_train], ds.y_train[:max_train]
    if max_test is not None:
        ds.x_test, ds.y_test = ds.x_test[:max_test], ds.y_test[:max_test]
    return ds


def load_dataset(name: str, data_dir: Optional[str] = None, **params: Any) -> Dataset:
    """``DATASETS.get(name).factory(data_dir, **params)``."""
    return DATASETS.get(name).factory(data_dir, **params)


# --------------------------------------------------------------------------------------------
# digits
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits file, parsed once per process (it never changes): read-only
    (images / 16 as float32 N x 1 x 8 x 8, labels int64).  A process that runs many experiments
    (in-process runs, the test suite) reads and parses the file once."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (np.asarray(raw.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(raw.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


@DATASETS.register("digits", params=DigitsParams)
def digits(data_dir: Optional[str] = None, **params: Any) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 samples), pixels / 16, fixed-seed split."""
    p = DigitsParams.model_validate(params)
    x, y = _digits_arrays()
    n = len(y)
    perm = np.random.default_rng(p.split_seed).permutation(n)
    n_test = int(round(p.test_fraction * n))
    tr, te = perm[: n - n_test], perm[n - n_test :]
    ds = Dataset("digits", x[tr], y[tr], x[te], y[te], 10, (1, 8, 8))
    return _subset(ds, p.max_train, p.max_test)


digits.reads_files = False  # config refuses data.data_dir for it (it would be ignored)


# --------------------------------------------------------------------------------------------
# IDX (MNIST)
_IDX_DTYPES = {0x08: np.uint8}


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetFileNotFoundError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e}); truncated or not gzip?") from None


def read_idx(path: str, expect_magic: Optional[int] = None, limit: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw): 4-byte big-endian magic ``0x0000TTNN`` (TT = 0x08
    unsigned byte, NN = number of dims), NN big-endian uint32 dims, then the data.  The size must
    match exactly.  ``limit`` keeps the first entries of dim 0.  Returns a uint8 array."""
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DatasetError(f"{path}: IDX file too short ({len(buf)} bytes) for the 4-byte magic")
    magic = int.from_bytes(buf[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        raise DatasetError(f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expect_magic:08x}")
    if magic >> 16 != 0 or ((magic >> 8) & 0xFF) not in _IDX_DTYPES:
        raise DatasetError(f"{path}: bad IDX magic 0x{magic:08x} (only unsigned-byte IDX is supported)")
    ndim = magic & 0xFF
    if ndim < 1:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    hdr = 4 + 4 * ndim
    if len(buf) < hdr:
        raise DatasetError(f"{path}: truncated IDX header ({len(buf)} bytes, need {hdr})")
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(buf) != hdr + size:
        what = "truncated" if len(buf) < hdr + size else "has trailing bytes"
        raise DatasetError(
            f"{path}: IDX data {what}: header dims {dims} need {hdr + size} bytes, file has {len(buf)}"
        )
    arr = np.frombuffer(buf, dtype=np.uint8, offset=hdr).reshape(dims)
    if limit is not None:
        arr = arr[:limit]
    return arr


def _find_file(dirs: Sequence[str], names: Sequence[str], what: str) -> str:
    tried = []
    for d in dirs:
        for n in names:
            p = os.path.join(d, n)
            tried.append(p)
            if os.path.isfile(p):
                return p
    raise DatasetFileNotFoundError(f"{what}: none of these files exists: {', '.join(tried)}")


def _need_dir(name: str, data_dir: Optional[str]) -> str:
    if not data_dir:
        raise DatasetFileNotFoundError(f"{name}: data_dir is required (nothing is downloaded)")
    if not os.path.isdir(data_dir):
        raise DatasetFileNotFoundError(f"{name}: data_dir {data_dir!r} is not a directory")
    return data_dir


def _mnist_file(dirs, stem: str) -> str:
    base = stem.replace("-idx", ".idx")  # accept both 'train-images-idx3-ubyte' and '...images.idx3...'
    names = [stem, stem + ".gz", base, base + ".gz"]
    return _find_file(dirs, names, f"mnist {stem}")


@DATASETS.register("mnist", params=MNISTParams)
def mnist(data_dir: Optional[str] = None, **params: Any) -> Dataset:
    """MNIST from the four IDX files (gzipped or not) in data_dir; pixels / 255."""
    p = MNISTParams.model_validate(params)
    root = _need_dir("mnist", data_dir)
    dirs = [root, os.path.join(root, "mnist"), os.path.join(root, "MNIST", "raw")]
    out = {}
    for split, pre, lim in (("train", "train", p.max_train), ("test", "t10k", p.max_test)):
        fi = _mnist_file(dirs, f"{pre}-images-idx3-ubyte")
        fl = _mnist_file(dirs, f"{pre}-labels-idx1-ubyte")
        img = read_idx(fi, 0x00000803)
        lab = read_idx(fl, 0x00000801)
        if img.shape[0] != lab.shape[0]:
            raise DatasetError(f"{fi} holds {img.shape[0]} images but {fl} holds {lab.shape[0]} labels")
        if img.shape[1:] != (28, 28):
            raise DatasetError(f"{fi}: images are {img.shape[1]}x{img.shape[2]}, expected 28x28")
        if lab.size and int(lab.max()) > 9:
            raise DatasetError(f"{fl}: label {int(lab.max())} out of range 0..9")
        if lim is not None:
            img, lab = img[:lim], lab[:lim]
        x = img.astype(np.float32).reshape(-1, 1, 28, 28)
        x *= np.float32(1.0 / 255.0)
        out[split] = (x, lab.astype(np.int64))
    return Dataset("mnist", *out["train"], *out["test"], 10, (1, 28, 28))


# --------------------------------------------------------------------------------------------
# CIFAR binary
# Per-channel mean/std of the training set, pixels in [0, 1] (the usual published constants).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_PIX = 3 * 32 * 32


def load_cifar_binary(path: str, label_bytes: int, num_labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR binary file: records of ``label_bytes`` label bytes then 3072 pixel bytes
    (1024 R, 1024 G, 1024 B, row-major).  Returns (uint8 images (N,3,32,32), uint8 labels
    (N, label_bytes)).  Raises :class:`DatasetError` naming the file if the size is not a whole
    number of records or a label is out of range (``num_labels[i]`` classes for label byte i)."""
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"{path}: file not found")
    rec = label_bytes + _PIX
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) == 0 or len(buf) % rec:
        raise DatasetError(
            f"{path}: size {len(buf)} bytes is not a positive multiple of the {rec}-byte record "
            f"({label_bytes} label byte(s) + 3072 pixels); truncated or wrong format?"
        )
    a = np.frombuffer(buf, dtype=np.uint8).reshape(-1, rec)
    labels = a[:, :label_bytes]
    for i, k in enumerate(num_labels):
        if labels.shape[0] and int(labels[:, i].max()) >= k:
            raise DatasetError(f"{path}: label byte {i} holds {int(labels[:, i].max())} >= {k} classes")
    return a[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _cifar_dir(name: str, data_dir: Optional[str], sub: str, probe: str) -> str:
    root = _need_dir(name, data_dir)
    for d in (root, os.path.join(root, sub)):
        if os.path.isfile(os.path.join(d, probe)):
            return d
    raise DatasetFileNotFoundError(
        f"{name}: {probe} not found in {root!r} nor in {os.path.join(root, sub)!r} "
        f"(expected the binary distribution {sub}/; python pickles are not read)"
    )


def _to_float(img: np.ndarray, mean, std) -> np.ndarray:
    x = img.astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    if mean is not None:
        m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
        s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
        x -= m
        x /= s
    return x


def _cifar_finish(name, tr, ytr, te, yte, p, consts, num_classes) -> Dataset:
    if p.max_train is not None:
        tr, ytr = tr[: p.max_train], ytr[: p.max_train]
    if p.max_test is not None:
        te, yte = te[: p.max_test], yte[: p.max_test]
    if p.normalize == "constants":
        mean, std = consts
    elif p.normalize == "train":
        f = tr.astype(np.float64) / 255.0
        mean = tuple(f.mean(axis=(0, 2, 3)))
        std = tuple(np.maximum(f.std(axis=(0, 2, 3)), 1e-8))
    else:
        mean = std = None
    ds = Dataset(name, _to_float(tr, mean, std), ytr.astype(np.int64), _to_float(te, mean, std),
                 yte.astype(np.int64), num_classes, (3, 32, 32))
    ds.info = {"mean": mean, "std": std}
    return ds


@DATASETS.register("cifar10", params=CIFAR10Params)
def cifar10(data_dir: Optional[str] = None, **params: Any) -> Dataset:
    """CIFAR-10 binary distribution (cifar-10-batches-bin), per-channel normalised."""
    p = CIFAR10Params.model_validate(params)
    d = _cifar_dir("cifar10", data_dir, "cifar-10-batches-bin", "data_batch_1.bin")
    imgs, labs = [], []
    for i in range(1, 6):
        im, lb = load_cifar_binary(os.path.join(d, f"data_batch_{i}.bin"), 1, (10,))
        imgs.append(im)
        labs.append(lb[:, 0])
    te, lte = load_cifar_binary(os.path.join(d, "test_batch.bin"), 1, (10,))
    return _cifar_finish("cifar10", np.concatenate(imgs), np.concatenate(labs), te, lte[:, 0], p,
                         (CIFAR10_MEAN, CIFAR10_STD), 10)


@DATASETS.register("cifar100", params=CIFAR100Params)
def cifar100(data_dir: Optional[str] = None, **params: Any) -> Dataset:
    """CIFAR-100 binary distribution (cifar-100-binary), fine (100) or coarse (20) labels."""
    p = CIFAR100Params.model_validate(params)
    d = _cifar_dir("cifar100", data_dir, "cifar-100-binary", "train.bin")
    col = 1 if p.label == "fine" else 0  # record: <coarse byte><fine byte><3072 pixels>
    tr, ltr = load_cifar_binary(os.path.join(d, "train.bin"), 2, (20, 100))
    te, lte = load_cifar_binary(os.path.join(d, "test.bin"), 2, (20, 100))
    return _cifar_finish("cifar100", tr, ltr[:, col], te, lte[:, col], p,
                         (CIFAR100_MEAN, CIFAR100_STD), 100 if p.label == "fine" else 20)


# --------------------------------------------------------------------------------------------
# synthetic least squares
@DATASETS.register("lsq", params=LSQParams)
def lsq(data_dir: Optional[str] = None, **params: Any) -> Dataset:
    """Synthetic least squares y = A x* + noise, A and x* standard normal; x* exposed."""
    p = LSQParams.model_validate(params)
    rng = np.random.default_rng(p.seed)
    x_star = rng.standard_normal(p.dim).astype(np.float32)
    a = rng.standard_normal((p.n_train + p.n_test, p.dim)).astype(np.float32)
    y = a @ x_star
    if p.noise > 0:
        y = y + np.float32(p.noise) * rng.standard_normal(len(y)).astype(np.float32)
    y = y.astype(np.float32)
    n = p.n_train
    ds = Dataset("lsq", a[:n], y[:n], a[n:], y[n:], 0, (p.dim,), x_star=x_star,
                 info={"noise": p.noise})
    return _subset(ds, p.max_train, p.max_test)


lsq.reads_files = False  # synthetic: config refuses data.data_dir for it


# --------------------------------------------------------------------------------------------
# sharding
def _labels(y, scheme: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"shard: labels must be 1-D, got shape {y.shape}")
    if scheme == "dirichlet" and not np.issubdtype(y.dtype, np.integer):
        raise ValueError("shard: the dirichlet scheme needs integer class labels (not regression targets)")
    return y


def partition(y, size: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
              min_size: int = 1) -> list[np.ndarray]:
    """All ``size`` shards at once (sorted int64 index arrays), a disjoint cover of
    ``range(len(y))`` for "dirichlet" and of all but ``len(y) % size`` samples for "iid".

    * ``iid``: ``default_rng([seed, 0]).permutation(n)`` cut into ``size`` equal parts of
      ``n // size``; the last ``n % size`` permuted samples are dropped (equal shards keep the
      epochs of all ranks aligned).
    * ``dirichlet``: ``rng = default_rng([seed, 1])``; for each class c (ascending) the class's
      indices are shuffled and cut by proportions ``p_c ~ Dirichlet(alpha * 1_size)``
      (cut points ``rint(cumsum(p_c) * n_c)``).  Then every shard with fewer than ``min_size``
      samples takes samples, one at a time, from the end of the currently largest shard (lowest
      rank on ties), so every rank gets >= min_size (needs ``n >= size * min_size``).

    Depends only on (y, size, scheme, alpha, seed, min_size): every rank computes the same one.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"shard: size must be >= 1, got {size}")
    y = _labels(y, scheme)
    n = len(y)
    if scheme == "iid":
        per = n // size
        if per < 1:
            raise ValueError(f"shard: {n} samples cannot give each of {size} ranks one sample")
        perm = np.random.default_rng([int(seed), 0]).permutation(n)
        return [np.sort(perm[r * per : (r + 1) * per]).astype(np.int64) for r in range(size)]
    if scheme != "dirichlet":
        raise ValueError(f"shard: unknown scheme {scheme!r} (iid | dirichlet)")
    if not alpha > 0:
        raise ValueError(f"shard: alpha must be > 0, got {alpha}")
    if n < size * min_size:
        raise ValueError(f"shard: {n} samples cannot give each of {size} ranks {min_size} sample(s)")
    rng = np.random.default_rng([int(seed), 1])
    parts: list[list[np.ndarray]] = [[] for _ in range(size)]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        prop = rng.dirichlet(np.full(size, float(alpha)))
        cuts = np.rint(np.cumsum(prop) * len(idx)).astype(np.int64)
        cuts[-1] = len(idx)
        for r, chunk in enumerate(np.split(idx, cuts[:-1])):
            parts[r].append(chunk)
    shards = [list(np.concatenate(p)) if p else [] for p in parts]
    for r in range(size):
        while len(shards[r]) < min_size:
            donor = max(range(size), key=lambda k: (len(shards[k]), -k))
            shards[r].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def shard(y, rank: int, size: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
          min_size: int = 1) -> np.ndarray:
    """Indices (sorted int64) of rank ``rank``'s shard; see :func:`partition`."""
    if not 0 <= int(rank) < int(size):
        raise ValueError(f"shard: rank {rank} out of range for size {size}")
    return partition(y, size, scheme, alpha, seed, min_size)[int(rank)]


# --------------------------------------------------------------------------------------------
# batch order
class BatchStream:
    """Mini-batches of indices into a shard of ``n`` samples.

    Epoch e uses ``np.random.default_rng([seed, rank, e]).permutation(n)`` and yields its
    consecutive slices of ``batch_size``; the last partial batch (``n % batch_size`` samples) is
    dropped, so ``steps_per_epoch = n // batch_size``.  The whole state is ``(epoch, pos)`` (pos =
    batches already taken from this epoch), so resuming from :meth:`state_dict` reproduces the
    exact remaining sequence.  No global RNG is touched.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0):
        self.n, self.batch_size, self.seed, self.rank = int(n), int(batch_size), int(seed), int(rank)
        if self.batch_size < 1:
            raise ValueError(f"BatchStream: batch_size must be >= 1, got {batch_size}")
        if self.n < self.batch_size:
            raise ValueError(f"BatchStream: {self.n} samples are fewer than one batch of {self.batch_size}")
        if self.seed < 0 or self.rank < 0:
            raise ValueError("BatchStream: seed and rank must be >= 0")
        self.steps_per_epoch = self.n // self.batch_size
        self.epoch = 0
        self.pos = 0
        self._perm: Optional[np.ndarray] = None
        self._perm_epoch = -1

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def next(self) -> tuple[np.ndarray, int]:
        """The next batch (int64 indices into the shard) and the epoch it belongs to."""
        e = self.epoch
        s = self.pos * self.batch_size
        idx = self._permutation(e)[s : s + self.batch_size].copy()
        self.pos += 1
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = e + 1, 0
        return idx, e

    __next__ = next

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        return self

    @property
    def step(self) -> int:
        """Batches taken so far."""
        return self.epoch * self.steps_per_epoch + self.pos

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "batch_size": self.batch_size,
                "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        for k in ("n", "batch_size", "seed", "rank"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ValueError(f"BatchStream.load_state_dict: {k}={state[k]} but this stream has {getattr(self, k)}")
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < self.steps_per_epoch:
            raise ValueError(f"BatchStream.load_state_dict: bad position epoch={epoch} pos={pos}")
        self.epoch, self.pos = epoch, pos
