"""YAML -> frozen, validated records.

Validation uses pydantic v2 (``extra="forbid"`` everywhere).  Why a library rather than
hand-written checks: every field's type, bound and allowed values are declared once, next to
its default, and pydantic reports *every* error with its location, so the messages below
("train.lr: Input should be greater than 0 (got -1)") come for free and stay consistent as
algorithms add parameters.  Each registry entry (algorithm, codec, topology, model, dataset)
declares its own parameter model; this module validates a section ``{name: X, ...}`` against
the model that X registered, so an algorithm's parameters live next to the algorithm.

Only ``yaml.safe_load`` is used.  Errors are collected into one :class:`ConfigError` whose
message lists every problem as ``key.path: what is wrong (got VALUE)``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .registry import ALGORITHMS, CODECS, DATASETS, MODELS, TOPOLOGIES, Registry, UnknownNameError


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` lists each problem with its key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Strict):
    """Learning-rate schedule: lr * gamma**(number of milestones passed), after a linear warm-up."""

    kind: Literal["constant", "step"] = Field("constant", description="step: ×gamma at each milestone")
    milestones: List[float] = Field(default_factory=list, description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, description="decay factor at each milestone")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length")

    @model_validator(mode="after")
    def _check(self):
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be positive and increasing, got {list(self.milestones)}")
        if self.kind == "constant" and self.milestones:
            raise ValueError("milestones given with kind 'constant'; use kind: step")
        return self


class TrainConfig(_Strict):
    epochs: float = Field(3.0, gt=0, description="passes over the data (fractions allowed)")
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(0.1, gt=0, description="base learning rate γ / η")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="learning-rate schedule (below)")
    weight_decay: float = Field(0.0, ge=0, description="λ; each algorithm says where λx enters")
    eval_every: int = Field(50, ge=1, description="steps between evaluations (also at the end)")
    log_every: int = Field(10, ge=1, description="steps per metrics row")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = never")
    target_accuracy: Optional[float] = Field(None, gt=0, le=1, description="for reports: time/bits to this accuracy")


class RunConfig(_Strict):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="names the results folder")
    threads: int = Field(1, ge=1, description="torch threads per rank")
    codec_threads: Optional[int] = Field(
        None, ge=1, description="codec kernel threads per rank; default: cores on the node / ranks on the node")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda: one GPU per rank, by local rank")
    server: Literal["rank0", "dedicated"] = Field(
        "rank0", description="parameter server / centre placement: rank 0 doubles as server, or one extra rank")
    progress: bool = Field(True, description="progress line on rank 0 at each evaluation")
    workers: Optional[int] = Field(
        None, ge=1, le=4096,
        description="run in one process with this many workers (the world size, as mpiexec -n); "
                    "null: one MPI rank per worker")
    timeout: float = Field(
        600.0, gt=0, le=86400, allow_inf_nan=False,
        description="seconds any wait for other workers may last before the run aborts naming them")


class DataConfig(_Strict):
    name: str = Field("digits", description="a dataset name (qprsgd list)")
    data_dir: Optional[str] = Field(None, description="folder holding the files (nothing downloads)")
    shard: Literal["iid", "dirichlet"] = Field("iid", description="dirichlet: non-iid over labels")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for shard: dirichlet")
    params: dict = Field(default_factory=dict, description="the dataset's own parameters")


@dataclass(frozen=True)
class Section:
    """A registry section: the chosen name and its validated parameter record."""

    name: str
    params: Any  # a frozen pydantic model (or None when the entry takes no parameters)

    def kwargs(self) -> dict:
        return {} if self.params is None else self.params.model_dump()


@dataclass(frozen=True)
class Config:
    seed: int
    run: RunConfig
    train: TrainConfig
    data: DataConfig
    model: Section
    algorithm: Section
    codec: Optional[Section]
    topology: Optional[Section]
    raw: dict  # the normalized config as a plain dict (what config_yaml holds)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


_TOP_KEYS = ("seed", "run", "train", "data", "model", "algorithm", "codec", "topology")


def _fmt_loc(prefix: str, loc) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts) if parts else "(top level)"


def _pydantic_problems(err: ValidationError, prefix: str, model: Optional[type] = None) -> list[str]:
    out = []
    for e in err.errors():
        loc = _fmt_loc(prefix, e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and model is not None:
            allowed = [k for k in model.model_fields]
            msg = f"unknown key; allowed keys: {', '.join(allowed) or '(none)'}"
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] != "missing":
            msg += f" (got {got!r})"
        out.append(f"{loc}: {msg}")
    return out


def _section(reg: Registry, key: str, raw: Any, problems: list[str]) -> Optional[Section]:
    if not isinstance(raw, dict):
        problems.append(f"{key}: must be a mapping with a 'name' key (got {raw!r})")
        return None
    if "name" not in raw:
        problems.append(f"{key}.name: required; known {reg.plural}: {', '.join(reg.names())}")
        return None
    name = raw["name"]
    try:
        entry = reg.get(str(name))
    except UnknownNameError as e:
        problems.append(f"{key}.name: {e} (got {name!r})")
        return None
    rest = {k: v for k, v in raw.items() if k != "name"}
    if entry.params is None:
        if rest:
            problems.append(f"{key}: {reg.kind} {name!r} takes no parameters (got {sorted(rest)})")
            return None
        return Section(name, None)
    try:
        return Section(name, entry.params.model_validate(rest))
    except ValidationError as e:
        problems.extend(_pydantic_problems(e, key, entry.params))
        return None


def _top(model: type, key: str, raw: Any, problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{key}: must be a mapping (got {raw!r})")
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems.extend(_pydantic_problems(e, key, model))
        return None


def parse_set(expr: str) -> tuple[list[str], Any]:
    """``'train.lr=0.05'`` -> (['train', 'lr'], 0.05); the value is parsed with yaml.safe_load."""
    if "=" not in expr:
        raise ConfigError([f"--set {expr!r}: expected key.path=value"])
    key, val = expr.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError([f"--set {expr!r}: empty component in key path {key!r}"])
    try:
        value = yaml.safe_load(val) if val.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value {val!r} is not valid YAML ({e})"]) from None
    return path, value


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for expr in sets:
        path, value = parse_set(expr)
        node = raw
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError([f"--set {'.'.join(path)}: {p!r} is not a mapping (got {node[p]!r})"])
            node = node[p]
        node[path[-1]] = value
    return raw


def load_yaml(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file {path!r} does not exist"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {path!r} is not valid YAML: {e}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {path!r}: top level must be a mapping (got {type(raw).__name__})"])
    return raw


def validate(raw: dict) -> Config:
    """Validate a raw config dict; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): must be a mapping (got {raw!r})"])
    for k in raw:
        if k not in _TOP_KEYS:
            problems.append(f"{k}: unknown key; allowed keys: {', '.join(_TOP_KEYS)}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed: must be a non-negative integer (got {seed!r})")
    run = _top(RunConfig, "run", raw.get("run"), problems)
    train = _top(TrainConfig, "train", raw.get("train"), problems)
    data = _top(DataConfig, "data", raw.get("data"), problems)
    if data is not None:
        try:
            entry = DATASETS.get(data.name)
            if entry.params is not None:
                try:
                    entry.params.model_validate(dict(data.params))
                except ValidationError as e:
                    problems.extend(_pydantic_problems(e, "data.params", entry.params))
            elif data.params:
                problems.append(f"data.params: dataset {data.name!r} takes no parameters (got {sorted(data.params)})")
        except UnknownNameError as e:
            problems.append(f"data.name: {e} (got {data.name!r})")
    model = _section(MODELS, "model", raw.get("model", {"name": "mlp"}), problems)
    algorithm = _section(ALGORITHMS, "algorithm", raw.get("algorithm", {"name": "psgd"}), problems)
    codec = topology = None
    if algorithm is not None:
        cls = ALGORITHMS.get(algorithm.name).factory
        codec_raw = raw.get("codec")
        refusal = cls.codec_refusal(algorithm.params) if getattr(cls, "uses_codec", False) else None
        if getattr(cls, "uses_codec", False) and refusal is None:
            if codec_raw is None:
                codec_raw = {"name": getattr(cls, "default_codec", "identity")}
            codec = _section(CODECS, "codec", codec_raw, problems)
            if codec is not None and getattr(cls, "needs_unbiased_codec", False):
                if not getattr(CODECS.get(codec.name).factory, "unbiased", True):
                    problems.append(
                        f"codec.name: algorithm {algorithm.name!r} needs an unbiased compressor "
                        f"(dcd-ecd-psgd Assumption 1.5); {codec.name!r} is biased (got {codec.name!r})")
        elif codec_raw is not None:
            why = refusal or f"algorithm {algorithm.name!r} sends uncompressed data"
            problems.append(f"codec: {why}; remove the codec section (got {codec_raw!r})")
        topo_raw = raw.get("topology")
        if getattr(cls, "needs_topology", False):
            if topo_raw is None:
                topo_raw = {"name": getattr(cls, "default_topology", "ring")}
            topology = _section(TOPOLOGIES, "topology", topo_raw, problems)
        elif topo_raw is not None:
            problems.append(f"topology: algorithm {algorithm.name!r} uses no mixing matrix; "
                            f"remove the topology section (got {topo_raw!r})")
    if problems:
        raise ConfigError(problems)
    norm = {
        "seed": seed,
        "run": run.model_dump(),
        "train": train.model_dump(),
        "data": data.model_dump(),
        "model": {"name": model.name, **model.kwargs()},
        "algorithm": {"name": algorithm.name, **algorithm.kwargs()},
    }
    if codec is not None:
        norm["codec"] = {"name": codec.name, **codec.kwargs()}
    if topology is not None:
        norm["topology"] = {"name": topology.name, **topology.kwargs()}
    return Config(seed, run, train, data, model, algorithm, codec, topology, norm)


def load(path: str, sets: Optional[list[str]] = None) -> Config:
    return validate(apply_overrides(load_yaml(path), sets or []))
