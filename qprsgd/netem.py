"""``qprsgd netem``: run an experiment over a real, shaped network on one machine.

    qprsgd netem -n 2 --rate 5Mbps CONFIG [--out DIR] [--set key=value ...] [--timeout S]

Layout (all of it inside network namespaces this command creates; nothing in the host's
namespace is configured, no route leaves them):

* a switch namespace ``qpn-<pid>-sw`` holding a bridge ``br0``;
* per rank i a namespace ``qpn-<pid>-<i>`` holding ``eth0`` = 10.77.0.(i+1)/24, joined to the
  bridge by a veth pair (switch side ``p<i>``);
* each link shaped with ``tc tbf`` to ``--rate`` in both directions (egress of ``eth0`` = the
  rank's uplink, egress of ``p<i>`` = its downlink): full duplex at the rate, one NIC per
  rank (the network model's ``shared_nic=True``).

The bridge lives in its own namespace so the host's bridge-netfilter / firewall settings do not
apply to it.  Ranks are launched by one ``mpiexec`` as MPMD blocks
``-n 1 ip netns exec qpn-<pid>-0 … : -n 1 ip netns exec qpn-<pid>-1 …`` with MPICH kept off
shared memory (``MPIR_CVAR_NOLOCAL=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp``,
``FI_TCP_IFACE=eth0``), so every byte crosses the shaped veths.

Latency (``--latency``) needs the ``netem`` qdisc; where the kernel lacks it (as on the
machine this was written on) the command refuses with that reason.  The user-space delay
forwarder the issue mentions is not implemented.

Teardown: the namespaces (and with them every veth and the bridge) are deleted, and every
process still inside them is killed, on normal exit, on error, on SIGINT/SIGTERM/SIGHUP and at
interpreter exit.  ``available()`` says why namespaces cannot be made (not root, no ``ip``/``tc``,
``ip netns add`` refused) so callers and tests can skip cleanly.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

from .network import TCP_GOODPUT, format_bandwidth, parse_bandwidth, parse_latency

SUBNET = "10.77.0"
PREFIX = "qpn-"
# tbf queue bound (the qdisc's ``latency``: a packet waits at most this long).  Tried 20 ms (a
# switch-like buffer, so the ACKs a NIC sends do not wait behind its own data): raw TCP ring flows
# at 20 Mb/s tightened from 1.03-1.29x to 1.03-1.05x the rate's time, but the 4-rank MPI runs of
# repro_dcd_fig3 stayed at 1.31-1.39x and drops added 2.6 s retransmission-timeout rows; kept 2 s.
QUEUE_MS = 2000


def _ip(*args, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"netem: `{' '.join(cmd)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def available() -> Optional[str]:
    """None if network namespaces can be made here, else the reason they cannot."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (euid is %d)" % os.geteuid()
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not on PATH"
    probe = f"{PREFIX}{os.getpid()}-probe"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return f"`ip netns add` failed: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, text=True, timeout=30)
    return None


def tbf_burst_bytes(rate_bps: float) -> int:
    """Bucket size: 1 ms of traffic at the rate, at least 4 full frames (tbf needs >= MTU; larger
    GSO packets are segmented by tbf).  Small, so short messages see the rate, not the bucket."""
    return int(max(4 * 1514, rate_bps / 8 * 0.001))


class Fabric:
    """n rank namespaces on a shaped bridge.  Use as a context manager; ``close()`` is idempotent."""

    def __init__(self, n: int, rate_bps: float, latency_s: float = 0.0, tag: Optional[str] = None):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if n > 250:
            raise ValueError(f"n must be <= 250 (one /24), got {n!r}")
        if rate_bps <= 0:
            raise ValueError(f"rate must be > 0 bit/s, got {rate_bps!r}")
        self.n = n
        self.rate = float(rate_bps)
        self.latency = float(latency_s)
        self.tag = tag or str(os.getpid())
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.names = [f"{PREFIX}{self.tag}-{i}" for i in range(n)]
        self.created: list[str] = []
        self._closed = False

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def _shape(self, dev: str, ns: str) -> None:
        rate = f"{int(self.rate)}bit"
        burst = tbf_burst_bytes(self.rate)
        if self.latency > 0:
            _ip("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                "delay", f"{self.latency * 1e6 / 2:.0f}us", ns=ns)  # half each way on this hop
            _ip("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "tbf",
                "rate", rate, "burst", str(burst), "latency", f"{QUEUE_MS}ms", ns=ns)
        else:
            _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
                "latency", f"{QUEUE_MS}ms", ns=ns)

    def open(self) -> "Fabric":
        _ip("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("ip", "link", "set", "br0", "up", ns=self.switch)
        _ip("ip", "link", "set", "lo", "up", ns=self.switch)
        for i, ns in enumerate(self.names):
            _ip("ip", "netns", "add", ns)
            self.created.append(ns)
            # create the pair inside the rank namespace (no host interface ever exists), move one end
            _ip("ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", ns=ns)
            _ip("ip", "link", "set", f"p{i}", "netns", self.switch, ns=ns)
            _ip("ip", "addr", "add", f"{self.addr(i)}/24", "dev", "eth0", ns=ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
            _ip("ip", "link", "set", "eth0", "up", ns=ns)
            _ip("ip", "link", "set", f"p{i}", "master", "br0", ns=self.switch)
            _ip("ip", "link", "set", f"p{i}", "up", ns=self.switch)
            self._shape("eth0", ns)
            self._shape(f"p{i}", self.switch)
        return self

    def pids(self) -> list[int]:
        out = []
        for ns in self.created:
            p = _ip("ip", "netns", "pids", ns, check=False)
            out += [int(x) for x in p.stdout.split() if x.strip().isdigit()]
        return out

    def close(self) -> list[str]:
        """Kill what still runs inside, delete every namespace created; returns problems (empty: clean)."""
        if self._closed:
            return []
        self._closed = True
        problems = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
            if pids and sig == signal.SIGTERM:
                time.sleep(0.5)
        for ns in reversed(self.created):
            p = _ip("ip", "netns", "del", ns, check=False)
            if p.returncode != 0:
                problems.append(f"ip netns del {ns}: {p.stderr.strip()}")
        self.created = []
        return problems

    def __enter__(self):
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()
        return False


def mpi_env(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp",
                "FI_TCP_IFACE": "eth0", "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    # ranks test their requests and sleep instead of spinning inside MPI, so the shaped kernel
    # path (veth, bridge, tbf, TCP) gets the CPU it needs (qprsgd/comm.py, docs/network.md)
    env.setdefault("QPRSGD_MPI_POLL_SLEEP", "2e-4")
    return env


def _rank_env() -> dict:
    """:func:`mpi_env` plus this checkout on PYTHONPATH, for ranks started inside the namespaces."""
    env = mpi_env()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def mpiexec_command(fabric: Fabric, argv: list[str], mpiexec: Optional[str] = None) -> list[str]:
    """``mpiexec -n 1 ip netns exec NS0 ARGV : -n 1 ip netns exec NS1 ARGV : ...``."""
    if mpiexec is None:
        cand = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        mpiexec = cand if os.path.exists(cand) else "mpiexec"
    cmd = [mpiexec]
    for i, ns in enumerate(fabric.names):
        if i:
            cmd.append(":")
        cmd += ["-n", "1", "ip", "netns", "exec", ns] + list(argv)
    return cmd


class _Signals:
    """Turn SIGTERM/SIGHUP into an exception while the fabric exists, so ``finally`` runs."""

    def __init__(self):
        self.old = {}

    def __enter__(self):
        def handler(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            self.old[s] = signal.signal(s, handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def run(n: int, rate_bps: float, run_argv: list[str], latency_s: float = 0.0,
        timeout: Optional[float] = None, out_dir: Optional[str] = None) -> int:
    """Create the fabric, run ``python -m qprsgd.cli run …`` on n ranks inside it, tear down."""
    fabric = Fabric(n, rate_bps, latency_s)
    argv = [sys.executable, "-m", "qprsgd.cli", "run"] + list(run_argv)
    proc = None
    atexit.register(fabric.close)
    with _Signals():
        try:
            fabric.open()
            cmd = mpiexec_command(fabric, argv)
            env = _rank_env()
            print(f"netem: {n} ranks in {fabric.names[0]}..{fabric.names[-1]}, "
                  f"links {format_bandwidth(rate_bps)} (tbf) each way"
                  + (f", {latency_s * 1e3:g} ms RTT" if latency_s else ""), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"netem: run exceeded --timeout {timeout:g}s; stopping it", file=sys.stderr, flush=True)
                rc = 124
            wall = time.perf_counter() - t0
            if out_dir and os.path.isdir(out_dir):
                with open(os.path.join(out_dir, "netem.json"), "w") as f:
                    json.dump({"ranks": n, "rate_bps": rate_bps, "latency_s": latency_s,
                               "tbf_burst_bytes": tbf_burst_bytes(rate_bps), "goodput_factor": TCP_GOODPUT,
                               "shared_nic": True, "wall_s": wall, "returncode": rc}, f, indent=1)
            return rc
        finally:
            if proc is not None and proc.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=3)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            problems = fabric.close()
            atexit.unregister(fabric.close)
            for p in problems:
                print(f"netem: teardown: {p}", file=sys.stderr, flush=True)


def calibrate(n: int, rate_bps: float, nbytes: int = 2 << 20, reps: int = 3, flows: int = 1,
              timeout: float = 300.0) -> dict:
    """Measure what a fabric of n ranks at ``rate_bps`` delivers to concurrent MPI flows.

    Runs :mod:`qprsgd.netem_probe` in a fresh fabric: a ring where every rank sends ``nbytes`` to
    its next neighbour (``flows=1``) or to both neighbours (``flows=2``) while receiving as much,
    and returns ``{"seconds": measured, "model": flows * nbytes * 8 / (rate * TCP_GOODPUT),
    "factor": seconds / model}``.  ``factor`` is the stretch this host puts on shaped transfers
    when every NIC is busy at once; the reproduction scripts print it beside their netem runs (on
    the 2-core machine of docs/network.md, 4 ranks at 20 Mb/s: 1.05-1.16 with one flow per NIC,
    1.40 with two).
    Raises RuntimeError naming the command if the probe fails."""
    fabric = Fabric(n, rate_bps)
    atexit.register(fabric.close)
    try:
        fabric.open()
        cmd = mpiexec_command(fabric, [sys.executable, "-m", "qprsgd.netem_probe", str(int(nbytes)),
                                       str(int(reps)), str(int(flows))])
        env = _rank_env()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("ring_seconds ")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"netem ring probe failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        sec = float(line[0].split()[1])
    finally:
        fabric.close()
        atexit.unregister(fabric.close)
    model = flows * nbytes * 8.0 / (rate_bps * TCP_GOODPUT)
    return {"seconds": sec, "model": model, "factor": sec / model, "ranks": n, "rate_bps": rate_bps,
            "nbytes": int(nbytes), "reps": int(reps), "flows": int(flows)}


# -- CLI ----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("netem", help="run under a real shaped network: one namespace per rank, tbf-shaped links")
    p.add_argument("config", nargs="?", help="the run's config (not needed with --check)")
    p.add_argument("-n", "--ranks", type=int, default=None, help="number of ranks (namespaces)")
    p.add_argument("--rate", default=None, help="link rate each way, e.g. 5Mbps, 100Mbit")
    p.add_argument("--latency", default="0", help="round-trip latency (needs the kernel's netem qdisc)")
    p.add_argument("--out", default=None, help="run folder (passed to qprsgd run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the run is stopped")
    p.add_argument("--check", action="store_true", help="only say whether namespaces can be made here")


def main(args) -> int:
    why = available()
    if args.check:
        print("netem: available" if why is None else f"netem: unavailable: {why}")
        return 0 if why is None else 1
    missing = [n for n, v in (("CONFIG", args.config), ("-n/--ranks", args.ranks), ("--rate", args.rate))
               if v is None]
    if missing:
        print(f"qprsgd netem: {', '.join(missing)} required (unless --check)", file=sys.stderr)
        return 2
    if why is not None:
        print(f"qprsgd netem: cannot build the network here: {why}", file=sys.stderr)
        return 3
    try:
        rate = parse_bandwidth(args.rate)
        lat = parse_latency(args.latency)
    except ValueError as e:
        print(f"qprsgd netem: {e}", file=sys.stderr)
        return 2
    if args.ranks < 1:
        print(f"qprsgd netem: --ranks must be >= 1 (got {args.ranks})", file=sys.stderr)
        return 2
    run_argv = [os.path.abspath(args.config)]
    out = args.out
    if out is not None:
        out = os.path.abspath(out)
        run_argv += ["--out", out]
    for s in args.set:
        run_argv += ["--set", s]
    try:
        return run(args.ranks, rate, run_argv, lat, args.timeout, out)
    except KeyboardInterrupt as e:
        print(f"qprsgd netem: interrupted ({e}); network torn down", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"qprsgd {e}", file=sys.stderr)
        return 1
