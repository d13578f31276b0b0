"""Runs at start-up of every Python process that has this folder on PYTHONPATH (a test's CLI run and its
Ray workers). With VAEGAN_TEST_POISON=start:steps set, it poisons ``vaegan.step.VAEGANTrainer`` as soon
as that module is imported (see nonfinite.py); otherwise it does nothing."""
import importlib.abc
import os
import sys

_SPEC = os.environ.get("VAEGAN_TEST_POISON")


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
            from nonfinite import poison
            start, steps = (int(part) for part in _SPEC.split(":"))
            poison(module.VAEGANTrainer, start, steps)

        spec.loader.exec_module = exec_and_poison
        return spec


if _SPEC:
    sys.meta_path.insert(0, _PoisonAfterImport())
