"""YAML -> frozen, validated records.

Validation uses pydantic v2 (``extra="forbid"`` everywhere).  Why a library rather than
hand-written checks: every field's type, bound and allowed values are declared once, next to
its default, and pydantic reports *every* error with its location, so the messages below
("train.lr: Input should be greater than 0 (got -1)") come for free and stay consistent as
algorithms add parameters.  Each registry entry (algorithm, codec, topology, model, dataset)
declares its own parameter model; this module validates a section ``{name: X, ...}`` against
the model that X registered, so an algorithm's parameters live next to the algorithm.

Only a safe YAML loader is used (:class:`_Loader`, a ``yaml.SafeLoader`` that also refuses
duplicate keys, aliases (``*name``: a "billion laughs" alias bomb cannot expand) and nesting
deeper than :data:`MAX_DEPTH`).  Errors are collected into one :class:`ConfigError` whose
message lists every problem as ``key.path: what is wrong (got VALUE)``; VALUE is quoted by
:func:`brief`, which bounds both the work and the length of the quote, and at most
:data:`MAX_PROBLEMS` problems are listed.

Numbers: every float anywhere in a config must be finite (``.inf``/``.nan`` are refused), a
``true``/``false`` is never accepted where a number is expected, and the training knobs have
sanity bounds (see the ``Field`` declarations below and docs/config.md).
"""
from __future__ import annotations

import copy
import math
import reprlib
from dataclasses import dataclass
from typing import Any, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .registry import ALGORITHMS, CODECS, DATASETS, MODELS, TOPOLOGIES, Registry, UnknownNameError


MAX_DEPTH = 32
"""Deepest nesting of mappings/lists a config file (or a ``--set`` value) may have."""
MAX_PROBLEMS = 20
"""At most this many problems are listed in one ConfigError (then '... and N more')."""
MAX_QUOTE = 120
"""Longest quote of a user value inside an error message (characters)."""

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = 6
_repr.maxstring = _repr.maxother = 80
_repr.maxlong = 40


def brief(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` bounded in work and length: nested containers are cut after a few
    levels and items, so quoting a huge or alias-shared structure costs microseconds."""
    try:
        text = _repr.repr(value)
    except Exception as e:  # a user value whose repr itself fails: say what it is
        text = f"<{type(value).__name__}: unprintable ({type(e).__name__})>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cut(text: str, limit: int = 600) -> str:
    """A message (not a value) bounded to ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """An invalid configuration; ``str()`` lists each problem with its key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = [p if len(p) <= 1000 else p[:997] + "..." for p in self.problems[:MAX_PROBLEMS]]
        if len(self.problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(self.problems) - MAX_PROBLEMS} more problem(s)")
        super().__init__("invalid configuration:\n  " + "\n  ".join(shown))


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys, aliases and deep nesting."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            ev = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{ev.anchor}) are not allowed in a config; write the value out",
                ev.start_mark)
        depth = getattr(self, "_qdepth", 0)
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        self._qdepth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._qdepth = depth

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {brief(key)} (first given on line {first + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def yaml_load(stream) -> Any:
    """Parse YAML text (or a file object) with :class:`_Loader`."""
    return yaml.load(stream, Loader=_Loader)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Strict):
    """Learning-rate schedule: lr * gamma**(number of milestones passed), after a linear warm-up."""

    kind: Literal["constant", "step"] = Field("constant", description="step: ×gamma at each milestone")
    milestones: List[float] = Field(default_factory=list, description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor at each milestone (0 < gamma <= 1)")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length (at most train.epochs)")

    @model_validator(mode="after")
    def _check(self):
        if not all(math.isfinite(m) for m in self.milestones):
            raise ValueError(f"milestones must be finite numbers, got {brief(list(self.milestones))}")
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be positive and increasing, got {brief(list(self.milestones))}")
        if self.kind == "constant" and self.milestones:
            raise ValueError("milestones given with kind 'constant'; use kind: step")
        return self


class TrainConfig(_Strict):
    epochs: float = Field(3.0, gt=0, le=1e6, description="passes over the data (fractions allowed)")
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(0.1, gt=0, le=1e3, description="base learning rate γ / η (at most 1000)")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="learning-rate schedule (below)")
    weight_decay: float = Field(0.0, ge=0, le=1, description="λ (at most 1); each algorithm says where λx enters")
    eval_every: int = Field(50, ge=1, description="steps between evaluations (also at the end)")
    log_every: int = Field(10, ge=1, description="steps per metrics row")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = never")
    bucket_mb: float = Field(
        1.0, ge=0, le=1024, allow_inf_nan=False,
        description="gradient bucket size in MB (2^20 bytes of float32): algorithms that communicate "
                    "every step start each bucket's transport as backward produces it -- psgd, sgdm "
                    "(all-reduce), signsgd_mv, signum_mv and dist_ef_* (pushes to the server), qsgd "
                    "with per_bucket; 0 = one bucket after backward.  Same iterates either way, except "
                    "where a per-bucket codec is asked for (docs/algorithms-allreduce.md, algorithms-ps.md)")
    target_accuracy: Optional[float] = Field(None, gt=0, le=1, description="for reports: time/bits to this accuracy")

    @model_validator(mode="after")
    def _check_schedule(self):
        s = self.schedule
        if s.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs = {s.warmup_epochs:g} is longer than epochs = {self.epochs:g}")
        return self


MAX_THREADS = 1024
"""Upper bound on run.threads and run.codec_threads (no node has more cores per rank)."""
MAX_SEED = 2 ** 32 - 1
"""Largest seed (every generator in the tool -- numpy, torch -- takes it exactly)."""


class RunConfig(_Strict):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="names the results folder")
    threads: int = Field(1, ge=1, le=MAX_THREADS, description="torch threads per rank")
    codec_threads: Optional[int] = Field(
        None, ge=1, le=MAX_THREADS, description="codec kernel threads per rank; default: cores on the node / ranks on the node")
    device: Literal["cpu", "cuda", "sim", "cuda_host"] = Field(
        "cpu", description="where the model, the algorithm's state and the codec run. cuda: one GPU per "
        "rank (by node-local rank), only payload bytes cross to the host; sim: the GPU code path on the "
        "CPU, for tests; cuda_host: the model on the GPU, algorithm and codec on host copies (the "
        "path before issue 19, for comparison) -- docs/gpu.md")
    share_gpus: bool = Field(
        False, description="cuda: allow more ranks on a node than visible GPUs (ranks share GPUs "
        "round-robin; e.g. a benchmark at 2 ranks on one GPU). false: such a node is refused")
    gpu_mpi: Literal["auto", "staged", "cuda_aware"] = Field(
        "auto", description="cuda: how device vectors reach MPI. staged: through pinned host buffers; "
        "cuda_aware: float all-reduces get device buffers directly (payloads are staged); auto: "
        "cuda_aware when the MPI library reports CUDA support, else staged")
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
    ranks: Optional[int] = Field(
        None, ge=1, description="expected MPI processes (dedicated server included); the run refuses any "
                                "other world size. Default: whatever the launcher started (still checked "
                                "against the launcher's own count)")

    @model_validator(mode="after")
    def _check_device(self):
        if self.device in ("cuda", "cuda_host") and self.workers is not None:
            raise ValueError(f"run.workers (the in-process cluster) runs on run.device 'cpu' or 'sim', "
                             f"got run.device = {self.device!r}: launch one MPI rank per GPU instead")
        if self.share_gpus and self.device not in ("cuda", "cuda_host"):
            raise ValueError(f"run.share_gpus = true applies to run.device 'cuda' / 'cuda_host' only, got "
                             f"run.device = {self.device!r}")
        return self


class DataConfig(_Strict):
    name: str = Field("digits", description="a dataset name (qprsgd list)")
    data_dir: Optional[str] = Field(None, description="folder holding the files (nothing downloads)")
    shard: Literal["iid", "dirichlet"] = Field("iid", description="dirichlet: non-iid over labels")
    alpha: float = Field(0.5, gt=0, le=1e6, description="Dirichlet concentration for shard: dirichlet")
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
            if e["loc"] and e["loc"][-1] == "params" and isinstance(e.get("input"), dict):
                msg += (f"; parameters go directly in the {prefix or 'section'} section, next to "
                        f"'name' (e.g. {prefix or 'section'}: {{name: ..., {next(iter(allowed), 'key')}: ...}})")
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] != "missing":
            msg += f" (got {brief(got)})"
        out.append(f"{loc}: {msg}")
    return out


def _section(reg: Registry, key: str, raw: Any, problems: list[str]) -> Optional[Section]:
    if not isinstance(raw, dict):
        problems.append(f"{key}: must be a mapping with a 'name' key (got {brief(raw)})")
        return None
    if "name" not in raw:
        problems.append(f"{key}.name: required; known {reg.plural}: {', '.join(reg.names())}")
        return None
    name = raw["name"]
    try:
        entry = reg.get(str(name))
    except UnknownNameError as e:
        problems.append(f"{key}.name: {e} (got {brief(name)})")
        return None
    rest = {k: v for k, v in raw.items() if k != "name"}
    if entry.params is None:
        if rest:
            problems.append(f"{key}: {reg.kind} {brief(name)} takes no parameters (got {brief(sorted(rest))})")
            return None
        return Section(name, None)
    bools = _bool_problems(entry.params, rest, key)
    if bools:
        problems.extend(bools)
        return None
    try:
        return Section(name, entry.params.model_validate(rest))
    except ValidationError as e:
        problems.extend(_pydantic_problems(e, key, entry.params))
        return None


def _takes_bool(annotation) -> bool:
    import typing
    if annotation is bool:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


def _bool_problems(model: type, raw: dict, prefix: str) -> list[str]:
    """A YAML true/false where the model expects a number (pydantic would turn true into 1)."""
    out = []
    fields = getattr(model, "model_fields", {})
    for k, v in raw.items():
        f = fields.get(k) if isinstance(k, str) else None
        if f is None:
            continue
        if isinstance(v, bool) and not _takes_bool(f.annotation):
            out.append(f"{prefix}.{k}: a true/false is not allowed here; expected {_type_name(f.annotation)} (got {v!r})")
        elif isinstance(v, dict) and isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out.extend(_bool_problems(f.annotation, v, f"{prefix}.{k}"))
    return out


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _nonfinite(raw: Any, path: str, out: list[str], depth: int = 0, seen: Optional[set] = None) -> None:
    """Every float anywhere in the config must be finite.  Each container is visited once (a
    structure built from shared references costs its distinct nodes, not its expansion)."""
    seen = set() if seen is None else seen
    if depth > MAX_DEPTH or len(out) > MAX_PROBLEMS:
        return
    if isinstance(raw, float) and not math.isfinite(raw):
        out.append(f"{path or '(top level)'}: must be a finite number (got {raw!r})")
    elif isinstance(raw, (dict, list, tuple)):
        if id(raw) in seen:
            return
        seen.add(id(raw))
        items = raw.items() if isinstance(raw, dict) else enumerate(raw)
        for k, v in items:
            _nonfinite(v, f"{path}.{k}" if path else str(k), out, depth + 1, seen)


def _top(model: type, key: str, raw: Any, problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{key}: must be a mapping (got {brief(raw)})")
        return None
    bools = _bool_problems(model, raw, key)
    if bools:
        problems.extend(bools)
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
        value = yaml_load(val) if val.strip() else None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError([f"--set {key}: value {brief(val)} is not valid YAML "
                           f"({cut(str(e) or type(e).__name__, 400)})"]) from None
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
                    raise ConfigError([f"--set {'.'.join(path)}: {p!r} is not a mapping (got {brief(node[p])})"])
            node = node[p]
        node[path[-1]] = value
    return raw


def load_yaml(path: str) -> dict:
    """Read a config file; every way it can be unreadable is a ConfigError naming the file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = yaml_load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file {path!r} does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {path!r} is a directory, not a YAML file"]) from None
    except OSError as e:
        raise ConfigError([f"config file {path!r} cannot be read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file {path!r} is not UTF-8 text (byte {e.start}); "
                           f"is it a binary file?"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {path!r} is not valid YAML: {cut(str(e), 600)}"]) from None
    except RecursionError:
        raise ConfigError([f"config file {path!r} is nested too deeply"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {path!r}: top level must be a mapping (got {type(raw).__name__})"])
    return raw


def validate(raw: dict) -> Config:
    """Validate a raw config dict; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): must be a mapping (got {brief(raw)})"])
    for k in raw:
        if k not in _TOP_KEYS:
            problems.append(f"{str(k)[:MAX_QUOTE]}: unknown key; allowed keys: {', '.join(_TOP_KEYS)}")
    _nonfinite(raw, "", problems)
    if problems:
        raise ConfigError(problems)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        problems.append(f"seed: must be a non-negative integer <= {MAX_SEED} (got {brief(seed)})")
    run = _top(RunConfig, "run", raw.get("run"), problems)
    train = _top(TrainConfig, "train", raw.get("train"), problems)
    data = _top(DataConfig, "data", raw.get("data"), problems)
    if data is not None:
        try:
            entry = DATASETS.get(data.name)
            if data.data_dir is not None and not getattr(entry.factory, "reads_files", True):
                problems.append(f"data.data_dir: dataset {data.name!r} reads no files; remove data_dir "
                                f"(got {brief(data.data_dir)})")
            if entry.params is not None:
                bools = _bool_problems(entry.params, dict(data.params), "data.params")
                problems.extend(bools)
                try:
                    if not bools:
                        entry.params.model_validate(dict(data.params))
                except ValidationError as e:
                    problems.extend(_pydantic_problems(e, "data.params", entry.params))
            elif data.params:
                problems.append(f"data.params: dataset {data.name!r} takes no parameters (got {brief(sorted(data.params))})")
        except UnknownNameError as e:
            problems.append(f"data.name: {e} (got {brief(data.name)})")
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
            problems.append(f"codec: {why}; remove the codec section (got {brief(codec_raw)})")
        topo_raw = raw.get("topology")
        if getattr(cls, "needs_topology", False):
            if topo_raw is None:
                topo_raw = {"name": getattr(cls, "default_topology", "ring")}
            topology = _section(TOPOLOGIES, "topology", topo_raw, problems)
        elif topo_raw is not None:
            problems.append(f"topology: algorithm {algorithm.name!r} uses no mixing matrix; "
                            f"remove the topology section (got {brief(topo_raw)})")
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
