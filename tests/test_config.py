"""Bad configs are refused before any rank works: exit 2, one message naming key, value and what is allowed."""
from __future__ import annotations

import pytest

from conftest import run_qprsgd
from qprsgd import config

GOOD = {"algorithm": {"name": "pr_sgd", "K": 4}, "train": {"lr": 0.1}}

BAD = [
    # (override, key named, words the message must contain)
    ({"trian": {"lr": 0.1}}, "trian", "unknown key"),
    ({"train": {"lr": -1}}, "train.lr", "greater than 0"),
    ({"train": {"lr": "fast"}}, "train.lr", "'fast'"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "greater than or equal to 1"),
    ({"train": {"epochs": 1, "bogus": 2}}, "train.bogus", "allowed keys"),
    ({"algorithm": {"name": "adamw"}}, "algorithm.name", "known algorithms"),
    ({"algorithm": {"name": "pr_sgd", "K": 0}}, "algorithm.K", "greater than or equal to 1"),
    ({"algorithm": {"name": "pr_sgd", "K": 2.5}}, "algorithm.K", "2.5"),
    ({"algorithm": {"name": "pr_sgd", "tau": 2}}, "algorithm.tau", "allowed keys: K, avg_phase"),
    ({"algorithm": {"name": "pr_sgd", "avg_phase": "middle"}}, "algorithm.avg_phase", "'end' or 'k0'"),
    ({"model": {"name": "transformer"}}, "model.name", "known models"),
    ({"data": {"name": "imagenet"}}, "data.name", "known datasets"),
    ({"data": {"shard": "random"}}, "data.shard", "'iid' or 'dirichlet'"),
    ({"run": {"server": "rank1"}}, "run.server", "'rank0' or 'dedicated'"),
    ({"train": {"schedule": {"kind": "step", "milestones": [3, 1]}}}, "train.schedule", "increasing"),
    ({"seed": -3}, "seed", "non-negative"),
    ({"algorithm": {"name": "psgd"}, "codec": {"name": "identity"}}, "codec", "uncompressed"),
]


def merged(over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in GOOD.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v:
            out[k].update(v)
        else:
            out[k] = v
    return out


def test_good_config_validates():
    cfg = config.validate(merged({}))
    assert cfg.algorithm.name == "pr_sgd" and cfg.algorithm.params.K == 4
    # the normalized YAML round-trips to the same record
    import yaml
    assert config.validate(yaml.safe_load(cfg.to_yaml())).raw == cfg.raw


@pytest.mark.parametrize("over,key,words", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_key(over, key, words):
    with pytest.raises(config.ConfigError) as ei:
        config.validate(merged(over))
    msg = str(ei.value)
    assert any(p.startswith(key) for p in ei.value.problems), msg
    assert words in msg, msg


def test_set_overrides_parse_yaml_values():
    raw = config.apply_overrides(GOOD, ["train.lr=0.05", "algorithm.K=8", "model.hidden=[8, 4]"])
    assert raw["train"]["lr"] == 0.05 and raw["algorithm"]["K"] == 8 and raw["model"]["hidden"] == [8, 4]
    assert GOOD["train"]["lr"] == 0.1  # the input is not mutated
    with pytest.raises(config.ConfigError, match="key.path=value"):
        config.apply_overrides(GOOD, ["train.lr"])


@pytest.mark.mpi
@pytest.mark.parametrize("over,extra,key", [
    ({"algorithm": {"name": "pr_sgd", "K": 0}}, [], "algorithm.K"),
    ({}, ["--set", "train.lr=-0.5"], "train.lr"),
])
def test_cli_exits_2_on_every_rank_and_prints_once(tmp_path, over, extra, key):
    rc, out, err, h5 = run_qprsgd(2, merged(over), tmp_path, extra=extra, check=False, timeout=60, mpi=True)
    assert rc == 2, (out, err)
    assert err.count(key) == 1, err  # printed once (rank 0), naming the key
    assert not h5.exists()
