"""Data parallelism on CPU-simulated devices and processes, and the table shared between processes.

Each training run is a subprocess: the device count of a backend is fixed when it starts. JAX sees two CPU devices
through XLA_FLAGS=--xla_force_host_platform_device_count=2, TensorFlow splits the CPU into two logical devices
(--devices cpu:0,1 does both). Tolerances (docs/distributed.md): the same global batch and seed on 1 and 2 devices
give per-epoch losses within 0.01 (JAX) and 0.05 (TensorFlow) of each other (one-off runs: at most 0.003 and
0.029). The multi-process run joins two processes with two CPU devices each through keras.distribution.initialize.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import JAX_ENV, JAX_XLA_FLAGS, PROJECT

RUN_FILES = {"args.json", "history.csv", "metrics.json", "model.h5", "val_predictions.csv", "curves.png",
             "confusion.png"}
TINY = ["--split", "WBC_100", "--image-size", "16", "--width", "4", "--epochs", "2", "--batch-size", "16",
        "--precision", "float32", "--seed", "0", "--quiet", "--min-steps", "0",
        # 432 training images after this hold-out: every batch splits evenly between 2 devices.
        "--holdout", "0.17"]


def _env(backend, cache):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "WBC_CACHE_DIR": str(cache)}
    if backend == "jax":
        env.update(JAX_ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {JAX_XLA_FLAGS}")
    return env


def _start(script, args, env, cwd=PROJECT):
    return subprocess.Popen([sys.executable, str(PROJECT / script), *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _history(run):
    import csv
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def _column(rows, key):
    return np.array([float(r[key]) for r in rows])


def _check_equivalent(one, two, tolerance, replicas=2):
    """Two run folders of the same run on 1 and on 2 devices: same files, same loss curve within `tolerance`,
    a model.h5 of the same form that plain Keras loads on one device and that predicts like the 1-device one."""
    import keras
    assert RUN_FILES <= {p.name for p in one.iterdir()} and RUN_FILES <= {p.name for p in two.iterdir()}
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 2
    for key in ("train_loss", "holdout_loss", "val_loss"):
        assert np.max(np.abs(_column(h1, key) - _column(h2, key))) < tolerance, (key, h1, h2)
    assert json.loads((one / "args.json").read_text())["distribution"]["replicas"] == 1
    assert json.loads((two / "args.json").read_text())["distribution"]["replicas"] == replicas
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m1.keys() == m2.keys() and m1["selected_epoch"] == m2["selected_epoch"]
    a, b = (keras.models.load_model(r / "model.h5", compile=False) for r in (one, two))
    assert a.get_config() == b.get_config()  # same form: e.g. no synchronized batch norm left in the config
    assert [w.shape for w in a.get_weights()] == [w.shape for w in b.get_weights()]
    x = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    assert np.max(np.abs(a.predict(x, verbose=0) - b.predict(x, verbose=0))) < 10 * tolerance


@pytest.mark.slow
def test_jax_two_devices_match_one_device(demo_root, tmp_path):
    """train_cnn.py (default recipe: class weights, hold-out selection, BN recalibration, augmentation)."""
    pytest.importorskip("jax")
    env = _env("jax", tmp_path / "cache")
    base = ["--data", demo_root, *TINY]
    procs = [_start("train_cnn.py", [*base, "--devices", d, "--out", tmp_path / name], env)
             for d, name in (("cpu", "one"), ("cpu:0,1", "two"))]
    for p in procs:
        _finish(p)
    _check_equivalent(tmp_path / "one", tmp_path / "two", tolerance=0.01)


@pytest.mark.slow
def test_tensorflow_two_devices_match_one_device_with_the_consistency_wrapper(demo_root, tmp_path):
    """train_masked.py --consistency (paired inputs, an added loss) under MirroredStrategy on 2 logical CPUs.
    No augmentation or dropout: under TensorFlow each replica draws its own random numbers for its half batch,
    so those would differ from a one-device run by design, not by error. Unframed, without stain normalisation:
    with them the two epochs' hold-out accuracies here lie within 1-3 of 88 images of each other, so the selected
    epoch (whose predictions are compared) flips between runs that differ by 0.03 in loss; the other tests in this
    file train the default recipe, framing and stain normalisation included, on two devices."""
    env = _env("tensorflow", tmp_path / "cache")
    base = ["--data", demo_root, *TINY, "--consistency", "0.5", "--no-augment", "--dropout", "0",
            "--dropout-step", "0", "--frame-cell", "0", "--stain-norm", "none"]
    procs = [_start("train_masked.py", [*base, "--devices", d, "--out", tmp_path / name], env)
             for d, name in (("cpu", "one"), ("cpu:0,1", "two"))]
    for p in procs:
        _finish(p)
    _check_equivalent(tmp_path / "one", tmp_path / "two", tolerance=0.05)


# Records every file-system change a process makes under WATCHED, then runs the script as __main__.
AUDIT = textwrap.dedent("""
    import os, runpy, sys, atexit
    watched, log = os.path.realpath(sys.argv[1]), sys.argv[2]
    changes = []
    def hook(event, args):
        if event in ("open", "os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            if event == "open" and (not isinstance(args[1], str) or not set(args[1]) & set("wax+")):
                if not (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                    return
            paths = [os.fsdecode(p) for p in args[:2 if event in ("os.rename", "os.replace") else 1]
                     if isinstance(p, (str, bytes, os.PathLike))]
            if any(os.path.realpath(p).startswith(watched) for p in paths):
                changes.append(f"{event} {' -> '.join(paths)}")
    sys.addaudithook(hook)
    atexit.register(lambda: open(log, "w").write("\\n".join(changes)))
    script = sys.argv[3]
    sys.argv = sys.argv[3:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
""")


@pytest.mark.slow
def test_jax_two_processes_train_and_only_process_0_writes(demo_root, tmp_path):
    pytest.importorskip("jax")
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = _env("jax", tmp_path / "cache")  # two processes with two CPU devices each: a mesh of 4
    audit = tmp_path / "audit.py"
    audit.write_text(AUDIT)
    procs = [subprocess.Popen([sys.executable, str(audit), str(out), str(tmp_path / f"writes{i}.txt"),
                               str(PROJECT / "train_cnn.py"), "--data", str(demo_root), *TINY, "--devices", "all",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
                               "--out", str(out)],
                              env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    outputs = [_finish(p) for p in procs]
    assert "process 1 of 2: done" in outputs[1]
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    distribution = json.loads((out / "args.json").read_text())["distribution"]
    assert distribution["processes"] == 2 and distribution["replicas"] == 4
    assert len(_history(out)) == 2 and np.all(np.isfinite(_column(_history(out), "train_loss")))
    writes0 = (tmp_path / "writes0.txt").read_text().splitlines()
    writes1 = (tmp_path / "writes1.txt").read_text().splitlines()
    assert any("history.csv" in w for w in writes0) and any("model.h5" in w for w in writes0)  # the hook sees writes
    assert writes1 == [], writes1


# ----------------------------------------------------------------------------------------------
# The table spread over processes
# ----------------------------------------------------------------------------------------------

def test_shard_and_list_arguments():
    import reproduce_table
    from runfiles import UserError
    assert reproduce_table.parse_shard("1/3") == (1, 3) and reproduce_table.parse_shard(None) == (0, 1)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(UserError):
            reproduce_table.parse_shard(bad)


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    import reproduce_table
    path = tmp_path / "claims" / "x.claim"
    assert reproduce_table.claim(path)
    assert not reproduce_table.claim(path)  # held by this live process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    assert reproduce_table.claim(path)  # its process is gone
    assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"host": "another-host", "pid": 1}))
    assert not reproduce_table.claim(path)  # another host's claim: cannot tell, so respected


@pytest.mark.slow
def test_three_concurrent_table_processes_train_each_run_once_and_report_every_run(demo_root, tmp_path):
    import csv
    table = ["reproduce_table.py", "--data", demo_root, "--rows", "WBC_1_raw_default",
             "--seeds", "2", "--epochs", "1", "--image-size", "16", "--precision", "float32", "--bootstrap", "200"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "WBC_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("KERAS_BACKEND", None)

    def run(*extra):
        return _start(table[0], [*table[1:], *extra], env)

    # Two shards and a whole-table process at once (it overlaps both shards).
    shared = tmp_path / "shared"
    procs = [run("--out", shared, "--shard", "0/2"), run("--out", shared, "--shard", "1/2"), run("--out", shared)]
    for p in procs:
        _finish(p, timeout=600)
    runs = sorted(p.name for p in (shared / "runs").iterdir() if p.is_dir())
    assert runs == ["WBC_1_raw_default_seed0", "WBC_1_raw_default_seed1"]
    for name in runs:  # each run launched once: its log holds one command line
        launches = [l for l in (shared / "runs" / f"{name}.log").read_text().splitlines() if l.startswith("$ ")]
        assert len(launches) == 1, (name, launches)
    assert not list((shared / "claims").iterdir())  # every claim released
    # The files reported from the shared folder hold each run once, with that run's own figures (what a single
    # process would report: the runs are the same commands, and the report reads only the run folders).
    _finish(run("--out", shared, "--report-only"))
    with open(shared / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["seed"] for r in rows) == ["0", "1"]
    for r in rows:
        own = json.loads((shared / "runs" / f"WBC_1_raw_default_seed{r['seed']}" / "metrics.json").read_text())
        assert float(r["balanced_accuracy"]) == pytest.approx(own["balanced_accuracy"], abs=1e-9)
    assert "| WBC_1 | raw | " in (shared / "table.md").read_text()


def test_device_mistakes_end_in_one_line_before_keras_starts(tmp_path):
    # On a fresh machine (an empty cache folder): answered before the demo data is generated, too.
    from conftest import run_script
    fresh = {"WBC_CACHE_DIR": str(tmp_path / "cache")}
    for script, argv, fragment in (("train_cnn.py", ["--devices", "gpu:x"], "expected auto, cpu, all"),
                                   ("train_cnn.py", ["--devices", "cpu:0,0"], "named twice"),
                                   ("train_masked.py", ["--num-processes", "2", "--process-id", "2"],
                                    "below --num-processes 2"),
                                   ("pretrain_resnet.py", ["--num-processes", "0"], "expected a number >= 1")):
        done = run_script(script, *argv, "--out", tmp_path / "r", env=fresh)
        assert done.returncode == 2 and fragment in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r").exists()
    assert not list((tmp_path / "cache").glob("demo*")), "the demo data was generated for a mistyped option"
