"""Gradient buckets: the flat gradient handed to an algorithm piece by piece, as backward
produces it (issue 16: hide communication behind backward, as torch DDP's reducer does).

The flat gradient (``models.FlatParams.grad``, parameters in ``named_parameters`` order) is cut
into contiguous ranges ``[lo, hi)``.  Backward produces the gradients of the last layers first,
so the buckets are formed walking the parameters *backwards*: bucket 0 holds the last
parameters (the highest offsets), and a bucket is closed before it would exceed ``cap_bytes``
(a parameter larger than the cap is a bucket of its own).

During one backward pass (between :meth:`GradBuckets.begin` and :meth:`GradBuckets.end`) a
post-accumulate-grad hook on each parameter counts down its bucket; a bucket whose parameters
all have their gradient is handed to the callback ``on_bucket(lo, hi)`` -- **strictly in bucket
order** (a bucket that completes early waits for the ones before it), so every rank posts its
transport operations in the same sequence whatever order autograd ran the hooks in.
:meth:`end` hands over every bucket not delivered yet (a parameter that got no gradient this
step, or hooks disabled): each bucket reaches the callback exactly once per pass.

Decisions: a cap of 0 means one bucket delivered by :meth:`end` (today's contract: the whole
gradient after backward).  Hooks off (``hooks=False``): every bucket is delivered by
:meth:`end` -- same buckets, no overlap; the experiment decides (``experiment.bucket_hooks``):
off for ``run.device: cuda_host`` (the algorithm's gradient is a host copy made after
backward).  On a GPU the loop runs backward on its own thread
(``torch.autograd.set_multithreading_enabled(False)``; autograd would otherwise run the hooks
on its device thread), so the hooks and the MPI calls they make stay on the main thread; the
``ready`` callback (a device wait, ``Placement.bucket_ready``) makes the buckets' values final
before a hook delivers them.  :attr:`GradBuckets.hooked` counts the deliveries made from hooks
(tests check that overlap happened, not just that buckets were used).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

BucketFn = Callable[[int, int], None]


def cap_bytes(bucket_mb: float) -> int:
    """``train.bucket_mb`` as the byte cap of :func:`plan` (MB = 2^20 bytes)."""
    return int(bucket_mb * 2 ** 20)


def plan(blocks: Sequence[int], cap_bytes: int, itemsize: int = 4) -> list[tuple[int, int, tuple[int, ...]]]:
    """The buckets of a flat vector made of parameter blocks (sizes ``blocks``, in order):
    ``[(lo, hi, parameter indices)]``, bucket 0 ending at the last parameter.  ``cap_bytes`` <= 0:
    one bucket.  Pure; raises ValueError on an empty or non-positive block."""
    blocks = [int(b) for b in blocks]
    if not blocks or any(b <= 0 for b in blocks):
        raise ValueError(f"blocks must be positive sizes, got {blocks!r}")
    offsets = [0]
    for b in blocks:
        offsets.append(offsets[-1] + b)
    d = offsets[-1]
    if cap_bytes <= 0:
        return [(0, d, tuple(range(len(blocks))))]
    out = []
    members: list[int] = []
    size = 0
    for i in reversed(range(len(blocks))):
        nbytes = blocks[i] * itemsize
        if members and size + nbytes > cap_bytes:
            out.append((offsets[members[-1]], offsets[members[0] + 1], tuple(reversed(members))))
            members, size = [], 0
        members.append(i)
        size += nbytes
    out.append((offsets[members[-1]], offsets[members[0] + 1], tuple(reversed(members))))
    return out


class GradBuckets:
    """Hooks on ``params`` (torch parameters, ``blocks`` their sizes, same order) that deliver
    the buckets of :func:`plan` during backward.  ``hooks=False``: no hooks: every bucket is
    delivered by :meth:`end`.  ``poke``: called at every hook (e.g. ``Transport.progress``, so
    that the reductions already posted advance while backward computes).  ``ready``: called by a
    hook before it delivers buckets (once per delivery batch; not by :meth:`end`, which runs
    after backward has finished)."""

    def __init__(self, params: Sequence, blocks: Sequence[int], cap_bytes: int, hooks: bool = True,
                 poke: Optional[Callable[[], None]] = None, ready: Optional[Callable[[], None]] = None):
        if len(params) != len(blocks):
            raise ValueError(f"params ({len(params)}) and blocks ({len(blocks)}) differ in length")
        self.ranges = plan(blocks, cap_bytes)
        self._owner = [0] * len(blocks)
        for b, (_, _, members) in enumerate(self.ranges):
            for i in members:
                self._owner[i] = b
        self._sizes = [len(m) for _, _, m in self.ranges]
        self._poke = poke
        self._ready = ready
        self._cb: Optional[BucketFn] = None
        self.hooked = 0              # buckets delivered from hooks, since construction
        self._handles = []
        if hooks and len(self.ranges) > 1:
            for i, p in enumerate(params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook_for(i)))

    def __len__(self) -> int:
        return len(self.ranges)

    def _hook_for(self, i: int):
        def hook(_param):
            if self._cb is None:
                return
            b = self._owner[i]
            self._left[b] -= 1
            if self._left[b] == 0 and b == self._next:   # bucket b completes the next in order
                if self._ready is not None:
                    self._ready()
                self.hooked += self._drain()
            if self._poke is not None:
                self._poke()
        return hook

    def _drain(self) -> int:
        """Deliver the buckets that are complete and next in order; how many."""
        n = 0
        while self._next < len(self.ranges) and self._left[self._next] <= 0:
            lo, hi, _ = self.ranges[self._next]
            self._next += 1
            n += 1
            self._cb(lo, hi)
        return n

    def begin(self, on_bucket: BucketFn) -> None:
        """Start a backward pass whose buckets go to ``on_bucket(lo, hi)``."""
        self._cb = on_bucket
        self._left = list(self._sizes)
        self._next = 0

    def end(self) -> None:
        """After backward: deliver every bucket not delivered yet, in order; close the pass."""
        if self._cb is None:
            return
        try:
            self._left = [0] * len(self.ranges)
            self._drain()
        finally:
            self._cb = None

    def abort(self) -> None:
        """Close the pass without delivering (backward raised)."""
        self._cb = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def oracle(fn: Callable[[], "object"], ranges: Optional[Sequence[tuple[int, int]]] = None):
    """A gradient function ``fn()`` (no buckets: tests, single-process references) made into the
    algorithms' oracle contract (``algorithms.base.GradFn``): ``grad(on_bucket=f)`` computes g,
    then calls ``f(g, lo, hi)`` for each of ``ranges`` (default: one bucket, the whole vector) in
    order, and returns g."""
    def grad(on_bucket=None):
        g = fn()
        if on_bucket is not None:
            for lo, hi in (ranges if ranges is not None else [(0, len(g))]):
                on_bucket(g, lo, hi)
        return g
    return grad
