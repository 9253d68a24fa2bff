"""R6 at small scale: dist-ef-blocksgdm Table 1 and Figures 1–3 (ALGORITHMS.md §D).

    python scripts/repro_r6.py [--workers 5] [--epochs 30] [--seeds 0 1] [--out results/r6]

Three criteria, each printed with PASS/FAIL (exit 1 if any fails):

1. Wire (Table 1, L176–179).  dist_ef_blocksgdm with a dedicated server (M workers + 1
   process): the logged bits_up + bits_down per iteration equal 2Md + 64MB, up to the ≤ 7
   zero-padding bits that each of the 2M messages carries to fill its last byte.
2. φ (Proposition 1, Fig. 1b).  On real stochastic gradients (LeNet trained by SGDM on
   digits, batch 16, every iteration of every epoch), the per-epoch minimum of
   φ(g) = min_b ‖g_b‖₁²/(d_b‖g_b‖₂²) (blocks = parameter tensors) is at least 3× the
   minimum of the non-block ‖g‖₁²/(d‖g‖₂²), in every epoch.
3. Accuracy (Figs. 2–3).  On digits with M workers, mean final test accuracy over the seeds:
   dist_ef_blocksgdm is within 1 point of SGDM (the same lr), and signum with majority vote
   (its best lr of a small grid) is below both.

Runs go through ``qprsgd run`` code under real mpiexec (this script re-invokes itself as the
per-rank driver).  A few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(alg: dict, seed: int, epochs: float, lr: float, server: str = "rank0") -> dict:
    return {
        "seed": seed,
        "run": {"progress": False, "server": server},
        "train": {"epochs": epochs, "batch_size": 16, "lr": lr, "weight_decay": 5e-4,
                  "eval_every": 100000, "log_every": 20,
                  "schedule": {"kind": "step", "milestones": [epochs * 0.5, epochs * 0.75], "gamma": 0.1}},
        "model": {"name": "mlp", "hidden": [64, 64]},
        "data": {"name": "digits"},
        "algorithm": alg,
    }


def mpiexec() -> str:
    b = Path(sys.executable).parent / "mpiexec"
    return str(b) if b.exists() else "mpiexec"


def run_job(n: int, runs: dict, out: Path) -> dict:
    """Run several configs in ONE mpiexec job of n ranks; returns {name: run.h5 path}."""
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, cfg in runs.items():
        p = out / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        specs.append(f"{name}={p}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [mpiexec(), "-n", str(n), sys.executable, str(Path(__file__).resolve()), "--driver", str(out)] + specs
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=1800)
    return {name: out / name / "run.h5" for name in runs}


def driver(root: str, specs: list[str]) -> int:
    from qprsgd.cli import main
    for spec in specs:
        name, path = spec.split("=", 1)
        rc = main(["run", path, "--out", f"{root}/{name}"])
        if rc != 0:
            return rc
    return 0


# ---------------------------------------------------------------------------------------------
def delta_stats(epochs: int, seed: int = 0, model: str = "lenet") -> list[tuple]:
    """Per epoch: (min φ(g), min ‖g‖₁²/(d‖g‖₂²), min_b 1/d_b, median φ, median δ) over the
    iterations of single-process SGDM training (lr 0.05, μ 0.9, λ 5e-4, batch 16)."""
    import torch
    from qprsgd.datasets import BatchStream
    from qprsgd.models import FlatParams, build_model, loss_fn
    from qprsgd.registry import DATASETS
    torch.set_num_threads(1)
    data = DATASETS.get("digits").factory(None)
    kw = {"hidden": [64, 64]} if model == "mlp" else {}
    module = build_model(model, tuple(data.in_shape), data.num_classes, seed=seed, **kw)
    flat = FlatParams(module)
    lossf = loss_fn(module)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    stream = BatchStream(len(data.y_train), 16, seed=seed, rank=0)
    x = flat.x_numpy()
    m = np.zeros_like(x)
    offs = np.concatenate([[0], np.cumsum(flat.blocks)])
    spe = len(data.y_train) // 16
    out = []
    for ep in range(epochs):
        phis, deltas = [], []
        for _ in range(spe):
            idx, _ = stream.next()
            gi = torch.from_numpy(np.asarray(idx))
            module.train()
            flat.zero_grad()
            lossf(module(xt[gi]), yt[gi]).backward()
            g = flat.grad_numpy().astype(np.float64)
            deltas.append(np.abs(g).sum() ** 2 / (g.size * (g ** 2).sum()))
            per = []
            for a, b in zip(offs[:-1], offs[1:]):
                gb = g[a:b]
                n2 = (gb ** 2).sum()
                per.append(np.abs(gb).sum() ** 2 / ((b - a) * n2) if n2 > 0 else 1.0)
            phis.append(min(per))
            gf = flat.grad_numpy() + np.float32(5e-4) * x
            m[...] = np.float32(0.9) * m + gf
            x -= np.float32(0.05) * (np.float32(0.9) * m + gf)
        out.append((min(phis), min(deltas), 1.0 / max(flat.blocks), float(np.median(phis)),
                    float(np.median(deltas))))
    return out


def final_acc(h5) -> float:
    from qprsgd.logger import read
    return float(read(str(h5))["eval"]["test_accuracy"][-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", type=float, default=0.05, help="SGDM and dist-EF-blockSGDM step size")
    ap.add_argument("--signum-lrs", type=float, nargs="+", default=[0.0005, 0.002, 0.008])
    ap.add_argument("--phi-epochs", type=int, default=5)
    ap.add_argument("--phi-model", default="lenet", help="model for the φ statistics (lenet: conv layers)")
    ap.add_argument("--out", default="results/r6")
    ap.add_argument("--driver", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.driver:
        return driver(a.driver[0], a.driver[1:])

    out = Path(a.out)
    M = a.workers
    ok = True
    t0 = time.time()

    # -- runs ------------------------------------------------------------------------------------
    ps = {f"efblkm-s{s}": cfg_for({"name": "dist_ef_blocksgdm", "momentum": 0.9}, s, a.epochs, a.lr, "dedicated")
          for s in a.seeds}
    ar = {f"sgdm-s{s}": cfg_for({"name": "sgdm", "momentum": 0.9}, s, a.epochs, a.lr) for s in a.seeds}
    for lr in a.signum_lrs:
        for s in a.seeds:
            ar[f"signum-lr{lr:g}-s{s}"] = cfg_for({"name": "signum_mv", "momentum": 0.9}, s, a.epochs, lr)
    h5 = run_job(M + 1, ps, out / "ps")        # M workers + a dedicated server
    h5.update(run_job(M, ar, out / "ar"))      # M workers (signum: rank 0 doubles as server)

    # -- 1. wire -----------------------------------------------------------------------------------
    from qprsgd.logger import read
    log = read(str(h5[f"efblkm-s{a.seeds[0]}"]))
    at, mt = log["attrs"], log["metrics"]
    d, B, Mw = int(at["d"]), len(at["blocks"]), len(at["workers"])
    steps = int(mt["step"][-1])
    per_it = (int(mt["bits_up"][-1]) + int(mt["bits_down"][-1])) / steps
    formula = 2 * Mw * d + 64 * Mw * B
    pad = 2 * Mw * 7
    up_it, down_it = int(mt["bits_up"][-1]) / steps, int(mt["bits_down"][-1]) / steps
    c1 = formula <= per_it <= formula + pad and up_it == down_it
    print(f"[1] wire: M={Mw} workers + dedicated server, d={d}, B={B}: logged {per_it:.0f} bits/iteration "
          f"(up {up_it:.0f}, down {down_it:.0f}); 2Md+64MB = {formula} (+ <= {pad} padding bits); "
          f"full precision 64Md = {64 * Mw * d} ({64 * Mw * d / per_it:.1f}x more)")
    print(f"    criterion: formula <= logged <= formula + 2M*7 and up == down: {'PASS' if c1 else 'FAIL'}")
    ok &= c1

    # -- 2. phi ------------------------------------------------------------------------------------
    st = delta_stats(a.phi_epochs, model=a.phi_model)
    print(f"[2] delta of the compressor on real gradients ({a.phi_model} on digits, batch 16, SGDM);")
    print("    per epoch, minimum over its iterations (Fig. 1b's statistic) and the median:")
    print("    epoch   min phi(g)   min |g|_1^2/(d|g|_2^2)   ratio   | median phi   median delta   ratio"
          "   | min_b 1/d_b")
    c2 = True
    for i, (phi, dl, lb, mphi, mdl) in enumerate(st):
        print(f"    {i + 1:5d}   {phi:10.4f}   {dl:22.5f}   {phi / dl:5.2f}   | {mphi:10.4f}   {mdl:12.5f}"
              f"   {mphi / mdl:5.2f}   | {lb:.2e}")
        c2 &= phi >= 3 * dl
    print(f"    criterion: phi >= 3x the non-block delta in every epoch: {'PASS' if c2 else 'FAIL'}")
    ok &= c2

    # -- 3. accuracy -------------------------------------------------------------------------------
    acc = lambda prefix: float(np.mean([final_acc(h5[f"{prefix}-s{s}"]) for s in a.seeds]))  # noqa: E731
    a_ef, a_sgdm = acc("efblkm"), acc("sgdm")
    a_sig = {lr: acc(f"signum-lr{lr:g}") for lr in a.signum_lrs}
    best_lr = max(a_sig, key=a_sig.get)
    print(f"[3] final test accuracy, mean of seeds {a.seeds}, M={M}, {a.epochs:g} epochs, lr/10 at 50% and 75%:")
    print(f"    sgdm (lr {a.lr:g})              {a_sgdm:.4f}")
    print(f"    dist_ef_blocksgdm (lr {a.lr:g}) {a_ef:.4f}   (dedicated server)")
    for lr, v in a_sig.items():
        print(f"    signum_mv (lr {lr:g})        {v:.4f}{'   <- best' if lr == best_lr else ''}")
    c3a = abs(a_ef - a_sgdm) <= 0.01
    c3b = a_sig[best_lr] < min(a_ef, a_sgdm)
    print(f"    criterion: |blockSGDM - SGDM| <= 0.01: {'PASS' if c3a else 'FAIL'};  "
          f"best signum below both: {'PASS' if c3b else 'FAIL'}")
    ok &= c3a and c3b
    print(f"R6: {'PASS' if ok else 'FAIL'}  ({time.time() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
