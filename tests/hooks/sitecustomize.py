"""Runs at start-up of every Python process that has this folder on PYTHONPATH (the workers of a Ray head
started with ``nonfinite.hook_env``). With VAEGAN_TEST_POISON_FILE set, it hands ``vaegan.step.VAEGANTrainer``
to ``nonfinite.poison_from_file`` as soon as that module is imported; otherwise it does nothing."""
import importlib.abc
import os
import sys
from pathlib import Path

_FILE = os.environ.get("VAEGAN_TEST_POISON_FILE")


class _PoisonAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vaegan.step":
            return None
        others = [f for f in sys.meta_path if f is not self and hasattr(f, "find_spec")]
        spec = next((s for s in (f.find_spec(name, path, target) for f in others) if s is not None), None)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_poison(module):
            exec_module(module)
            from nonfinite import poison_from_file
            poison_from_file(module.VAEGANTrainer, Path(_FILE))

        spec.loader.exec_module = exec_and_poison
        return spec


if _FILE:
    sys.meta_path.insert(0, _PoisonAfterImport())
