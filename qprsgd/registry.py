"""One ``Registry`` class for algorithms, codecs, topologies, models and datasets.

An entry is a callable (usually a class) plus an optional pydantic model of its parameters,
so the config layer can validate ``{name: ..., **params}`` sections before any rank starts
work.  Registries fill themselves lazily: the first lookup imports the package that holds the
entries (``qprsgd.codecs`` for codecs, ...), so importing the codec layer never imports torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional


class UnknownNameError(KeyError, ValueError):
    """A registry lookup for a name that is not registered; the message lists the known ones.

    Also a ValueError: a name typed by the user (e.g. a topology's ``base`` inside
    ``generalized_elastic``) is bad input, and every config path catches ValueError."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    params: Optional[type] = None  # a pydantic BaseModel subclass (extra="forbid"), or None
    doc: str = ""


class Registry:
    def __init__(self, kind: str, package: Optional[str] = None, plural: Optional[str] = None):
        self.kind = kind
        self.plural = plural or kind + "s"
        self._package = package
        self._entries: dict[str, Entry] = {}
        self._loaded = package is None

    def register(self, name: str, params: Optional[type] = None):
        """Decorator: ``@CODECS.register("qsgd", params=QSGDParams)``."""

        def deco(factory):
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, factory, params, doc[0] if doc else "")
            return factory

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._package)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}"
            ) from None


ALGORITHMS = Registry("algorithm", "qprsgd.algorithms")
CODECS = Registry("codec", "qprsgd.codecs")
TOPOLOGIES = Registry("topology", "qprsgd.topology", plural="topologies")
MODELS = Registry("model", "qprsgd.models")
DATASETS = Registry("dataset", "qprsgd.datasets")
