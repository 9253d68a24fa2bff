"""Divergence: a run whose loss or model is non-finite, or whose loss explodes, is stopped.

A diverged run is a research result (this learning rate is too large for this algorithm), not a
crash: ``qprsgd run`` exits with :data:`EXIT_DIVERGED` (3) and one message naming the step, the
loss and the learning rate; run.h5 keeps every row up to and including the offending one,
``completed`` stays false and the attrs ``diverged`` / ``divergence`` say what happened;
``qprsgd sweep`` marks the run ``diverged``.

:class:`Detector` is called at every metrics row (every ``train.log_every`` steps) on every rank
with values that are identical on every rank (the reduced mean training loss, and one MAX
reduction of "is my model finite"), so every rank reaches the same verdict at the same step and
raises :class:`Diverged` together -- no rank is left waiting.  The rule:

* the mean training loss of the row is NaN or ±inf, or
* some worker's parameters hold a NaN or ±inf, or
* the loss exceeds ``factor`` (default 1e4) times the reference loss, ``max(reference, floor)``
  (the floor keeps a reference near 0 from making every later wobble an "explosion").  The
  reference is the untrained model's test loss (the evaluation at step 0, given by
  :meth:`Detector.reference`); a resumed run, which does not evaluate at its first step, uses its
  first row's training loss.  No SGD run that is making progress logs a loss ten thousand times
  its starting loss.

A rank whose codec or algorithm raises on non-finite numbers between two rows is caught by
:func:`explain`: ``qprsgd run`` reports it as divergence (exit 3) when that rank's model is no
longer finite.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

EXIT_DIVERGED = 3


class Diverged(RuntimeError):
    """Raised on every rank at the same step; ``str()`` is the one message printed."""

    def __init__(self, step: int, loss: float, lr: float, reason: str):
        self.step, self.loss, self.lr, self.reason = int(step), float(loss), float(lr), reason
        super().__init__(f"the run diverged at step {self.step}: {reason} (train loss {self.loss:.6g}, "
                         f"lr {self.lr:.6g}); try a smaller train.lr")


class Detector:
    def __init__(self, factor: float = 1e4, floor: float = 1e-3):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
        if not (math.isfinite(floor) and floor > 0):
            raise ValueError(f"floor must be a finite number > 0, got {floor!r}")
        self.factor = float(factor)
        self.floor = float(floor)
        self.first: Optional[float] = None

    def reference(self, loss: float) -> None:
        """The starting loss the explosion test compares with (ignored unless finite)."""
        if math.isfinite(float(loss)):
            self.first = float(loss)

    def verdict(self, step: int, loss: Optional[float], lr: float, model_finite: bool) -> Optional[Diverged]:
        """The verdict for one metrics row from values every rank shares (None: carry on).
        ``loss`` None: no gradient was computed in this row; only the model is checked."""
        if not model_finite:
            return Diverged(step, float("nan") if loss is None else loss, lr,
                            "a worker's parameters are no longer finite (NaN or inf)")
        if loss is None:
            return None
        loss = float(loss)
        if not math.isfinite(loss):
            return Diverged(step, loss, lr, "the training loss is not finite")
        if self.first is None:
            self.first = loss
            return None
        limit = self.factor * max(self.first, self.floor)
        if loss > limit:
            return Diverged(step, loss, lr, f"the training loss exploded above {self.factor:g} x the "
                                            f"starting loss {self.first:.6g}")
        return None

    def check(self, step: int, loss: Optional[float], lr: float, x: Optional[np.ndarray], comm) -> None:
        """Every rank, at a metrics row: agree (one MAX reduction) whether some model is not
        finite, then raise :class:`Diverged` on every rank if the row diverged."""
        bad_here = 0.0 if x is None or bool(np.isfinite(x).all()) else 1.0
        bad = comm.allreduce_scalars([bad_here], op="max")[0] > 0
        v = self.verdict(step, loss, lr, not bad)
        if v is not None:
            raise v


def explain(exc: BaseException, x: Optional[np.ndarray], step: int, lr: float) -> Optional[Diverged]:
    """An exception raised during training on one rank, whose model is no longer finite, is
    divergence (e.g. a codec refusing a NaN norm); returns the Diverged to report, else None."""
    if isinstance(exc, Diverged):
        return exc
    if x is not None and not bool(np.isfinite(x).all()):
        return Diverged(step, float("nan"), lr, f"the model became non-finite and the step failed "
                                                f"({type(exc).__name__}: {str(exc)[:200]})")
    return None
