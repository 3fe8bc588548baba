"""The package as a wheel installs it: configs and console scripts in the wheel, the dataset cache
outside site-packages when not in a checkout. (Finding shipped configs: ``test_model_zoo.py``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spp_triton import model_zoo
from spp_triton.data import shapes

REPO = Path(__file__).resolve().parents[1]


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
