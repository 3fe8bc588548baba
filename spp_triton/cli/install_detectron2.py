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
4. installs detectron2's pure-Python dependencies, with ``Pillow<10`` (v0.6 uses Image.LINEAR);
5. patches two v0.6 files so that what users reach for imports on today's PyTorch/setuptools
   (see ``SOURCE_PATCHES``): ``detectron2.export`` imports its Caffe2 exporter only when caffe2
   is importable, as detectron2's main branch does (so ``detectron2.utils.analysis``, i.e.
   ``FlopCountAnalysis``, imports), and ``detectron2.model_zoo.get_config_file`` finds its bundled
   configs next to its own file instead of through ``pkg_resources`` (gone from setuptools >= 81).

The patches are exact text edits that fail with a clear error when v0.6's text is not found. A
detectron2 installed earlier by this script (recognised by its placeholder ``_C.py``) is patched
in place on the next run, idempotently; a detectron2 you built yourself is never modified (the
script only reports what of the above does not import).

Run it with the interpreter of the environment to install into:
``.venv/bin/python tools/install_detectron2.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
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

#: The first line of the placeholder ``_C.py``: how a detectron2 installed by this script (and
#: so safe for it to patch in place) is recognised. Keep it unchanged: older installs carry it.
PLACEHOLDER_MARKER = "Placeholder for detectron2's compiled extension (installed by spp_triton)."

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


@dataclasses.dataclass(frozen=True)
class SourcePatch:
    """One exact text edit of a detectron2 v0.6 file (``path`` relative to the package).

    Applied: ``old`` (which must occur exactly once) becomes ``new``. Already applied: ``new`` is
    in the file (every ``new`` names "spp_triton installer patch", so it cannot occur otherwise).
    """

    path: str
    why: str
    old: str
    new: str


SOURCE_PATCHES = (
    SourcePatch(
        path="export/__init__.py",
        why="import the Caffe2 exporter only when caffe2 is importable (detectron2 main does too), "
        "so that detectron2.utils.analysis (FlopCountAnalysis) imports",
        old="\nfrom .api import *\n",
        new="""
# spp_triton installer patch (detectron2's main branch guards it the same way): the Caffe2
# exporter (.api) needs caffe2, which PyTorch no longer ships, so import it only when caffe2 is
# importable; TracingAdapter and the TorchScript helpers below do not need it.
try:
    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401
    from caffe2.python import core as _caffe2_core  # noqa: F401
except ImportError:
    pass
else:
    from .api import *
""",
    ),
    SourcePatch(
        path="model_zoo/model_zoo.py",
        why="drop the pkg_resources import (setuptools >= 81 does not ship pkg_resources)",
        old="\nimport pkg_resources\n",
        new="\n# spp_triton installer patch: no pkg_resources here, see get_config_file\n",
    ),
    SourcePatch(
        path="model_zoo/model_zoo.py",
        why="make get_config_file find the configs next to model_zoo.py, not via pkg_resources",
        old="""\
    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )
""",
        new="""\
    # spp_triton installer patch: the configs ship inside this package, next to this file (v0.6
    # asked pkg_resources for this path; setuptools >= 81 no longer ships pkg_resources).
    cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)
""",
    ),
)


class PatchError(RuntimeError):
    """A file to patch is missing, or does not hold the expected detectron2 v0.6 text once."""


def _patched_texts(pkg_dir: Path) -> dict[str, tuple[str, str]]:
    """``{path: (current text, patched text)}`` for every file that ``SOURCE_PATCHES`` edit."""
    texts: dict[str, tuple[str, str]] = {}
    for patch in SOURCE_PATCHES:
        if patch.path not in texts:
            file = pkg_dir / patch.path
            if not file.is_file():
                raise PatchError(
                    f"{file}: missing; expected the detectron2 {SDIST_VERSION} file to patch "
                    f"({patch.why}). Nothing was patched."
                )
            text = file.read_text(encoding="utf-8")
            texts[patch.path] = (text, text)
        original, text = texts[patch.path]
        if patch.new in text:
            continue
        count = text.count(patch.old)
        if count != 1:
            raise PatchError(
                f"{pkg_dir / patch.path}: expected the text below exactly once (detectron2 "
                f"{SDIST_VERSION} as in {SDIST_NAME}=={SDIST_VERSION}), found it {count} times; "
                f"cannot {patch.why}. Nothing was patched.\n"
                f"--- expected text ---\n{patch.old}--- end ---"
            )
        texts[patch.path] = (original, text.replace(patch.old, patch.new))
    return texts


def pending_patches(pkg_dir: Path) -> list[str]:
    """The files (relative to ``pkg_dir``) with a ``SOURCE_PATCHES`` edit not applied (missing
    files included). Reads only."""
    pending = []
    for patch in SOURCE_PATCHES:
        file = pkg_dir / patch.path
        applied = file.is_file() and patch.new in file.read_text(encoding="utf-8")
        if not applied and patch.path not in pending:
            pending.append(patch.path)
    return pending


def patch_detectron2(pkg_dir: Path) -> list[str]:
    """Apply ``SOURCE_PATCHES`` to the ``detectron2`` package directory ``pkg_dir``.

    Idempotent: returns the files it changed (relative paths; ``[]`` when all were applied).
    Every file is checked before any is written: on unexpected text it raises
    :class:`PatchError` and changes nothing. Each file is replaced atomically.
    """
    changed = []
    for rel, (original, text) in _patched_texts(pkg_dir).items():
        if text == original:
            continue
        file = pkg_dir / rel
        tmp = file.with_name(file.name + ".spp_triton-tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            shutil.copymode(file, tmp)
            tmp.replace(file)
        finally:
            tmp.unlink(missing_ok=True)
        changed.append(rel)
    return changed


def is_spp_triton_install(pkg_dir: Path) -> bool:
    """Whether ``pkg_dir`` is a detectron2 installed by this script (its placeholder ``_C.py``)."""
    placeholder = pkg_dir / "_C.py"
    try:
        return PLACEHOLDER_MARKER in placeholder.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def repair_existing_install(pkg_dir: Path) -> list[str] | None:
    """Patch a detectron2 installed earlier by this script in place (see :func:`patch_detectron2`);
    ``None``, touching nothing, when ``pkg_dir`` is not such an install (e.g. your own build)."""
    if not is_spp_triton_install(pkg_dir):
        return None
    return patch_detectron2(pkg_dir)


# What users reach for, checked in a fresh interpreter after an install or a repair.
IMPORT_CHECKS = {
    "from detectron2.utils.analysis import FlopCountAnalysis": (
        "from detectron2.utils.analysis import FlopCountAnalysis"
    ),
    "detectron2.model_zoo.get_config_file(...)": (
        "import os, detectron2.model_zoo as z; "
        "p = z.get_config_file('COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml'); "
        "assert os.path.isfile(p), p"
    ),
}

_CHECK_SCRIPT = """\
import json, sys
problems = {}
for what, code in json.loads(sys.argv[1]).items():
    try:
        exec(code, {})
    except BaseException as err:
        problems[what] = f"{type(err).__name__}: {err}"
print(json.dumps(problems))
"""


def import_problems() -> dict[str, str]:
    """``{check: error}`` for the ``IMPORT_CHECKS`` that fail in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_SCRIPT, json.dumps(IMPORT_CHECKS)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"import check": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hint(error: str) -> str:
    if "caffe2" in error:
        return " (detectron2's main branch guards this import; v0.6 does not)"
    if "pkg_resources" in error:
        return " (pkg_resources comes with setuptools < 81: pip install 'setuptools<81')"
    return ""


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
    changed = patch_detectron2(src / "detectron2")
    log(f"patched {', '.join(changed) or 'nothing (already patched)'}")
    (src / "pyproject.toml").write_text(PYPROJECT)
    return src


def verify_install() -> None:
    """Exit with an error unless the installed detectron2 does what users reach for."""
    problems = import_problems()
    if problems:
        lines = "\n".join(f"  {what}: {error}" for what, error in problems.items())
        sys.exit(f"[install_detectron2] ERROR: the installed detectron2 fails:\n{lines}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--force", action="store_true", help="install even if an importable detectron2 is present"
    )
    args = parser.parse_args()

    if detectron2_works() and not args.force:
        spec = importlib.util.find_spec("detectron2")
        pkg_dir = Path(spec.origin).parent if spec and spec.origin else Path(".")
        try:
            changed = repair_existing_install(pkg_dir)
        except (PatchError, OSError) as err:
            sys.exit(
                f"[install_detectron2] ERROR: could not patch the detectron2 installed earlier by "
                f"spp_triton at {pkg_dir}: {err}\n(rerun with --force to reinstall it)"
            )
        if changed is None:
            log(
                f"detectron2 already importable from {pkg_dir} (not installed by spp_triton: left "
                "as it is)"
            )
            for what, error in import_problems().items():
                log(f"note: `{what}` fails with this detectron2: {error}{_hint(error)}")
            return 0
        if changed:
            log(f"patched the detectron2 installed earlier at {pkg_dir}: {', '.join(changed)}")
        else:
            log(f"detectron2 installed by spp_triton at {pkg_dir}, patches applied; nothing to do")
        verify_install()
        return 0

    pip("install", "-q", *PURE_PYTHON_DEPS)
    with tempfile.TemporaryDirectory(prefix="spp_triton_d2_") as tmp:
        tmp_path = Path(tmp)
        sdist = download_sdist(tmp_path / "download")
        try:
            src = build_source_tree(sdist, tmp_path / "unpacked")
        except PatchError as err:
            sys.exit(f"[install_detectron2] ERROR: {err}")
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
    verify_install()
    log(f"installed detectron2 0.6 (pure Python, placeholder _C) at {check.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
