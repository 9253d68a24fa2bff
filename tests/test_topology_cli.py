"""`qprsgd topo` prints the DCD pre-flight verdict from the codec's compression constant α."""
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, mpi_env
from qprsgd.registry import CODECS


def test_alpha_constants_match_monte_carlo():
    """α² of randk and bernoulli_p is exact: E‖C(z) − z‖²/‖z‖² by Monte Carlo (5 standard errors)."""
    rng = np.random.default_rng(0)
    d = 64
    z = rng.standard_normal(d).astype(np.float32)
    for name, params in (("randk", {"k": 8}), ("bernoulli_p", {"p": 0.3})):
        codec = CODECS.get(name).factory(d, None, **params)
        errs = np.array([np.sum((codec.roundtrip(z, rng)[0] - z) ** 2) for _ in range(4000)]) / np.sum(z ** 2)
        a2 = CODECS.get(name).factory.alpha(d, **params) ** 2
        assert abs(errs.mean() - a2) < 5 * errs.std() / math.sqrt(len(errs)), (name, errs.mean(), a2)
    # stochastic_bits' α is a bound: worst-case-ish vectors stay below it
    sb = CODECS.get("stochastic_bits").factory
    codec = sb(d, None, b=2)
    worst = np.zeros(d, np.float32)
    worst[0], worst[1] = 1.0, -1.0
    worst[2:] = 1.0 / 3  # mid-level points: maximal rounding variance
    errs = np.array([np.sum((codec.roundtrip(worst, rng)[0] - worst) ** 2) for _ in range(2000)])
    assert errs.mean() / np.sum(worst ** 2) <= sb.alpha(d, b=2) ** 2


@pytest.mark.parametrize("b,verdict", [(8, "satisfied"), (2, "WARNING")])
def test_topo_prints_dcd_verdict(tmp_path, b, verdict):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"algorithm": {"name": "dcd_psgd"}, "model": {"name": "logreg"},
                                   "codec": {"name": "stochastic_bits", "b": b}}))
    out = subprocess.run([sys.executable, "-m", "qprsgd.cli", "topo", str(cfg), "-n", "8"], capture_output=True,
                         text=True, env=mpi_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rho" in out.stdout and "0.8047" in out.stdout
    assert verdict in out.stdout, out.stdout
