#!/usr/bin/env python
"""qprsgd against torch.distributed, side by side in one run: per-step time ratios.

    python scripts/bench_vs_torch.py [--ranks 2,4] [--models mlp,resnet20] [--algs psgd,pr_sgd,qsgd]
                                     [--steps N] [--reps R] [--threads T] [--bucket-mb MB] [--quick]

What is compared (qprsgd algorithm  <->  torch.distributed counterpart, gloo backend):

* ``psgd``   <-> DistributedDataParallel, plain SGD (gradient all-reduce, DDP's own buckets
  unless ``--bucket-mb`` is given, which then sets DDP's ``bucket_cap_mb`` too; 0 = one bucket;
  ``broadcast_buffers=False`` on every DDP here: qprsgd does not send BatchNorm's running
  statistics either, and they do not enter the training-mode forward);
* ``pr_sgd`` (K = 4) <-> local SGD: plain local ``torch.optim.SGD`` steps, no DDP, then
  ``PeriodicModelAverager(period=4, warmup_steps=3).average_parameters`` after every step
  (warmup_steps = 3 instead of 0 only moves the averages from after 0-based steps 0, 4, 8, ...
  to after 3, 7, 11, ..., where qprsgd's pr_sgd averages: same count, same iterates);
* ``qsgd`` (its default codec, qsgd s = ceil(sqrt(d)), allgather) <-> DDP + the PowerSGD comm
  hook (rank 1, ``start_powerSGD_iter=2``, error feedback and warm start at torch's defaults,
  ``bucket_cap_mb`` large enough for one bucket).  These are two different compressors, both
  "compressed gradient all-reduce every step"; the ratio is the time per step of each, not a
  claim that they compress alike.

Both sides get the same model (qprsgd's own factory, ``build_model`` with the config's seed, so
the same x_0), the same training arrays, the same shards and batch order (qprsgd's ``shard`` and
``BatchStream``), the same batch size, lr, torch thread count (``run.threads`` /
``torch.set_num_threads``) and the same launcher (``mpiexec -n P``; the torch workers do not
use MPI, they only read their rank from the launcher's environment and meet over gloo on
127.0.0.1).  Models: the digits MLP [64] (batch 16) and ResNet-20 on the bundled digits written
in the CIFAR-10 binary format (scripts/digits_as_cifar.py; batch 32).  Nothing downloads.

How each side is timed: qprsgd runs ``mpiexec -n P python -m qprsgd.cli run CFG --out DIR`` and
the per-step time is read from DIR/run.h5: Σ ``metrics/t_step`` / Σ ``metrics/steps`` over the
rows after the first (warm-up; each row's ``t_step`` is the max over ranks of that row's summed
``algorithm.step`` time, which includes drawing the batch, forward, backward, codec and MPI).
The torch side times each step the same way (batch, zero_grad, forward, loss, backward,
optimizer step, communication) with ``time.perf_counter``, skips as many warm-up steps as
qprsgd's first row holds, and reports the max over ranks of the mean step time.  As a check that
both sides do the same work, each progress line also shows the mean training loss over the
measured steps of each side: psgd/DDP and pr_sgd/averager compute the same iterates up to
float rounding (MLP: equal to 4 decimals; ResNet-20: within ~0.1 %, the order of the averaging's
division and sum differs and BatchNorm amplifies it); qsgd and PowerSGD are different
compressors, so their losses differ.

Repetitions are interleaved: for each repetition every (model, P, alg) runs qprsgd and torch
back to back, in the order A,B on even repetitions and B,A on odd ones, so load drifts on the
machine hit both sides.  The table gives the medians over repetitions and

    ratio = median qprsgd step time / median torch step time   (< 1: qprsgd is faster)

with the range of the per-repetition paired ratios next to it (a wide range means the machine
was noisy, not that one side is), qprsgd's per-step compute / comm / codec split (medians; each
a max over ranks, so they need not add up to the step), and the share of qprsgd's comm + codec
time hidden behind backward ("hidden").  That share is measured, not estimated: each repetition
also runs qprsgd with ``train.bucket_mb = 0`` (one bucket, handed over after backward: nothing
can hide) -- the third run of the interleaved group -- and

    hidden = 1 − (t_comm_min + t_codec)[buckets] / (t_comm_min + t_codec)[one bucket]

per step (medians over rows; ``t_comm_min`` is the exposed comm time of the rank that waited
least, i.e. the transfer rather than waiting for a slower peer), median over repetitions.  "—"
where the bucketed run handed MPI no more messages than the one-bucket run: the algorithm does
not take buckets (pr_sgd communicates after its K-th local step; qsgd only with
``per_bucket: true``), so there is nothing to hide.  ``--no-hidden`` skips the extra runs.  The
last line names the worst ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LR = 0.05
SEED = 0
K_LOCAL = 4                  # pr_sgd's K and the averager's period
POWERSGD_START = 2           # start_powerSGD_iter (DDP rebuilds its buckets after iteration 1)
ONE_BUCKET_MB = 1024.0       # DDP bucket_cap_mb that holds either model in one bucket

MODELS = {
    # name: (model section, data section builder, batch, log_every = warm-up steps, default steps)
    "mlp": ({"name": "mlp", "hidden": [64]}, lambda d: {"name": "digits"}, 16, 20, 200),
    "resnet20": ({"name": "resnet20"}, lambda d: {"name": "cifar10", "data_dir": d}, 32, 4, 12),
}
ALGS = {
    "psgd": ({"name": "psgd"}, "DDP"),
    "pr_sgd": ({"name": "pr_sgd", "K": K_LOCAL}, f"local SGD + PeriodicModelAverager({K_LOCAL})"),
    "qsgd": ({"name": "qsgd"}, "DDP + PowerSGD hook (rank 1)"),
}


# ------------------------------------------------------------------------------------------------
# configs
def qprsgd_config(model: str, alg: str, ranks: int, steps: int, data_dir: str, threads: int,
                  bucket_mb) -> dict:
    mdl, data, batch, log_every, _ = MODELS[model]
    data = dict(data(data_dir))
    data["params"] = {"max_test": 64}          # evaluation (outside the timed steps) kept short
    train = {"epochs": 1.0, "batch_size": batch, "lr": LR, "eval_every": 10 ** 9,
             "log_every": log_every}
    if bucket_mb is not None:
        train["bucket_mb"] = float(bucket_mb)
    raw = {"seed": SEED, "run": {"name": f"vs-torch-{model}-{alg}-{ranks}", "progress": False,
                                 "threads": threads},
           "train": train, "model": dict(mdl), "data": data, "algorithm": dict(ALGS[alg][0])}
    # train.epochs giving exactly `steps` steps at this world size
    from qprsgd import config as qconfig
    from qprsgd.experiment import load_data, schedule_lengths
    cfg = qconfig.validate(raw)
    n_train = len(load_data(cfg).y_train)
    spe, _ = schedule_lengths(cfg.train, n_train, ranks)
    raw["train"]["epochs"] = steps / spe
    cfg = qconfig.validate(raw)
    got = schedule_lengths(cfg.train, n_train, ranks)[1]
    if got != steps:
        raise RuntimeError(f"{model}/{alg}/{ranks}: epochs {steps / spe} gives {got} steps, not {steps}")
    return raw


def bucket_key_supported() -> bool:
    """Does the qprsgd that runs here validate ``train.bucket_mb``?"""
    from qprsgd import config as qconfig
    try:
        qconfig.validate({"train": {"bucket_mb": 0.0}})
    except Exception:
        return False
    return True


def mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else "mpiexec"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list, env=None, timeout: float = 900.0) -> None:
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    if p.returncode != 0:
        tail = p.stdout.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{tail}")


def per_step(row_sums, row_steps, stat: str) -> float:
    """Seconds per step from rows of (summed seconds, steps): "mean" = Σ seconds / Σ steps,
    "median" = the median over rows of seconds / steps (robust to a row in which a rank was
    descheduled, which on an oversubscribed machine is most of the run-to-run noise)."""
    import numpy as np
    sums = np.asarray(row_sums, dtype=np.float64)
    steps = np.asarray(row_steps, dtype=np.float64)
    if stat == "mean":
        return float(sums.sum() / steps.sum())
    return float(np.median(sums / steps))


# ------------------------------------------------------------------------------------------------
# qprsgd side
def run_qprsgd(raw: dict, ranks: int, tmp: str, tag: str, poll_sleep=None) -> dict:
    import yaml
    from qprsgd.logger import read
    cfg_path = os.path.join(tmp, f"{tag}.yaml")
    out = os.path.join(tmp, tag)
    with open(cfg_path, "w") as f:
        yaml.safe_dump(raw, f)
    env = None
    if poll_sleep is not None:   # qprsgd.comm.POLL_ENV (not imported here: that would start MPI)
        env = dict(os.environ, QPRSGD_MPI_POLL_SLEEP=repr(float(poll_sleep)))
    _run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "qprsgd.cli", "run", cfg_path, "--out", out],
         env=env)
    m = read(os.path.join(out, "run.h5"))["metrics"]
    rows = slice(1, None)                         # the first row is warm-up
    n = float(m["steps"][rows].sum())
    if n <= 0:
        raise RuntimeError(f"{tag}: no measured rows (steps too few for log_every)")
    res = {f"{k}_{stat}": per_step(m[k][rows], m["steps"][rows], stat)
           for k in ("t_step", "t_compute", "t_comm", "t_codec") for stat in ("mean", "median")}
    res["exposed_median"] = per_step(m["t_comm_min"][rows] + m["t_codec"][rows], m["steps"][rows], "median")
    res["messages"] = int(m["messages"][-1])
    res["steps"] = int(n)
    res["loss"] = float((m["train_loss"][rows] * m["steps"][rows]).sum()) / n
    return res


def hidden_share(bucketed: dict, one: dict):
    """1 − exposed(buckets) / exposed(one bucket) of one repetition; None where the bucketed run
    sent no more messages (the algorithm took no buckets) or nothing was exposed."""
    if bucketed["messages"] <= one["messages"] or one["exposed_median"] <= 0:
        return None
    return 1.0 - bucketed["exposed_median"] / one["exposed_median"]


# ------------------------------------------------------------------------------------------------
# torch side: the parent launches `mpiexec -n P python THIS --torch-worker SPEC.json`
def run_torch(spec: dict, ranks: int, tmp: str, tag: str) -> dict:
    spec = dict(spec, out=os.path.join(tmp, f"{tag}.json"), port=free_port())
    spec_path = os.path.join(tmp, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    _run([mpiexec(), "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--torch-worker", spec_path])
    with open(spec["out"]) as f:
        return json.load(f)


def torch_worker(spec_path: str) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.nn.parallel import DistributedDataParallel as DDP

    from qprsgd import config as qconfig
    from qprsgd.datasets import BatchStream, load_dataset, shard
    from qprsgd.models import build_model, loss_fn

    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ.get("PMI_RANK", os.environ.get("RANK", "0")))
    world = int(os.environ.get("PMI_SIZE", os.environ.get("WORLD_SIZE", "1")))
    raw = dict(spec["config"])
    raw["train"] = {k: v for k, v in raw["train"].items() if k != "bucket_mb"}
    cfg = qconfig.validate(raw)
    torch.set_num_threads(cfg.run.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                            world_size=world)

    # the same data, shard, batch order and x_0 as qprsgd's experiment.build
    data = load_dataset(cfg.data.name, cfg.data.data_dir, **dict(cfg.data.params))
    train_idx = shard(data.y_train, rank, world, scheme=cfg.data.shard, alpha=cfg.data.alpha, seed=cfg.seed)
    stream = BatchStream(len(train_idx), cfg.train.batch_size, seed=cfg.seed, rank=rank)
    x_train = torch.from_numpy(np.ascontiguousarray(data.x_train))
    y_train = torch.from_numpy(np.ascontiguousarray(data.y_train))
    module = build_model(cfg.model.name, tuple(data.in_shape), data.num_classes, seed=cfg.seed,
                         **cfg.model.kwargs())
    module.train()
    lossf = loss_fn(module)

    alg = spec["alg"]
    averager = None
    if alg == "psgd":
        kw = {} if spec.get("bucket_mb") is None else {"bucket_cap_mb": float(spec["bucket_mb"]) or ONE_BUCKET_MB}
        net = DDP(module, broadcast_buffers=False, **kw)
    elif alg == "qsgd":
        net = DDP(module, broadcast_buffers=False, bucket_cap_mb=ONE_BUCKET_MB)
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=POWERSGD_START)
        net.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif alg == "pr_sgd":
        net = module
        # warmup_steps = K-1 only shifts the phase: torch's averager with warmup 0 averages after
        # 0-based steps 0, K, 2K, ..., qprsgd's pr_sgd after K-1, 2K-1, ...; the same number of
        # averages per K steps either way, and with the shift both sides compute the same iterates
        averager = PeriodicModelAverager(period=K_LOCAL, warmup_steps=K_LOCAL - 1)
    else:
        raise ValueError(alg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.train.lr)

    warm, steps = int(spec["warmup"]), int(spec["steps"])
    times = []
    loss_sum = 0.0
    dist.barrier()
    for t in range(steps):
        t0 = time.perf_counter()
        idx, _ = stream.next()
        gi = torch.from_numpy(train_idx[idx])
        xb, yb = x_train[gi], y_train[gi]
        opt.zero_grad(set_to_none=False)
        loss = lossf(net(xb), yb)
        loss.backward()
        lv = float(loss.detach())
        opt.step()
        if averager is not None:
            averager.average_parameters(net.parameters())
        dt = time.perf_counter() - t0
        if t >= warm:
            times.append(dt)
            loss_sum += lv
    n = max(1, len(times))
    # rows of `warm` steps as qprsgd's log rows: each rank's row sums, then the max over ranks
    row_sums = torch.tensor(times, dtype=torch.float64).reshape(-1, warm).sum(1)
    dist.all_reduce(row_sums, op=dist.ReduceOp.MAX)
    row_steps = [warm] * len(row_sums)
    loss_mean = torch.tensor([loss_sum / n], dtype=torch.float64)
    dist.all_reduce(loss_mean, op=dist.ReduceOp.SUM)
    if rank == 0:
        buckets = None
        if hasattr(net, "_get_ddp_logging_data"):
            buckets = net._get_ddp_logging_data().get("bucket_sizes")
        with open(spec["out"], "w") as f:
            json.dump({f"t_step_{stat}": per_step(row_sums.numpy(), row_steps, stat) for stat in ("mean", "median")}
                      | {"steps": len(times), "buckets": buckets,
                       "loss": float(loss_mean.item()) / world}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def _ms(v) -> str:
    return "n/a" if v is None else f"{1e3 * v:.3f}" if v < 0.1 else f"{1e3 * v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4", help="process counts (default 2,4)")
    ap.add_argument("--models", default="mlp,resnet20")
    ap.add_argument("--algs", default="psgd,pr_sgd,qsgd")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run for the MLP (ResNet-20: a sixteenth of it, at least 8); "
                         "default 200 (ResNet-20 12); rounded up to whole log rows (MLP 20 steps, "
                         "ResNet-20 4); the first row is warm-up")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank, both sides (default 1)")
    ap.add_argument("--bucket-mb", type=float, default=None,
                    help="qprsgd train.bucket_mb (and DDP bucket_cap_mb for psgd; 0 = one bucket); "
                         "ignored with a note if this qprsgd does not know the key")
    ap.add_argument("--poll-sleep", type=float, default=None, metavar="S",
                    help="qprsgd side only: QPRSGD_MPI_POLL_SLEEP=S (seconds a rank sleeps between "
                         "tests of a pending MPI request; default: qprsgd's, 0 = spin)")
    ap.add_argument("--stat", choices=("median", "mean"), default="median",
                    help="per-step time of one run: median over its log rows (default; robust to a "
                         "descheduled rank) or Σ time / Σ steps")
    ap.add_argument("--no-hidden", action="store_true",
                    help="skip the one-bucket qprsgd runs that measure the hidden share")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 ranks, fewer steps, 1 repetition")
    ap.add_argument("--torch-worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        rc = torch_worker(a.torch_worker)
        # The result is written and the process group destroyed; skip the interpreter's teardown,
        # in which gloo's worker threads sometimes abort ("terminate called without an active
        # exception", about 1 run in 4 here, always after destroy_process_group had returned).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)

    if a.quick:
        a.ranks = "2" if a.ranks == ap.get_default("ranks") else a.ranks
        a.reps = 1 if a.reps == ap.get_default("reps") else a.reps
        a.steps = a.steps or 60
    st = a.stat
    ranks = [int(r) for r in a.ranks.split(",")]
    models = [m for m in a.models.split(",") if m]
    algs = [x for x in a.algs.split(",") if x]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown {m!r} (known: {', '.join(MODELS)})")
    for x in algs:
        if x not in ALGS:
            ap.error(f"--algs: unknown {x!r} (known: {', '.join(ALGS)})")
    bucket_mb = a.bucket_mb
    if bucket_mb is not None and not bucket_key_supported():
        print(f"note: this qprsgd does not accept train.bucket_mb; --bucket-mb {bucket_mb} ignored "
              f"(DDP keeps its default buckets)", flush=True)
        bucket_mb = None

    def steps_for(model: str) -> int:
        _, _, _, log_every, default = MODELS[model]
        if a.steps is None:
            s = default
        else:
            s = a.steps if model == "mlp" else max(8, a.steps // 16)
        rows = max(2, -(-s // log_every))             # at least one measured row after the warm-up row
        return rows * log_every

    import torch
    print(f"qprsgd vs torch.distributed {torch.__version__} (gloo): ranks {ranks}, models {models}, "
          f"algs {algs}, steps {[steps_for(m) for m in models]}, reps {a.reps}, threads {a.threads}, "
          f"bucket_mb {bucket_mb}, poll_sleep {a.poll_sleep}, stat {st}, cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}", flush=True)

    results: dict = {}
    failed = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_vs_torch-") as tmp:
        data_dir = os.path.join(tmp, "cifar")
        if "resnet20" in models:
            sys.path.insert(0, os.path.join(ROOT, "scripts"))
            from digits_as_cifar import write
            write(data_dir)
        combos = [(m, p, x) for m in models for p in ranks for x in algs]
        configs, one_bucket = {}, {}
        for m, p, x in combos:
            configs[m, p, x] = qprsgd_config(m, x, p, steps_for(m), data_dir, a.threads, bucket_mb)
            if not a.no_hidden:
                one_bucket[m, p, x] = qprsgd_config(m, x, p, steps_for(m), data_dir, a.threads, 0.0)
        for rep in range(a.reps):
            for m, p, x in combos:
                key = (m, p, x)
                if key in failed:
                    continue
                raw = configs[key]
                spec = {"config": raw, "alg": x, "steps": steps_for(m), "warmup": MODELS[m][3],
                        "bucket_mb": bucket_mb}
                tag = f"{m}-{p}-{x}-r{rep}"
                sides = [("qprsgd", lambda: run_qprsgd(raw, p, tmp, f"{tag}-q", a.poll_sleep)),
                         ("torch", lambda: run_torch(spec, p, tmp, f"{tag}-t"))]
                if not a.no_hidden:
                    sides.append(("one_bucket", lambda: run_qprsgd(one_bucket[key], p, tmp, f"{tag}-q1",
                                                                   a.poll_sleep)))
                if rep % 2:
                    sides.reverse()
                got = {}
                try:
                    for name, fn in sides:
                        got[name] = fn()
                except Exception as e:  # noqa: BLE001 - report and go on with the other combinations
                    print(f"FAILED {tag}: {e}", flush=True)
                    failed.append(key)
                    continue
                results.setdefault(key, []).append(got)
                q, t = got["qprsgd"][f"t_step_{st}"], got["torch"][f"t_step_{st}"]
                got["hidden"] = hidden_share(got["qprsgd"], got["one_bucket"]) if "one_bucket" in got else None
                print(f"  rep {rep} {m:8s} P={p} {x:6s} ({'/'.join(n for n, _ in sides)}): qprsgd "
                      f"{_ms(q)} ms  torch {_ms(t)} ms  ratio {q / t:.2f}  "
                      f"loss {got['qprsgd']['loss']:.4f}/{got['torch']['loss']:.4f}  "
                      f"hidden {_pct(got['hidden'])}  "
                      f"[{time.time() - t_start:.0f} s, load {os.getloadavg()[0]:.2f}]", flush=True)

    print()
    print(f"per-step ms: {st} over log rows within a run, then median over {a.reps} repetition(s); "
          f"ratio = qprsgd / torch (< 1: qprsgd faster); 'ratio of means': the same from Σ time / Σ steps")
    print(f"{'model':8s} {'P':>2s} {'alg':6s} {'torch counterpart':34s} {'qprsgd ms':>9s} {'torch ms':>9s} "
          f"{'ratio':>6s} {'paired range':>12s} {'of means':>8s} {'q compute':>9s} {'q comm':>7s} "
          f"{'q codec':>7s} {'hidden':>6s}")
    worst = None
    for key in combos:
        m, p, x = key
        reps = results.get(key, [])
        if not reps:
            print(f"{m:8s} {p:2d} {x:6s} {ALGS[x][1]:34s} {'failed':>9s}")
            continue
        med = {k: statistics.median(r["qprsgd"][f"{k}_{st}"] for r in reps)
               for k in ("t_step", "t_compute", "t_comm", "t_codec")}
        t_med = statistics.median(r["torch"][f"t_step_{st}"] for r in reps)
        ratio = med["t_step"] / t_med
        paired = [r["qprsgd"][f"t_step_{st}"] / r["torch"][f"t_step_{st}"] for r in reps]
        of_means = (statistics.median(r["qprsgd"]["t_step_mean"] for r in reps)
                    / statistics.median(r["torch"]["t_step_mean"] for r in reps))
        hid = [r["hidden"] for r in reps if r["hidden"] is not None]
        hidden = (f"{100 * statistics.median(hid):.0f} %" if hid else
                  "n/a" if a.no_hidden else "—")
        print(f"{m:8s} {p:2d} {x:6s} {ALGS[x][1]:34s} {_ms(med['t_step']):>9s} {_ms(t_med):>9s} {ratio:6.2f} "
              f"{min(paired):5.2f}-{max(paired):<6.2f} {of_means:8.2f} {_ms(med['t_compute']):>9s} {_ms(med['t_comm']):>7s} "
              f"{_ms(med['t_codec']):>7s} {hidden:>6s}")
        if worst is None or ratio > worst[0]:
            worst = (ratio, key)
    print()
    if worst is not None:
        r, (m, p, x) = worst
        print(f"worst ratio: {r:.2f} ({m}, P={p}, {x} vs {ALGS[x][1]}; "
              f"{'qprsgd slower' if r > 1 else 'qprsgd faster or equal'})  "
              f"[{time.time() - t_start:.0f} s, load {os.getloadavg()[0]:.2f}]")
    if failed:
        print(f"{len(failed)} combination(s) failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
