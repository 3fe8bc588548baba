"""What a result file records about its run: the code's commit and the machine.

Shared by the head comparison (:mod:`spp_triton.compare`), the kernel benchmark
(:mod:`spp_triton.bench.kernels`) and the SASS report (:mod:`spp_triton.bench.sass`).
"""

from __future__ import annotations

import os
import platform
import subprocess

__all__ = ["git_commit", "machine_description"]


def git_commit(short: bool = True) -> str:
    """The source checkout's commit (``+dirty`` when tracked files differ from it); for an
    installed wheel ``spp-triton <version> (installed)``; ``unknown`` when git fails."""
    from spp_triton.model_zoo import source_checkout

    root = source_checkout()
    if root is None or not (root / ".git").exists():
        try:
            from importlib.metadata import version

            return f"spp-triton {version('spp-triton')} (installed)"
        except Exception:
            return "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> dict[str, str]:
    """OS, cores and CPU model; the device (GPU name, or CPU and torch's thread count); versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}",
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
