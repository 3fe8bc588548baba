"""Triton kernels of spp_triton.

* ``spp_triton.kernels.bins``: ``@triton.jit`` transcription of ``spp_triton/bins.py`` (RoI
  quantisation, RoI and adaptive bin edges), bit for bit.
* ``spp_triton.kernels.pyramid_pool``: ``pyramid_pool_forward`` / ``pyramid_pool_backward``, all
  pyramid levels (and all FPN maps) of a batch of regions in one launch.

Nothing is imported here, so that importing this package does not import Triton; Triton's
interpreter (``TRITON_INTERPRET=1``) must be chosen before the submodules are imported.
"""
