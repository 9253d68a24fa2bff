"""What `qprsgd list` and `qprsgd --help` print: whole sentences, no markup, no missing files cited."""
from __future__ import annotations

import contextlib
import io

import pytest

from qprsgd.cli import main
from qprsgd.registry import ALGORITHMS, CODECS, DATASETS, MODELS, TOPOLOGIES, summary


def test_summary_first_sentence_without_internal_references():
    doc = """Quantized-PR-SGD, all-reduce paradigm (Algorithm 1, L114; ALGORITHMS.md §A).

    More text."""
    assert summary(doc) == "Quantized-PR-SGD, all-reduce paradigm (Algorithm 1, L114)."
    # a sentence over several lines is joined, not cut at the line end; abbreviations do not end it
    assert summary("Keep each z_i w.p. p as z_i/p,\n    else 0 (fn. 2). Second sentence.") == \
        "Keep each z_i w.p. p as z_i/p, else 0 (fn. 2)."
    assert summary("X (eq. (3), as fixed by ALGORITHMS.md §B). Y.") == "X (eq. (3))."
    assert summary("D-Q (Algorithm 2, L172), worker m, round n:\n\n  1. a") == "D-Q (Algorithm 2, L172)."
    assert summary("A ``.npy`` file.") == "A .npy file."


def test_list_prints_whole_sentences():
    for reg in (ALGORITHMS, CODECS, TOPOLOGIES, MODELS, DATASETS):
        for name in reg.names():
            doc = reg.get(name).doc
            assert doc.endswith("."), (name, doc)
            assert "ALGORITHMS.md" not in doc and "``" not in doc, (name, doc)
            assert doc.count("(") == doc.count(")"), (name, doc)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["list"]) == 0
    assert "ALGORITHMS.md" not in buf.getvalue() and "pr_sgd" in buf.getvalue()


def test_help_has_no_markup():
    for argv in ([], ["run"], ["report"], ["export"], ["sweep"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
            main(argv + ["--help"])
        assert "``" not in buf.getvalue() and "usage: qprsgd" in buf.getvalue()
