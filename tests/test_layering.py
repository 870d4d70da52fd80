"""The dependency direction of STYLE.md, checked mechanically.

import-linter checks the static imports (contracts in pyproject.toml); these subprocess tests
catch what it cannot: an eager re-export in an ``__init__`` that drags in a heavy stack.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUI = ("napari", "qtpy", "magicgui", "superqt", "PyQt5", "PyQt6")


def _loaded_after(imports: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        + "".join(f"import {name}\n" for name in imports)
        + "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "module", ["napari_medseg", "napari_medseg.engine", "napari_medseg.cli", "napari_medseg.io"]
)
def test_core_does_not_import_gui(module):
    loaded = _loaded_after([module])
    assert not loaded & set(GUI), f"{module} imports {sorted(loaded & set(GUI))}"


@pytest.mark.parametrize("module", ["napari_medseg", "napari_medseg.io", "napari_medseg.cli"])
def test_light_modules_do_not_import_torch(module):
    loaded = _loaded_after([module])
    assert "torch" not in loaded, f"importing {module} loads torch"


def test_engine_uses_no_gui_even_after_inference_imports():
    loaded = _loaded_after(["napari_medseg.models", "napari_medseg.engine.training.losses"])
    assert not loaded & set(GUI)


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
