"""Command line: ``qprsgd run | topo | ...``.

``qprsgd run CONFIG [--out DIR] [--set key.path=value ...] [--resume] [--workers M]`` -- validated
before any worker does work (on rank 0 under MPI); a bad config prints one message (naming the
key, the value and what is allowed) and every rank exits with code 2.  With ``--workers M`` (or
``run.workers: M``) the run is in-process: M workers in this one process, no MPI at all.

Exit codes of ``qprsgd run``: 0 done; 1 a failure (an unexpected error, an unwritable folder, a
worker that raised during training: the job is aborted); 2 refused before any work (config, data
files, pre-flight, output folder state, checkpoint); 3 the model diverged (see
qprsgd/divergence.py); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Optional

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qprsgd",
        description="MPI experiment runner for communication-efficient distributed SGD. "
                    "Train with 'mpiexec -n N qprsgd run CONFIG'; 'qprsgd COMMAND -h' explains a command.",
        epilog="Documentation: README.md and docs/ (configs: docs/config.md, sweeps and reports: docs/sweeps.md).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train under MPI (launch with mpiexec -n N)")
    r.add_argument("config")
    r.add_argument("--out", default=None, help="run folder (default: a new folder under results/)")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    r.add_argument("--resume", action="store_true",
                   help="continue from the run folder's last checkpoint (newest matching folder if no --out)")
    r.add_argument("--workers", type=int, default=None, metavar="M",
                   help="run M workers inside this one process (no mpiexec; overrides run.workers)")
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
    "export": "results",
    "submit": "submit",
    "doctor": "launch",
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


# variables by which MPI launchers (hydra, Open MPI, PMIx/SLURM's srun) announce a job's size
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def _launched_size() -> int:
    """How many processes a launcher announced for this job (1 when none did).  An in-process
    run (``--workers``) is allowed in a one-process job (e.g. ``srun -n 1`` inside an allocation)
    and refused in a job of several processes, which must be one MPI rank per worker."""
    n = 1
    for v in _LAUNCHER_SIZE_VARS:
        try:
            n = max(n, int(os.environ.get(v, "1")))
        except ValueError:
            continue
    return n


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume(out: str, saved: str, cfg, world_size: int) -> None:
    """--resume: refuse a finished run, and a config that differs from the saved one, naming each
    differing key with both values and the command that resumes with the original config."""
    import yaml
    from .logger import read_attrs
    how = (f"mpiexec -n {world_size} qprsgd run {os.path.join(out, 'config.yaml')} --out {out} --resume")
    h5 = os.path.join(out, "run.h5")
    attrs = read_attrs(h5) if os.path.exists(h5) else {}
    if attrs.get("completed"):
        raise ValueError(f"--resume: {out} is finished (it completed all {attrs.get('final_step', '?')} steps; "
                         f"results in {h5}); nothing to resume. To train longer, start a new run "
                         f"with a larger train.epochs and another --out")
    with open(saved) as f:
        text = f.read()
    if text == cfg.to_yaml():
        return
    old, new = _flat(yaml.safe_load(text)), _flat(yaml.safe_load(cfg.to_yaml()))
    absent = object()
    keys = [k for k in dict.fromkeys(list(old) + list(new)) if old.get(k, absent) != new.get(k, absent)]
    if not keys:    # same values, different text (e.g. written by another version): the values decide
        return
    show = lambda d, k: "(absent)" if k not in d else repr(d[k])
    diffs = "; ".join(f"{k}: {show(old, k)} in {saved}, {show(new, k)} now" for k in keys)
    raise ValueError(f"--resume: the config differs from the one {out} was run with: {diffs}. "
                     f"Resume with the original config: {how}")


_LOCK = None  # rank 0's lock on the output folder (qprsgd.ownership), released when the run ends


def _prepare(args, world_size: int, env: Optional[dict] = None) -> dict:
    """Rank 0: validate everything that can be validated before work starts, then take the
    output folder (lock; --force/--resume rules; checkpoint verification).  ``env``: the
    environment as the MPI launcher set it (MPI runs: the launch check); None in-process."""
    global _LOCK
    from . import checkpoint as ckpt
    from . import config
    from .ownership import acquire
    from .preflight import check_run
    if args.resume and getattr(args, "force", False):
        raise ValueError("--resume and --force contradict each other (continue the run, or replace it)")
    cfg = config.load(args.config, args.set)
    if env is not None:
        from .launch import check, mpi_library
        bad_launch = check(env, world_size, cfg.run.ranks, mpi_library().get("library"))
        if bad_launch:
            raise ValueError(bad_launch)
    elif cfg.run.ranks is not None and cfg.run.ranks != world_size:
        raise ValueError(f"run.ranks: {cfg.run.ranks} pins the world size, but this in-process run has "
                         f"{world_size} workers (--workers / run.workers)")
    if env is not None and cfg.run.workers is not None and world_size > 1:   # an MPI job
        raise ValueError(f"run.workers: {cfg.run.workers} runs every worker in one process, but this job "
                         f"has {world_size} MPI ranks; remove run.workers (one rank per worker) or start "
                         f"it without mpiexec/srun")
    check_run(cfg, world_size)
    if args.resume:
        out = args.out or _find_resume(cfg.run.name)
        saved = os.path.join(out, "config.yaml")
        if not os.path.exists(saved):
            raise ValueError(f"--resume: {out} holds no config.yaml (not a run folder)")
        _check_resume(out, saved, cfg, world_size)
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


def _verdict(args, world_size: int, env: Optional[dict] = None) -> dict:
    """Rank 0: ``_prepare`` with every failure turned into a verdict (never a raise), so the
    other ranks, waiting in the broadcast, always learn the outcome.

    Exit codes: 2 -- bad input refused before any work (config, data files, folder state,
    checkpoint); 1 -- anything else (an unreadable output folder, an internal error)."""
    import traceback
    try:
        return _prepare(args, world_size, env)
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
    if args.workers is not None and args.workers < 1:
        print(f"qprsgd: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_CONFIG
    # (the launch check of an MPI job compares these counts with MPI's world size: qprsgd/launch.py)
    if _launched_size() == 1:
        # one process: decide the backend here, without MPI
        from . import config
        try:
            cfg = config.load(args.config, args.set)
        except (config.ConfigError, ValueError, OSError) as e:
            print(f"qprsgd: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        M = args.workers if args.workers is not None else cfg.run.workers
        if M is not None:
            return cmd_run_inprocess(args, M)
    elif args.workers is not None:
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
            print("qprsgd: --workers runs every worker in one process; start it without mpiexec/srun",
                  file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return cmd_run_mpi(args)


def cmd_run_mpi(args) -> int:
    """One MPI rank per worker (mpiexec / srun); Ctrl-C ends it with one line (``_interrupted``)."""
    from . import interrupt
    interrupt.install()     # Ctrl-C is never lost in a finalizer nor raised mid-write
    env = dict(os.environ)   # as the launcher set it, before MPI initialises (Open MPI adds variables)
    from .comm import world
    w = world()
    try:
        return _cmd_run_mpi(args, w, env)
    except KeyboardInterrupt as e:
        return _interrupted(w.Get_rank(), w.Get_size(), getattr(e, "out", None), getattr(e, "step", None),
                            getattr(e, "total", None))


def _cmd_run_mpi(args, w, env: dict) -> int:
    import yaml
    from . import config
    from .comm import Comm, install_abort_on_error
    # first: from here on an uncaught raise on any rank aborts the whole job (exit 1) instead of
    # leaving the other ranks in a collective forever
    install_abort_on_error(w)
    comm = Comm(w)
    verdict = _verdict(args, comm.size, env) if comm.rank == 0 else None
    verdict = json.loads(comm.bcast_bytes(json.dumps(verdict).encode() if comm.rank == 0 else None))
    if not verdict["ok"]:
        if comm.rank == 0:
            print(f"qprsgd: {verdict['error']}", file=sys.stderr, flush=True)
        return int(verdict["code"])
    if comm.rank == 0 and verdict.get("note"):
        print(f"qprsgd: {verdict['out']}: {verdict['note']}", file=sys.stderr, flush=True)
    cfg = config.validate(yaml.safe_load(verdict["yaml"]))
    if comm.rank == 0:
        for line in preflight_warnings(cfg, comm.size):
            print(f"qprsgd: {line}", file=sys.stderr, flush=True)      # "qprsgd: WARNING: ..."
    try:
        return _run(cfg, Comm(w, timeout=cfg.run.timeout), verdict["out"], verdict["info"])
    except KeyboardInterrupt as e:
        e.out = verdict["out"]
        raise
    finally:
        if comm.rank == 0:
            _release_lock()


INTERRUPT_MARK = ".interrupted"
"""Created in the run folder by rank 0 once it has closed run.h5 and printed the Ctrl-C line: the
other ranks wait for it before they exit (a rank that exits first makes mpiexec kill the rest,
rank 0 included, possibly halfway through closing the log)."""

INTERRUPT_WAIT = 15.0
"""Seconds a rank other than 0 waits for rank 0's :data:`INTERRUPT_MARK` after Ctrl-C; past it,
that rank prints the line itself (rank 0 never got to it) and exits."""


def _interrupted(rank: int, size: int, out, step, total, mpi: bool = True) -> int:
    """Ctrl-C (SIGINT, which mpiexec forwards to every rank): one line, from rank 0, then exit 130.

    Every row the logger had flushed is in run.h5 (rank 0 flushes its buffered rows and closes the
    file before it gets here; HDF5 writes hold Ctrl-C back until they are whole) and the last
    complete checkpoint stays valid.  Under MPI each rank leaves with ``os._exit(130)``, without
    MPI_Finalize (a rank still blocked inside an MPI call would never get there); rank 0 goes
    first, the others wait (at most :data:`INTERRUPT_WAIT` s) for its mark, so that the launcher
    cannot kill rank 0 while it closes the log.  In-process (``mpi=False``) the one process
    prints and returns 130."""
    from . import checkpoint as ckpt

    def message() -> str:
        where = f" at step {step}" + (f" of {total}" if total else "") if step is not None else ""
        msg = f"qprsgd: interrupted (Ctrl-C){where}"
        if out:
            info = ckpt.latest(out)
            msg += f"; {os.path.join(out, 'run.h5')} keeps every row logged so far"
            if info is not None:
                launch = f"mpiexec -n {size} qprsgd run" if mpi else "qprsgd run"
                tail = "" if mpi else f" --workers {size}"
                msg += (f"; last checkpoint: step {info['step']}; continue with: {launch} "
                        f"{os.path.join(out, 'config.yaml')} --out {out} --resume{tail}")
            else:
                msg += ("; no checkpoint was written (train.checkpoint_every), so --resume would "
                        "have nothing to start from")
        return msg

    if not (size > 1 and mpi):
        print(message(), file=sys.stderr, flush=True)
        return 130
    if rank == 0:
        print(message(), file=sys.stderr, flush=True)
        if out:
            try:
                with open(os.path.join(out, INTERRUPT_MARK), "w") as f:
                    f.write("interrupted\n")
            except OSError as exc:      # the folder vanished: the others time out and exit
                print(f"qprsgd: could not write {INTERRUPT_MARK} in {out}: {exc}", file=sys.stderr, flush=True)
    elif out:
        mark = os.path.join(out, INTERRUPT_MARK)
        deadline = time.monotonic() + INTERRUPT_WAIT
        while not os.path.exists(mark) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not os.path.exists(mark):
            print(message() + f" (rank {rank}: rank 0 did not report within {INTERRUPT_WAIT:.0f} s)",
                  file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def topology_report(cfg, M: int) -> str:
    """``qprsgd topo``'s report for this config on M workers (neighbours, rho, mu, zeta and the
    pre-flight verdicts, a broken condition on a line starting with ``WARNING:``)."""
    from .experiment import build_topology
    from .topology import format_report
    topo = build_topology(cfg, M)
    alpha, d, s = codec_constants(cfg)
    return format_report(topo, alpha=alpha, d=d, s=s)


def preflight_warnings(cfg, world_size: int) -> list[str]:
    """The ``WARNING:`` lines of :func:`topology_report` (DCD-PSGD Theorem 1, D-Q-PR-SGD Theorem 2,
    EASGD's zeta): ``qprsgd run`` prints them on rank 0 before training, as ``qprsgd topo`` does."""
    if cfg.topology is None:
        return []
    from .experiment import build_topology, roles_for
    M = roles_for(cfg, world_size).M
    if getattr(build_topology(cfg, M), "time_varying", False):
        return []   # the theorems' conditions assume one fixed W; `qprsgd topo` prints the sequence's spectra
    text = topology_report(cfg, M)
    return [line for line in text.splitlines() if line.startswith("WARNING:")]


def codec_constants(cfg) -> tuple:
    """(alpha, d, s) for the topology pre-flight: the codec's compression constant (None when it
    states none), the model dimension and the QSGD level (None for other codecs)."""
    if cfg.codec is None:
        return None, None, None
    from .experiment import model_size
    from .registry import CODECS
    d, _ = model_size(cfg)
    cls = CODECS.get(cfg.codec.name).factory
    alpha = cls.alpha(d, **cfg.codec.kwargs()) if hasattr(cls, "alpha") else None
    s = cfg.codec.kwargs().get("s") if cfg.codec.name.startswith("qsgd") else None
    if cfg.codec.name.startswith("qsgd") and s is None:
        import math
        s = math.isqrt(d - 1) + 1 if d > 1 else 1
    return alpha, d, s


def cmd_run_inprocess(args, M: int) -> int:
    """M workers in this process (qprsgd.inprocess): same build, loop, logging; no MPI."""
    import yaml
    from . import config
    from .experiment import build_topology, load_data, roles_for
    from .inprocess import WorkerFailed, run_workers
    verdict = _verdict(args, M)
    if not verdict["ok"]:
        print(f"qprsgd: {verdict['error']}", file=sys.stderr, flush=True)
        return int(verdict["code"])
    if verdict.get("note"):
        print(f"qprsgd: {verdict['out']}: {verdict['note']}", file=sys.stderr, flush=True)
    cfg = config.validate(yaml.safe_load(verdict["yaml"]))
    for line in preflight_warnings(cfg, M):
        print(f"qprsgd: {line}", file=sys.stderr, flush=True)
    data = load_data(cfg)                                 # one copy, shared by the workers
    topo = build_topology(cfg, roles_for(cfg, M).M)       # likewise (pure math, identical for all)
    from .divergence import EXIT_DIVERGED
    try:
        codes = run_workers(M, lambda t: _run(cfg, t, verdict["out"], verdict["info"], data=data, topology=topo,
                                              backend="inprocess"),
                            timeout=cfg.run.timeout)
    except WorkerFailed as e:
        sys.stdout.flush()
        if isinstance(e.exc, _DivergedBetweenRows):
            print(f"qprsgd: worker {e.rank}: {e.exc}", file=sys.stderr, flush=True)
            return EXIT_DIVERGED
        if e.tb:
            sys.stderr.write(e.tb)
        print(f"qprsgd: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return _interrupted(0, M, verdict["out"], None, None, mpi=False)
    finally:
        _release_lock()
    return max(codes)


class _DivergedBetweenRows(RuntimeError):
    """In-process: one worker hit non-finite numbers between metrics rows (see ``_diverged``)."""


def _run(cfg, comm, out: str, info, data=None, topology=None, backend: str = "mpi",
         stop_after=None) -> int:
    """Every worker: build and train; ``comm`` is its world transport (MPI or in-process).
    ``info``: the verified checkpoint to resume from, or None.  ``stop_after`` (tests only) stops
    after that many steps like a killed run: no final parameters, not completed."""
    from . import checkpoint as ckpt
    from .experiment import build, run_attrs
    from .logger import Logger
    from .worker import Loop
    rank = comm.rank
    if rank == 0 and os.path.exists(os.path.join(out, INTERRUPT_MARK)):
        os.remove(os.path.join(out, INTERRUPT_MARK))
    comm.barrier()
    exp = build(cfg, comm, out, data=data, topology=topology, backend=backend)
    path = os.path.join(out, "run.h5")
    logger = None
    if rank == 0:
        if info is None:
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
        # a fresh run.h5 in both cases: a resume rebuilds it from the rows saved in the checkpoint
        restore = None if info is None else ckpt.load_log(out, int(info["step"]))
        logger = Logger(path, attrs=run_attrs(cfg, exp), world_size=comm.size, restore=restore,
                        arrays=None if exp.topology is None else _topology_arrays(exp.topology, exp.total_steps))
        if info is not None:
            print(f"resuming {out} from step {info['step']}", flush=True)
    loop = Loop(exp, logger)
    if info is not None:
        loop.load_checkpoint(info)
    try:
        loop.run(stop_after=stop_after)
    except KeyboardInterrupt as e:
        if logger is not None:
            logger.close()      # flushed and closed: whole rows, readable by any reader
        e.step, e.total = loop.t, exp.total_steps
        raise
    except Exception as exc:
        from .divergence import explain
        d = explain(exc, exp.placement.x, loop.t, exp.lr_at(max(loop.t - 1, 0)))
        if d is None:
            raise  # a failure: the abort hook (MPI) or the in-process runner ends the job (exit 1)
        return _diverged(d, exc, comm, logger, backend)
    if loop.t < exp.total_steps:
        if logger is not None:
            logger.close()
        return 0   # stopped early (tests): what a killed run leaves behind
    params = loop.final_params()
    if rank == 0:
        logger.write_array("final/params", params)
        # how many gradient buckets rank 0 handed over from backward's hooks in this process
        # (since the run's last start or resume): > 0 is overlap that happened, not only planned
        logger.set_attrs(completed=True, final_step=loop.t, bucket_hook_deliveries=loop.buckets.hooked)
        logger.close()
        print(f"wrote {path}", flush=True)
    return 0


def _diverged(d, exc, comm, logger, backend: str = "mpi") -> int:
    """Stop a diverged run: the log keeps its rows and says why, ``completed`` stays false."""
    from .divergence import EXIT_DIVERGED, Diverged
    rank = comm.rank
    if logger is not None:
        logger.set_attrs(diverged=True, divergence=str(d))
        logger.close()
    if isinstance(exc, Diverged):  # every rank raised it at the same row: a clean, collective stop
        if rank == 0:
            print(f"qprsgd: {d}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    # one worker failed on non-finite numbers between rows; the others wait for it: end the job
    if backend == "inprocess":
        raise _DivergedBetweenRows(str(d)) from exc   # the in-process runner stops the others (exit 3)
    print(f"qprsgd: rank {rank}: {d}", file=sys.stderr, flush=True)
    if comm.size > 1:
        from .comm import abort
        if rank == 0:
            _release_lock()
        abort(comm.mpi, EXIT_DIVERGED)
    return EXIT_DIVERGED


def _topology_arrays(topo, total_steps: int = 0) -> dict:
    """``topology/W`` with its report numbers as attrs, for the Logger to write at creation
    (a time-varying topology: :func:`_sequence_arrays`)."""
    if getattr(topo, "time_varying", False):
        return _sequence_arrays(topo, total_steps)
    from .topology import report
    rep = report(topo)
    attrs = {k: v for k, v in rep.items() if isinstance(v, (int, float))}
    attrs["name"] = topo.name
    return {"topology/W": (topo.W, attrs)}


def _sequence_arrays(topo, total_steps: int) -> dict:
    """A time-varying topology (docs/logging.md): ``topology/W`` = the mean matrix (support = every
    pair that ever talks), per-step spectra ``topology/step_sigma`` (||W_k - J||_2),
    ``step_messages``, ``step_max_degree`` over one period (random sequences: the run's first
    min(total_steps, 4096) steps), and for periodic ones the matrices ``topology/W_steps``."""
    import numpy as np
    from .topology import sequence_report
    steps = topo.period if topo.period is not None else max(1, min(int(total_steps), 4096))
    rep = sequence_report(topo, steps)
    attrs = {"name": topo.name, "time_varying": True, "period": rep.period or 0,
             "rho_period": rep.rho_period, "steps_to_exact": rep.steps_to_exact or 0,
             "M": topo.M, "v": topo.v}
    attrs.update({k: v for k, v in topo.meta.items() if isinstance(v, (int, float, str, bool))})
    out = {"topology/W": (topo.W, attrs),
           "topology/step_sigma": (np.asarray(rep.step_sigma, dtype=np.float64), {}),
           "topology/step_messages": (np.asarray(rep.step_messages, dtype=np.int64), {}),
           "topology/step_max_degree": (np.asarray(rep.step_max_degree, dtype=np.int64), {})}
    if topo.period is not None and topo.period * topo.M * topo.M <= 4_000_000:
        out["topology/W_steps"] = (np.stack([topo.W_at(k) for k in range(topo.period)]), {})
    return out


def cmd_topo(args) -> int:
    from . import config
    from .experiment import build_topology, roles_for
    try:
        cfg = config.load(args.config, args.set)
        M = args.workers
        if M is None:
            M = roles_for(cfg, int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))).M
        if cfg.topology is None:
            raise ValueError(f"algorithm {cfg.algorithm.name!r} uses no topology")
        topo = build_topology(cfg, M)
    except (config.ConfigError, ValueError) as e:
        print(f"qprsgd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(topo, "time_varying", False):
        from .topology import format_sequence_report
        print(format_sequence_report(topo))
        return 0
    print(topology_report(cfg, M))
    if cfg.codec is not None and codec_constants(cfg)[0] is None:
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
        import shutil
        import textwrap
        width = max(60, min(120, shutil.get_terminal_size((100, 20)).columns))
        for reg in (ALGORITHMS, CODECS, TOPOLOGIES, MODELS, DATASETS):
            print(f"{reg.plural}:")
            for n in reg.names():
                print(textwrap.fill(reg.get(n).doc, width, initial_indent=f"  {n:22s} ",
                                    subsequent_indent=" " * 25, break_on_hyphens=False))
        print("Parameters and papers: docs/algorithms-*.md, docs/codecs.md, docs/topology.md, docs/models.md, "
              "docs/data.md")
        return 0
    mod = __import__(f"qprsgd.{_EXTRA[args.cmd]}", fromlist=["main"])
    return mod.main(args)


if __name__ == "__main__":
    sys.exit(main())
