"""``spp_triton://`` paths: files shipped inside the package, for ``MODEL.WEIGHTS``.

detectron2 opens ``MODEL.WEIGHTS`` through its iopath ``PathManager``
(``detectron2.utils.file_io.PathManager``): ``detectron2://...`` is its model zoo, a plain
relative path is relative to the current directory. A config that ships with spp_triton names its
pretrained weights ``spp_triton://Shapes/weights/shapes_R18_w24_pretrained.pth``, which
:class:`SppTritonHandler` resolves to that file under :data:`spp_triton.model_zoo.CONFIG_ROOT`
(``spp_triton/configs/``: a checkout or an installed wheel alike), from any working directory.

:func:`register_weights_handler` registers the handler with detectron2's ``PathManager`` (iopath's
public plugin API, the way detectron2 registers ``detectron2://``). It is an explicit call:
:func:`spp_triton.modeling.setup` / the trainer should make it before loading ``MODEL.WEIGHTS``;
calling it again does nothing.
"""

from __future__ import annotations

from iopath.common.file_io import PathHandler

__all__ = [
    "PREFIX",
    "SHAPES_R18_W24_PRETRAINED",
    "SppTritonHandler",
    "register_weights_handler",
    "resolve_shipped_path",
]

#: URI prefix of the files shipped with spp_triton (relative to ``spp_triton/configs/``).
PREFIX = "spp_triton://"
#: The Shapes R-18 (3/8 width) backbone pretrained by :mod:`spp_triton.modeling.pretrain`.
SHAPES_R18_W24_PRETRAINED = PREFIX + "Shapes/weights/shapes_R18_w24_pretrained.pth"

_registered: set[int] = set()  # ids of the PathManagers that have the handler


def resolve_shipped_path(path: str) -> str:
    """``spp_triton://A/B`` -> the absolute path of ``A/B`` under ``spp_triton/configs/``.
    Raises ``ValueError`` for another prefix or a path that leaves that folder."""
    from spp_triton.model_zoo import CONFIG_ROOT

    if not path.startswith(PREFIX):
        raise ValueError(f"not an {PREFIX} path: {path!r}")
    resolved = (CONFIG_ROOT / path[len(PREFIX) :]).resolve()
    if not resolved.is_relative_to(CONFIG_ROOT):
        raise ValueError(f"{path!r} points outside the files shipped with spp_triton")
    return str(resolved)


class SppTritonHandler(PathHandler):
    """iopath handler of ``spp_triton://`` paths: each call is passed on, with the path resolved
    by :func:`resolve_shipped_path`, to ``path_manager``'s handler of local files."""

    def __init__(self, path_manager) -> None:
        super().__init__()
        self._files = path_manager

    def _get_supported_prefixes(self) -> list[str]:
        return [PREFIX]

    def _get_local_path(self, path: str, **kwargs) -> str:
        return self._files.get_local_path(resolve_shipped_path(path), **kwargs)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return self._files.open(resolve_shipped_path(path), mode, **kwargs)

    def _exists(self, path: str, **kwargs) -> bool:
        return self._files.exists(resolve_shipped_path(path), **kwargs)

    def _isfile(self, path: str, **kwargs) -> bool:
        return self._files.isfile(resolve_shipped_path(path), **kwargs)

    def _isdir(self, path: str, **kwargs) -> bool:
        return self._files.isdir(resolve_shipped_path(path), **kwargs)

    def _ls(self, path: str, **kwargs) -> list[str]:
        return self._files.ls(resolve_shipped_path(path), **kwargs)


def register_weights_handler(path_manager=None) -> None:
    """Register :class:`SppTritonHandler` with ``path_manager`` (default: detectron2's
    ``PathManager``, which ``DetectionCheckpointer`` uses). Idempotent."""
    if path_manager is None:
        from detectron2.utils.file_io import PathManager as path_manager
    if id(path_manager) in _registered:
        return
    path_manager.register_handler(SppTritonHandler(path_manager))
    _registered.add(id(path_manager))
