"""Run a project script and kill it with SIGKILL at a chosen point: the interruption cases of test_reliability.

    python tests/faults.py POINT SCRIPT [ARGS...]

POINT is where the process kills itself (a real `kill -9`: no cleanup, no finally blocks, no atexit):
    cache    while the decode cache is being built (after a few images are decoded into the temp array)
    epoch    in the middle of epoch 2 (after its first batch)
    model    while model.h5 is being written for the second time (the file being written is half there)
    backup   while the resume backup is being written for the second time (half-written weights file)
    finish   after the last epoch, while the run folder is being finished (plots, metrics.json)

The hooks wrap the real functions (the real write happens, then the file is cut in half and the process dies), so
they test the project's own code paths, not a copy of them.
"""
import os
import signal
import sys
import threading
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_written(path):
    """Cut a file to half its size, as a write interrupted midway leaves it."""
    path = Path(path)
    if path.is_file():
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def cut_and_die(model, *args, **kwargs):
    """After model.save / save_weights (path positional or filepath=...): leave the file half-written, die."""
    half_written(kwargs.get("filepath", args[0] if args else None))
    die()


def on_call(n, wrapped, after):
    """A replacement for `wrapped` that calls it, and on its n-th call runs after(*args) (which kills)."""
    count = [0]
    lock = threading.Lock()

    def hook(*args, **kwargs):
        with lock:
            count[0] += 1
            hit = count[0] == n
        if hit and after is None:
            die()
        result = wrapped(*args, **kwargs)
        if hit:
            after(*args, **kwargs)
        return result
    return hook


def install(point):
    import data
    if point == "cache":
        data.decode_image = on_call(6, data.decode_image, None)
        return
    import keras
    import training
    if point == "epoch":
        original = training.EpochEvaluator.on_train_batch_end

        def batch_end(self, batch, logs=None):
            original(self, batch, logs)
            if len(self.rows) == 1:  # epoch 1 is finished and recorded: this batch is in epoch 2
                die()
        training.EpochEvaluator.on_train_batch_end = batch_end
    elif point == "model":
        keras.Model.save = on_call(2, keras.Model.save, cut_and_die)
    elif point == "backup":
        keras.Model.save_weights = on_call(2, keras.Model.save_weights, cut_and_die)
    elif point == "finish":
        import report
        report.plot_curves = on_call(1, report.plot_curves, None)
    else:
        raise SystemExit(f"unknown fault point {point}")


def main():
    point, script, *args = sys.argv[1:]
    install(point)
    import importlib

    import cli
    module = importlib.import_module(Path(script).stem)
    sys.argv = [script, *args]
    cli.run_main(lambda: module.main(args))


if __name__ == "__main__":
    main()
