from .base import Backbone
from .build import BACKBONE_REGISTRY, build_backbone

# imported for their registrations
from .resnet import ResNetBackbone  # noqa: E402
from .tiny import TinyNetBackbone  # noqa: E402
from .efficientnet import EfficientNetBackbone  # noqa: E402,F401
from .mobilenet import MobileNetV3Backbone  # noqa: E402

__all__ = ["Backbone", "BACKBONE_REGISTRY", "build_backbone", "ResNetBackbone", "TinyNetBackbone",
           "MobileNetV3Backbone"]
