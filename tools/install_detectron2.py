#!/usr/bin/env python
"""Install detectron2 into the current Python environment, unless one already works.

detectron2 is not published on PyPI. The sdist ``pb1-detectron2==0.6`` carries the detectron2 v0.6
Python sources unchanged, but not their C++/CUDA sources, so ``pip install`` of it fails. This
script:

1. does nothing if ``import detectron2.modeling`` already works (your own source build is kept);
2. downloads the sdist with pip (``--no-deps --no-build-isolation``) and verifies its sha256;
3. installs its ``detectron2/`` package as a real distribution named ``detectron2`` (so that
   ``pip show detectron2`` and ``pip uninstall detectron2`` work), with a placeholder
   ``detectron2._C`` whose ops raise an ImportError naming what is not built;
4. installs detectron2's pure-Python dependencies, with ``Pillow<10`` (v0.6 uses Image.LINEAR).

Run it with the interpreter of the environment to install into:
``.venv/bin/python tools/install_detectron2.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# detectron2 v0.6's pure-Python runtime dependencies (from its setup.py), with the bounds that
# keep v0.6 working: fvcore/iopath versions it was released against, Pillow<10 for Image.LINEAR.
PURE_PYTHON_DEPS = [
    "Pillow>=7.1,<10",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "black",
]

PLACEHOLDER_C = '''\
"""Placeholder for detectron2's compiled extension (installed by spp_triton).

This detectron2 was installed from the pb1-detectron2==0.6 sdist, which carries no C++/CUDA
sources. Everything in pure Python works (models, training, COCO evaluation with
use_fast_impl=False, torchvision-backed ROIAlign/ROIPool/NMS). The ops below are NOT built.
"""

_MISSING = (
    "detectron2._C is not built: this detectron2 was installed by spp_triton from the "
    "pb1-detectron2==0.6 sdist, which has no C++/CUDA sources. Not available: rotated boxes "
    "(nms_rotated, box_iou_rotated, ROIAlignRotated), deformable convolution (DeformConv, "
    "ModulatedDeformConv) and the fast COCO evaluation (COCOEvaluator(use_fast_impl=True)). "
    "For these, build detectron2 from source "
    "(pip install 'git+https://github.com/facebookresearch/detectron2.git') into this "
    "environment; spp_triton's installer will then leave it alone."
)


def get_compiler_version() -> str:  # read by detectron2.utils.collect_env
    return "not built (pure-Python install by spp_triton)"


def get_cuda_version() -> str:  # read by detectron2.utils.collect_env
    return "not built (pure-Python install by spp_triton)"


def has_cuda() -> bool:
    return False


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"{_MISSING} (requested: detectron2._C.{name})")
'''

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "detectron2 v0.6 Python sources (from pb1-detectron2==0.6), without compiled ops"
requires-python = ">=3.7"
license = {text = "Apache-2.0"}

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"*" = ["*.yaml", "*.py", "*.json"]
"""


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def detectron2_works() -> bool:
    try:
        import detectron2.modeling  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_sdist(dest: Path) -> Path:
    try:
        pip(
            "download",
            "--no-deps",
            "--no-build-isolation",
            "--no-binary",
            ":all:",
            f"{SDIST_NAME}=={SDIST_VERSION}",
            "-d",
            str(dest),
        )
    except subprocess.CalledProcessError as e:
        sys.exit(
            f"[install_detectron2] ERROR: could not download {SDIST_NAME}=={SDIST_VERSION} from "
            f"PyPI (pip exited with {e.returncode}). pip >= 25 rejects this sdist; use pip < 25 "
            "(`python -m pip install 'pip<25'`)."
        )
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        sys.exit(f"[install_detectron2] ERROR: expected one sdist in {dest}, found {found}")
    sdist = found[0]
    digest = sha256_of(sdist)
    if digest != SDIST_SHA256:
        sys.exit(
            f"[install_detectron2] ERROR: checksum mismatch for {sdist.name}: got {digest}, "
            f"expected {SDIST_SHA256}. Refusing to install."
        )
    log(f"downloaded {sdist.name}, sha256 verified ({digest[:16]}...)")
    return sdist


def build_source_tree(sdist: Path, work: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    roots = [p for p in work.iterdir() if (p / "detectron2" / "__init__.py").exists()]
    if len(roots) != 1:
        sys.exit(f"[install_detectron2] ERROR: no detectron2/ package inside {sdist.name}")
    src = work / "detectron2-dist"
    src.mkdir()
    shutil.copytree(roots[0] / "detectron2", src / "detectron2")
    (src / "detectron2" / "_C.py").write_text(PLACEHOLDER_C)
    (src / "pyproject.toml").write_text(PYPROJECT)
    return src


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--force", action="store_true", help="install even if an importable detectron2 is present"
    )
    args = parser.parse_args()

    if detectron2_works() and not args.force:
        spec = importlib.util.find_spec("detectron2")
        log(f"detectron2 already importable from {spec.origin if spec else '?'}; nothing to do")
        return 0

    pip("install", "-q", *PURE_PYTHON_DEPS)
    with tempfile.TemporaryDirectory(prefix="spp_triton_d2_") as tmp:
        tmp_path = Path(tmp)
        sdist = download_sdist(tmp_path / "download")
        src = build_source_tree(sdist, tmp_path / "unpacked")
        pip("install", "-q", "--no-deps", "--no-build-isolation", str(src))

    importlib.invalidate_caches()
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import detectron2, detectron2.modeling; print(detectron2.__file__)",
        ],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        sys.exit(f"[install_detectron2] ERROR: installed, but import fails:\n{check.stderr}")
    log(f"installed detectron2 0.6 (pure Python, placeholder _C) at {check.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
