"""Weights and model cards are found from a checkout, from an installed wheel, and via the env var."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from napari_medseg import resources

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_finds_top_level_folders(monkeypatch):
    monkeypatch.delenv(resources.ENV_WEIGHTS, raising=False)
    assert resources.checkout_root() == ROOT
    assert ROOT / "weights" in resources.weights_dirs()
    assert ROOT / "models" in resources.model_card_dirs()


def test_env_var_takes_priority(monkeypatch, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.setenv(resources.ENV_WEIGHTS, str(tmp_path / "weights"))
    assert resources.weights_dirs()[0] == tmp_path / "weights"
    assert tmp_path / "models" in resources.model_card_dirs()


def test_user_data_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    assert resources.user_data_dir() == tmp_path / "home"
    assert (tmp_path / "home").is_dir()


@pytest.mark.slow
def test_wheel_carries_weights_and_cards(tmp_path):
    """Build the wheel, unpack it away from the checkout, and resolve from there."""
    wheel_dir = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = wheel_dir.glob("napari_medseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_medseg/_data/weights/README.md" in names
    assert "napari_medseg/_data/models/README.md" in names
    assert "napari_medseg/napari.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from napari_medseg import resources as r; "
        "print(r.checkout_root()); print(r.weights_dirs()[0]); print(r.model_card_dirs()[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != resources.ENV_WEIGHTS}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    ).stdout.split()
    assert out[0] == "None"
    assert Path(out[1]) == site / "napari_medseg" / "_data" / "weights"
    assert Path(out[2]) == site / "napari_medseg" / "_data" / "models"
