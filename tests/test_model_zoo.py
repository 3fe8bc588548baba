"""spp_triton.model_zoo: the configs shipped as package data, ``--config-file`` resolution, the
checkout and the user cache folder. (The dataset cache's place for an installed package, and the
wheel itself, are in ``test_packaging.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from spp_triton import model_zoo

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


def test_user_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_zoo.user_cache_dir() == tmp_path / "xdg" / "spp_triton"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_zoo.user_cache_dir() == tmp_path / "home" / ".cache" / "spp_triton"
