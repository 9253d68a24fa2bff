"""Command line: ``qprsgd run | topo | ...``.

``qprsgd run CONFIG [--out DIR] [--set key.path=value ...] [--resume]`` -- validated on rank 0
before any rank does work; a bad config prints one message (naming the key, the value and
what is allowed) and every rank exits with code 2.

Exit codes of ``qprsgd run``: 0 done; 1 a failure (an unexpected error, an unwritable folder, a
rank that raised during training: the job is aborted); 2 refused before any work (config, data
files, pre-flight, output folder state, checkpoint); 3 the model diverged (see
qprsgd/divergence.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qprsgd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train under MPI (launch with mpiexec -n N)")
    r.add_argument("config")
    r.add_argument("--out", default=None, help="run folder (default: a new folder under results/)")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    r.add_argument("--resume", action="store_true",
                   help="continue from the run folder's last checkpoint (newest matching folder if no --out)")
    r.add_argument("--force", action="store_true",
                   help="start afresh in a folder that holds a previous run: its log and checkpoints are deleted")
    t = sub.add_parser("topo", help="print the mixing matrix's neighbours, rho, mu, zeta and pre-flight checks")
    t.add_argument("config")
    t.add_argument("-n", "--workers", type=int, default=None, help="number of workers M (default: from mpiexec)")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    sub.add_parser("list", help="list registered algorithms, codecs, topologies, models and datasets")
    for name, mod in _EXTRA.items():
        mod_add = __import__(f"qprsgd.{mod}", fromlist=["add_parser"]).add_parser
        mod_add(sub)
    return p


# commands contributed by other modules: name -> module with add_parser(sub) and main(args)
_EXTRA: dict[str, str] = {
    "netem": "netem",
    "sweep": "sweep",
    "report": "report",
}


def _default_out(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("results", f"{name}-{stamp}")
    out, k = base, 1
    while os.path.exists(out):
        k += 1
        out = f"{base}-{k}"
    return out


def _find_resume(name: str) -> str:
    cands = [d for d in glob.glob(os.path.join("results", f"{name}-*"))
             if os.path.exists(os.path.join(d, "config.yaml"))]
    if not cands:
        raise ValueError(f"--resume: no run folder results/{name}-* found; pass --out DIR")
    return max(cands, key=os.path.getmtime)


_LOCK = None  # rank 0's lock on the output folder (qprsgd.ownership), released when the run ends


def _prepare(args, world_size: int) -> dict:
    """Rank 0: validate everything that can be validated before work starts, then take the
    output folder (lock; --force/--resume rules; checkpoint verification)."""
    global _LOCK
    from . import checkpoint as ckpt
    from . import config
    from .ownership import acquire
    from .preflight import check_run
    if args.resume and getattr(args, "force", False):
        raise ValueError("--resume and --force contradict each other (continue the run, or replace it)")
    cfg = config.load(args.config, args.set)
    check_run(cfg, world_size)
    if args.resume:
        out = args.out or _find_resume(cfg.run.name)
        saved = os.path.join(out, "config.yaml")
        if not os.path.exists(saved):
            raise ValueError(f"--resume: {out} holds no config.yaml (not a run folder)")
        with open(saved) as f:
            if f.read() != cfg.to_yaml():
                raise ValueError(f"--resume: the config differs from the one {out}/config.yaml was run with")
    else:
        out = args.out or _default_out(cfg.run.name)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    lock = acquire(out)
    try:
        info = None
        if args.resume:
            info = ckpt.verify(out, cfg.to_yaml(), world_size)
        elif ckpt.holds_run(out):
            if not getattr(args, "force", False):
                raise ValueError(f"--out {out} already holds a run (run.h5 or checkpoint/); pass --resume to "
                                 f"continue it or --force to delete it and start afresh")
            ckpt.clear(out)
    except BaseException:
        lock.release()
        raise
    _LOCK = lock
    return {"ok": True, "yaml": cfg.to_yaml(), "out": out, "info": info, "note": lock.note}


def _release_lock() -> None:
    global _LOCK
    if _LOCK is not None:
        _LOCK.release()
        _LOCK = None


MAX_MESSAGE = 4000
"""Longest error message printed for a refused run (characters)."""


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 40] + f"... [{len(text)} characters in all]"


def _verdict(args, world_size: int) -> dict:
    """Rank 0: ``_prepare`` with every failure turned into a verdict (never a raise), so the
    other ranks, waiting in the broadcast, always learn the outcome.

    Exit codes: 2 -- bad input refused before any work (config, data files, folder state,
    checkpoint); 1 -- anything else (an unreadable output folder, an internal error)."""
    import traceback
    try:
        return _prepare(args, world_size)
    except ValueError as e:  # ConfigError, DatasetError, UnknownNameError, refused folder states
        return {"ok": False, "code": EXIT_CONFIG, "error": _bounded(str(e))}
    except RecursionError:
        return {"ok": False, "code": EXIT_CONFIG, "error": "the configuration is nested too deeply"}
    except OSError as e:
        return {"ok": False, "code": 1, "error": _bounded(f"{type(e).__name__}: {e}")}
    except Exception as e:  # a bug: keep the traceback, printed once
        tb = traceback.format_exc(limit=-12)
        return {"ok": False, "code": 1,
                "error": _bounded(f"internal error before training ({type(e).__name__}: {e})\n{tb}")}


def cmd_run(args) -> int:
    import yaml
    from . import config
    from .comm import Comm, install_abort_on_error, world
    w = world()
    # first: from here on an uncaught raise on any rank aborts the whole job (exit 1) instead of
    # leaving the other ranks in a collective forever
    install_abort_on_error(w)
    comm = Comm(w)
    verdict = _verdict(args, comm.size) if comm.rank == 0 else None
    verdict = json.loads(comm.bcast_bytes(json.dumps(verdict).encode() if comm.rank == 0 else None))
    if not verdict["ok"]:
        if comm.rank == 0:
            print(f"qprsgd: {verdict['error']}", file=sys.stderr, flush=True)
        return int(verdict["code"])
    if comm.rank == 0 and verdict.get("note"):
        print(f"qprsgd: {verdict['out']}: {verdict['note']}", file=sys.stderr, flush=True)
    try:
        return _run(config.validate(yaml.safe_load(verdict["yaml"])), w, verdict["out"], verdict["info"])
    finally:
        if comm.rank == 0:
            _release_lock()


def _run(cfg, w, out: str, info) -> int:
    """Every rank: build and train.  ``info``: the verified checkpoint to resume from, or None."""
    from . import checkpoint as ckpt
    from .experiment import build, run_attrs
    from .logger import Logger
    from .worker import Loop
    rank = w.Get_rank()
    w.Barrier()
    exp = build(cfg, w, out)
    path = os.path.join(out, "run.h5")
    logger = None
    if rank == 0:
        if info is None:
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
        # a fresh run.h5 in both cases: a resume rebuilds it from the rows saved in the checkpoint
        restore = None if info is None else ckpt.load_log(out, int(info["step"]))
        logger = Logger(path, attrs=run_attrs(cfg, exp), world_size=w.Get_size(), restore=restore,
                        arrays=None if exp.topology is None else _topology_arrays(exp.topology))
        if info is not None:
            print(f"resuming {out} from step {info['step']}", flush=True)
    loop = Loop(exp, logger)
    if info is not None:
        loop.load_checkpoint(info)
    try:
        loop.run()
    except Exception as exc:
        from .divergence import explain
        d = explain(exc, exp.mirror.x, loop.t, exp.lr_at(max(loop.t - 1, 0)))
        if d is None:
            raise  # a failure: the abort hook ends the job (exit 1)
        return _diverged(d, exc, w, logger)
    params = loop.final_params()
    if rank == 0:
        logger.write_array("final/params", params)
        logger.set_attrs(completed=True, final_step=loop.t)
        logger.close()
        print(f"wrote {path}", flush=True)
    return 0


def _diverged(d, exc, w, logger) -> int:
    """Stop a diverged run: the log keeps its rows and says why, ``completed`` stays false."""
    from .comm import abort
    from .divergence import EXIT_DIVERGED, Diverged
    rank = w.Get_rank()
    if logger is not None:
        logger.set_attrs(diverged=True, divergence=str(d))
        logger.close()
    if isinstance(exc, Diverged):  # every rank raised it at the same row: a clean, collective stop
        if rank == 0:
            print(f"qprsgd: {d}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    # one rank failed on non-finite numbers between rows; the others wait for it: abort the job
    print(f"qprsgd: rank {rank}: {d}", file=sys.stderr, flush=True)
    if w.Get_size() > 1:
        if rank == 0:
            _release_lock()
        abort(w, EXIT_DIVERGED)
    return EXIT_DIVERGED


def _topology_arrays(topo) -> dict:
    """``topology/W`` with its report numbers as attrs, for the Logger to write at creation."""
    from .topology import report
    rep = report(topo)
    attrs = {k: v for k, v in rep.items() if isinstance(v, (int, float))}
    attrs["name"] = topo.name
    return {"topology/W": (topo.W, attrs)}


def cmd_topo(args) -> int:
    from . import config
    from .experiment import build_topology, roles_for
    try:
        cfg = config.load(args.config, args.set)
        M = args.workers
        if M is None:
            from .comm import world
            M = roles_for(cfg, world().Get_size()).M
        if cfg.topology is None:
            raise ValueError(f"algorithm {cfg.algorithm.name!r} uses no topology")
        topo = build_topology(cfg, M)
    except (config.ConfigError, ValueError) as e:
        print(f"qprsgd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from .topology import format_report
    alpha = d = s = None
    if cfg.codec is not None:
        from .experiment import model_size
        from .registry import CODECS
        d, _ = model_size(cfg)
        cls = CODECS.get(cfg.codec.name).factory
        if hasattr(cls, "alpha"):
            alpha = cls.alpha(d, **cfg.codec.kwargs())
        s = cfg.codec.kwargs().get("s") if cfg.codec.name.startswith("qsgd") else None
        if cfg.codec.name.startswith("qsgd") and s is None:
            import math
            s = math.isqrt(d - 1) + 1 if d > 1 else 1
    print(format_report(topo, alpha=alpha, d=d, s=s))
    if alpha is None and cfg.codec is not None:
        print(f"(codec {cfg.codec.name!r} states no compression constant α: no DCD verdict)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "topo":
        return cmd_topo(args)
    if args.cmd == "list":
        from .registry import ALGORITHMS, CODECS, DATASETS, MODELS, TOPOLOGIES
        for reg in (ALGORITHMS, CODECS, TOPOLOGIES, MODELS, DATASETS):
            print(f"{reg.plural}:")
            for n in reg.names():
                print(f"  {n:22s} {reg.get(n).doc}")
        return 0
    mod = __import__(f"qprsgd.{_EXTRA[args.cmd]}", fromlist=["main"])
    return mod.main(args)


if __name__ == "__main__":
    sys.exit(main())
