"""Makes TensorFlow unimportable in a process whose PYTHONPATH starts here (conftest.JAX_ENV): the runs under JAX
then run as on a GPU machine with JAX and no TensorFlow, and a TensorFlow import on that path fails the test."""
import importlib.abc
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("tensorflow is not installed here")


sys.meta_path.insert(0, NoTensorFlow())
