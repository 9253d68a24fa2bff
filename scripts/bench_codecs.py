#!/usr/bin/env python
"""Steady-state codec throughput and break-even bandwidth.

For each codec, on a d-element float32 Gaussian vector (default 10M) and on a ResNet-18-sized
one (d = 11,173,962, block_sign blocks = the 62 parameter tensors of the CIFAR ResNet-18),
reports the best of ``--repeat`` encode and decode times (after one warm-up call, so buffers
are reused), GB/s of float32 input, the ratio to numpy memcpy GB/s measured in the same run,
bits/element and the break-even bandwidth B* = (32 d - nbits) / (t_enc + t_dec): on a link
slower than B* compressing saves wall time.

    .venv/bin/python scripts/bench_codecs.py [--d 10000000] [--repeat 5] [--codecs qsgd,sign]
                                             [--xp numpy|cupy]
                                             [--backend default|numpy|numba|both|cuda]

Decode is measured into a reused output buffer (``codec.decode(data, out=buf)``, steady state:
no fresh 4 d-byte allocation and its page faults per call); ``--fresh`` also times the default
``decode(data)`` that returns a fresh array (column ``t_dec fresh``).  ``--threads 1,2`` runs
the numba codecs (qsgd, qsgd_scaled, qsgd_ans, block_sign, sign) once per thread count (the codec's
``threads=`` argument; default 2).

The ``backend`` column says which kernels ran (the codec's ``backend=`` argument): ``default``
is ``auto`` (numba for numpy arrays when numba imports, else numpy); ``both`` runs every codec
that has a numba backend on numba and numpy; ``cuda`` builds every codec with ``backend="cuda"``
on CuPy arrays (needs a GPU and CuPy; codecs without a CUDA backend are listed as skipped).
``topk`` also prints its ratio to the previous ``argpartition`` selection measured in the same
run.  Do not pin it to one core
(the threaded rows need two); on a busy machine repeat it and compare the ratio columns: memcpy
is measured in the same run.  All vectors here fit in a large L3 on the 2-core machine, so these
are cache-warm steady-state figures.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from qprsgd.registry import CODECS


def resnet18_blocks(num_classes: int = 10) -> list[int]:
    """Sizes of the 62 parameter tensors of the CIFAR ResNet-18 (3x3 stem, BasicBlocks
    [2, 2, 2, 2], 1x1 shortcut conv + BN where the shape changes, BN weight and bias separate)."""
    sizes = [3 * 64 * 9, 64, 64]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for blk in range(2):
            c0 = cin if blk == 0 else cout
            sizes += [c0 * cout * 9, cout, cout, cout * cout * 9, cout, cout]
            if blk == 0 and (stride != 1 or c0 != cout):
                sizes += [c0 * cout, cout, cout]
        cin = cout
    sizes += [512 * num_classes, num_classes]
    assert len(sizes) == 62 and sum(sizes) == 11_173_962, (len(sizes), sum(sizes))
    return sizes


CONFIGS = [("identity", {}), ("qsgd", {}), ("qsgd_scaled", {}), ("qsgd_runlength", {}),
           ("qsgd_ans", {}),
           ("stochastic_bits", {"b": 8}), ("stochastic_bits", {"b": 4}), ("sign", {}),
           ("block_sign", {}), ("topk", {"ratio": 0.01}), ("randk", {"ratio": 0.01}),
           ("bernoulli_p", {"p": 0.01})]


def best(f, repeat, sync):
    f()
    sync()
    t = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = f()
        sync()
        t = min(t, time.perf_counter() - t0)
    return t, r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--codecs", default=None, help="comma-separated codec names (default: all)")
    ap.add_argument("--xp", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18-sized vector")
    ap.add_argument("--backend", default="default",
                    choices=["default", "numpy", "numba", "both", "cuda"],
                    help="numpy/numba/cuda: that backend only; both: numba and numpy rows")
    ap.add_argument("--threads", default=None,
                    help="comma-separated codec thread counts for the numba codecs (default: 2)")
    ap.add_argument("--fresh", action="store_true",
                    help="also time decode into a fresh array (the default decode)")
    a = ap.parse_args(argv)
    tlist = [int(t) for t in a.threads.split(",")] if a.threads else [2]
    if a.backend == "cuda":
        a.xp = "cupy"
    if a.xp == "cupy":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
    else:
        xp, sync = np, (lambda: None)
    wanted = set(a.codecs.split(",")) if a.codecs else None
    cases = [("gauss", a.d, None)]
    if not a.no_resnet:
        rb = resnet18_blocks()
        cases.append(("resnet18", sum(rb), rb))
    for label, d, blocks in cases:
        x = xp.asarray(np.random.default_rng(0).standard_normal(d).astype(np.float32))
        y = xp.empty_like(x)
        t_cp, _ = best(lambda: xp.copyto(y, x), a.repeat, sync)
        mc = 4 * d / t_cp / 1e9
        print(f"\n## {label}: d = {d:,}  ({a.xp}; numpy memcpy {mc:.2f} GB/s, best of {a.repeat})")
        print("| codec | params | backend | threads | bits/elem | enc GB/s | dec GB/s | enc/memcpy |"
              " dec/memcpy | t_enc ms | t_dec ms | B* Gb/s |" + (" t_dec fresh ms |" if a.fresh else ""))
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if a.fresh else ""))
        runs = []
        backends = {"default": ["auto"], "numpy": ["numpy"], "numba": ["numba"],
                    "both": ["numba", "numpy"], "cuda": ["cuda"]}[a.backend]
        for name, params in CONFIGS:
            if wanted and name not in wanted:
                continue
            e = CODECS.get(name)
            p = e.params(**params).model_dump() if e.params else {}
            if name == "block_sign":
                p = dict(p, block_size=None if blocks else 1 << 18)
            bl = blocks if name == "block_sign" else None
            for be in backends:
                threaded = name in ("qsgd", "qsgd_scaled", "qsgd_ans", "sign", "block_sign")
                for nt in (tlist if threaded else [1]):
                    try:
                        codec = e.factory(d, bl, xp=xp, backend=be, threads=nt, **p)
                    except ValueError as err:
                        print(f"| {name} | skipped: {err} |")
                        break
                    if be == "auto" and codec.backend != "numba" and nt != tlist[0]:
                        break
                    runs.append((name, params, codec))
        for name, params, codec in runs:
            rng = np.random.default_rng(1)
            te, pay = best(lambda: codec.encode(x, rng), a.repeat, sync)
            buf = xp.empty(d, dtype=xp.float32)
            td, _ = best(lambda: codec.decode(pay, out=buf), a.repeat, sync)
            tdf = best(lambda: codec.decode(pay), a.repeat, sync)[0] if a.fresh else None
            gbe, gbd = 4 * d / te / 1e9, 4 * d / td / 1e9
            bstar = (32 * d - pay.nbits) / (te + td) / 1e9
            desc = ",".join(f"{k}={v}" for k, v in params.items())
            if name == "block_sign":
                desc = f"B={codec.B}"
            if name.startswith("qsgd"):
                desc = f"s={codec.s}"
            backend = codec.backend
            nt = codec._nt() if hasattr(codec, "_nt") else 1
            print(f"| {name} | {desc} | {backend} | {nt} | {pay.nbits / d:.3f} | {gbe:.2f} | {gbd:.2f} |"
                  f" {gbe / mc:.2f} | {gbd / mc:.2f} | {te * 1e3:.1f} | {td * 1e3:.1f} | {bstar:.2f} |"
                  + (f" {tdf * 1e3:.1f} |" if a.fresh else ""))
            if name == "topk" and xp is np:
                from qprsgd.codecs.sparse import topk_argpartition

                def old():
                    idx = topk_argpartition(x, codec.k)
                    return codec._pack(idx, x[idx])

                t_old, _ = best(old, a.repeat, sync)
                b_old = (32 * d - pay.nbits) / (t_old + td) / 1e9
                print(f"|  | previous argpartition encode, same run: {t_old * 1e3:.1f} ms, B* "
                      f"{b_old:.2f} Gb/s; encode speed-up {t_old / te:.2f}x, B* ratio "
                      f"{bstar / b_old:.2f}x | | | | | | | | | | |" + (" |" if a.fresh else ""))
            if name in ("qsgd", "qsgd_runlength", "qsgd_ans"):
                print(f"|  | wire size at s={codec.s}: {pay.nbytes / 2**20:.2f} MiB = "
                      f"{100 * pay.nbits / (32 * d):.1f}% of fp32 ({32 * d / 8 / 2**20:.2f} MiB) |"
                      " | | | | | | | | | |" + (" |" if a.fresh else ""))


if __name__ == "__main__":
    main()
