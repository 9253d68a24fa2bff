# qprsgd: `make demo` sets up and runs the default experiment; `make test` sets up and runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NP ?= 4

# Debian packages the cluster tests start (SLURM + munge, Open MPI, MPICH): `make test-cluster`
CLUSTER_DEBS := slurm-wlm munge openmpi-bin libopenmpi-dev mpich libmpich12

.PHONY: venv demo test test-all test-cluster cluster-debs bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# pinned explicitly first: an unpinned torch pulls several GB of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,mpich]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/mpiexec -n $(NP) $(BIN)/qprsgd run configs/default.yaml

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ""

# installs the Debian packages once (needs root and the Debian package registry), then runs the
# tests that start a one-node SLURM and launch under Debian's Open MPI / MPICH (tests/test_cluster.py)
cluster-debs:
	@dpkg -s $(CLUSTER_DEBS) >/dev/null 2>&1 || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CLUSTER_DEBS); }

test-cluster: venv cluster-debs
	$(BIN)/python -m pytest -q -m cluster

clean:
	rm -rf $(VENV) build *.egg-info
