"""The package as a wheel installs it: configs shipped as package data and found by name, console
scripts declared, caches outside site-packages when not in a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spp_triton import model_zoo
from spp_triton.data import shapes

REPO = Path(__file__).resolve().parents[1]


def test_configs_live_in_the_package_and_the_top_level_folder_links_there():
    assert (REPO / "configs").resolve() == model_zoo.CONFIG_ROOT
    names = model_zoo.list_config_files()
    assert "Shapes/faster_rcnn_R_18_FPN_spp124.yaml" in names
    assert "LazyConfigs/faster_rcnn_R_50_FPN_spp124.py" in names
    on_disk = sorted(
        p.relative_to(model_zoo.CONFIG_ROOT).as_posix()
        for p in (REPO / "configs").resolve().rglob("*")
        if p.suffix in (".yaml", ".py") and "__pycache__" not in p.parts
    )
    assert names == on_disk


def test_resolve_config_takes_paths_and_shipped_names(tmp_path, monkeypatch):
    shipped = model_zoo.get_config_file("Shapes/faster_rcnn_R_18_FPN_spp124.yaml")
    assert Path(shipped).is_file()
    monkeypatch.chdir(tmp_path)  # outside the checkout: relative README paths still resolve
    assert model_zoo.resolve_config("configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml") == shipped
    mine = tmp_path / "mine.yaml"
    mine.write_text("SOLVER:\n  MAX_ITER: 1\n")
    assert model_zoo.resolve_config("mine.yaml") == "mine.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml.*Shapes/"):
        model_zoo.resolve_config("configs/nope.yaml")
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        model_zoo.get_config_file("nope.yaml")


def test_dataset_cache_is_outside_site_packages_for_an_installed_package(tmp_path, monkeypatch):
    monkeypatch.delenv("SPP_TRITON_DATASETS", raising=False)
    assert model_zoo.source_checkout() == REPO
    assert shapes.default_datasets_root() == REPO / "datasets"
    monkeypatch.setattr(model_zoo, "source_checkout", lambda: None)  # as from a wheel
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert shapes.default_datasets_root() == tmp_path / "cache" / "spp_triton" / "datasets"
    monkeypatch.setenv("SPP_TRITON_DATASETS", str(tmp_path / "mine"))
    assert shapes.default_datasets_root() == tmp_path / "mine"


@pytest.mark.slow
def test_the_wheel_holds_configs_and_console_scripts(tmp_path):
    """Step 1 of tools/check_wheel.py (CI runs all of it: a clean venv, the CLIs, a training)."""
    proc = subprocess.run(
        [sys.executable, "tools/check_wheel.py", "--build-only", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "configs and console scripts present" in proc.stdout
    assert list((tmp_path / "dist").glob("spp_triton-*.whl"))
