"""Command line: ``qprsgd run | topo | ...``.

``qprsgd run CONFIG [--out DIR] [--set key.path=value ...] [--resume] [--workers M]`` -- validated
before any worker does work (on rank 0 under MPI); a bad config prints one message (naming the
key, the value and what is allowed) and every rank exits with code 2.  With ``--workers M`` (or
``run.workers: M``) the run is in-process: M workers in this one process, no MPI at all.
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


# variables by which MPI launchers (hydra, Open MPI, PMIx, SLURM's srun) announce a job
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "SLURM_STEP_NUM_TASKS")


def _under_launcher() -> bool:
    """Was this process started by an MPI launcher (mpiexec, mpirun, srun)?"""
    return any(v in os.environ for v in _LAUNCHER_VARS)


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


def _prepare(args, world_size: int) -> dict:
    """Rank 0: validate everything that can be validated before work starts."""
    from . import config
    from .experiment import preflight
    cfg = config.load(args.config, args.set)
    if cfg.run.workers is not None and world_size > 1:
        raise ValueError(f"run.workers: {cfg.run.workers} runs every worker in one process, but this job "
                         f"has {world_size} MPI ranks; remove run.workers (one rank per worker) or start "
                         f"it without mpiexec/srun")
    preflight(cfg, world_size)
    if args.resume:
        out = args.out or _find_resume(cfg.run.name)
        saved = os.path.join(out, "config.yaml")
        if not os.path.exists(saved):
            raise ValueError(f"--resume: {out} holds no config.yaml (not a run folder)")
        _check_resume(out, saved, cfg, world_size)
    else:
        out = args.out or _default_out(cfg.run.name)
    return {"ok": True, "yaml": cfg.to_yaml(), "out": out}


def cmd_run(args) -> int:
    if args.workers is not None and args.workers < 1:
        print(f"qprsgd: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_CONFIG
    if not _under_launcher():
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
    from .comm import world
    w = world()
    try:
        return _cmd_run_mpi(args, w)
    except KeyboardInterrupt as e:
        return _interrupted(w.Get_rank(), w.Get_size(), getattr(e, "out", None), getattr(e, "step", None),
                            getattr(e, "total", None))


def _cmd_run_mpi(args, w) -> int:
    import yaml
    from . import config
    from .comm import Comm, install_abort_on_error
    comm = Comm(w)
    verdict = None
    if comm.rank == 0:
        try:
            verdict = _prepare(args, comm.size)
        except (config.ConfigError, ValueError) as e:
            verdict = {"ok": False, "error": str(e)}
    verdict = json.loads(comm.bcast_bytes(json.dumps(verdict).encode() if comm.rank == 0 else None))
    if not verdict["ok"]:
        if comm.rank == 0:
            print(f"qprsgd: {verdict['error']}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    install_abort_on_error(w)
    cfg = config.validate(yaml.safe_load(verdict["yaml"]))
    if comm.rank == 0:
        for line in preflight_warnings(cfg, comm.size):
            print(f"qprsgd: {line}", file=sys.stderr, flush=True)      # "qprsgd: WARNING: ..."
    try:
        return _run(cfg, Comm(w, timeout=cfg.run.timeout), verdict["out"], args.resume)
    except KeyboardInterrupt as e:
        e.out = verdict["out"]
        raise


INTERRUPT_MARK = ".interrupted"
"""Created (O_EXCL) in the run folder by the first rank that handles Ctrl-C: that rank alone prints."""


def _interrupted(rank: int, size: int, out, step, total, mpi: bool = True) -> int:
    """Ctrl-C (SIGINT, which mpiexec forwards to every rank): one line, from one rank, then exit 130.

    Every row the logger had flushed is in run.h5 (rank 0 flushes its buffered rows first; HDF5
    writes hold Ctrl-C back until they are whole) and the last complete checkpoint stays valid.
    Under MPI the rank leaves with ``os._exit(130)``, without MPI_Finalize: a rank still blocked
    inside an MPI call would never get there, and mpiexec ends the remaining ranks itself.
    In-process (``mpi=False``) the one process prints and returns 130."""
    from . import checkpoint as ckpt
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
            msg += "; no checkpoint was written (train.checkpoint_every), so --resume would have nothing to start from"
    first = rank == 0
    if out and size > 1 and mpi:
        try:
            fd = os.open(os.path.join(out, INTERRUPT_MARK), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, (msg + "\n").encode())
            os.close(fd)
            first = True
        except FileExistsError:
            first = False
        except OSError:
            pass
    if first:
        print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if size > 1 and mpi:
        os._exit(130)
    return 130


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
    from .experiment import roles_for
    text = topology_report(cfg, roles_for(cfg, world_size).M)
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
    try:
        verdict = _prepare(args, M)
    except (config.ConfigError, ValueError) as e:
        print(f"qprsgd: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    cfg = config.validate(yaml.safe_load(verdict["yaml"]))
    for line in preflight_warnings(cfg, M):
        print(f"qprsgd: {line}", file=sys.stderr, flush=True)
    data = load_data(cfg)                                 # one copy, shared by the workers
    topo = build_topology(cfg, roles_for(cfg, M).M)       # likewise (pure math, identical for all)
    try:
        run_workers(M, lambda t: _run(cfg, t, verdict["out"], args.resume, data=data, topology=topo,
                                      backend="inprocess"),
                    timeout=cfg.run.timeout)
    except WorkerFailed as e:
        sys.stdout.flush()
        if e.tb:
            sys.stderr.write(e.tb)
        print(f"qprsgd: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return _interrupted(0, M, verdict["out"], None, None, mpi=False)
    return 0


def _run(cfg, comm, out: str, resume: bool, data=None, topology=None, backend: str = "mpi",
         stop_after=None) -> int:
    """Train on this worker; ``comm`` is its world transport (MPI or in-process).  ``stop_after``
    (tests only) stops after that many steps like a killed run: no final parameters, not completed."""
    from . import checkpoint as ckpt
    from .experiment import build, run_attrs
    from .logger import Logger
    from .worker import Loop
    rank = comm.rank
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, INTERRUPT_MARK)):
            os.remove(os.path.join(out, INTERRUPT_MARK))
    comm.barrier()
    exp = build(cfg, comm, out, data=data, topology=topology, backend=backend)
    path = os.path.join(out, "run.h5")
    info = ckpt.latest(out) if resume else None
    if info is not None and int(info.get("world_size", -1)) != comm.size:
        raise ValueError(f"--resume: checkpoint was written by {info.get('world_size')} ranks, "
                         f"this job has {comm.size}")
    logger = None
    if rank == 0:
        if info is None:
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
            logger = Logger(path, attrs=run_attrs(cfg, exp), world_size=comm.size)
            if exp.topology is not None:
                _log_topology(logger, exp.topology)
        else:
            logger = Logger(path, world_size=comm.size, resume_rows=info["rows"])
            print(f"resuming {out} from step {info['step']}", flush=True)
    loop = Loop(exp, logger)
    if info is not None:
        loop.load_checkpoint(info)
    try:
        loop.run(stop_after=stop_after)
    except KeyboardInterrupt as e:
        if logger is not None:
            logger.flush()
        e.step, e.total = loop.t, exp.total_steps
        raise
    if loop.t < exp.total_steps:
        return 0   # stopped early (tests): what a killed run leaves behind
    params = loop.final_params()
    if rank == 0:
        logger.write_array("final/params", params)
        logger.set_attrs(completed=True, final_step=loop.t)
        print(f"wrote {path}", flush=True)
    return 0


def _log_topology(logger, topo) -> None:
    from .topology import report
    rep = report(topo)
    attrs = {k: v for k, v in rep.items() if isinstance(v, (int, float))}
    attrs["name"] = topo.name
    logger.write_array("topology/W", topo.W, attrs=attrs)


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
        build_topology(cfg, M)
    except (config.ConfigError, ValueError) as e:
        print(f"qprsgd: {e}", file=sys.stderr)
        return EXIT_CONFIG
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
