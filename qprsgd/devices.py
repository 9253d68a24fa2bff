"""Where an algorithm's arrays live, and the only way they cross to the host (issue 19).

One code path for every device.  An algorithm works on ``x``, the model's flat parameter buffer,
and on the gradient buffer, *as arrays of the model's device*: numpy arrays on the CPU, CuPy
arrays on a CUDA GPU (zero-copy views of torch's buffers through DLPack), or :class:`SimArray`
under ``run.device: sim``.  Algorithms allocate their state with the module of their ``x``
(``self.xp``: :func:`array_module`), so the code the CPU tests run is the code a GPU runs.

``sim`` is the GPU path on the CPU, for CI (no GPU there).  A :class:`SimArray` is backed by host
memory but behaves as a CuPy array does where it matters: it refuses to be turned into a numpy
array implicitly (``np.asarray``/``__array__`` raise ``TypeError``), refuses to be mixed with numpy
arrays in one operation, and crosses to the host only through :func:`to_host` / ``.get()``.  So
an algorithm that would silently copy to the host, or would break on CuPy because it mixes a
host array into device arithmetic, fails under ``sim`` in CI; and a ``sim`` run's iterates, bits
and log equal the CPU run's bit for bit (tests/test_devices.py).  What ``sim`` cannot show:
CuPy's own kernels (the CUDA codec kernels are checked in numba's simulator instead,
tests/test_codecs_cuda.py), streams, and timing.

What crosses to the host is decided by the transport (:class:`qprsgd.transport.Staged`): payload
bytes and the float vectors of the uncompressed algorithms, through pinned host buffers, each
copy counted in the ledger (``copy_bytes``, ``copy_seconds``).
"""
from __future__ import annotations

import functools
import time
import numbers
from typing import Any, Optional

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

DEVICES = ("cpu", "cuda", "sim", "cuda_host")


class DeviceMixError(TypeError):
    """A host numpy array met a device array in one operation, or a device array was turned into
    a host array implicitly (CuPy raises ``TypeError`` in both cases; so does :class:`SimArray`)."""


# ------------------------------------------------------------------------------------------
# the device simulator

def _unwrap(v: Any, what: str) -> Any:
    """SimArray -> its backing array; numpy arrays refused (device code must not see them);
    scalars, dtypes, tuples/lists (recursively) and None pass."""
    if isinstance(v, SimArray):
        return v._a
    if isinstance(v, np.ndarray):
        raise DeviceMixError(f"{what}: a host numpy array (shape {v.shape}) mixed with device "
                             "arrays; move it with xp.asarray(...) first")
    if isinstance(v, (tuple, list)):
        return type(v)(_unwrap(u, what) for u in v)
    if isinstance(v, dict):
        return {k: _unwrap(u, what) for k, u in v.items()}
    return v


def _wrap(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return SimArray(v)
    if isinstance(v, tuple):
        return tuple(_wrap(u) for u in v)
    if isinstance(v, list):
        return [_wrap(u) for u in v]
    return v


class SimArray(NDArrayOperatorsMixin):
    """A device array of the ``sim`` device: host memory that behaves like a CuPy array.

    Arithmetic, ufuncs (``np.multiply(a, b, out=c)``), numpy functions (``np.tile``,
    ``np.concatenate``...), slicing and views work among SimArrays and scalars and give
    SimArrays; a numpy array in the mix raises :class:`DeviceMixError`, as does
    ``np.asarray(a)``.  Reading an element gives a 0-d SimArray (``float(a[i])`` converts, as
    on CuPy).  ``get()`` is the explicit copy to the host."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a: np.ndarray):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"SimArray wraps a numpy array, got {type(a).__name__}")
        self._a = a

    # -- crossing to the host: explicit only -----------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise DeviceMixError("implicit conversion of a device array to a host numpy array; "
                             "use qprsgd.devices.to_host(a) (CuPy: a.get())")

    def get(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        if out is None:
            return self._a.copy()
        out[...] = self._a
        return out

    # -- numpy protocols ---------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"np.{ufunc.__name__}"
        args = _unwrap(inputs, what)
        kw = _unwrap(kwargs, what)
        return _wrap(getattr(ufunc, method)(*args, **kw))

    def __array_function__(self, func, types, args, kwargs):
        what = f"np.{func.__name__}"
        return _wrap(func(*_unwrap(args, what), **_unwrap(kwargs, what)))

    # -- the ndarray surface -----------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: SimArray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self._a)))

    def __getitem__(self, key):
        r = self._a[_unwrap(key, "indexing")]
        return SimArray(r if isinstance(r, np.ndarray) else np.asarray(r))

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "indexing")] = _unwrap(value, "assignment")

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"SimArray({self._a!r})"

    def __getattr__(self, name):
        if name.startswith("__"):   # no __array_interface__ / __array_struct__: no implicit host view
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        @functools.wraps(attr)
        def method(*args, **kwargs):
            return _wrap(attr(*_unwrap(args, f".{name}()"), **_unwrap(kwargs, f".{name}()")))
        return method

    def __reduce__(self):  # pickling is a host copy: refuse, as for every other implicit one
        raise DeviceMixError("a device array cannot be pickled; copy it with to_host() first")


class _SimModule:
    """The array module of SimArrays (what ``cupy`` is to CuPy arrays): numpy's functions, taking
    and returning SimArrays.  ``asarray``/``array`` of host data is the explicit host-to-device
    copy (as ``cupy.asarray``)."""

    __name__ = "qprsgd.devices.sim"

    def asarray(self, a, dtype=None):
        if isinstance(a, SimArray):
            return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
        return SimArray(np.array(a, dtype=dtype, copy=True))

    def array(self, a, dtype=None, copy=True):
        if isinstance(a, SimArray):
            return SimArray(np.array(a._a, dtype=dtype, copy=True))
        return SimArray(np.array(a, dtype=dtype, copy=True))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr

        @functools.wraps(attr)
        def fn(*args, **kwargs):
            return _wrap(attr(*_unwrap(args, f"xp.{name}"), **_unwrap(kwargs, f"xp.{name}")))
        return fn


sim = _SimModule()


# ------------------------------------------------------------------------------------------
# the array module of an array, and the explicit crossings

def array_module(a: Any):
    """numpy, cupy or :data:`sim`: the module that allocates and computes next to ``a``."""
    if isinstance(a, SimArray):
        return sim
    if isinstance(a, np.ndarray) or a is None or isinstance(a, numbers.Number):
        return np
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy
    return np


def is_device(a: Any) -> bool:
    """True for device arrays (CuPy, SimArray), False for numpy arrays and scalars."""
    return isinstance(a, SimArray) or (not isinstance(a, np.ndarray)
                                       and hasattr(a, "__cuda_array_interface__"))


def to_host(a: Any, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The explicit device-to-host copy (into ``out`` when given); a numpy array is returned as
    it is (or copied into ``out``)."""
    if isinstance(a, np.ndarray):
        if out is None:
            return a
        out[...] = a
        return out
    if isinstance(a, SimArray):
        return a.get(out)
    return a.get(out=out) if out is not None else a.get()


def to_device(h: np.ndarray, like: Any, out: Any = None):
    """The explicit host-to-device copy of ``h`` onto ``like``'s device (into ``out`` when given)."""
    xp = array_module(like)
    if out is None:
        return np.array(h, copy=True) if xp is np else xp.asarray(h)
    if isinstance(out, np.ndarray):
        out[...] = h
    elif isinstance(out, SimArray):
        out._a[...] = h
    else:
        out.set(h)
    return out


def check_device(name: str) -> str:
    if name not in DEVICES:
        raise ValueError(f"run.device must be one of {', '.join(DEVICES)}, got {name!r}")
    return name


def gpu_for_rank(local_rank: int, local_size: int, n_gpus: int, share: bool) -> int:
    """The GPU of a rank on its node: ``local_rank``, one rank per GPU.

    A node with fewer visible GPUs than ranks is refused (ranks sharing a GPU measure each
    other's kernels, not the algorithm) unless ``share`` (``run.share_gpus``: deliberate
    oversubscription, e.g. a benchmark at 2 ranks on one GPU), then round-robin."""
    if n_gpus < 1:
        raise ValueError("run.device: 'cuda' but this node has no visible CUDA device; "
                         "use run.device: cpu")
    if local_size > n_gpus and not share:
        raise ValueError(f"run.device 'cuda': {local_size} ranks on this node but only {n_gpus} "
                         f"visible GPU(s); start at most {n_gpus} rank(s) per node, or set "
                         "run.share_gpus: true to run several ranks per GPU on purpose")
    return local_rank % n_gpus


class Stager:
    """The host/device copies of one rank (``run.device`` cuda or sim), counted in its ledger.

    ``down(a)``: a device array into a fresh host buffer (page-locked on a GPU, from CuPy's
    pinned pool, so MPI and the DMA engine read it directly), after the device's stream has
    finished writing it; host arrays pass uncounted.  ``up(h)``: a host array onto the device.
    Buffers live as long as their references (the transport keeps a payload until its send
    completes), so nothing is reused while MPI may still read it."""

    def __init__(self, kind: str, ledger):
        if kind not in ("cuda", "sim"):
            raise ValueError(f"Stager: kind must be 'cuda' or 'sim', got {kind!r}")
        self.kind = kind
        self.ledger = ledger
        if kind == "cuda":
            import cupy
            import cupyx

            self._xp, self._pinned = cupy, cupyx.empty_pinned
        else:
            self._xp, self._pinned = sim, np.empty

    def sync(self) -> None:
        """Wait for the device's work so far (torch's and CuPy's kernels share the null stream)."""
        if self.kind == "cuda":
            self._xp.cuda.get_current_stream().synchronize()

    def down(self, a):
        if not is_device(a):
            return a
        t = time.perf_counter()
        self.sync()
        h = self._pinned(a.shape, dtype=a.dtype)
        to_host(a, out=h)
        self.ledger.add_copy(h.nbytes, time.perf_counter() - t, down=True)
        return h

    def up(self, h: np.ndarray):
        t = time.perf_counter()
        d = self._xp.asarray(h)
        self.ledger.add_copy(h.nbytes, time.perf_counter() - t, down=False)
        return d

    def up_into(self, h: np.ndarray, out) -> None:
        t = time.perf_counter()
        to_device(h, out, out=out)
        self.ledger.add_copy(h.nbytes, time.perf_counter() - t, down=False)


def data_ptr(a: Any) -> int:
    """The address of ``a``'s first element (numpy, SimArray: host; CuPy: device)."""
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    if isinstance(a, SimArray):
        return a._a.ctypes.data
    return int(a.data.ptr)
