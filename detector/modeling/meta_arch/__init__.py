from .build import META_ARCH_REGISTRY, build_model

# imported for its registration
from .retinanet import RetinaNet  # noqa: E402
from .efficientdet import EfficientDet  # noqa: E402,F401

__all__ = ["META_ARCH_REGISTRY", "build_model", "RetinaNet"]
