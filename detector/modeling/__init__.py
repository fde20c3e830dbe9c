"""Models: backbones, necks, anchors, matching, losses, heads and meta-architectures."""
from .anchor_generator import AnchorGenerator
from .backbone import BACKBONE_REGISTRY, Backbone, build_backbone
from .box_coder import BoxCoder
from .losses import retinanet_losses
from .matcher import Matcher
from .meta_arch import META_ARCH_REGISTRY, RetinaNet, build_model
from .neck import NECK_REGISTRY, build_neck
from .postprocessing import rescale_detections, retinanet_inference_single_image
from .retinanet_head import RetinaNetHead

__all__ = [
    "AnchorGenerator", "BACKBONE_REGISTRY", "Backbone", "build_backbone", "BoxCoder",
    "retinanet_losses", "Matcher", "META_ARCH_REGISTRY", "RetinaNet", "build_model",
    "NECK_REGISTRY", "build_neck", "rescale_detections", "retinanet_inference_single_image",
    "RetinaNetHead",
]
