"""spp_triton.runinfo: the commit and machine a result file records."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spp_triton import model_zoo, runinfo


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def _repo(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{key}_NAME", "t")
        monkeypatch.setenv(f"{key}_EMAIL", "t@example.com")
    _git(root, "init", "-q")
    (root / "a.txt").write_text("one\n")
    _git(root, "add", "a.txt")
    _git(root, "commit", "-q", "-m", "first")
    return root


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_names_the_checkout_and_says_dirty(tmp_path, monkeypatch):
    root = _repo(tmp_path, monkeypatch)
    monkeypatch.setattr(model_zoo, "source_checkout", lambda: root)
    assert runinfo.git_commit() == _git(root, "rev-parse", "--short", "HEAD")
    assert runinfo.git_commit(short=False) == _git(root, "rev-parse", "HEAD")
    (root / "a.txt").write_text("two\n")  # a tracked file changed
    assert runinfo.git_commit().endswith("+dirty")
    (root / "a.txt").write_text("one\n")
    (root / "new.txt").write_text("untracked files do not count\n")
    assert not runinfo.git_commit().endswith("+dirty")


def test_git_commit_outside_a_checkout_names_the_installed_version(tmp_path, monkeypatch):
    monkeypatch.setattr(model_zoo, "source_checkout", lambda: tmp_path)  # no .git there
    answer = runinfo.git_commit()
    assert answer == "unknown" or (answer.startswith("spp-triton ") and "(installed)" in answer)


def test_machine_description_names_cores_device_and_versions():
    info = runinfo.machine_description()
    assert set(info) == {"machine", "device", "python", "torch"}
    assert f"{os.cpu_count()} cores" in info["machine"]
    assert info["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert info["device"] == f"CPU ({torch.get_num_threads()} threads)"
