"""The layers stay visible: vaegan/ is plain PyTorch, deploy/ never reaches into pipelines/, nothing that tune/
imports from pipelines/ imports tune/ back (only the tune step does), and the pipeline's driver loads no torch.
Each check runs in a fresh interpreter, since an import test inside pytest would see everything the suite
already loaded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.steps import STEPS

REPO = Path(__file__).resolve().parents[1]
VAEGAN_MODULES = [p.stem for p in (REPO / "vaegan").glob("*.py") if p.stem != "__init__"]


def loaded_after(imports: list[str], watched: tuple[str, ...]) -> list[str]:
    """The top-level packages among ``watched`` that a fresh interpreter has loaded after ``imports``."""
    code = f"import json, sys; import {', '.join(imports)}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [name for name in json.loads(out) if name in watched]


def test_vaegan_imports_no_ray_mlflow_yaml_or_outer_layer():
    found = loaded_after([f"vaegan.{m}" for m in VAEGAN_MODULES], ("ray", "mlflow", "yaml", "pipelines", "tune", "deploy"))
    assert found == [], found


def test_deploy_never_imports_pipelines():
    assert loaded_after(["deploy.pull", "deploy.pyfunc_model"], ("pipelines", "tune")) == []


@pytest.mark.parametrize("module", ["pipelines.training", "pipelines.tracking", "pipelines.context",
                                    "pipelines.config", "pipelines.dag"])
def test_what_tune_imports_from_pipelines_does_not_import_tune(module):
    assert "tune" not in loaded_after([module], ("tune",))


def test_the_driver_plans_and_checks_a_run_without_torch():
    """A `vaegan run` driver imports every step module to plan the DAG, and reads IDX headers to check the
    data, but trains nothing: torch, torchvision and matplotlib (~4 s of its start on 2 cores) stay out."""
    steps = [f"pipelines.steps.{name}" for name in STEPS]
    assert loaded_after(["pipelines.pipeline", "vaegan.data", *steps], ("torch", "torchvision", "matplotlib")) == []
