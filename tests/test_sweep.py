"""Sweeps: expansion, validation, the SLURM job array, and a real --local run."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from qprsgd import sweep as sw

BASE = {"seed": 0, "run": {"progress": False},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.1, "eval_every": 5, "log_every": 1},
        "model": {"name": "mlp", "hidden": [8]},
        "data": {"name": "digits", "params": {"max_train": 64, "max_test": 32}},
        "algorithm": {"name": "psgd"}}


def write(tmp_path, spec, name="sw.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args, cwd):
    """``qprsgd ARGS`` in this process (no MPI here; --local starts its own mpiexec jobs)."""
    import contextlib
    import io
    import os
    from qprsgd.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(old)
    return Result(rc, out.getvalue(), err.getvalue())


def test_grid_times_zip_expands_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {"name": "g", "base": "base.yaml", "ranks": 4, "set": {"train.epochs": 2},
            "grid": {"algorithm": [{"name": "psgd"}, {"name": "pr_sgd", "K": 2}], "seed": [0, 1, 2]},
            "zip": {"train.lr": [0.1, 0.05], "train.batch_size": [16, 8]}}
    runs = sw.expand(sw.load_spec(str(write(tmp_path, spec))))
    assert len(runs) == 2 * 3 * 2
    assert all(r.error is None and r.ranks == 4 for r in runs)
    # last axis fastest; zip keys advance together
    got = [(r.raw["algorithm"]["name"], r.raw["seed"], r.raw["train"]["lr"], r.raw["train"]["batch_size"])
           for r in runs]
    want = [(a, s, lr, b) for a in ("psgd", "pr_sgd") for s in (0, 1, 2) for lr, b in ((0.1, 16), (0.05, 8))]
    assert got == want
    assert all(r.raw["train"]["epochs"] == 2 for r in runs)              # set: applied to every run
    assert runs[3].raw["algorithm"] == {"name": "psgd"}
    assert runs[6].raw["algorithm"] == {"name": "pr_sgd", "K": 2}
    # repeats share a label (seed left out); names are unique
    assert runs[0].label == runs[2].label != runs[1].label
    assert len({r.name for r in runs}) == len(runs)
    assert runs[6].name.startswith("006-pr_sgd_K2-s0")
    # the validated config is the normalized YAML
    assert yaml.safe_load(runs[6].yaml)["algorithm"]["K"] == 2


def test_ranks_axis_and_invalid_combinations_named(tmp_path):
    spec = {"name": "bad", "base": BASE, "grid": {"ranks": [1, 2], "algorithm.K": [2]}}
    runs = sw.expand(sw.load_spec(str(write(tmp_path, spec))))
    assert [r.ranks for r in runs] == [1, 2]
    # psgd takes no K: each run names the section and the key
    assert all(r.error and "algorithm" in r.error and "'K'" in r.error for r in runs)
    spec = {"name": "mix", "base": BASE,
            "grid": {"algorithm": [{"name": "psgd"}, {"name": "pr_sgd", "K": 0}], "train.lr": [0.1, -1]}}
    runs = sw.expand(sw.load_spec(str(write(tmp_path, spec))))
    errs = {r.name: r.error for r in runs}
    assert errs["000-psgd-lr0.1"] is None
    assert "train.lr" in errs["001-psgd-lr1"]
    assert "algorithm.K" in errs["002-pr_sgd_K0-lr0.1"]
    r = cli("sweep", tmp_path / "sw.yaml", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "INVALID" in r.stdout and "algorithm.K" in r.stdout and "train.lr" in r.stdout
    assert not (tmp_path / "results").exists()                     # a dry run writes nothing
    r = cli("sweep", tmp_path / "sw.yaml", "--local", cwd=tmp_path)
    assert r.returncode == 2 and "--skip-invalid" in r.stderr


def test_bad_sweep_files_rejected(tmp_path):
    for spec, msg in (({"grid": {"seed": 3}}, "grid.seed"), ({"zip": {"seed": [1, 2], "train.lr": [0.1]}}, "same length"),
                      ({"gird": {}}, "unknown sweep keys"), ({"name": "a b"}, "name")):
        with pytest.raises(sw.SweepError, match=msg):
            sw.expand(sw.load_spec(str(write(tmp_path, dict(spec, base=BASE)))), validate=False)


def test_slurm_script_names_every_run_and_parses(tmp_path):
    spec = {"name": "arr", "base": BASE, "ranks": 4,
            "grid": {"algorithm": [{"name": "psgd"}, {"name": "pr_sgd", "K": 4}], "seed": [0, 1]}}
    p = write(tmp_path, spec)
    r = cli("sweep", p, "--slurm", "--nodes", 2, "--gpus-per-node", 1, "--time", "00:30:00",
            "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = (tmp_path / "res" / "sweep.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "res" / "sweep.sbatch")]).returncode == 0
    plan = json.loads((tmp_path / "res" / "sweep.json").read_text())
    assert len(plan["runs"]) == 4
    for k, run in enumerate(plan["runs"]):
        assert f"  {k}) RUN=" in script and run["name"] in script
        assert (tmp_path / "res" / run["name"] / "config.yaml").exists()
    assert "srun --mpi=pmi2 " in script               # detected: mpi4py loads an MPICH here (bundled wheel)
    assert f"PYTHON=${{QPRSGD_PYTHON:-{sys.executable}}}" in script and "#SBATCH --export=ALL" in script
    assert "#SBATCH --array=0-3" in script and "#SBATCH --nodes=2" in script
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --time=00:30:00" in script
    assert "#SBATCH --partition" not in script                              # empty placeholder: line dropped
    assert "@" not in script.replace("$@", "")
    rows = list(csv.DictReader(open(tmp_path / "res" / "index.csv")))
    assert [x["run"] for x in rows] == [x["name"] for x in plan["runs"]]
    assert {x["status"] for x in rows} == {"planned"}
    # a mapping axis is plain columns, not JSON text
    assert [(x["algorithm.name"], x["algorithm.K"], x["seed"]) for x in rows] == \
        [("psgd", "", "0"), ("psgd", "", "1"), ("pr_sgd", "4", "0"), ("pr_sgd", "4", "1")]
    assert "{" not in (tmp_path / "res" / "index.csv").read_text()


def test_slurm_cpu_job_has_no_gres_and_forwards_the_mpi_choice(tmp_path, monkeypatch):
    spec = {"name": "cpu", "base": BASE, "ranks": 2, "grid": {"seed": [0]}}
    p = write(tmp_path, spec)
    monkeypatch.setenv("MPI4PY_MPIABI", "mpich")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/my mpi/lib")
    r = cli("sweep", p, "--slurm", "--mpi", "pmix", "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = (tmp_path / "res" / "sweep.sbatch").read_text()
    assert "#SBATCH --gpus" not in script and "#SBATCH --gres" not in script
    assert "srun --mpi=pmix " in script and "given with --mpi" in r.stdout
    assert "export MPI4PY_MPIABI=mpich" in script and "export LD_LIBRARY_PATH='/opt/my mpi/lib'" in script
    # every run of the sweep pins its world size
    run = json.loads((tmp_path / "res" / "sweep.json").read_text())["runs"][0]["name"]
    assert yaml.safe_load((tmp_path / "res" / run / "config.yaml").read_text())["run"]["ranks"] == 2
    # a config that pins another size is refused, naming the key
    spec["set"] = {"run.ranks": 3}
    runs = sw.expand(sw.load_spec(str(write(tmp_path, spec))))
    assert "run.ranks" in runs[0].error and "3" in runs[0].error


def test_submit_print_and_write(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    r = cli("submit", cfg, "--nodes", 2, "--ntasks-per-node", 2, "--gpus-per-node", 1, "--time", "00:10:00",
            "--set", "train.lr=0.05", "--out", tmp_path / "job", "--print", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --ntasks-per-node=2" in r.stdout
    assert "#SBATCH --gpus-per-node=1" in r.stdout and "srun --mpi=pmi2 --ntasks=4 " in r.stdout
    assert sys.executable in r.stdout and "@" not in r.stdout
    assert not (tmp_path / "job").exists()                     # --print writes nothing
    r = cli("submit", cfg, "--nodes", 1, "--ntasks-per-node", 2, "--mpi", "none", "--set", "train.lr=0.05",
            "--out", tmp_path / "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = (tmp_path / "job" / "job.sbatch").read_text()
    assert "#SBATCH --gpus" not in script and "srun --mpi=none --ntasks=2 " in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "job" / "job.sbatch")]).returncode == 0
    frozen = yaml.safe_load((tmp_path / "job" / "job-config.yaml").read_text())
    assert frozen["train"]["lr"] == 0.05 and frozen["run"]["ranks"] == 2
    # bad input: one message naming the key, nothing written
    for args, words in ((["--set", "train.lr=-1"], "train.lr"), (["--set", "run.ranks=3"], "run.ranks"),
                        (["--set", "algorithm={name: d_psgd}", "--ntasks-per-node", 1], "topology")):
        argv = ["submit", cfg, "--nodes", 1, "--ntasks-per-node", 2, "--out", tmp_path / "bad", *args]
        r = cli(*argv, cwd=tmp_path)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert not (tmp_path / "bad").exists()


def test_job_templates_parse():
    for t in ("slurm_run.sbatch", "mpirun_hostfile.sh"):      # slurm_array: filled, in the test above
        path = f"{sw.JOBS_DIR}/{t}"
        assert subprocess.run(["bash", "-n", path]).returncode == 0, t
    with pytest.raises(sw.SweepError, match="NODES"):
        sw.fill_template("#SBATCH --nodes=@NODES@", {})


@pytest.mark.mpi
def test_local_runs_and_indexes(tmp_path):
    spec = {"name": "loc", "base": BASE, "ranks": 1, "grid": {"seed": [0, 1]}}
    p = write(tmp_path, spec)
    r = cli("sweep", p, "--local", "--out", tmp_path / "res", "--timeout", 120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(tmp_path / "res" / "index.csv")))
    assert [x["status"] for x in rows] == ["done", "done"]
    for x in rows:
        h5 = tmp_path / "res" / x["folder"] / "run.h5"
        assert h5.exists() and (tmp_path / "res" / x["folder"] / "config.yaml").exists()
        from qprsgd.logger import read
        log = read(str(h5))
        assert float(x["final_accuracy"]) == pytest.approx(float(log["eval"]["test_accuracy"][-1]))
        assert int(x["steps"]) == int(log["eval"]["step"][-1]) == 4
    # the seeds differ, so the runs differ
    assert rows[0]["final_test_loss"] != rows[1]["final_test_loss"]
    # a second --local skips finished runs
    r = cli("sweep", p, "--local", "--out", tmp_path / "res", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("done already") == 2


def test_shipped_sweeps_validate():
    import glob
    import os
    files = sorted(glob.glob(os.path.join(sw.JOBS_DIR, "..", "configs", "sweeps", "*.yaml")))
    assert {os.path.basename(f) for f in files} >= {"tiny.yaml", "demo.yaml"}
    for f in files:
        runs = sw.expand(sw.load_spec(f))
        assert runs and all(r.error is None for r in runs), [(r.name, r.error) for r in runs]
    demo = sw.expand(sw.load_spec(os.path.join(sw.JOBS_DIR, "..", "configs", "sweeps", "demo.yaml")))
    cfgs = [yaml.safe_load(r.yaml) for r in demo]
    assert [c["algorithm"]["name"] for c in cfgs] == ["psgd", "pr_sgd", "qpr_sgd", "dcd_psgd"]
    assert {r.ranks for r in demo} == {4} and {c["train"]["target_accuracy"] for c in cfgs} == {0.9}
    assert cfgs[3]["topology"]["name"] == "ring"


def _log(folder, world_size, completed, steps=3):
    """A real run log written through qprsgd.logger (the schema every run writes)."""
    from qprsgd.logger import METRIC_COLUMNS, Logger
    folder.mkdir(parents=True, exist_ok=True)
    lg = Logger(str(folder / "run.h5"), attrs={"world_size": world_size}, world_size=world_size)
    for t in range(1, steps + 1):
        lg.record("metrics", {k: t if k == "step" else 0 for k in METRIC_COLUMNS})
    lg.flush()
    if completed:
        lg.set_attrs(completed=True, final_step=steps)


def test_status_from_the_runs_own_files(tmp_path):
    spec = {"name": "st", "base": BASE, "ranks": 2, "grid": {"seed": [0, 1, 2, 3, 4, 5, 6]}}
    p = write(tmp_path, spec)
    out = tmp_path / "res"
    r = cli("sweep", p, "--status", "--out", out, cwd=tmp_path)
    assert r.returncode == 2 and "sweep.json" in r.stderr           # nothing prepared yet
    r = cli("sweep", p, "--slurm", "--mpi", "pmi2", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = [x["name"] for x in json.loads((out / "sweep.json").read_text())["runs"]]
    d = [out / n for n in names]
    # 0: planned (nothing); 1: done; 2: a singleton that "finished" (world size 1 of 2);
    # 3: launcher exited 1; 4: exited 0 without a completed log; 5: a SLURM task that left the
    # queue without an exit code; 6: started by SLURM, still queued (running)
    _log(d[1], 2, True)
    (d[1] / "exit.rc").write_text("0\n")
    _log(d[2], 1, True)
    (d[2] / "exit.rc").write_text("0\n")
    _log(d[3], 2, False)
    (d[3] / "exit.rc").write_text("1\n")
    (d[4] / "exit.rc").write_text("0\n")
    (d[5] / "slurm_job").write_text("999998_5\n")
    _log(d[6], 2, False, steps=2)
    (d[6] / "slurm_job").write_text("999998_6\n")
    runs = sw.expand(sw.load_spec(str(p)))
    for run in runs:
        run.folder = str(out / run.name)
    want = ["planned", "done", "wrong-size", "failed", "failed", "failed", "running"]
    assert [sw.classify(x.folder, 2, queued={"999998_6"})[0] for x in runs] == want
    assert sw.classify(runs[5].folder, 2, queued=None)[0] == "running"     # squeue unknown: no guess
    assert "world_size 1, planned 2" in sw.classify(runs[2].folder, 2)[2]
    assert sw.classify(runs[6].folder, 2, queued={"999998_6"})[1]["last_step"] == 2
    # the CLI refreshes index.csv (no squeue reachable for job 999998: 5 and 6 count as running)
    r = cli("sweep", p, "--status", "--out", out, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr                      # a failed / wrong-size run
    rows = {x["run"]: x for x in csv.DictReader(open(out / "index.csv"))}
    got = [rows[n]["status"] for n in names]
    assert got[:5] == want[:5] and got[6] == "running"
    assert rows[names[2]]["world_size"] == "1" and "planned 2" in rows[names[2]]["error"]
    assert rows[names[1]]["last_step"] == "3"
    # report: only the done run of the right size is used; the others are named
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        kept = sw.done_only(str(out), [(n,) for n in names[1:4]])
    assert kept == [(names[1],)]
    assert f"left out {names[2]}: wrong-size" in err.getvalue() and f"left out {names[3]}: failed" in err.getvalue()
    with pytest.raises(ValueError, match="no run is done"), contextlib.redirect_stderr(io.StringIO()):
        sw.done_only(str(out), [(names[2],)])
