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
    p = argparse.ArgumentParser(prog="qprsgd", description=__doc__.splitlines()[0])
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
        with open(saved) as f:
            if f.read() != cfg.to_yaml():
                raise ValueError(f"--resume: the config differs from the one {out}/config.yaml was run with")
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
    """One MPI rank per worker (mpiexec / srun)."""
    import yaml
    from . import config
    from .comm import Comm, install_abort_on_error, world
    w = world()
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
    return _run(cfg, Comm(w, timeout=cfg.run.timeout), verdict["out"], args.resume)


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
    return 0


def _run(cfg, comm, out: str, resume: bool, data=None, topology=None, backend: str = "mpi") -> int:
    """Train on this worker; ``comm`` is its world transport (MPI or in-process)."""
    from . import checkpoint as ckpt
    from .experiment import build, run_attrs
    from .logger import Logger
    from .worker import Loop
    rank = comm.rank
    if rank == 0:
        os.makedirs(out, exist_ok=True)
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
                _log_topology(logger, exp.topology, exp.total_steps)
        else:
            logger = Logger(path, world_size=comm.size, resume_rows=info["rows"])
            print(f"resuming {out} from step {info['step']}", flush=True)
    loop = Loop(exp, logger)
    if info is not None:
        loop.load_checkpoint(info)
    loop.run()
    params = loop.final_params()
    if rank == 0:
        logger.write_array("final/params", params)
        logger.set_attrs(completed=True, final_step=loop.t)
        print(f"wrote {path}", flush=True)
    return 0


def _log_topology(logger, topo, total_steps: int = 0) -> None:
    if getattr(topo, "time_varying", False):
        return _log_sequence(logger, topo, total_steps)
    from .topology import report
    rep = report(topo)
    attrs = {k: v for k, v in rep.items() if isinstance(v, (int, float))}
    attrs["name"] = topo.name
    logger.write_array("topology/W", topo.W, attrs=attrs)


def _log_sequence(logger, topo, total_steps: int) -> None:
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
    logger.write_array("topology/W", topo.W, attrs=attrs)
    logger.write_array("topology/step_sigma", np.asarray(rep.step_sigma, dtype=np.float64))
    logger.write_array("topology/step_messages", np.asarray(rep.step_messages, dtype=np.int64))
    logger.write_array("topology/step_max_degree", np.asarray(rep.step_max_degree, dtype=np.int64))
    if topo.period is not None and topo.period * topo.M * topo.M <= 4_000_000:
        logger.write_array("topology/W_steps", np.stack([topo.W_at(k) for k in range(topo.period)]))


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
