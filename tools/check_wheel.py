#!/usr/bin/env python
"""Build the wheel, install it into a clean venv, and use it from outside the checkout (CI).

    python tools/check_wheel.py [--workdir DIR] [--keep]

Steps, each printed with its command; any failure exits non-zero:

1. ``pip wheel`` this checkout (no dependencies) and check that the wheel holds the configs
   and the console scripts;
2. a new venv (no system site-packages): ``pip<25``, the pinned torch/torchvision
   (``requirements/pins.txt``), the wheel with its dependencies, then detectron2 through
   ``spp-triton-install-detectron2`` (the installer shipped in the wheel);
3. from an empty folder outside the checkout: ``spp-triton-compare --help``,
   ``spp-triton-train --help``, ``spp-triton-bench --help``; spp_triton imported from the venv's
   site-packages; a shipped config found by name;
4. a tiny training with ``spp-triton-train --config-file configs/Shapes/...`` (2 iterations), with
   ``XDG_CACHE_HOME`` pointed at a fresh folder: the dataset cache and (where a C compiler
   exists) the compiled CPU kernel must land there, and nothing may be written into site-packages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("spp-triton-train", "spp-triton-compare", "spp-triton-bench")
TINY_TRAIN = [
    "--config-file",
    "configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "DATALOADER.NUM_WORKERS",
    "0",
    "DATASETS.TEST",
    "()",
    "OUTPUT_DIR",
    "tiny_run",
]


def step(title: str) -> None:
    print(f"\n==== check_wheel: {title}", flush=True)


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def fail(msg: str) -> None:
    sys.exit(f"check_wheel: FAILED: {msg}")


def build_wheel(dist: Path) -> Path:
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w"]
        + [dist, REPO]
    )
    (wheel,) = dist.glob("spp_triton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    needed = [
        "spp_triton/configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml",
        "spp_triton/configs/Base-RCNN-FPN.yaml",
        "spp_triton/configs/LazyConfigs/faster_rcnn_R_50_FPN_spp124.py",
        "spp_triton/configs/Shapes/weights/shapes_R18_w24_pretrained.pth",
        "spp_triton/cli/train.py",
        "spp_triton/csrc/roi_max.c",
    ]
    missing = [n for n in needed if n not in names]
    if missing:
        fail(f"the wheel lacks {missing}")
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    absent = [s for s in SCRIPTS if f"{s} =" not in text]
    if absent:
        fail(f"the wheel declares no console script {absent}")
    print(f"{wheel.name}: {len(names)} files, configs and console scripts present")
    return wheel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--build-only", action="store_true", help="step 1 only: build the wheel and check it"
    )
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="spp_triton_wheel_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        step("build the wheel")
        wheel = build_wheel(work / "dist")
        if args.build_only:
            return 0

        step("install it into a clean venv")
        venv = work / "venv"
        run([sys.executable, "-m", "venv", "--clear", venv])
        py, bin_dir = venv / "bin" / "python", venv / "bin"
        pins = REPO / "requirements" / "pins.txt"
        run([py, "-m", "pip", "install", "-q", "pip<25"])
        run([py, "-m", "pip", "install", "-q", "-r", pins])
        run([py, "-m", "pip", "install", "-q", "-c", pins, wheel])
        run([bin_dir / "spp-triton-install-detectron2"])

        step("use it from outside the checkout")
        outside = work / "elsewhere"
        outside.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(XDG_CACHE_HOME=str(work / "cache"), PATH=f"{bin_dir}:{env.get('PATH', '')}")
        env.pop("SPP_TRITON_DATASETS", None)
        for script in SCRIPTS:
            out = run([bin_dir / script, "--help"], cwd=outside, env=env, capture_output=True)
            if b"usage:" not in out.stdout:
                fail(f"{script} --help printed no usage")
        probe = (
            "import spp_triton, spp_triton.model_zoo as z; "
            "print(spp_triton.__file__); "
            "print(z.get_config_file('Shapes/faster_rcnn_R_18_FPN_spp124.yaml')); "
            "print(z.source_checkout())"
        )
        out = run([py, "-c", probe], cwd=outside, env=env, capture_output=True, text=True)
        module, config, checkout = out.stdout.split()
        site = Path(module).resolve().parents[1]
        if not str(site).startswith(str(venv.resolve())) or checkout != "None":
            fail(f"spp_triton imported from {module} (checkout {checkout}), not the venv")
        print(f"spp_triton from {module}; shipped config {config}")

        step("a tiny training with the installed package")
        before = {p for p in site.rglob("*") if p.is_file()}
        run([bin_dir / "spp-triton-train", *TINY_TRAIN], cwd=outside, env=env)
        if not (outside / "tiny_run" / "model_final.pth").is_file():
            fail("the tiny training wrote no model_final.pth")
        cache = work / "cache" / "spp_triton" / "datasets"
        if not any(cache.glob("shapes_v1/train.json")):
            fail(f"the dataset cache is not under {cache}")
        kernels = work / "cache" / "spp_triton" / "native"
        if shutil.which("cc") and not any(kernels.glob("roi_max-*.so")):
            fail(f"the SPP training built no CPU kernel under {kernels}")
        added = sorted(
            str(p.relative_to(site))
            for p in site.rglob("*")
            if p.is_file() and p not in before and "__pycache__" not in p.parts
        )
        if added:
            fail(f"files written into site-packages: {added[:10]}")
        print(f"OK in {time.perf_counter() - start:.0f} s: wheel, clean venv, CLIs, tiny training")
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
