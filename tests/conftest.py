"""Shared fixtures: the synthetic demo data (generated once per session), private cache folders, and a way to
run a script as a user would (a subprocess, checking exit status and output), also started ahead of the test that
checks it so that it runs on the second core while other tests run here."""
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# For the runs under JAX (each in its own process): XLA compiles for the CPU without its optimisation passes. These
# runs train tiny models for a few steps, so compiling is most of their time; unoptimised code computes the same
# functions (on a 2-core x86-64 CPU: 14 instead of 24 s of CPU time for test_distributed's 2-device run).
JAX_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Every run under JAX: as on a GPU machine with JAX and no TensorFlow (tests/without_tensorflow makes TensorFlow
# unimportable), which also spares each process TensorFlow's import (keras.utils.set_random_seed imports it
# wherever it is installed, for tf.data's seed; the project feeds JAX from NumPy).
JAX_ENV = {"KERAS_BACKEND": "jax", "XLA_FLAGS": JAX_XLA_FLAGS,
           "PYTHONPATH": os.pathsep.join([str(PROJECT / "tests" / "without_tensorflow"),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}


def pytest_collection_modifyitems(items):
    """Test modules that use no demo data run first (each module whole, in its own order): meanwhile the demo
    data is generated in another process (demo_in_background), on the second core of a 2-core machine."""
    uses_demo = {item.path for item in items if "demo_root" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: item.path in uses_demo)  # a stable sort: the order within each group is kept


def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session that every pytest-xdist worker shares (each worker's own temporary folders
    lie inside it): the demo data is drawn once, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def demo_in_background(request, tmp_path_factory):
    """From the session's first test on, when a selected test needs it: (process generating the demo data or None
    where another worker generates it, its root folder)."""
    if not any("demo_root" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    root = session_folder(tmp_path_factory) / "demo" / "demo"
    root.parent.mkdir(exist_ok=True)
    try:  # the first worker to create the claim draws the data; the others wait for its manifest
        os.close(os.open(root.parent / "drawing.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        yield None, root
        return
    started = Started([sys.executable, "-c", "import sys, demo_data; demo_data.ensure_demo_data(sys.argv[1])", root])
    yield started, root
    if os.environ.get("PYTEST_XDIST_WORKER"):
        started.result(timeout=600)  # another worker may still be waiting for it
    started.stop()  # still running only when the session ended before any test asked for the data


@pytest.fixture(scope="session")
def demo_root(demo_in_background, tmp_path_factory):
    """The synthetic demo dataset in the course layout, generated once for the whole session."""
    import time
    import demo_data
    if demo_in_background is None:  # asked for by a test that did not declare it
        return demo_data.ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo")
    started, root = demo_in_background
    if started is None:  # another worker draws it
        deadline = time.monotonic() + 600
        while not (root / "manifest.json").exists():
            assert time.monotonic() < deadline, f"the demo data did not appear in {root} within 600 s"
            time.sleep(0.5)
        return root
    done = started.result(timeout=600)
    assert done.returncode == 0, f"generating the demo data failed:\n{done.stderr[-3000:]}"
    return demo_data.ensure_demo_data(root)  # finds the finished folder


@pytest.fixture(autouse=True)
def float32_policy():
    """Each test starts and ends under Keras' default float32 policy. In-process training sets the global policy
    (--precision auto: mixed_bfloat16 on a CPU with AVX-512 bf16), and a test comparing numbers at float32's
    precision must not depend on which test ran before it in its worker."""
    def reset():
        if "keras" in sys.modules:
            sys.modules["keras"].mixed_precision.set_global_policy("float32")
    reset()
    yield
    reset()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private decode cache, so tests never read or write the user's ~/.cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("WBC_CACHE_DIR", str(d))
    return d


def run_script(script, *args, env=None, timeout=600, cwd=None):
    """Run a project script in a fresh Python process; returns CompletedProcess (text output)."""
    return start_script(script, *args, env=env, cwd=cwd).result(timeout)


def start_script(script, *args, env=None, cwd=None):
    """run_script's fresh process, started and left running while this one goes on: .result() waits for it."""
    return Started([sys.executable, PROJECT / script, *args],
                   {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}, cwd)


class Started:
    """A command running in its own process (its output in temporary files: a full pipe never stalls it)."""

    def __init__(self, cmd, env=None, cwd=None):
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self._out, stderr=self._err, text=True, env=env,
                                     cwd=cwd or PROJECT)

    def result(self, timeout=600) -> subprocess.CompletedProcess:
        """Wait for it (killed after `timeout` seconds, and TimeoutExpired raised): its exit status and output."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self._out.read(), self._err.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def selected(request, test_name):
    """Whether a test function of that name is among the session's selected tests (e.g. before starting its
    process ahead of it)."""
    return any(getattr(item, "originalname", None) == test_name for item in request.session.items)


def shared_data(name):
    """A folder of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real images not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def cnn_run(demo_root, tmp_path_factory):
    """A tiny CNN trained for 3 epochs on the demo data at 32x32: its run folder and its private cache."""
    import keras
    import train_cnn
    base = tmp_path_factory.mktemp("cnn_run")
    policy = keras.mixed_precision.global_policy().name
    train_cnn.main(["--data", str(demo_root), "--image-size", "32", "--epochs", "3", "--width", "8", "--depth", "2",
                    "--dense", "16", "--out", str(base / "run"), "--cache-dir", str(base / "cache"), "--quiet"])
    yield base / "run", base / "cache"
    keras.mixed_precision.set_global_policy(policy)


def load_tool(name):
    """A script of tools/ as a module (tools/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, PROJECT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_status(main, argv):
    """main(argv) as the command line runs it (cli.run_main): returns the exit status."""
    import cli
    with pytest.raises(SystemExit) as done:
        cli.run_main(lambda: main([str(a) for a in argv]))
    return done.value.code


def table_in_process(capsys, *argv):
    """reproduce_table.py's main as the command line runs it, in this process (a dry run starts no Keras):
    returns returncode, stdout and stderr as a finished process would."""
    import types
    import reproduce_table
    capsys.readouterr()
    status = exit_status(reproduce_table.main, argv)
    printed = capsys.readouterr()
    return types.SimpleNamespace(returncode=status, stdout=printed.out, stderr=printed.err)


@pytest.fixture
def no_hang(request):
    """Fail, rather than hang CI, when a case does not finish in two minutes (a named pipe once blocked for ever)."""
    def timeout(*_):
        raise TimeoutError(f"{request.node.name} ran over 120 s (a hang?)")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
