"""spp_triton: spatial pyramid pooling and RoI pooling in Triton, with a CPU path.

Importing this package registers the ``torch.ops.spp_triton.*`` operators.
"""

from spp_triton.functional import (
    multilevel_roi_spp_pool,
    roi_pool,
    roi_spp_pool,
    spp_pool,
)
from spp_triton.nn import RoIPool, RoISpatialPyramidPool, SpatialPyramidPool

__version__ = "0.1.0"

__all__ = [
    "spp_pool",
    "roi_spp_pool",
    "roi_pool",
    "multilevel_roi_spp_pool",
    "SpatialPyramidPool",
    "RoISpatialPyramidPool",
    "RoIPool",
]
