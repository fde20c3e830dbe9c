from .build import NECK_REGISTRY, build_neck

# imported for its registration
from .fpn import FeaturePyramidNetwork  # noqa: E402
from .bifpn import BiFPNNeck  # noqa: E402,F401
from .twfpn import TwoWayFPNNeck  # noqa: E402,F401
from .pconv import PConvNeck  # noqa: E402,F401

__all__ = ["NECK_REGISTRY", "build_neck", "FeaturePyramidNetwork", "TwoWayFPNNeck", "PConvNeck"]
