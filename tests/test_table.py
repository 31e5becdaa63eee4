"""reproduce_table.py: two rows x two seeds on tiny demo data, the files and their columns, resume, the paired tests.

The four training runs are made once for the module, in-process: the table's launcher (one subprocess per run) is
swapped for a call of the script's main, which saves a TensorFlow start-up per run; the launcher itself is tested
on a tiny command."""
import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

ROWS = ["WBC_1_raw_report", "WBC_1_raw_default"]


# ----------------------------------------------------------------------------------------------
# Paired statistics on constructed predictions
# ----------------------------------------------------------------------------------------------

def test_mcnemar_exact_known_answers():
    import metrics
    # 10 images only A gets right, 2 only B: two-sided exact p = 2 * P(X <= 2 | n=12, 1/2) = 2 * 79 / 4096.
    a = np.r_[np.ones(10), np.zeros(2), np.ones(50), np.zeros(38)]
    b = np.r_[np.zeros(10), np.ones(2), np.ones(50), np.zeros(38)]
    m = metrics.mcnemar_exact(a, b)
    assert (m["only_a"], m["only_b"], m["both_correct"], m["both_wrong"], m["images"]) == (10, 2, 50, 38, 100)
    assert m["p_value"] == pytest.approx(158 / 4096, rel=1e-12)
    assert metrics.mcnemar_exact(b, a)["p_value"] == pytest.approx(158 / 4096, rel=1e-12)  # symmetric
    # Balanced disagreement gives p = 1; no disagreement at all gives p = 1 by definition.
    assert metrics.mcnemar_exact([1, 0, 1, 0], [0, 1, 0, 1])["p_value"] == pytest.approx(1.0)
    assert metrics.mcnemar_exact([1, 1, 0], [1, 1, 0])["p_value"] == 1.0
    # All 6 discordant images favour A: p = 2 / 2**6.
    assert metrics.mcnemar_exact(np.ones(6), np.zeros(6))["p_value"] == pytest.approx(2 / 64)
    with pytest.raises(ValueError):
        metrics.mcnemar_exact([1, 0], [1, 0, 1])


def test_paired_bootstrap_known_answers():
    import metrics
    # Identical correctness: the difference is 0 in every resample; A always right, B always wrong: exactly 1.
    same = metrics.paired_bootstrap_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    full = metrics.paired_bootstrap_difference(np.ones(20), np.zeros(20))
    assert (full["difference"], full["low"], full["high"]) == (1.0, 1.0, 1.0)
    # 30 images only A right, 10 only B, 60 agree: difference 0.2, per-image sd 0.6, standard error 0.06, so
    # the 95% interval is close to 0.2 +- 1.96 * 0.06 = [0.082, 0.318].
    a = np.r_[np.ones(30), np.zeros(10), np.ones(30), np.zeros(30)]
    b = np.r_[np.zeros(30), np.ones(10), np.ones(30), np.zeros(30)]
    r = metrics.paired_bootstrap_difference(a, b, n_resamples=10000, seed=1)
    assert r["difference"] == pytest.approx(0.2)
    assert (r["accuracy_a"], r["accuracy_b"]) == (pytest.approx(0.6), pytest.approx(0.4))
    assert r["low"] == pytest.approx(0.082, abs=0.015) and r["high"] == pytest.approx(0.318, abs=0.015)
    # Seeded: the same seed gives the same interval.
    assert metrics.paired_bootstrap_difference(a, b, n_resamples=10000, seed=1) == r
    # Per-image fractions (correctness averaged over seeds) work the same way.
    f = metrics.paired_bootstrap_difference(a * 0.5, b * 0.5, n_resamples=2000)
    assert f["difference"] == pytest.approx(0.1) and f["low"] < 0.1 < f["high"]


# ----------------------------------------------------------------------------------------------
# The table on tiny demo data
# ----------------------------------------------------------------------------------------------

def _in_process_launch(cmd, log, jobs=1):
    """The table's launcher, minus the subprocess: call the script's main(argv) here."""
    module = importlib.import_module(Path(cmd[1]).stem)
    try:
        module.main(cmd[2:])
    except SystemExit as e:
        return e.code or 0
    return 0


@pytest.fixture(scope="module")
def table(demo_root, tmp_path_factory):
    import reproduce_table
    out = tmp_path_factory.mktemp("table") / "out"
    cache = tmp_path_factory.mktemp("cache")
    argv = ["--data", str(demo_root), "--rows", ",".join(ROWS), "--seeds", "2", "--epochs", "1",
            "--image-size", "32", "--cache-dir", str(cache), "--bootstrap", "2000", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reproduce_table, "launch", _in_process_launch)
        assert reproduce_table.main(argv) == 0
    return out, argv


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_files_and_columns(table):
    out, _ = table
    for name in ("results.csv", "table.md", "comparisons.md", "label_efficiency.png"):
        assert (out / name).stat().st_size > 0, name
    rows = _read_csv(out / "results.csv")
    assert sorted((r["row"], r["seed"]) for r in rows) == sorted((r, s) for r in ROWS for s in ("0", "1"))
    for column in ("split", "label_percent", "method", "recipe", "seed", "val_accuracy_best", "val_accuracy_mean",
                   "val_accuracy_last", "val_accuracy_selected", "balanced_accuracy", "macro_f1",
                   "majority_baseline", "collapsed_to_majority", "per_class_recall_basophil", "confusion_matrix",
                   "seconds", "epochs", "run_dir"):
        assert column in rows[0], column
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert float(r["val_accuracy_selected"]) == pytest.approx(metrics["val_accuracy_selected"])
        assert (r["split"], r["method"], r["label_percent"]) == ("WBC_1", "raw", "1")
        assert r["recipe"] == r["row"].rsplit("_", 1)[1]
        assert json.loads(r["confusion_matrix"]) == metrics["confusion_matrix"]

    table_md = (out / "table.md").read_text()
    assert "Synthetic demo data" in table_md
    header = ("| Split | Method | Best | Mean | Last | Selected epoch | Balanced acc. | Macro-F1 | Majority baseline "
              "| Seeds | Collapsed |")
    assert table_md.count(header) == 2  # one table per recipe
    for recipe in ("report", "default"):
        accs = [float(r["val_accuracy_selected"]) for r in rows if r["recipe"] == recipe]
        cell = f"{np.mean(accs):.3f} ± {np.std(accs, ddof=1):.3f}"
        collapsed = sum(r["collapsed_to_majority"] == "True" for r in rows if r["recipe"] == recipe)
        line = next(ln for ln in table_md.splitlines()
                    if ln.startswith("| WBC_1 | raw") and f"| {collapsed}/2 |" in ln and cell in ln)
        assert ("⚠" in line) == bool(collapsed)

    comparisons = (out / "comparisons.md").read_text()
    for seed in ("0", "1", "mean"):
        assert f"| raw_default | raw_report | {seed} | 200 |" in comparisons


def test_comparisons_match_the_predictions(table):
    """comparisons.md's McNemar numbers are those of the two runs' val_predictions.csv."""
    import metrics
    import reproduce_table
    out, _ = table
    runs = {(r["row"], r["seed"]): Path(r["run_dir"]) for r in _read_csv(out / "results.csv")}
    a = metrics.read_correctness(runs["WBC_1_raw_default", "0"])
    b = metrics.read_correctness(runs["WBC_1_raw_report", "0"])
    m = metrics.mcnemar_exact([a[p] for p in sorted(a)], [b[p] for p in sorted(a)])
    line = next(ln for ln in (out / "comparisons.md").read_text().splitlines()
                if ln.startswith("| raw_default | raw_report | 0 |"))
    assert f"| {m['only_a']} / {m['only_b']} | {m['p_value']:.3g} |" in line


def test_rerun_trains_nothing_and_report_only_rebuilds(table, monkeypatch):
    import reproduce_table
    out, argv = table
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.name in ("metrics.json", "model.h5")}
    assert len(stamps) == 8

    def no_training(cmd, log):
        raise AssertionError(f"a finished run was trained again: {cmd}")
    monkeypatch.setattr(reproduce_table, "launch", no_training)
    assert reproduce_table.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    for name in ("results.csv", "table.md", "comparisons.md", "label_efficiency.png"):
        (out / name).unlink()
    assert reproduce_table.main(["--out", str(out), "--report-only", "--bootstrap", "2000"]) == 0
    assert len(_read_csv(out / "results.csv")) == 4
    assert (out / "label_efficiency.png").stat().st_size > 0
    assert "Synthetic demo data" in (out / "table.md").read_text()


def test_user_errors_are_one_line(table, tmp_path, capsys):
    import cli
    import reproduce_table
    from runfiles import UserError
    out, argv = table
    with pytest.raises(UserError, match="--rows WBC_2_raw: matches no row"):
        reproduce_table.main(argv + ["--rows", "WBC_2_raw"])
    with pytest.raises(UserError, match="holds runs made with --epochs 1"):  # a folder holds one setting
        reproduce_table.main(argv + ["--epochs", "3", "--dry-run"])
    with pytest.raises(UserError, match="no runs/ folder"):
        reproduce_table.main(["--out", str(tmp_path / "empty"), "--report-only"])
    with pytest.raises(SystemExit) as exit_info:  # as the command line sees it: one line, exit status 2
        cli.run_main(lambda: reproduce_table.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(tmp_path / "nothing") in err and len(err.splitlines()) == 1, err


def test_launch_runs_a_process_and_logs_it(tmp_path):
    """Each run is its own process: its exit status comes back, its output goes to the run's log."""
    import sys
    import reproduce_table
    log = tmp_path / "runs" / "x_seed0.log"
    code = reproduce_table.launch([sys.executable, "-c", "import sys; print('out'); sys.exit('error: bad')"], log)
    assert code == 1
    text = log.read_text()
    assert "out" in text and "error: bad" in text and reproduce_table.last_error_line(log) == "error: bad"


def test_a_failed_run_is_reported_and_retried(table, monkeypatch):
    """A run that fails is listed in table.md and by the exit status; the others are kept; a rerun retries it."""
    import shutil
    import reproduce_table
    out, argv = table
    lost = out / "runs" / "WBC_1_raw_default_seed1"
    shutil.rmtree(lost)
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")}

    def failing(cmd, log, jobs=1):
        log.write_text("error: out of memory (simulated)\n")
        return 2
    monkeypatch.setattr(reproduce_table, "launch", failing)
    assert reproduce_table.main(argv) == 1
    table_md = (out / "table.md").read_text()
    assert "Runs that failed" in table_md and "| WBC_1_raw_default | 1 | 2 | error: out of memory" in table_md
    assert len(_read_csv(out / "results.csv")) == 3  # the three finished runs are still reported

    # The rerun (as after an interruption) trains the missing run only.
    launched = []

    def counting(cmd, log, jobs=1):
        launched.append(cmd[cmd.index("--out") + 1])
        return _in_process_launch(cmd, log)
    monkeypatch.setattr(reproduce_table, "launch", counting)
    assert reproduce_table.main(argv) == 0
    assert launched == [str(lost)]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert len(_read_csv(out / "results.csv")) == 4 and "Runs that failed" not in (out / "table.md").read_text()


def test_jobs_train_runs_at_once_and_share_the_gpu(table, tmp_path, monkeypatch):
    """--jobs 2: two runs are in flight together, each launched with the job count (so JAX processes share the
    GPU's memory); a failure among them is still reported."""
    import threading
    import time
    import reproduce_table
    _, argv = table
    out = tmp_path / "jobs"
    argv = [a if a != argv[argv.index("--out") + 1] else str(out) for a in argv]
    lock, state = threading.Lock(), {"now": 0, "most": 0, "jobs": set()}

    def slow_failing(cmd, log, jobs=1):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["jobs"].add(jobs)
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        return 3
    monkeypatch.setattr(reproduce_table, "launch", slow_failing)
    assert reproduce_table.main(argv + ["--jobs", "2"]) == 1
    assert state["most"] == 2 and state["jobs"] == {2}

    # The launcher gives each process its share of the GPU's memory (unless the user set one).
    monkeypatch.undo()
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    import sys
    log = tmp_path / "env.log"
    show = "import os; print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])"
    code = reproduce_table.launch([sys.executable, "-c", show], log, jobs=3)
    assert code == 0 and "0.300" in log.read_text()
