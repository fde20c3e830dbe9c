from .base import DetectorBase
from .build import META_ARCH_REGISTRY, build_model
from .dense_detector import DenseDetector

# imported for their registrations
from .retinanet import RetinaNet  # noqa: E402
from .efficientdet import EfficientDet  # noqa: E402
from .rcnn import GeneralizedRCNN  # noqa: E402

__all__ = ["DetectorBase", "META_ARCH_REGISTRY", "build_model", "DenseDetector", "RetinaNet",
           "EfficientDet", "GeneralizedRCNN"]
