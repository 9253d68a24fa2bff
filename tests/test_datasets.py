import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from qprsgd.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BatchStream,
    DatasetError,
    DatasetFileNotFoundError,
    load_dataset,
    partition,
    read_idx,
    shard,
)
from qprsgd.registry import DATASETS


# ---------------------------------------------------------------------------- writers
def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(">I", 0x00000800 | arr.ndim) + b"".join(struct.pack(">I", n) for n in arr.shape)
    return head + arr.tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def _write_mnist(root, n_train, n_test, gz, rng):
    out = {}
    for pre, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write(root / f"{pre}-images-idx3-ubyte", _idx_bytes(img), gz)
        _write(root / f"{pre}-labels-idx1-ubyte", _idx_bytes(lab), gz)
        out[pre] = (img, lab)
    return out


def _cifar_records(rng, n, label_cols):
    labels = np.stack([rng.integers(0, k, size=n) for k in label_cols], 1).astype(np.uint8)
    img = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    raw = np.concatenate([labels, img.reshape(n, -1)], 1).tobytes()
    return raw, img, labels


# ---------------------------------------------------------------------------- MNIST / IDX
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    ref = _write_mnist(tmp_path, 7, 3, gz, rng)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train, ref["train"][1])
    np.testing.assert_array_equal(ds.y_test, ref["t10k"][1])
    np.testing.assert_allclose(ds.x_train[:, 0] * 255.0, ref["train"][0], atol=1e-4)
    np.testing.assert_allclose(ds.x_test[:, 0] * 255.0, ref["t10k"][0], atol=1e-4)
    sub = load_dataset("mnist", str(tmp_path), max_train=2, max_test=1)
    np.testing.assert_array_equal(sub.y_train, ref["train"][1][:2])
    assert sub.x_test.shape[0] == 1


def test_idx_malformed(tmp_path):
    rng = np.random.default_rng(1)
    _write_mnist(tmp_path, 4, 2, False, rng)
    p = tmp_path / "train-images-idx3-ubyte"
    good = p.read_bytes()
    p.write_bytes(good[:-5])  # truncated data
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", str(tmp_path))
    p.write_bytes(good[:10])  # truncated header
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))
    p.write_bytes(good + b"\0")  # trailing bytes
    with pytest.raises(DatasetError, match="trailing"):
        load_dataset("mnist", str(tmp_path))
    p.write_bytes(struct.pack(">I", 0x00000801) + good[4:])  # wrong magic
    with pytest.raises(DatasetError, match="magic"):
        load_dataset("mnist", str(tmp_path))
    p.write_bytes(good)
    lab = tmp_path / "train-labels-idx1-ubyte"
    lab.write_bytes(_idx_bytes(np.zeros(3, np.uint8)))  # count mismatch
    with pytest.raises(DatasetError, match="labels"):
        load_dataset("mnist", str(tmp_path))
    os.remove(lab)
    with pytest.raises(DatasetFileNotFoundError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", str(tmp_path))
    # a truncated gzip stream names the file
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(4, np.uint8)), True)
    gzp = tmp_path / "train-labels-idx1-ubyte.gz"
    gzp.write_bytes(gzp.read_bytes()[:-6])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", str(tmp_path))
    with pytest.raises(DatasetFileNotFoundError, match="data_dir"):
        load_dataset("mnist", None)


def test_read_idx_direct(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(_idx_bytes(a))
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x")), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x"), limit=1), a[:1])


# ---------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_roundtrip(tmp_path, parent):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    imgs, labs = [], []
    for i in range(1, 6):
        raw, img, lab = _cifar_records(rng, i + 1, (10,))  # batches of different sizes
        (d / f"data_batch_{i}.bin").write_bytes(raw)
        imgs.append(img)
        labs.append(lab[:, 0])
    raw, timg, tlab = _cifar_records(rng, 4, (10,))
    (d / "test_batch.bin").write_bytes(raw)
    ds = load_dataset("cifar10", str(tmp_path if parent else d), normalize="none")
    assert ds.num_classes == 10 and ds.in_shape == (3, 32, 32)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.y_train, np.concatenate(labs))
    np.testing.assert_array_equal(ds.y_test, tlab[:, 0])
    np.testing.assert_allclose(ds.x_train * 255.0, np.concatenate(imgs), atol=1e-3)
    np.testing.assert_allclose(ds.x_test * 255.0, timg, atol=1e-3)
    # default normalisation: documented per-channel constants
    dn = load_dataset("cifar10", str(d))
    m = np.array(CIFAR10_MEAN, np.float32).reshape(1, 3, 1, 1)
    s = np.array(CIFAR10_STD, np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(dn.x_train, (np.concatenate(imgs) / 255.0 - m) / s, atol=1e-4)
    dt = load_dataset("cifar10", str(d), normalize="train", max_train=5)
    assert dt.x_train.shape[0] == 5
    np.testing.assert_allclose(dt.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-4)


def test_cifar_malformed(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for i in range(1, 6):
        (d / f"data_batch_{i}.bin").write_bytes(_cifar_records(rng, 2, (10,))[0])
    with pytest.raises(DatasetFileNotFoundError, match="test_batch.bin"):
        load_dataset("cifar10", str(tmp_path))
    good = _cifar_records(rng, 2, (10,))[0]
    (d / "test_batch.bin").write_bytes(good[:-1])
    with pytest.raises(DatasetError, match="test_batch.bin.*3073"):
        load_dataset("cifar10", str(tmp_path))
    (d / "test_batch.bin").write_bytes(bytes([10]) + good[1:])  # label out of range
    with pytest.raises(DatasetError, match="test_batch.bin"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DatasetFileNotFoundError, match="nowhere.*not a directory"):
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFileNotFoundError, match="data_batch_1.bin"):
        load_dataset("cifar10", str(tmp_path / "empty"))
    with pytest.raises(DatasetFileNotFoundError):
        load_dataset("cifar100", str(tmp_path))


def test_cifar100_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    raw, img, lab = _cifar_records(rng, 6, (20, 100))
    (d / "train.bin").write_bytes(raw)
    traw, timg, tlab = _cifar_records(rng, 3, (20, 100))
    (d / "test.bin").write_bytes(traw)
    fine = load_dataset("cifar100", str(tmp_path), normalize="none")
    assert fine.num_classes == 100
    np.testing.assert_array_equal(fine.y_train, lab[:, 1])
    np.testing.assert_array_equal(fine.y_test, tlab[:, 1])
    np.testing.assert_allclose(fine.x_train * 255.0, img, atol=1e-3)
    coarse = load_dataset("cifar100", str(d), label="coarse", normalize="none")
    assert coarse.num_classes == 20
    np.testing.assert_array_equal(coarse.y_train, lab[:, 0])
    (d / "test.bin").write_bytes(traw[:-3074 // 2])
    with pytest.raises(DatasetError, match="test.bin.*3074"):
        load_dataset("cifar100", str(d))


# ---------------------------------------------------------------------------- digits / lsq
def test_digits():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)  # round(0.2 * 1797)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.num_classes == 10 and ds.in_shape == (1, 8, 8)
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    assert load_dataset("digits", max_train=100).x_train.shape[0] == 100
    with pytest.raises(Exception):
        load_dataset("digits", bogus=1)


def test_lsq():
    ds = load_dataset("lsq", n_train=40, n_test=10, dim=6, seed=3)
    assert ds.num_classes == 0 and ds.in_shape == (6,) and ds.y_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train @ ds.x_star, ds.y_train, rtol=1e-5, atol=1e-5)
    sol = np.linalg.lstsq(ds.x_train.astype(np.float64), ds.y_train.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(sol, ds.x_star, atol=1e-4)
    assert np.array_equal(load_dataset("lsq", n_train=40, n_test=10, dim=6, seed=3).x_train, ds.x_train)
    assert set(DATASETS.names()) >= {"digits", "mnist", "cifar10", "cifar100", "lsq"}


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("size", [1, 3, 8])
def test_shards_disjoint_cover_and_deterministic(scheme, size):
    y = np.random.default_rng(5).integers(0, 10, size=1003).astype(np.int64)
    parts = [shard(y, r, size, scheme=scheme, alpha=0.3, seed=11) for r in range(size)]
    assert parts == parts and all(p.dtype == np.int64 for p in parts)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    if scheme == "iid":
        assert {len(p) for p in parts} == {1003 // size}
        assert len(allidx) == size * (1003 // size)
    else:
        assert np.array_equal(np.sort(allidx), np.arange(1003))  # cover
        assert min(len(p) for p in parts) >= 1
    again = partition(y, size, scheme, alpha=0.3, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(y, size, scheme, alpha=0.3, seed=12)
    if size > 1:
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_small_alpha_is_skewed_and_nonempty():
    y = np.repeat(np.arange(10), 100)
    skew = partition(y, 8, "dirichlet", alpha=0.05, seed=0)
    flat = partition(y, 8, "dirichlet", alpha=1000.0, seed=0)

    def dominant_share(parts):
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])

    assert dominant_share(skew) > 0.45
    assert dominant_share(flat) < 0.2
    # and most (rank, class) cells are (nearly) empty under small alpha
    counts = np.array([np.bincount(y[p], minlength=10) for p in skew])
    assert np.mean(counts <= 2) > 0.6
    # extreme: more ranks than a tiny alpha would fill; everyone still gets one sample
    tiny = partition(np.zeros(20, np.int64), 16, "dirichlet", alpha=0.01, seed=1)
    assert min(len(p) for p in tiny) >= 1
    assert np.array_equal(np.sort(np.concatenate(tiny)), np.arange(20))
    with pytest.raises(ValueError):
        partition(np.zeros(5, np.float32), 2, "dirichlet")
    with pytest.raises(ValueError):
        partition(np.zeros(3, np.int64), 4, "dirichlet")


# ---------------------------------------------------------------------------- BatchStream
def test_batchstream_epochs_and_resume():
    s = BatchStream(23, 5, seed=3, rank=2)
    assert s.steps_per_epoch == 4
    seen = []
    for _ in range(4):
        idx, e = s.next()
        assert e == 0 and len(idx) == 5
        seen.append(idx)
    ep0 = np.concatenate(seen)
    assert len(np.unique(ep0)) == 20 and ep0.max() < 23  # 3 dropped
    np.testing.assert_array_equal(ep0, np.random.default_rng([3, 2, 0]).permutation(23)[:20])
    assert s.next()[1] == 1
    state = s.state_dict()
    rest = [s.next() for _ in range(9)]
    r = BatchStream(23, 5, seed=3, rank=2)
    r.load_state_dict(state)
    for (a, ea), (b, eb) in zip(rest, [r.next() for _ in range(9)]):
        assert ea == eb and np.array_equal(a, b)
    assert BatchStream(23, 5, seed=3, rank=1).next()[0].tolist() != BatchStream(23, 5, seed=3, rank=2).next()[0].tolist()
    with pytest.raises(ValueError):
        BatchStream(23, 5, seed=4, rank=2).load_state_dict(state)
    with pytest.raises(ValueError):
        BatchStream(4, 5)


def test_digits_written_as_cifar_load_back_exactly(tmp_path):
    """scripts/digits_as_cifar.py: the cifar10 loader reads back the digits split, every 8x8
    pixel v as a 4x4 block of v*255//16 in all three planes, labels unchanged."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "digits_as_cifar", Path(__file__).resolve().parent.parent / "scripts" / "digits_as_cifar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write(str(tmp_path))
    from qprsgd.datasets import cifar10, digits
    c = cifar10(str(tmp_path), normalize="none")
    g = digits()
    assert c.x_train.shape == (len(g.y_train), 3, 32, 32) and c.x_test.shape == (len(g.y_test), 3, 32, 32)
    assert np.array_equal(c.y_train, g.y_train) and np.array_equal(c.y_test, g.y_test)
    for cx, gx in ((c.x_train, g.x_train), (c.x_test, g.x_test)):
        v = np.rint(gx[:, 0] * 16).astype(np.int64) * 255 // 16                 # (N, 8, 8) bytes
        want = np.repeat(np.repeat(v, 4, axis=1), 4, axis=2).astype(np.float32) * np.float32(1.0 / 255.0)
        for ch in range(3):
            assert np.array_equal(cx[:, ch], want)
