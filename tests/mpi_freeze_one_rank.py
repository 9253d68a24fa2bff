"""Rank 1 freezes (SIGSTOP: a stuck GPU, a dead NIC) before a collective or a neighbour exchange;
every other rank's bounded wait must end the job naming rank 1 (never a hang).

    mpiexec -n N python tests/mpi_freeze_one_rank.py allreduce|exchange TIMEOUT
"""
import os
import signal
import sys

import numpy as np

from qprsgd.comm import Comm, install_abort_on_error, world

kind, timeout = sys.argv[1], float(sys.argv[2])
w = world()
install_abort_on_error(w)
c = Comm(w, timeout=timeout)
c.allreduce_mean(np.ones(8, np.float32))          # everyone is up and connected
if c.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)           # frozen, not dead
if kind == "allreduce":
    c.allreduce_mean(np.ones(1000, np.float32))
else:
    c.neighbor_exchange(np.zeros(16, np.uint8), [(c.rank - 1) % c.size, (c.rank + 1) % c.size])
sys.exit(0)
