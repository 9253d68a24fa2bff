"""Rank 1 raises while every other rank blocks waiting for it: the job must abort, not hang."""
import sys

import numpy as np

from qprsgd.comm import Comm, install_abort_on_error, world

w = world()
install_abort_on_error(w)
c = Comm(w)
if c.rank == 1:
    raise RuntimeError("injected failure on rank 1")
# everyone else waits on a payload rank 1 will never send
c.gather_bytes(np.zeros(4, np.uint8), root=1, sources=[0, 2, 3][: c.size - 1])
sys.exit(0)
