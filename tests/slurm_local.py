"""A throw-away one-node SLURM (Debian's slurm-wlm + munge) with all state in one folder.

    with LocalSlurm(tmp_dir, cpus=8) as slurm:
        subprocess.run(["sbatch", ...], env=slurm.env)

``munged`` listens on a socket in the folder (its own key), ``slurmctld`` and ``slurmd`` run in
the foreground on free ports with ``slurm.conf`` in the folder (``SLURM_CONF`` in ``env``);
``SlurmdParameters=config_overrides`` lets the node declare ``cpus`` CPUs whatever the machine
has.  Every wait is bounded; ``close()`` stops the daemons it started (by their process ids).
Needs root (slurmd starts jobs as the submitting user) and the Debian packages.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo")


def missing() -> Optional[str]:
    """Why a local SLURM cannot start here, or None."""
    for tool in NEEDED:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local slurmd needs root"
    return None


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: str, cpus: int = 8, timeout: float = 60.0):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname()
        self.env = dict(os.environ)

    def _path(self, *p) -> str:
        return os.path.join(self.root, *p)

    def start(self) -> "LocalSlurm":
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(self._path(d), exist_ok=True)
        os.chmod(self._path("munge"), 0o700)
        key = self._path("munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = self._path("munge", "munge.socket")
        self._spawn([_which("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                     f"--log-file={self._path('log', 'munged.log')}",
                     f"--pid-file={self._path('munge', 'munged.pid')}",
                     f"--seed-file={self._path('munge', 'munged.seed')}"], "munged")
        self._wait(lambda: os.path.exists(sock), "munged's socket")
        conf = self._path("slurm.conf")
        with open(conf, "w") as f:
            f.write(self.conf(sock))
        self.env["SLURM_CONF"] = conf
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[k]
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", conf], "slurmctld")
        self._spawn([_which("slurmd"), "-D", "-f", conf, "-N", self.node], "slurmd")
        self._wait(self._node_idle, "the node to come up idle (sinfo)")
        return self

    def conf(self, sock: str) -> str:
        p = self._path
        return "\n".join([
            "ClusterName=qprsgdtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            f"StateSaveLocation={p('state')}",
            f"SlurmdSpoolDir={p('spool')}",
            f"SlurmctldPidFile={p('slurmctld.pid')}",
            f"SlurmdPidFile={p('slurmd.pid')}",
            f"SlurmctldLogFile={p('log', 'slurmctld.log')}",
            f"SlurmdLogFile={p('log', 'slurmd.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=300",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} "
            f"ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ])

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self._path("log", f"{name}.out"), "w")
        env = dict(self.env)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.procs.append(p)

    def _wait(self, ready, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a SLURM daemon exited ({dead[0].args[0]}, rc={dead[0].returncode}) "
                                   f"while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"waited {self.timeout:.0f} s for {what}:\n{self.logs()}")

    def _node_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                           text=True, timeout=20)
        return p.returncode == 0 and p.stdout.strip().startswith("idle")

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self._path("log"))):
            with open(self._path("log", name), errors="replace") as f:
                tail = f.read()[-3000:]
            out.append(f"--- {name}\n{tail}")
        return "\n".join(out)

    def sbatch(self, script: str, cwd: Optional[str] = None) -> str:
        p = subprocess.run(["sbatch", "--parsable", script], env=self.env, capture_output=True,
                           text=True, timeout=60, cwd=cwd)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {script} exited {p.returncode}: {p.stderr}")
        return p.stdout.strip().split(";")[0]

    def wait_job(self, job: str, timeout: float) -> None:
        """Until no task of the job is pending or running (bounded)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            p = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=self.env,
                               capture_output=True, text=True, timeout=20)
            if p.returncode == 0 and not p.stdout.strip():
                return
            time.sleep(1.0)
        subprocess.run(["scancel", job], env=self.env, timeout=20)
        raise RuntimeError(f"job {job} still queued or running after {timeout:.0f} s:\n{self.logs()}")

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.procs = []

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()
