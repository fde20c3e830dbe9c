from .build import NECK_REGISTRY, build_neck

# imported for its registration
from .fpn import FeaturePyramidNetwork  # noqa: E402

__all__ = ["NECK_REGISTRY", "build_neck", "FeaturePyramidNetwork"]
