"""Compile (or load from numba's on-disk cache) the codecs' numba kernels: ``python
tests/warm_numba.py GROUP`` in a subprocess, or :func:`warm` in-process (tests/conftest.py runs
the two groups at once, one per core).  Every registered codec at a small d on 1 and 2 threads,
and the Elias-gamma family at d = 2^17 on 2 threads, where its parallel kernels take over
(``par_min_d``)."""
from __future__ import annotations

import sys

PARAMS = {"topk": {"k": 8}, "randk": {"k": 8}, "bernoulli_p": {"p": 0.5}}
PARALLEL = ("qsgd", "qsgd_scaled", "qsgd_runlength")
# two groups of about equal compile time (cold, each alone: 17 s and 19 s on the 2-core machine;
# both at once: 20.5 s, where one after the other took 20 s for 31 kernels + ~10 s in the tests)
GROUP_A = ("qsgd_ans", "block_sign", "qsgd", "qsgd_scaled")


def warm(group: str) -> None:
    from qprsgd.registry import CODECS

    names = [n for n in CODECS.names() if (n in GROUP_A) == (group == "a")]
    for name in names:
        for threads in (1, 2):
            CODECS.get(name).factory(4096, None, threads=threads, **PARAMS.get(name, {})).warmup()
    if group == "b":
        for name in PARALLEL:
            CODECS.get(name).factory(1 << 17, None, threads=2).warmup()


if __name__ == "__main__":
    warm(sys.argv[1])
