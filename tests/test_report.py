"""Report: comparable sets, labels, repeats with spread, figures, and numbers recomputed from HDF5."""
from __future__ import annotations

import contextlib
import io
import json
import os

import h5py
import numpy as np
import pytest

from conftest import mpirun
from qprsgd import report, sweep as sw

BASE = {"seed": 0, "run": {"progress": False},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.3, "eval_every": 2, "log_every": 1},
        "model": {"name": "mlp", "hidden": [16]},
        "data": {"name": "digits", "params": {"max_train": 128, "max_test": 64}},
        "algorithm": {"name": "psgd"}}
BWS, LATS = "5Mbps,10Gbps", "0,10ms"


def recompute_time(h5: str, target: float, bw: float, lat: float) -> float:
    """Independent re-timing for allreduce-only runs, straight from the HDF5 columns."""
    with h5py.File(h5, "r") as f:
        M = int(f.attrs["world_size"])
        chans = f["metrics/channel_bytes"].attrs["channels"].split(",")
        k = chans.index("allreduce")
        cb = np.diff(np.concatenate([[0], f["metrics/channel_bytes"][:, k]]))
        cm = np.diff(np.concatenate([[0], f["metrics/channel_messages"][:, k]]))
        local = np.maximum(f["metrics/t_compute"][:] + f["metrics/t_codec"][:],
                           f["metrics/t_step"][:] - f["metrics/t_comm"][:])
        steps = f["metrics/step"][:]
        acc, estep = f["eval/test_accuracy"][:], f["eval/step"][:]
    calls = cm / M
    n = np.where(cm > 0, cb / np.maximum(cm, 1), 0)
    row = local + calls * (2 * (M - 1) * lat + 2 * (M - 1) / M * n * 8 / bw)
    s = estep[np.flatnonzero(acc >= target)[0]]
    return float(row[steps <= s].sum()) if s > 0 else 0.0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of 6 runs in ONE mpiexec job (2 ranks): psgd and pr_sgd K=2 with seeds 0, 1,
    pr_sgd K=4 (seed 0) -- one comparable set -- and psgd with 1 epoch: a second set."""
    tmp = tmp_path_factory.mktemp("rep")
    spec = {"name": "mixed", "base": BASE, "ranks": 2,
            "grid": {"algorithm": [{"name": "psgd"}, {"name": "pr_sgd", "K": 2}], "seed": [0, 1]}}
    runs = sw.expand(spec)
    more = sw.expand({"name": "more", "base": BASE, "ranks": 2,
                      "zip": {"algorithm": [{"name": "pr_sgd", "K": 4}, {"name": "psgd"}],
                              "train.epochs": [2, 1]}})
    for k, r in enumerate(more):
        r.name = f"{len(runs) + k:03d}-{r.name[4:]}"
    runs += more
    out = str(tmp / "mixed")
    sw.prepare({"name": "mixed"}, runs, out)
    specs = [f"{r.name}={os.path.join(r.folder, 'config.yaml')}" for r in runs]
    mpirun(2, ["tests/mpi_runs.py", out] + specs, timeout=300)
    return out, runs


@pytest.mark.mpi
def test_mixed_folder_one_report_per_comparable_set(mixed):
    out, runs = mixed
    from qprsgd.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", out, "--bandwidth", BWS, "--latency", LATS,
                     "--figures", "overview,time_to_target,loss_vs_epoch,accuracy_vs_time_5Mbps"]) == 0
    text = buf.getvalue()
    # the terminal: what differs between the sets, then a short table per set
    assert "2 sets of runs that cannot be compared" in text and "train.epochs = 2 | 1" in text
    header = next(line for line in text.splitlines() if line.startswith("label"))
    assert header.split() == ["label", "reached", "rounds", "bits", "@5Mbps/0ms", "@5Mbps/10ms",
                              "@10Gbps/0ms", "@10Gbps/10ms"]
    sets = [json.load(open(os.path.join(out, "report", sub, "summary.json"))) for sub in ("epochs2", "epochs1")]
    for s, sub in zip(sets, ("epochs2", "epochs1")):
        s["out"] = os.path.join(out, "report", sub)
    main_set, other = sets
    assert main_set["out"].endswith(os.path.join("report", "epochs2"))
    assert other["out"].endswith(os.path.join("report", "epochs1"))
    # K takes two values in the main set: part of the label; seeds are repeats of one label
    assert [lab["label"] for lab in main_set["labels"]] == ["psgd", "pr_sgd K=2", "pr_sgd K=4"]
    assert [lab["runs"] for lab in main_set["labels"]] == [2, 2, 1]
    assert [lab["label"] for lab in other["labels"]] == ["psgd"] and other["labels"][0]["runs"] == 1
    summ = json.load(open(os.path.join(main_set["out"], "summary.json")))
    md = open(os.path.join(main_set["out"], "summary.md")).read()
    assert summ["baseline"] == "psgd"
    assert "M = 2" in summ["context"] and "2 epochs" in summ["context"] and "digits" in summ["context"]
    tgt = summ["target_accuracy"]
    main_runs = [r for r in runs if r.raw["train"]["epochs"] == 2]
    best = []
    for r in main_runs:
        with h5py.File(os.path.join(r.folder, "run.h5"), "r") as f:
            best.append(float(np.nanmax(f["eval/test_accuracy"][:])))
    assert tgt == pytest.approx(min(best))          # default: the best accuracy every run of the set reaches
    # per label: bits and time to target = mean (and min/max) over seeds recomputed from the files
    for lab in summ["labels"]:
        K = {"psgd": None, "pr_sgd K=2": 2, "pr_sgd K=4": 4}[lab["label"]]
        members = [r for r in main_runs if r.raw["algorithm"].get("K") == K]
        assert len(members) == lab["runs"]
        bits, times = [], {}
        for r in members:
            h5 = os.path.join(r.folder, "run.h5")
            with h5py.File(h5, "r") as f:
                i = np.flatnonzero(f["eval/test_accuracy"][:] >= tgt)[0]
                bits.append(int(f["eval/bits_sent"][i]))
            for bw in (5e6, 10e9):
                for lat in (0.0, 0.01):
                    times.setdefault((bw, lat), []).append(recompute_time(h5, tgt, bw, lat))
        assert lab["bits"] == pytest.approx(np.mean(bits))
        assert (lab["spread"]["bits"]["min"], lab["spread"]["bits"]["max"]) == (min(bits), max(bits))
        for (bw, lat), ts in times.items():
            key = f"{'5Mbps' if bw == 5e6 else '10Gbps'}/{'0ms' if lat == 0 else '10ms'}"
            assert lab["time"][key] == pytest.approx(np.mean(ts), rel=1e-9)
            assert lab["spread"]["time"][key]["max"] == pytest.approx(max(ts), rel=1e-9)
            base = next(x for x in summ["labels"] if x["label"] == "psgd")["time"][key]
            assert lab["speedup"][key] == pytest.approx(base / np.mean(ts), rel=1e-9)
        row = next(line for line in md.splitlines() if line.startswith(f"| `{lab['label']}` |"))
        assert f"| {lab['runs']}/{lab['runs']} |" in row
        t = lab["spread"]["time"]["5Mbps/0ms"]
        assert f"{t['mean']:.3g}" in row
        if lab["runs"] > 1 and t["max"] > t["min"]:       # repeats: the min–max spread is shown
            assert f"({t['min']:.3g}–{t['max']:.3g} s)" in row
    # the CSV holds the full numbers, one row per label
    import pandas as pd
    tab = pd.read_csv(os.path.join(main_set["out"], "summary.csv"))
    assert list(tab["label"]) == ["psgd", "pr_sgd K=2", "pr_sgd K=4"]
    assert tab.loc[0, "bits_mean"] == pytest.approx(summ["labels"][0]["bits"])
    # the figures asked for, in each set's folder (every figure: test_figure_names)
    want = {"overview.png", "time_to_target.png", "loss_vs_epoch.png", "accuracy_vs_time_5Mbps.png"}
    for s in sets:
        assert {os.path.basename(p) for p in s["figures"]} == want
        for p in s["figures"]:
            with open(p, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
def test_single_run_folder_and_file(mixed, tmp_path):
    out, runs = mixed
    folder = runs[0].folder
    res = report.report_sweep(folder, BWS, "0", out=str(tmp_path / "one"), formats=("png", "svg", "pdf"),
                              only=("overview",))
    assert len(res["sets"]) == 1 and [lab["label"] for lab in res["labels"]] == ["psgd"]
    assert res["labels"][0]["runs"] == 1 and os.path.exists(tmp_path / "one" / "summary.md")
    assert sorted(os.path.basename(p) for p in res["figures"]) == ["overview.pdf", "overview.png", "overview.svg"]
    assert open(tmp_path / "one" / "overview.svg").read(200).lstrip().startswith("<?xml")
    assert open(tmp_path / "one" / "overview.pdf", "rb").read(5) == b"%PDF-"
    with pytest.raises(ValueError, match="--figures: unknown"):
        report.report_sweep(folder, BWS, "0", out=str(tmp_path / "two"), only=("accuracy_vs_nothing",))
    # a run.h5: the re-timing table for every network
    text = report.report_run(os.path.join(folder, "run.h5"), BWS, LATS, res["target_accuracy"])
    for key in ("5Mbps/0ms", "5Mbps/10ms", "10Gbps/0ms", "10Gbps/10ms"):
        assert key in text


# -- grouping and labels without MPI ---------------------------------------------------------------
def _run(name, M=4, **cfg):
    flat = {"seed": 0, "run.name": name, "run.progress": False, "train.epochs": 2.0, "train.batch_size": 16,
            "train.lr": 0.1, "train.eval_every": 5, "model.name": "mlp", "model.hidden": "[64]",
            "data.name": "digits", "algorithm.name": "psgd", "M": M}
    flat.update(cfg)
    return {"name": name, "cfg": flat}


def test_grouping_by_context_and_labels_by_what_differs():
    runs = [_run("a"), _run("b", seed=1), _run("c", **{"algorithm.name": "qpr_sgd", "algorithm.K": 4,
                                                       "codec.name": "qsgd"}),
            _run("d", **{"algorithm.name": "qpr_sgd", "algorithm.K": 8, "codec.name": "qsgd"}),
            _run("e", **{"train.lr": 0.05}), _run("f", M=8), _run("g", **{"train.eval_every": 50}),
            _run("h", **{"run.name": "other", "train.target_accuracy": 0.9})]
    sets = report.comparable_sets(runs)
    assert [[r["name"] for r in s.runs] for s in sets] == [["a", "b", "c", "d", "e", "g", "h"], ["f"]]
    assert report.describe_differences(sets) == "M = 4 | 8"
    assert [s.name for s in sets] == ["M4", "M8"]
    lab = {r["name"]: r["label"] for r in sets[0].runs}
    # seed, eval_every, run.name, target_accuracy: bookkeeping -> the same label (repeats)
    assert lab["a"] == lab["b"] == lab["g"] == lab["h"] == "psgd lr=0.1"
    assert lab["c"] == "qpr_sgd K=4 lr=0.1" and lab["d"] == "qpr_sgd K=8 lr=0.1"
    assert lab["e"] == "psgd lr=0.05"
    assert sets[1].labels == ["psgd"]


def test_labels_never_merge_different_configs():
    # codec present in one run and absent (null) in the other: only one non-missing value, but
    # the two runs differ -> the key is added so the labels differ
    runs = [_run("a", **{"algorithm.name": "dist_ef_sgd", "codec.name": "sign"}),
            _run("b", **{"algorithm.name": "dist_ef_sgd"})]
    (s,) = report.comparable_sets(runs)
    assert len(s.labels) == 2 and s.labels[0] != s.labels[1]
    assert "codec=sign" in s.labels[0] and "codec=none" in s.labels[1]


def test_figure_names():
    nets = report.networks("5Mbps,10Gbps", "0,10ms")
    figs = report.Figures([], [], "unused", nets, 0.9, "", {"labels": [], "networks": []})
    want = {f"{y}_vs_{x}" for y in ("loss", "accuracy") for x in ("epoch", "round", "bits", "time_5Mbps",
                                                                  "time_10Gbps")}
    assert {stem for stem, _ in figs.stems()} == want | {"time_to_target", "overview"}


def test_axis_scale_and_plain_ticks():
    assert report.choose_scale([0, 1, 2, 10]) == "linear"
    assert report.choose_scale([0, 0.1, 1, 100]) == "log"          # zeros are ignored
    assert [report._plain(v) for v in (0, 0.05, 2, 300, 1e6, 2.5e-4, 1.5e7)] == \
        ["0", "0.05", "2", "300", "1e6", "2.5e-4", "1.5e7"]
    sm = report.smooth(np.r_[np.zeros(10), np.ones(10)], 5)
    assert sm[0] == 0 and sm[-1] == 1 and 0 < sm[10] < 1
    with pytest.raises(ValueError, match="--format"):
        report.parse_formats("png,jpg")


# -- results as DataFrames ------------------------------------------------------------------------
@pytest.mark.mpi
def test_results_dataframes_and_export_round_trip(mixed, tmp_path):
    import pandas as pd
    from qprsgd import results
    from qprsgd.cli import main
    from qprsgd.logger import read
    out, runs = mixed
    res = results.load(out)
    assert list(res.runs["run"]) == [r.name for r in runs]
    r0 = res.runs.iloc[0]
    assert r0["algorithm.name"] == "psgd" and r0["M"] == 2 and r0["train.lr"] == 0.3
    assert r0["model.hidden"] == "[16]" and bool(r0["completed"])
    assert pd.isna(r0["algorithm.K"]) and res.runs.iloc[2]["algorithm.K"] == 2
    for r in runs:                        # long tables: every row of every run, 2-D columns split
        log = read(os.path.join(r.folder, "run.h5"))
        ev = res.eval[res.eval["run"] == r.name]
        assert np.array_equal(ev["test_accuracy"].to_numpy(), log["eval"]["test_accuracy"])
        met = res.metrics[res.metrics["run"] == r.name]
        k = list(log["metrics"].attrs["channel_bytes"]["channels"].split(",")).index("allreduce")
        assert np.array_equal(met["channel_bytes.allreduce"].to_numpy(), log["metrics"]["channel_bytes"][:, k])
        assert np.array_equal(met["bytes_per_rank.1"].to_numpy(), log["metrics"]["bytes_per_rank"][:, 1])
        assert res.runs.set_index("run").loc[r.name, "bits_sent"] == log["eval"]["bits_sent"][-1]
    # logger.read: groups go straight into pandas; old callers' "_attrs" still answers
    log = read(os.path.join(runs[0].folder, "run.h5"))
    assert list(pd.DataFrame(log["eval"]).columns) == sorted(log["eval"])
    assert "_attrs" not in log["metrics"] and log["metrics"]["_attrs"] is log["metrics"].attrs
    assert log["metrics"].get("_attrs")["channel_bytes"]["channels"].startswith("allreduce")
    # a run folder and a run.h5: one row each
    assert len(results.load(runs[1].folder).runs) == 1
    assert results.load(os.path.join(runs[1].folder, "run.h5")).runs.iloc[0]["run"] == runs[1].name
    # export -> read back: the same tables
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", out, "--csv", "--out", str(tmp_path / "csv")]) == 0
    back = results.read_export(str(tmp_path / "csv"))
    pd.testing.assert_frame_equal(back.eval, res.eval, check_dtype=False)
    pd.testing.assert_frame_equal(back.metrics, res.metrics, check_dtype=False)
    assert list(back.runs.columns) == list(res.runs.columns)
    assert list(back.runs["algorithm.name"]) == list(res.runs["algorithm.name"])
    assert np.allclose(back.runs["final_accuracy"], res.runs["final_accuracy"])
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["export", out, "--parquet", "--out", str(tmp_path / "pq")])
    if results.parquet_available():
        assert rc == 0
        pd.testing.assert_frame_equal(results.read_export(str(tmp_path / "pq"), "parquet").eval, res.eval)
    else:
        assert rc == 2 and "--parquet needs pyarrow" in err.getvalue() and not (tmp_path / "pq").exists()
