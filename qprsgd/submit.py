"""``qprsgd submit CONFIG --nodes N --ntasks-per-node T``: one run as a SLURM job, from
jobs/slurm_run.sbatch, with nothing to fill by hand.

The config (with ``--set`` overrides and ``run.ranks`` pinned to nodes × tasks per node) is
validated here, with the topology pre-flight for that world size, before anything is written;
the normalized config is frozen into ``<out>/job-config.yaml`` and the job runs that file (an
edit of CONFIG after submitting changes nothing).  The script calls this venv's Python, passes
``srun --mpi`` for the MPI library mpi4py loads here (``--mpi`` overrides), drops the gres line on
CPU jobs and exports the MPI-choosing variables of this shell (docs/cluster.md).

``--print`` prints the script and writes nothing; ``--submit`` writes it and calls ``sbatch``;
neither: writes ``<out>/job.sbatch`` and prints how to submit it.
"""
from __future__ import annotations

import os
import shlex
import sys

from . import config as qconfig
from .sweep import (JOBS_DIR, SRUN_MPI_CHOICES, SweepError, fill_template, sbatch, slurm_values,
                    srun_mpi)


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="write (and submit) a SLURM job for one run: sbatch + srun")
    p.add_argument("config")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--ntasks-per-node", type=int, required=True, help="MPI ranks per node")
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 (default): no gres line (CPU job)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--time", default="01:00:00", help="SLURM time limit")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--job-name", default=None, help="default: run.name")
    p.add_argument("--mpi", default="auto", choices=SRUN_MPI_CHOICES,
                   help="srun --mpi plugin (default auto: pmi2 for the MPICH family, pmix for Open MPI)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML syntax), repeatable")
    p.add_argument("--out", default=None, help="run folder (default: a new folder under results/)")
    p.add_argument("--template", default=None, help="job template (default jobs/slurm_run.sbatch)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--print", action="store_true", help="print the job script; write nothing")
    what.add_argument("--submit", action="store_true", help="write the script and submit it with sbatch")


def job_script(args, out: str, ranks: int, mpi: str, name: str) -> str:
    values = slurm_values(name=name, nodes=args.nodes, tasks_per_node=args.ntasks_per_node,
                          cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node,
                          time_limit=args.time, partition=args.partition, account=args.account,
                          log_dir=out, mpi=mpi)
    values.update(NTASKS=ranks, CONFIG=shlex.quote(os.path.join(os.path.abspath(out), "job-config.yaml")),
                  OUT=shlex.quote(os.path.abspath(out)))
    with open(args.template or os.path.join(JOBS_DIR, "slurm_run.sbatch")) as f:
        return fill_template(f.read(), values)


def main(args) -> int:
    from .cli import _default_out
    from .experiment import preflight
    try:
        for key, v in (("--nodes", args.nodes), ("--ntasks-per-node", args.ntasks_per_node)):
            if v < 1:
                raise SweepError(f"{key}: an integer >= 1 (got {v})")
        ranks = args.nodes * args.ntasks_per_node
        raw = qconfig.apply_overrides(qconfig.load_yaml(args.config), args.set)
        pinned = (raw.get("run") or {}).get("ranks") if isinstance(raw.get("run"), dict) else None
        if pinned is not None and pinned != ranks:
            raise SweepError(f"run.ranks: the config pins {pinned!r} processes but --nodes {args.nodes} × "
                             f"--ntasks-per-node {args.ntasks_per_node} = {ranks}")
        raw = qconfig.apply_overrides(raw, [f"run.ranks={ranks}"])
        cfg = qconfig.validate(raw)
        preflight(cfg, ranks)
        mpi, why = srun_mpi(args.mpi)
        out = args.out or _default_out(cfg.run.name)
        script = job_script(args, out, ranks, mpi, args.job_name or cfg.run.name)
    except (SweepError, qconfig.ConfigError, ValueError, OSError) as e:
        print(f"qprsgd submit: {e}", file=sys.stderr)
        return 2
    if args.print:
        sys.stdout.write(script)
        return 0
    if os.path.exists(os.path.join(out, "run.h5")):
        print(f"qprsgd submit: {out} already holds a run (run.h5); pass another --out", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "job-config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    path = os.path.join(out, "job.sbatch")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    print(f"{ranks} ranks ({args.nodes} × {args.ntasks_per_node}); srun --mpi={mpi}: {why}")
    if not args.submit:
        print(f"wrote {path}: submit with  sbatch {path}")
        return 0
    try:
        job = sbatch(path)
    except SweepError as e:
        print(f"qprsgd submit: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}; submitted job {job} (log {os.path.join(out, f'slurm-{job}.out')})")
    return 0
