"""Test driver: run several configs one after another in ONE mpiexec job (torch is imported once).

    mpiexec -n N python tests/mpi_runs.py OUT_ROOT NAME=CONFIG.yaml [NAME=CONFIG.yaml ...]

Each run goes through exactly the ``qprsgd run CONFIG --out OUT_ROOT/NAME`` code path.
"""
import sys

from qprsgd.cli import main

if __name__ == "__main__":
    root = sys.argv[1]
    for spec in sys.argv[2:]:
        name, path = spec.split("=", 1)
        rc = main(["run", path, "--out", f"{root}/{name}"])
        if rc != 0:
            sys.exit(rc)
