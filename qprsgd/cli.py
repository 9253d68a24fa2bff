"""Command line: ``qprsgd run | topo | ...``.

``qprsgd run CONFIG [--out DIR] [--set key.path=value ...] [--resume]`` -- validated on rank 0
before any rank does work; a bad config prints one message (naming the key, the value and
what is allowed) and every rank exits with code 2.
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


def _prepare(args, world_size: int, env: dict) -> dict:
    """Rank 0: validate everything that can be validated before work starts."""
    from . import config
    from .experiment import preflight
    from .launch import check, mpi_library
    cfg = config.load(args.config, args.set)
    bad_launch = check(env, world_size, cfg.run.ranks, mpi_library().get("library"))
    if bad_launch:
        raise ValueError(bad_launch)
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
    env = dict(os.environ)   # as the launcher set it, before MPI initialises (Open MPI adds variables)
    import yaml
    from . import config
    from .comm import Comm, install_abort_on_error, world
    w = world()
    comm = Comm(w)
    verdict = None
    if comm.rank == 0:
        try:
            verdict = _prepare(args, comm.size, env)
        except (config.ConfigError, ValueError) as e:
            verdict = {"ok": False, "error": str(e)}
    verdict = json.loads(comm.bcast_bytes(json.dumps(verdict).encode() if comm.rank == 0 else None))
    if not verdict["ok"]:
        if comm.rank == 0:
            print(f"qprsgd: {verdict['error']}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    install_abort_on_error(w)
    return _run(config.validate(yaml.safe_load(verdict["yaml"])), w, verdict["out"], args.resume)


def _run(cfg, w, out: str, resume: bool) -> int:
    from . import checkpoint as ckpt
    from .experiment import build, run_attrs
    from .logger import Logger
    from .worker import Loop
    rank = w.Get_rank()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    w.Barrier()
    exp = build(cfg, w, out)
    path = os.path.join(out, "run.h5")
    info = ckpt.latest(out) if resume else None
    if info is not None and int(info.get("world_size", -1)) != w.Get_size():
        raise ValueError(f"--resume: checkpoint was written by {info.get('world_size')} ranks, "
                         f"this job has {w.Get_size()}")
    logger = None
    if rank == 0:
        if info is None:
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
            logger = Logger(path, attrs=run_attrs(cfg, exp), world_size=w.Get_size())
            if exp.topology is not None:
                _log_topology(logger, exp.topology)
        else:
            logger = Logger(path, world_size=w.Get_size(), resume_rows=info["rows"])
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
