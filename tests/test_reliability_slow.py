"""Long fuzz and soak runs for docs/reliability.md (``make test-all``; not in the default run).

* config fuzz: random values at random key paths of a good config, and random YAML text: rank 0's
  verdict is always a verdict (never an internal error, exit 1), within seconds, bounded;
* bad configs under real mpiexec at -n 2: exit 2 on every rank, one message, no hang;
* kill-and-resume at several checkpoints with the log deleted or truncated before the resume:
  bit-identical to the uninterrupted run.
"""
from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import mpirun, run_many, write_config
from test_config_errors import GAPS, GOOD, verdict, with_

pytestmark = pytest.mark.slow

KEYS = ["seed", "run.threads", "run.codec_threads", "run.server", "run.name", "train.lr", "train.epochs",
        "train.batch_size", "train.weight_decay", "train.log_every", "train.eval_every",
        "train.checkpoint_every", "train.schedule", "train.schedule.kind", "train.schedule.milestones",
        "train.schedule.gamma", "train.schedule.warmup_epochs", "data", "data.name", "data.shard",
        "data.alpha", "data.data_dir", "data.params", "data.params.max_train", "model", "model.name",
        "model.hidden", "algorithm", "algorithm.name", "algorithm.K", "codec", "codec.name", "codec.k",
        "topology", "topology.name", "topology.base", "bogus"]

leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                 st.sampled_from(["psgd", "pr_sgd", "ring", "topk", "digits", "mnist", "lsq", "mlp",
                                  "generalized_elastic", "dirichlet", "step", "best"]))
value = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                               st.dictionaries(st.sampled_from(["name", "k", "K", "base", "x"]),
                                                               c, max_size=4)), max_leaves=12)

STATS = {"configs": 0, "texts": 0}


def _assign(cfg: dict, key: str, v):
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = v


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(KEYS), value), min_size=1, max_size=4))
def test_fuzzed_configs_always_get_a_verdict(tmp_path_factory, edits):
    tmp = tmp_path_factory.mktemp("fz")
    cfg = with_({})
    for k, v in edits:
        _assign(cfg, k, v)
    try:
        text = yaml.safe_dump(cfg)
    except (yaml.YAMLError, ValueError, OverflowError):
        return
    t0 = time.perf_counter()
    v = verdict(tmp, text=text)
    STATS["configs"] += 1
    assert time.perf_counter() - t0 < 120  # a verdict, not a hang (the first one imports torch and loads data)
    assert v["ok"] or (v["code"] == 2 and len(v["error"]) <= 4000), v


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.builds(lambda a, b: yaml.safe_dump(GOOD)[:a] + b + yaml.safe_dump(GOOD)[a:],
                           st.integers(0, 200), st.text(max_size=30))))
def test_fuzzed_yaml_text_always_gets_a_verdict(tmp_path_factory, text):
    v = verdict(tmp_path_factory.mktemp("fy"), text=text)
    STATS["texts"] += 1
    assert v["ok"] or (v["code"] == 2 and len(v["error"]) <= 4000), v


@pytest.mark.mpi
@pytest.mark.parametrize("over,key,words", GAPS[::3], ids=[g[1] for g in GAPS[::3]])
def test_bad_configs_under_mpiexec(tmp_path, over, key, words):
    path = write_config(tmp_path / "c.yaml", with_(over))
    t0 = time.perf_counter()
    rc, out, err = mpirun(2, ["-m", "qprsgd.cli", "run", str(path), "--out", str(tmp_path / "o")],
                          timeout=90, check=False)
    assert time.perf_counter() - t0 < 60
    assert rc == 2 and err.count("qprsgd:") == 1 and key in err and "Traceback" not in err, err


@pytest.mark.mpi
@pytest.mark.parametrize("min_step,damage", [(50, "delete"), (150, "truncate"), (250, "delete")])
def test_kill_resume_with_damaged_log(tmp_path, min_step, damage):
    from resume_util import check_kill_resume
    from test_resume import cfg
    ref = run_many(2, {"pr": cfg({"name": "pr_sgd", "K": 3})}, tmp_path)["pr"]
    step = check_kill_resume(2, cfg({"name": "pr_sgd", "K": 3}), tmp_path, "pr", ref, min_step=min_step,
                             damage_log=damage)
    assert step >= min_step
