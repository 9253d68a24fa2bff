"""Every config shipped in configs/ validates and passes the world-size pre-flight it documents."""
import re
from pathlib import Path

import pytest

from qprsgd import config
from qprsgd.experiment import preflight

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = config.load(str(path))
    m = re.search(r"mpiexec -n (\d+)", path.read_text())
    preflight(cfg, int(m.group(1)) if m else 4)
