#!/usr/bin/env python
"""Bits per element of the QSGD family against the empirical entropy of the quantized vector.

For a vector v and s (default ceil(sqrt(d))): the levels of QSGD's quantizer (one draw of
``default_rng(seed)``), H = d * H(signed levels) (level 0 unsigned: the bound a static
per-message code approaches, table excluded), and nbits / d of ``qsgd`` (Elias-gamma),
``qsgd_runlength`` and ``qsgd_ans`` (rANS) for the same draws, each as a ratio to H.

Vectors: N(0, 1) of length --d; the gradient of torch's ResNet-18 of qprsgd.models (CIFAR
shape, 11,173,962 parameters) on one batch of random CIFAR-shaped images with random labels
(cross-entropy; --batch); and the gradient of ResNet-20 likewise.

    PYTHONPATH=. .venv/bin/python scripts/entropy_codecs.py [--d 10000000] [--batch 32]
"""
from __future__ import annotations

import argparse

import numpy as np

from qprsgd.codecs.qsgd_ans import empirical_entropy_bits
from qprsgd.registry import CODECS


def gradient(model: str, batch: int, seed: int) -> np.ndarray:
    import torch

    from qprsgd.models import build_model

    torch.manual_seed(seed)
    m = build_model(model, (3, 32, 32), 10)
    g = torch.Generator().manual_seed(seed)
    xb = torch.randn(batch, 3, 32, 32, generator=g)
    yb = torch.randint(0, 10, (batch,), generator=g)
    loss = torch.nn.functional.cross_entropy(m(xb), yb)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()]).numpy().astype(np.float32)


def row(label, v, seed):
    d = v.shape[0]
    q = CODECS.get("qsgd").factory(d, None)
    _, zeta, neg = q.quantize(v, np.random.default_rng(seed).random(d, dtype=np.float32))
    H = empirical_entropy_bits(zeta, neg)
    bits = {n: CODECS.get(n).factory(d, None).encode(v, np.random.default_rng(seed)).nbits
            for n in ("qsgd", "qsgd_runlength", "qsgd_ans")}
    nz = float(np.count_nonzero(zeta)) / d
    print(f"| {label} | {d:,} | {q.s} | {nz:.3f} | {H / d:.3f} | "
          + " | ".join(f"{bits[n] / d:.3f} ({bits[n] / H:.3f}x)" for n in bits) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print("| vector | d | s | nonzero | H bits/elem | qsgd | qsgd_runlength | qsgd_ans |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    row("N(0,1)", np.random.default_rng(a.seed).standard_normal(a.d).astype(np.float32), 1)
    for model in ("resnet18", "resnet20"):
        row(f"{model} gradient (random CIFAR batch of {a.batch})", gradient(model, a.batch, a.seed), 1)


if __name__ == "__main__":
    main()
