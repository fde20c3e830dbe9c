from .build import NORM_REGISTRY, available_norms, get_norm
from .norm import FrozenBatchNorm2d, convert_frozen_batchnorm
from .shape_spec import ShapeSpec

__all__ = [
    "NORM_REGISTRY", "available_norms", "get_norm", "FrozenBatchNorm2d",
    "convert_frozen_batchnorm", "ShapeSpec",
]
