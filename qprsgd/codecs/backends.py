"""Where a codec's kernels run, chosen once, when the codec is built.

Every codec family states its wire format once (its module docstring and docs/codecs.md) and
has one *backend object* per place its kernels can run; all of them produce byte-identical
payloads and identical decoded vectors for the same input and draws (tests/test_codecs_*.py).

  ``numpy``  the vectorized reference, written against the codec's array module ``xp`` (it also
             runs on CuPy arrays, one kernel launch per array operation)
  ``numba``  compiled CPU kernels (``_nb_*.py``), some on up to ``threads`` threads
  ``cuda``   CUDA Python kernels (``_cuda_*.py``, numba-cuda); inputs with
             ``__cuda_array_interface__`` (CuPy, torch) or, under the simulator
             (``NUMBA_ENABLE_CUDASIM=1``), numpy arrays

A codec takes ``backend=`` (``"auto"`` or one of the above) and ``threads=`` (numba: threads per
codec call; the others ignore it) as constructor arguments; the experiment passes
``run.codec_threads``.  ``"auto"`` is ``numba`` for numpy arrays when numba imports (and
``QPRSGD_NO_NUMBA`` is not ``1``: a user's switch, read here and nowhere else), else ``numpy``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import numpy as np

KINDS = ("numpy", "numba", "cuda")


@functools.lru_cache(maxsize=None)
def numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # pragma: no cover - numba is an install requirement
        return False
    return True


def auto_backend(xp: Any) -> str:
    """The backend ``"auto"`` stands for with array module ``xp``."""
    if xp is np and numba_importable() and os.environ.get("QPRSGD_NO_NUMBA", "") != "1":
        return "numba"
    return "numpy"


def check_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or int(threads) < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return int(threads)


def pick(name: str, impls: Mapping[str, type], backend: str, xp: Any) -> tuple[str, type]:
    """(resolved backend name, backend class) for codec ``name`` among its ``impls``; ValueError
    naming ``backend`` and what is allowed when the family has no such backend."""
    if backend == "auto":
        backend = auto_backend(xp)
        if backend not in impls:
            backend = "numpy"
    if backend not in KINDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(KINDS)}, got {backend!r}")
    if backend not in impls:
        raise ValueError(f"{name}: backend {backend!r} is not implemented for this codec; "
                         f"allowed: auto, {', '.join(sorted(impls))}")
    if backend == "numba" and (xp is not np or not numba_importable()):
        raise ValueError(f"{name}: backend 'numba' needs numpy arrays (xp=numpy) and numba")
    return backend, impls[backend]
