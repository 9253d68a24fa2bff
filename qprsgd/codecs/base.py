"""The codec contract.

A codec is configured once for a vector length ``d`` (and, for blockwise codecs, the block
layout) and then maps a float32 vector to a :class:`Payload` -- the exact bytes that cross MPI --
and back.  What an algorithm "sends" is ``payload.data``; comm counts those bytes.

Bit accounting: ``payload.nbits`` is the codec's exact, *unpadded* bit count (the formula in
docs/codecs.md); ``payload.data`` holds ``ceil(nbits / 8)`` bytes, MSB-first, zero-padded to a
whole byte.  The logger reports the bytes handed to MPI (``8 * len(data)``), so the <= 7 padding
bits per message are counted on the wire; the unpadded figure is kept as ``payload_bits``.

Decoding is defensive: any malformed buffer (truncated, extended, random bytes, impossible
code lengths, wrong d) raises :class:`CodecError` -- never another exception, never a hang,
never an allocation that is not bounded by ``d``.

``decode(data, out=None)``: by default a fresh float32 vector of length d is returned.  With
``out`` (a C-contiguous, writable float32 vector of length d of the codec's array module) the
decoded vector is written into ``out`` and ``out`` is returned: a caller that decodes every step
reuses one buffer and skips the page faults of a fresh 4 d-byte allocation (~10 ms for d = 10M
on the 2-core machine).  When decoding raises :class:`CodecError`, the contents of ``out`` are
unspecified (it may be partly written).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from . import backends


class CodecError(ValueError):
    """A payload that cannot be decoded, or an input that cannot be encoded (NaN/Inf)."""


@dataclass(frozen=True)
class Payload:
    """Bytes to send (a 1-D uint8 array of the codec's array module) and their exact bit count."""

    data: Any
    nbits: int

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class Codec:
    """Base class.  Subclasses set ``name``, ``unbiased`` and implement ``encode``/``decode``.

    ``unbiased``: E[decode(encode(x))] == x.  Algorithms that need an unbiased compressor
    (DCD-PSGD, ECD-PSGD) refuse codecs with ``unbiased = False`` at config time.
    ``deterministic``: encode uses no random draws.
    """

    name: str = "codec"
    unbiased: bool = True
    deterministic: bool = False

    #: backend name -> backend class of this codec family (see :mod:`.backends`); a codec whose
    #: family has a single vectorized implementation leaves this empty and runs it inline.
    IMPLS: dict = {}

    def __init__(self, d: int, blocks: Optional[Sequence[int]] = None, xp: Any = np, *,
                 backend: str = "auto", threads: int = 1):
        if int(d) < 1:
            raise ValueError(f"d must be >= 1, got {d!r}")
        self.d = int(d)
        self.blocks = tuple(int(b) for b in blocks) if blocks is not None else (self.d,)
        if sum(self.blocks) != self.d or any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks must be positive sizes summing to d={self.d}")
        self.xp = xp
        self.threads = backends.check_threads(threads)
        impls = self.IMPLS or {"numpy": None}
        self._backend, self._impl_cls = backends.pick(self.name, impls, backend, xp)
        self.impl = None  # built by the subclass (``_make_impl``) once its parameters are set
        self._tls = threading.local()

    @property
    def backend(self) -> str:
        """The backend the codec's kernels run on (fixed at construction)."""
        return self._backend

    def _make_impl(self):
        if self._impl_cls is not None:
            self.impl = self._impl_cls(self)

    def _thread_scratch(self) -> dict:
        """Reusable scratch arrays owned by the codec, one set per calling thread: a codec may be
        shared by threads that encode/decode concurrently (the tests' in-process clusters)."""
        d = getattr(self._tls, "scratch", None)
        if d is None:
            d = self._tls.scratch = {}
        return d

    def warmup(self) -> None:
        """Run one encode and one decode of a length-d vector, so one-off costs (numba's JIT
        compile or cache load, the thread pool's start, first-touch page faults of the scratch
        buffers) are paid while the experiment is built and not inside the first timed step.

        Uses its own generator (``default_rng(0)``), never the caller's, so the draws of the run
        are unchanged; a codec holds no state between calls, so nothing else changes either."""
        xp = self.xp
        x = xp.linspace(-1.0, 1.0, self.d, dtype=xp.float32)
        p = self.encode(x, np.random.default_rng(0))
        self.decode(p.data, out=xp.empty(self.d, dtype=xp.float32))

    def encode(self, x, rng=None) -> Payload:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, data, out=None) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def roundtrip(self, x, rng=None):
        """``decode(encode(x))`` and the payload: what the receivers will see."""
        p = self.encode(x, rng)
        return self.decode(p.data), p

    # helpers shared by codecs ------------------------------------------------------------
    def _check_input(self, x):
        xp = self.xp
        if x.ndim != 1 or x.shape[0] != self.d:
            raise CodecError(f"{self.name}: expected a vector of length d={self.d}, got shape {tuple(x.shape)}")
        if not bool(xp.isfinite(x).all()):
            raise CodecError(f"{self.name}: cannot encode a vector holding NaN or Inf")
        return x.astype(xp.float32, copy=False)

    def _out(self, out, zero: bool = False):
        """The output vector: ``out`` validated (ValueError naming it otherwise), or a fresh
        float32 vector of length d (zero-filled when ``zero``)."""
        xp = self.xp
        if out is None:
            return xp.zeros(self.d, dtype=xp.float32) if zero else xp.empty(self.d, dtype=xp.float32)
        if not isinstance(out, xp.ndarray):
            raise ValueError(f"{self.name}: out must be a {xp.__name__} array, got {type(out).__name__}")
        if out.dtype != xp.float32 or out.ndim != 1 or out.shape[0] != self.d:
            raise ValueError(f"{self.name}: out must be a float32 vector of length d={self.d}, "
                             f"got {out.dtype} with shape {tuple(out.shape)}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"{self.name}: out must be C-contiguous and writable")
        if zero:
            out.fill(0)
        return out

    def _as_bytes(self, data):
        xp = self.xp
        if isinstance(data, Payload):
            data = data.data
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = np.frombuffer(data, dtype=np.uint8)
            if xp is not np:
                data = xp.asarray(data)
        if getattr(data, "dtype", None) != xp.uint8 or data.ndim != 1:
            raise CodecError(f"{self.name}: payload must be a 1-D uint8 buffer")
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d})"
