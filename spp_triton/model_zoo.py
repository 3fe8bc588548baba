"""Where spp_triton's files live, in a source checkout and in an installed wheel.

* :func:`get_config_file`: a config shipped with the package (``spp_triton/configs/``; the
  checkout's top-level ``configs/`` is a link to it), e.g.
  ``"Shapes/faster_rcnn_R_18_FPN_spp124.yaml"``.
* :func:`resolve_config`: what the command-line tools do with ``--config-file``: an existing path
  as given, else the shipped config of that name (``configs/Shapes/x.yaml`` or ``Shapes/x.yaml``),
  so the README's commands also work from an installed wheel, in any folder.
* :func:`source_checkout`: the repository root when spp_triton runs from a checkout, else ``None``.
* :func:`user_cache_dir`: ``$XDG_CACHE_HOME/spp_triton`` (default ``~/.cache/spp_triton``), where an
  installed spp_triton keeps generated data (never inside ``site-packages``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CONFIG_ROOT",
    "list_config_files",
    "get_config_file",
    "resolve_config",
    "source_checkout",
    "user_cache_dir",
]

#: The configs shipped as package data.
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
_CONFIG_SUFFIXES = (".yaml", ".py")


def list_config_files() -> list[str]:
    """Names (relative to :data:`CONFIG_ROOT`) of every shipped config, sorted."""
    return sorted(
        p.relative_to(CONFIG_ROOT).as_posix()
        for p in CONFIG_ROOT.rglob("*")
        if p.suffix in _CONFIG_SUFFIXES and p.is_file() and "__pycache__" not in p.parts
    )


def get_config_file(name: str) -> str:
    """Path of the shipped config ``name`` (e.g. ``"Shapes/faster_rcnn_R_18_FPN_spp124.yaml"``;
    a leading ``configs/`` is accepted). Raises ``FileNotFoundError`` listing the shipped ones."""
    rel = Path(name).as_posix()
    if rel.startswith("configs/"):
        rel = rel[len("configs/") :]
    path = CONFIG_ROOT / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!r} is not a config shipped with spp_triton; shipped configs: "
            + ", ".join(list_config_files())
        )
    return str(path)


def resolve_config(path: str | os.PathLike) -> str:
    """``path`` if that file exists, else the shipped config of that name. Raises
    ``FileNotFoundError`` naming both places when neither exists."""
    text = os.fspath(path)
    if os.path.isfile(text):
        return text
    if not os.path.isabs(text):
        try:
            return get_config_file(text)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(
        f"config file not found: {text!r} (resolved to {os.path.abspath(text)!r}), and no "
        f"config of that name ships with spp_triton ({CONFIG_ROOT}; e.g. "
        f"'configs/Shapes/faster_rcnn_R_18_FPN_spp124.yaml')"
    )


def source_checkout() -> Path | None:
    """The repository root if this spp_triton is a source checkout's (editable or on the path),
    ``None`` for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "spp-triton"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/spp_triton``, or ``~/.cache/spp_triton``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spp_triton"
