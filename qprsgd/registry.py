"""One ``Registry`` class for algorithms, codecs, topologies, models and datasets.

An entry is a callable (usually a class) plus an optional pydantic model of its parameters,
so the config layer can validate ``{name: ..., **params}`` sections before any rank starts
work.  Registries fill themselves lazily: the first lookup imports the package that holds the
entries (``qprsgd.codecs`` for codecs, ...), so importing the codec layer never imports torch.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional


_ABBREV = ("al.", "e.g.", "i.e.", "alg.", "fig.", "figs.", "eq.", "eqs.", "cf.", "vs.", "thm.", "sec.", "app.", "resp.", "w.p.")


def summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, for ``qprsgd list``: never cut
    mid-sentence, and without references to the maintainers' ALGORITHMS.md notes (not shipped;
    the docs/algorithms-*.md pages carry what users need)."""
    para = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    text = " ".join(para)
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            word = text[:i + 1].rsplit(" ", 1)[-1].lower()
            if word not in _ABBREV:
                text = text[:i + 1]
                break
    if text.endswith(":"):     # a lead-in to a list: keep what comes before its first clause
        depth, cut = 0, -1
        for i, ch in enumerate(text):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                cut = i
                break
        text = (text[:cut] if cut > 0 else text[:-1]) + "."
    text = text.replace("``", "")
    text = re.sub(r"[;,][^;,()]*ALGORITHMS\.md[^;)]*", "", text)
    text = re.sub(r"\([^;,()]*ALGORITHMS\.md[^;)]*[;,]?\s*", "(", text)
    text = re.sub(r"\(\s*[;,]?\s*\)", "", text)
    text = re.sub(r"\(\s*[;,]\s*", "(", text)
    text = re.sub(r"\s+([,;])", r"\1", re.sub(r"\s{2,}", " ", text))
    return re.sub(r"\s+\.(\s|$)", r".\1", text).strip()


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
            self._entries[name] = Entry(name, factory, params, summary(factory.__doc__ or ""))
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
