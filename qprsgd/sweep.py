"""``qprsgd sweep SWEEP.yaml``: expand a sweep into runs, validate them, run them or write a job array.

Sweep file (docs/sweeps.md)::

    name: r3                      # results/<name>/ (override with --out)
    base: ../default.yaml         # a config file (relative to this file) or an inline mapping
    ranks: 8                      # processes per run (mpiexec -n); may also be an axis
    set:                          # dotted overrides applied to the base before the axes
      train.epochs: 4
    grid:                         # cartesian product of these axes (dotted keys)
      algorithm: [{name: psgd}, {name: pr_sgd, K: 4}, {name: qpr_sgd, K: 4}]
      seed: [0, 1]
    zip:                          # axes advanced together (equal lengths): one more grid axis
      codec.name: [identity, qsgd]
      run.name: [full, quant]

An axis value that is a mapping replaces the whole section (``algorithm: {name: pr_sgd, K: 4}``),
so combinations that need different parameters are written as one axis; ``zip`` may also be a
list of such groups.  The key ``ranks`` sets the process count of a run.

Every run is validated with ``qprsgd.config.validate`` (and the topology pre-flight for its
rank count) before anything runs; invalid combinations are listed with the reason and, unless
``--skip-invalid``, nothing runs.  Run folders are ``<out>/<NNN>-<label>/`` holding
``config.yaml`` (the normalized config) and, after the run, ``run.h5``.  ``<out>/sweep.json``
holds the plan and ``<out>/index.csv`` one row per run (status and headline numbers).
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from . import config as qconfig

SWEEP_KEYS = ("name", "base", "ranks", "set", "grid", "zip", "description")
JOBS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")


class SweepError(ValueError):
    pass


@dataclass
class Run:
    index: int
    name: str
    ranks: int
    axes: dict            # dotted key -> value of this run
    raw: dict             # the config dict after base + set + axes
    label: str            # axes without seed (runs with equal labels are repeats)
    error: Optional[str] = None
    yaml: Optional[str] = None   # normalized config (when valid)
    folder: str = ""
    status: str = "planned"
    extra: dict = field(default_factory=dict)
    note: str = ""        # why a run is failed / wrong-size / running


def set_dotted(d: dict, key: str, value: Any) -> None:
    """``set_dotted(cfg, 'algorithm.K', 4)``; a mapping value replaces the whole node."""
    parts = key.split(".")
    if not all(parts):
        raise SweepError(f"axis key {key!r}: empty component")
    node = d
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise SweepError(f"axis key {key!r}: {p!r} is not a mapping (got {node[p]!r})")
        node = node[p]
    node[parts[-1]] = copy.deepcopy(value)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        head = str(value.get("name", ""))
        rest = [f"{k}{_short(v)}" for k, v in value.items() if k != "name"]
        return "_".join([head] + rest) if head else "_".join(rest)
    if isinstance(value, (list, tuple)):
        return "x".join(_short(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.]+", "", str(value))


def _label_part(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    if isinstance(value, dict) or leaf == "name":
        return _short(value)
    if leaf == "seed":
        return f"s{_short(value)}"
    return f"{leaf}{_short(value)}"


def _axes(spec: dict) -> list[list[dict]]:
    """Each axis: a list of {key: value} assignments (a zip group assigns several keys)."""
    axes = []
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"grid: must be a mapping of dotted key -> list of values (got {grid!r})")
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"grid.{k}: must be a non-empty list (got {vals!r})")
        axes.append([{k: v} for v in vals])
    zips = spec.get("zip") or []
    if isinstance(zips, dict):
        zips = [zips]
    if not isinstance(zips, list):
        raise SweepError(f"zip: must be a mapping (or a list of mappings) of key -> list (got {zips!r})")
    for gi, group in enumerate(zips):
        if not isinstance(group, dict) or not group:
            raise SweepError(f"zip[{gi}]: must be a non-empty mapping (got {group!r})")
        lens = {k: len(v) if isinstance(v, list) else -1 for k, v in group.items()}
        if any(n <= 0 for n in lens.values()) or len(set(lens.values())) != 1:
            raise SweepError(f"zip[{gi}]: every key needs a non-empty list of the same length (got lengths {lens})")
        n = next(iter(lens.values()))
        axes.append([{k: group[k][i] for k in group} for i in range(n)])
    return axes


def load_spec(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            spec = qconfig.yaml_load(f)
    except FileNotFoundError:
        raise SweepError(f"sweep file {path!r} does not exist") from None
    except OSError as e:
        raise SweepError(f"sweep file {path!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SweepError(f"sweep file {path!r} is not UTF-8 text; is it a binary file?") from None
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path!r} is not valid YAML: {qconfig.cut(str(e), 600)}") from None
    except RecursionError:
        raise SweepError(f"sweep file {path!r} is nested too deeply") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep file {path!r}: top level must be a mapping")
    spec = dict(spec)
    spec["_dir"] = os.path.dirname(os.path.abspath(path))
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return spec


def expand(spec: dict, validate: bool = True) -> list[Run]:
    """The runs of a sweep, in order (the last axis varies fastest), each validated."""
    unknown = [k for k in spec if k not in SWEEP_KEYS and not k.startswith("_")]
    if unknown:
        raise SweepError(f"unknown sweep keys {unknown}; allowed: {', '.join(SWEEP_KEYS)}")
    name = str(spec.get("name", "sweep"))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SweepError(f"name: only letters, digits, '_', '.', '-' (got {name!r})")
    base = spec.get("base", {})
    if isinstance(base, str):
        p = base if os.path.isabs(base) else os.path.join(spec.get("_dir", "."), base)
        base = qconfig.load_yaml(p)
    if not isinstance(base, dict):
        raise SweepError(f"base: must be a config file path or a mapping (got {base!r})")
    ranks0 = spec.get("ranks", 1)
    sets = spec.get("set") or {}
    if not isinstance(sets, dict):
        raise SweepError(f"set: must be a mapping of dotted key -> value (got {sets!r})")
    axes = _axes(spec)
    runs = []
    for i, combo in enumerate(itertools.product(*axes) if axes else [()]):
        raw = copy.deepcopy(base)
        for k, v in sets.items():
            set_dotted(raw, k, v)
        assign: dict = {}
        for part in combo:
            assign.update(part)
        ranks = ranks0
        for k, v in assign.items():
            if k == "ranks":
                ranks = v
            else:
                set_dotted(raw, k, v)
        label = "-".join(_label_part(k, v) for k, v in assign.items() if k.split(".")[-1] != "seed") or "base"
        full = "-".join(_label_part(k, v) for k, v in assign.items()) or "base"
        run = Run(i, f"{i:03d}-{full}"[:120], ranks, assign, raw, label)
        pinned = (raw.get("run") or {}).get("ranks") if isinstance(raw.get("run"), dict) else None
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            run.error = f"ranks: must be a positive integer (got {ranks!r})"
        elif pinned is not None and pinned != ranks:
            run.error = f"run.ranks: {pinned!r} differs from the sweep's ranks {ranks} (leave run.ranks out)"
        elif validate:
            set_dotted(raw, "run.ranks", ranks)   # the run refuses any other world size (qprsgd.launch)
            try:
                cfg = qconfig.validate(raw)
                from .preflight import check_run
                check_run(cfg, ranks)
                run.yaml = cfg.to_yaml()
            except ValueError as e:  # ConfigError, DatasetError, UnknownNameError, pre-flight
                run.error = str(e).replace("\n", " ")
            except RecursionError:
                run.error = "the configuration is nested too deeply"
        runs.append(run)
    return runs


# -- files ---------------------------------------------------------------------------------------
INDEX_FIELDS = ["run", "label", "ranks", "status", "final_accuracy", "best_accuracy", "final_test_loss",
                "steps", "rounds", "bits_sent", "wall_time", "world_size", "last_step", "folder"]
STATUSES = ("planned", "running", "done", "failed", "wrong-size", "invalid")
EXIT_FILE = "exit.rc"        # the launcher's exit code, written by --local and the job array
JOB_FILE = "slurm_job"       # "<array job id>_<task id>", written by the job array before srun


def _squeue_ids(job_ids: set[str], timeout: float = 30.0) -> Optional[set[str]]:
    """Ids (``123_4``) of the given jobs' array tasks still pending or running, or None when
    squeue cannot tell (not installed, no answer)."""
    import shutil
    exe = shutil.which("squeue")
    if exe is None or not job_ids:
        return None
    try:
        p = subprocess.run([exe, "-h", "-r", "-o", "%i", "-j", ",".join(sorted(job_ids))],
                           capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if p.returncode != 0 and "Invalid job id" not in p.stderr:
        return None
    return {x.strip() for x in p.stdout.split()}


def classify(folder: str, ranks: int, queued: Optional[set[str]] = None) -> tuple[str, dict, str]:
    """``(status, log state, note)`` of one run from its own files.

    done: the log says completed and its world size is the run's; diverged: the run stopped on a
    non-finite or exploding loss (exit 3); wrong-size: the log's world
    size differs (whatever else); failed: the launcher exited non-zero, or exited 0 without a
    completed log, or the SLURM task left the queue without an exit code (killed, time limit);
    running: started (log, stdout.log or a SLURM task id) and not ended; planned: nothing yet.
    ``queued``: SLURM task ids still in the queue (None: unknown, a started run counts as running)."""
    h5 = os.path.join(folder, "run.h5")
    state: dict = {}
    note = ""
    if os.path.exists(h5):
        from .logger import run_state
        try:
            state = run_state(h5)
        except OSError as e:
            note = f"log unreadable: {e}"
    rc = None
    rcp = os.path.join(folder, EXIT_FILE)
    if os.path.exists(rcp):
        with open(rcp) as f:
            txt = f.read().strip()
        rc = int(txt) if re.fullmatch(r"-?\d+", txt) else -1
    ws = state.get("world_size")
    if ws is not None and ws != ranks:
        return "wrong-size", state, f"world_size {ws}, planned {ranks}"
    if state.get("completed"):
        return "done", state, note
    if state.get("diverged") or rc == 3:   # exit 3: a research result, not a crash (divergence.py)
        return "diverged", state, str(state.get("divergence", "the run diverged"))
    if rc is not None:
        return "failed", state, (f"exit code {rc}" if rc else "exited 0 without a completed log")
    job = os.path.join(folder, JOB_FILE)
    if os.path.exists(job):
        with open(job) as f:
            task = f.read().strip()
        if queued is not None and task not in queued:
            return "failed", state, f"SLURM task {task} ended without an exit code (cancelled, time limit?)"
        return "running", state, f"SLURM task {task}"
    if state or note or os.path.exists(os.path.join(folder, "stdout.log")):
        return "running", state, note
    return "planned", state, note


def refresh(runs: list[Run], query_slurm: bool = True) -> None:
    """Set each valid run's status, log state and headline numbers from its folder."""
    queued = None
    if query_slurm:
        jobs = set()
        for r in runs:
            p = os.path.join(r.folder, JOB_FILE)
            if r.error is None and os.path.exists(p) and not os.path.exists(os.path.join(r.folder, EXIT_FILE)):
                with open(p) as f:
                    jobs.add(f.read().strip().split("_")[0])
        queued = _squeue_ids(jobs)
    for r in runs:
        if r.error is not None:
            r.status = "invalid"
            continue
        r.status, state, note = classify(r.folder, r.ranks, queued)
        r.extra = summarize_run(os.path.join(r.folder, "run.h5")) if r.status in ("done", "wrong-size") else {}
        r.extra.update(world_size=state.get("world_size", ""), last_step=state.get("last_step", ""))
        r.note = note


def summarize_run(h5: str) -> dict:
    """Headline numbers of a finished run (empty if the log is missing)."""
    if not os.path.exists(h5):
        return {}
    from .logger import read
    log = read(h5)
    ev = log.get("eval", {})
    out = {"completed": bool(log["attrs"].get("completed", False)),
           "diverged": bool(log["attrs"].get("diverged", False))}
    if len(ev.get("step", [])):
        import numpy as np
        acc = np.asarray(ev["test_accuracy"], float)
        out.update(final_accuracy=float(acc[-1]),
                   best_accuracy=float(np.nanmax(acc)) if np.isfinite(acc).any() else float("nan"),
                   final_test_loss=float(ev["test_loss"][-1]), steps=int(ev["step"][-1]),
                   rounds=int(ev["rounds"][-1]), bits_sent=int(ev["bits_sent"][-1]),
                   wall_time=float(ev["wall_time"][-1]))
    return out


def _axis_columns(axes: dict) -> dict:
    """A run's axis values as plain columns: a mapping value (``algorithm: {name: pr_sgd, K: 4}``)
    becomes one column per key (``algorithm.name``, ``algorithm.K``); a list is JSON text."""
    out = {}
    for k, v in axes.items():
        if isinstance(v, dict):
            for kk, vv in _axis_columns(v).items():
                out[f"{k}.{kk}"] = vv
        elif isinstance(v, (list, tuple)):
            out[k] = json.dumps(list(v))
        else:
            out[k] = v
    return out


def write_index(out: str, runs: list[Run]) -> str:
    keys = []
    cols = [_axis_columns(r.axes) for r in runs]
    for c in cols:
        for k in c:
            if k not in keys:
                keys.append(k)
    path = os.path.join(out, "index.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(INDEX_FIELDS[:4] + keys + INDEX_FIELDS[4:] + ["error"])
        for r, c in zip(runs, cols):
            s = r.extra
            axv = ["" if c.get(k) is None else c[k] for k in keys]
            w.writerow([r.name, r.label, r.ranks, r.status] + axv
                       + [s.get(k, "") for k in INDEX_FIELDS[4:13]] + [os.path.relpath(r.folder, out),
                                                                        r.error or r.note or ""])
    os.replace(tmp, path)
    return path


def prepare(spec: dict, runs: list[Run], out: str) -> None:
    """Create the run folders (config.yaml each), sweep.json and index.csv."""
    os.makedirs(out, exist_ok=True)
    for r in runs:
        r.folder = os.path.join(out, r.name)
        if r.error is None:
            os.makedirs(r.folder, exist_ok=True)
            cfgp = os.path.join(r.folder, "config.yaml")
            h5 = os.path.join(r.folder, "run.h5")
            if not os.path.exists(h5):
                with open(cfgp, "w") as f:
                    f.write(r.yaml)
    refresh(runs)
    plan = {"name": spec.get("name"), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": [{"index": r.index, "name": r.name, "ranks": r.ranks, "axes": r.axes, "label": r.label,
                      "error": r.error} for r in runs]}
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(plan, f, indent=1, default=str)
    write_index(out, runs)


def _mpiexec() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return cand if os.path.exists(cand) else "mpiexec"


def run_command(r: Run, mpiexec: Optional[str] = None) -> list[str]:
    return [mpiexec or _mpiexec(), "-n", str(r.ranks), sys.executable, "-m", "qprsgd.cli", "run",
            os.path.join(r.folder, "config.yaml"), "--out", r.folder]


def run_plan(spec: dict, out: str, force: bool = False) -> int:
    """Expand, validate, prepare and run a sweep locally (the reproduction scripts' path).

    Returns 0 when every run finished, 2 when a run is invalid (each printed with its reason),
    1 when a run failed."""
    runs = expand(spec)
    bad = [r for r in runs if r.error]
    for r in bad:
        print(f"{r.name}: {r.error}")
    if bad:
        return 2
    prepare(spec, runs, out)
    if run_local(runs, out, force=force):
        print("FAIL: a run failed (see its stdout.log)")
        return 1
    return 0


def run_local(runs: list[Run], out: str, timeout: Optional[float] = None, force: bool = False,
              mpiexec: Optional[str] = None) -> int:
    """Run each valid run one after another; returns the number of failed runs."""
    failed = 0
    for r in runs:
        if r.error is not None:
            continue
        if r.status in ("done", "diverged") and not force:
            print(f"[{r.index + 1}/{len(runs)}] {r.name}: done already (use --force to re-run)", flush=True)
            continue
        h5 = os.path.join(r.folder, "run.h5")
        from .checkpoint import holds_run
        again = holds_run(r.folder)  # a re-run replaces the folder's old run (qprsgd run --force)
        for leftover in (os.path.join(r.folder, EXIT_FILE), os.path.join(r.folder, JOB_FILE)):
            if os.path.exists(leftover):
                os.remove(leftover)
        with open(os.path.join(r.folder, "config.yaml"), "w") as f:
            f.write(r.yaml)
        cmd = run_command(r, mpiexec) + (["--force"] if again else [])
        print(f"[{r.index + 1}/{len(runs)}] {r.name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(r.folder, "stdout.log"), "w") as lo:
            p = subprocess.Popen(cmd, stdout=lo, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                import signal
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = 124
        with open(os.path.join(r.folder, EXIT_FILE), "w") as f:
            f.write(f"{rc}\n")
        refresh([r], query_slurm=False)
        failed += r.status not in ("done", "diverged")   # a diverged run is a result, not a failure
        print(f"    {r.status} in {time.perf_counter() - t0:.1f}s" + (f" ({r.note})" if r.note else "")
              + (f"; see {os.path.join(r.folder, 'stdout.log')}" if r.status not in ("done", "diverged") else ""), flush=True)
        write_index(out, runs)
    return failed


# -- SLURM ---------------------------------------------------------------------------------------
FORWARDED_ENV = ("MPI4PY_LIBMPI", "MPI4PY_MPIABI", "LD_LIBRARY_PATH")
"""Written into job scripts as ``export`` lines when set at submit time: they choose the MPI
library, and the srun ``--mpi`` plugin was chosen for that library."""
SRUN_MPI_CHOICES = ("auto", "pmi2", "pmix", "none")


def fill_template(text: str, values: dict) -> str:
    """Replace ``@KEY@``; a line whose placeholder has an empty value is dropped.  Unknown
    placeholders are an error.  A value may span several lines."""
    out = []
    for line in text.splitlines():
        keys = re.findall(r"@([A-Z_]+)@", line)
        missing = [k for k in keys if k not in values]
        if missing:
            raise SweepError(f"template placeholder(s) {missing} have no value")
        if any(values[k] in ("", None) for k in keys):
            continue
        for k in keys:
            line = line.replace(f"@{k}@", str(values[k]))
        out.append(line)
    return "\n".join(out) + "\n"


def env_exports(env=None) -> str:
    """``export`` lines for the MPI-choosing variables set in ``env`` (default: this process)."""
    env = os.environ if env is None else env
    return "\n".join(f"export {k}={shlex.quote(env[k])}" for k in FORWARDED_ENV if env.get(k))


def srun_mpi(choice: str = "auto") -> tuple[str, str]:
    """``(plugin, why)``: the ``srun --mpi`` value for the MPI library mpi4py loads in this
    environment (qprsgd.launch; no MPI initialised here), or ``choice`` when given."""
    if choice not in SRUN_MPI_CHOICES:
        raise SweepError(f"--mpi: one of {', '.join(SRUN_MPI_CHOICES)} (got {choice!r})")
    if choice != "auto":
        return choice, "given with --mpi"
    from .launch import mpi_library, srun_mpi_for
    info = mpi_library()
    if "error" in info:
        raise SweepError(f"--mpi auto: cannot tell which MPI library mpi4py loads ({info['error']}); "
                         f"pass --mpi pmi2|pmix|none")
    lib = " ".join(info["library"].splitlines()[0].split())
    plugin = srun_mpi_for(info["library"])
    if plugin is None:
        raise SweepError(f"--mpi auto: no known srun plugin for {lib!r}; pass --mpi "
                         f"(srun --mpi=list shows what the cluster offers)")
    return plugin, f"mpi4py loads {lib} ({info.get('file')})"


def slurm_values(*, name: str, nodes: int, tasks_per_node: int, cpus_per_task: int, gpus_per_node: int,
                 time_limit: str, partition: str, account: str, log_dir: str, mpi: str,
                 python: Optional[str] = None) -> dict:
    """The placeholders both job templates share."""
    for key, v, lo in (("--nodes", nodes, 1), ("--ntasks-per-node", tasks_per_node, 1),
                       ("--cpus-per-task", cpus_per_task, 1), ("--gpus-per-node", gpus_per_node, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise SweepError(f"{key}: an integer >= {lo} (got {v!r})")
    return {"JOB_NAME": name, "NODES": nodes, "TASKS_PER_NODE": tasks_per_node,
            "CPUS_PER_TASK": cpus_per_task, "GPUS_PER_NODE": gpus_per_node or "", "TIME": time_limit,
            "PARTITION": partition, "ACCOUNT": account, "LOG_DIR": os.path.abspath(log_dir),
            "PYTHON": shlex.quote(python or sys.executable), "WORKDIR": shlex.quote(os.getcwd()),
            "SRUN_MPI": mpi, "ENV_EXPORTS": env_exports()}


def slurm_script(runs: list[Run], out: str, *, name: str, nodes: int = 1, gpus_per_node: int = 0,
                 time_limit: str = "01:00:00", partition: str = "", account: str = "",
                 cpus_per_task: int = 1, template: Optional[str] = None, python: Optional[str] = None,
                 mpi: str = "pmi2") -> str:
    """A job-array script (one array task per valid run) from jobs/slurm_array.sbatch."""
    valid = [r for r in runs if r.error is None]
    if not valid:
        raise SweepError("no valid runs to put in a job array")
    ntasks = max(r.ranks for r in valid)
    tasks_per_node = -(-ntasks // nodes)
    if nodes > ntasks:
        raise SweepError(f"--nodes {nodes}: more nodes than the largest run has ranks ({ntasks})")
    cases = []
    for k, r in enumerate(valid):
        cases.append(f"  {k}) RUN={shlex.quote(os.path.abspath(r.folder))}; RANKS={r.ranks} ;;")
    tpl = template or os.path.join(JOBS_DIR, "slurm_array.sbatch")
    with open(tpl) as f:
        text = f.read()
    values = slurm_values(name=name, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                          gpus_per_node=gpus_per_node, time_limit=time_limit, partition=partition,
                          account=account, log_dir=out, mpi=mpi, python=python)
    values.update(NTASKS=ntasks, ARRAY=f"0-{len(valid) - 1}", NRUNS=len(valid), RUN_CASES="\n".join(cases))
    script = fill_template(text, values)
    path = os.path.join(out, "sweep.sbatch")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    return path


def sbatch(path: str, timeout: float = 60.0) -> str:
    """Submit a job script; returns the job id (SweepError with sbatch's message on failure)."""
    import shutil
    exe = shutil.which("sbatch")
    if exe is None:
        raise SweepError("--submit: sbatch not found on PATH (write the script without --submit and copy it)")
    try:
        p = subprocess.run([exe, "--parsable", path], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SweepError(f"sbatch {path}: no answer in {timeout:.0f} s") from None
    if p.returncode != 0:
        raise SweepError(f"sbatch {path} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]


# -- CLI -----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="expand a sweep YAML into runs: list, run locally or write a SLURM job array")
    p.add_argument("sweep")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list and validate the runs (default)")
    mode.add_argument("--local", action="store_true", help="run them one after another with mpiexec")
    mode.add_argument("--slurm", action="store_true", help="write <out>/sweep.sbatch (a job array)")
    mode.add_argument("--status", action="store_true",
                      help="read each run's files (run.h5, exit code, SLURM task) and refresh index.csv: "
                           "planned/running/done/failed/wrong-size")
    p.add_argument("--out", default=None, help="results folder (default: results/<sweep name>)")
    p.add_argument("--skip-invalid", action="store_true", help="run the valid runs even if some are invalid")
    p.add_argument("--force", action="store_true", help="--local: re-run runs that are done")
    p.add_argument("--timeout", type=float, default=None, help="--local: seconds per run")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--time", default="01:00:00", help="SLURM time limit per array task")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--template", default=None, help="job-array template (default jobs/slurm_array.sbatch)")
    p.add_argument("--mpi", default="auto", choices=SRUN_MPI_CHOICES,
                   help="--slurm: srun --mpi plugin (default auto: pmi2 for the MPICH family, pmix for "
                        "Open MPI, from the library mpi4py loads here)")
    p.add_argument("--submit", action="store_true", help="--slurm: also submit the array with sbatch")


def main(args) -> int:
    try:
        spec = load_spec(args.sweep)
        runs = expand(spec)
    except (SweepError, qconfig.ConfigError) as e:
        print(f"qprsgd sweep: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("results", str(spec["name"]))
    if args.status:
        return status_main(runs, out)
    bad = [r for r in runs if r.error]
    width = max(len(r.name) for r in runs)
    print(f"sweep {spec['name']}: {len(runs)} runs ({len(bad)} invalid) -> {out}")
    for r in runs:
        state = "ok" if r.error is None else "INVALID"
        print(f"  {r.name:<{width}}  n={r.ranks:<3d} {state}" + (f": {r.error}" if r.error else ""))
    if bad and (args.local or args.slurm) and not args.skip_invalid:
        print(f"qprsgd sweep: {len(bad)} invalid run(s) (listed above); fix the sweep or pass --skip-invalid",
              file=sys.stderr)
        return 2
    if not (args.local or args.slurm):
        print("dry run: nothing written, nothing ran (--local runs them, --slurm writes a job array)")
        return 2 if bad else 0
    if args.slurm:
        try:
            mpi, why = srun_mpi(args.mpi)
        except SweepError as e:
            print(f"qprsgd sweep: {e}", file=sys.stderr)
            return 2
    try:
        prepare(spec, runs, out)
    except OSError as e:
        print(f"qprsgd sweep: cannot write {out}: {e}", file=sys.stderr)
        return 1
    if args.local:
        failed = run_local(runs, out, timeout=args.timeout, force=args.force)
        print(f"index: {os.path.join(out, 'index.csv')}; {failed} failed")
        return 1 if failed else 0
    if args.slurm:
        try:
            path = slurm_script(runs, out, name=str(spec["name"]), nodes=args.nodes,
                                gpus_per_node=args.gpus_per_node, time_limit=args.time,
                                partition=args.partition, account=args.account,
                                cpus_per_task=args.cpus_per_task, template=args.template, mpi=mpi)
            print(f"srun --mpi={mpi}: {why}")
            if not args.submit:
                print(f"wrote {path}: submit with  sbatch {path}")
                return 0
            job = sbatch(path)
        except SweepError as e:
            print(f"qprsgd sweep: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path}; submitted job array {job}")
        return 0
    return 0


def status_main(runs: list[Run], out: str) -> int:
    """``--status``: 0 when every valid run is done, 1 when one failed or has the wrong world
    size, 3 while others are planned or running."""
    if not os.path.exists(os.path.join(out, "sweep.json")):
        print(f"qprsgd sweep: {out} holds no sweep.json (nothing was prepared: --local or --slurm first)",
              file=sys.stderr)
        return 2
    for r in runs:
        r.folder = os.path.join(out, r.name)
    refresh(runs)
    write_index(out, runs)
    width = max(len(r.name) for r in runs)
    for r in runs:
        print(f"  {r.name:<{width}}  n={r.ranks:<3d} {r.status:<10s} step {r.extra.get('last_step', '') or '-'}"
              + (f"  ({r.error or r.note})" if (r.error or r.note) else ""))
    counts = {k: sum(r.status == k for r in runs) for k in STATUSES}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v) + f"; index: {os.path.join(out, 'index.csv')}")
    if counts["failed"] or counts["wrong-size"]:
        return 1
    return 0 if counts["done"] == len(runs) - counts["invalid"] else 3


def usable_runs(folder: str, names: list[str]) -> tuple[list[str], list[str]]:
    """For ``qprsgd report``: the names of the runs in a results folder that are done and of the
    planned world size, and one line per run left out (``name: status (why)``).

    The planned size comes from the sweep plan (sweep.json), else from the run's config.yaml
    ``run.ranks``; a run with neither is checked for completion only."""
    plan = {}
    pj = os.path.join(folder, "sweep.json")
    if os.path.exists(pj):
        with open(pj) as f:
            plan = {r["name"]: r.get("ranks") for r in json.load(f)["runs"]}
    keep, left = [], []
    for name in names:
        d = os.path.join(folder, name)
        ranks = plan.get(name)
        if ranks is None and os.path.exists(os.path.join(d, "config.yaml")):
            with open(os.path.join(d, "config.yaml")) as f:
                ranks = ((yaml.safe_load(f) or {}).get("run") or {}).get("ranks")
        if ranks is None:
            from .logger import run_state
            try:
                ranks = run_state(os.path.join(d, "run.h5")).get("world_size") or 0
            except OSError:
                ranks = 0
        status, _, note = classify(d, int(ranks), queued=None)
        if status == "done":
            keep.append(name)
        else:
            left.append(f"{name}: {status}" + (f" ({note})" if note else ""))
    return keep, left


def done_only(folder: str, entries: list[tuple]) -> list[tuple]:
    """``qprsgd report``'s filter: keep the ``(name, ...)`` entries whose run is done and of the
    planned size (:func:`usable_runs`); print one line per run left out; refuse (ValueError)
    when runs exist but none is usable."""
    keep, left = usable_runs(folder, [e[0] for e in entries])
    for line in left:
        print(f"report: left out {line}", file=sys.stderr)
    if entries and not keep:
        raise ValueError(f"{folder}: no run is done with its planned world size ({len(left)} left out, "
                         f"listed above; `qprsgd sweep SWEEP --status` refreshes index.csv)")
    return [e for e in entries if e[0] in keep]
