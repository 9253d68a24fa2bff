"""How a job was launched, and which MPI library mpi4py loads: the facts a job needs to be right
the first time on a cluster.

* :func:`announced` reads, from the environment a rank was started with (taken *before* MPI
  initialises), how many processes the launcher said it started, and which launcher it was.
* :func:`check` compares that (and the config's optional ``run.ranks``) with the world size MPI
  reports, and returns one message naming the likely cause and the fix, or ``None``.  A launcher
  that does not match the MPI library mpi4py loads (``srun --mpi=none``, ``srun --mpi=pmix`` with
  an MPICH, hydra's ``mpiexec`` with Open MPI loaded, ...) makes every process a 1-rank job; each
  of them would otherwise write ``world_size=1`` results.
* :func:`mpi_library` says which MPI library mpi4py loads (name, version, ABI family, the file,
  CUDA-awareness where the library tells) without initialising MPI in the calling process: it
  asks a child Python (the calling process may be a sweep or ``qprsgd submit``, which must not
  become an MPI singleton -- Open MPI would put its variables into the environment the jobs
  inherit).  Inside a running job (``mpi4py.MPI`` already imported) it reads them in-process.
* :func:`srun_mpi_for` maps the library to the ``srun --mpi`` plugin it needs (measured on
  Debian's SLURM 22.05: the bundled MPICH wheel and Debian's MPICH need ``pmi2``; Debian's
  Open MPI 4.1 needs ``pmix``).

Every rank runs :func:`check` on its own: launchers give every rank the same size variable, so
all ranks of a job reach the same verdict without communicating.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class Launch:
    """What the launcher announced: ``size`` processes, started by ``launcher``."""

    size: int
    launcher: str   # "srun", "openmpi", "pmi" (hydra mpiexec or srun --mpi=pmi2)
    source: str     # the environment variable the size was read from
    detail: str     # human words: "srun (--mpi=pmix)", "Open MPI's mpirun", ...


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    v = env.get(key)
    if v is None:
        return None
    try:
        n = int(v.strip())
    except ValueError:
        return None
    return n if n >= 1 else None


def announced(env: Mapping[str, str]) -> Optional[Launch]:
    """The process count the launcher announced in ``env`` (most specific launcher first).

    * ``OMPI_COMM_WORLD_SIZE``: Open MPI's ``mpirun``/``prterun`` (also when it runs inside a SLURM
      allocation, where its daemons were started by srun and carry srun's variables).
    * ``PMI_SIZE``: a PMI launcher: MPICH/Intel MPI hydra ``mpiexec`` (it also sets
      ``MPI_LOCALNRANKS``) or ``srun --mpi=pmi2``.
    * ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS`` with ``SLURM_STEP_ID``): a task of an ``srun``
      step.  The batch script itself (no step id) announces nothing.
    """
    n = _int(env, "OMPI_COMM_WORLD_SIZE")
    if n is not None:
        return Launch(n, "openmpi", "OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun")
    srun_type = env.get("SLURM_MPI_TYPE")
    in_step = env.get("SLURM_STEP_ID") is not None or env.get("SLURM_STEPID") is not None
    n = _int(env, "PMI_SIZE")
    if n is not None:
        if "MPI_LOCALNRANKS" in env:
            who = "hydra's mpiexec"
        elif in_step:
            who = f"srun (--mpi={srun_type or 'pmi2'})"
        else:
            who = "a PMI launcher (hydra mpiexec or srun --mpi=pmi2)"
        return Launch(n, "pmi", "PMI_SIZE", who)
    n = _int(env, "SLURM_STEP_NUM_TASKS")
    src = "SLURM_STEP_NUM_TASKS"
    if n is None and in_step:
        n, src = _int(env, "SLURM_NTASKS"), "SLURM_NTASKS"
    if n is not None:
        return Launch(n, "srun", src, f"srun (--mpi={srun_type})" if srun_type else "srun")
    return None


def _family(library: Optional[str]) -> str:
    """'openmpi', 'mpich' (MPICH, Intel MPI, Cray MPICH, MVAPICH...) or '' from a version string."""
    s = (library or "").lower()
    if "open mpi" in s or "openmpi" in s:
        return "openmpi"
    if any(k in s for k in ("mpich", "intel(r) mpi", "intel mpi", "mvapich", "cray")):
        return "mpich"
    return ""


def srun_mpi_for(library: Optional[str]) -> Optional[str]:
    """The ``srun --mpi`` plugin that connects srun's tasks to this MPI library, or None when
    unknown.  MPICH family: ``pmi2``; Open MPI: ``pmix`` (both run in tests/test_cluster.py)."""
    fam = _family(library)
    return {"mpich": "pmi2", "openmpi": "pmix"}.get(fam)


def _fix(launch: Launch, library: Optional[str]) -> str:
    fam = _family(library)
    lib = " ".join((library or "the MPI library mpi4py loads").splitlines()[0].split())
    if launch.launcher == "srun":
        want = srun_mpi_for(library)
        if want:
            return (f"srun did not connect its tasks to {lib}; use srun --mpi={want} "
                    f"(`qprsgd submit` and `qprsgd sweep --slurm` write it)")
        return (f"srun did not connect its tasks to {lib}; use the srun --mpi plugin that library "
                f"needs (srun --mpi=list shows what the cluster offers; docs/cluster.md)")
    if launch.launcher == "openmpi" and fam != "openmpi":
        return (f"Open MPI's mpirun cannot start {lib}; launch with that library's own mpiexec "
                f"(the venv's bin/mpiexec for the bundled MPICH) or make mpi4py load Open MPI "
                f"(MPI4PY_LIBMPI, docs/cluster.md)")
    if launch.launcher == "pmi" and fam == "openmpi":
        return (f"mpi4py loaded {lib}, which does not speak this launcher's PMI; launch with "
                f"Open MPI's mpirun (srun --mpi=pmix under SLURM), or unset MPI4PY_LIBMPI / "
                f"MPI4PY_MPIABI to use the bundled MPICH with its mpiexec")
    return (f"the launcher and the MPI library mpi4py loads ({lib}) do not match; "
            f"`qprsgd doctor` names both (docs/cluster.md)")


def check(env: Mapping[str, str], world_size: int, pinned: Optional[int] = None,
          library: Optional[str] = None) -> Optional[str]:
    """``None`` when the world size is what was meant, else one message: what the launcher
    announced, what MPI sees, the likely cause and the fix.

    ``env``: the environment the process started with (before MPI initialised); ``pinned``: the
    config's ``run.ranks``; ``library``: ``MPI.Get_library_version()`` (names the library in the
    message and picks the fix)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be a positive integer (got {world_size!r})")
    la = announced(env)
    if la is not None and la.size != world_size:
        return (f"{la.detail} started {la.size} processes ({la.source}={la.size}) but MPI sees "
                f"{world_size}: {_fix(la, library)}. Nothing was written.")
    if pinned is not None and pinned != world_size:
        how = f"{la.detail} started {la.size}" if la is not None else "no launcher announced a count"
        return (f"run.ranks: the config pins {pinned} processes but MPI sees {world_size} ({how}); "
                f"start the job with {pinned} processes (mpiexec -n {pinned}, srun -n {pinned}) "
                f"or change run.ranks. Nothing was written.")
    return None


# -- the MPI library mpi4py loads -----------------------------------------------------------------
# The probe is a script for a *child* interpreter (this process never imports mpi4py here: a
# process that is not an MPI job must not initialise MPI; inside a job qprsgd.comm answers).
_PROBE = r"""
import ctypes, json, os, sys
info = {}
try:
    import mpi4py
    info["mpi4py"] = mpi4py.__version__
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI
except BaseException as e:
    info["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(info)); sys.exit(0)
info["library"] = MPI.Get_library_version().strip()
info["standard"] = "%d.%d" % MPI.Get_version()
info["abi"] = os.path.basename(MPI.__file__).split(".")[1]
paths = []
with open("/proc/self/maps") as f:
    for line in f:
        p = line.split()[-1]
        b = os.path.basename(p)
        if (b.startswith("libmpi.so") or b.startswith("libmpich.so")) and p not in paths:
            paths.append(p)
info["file"] = paths[0] if paths else None
info["cuda_aware"] = None
if "--cuda" in sys.argv and paths:
    try:
        lib = ctypes.CDLL(paths[0])
        q = getattr(lib, "MPIX_Query_cuda_support", None)       # Open MPI
        if q is not None:
            MPI.Init()
            info["cuda_aware"] = bool(q())
        else:
            g = getattr(lib, "MPIX_GPU_query_support", None)    # MPICH >= 4 (0 = MPIX_GPU_SUPPORT_CUDA)
            if g is not None:
                MPI.Init()
                out = ctypes.c_int(0)
                if g(0, ctypes.byref(out)) == 0:
                    info["cuda_aware"] = bool(out.value)
    except Exception as e:
        info["cuda_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(info))
"""


def _loaded_libmpi() -> Optional[str]:
    """The libmpi / libmpich shared object mapped into this process (Linux), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                if os.path.basename(p).startswith(("libmpi.so", "libmpich.so")):
                    return p
    except OSError:
        return None
    return None


def _strip_mpi_env(env: Mapping[str, str]) -> dict:
    """The environment for a probe child: no launcher variables (SLURM's included: Open MPI
    treats a process with a SLURM step id as direct-launched), so that the child, which is no MPI
    job, does not try to join the caller's job when it initialises for the CUDA query."""
    drop = ("PMI_", "PMIX_", "OMPI_COMM_WORLD", "OMPI_MCA_ess", "OMPI_MCA_orte", "MPI_LOCAL", "HYDRA_",
            "SLURM_")
    return {k: v for k, v in env.items() if not k.startswith(drop)}


def mpi_library(env: Optional[Mapping[str, str]] = None, cuda: bool = False, timeout: float = 60.0,
                python: Optional[str] = None) -> dict:
    """Facts about the MPI library mpi4py loads in an environment: ``library`` (the
    ``MPI_Get_library_version`` text), ``abi`` (``mpich``/``openmpi``: which mpi4py extension),
    ``file`` (the shared object), ``standard``, ``mpi4py``, ``cuda_aware`` (``None`` unless
    ``cuda`` and the library answers ``MPIX_Query_cuda_support`` / ``MPIX_GPU_query_support``),
    or ``error``.  ``python``: ask that interpreter (default this one).

    In a process that already imported ``mpi4py.MPI`` (a running job) the facts are read here;
    otherwise a child Python reads them (bounded by ``timeout``), so this process never
    initialises MPI."""
    if "mpi4py.MPI" in sys.modules and env is None and python is None and not cuda:
        from .comm import library_facts     # MPI is up already: comm, the one mpi4py importer, reads it
        return {**library_facts(), "file": _loaded_libmpi(), "cuda_aware": None}
    cmd = [python or sys.executable, "-c", _PROBE] + (["--cuda"] if cuda else [])
    try:
        p = subprocess.run(cmd, env=_strip_mpi_env(os.environ if env is None else env),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the MPI library probe ({cmd[0]}) did not answer in {timeout:.0f} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"the MPI library probe exited {p.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# -- qprsgd doctor ------------------------------------------------------------------------------
def _version_line(cmd: list[str], pick: str = "") -> Optional[str]:
    """``path: first output line`` of a version command (the first line containing ``pick`` when
    one does), or None when the program is not there."""
    import shutil
    exe = shutil.which(cmd[0]) if os.sep not in cmd[0] else (cmd[0] if os.path.exists(cmd[0]) else None)
    if exe is None:
        return None
    try:
        p = subprocess.run([exe] + cmd[1:], capture_output=True, text=True, timeout=20)
    except (subprocess.TimeoutExpired, OSError) as e:
        return f"{exe}: {e}"
    lines = [x.strip() for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    picked = [x for x in lines if pick.lower() in x.lower()] or lines
    return f"{exe}: {picked[0] if picked else '(no output)'}"


def _dist_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def doctor_report(env: Optional[Mapping[str, str]] = None) -> tuple[list[str], int]:
    """The lines ``qprsgd doctor`` prints and its exit code (1 when mpi4py cannot load an MPI)."""
    from . import __version__
    env = dict(os.environ if env is None else env)
    lines = [f"qprsgd {__version__}; python {sys.version.split()[0]} ({sys.executable})",
             "packages: " + ", ".join(f"{n} {_dist_version(n)}" for n in
                                      ("mpi4py", "mpich", "numpy", "torch", "h5py", "numba"))]
    for k in ("MPI4PY_LIBMPI", "MPI4PY_MPIABI", "LD_LIBRARY_PATH"):
        lines.append(f"{k}={env[k]}" if env.get(k) else f"{k} not set")
    info = mpi_library(env=env, cuda=True)
    if "error" in info:
        lines.append(f"MPI library: mpi4py cannot load one: {info['error']} (docs/cluster.md)")
        return lines, 1
    lib = " ".join(info["library"].splitlines()[0].split())
    bundled = bool(info.get("file")) and os.path.realpath(info["file"]).startswith(
        os.path.realpath(sys.prefix) + os.sep)
    lines.append(f"MPI library: {lib} (MPI {info['standard']})")
    lines.append(f"  file: {info.get('file')}" + ("  [the bundled MPICH wheel]" if bundled else ""))
    lines.append(f"  ABI: {info['abi']} (the mpi4py extension it loads)")
    cuda = info.get("cuda_aware")
    lines.append("  CUDA-aware: " + ("yes" if cuda else "no" if cuda is False else
                                     "not detectable (the library answers no MPIX query)"
                                     + (f" [{info['cuda_error']}]" if info.get("cuda_error") else "")))
    fam = _family(info["library"])
    if fam == "openmpi":
        launcher = _version_line(["mpirun", "--version"], "open mpi")
        want, ok = "Open MPI's mpirun", "open mpi"
    else:
        here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        launcher = _version_line([here if bundled and os.path.exists(here) else "mpiexec", "--version"], "version")
        want, ok = "hydra's mpiexec", "version:"
    lines.append(f"launcher for it: {want}: {launcher or 'not found on PATH'}")
    if launcher and ok not in launcher.lower():
        lines.append("  WARNING: that launcher does not look like the library's own; its ranks may each "
                     "be a 1-rank job (qprsgd run refuses that)")
    srun = _version_line(["srun", "--version"], "slurm ")
    if srun and not srun.split(": ", 1)[1].lower().startswith("slurm "):
        srun = f"{srun.split(': ', 1)[0]} (no version: no SLURM configuration reachable from here)"
    plugin = srun_mpi_for(info["library"])
    lines.append(f"SLURM: {srun or 'srun not found'}; srun --mpi={plugin or '? (not known for this library)'} "
                 f"for this library (what qprsgd submit / sweep --slurm write)")
    la = announced(env)
    lines.append("this process: " + (f"started by {la.detail}, {la.size} processes ({la.source})" if la
                                     else "not started by a launcher"))
    return lines, 0


def add_parser(sub) -> None:
    sub.add_parser("doctor", help="print the MPI library mpi4py loads, its ABI, the launcher and srun "
                                  "--mpi it needs, CUDA-awareness and versions (initialises no MPI here)")


def main(args) -> int:
    lines, rc = doctor_report()
    print("\n".join(lines))
    return rc
