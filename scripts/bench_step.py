#!/usr/bin/env python
"""Per-step time breakdown under real MPI, and the runner's own overhead.

    python scripts/bench_step.py [--ranks 1,2,4] [--models mlp,resnet20] [--steps 60]
                                 [--algorithms psgd] [--device cpu|cuda|sim] [--share-gpus]

For each model, algorithm and rank count it runs ``mpiexec -n N qprsgd run`` and reads the HDF5
log: per step (mean over the measured rows, the first row excluded as warm-up) the compute
(forward/backward + batch), codec, copy (device <-> host), comm (inside MPI) and other (the
algorithm's own arithmetic) times -- each the max over ranks -- the share of the step that is
codec + copies, the bytes copied to the host per step, and the runner's overhead: the share of
wall time spent outside ``algorithm.step`` (metrics reduction, logging, loop),
(Δwall − Σ t_step) / Δwall.

``--device cuda`` (issue 19) measures each configuration twice in the same run: on the device
path (state and codec on the GPU, only payloads staged) and on ``cuda_host`` (the model on the
GPU, the algorithm on host copies of x and the gradient: the path before issue 19), and prints
the ratio of step times.  ``--share-gpus`` lets N ranks share the node's GPUs (e.g. 2 ranks on 1).

ResNet-20 / ResNet-18 run on a synthetic CIFAR-10 set written in the real binary format to a
temp folder.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_cifar(dirname: str, n_train: int = 2048, n_test: int = 256) -> str:
    rng = np.random.default_rng(0)
    d = os.path.join(dirname, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    per = n_train // 5
    for k in range(1, 6):
        rec = rng.integers(0, 256, size=(per, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=per)
        rec.tofile(os.path.join(d, f"data_batch_{k}.bin"))
    rec = rng.integers(0, 256, size=(n_test, 3073), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, size=n_test)
    rec.tofile(os.path.join(d, "test_batch.bin"))
    return dirname


ALGS = {"psgd": {"name": "psgd"}, "qpr_sgd": {"name": "qpr_sgd", "K": 4},
        "qsgd": {"name": "qsgd"}, "dist_ef_blocksgdm": {"name": "dist_ef_blocksgdm"},
        "pr_sgd": {"name": "pr_sgd", "K": 4}, "sgdm": {"name": "sgdm"}}


def config(model: str, steps: int, n: int, data_dir: str, alg: str = "psgd", device: str = "cpu",
           share: bool = False) -> dict:
    if model == "mlp":
        data = {"name": "digits"}
        mdl = {"name": "mlp", "hidden": [64]}
        batch, n_train = 16, 1438
    else:
        data = {"name": "cifar10", "data_dir": data_dir}
        mdl = {"name": model}
        batch, n_train = 32, 2045
    spe = max(1, n_train // (n * batch))
    run = {"name": "bench", "progress": False, "threads": 1, "device": device}
    if share:
        run["share_gpus"] = True
    return {"seed": 0, "run": run,
            "train": {"epochs": steps / spe, "batch_size": batch, "lr": 0.05, "eval_every": 10 ** 9,
                      "log_every": 10},
            "model": mdl, "data": data, "algorithm": dict(ALGS[alg])}


def measure(model: str, n: int, steps: int, tmp: str, alg: str = "psgd", device: str = "cpu",
            share: bool = False) -> dict:
    from qprsgd.logger import read
    tag = f"{model}-{alg}-{device}-{n}"
    cfg_path = os.path.join(tmp, f"{tag}.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config(model, steps, n, tmp, alg, device, share), f)
    out = os.path.join(tmp, tag)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    subprocess.run([mpiexec, "-n", str(n), sys.executable, "-m", "qprsgd.cli", "run", cfg_path, "--out", out],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    m = read(os.path.join(out, "run.h5"))["metrics"]
    sl = slice(1, None)
    steps_measured = m["steps"][sl].sum()
    per = {k: m[k][sl].sum() / steps_measured * 1e3
           for k in ("t_compute", "t_codec", "t_comm", "t_step", "t_copy")}
    # each component is a max over ranks, so their sum can exceed the step's max: clip at 0
    per["other"] = max(0.0, per["t_step"] - per["t_compute"] - per["t_codec"] - per["t_comm"]
                       - per["t_copy"])
    per["codec_copy_share"] = (per["t_codec"] + per["t_copy"]) / per["t_step"]
    host_bits = m["bits_to_host"]
    per["to_host_mb"] = (host_bits[-1] - host_bits[0]) / 8e6 / max(1, m["steps"][sl].sum()) / n
    dwall = m["wall_time"][-1] - m["wall_time"][0]
    per["overhead"] = (dwall - m["t_step"][sl].sum()) / dwall
    return per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--models", default="mlp,resnet20")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--algorithms", default="psgd", help=f"comma-separated, of {', '.join(ALGS)}")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "sim"])
    ap.add_argument("--share-gpus", action="store_true", help="run.share_gpus (ranks > GPUs)")
    a = ap.parse_args()
    # cuda: the device path and, in the same run, the host path it replaces (the baseline)
    devices = ["cuda", "cuda_host"] if a.device == "cuda" else [a.device]
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(tmp)
        print(f"{'model':9s} {'algorithm':18s} {'device':9s} {'ranks':>5s} {'step ms':>8s} {'compute':>8s} "
              f"{'codec':>7s} {'copy':>7s} {'comm':>7s} {'other':>7s} {'codec+copy':>10s} "
              f"{'MB→host/step':>12s} {'runner overhead':>16s} {'vs host path':>12s}")
        for model in a.models.split(","):
            steps = a.steps if model == "mlp" else max(10, a.steps // 4)
            for alg in a.algorithms.split(","):
                for n in (int(r) for r in a.ranks.split(",")):
                    res = {}
                    for dev in devices:
                        p = res[dev] = measure(model, n, steps, tmp, alg, dev, a.share_gpus)
                        # on the baseline's line: device-path step time / host-path step time
                        ratio = f"{res['cuda']['t_step'] / p['t_step']:.2f}" if dev == "cuda_host" else ""
                        print(f"{model:9s} {alg:18s} {dev:9s} {n:5d} {p['t_step']:8.3f} {p['t_compute']:8.3f} "
                              f"{p['t_codec']:7.3f} {p['t_copy']:7.3f} {p['t_comm']:7.3f} {p['other']:7.3f} "
                              f"{100 * p['codec_copy_share']:9.1f}% {p['to_host_mb']:12.3f} "
                              f"{100 * p['overhead']:15.1f}% {ratio:>12s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
