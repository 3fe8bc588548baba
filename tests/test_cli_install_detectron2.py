"""spp_triton.cli.install_detectron2 (``tools/install_detectron2.py``,
``spp-triton-install-detectron2``): the detectron2 it installs (or installed earlier) can do what
users reach for, and its source patches are exact, idempotent and leave other detectron2 builds
alone.

* the installed detectron2: ``detectron2.utils.analysis.FlopCountAnalysis`` imports (v0.6 imports
  its Caffe2 exporter unconditionally) and ``detectron2.model_zoo`` finds its bundled configs
  (v0.6 asks ``pkg_resources``, which setuptools >= 81 no longer ships);
* the patch functions on a small fake package tree with v0.6's text: applied once, a no-op the
  second time, a clear error (and no file written) on unexpected text, and a detectron2 without
  spp_triton's placeholder ``_C`` (a user's own build) is never modified.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from spp_triton.cli import install_detectron2 as inst  # noqa: E402


# ------------------------------------------------------------------------------ the real install
def test_installed_detectron2_flop_analysis_and_model_zoo_import():
    """In a fresh interpreter of this environment, as a user would: both imports work, and the
    model zoo resolves a config that the sdist ships (pb1-detectron2 0.6 carries
    ``detectron2/model_zoo/configs``, 70-odd yaml/py files) to an existing file."""
    code = textwrap.dedent(
        """
        import os
        from detectron2.utils.analysis import FlopCountAnalysis
        import detectron2.model_zoo

        path = detectron2.model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
        assert os.path.isfile(path), path
        cfg = detectron2.model_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
        assert cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlignV2", cfg.MODEL.ROI_BOX_HEAD
        try:
            detectron2.model_zoo.get_config_file("COCO-Detection/no_such_config.yaml")
        except RuntimeError as err:
            assert "not available in Model Zoo" in str(err), err
        else:
            raise AssertionError("a missing config must raise")
        print("OK", FlopCountAnalysis.__module__, path)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert out.startswith("OK detectron2.utils.analysis ")
    assert out.endswith("faster_rcnn_R_50_FPN_1x.yaml")


# ------------------------------------------------------------------------------ a fake tree
# The lines of detectron2 v0.6 (pb1-detectron2==0.6) that the patches edit, with their context.
V06_EXPORT_INIT = """\
# -*- coding: utf-8 -*-

from .api import *
from .flatten import TracingAdapter
from .torchscript import scripting_with_instances, dump_torchscript_IR

__all__ = [k for k in globals().keys() if not k.startswith("_")]
"""

V06_MODEL_ZOO = '''\
# Copyright (c) Facebook, Inc. and its affiliates.
import os
from typing import Optional
import pkg_resources
import torch


def get_config_file(config_path):
    """
    Returns path to a builtin config file.
    """
    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )
    if not os.path.exists(cfg_file):
        raise RuntimeError("{} not available in Model Zoo!".format(config_path))
    return cfg_file
'''


def _fake_package(root: Path, placeholder: bool = True) -> Path:
    pkg = root / "detectron2"
    (pkg / "export").mkdir(parents=True)
    (pkg / "model_zoo" / "configs" / "COCO-Detection").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0.6"\n')
    (pkg / "export" / "__init__.py").write_text(V06_EXPORT_INIT)
    (pkg / "model_zoo" / "__init__.py").write_text("")
    (pkg / "model_zoo" / "model_zoo.py").write_text(V06_MODEL_ZOO)
    (pkg / "model_zoo" / "configs" / "COCO-Detection" / "x.yaml").write_text("MODEL: {}\n")
    if placeholder:
        (pkg / "_C.py").write_text(inst.PLACEHOLDER_C)
    return pkg


def _snapshot(pkg: Path) -> dict[str, str]:
    return {str(p.relative_to(pkg)): p.read_text() for p in sorted(pkg.rglob("*.py"))}


def test_placeholder_carries_the_marker():
    assert inst.PLACEHOLDER_MARKER in inst.PLACEHOLDER_C
    assert inst.PLACEHOLDER_MARKER.strip()


def test_patches_apply_once_and_are_idempotent(tmp_path):
    pkg = _fake_package(tmp_path)
    before = _snapshot(pkg)
    changed = inst.patch_detectron2(pkg)
    assert sorted(changed) == ["export/__init__.py", "model_zoo/model_zoo.py"]
    after = _snapshot(pkg)
    assert after != before

    export_init = after["export/__init__.py"]
    assert "\nfrom .api import *\n" not in export_init  # no longer at top level
    assert "    from .api import *\n" in export_init  # only when caffe2 imports
    assert "except ImportError:" in export_init
    model_zoo = after["model_zoo/model_zoo.py"]
    assert "import pkg_resources" not in model_zoo
    assert "pkg_resources." not in model_zoo
    assert "__file__" in model_zoo
    for text in after.values():  # still valid Python
        compile(text, "<patched>", "exec")

    assert inst.patch_detectron2(pkg) == []  # second run: nothing to do
    assert _snapshot(pkg) == after
    assert inst.pending_patches(pkg) == []


def test_patched_files_behave(tmp_path):
    """The patched texts do what they say: the export package imports without caffe2 (its .api
    is skipped), and get_config_file finds files next to model_zoo.py."""
    pkg = _fake_package(tmp_path)
    inst.patch_detectron2(pkg)

    # export/__init__.py: run it as a package whose .api would fail like v0.6's does
    export = pkg / "export"
    (export / "api.py").write_text("from caffe2.proto import caffe2_pb2\n")
    (export / "flatten.py").write_text("TracingAdapter = object\n")
    (export / "torchscript.py").write_text(
        "scripting_with_instances = dump_torchscript_IR = None\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import detectron2.export as e
        assert e.TracingAdapter is object
        assert "detectron2.export.api" not in sys.modules
        print("export ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "export ok" in proc.stdout

    # model_zoo.get_config_file: exec the patched module without its detectron2 imports
    namespace = {"__file__": str(pkg / "model_zoo" / "model_zoo.py"), "__name__": "mz"}
    exec(compile((pkg / "model_zoo" / "model_zoo.py").read_text(), "mz", "exec"), namespace)
    found = namespace["get_config_file"]("COCO-Detection/x.yaml")
    assert Path(found) == pkg / "model_zoo" / "configs" / "COCO-Detection" / "x.yaml"
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        namespace["get_config_file"]("COCO-Detection/missing.yaml")


def test_unexpected_text_fails_loudly_and_writes_nothing(tmp_path):
    pkg = _fake_package(tmp_path)
    export_init = pkg / "export" / "__init__.py"
    export_init.write_text(V06_EXPORT_INIT.replace("from .api import *", "from .api import x"))
    before = _snapshot(pkg)
    with pytest.raises(inst.PatchError) as info:
        inst.patch_detectron2(pkg)
    message = str(info.value)
    assert "export/__init__.py" in message
    assert "from .api import *" in message  # says which text it expected
    assert _snapshot(pkg) == before  # model_zoo.py, which would patch, is untouched too

    # a text that occurs twice is as unexpected as a missing one
    pkg2 = _fake_package(tmp_path / "twice")
    (pkg2 / "model_zoo" / "model_zoo.py").write_text(V06_MODEL_ZOO + "import pkg_resources\n")
    with pytest.raises(inst.PatchError, match="model_zoo.py"):
        inst.patch_detectron2(pkg2)

    # a missing file too
    pkg3 = _fake_package(tmp_path / "missing")
    (pkg3 / "model_zoo" / "model_zoo.py").unlink()
    with pytest.raises(inst.PatchError, match="model_zoo.py"):
        inst.patch_detectron2(pkg3)


def test_existing_install_is_repaired_only_when_it_is_ours(tmp_path):
    ours = _fake_package(tmp_path / "ours")
    assert inst.is_spp_triton_install(ours)
    assert sorted(inst.repair_existing_install(ours)) == [
        "export/__init__.py",
        "model_zoo/model_zoo.py",
    ]
    assert inst.repair_existing_install(ours) == []  # idempotent

    # a user's own build: a compiled _C (no _C.py), or some other _C.py: never touched
    built = _fake_package(tmp_path / "built", placeholder=False)
    (built / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    other = _fake_package(tmp_path / "other", placeholder=False)
    (other / "_C.py").write_text("def has_cuda():\n    return True\n")
    for pkg in (built, other):
        before = _snapshot(pkg)
        assert not inst.is_spp_triton_install(pkg)
        assert inst.repair_existing_install(pkg) is None
        assert _snapshot(pkg) == before
        # what is missing can still be told
        assert sorted(inst.pending_patches(pkg)) == [
            "export/__init__.py",
            "model_zoo/model_zoo.py",
        ]


def test_build_source_tree_patches_the_sdist(tmp_path):
    """The fresh-install path: the unpacked sdist is patched before pip installs it."""
    sdist_root = tmp_path / "sdist" / "pb1-detectron2-0.6"
    _fake_package(sdist_root, placeholder=False)
    sdist = tmp_path / "pb1-detectron2-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(sdist_root, arcname="pb1-detectron2-0.6")
    work = tmp_path / "work"
    work.mkdir()
    src = inst.build_source_tree(sdist, work)
    pkg = src / "detectron2"
    assert inst.is_spp_triton_install(pkg)
    assert inst.pending_patches(pkg) == []
    assert "import pkg_resources" not in (pkg / "model_zoo" / "model_zoo.py").read_text()
    assert (src / "pyproject.toml").is_file()
