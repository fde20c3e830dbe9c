"""Models, organised by role: backbones, necks, dense heads, anchors, matching, box coding,
losses, postprocessing and the meta-architectures that wire them (docs/architecture.md)."""
from .anchor_generator import AnchorGenerator, efficientdet_anchor_generator
from .backbone import BACKBONE_REGISTRY, Backbone, build_backbone
from .box_coder import BoxCoder
from .dense_heads import (
    DENSE_HEAD_REGISTRY,
    EfficientDetHead,
    RetinaNetHead,
    StandardRPNHead,
    build_dense_head,
)
from .losses import efficientdet_losses, retinanet_losses, rpn_losses
from .matcher import Matcher
from .meta_arch import META_ARCH_REGISTRY, DenseDetector, EfficientDet, RetinaNet, build_model
from .neck import NECK_REGISTRY, build_neck
from .proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN, build_proposal_generator
from .roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    ROIPooler,
    StandardROIHeads,
    build_roi_heads,
)
from .postprocessing import (
    efficientdet_inference,
    paste_masks_in_image,
    rescale_detections,
    retinanet_inference,
    retinanet_inference_single_image,
)

__all__ = [
    "AnchorGenerator", "efficientdet_anchor_generator", "BACKBONE_REGISTRY", "Backbone",
    "build_backbone", "BoxCoder", "DENSE_HEAD_REGISTRY", "EfficientDetHead", "RetinaNetHead",
    "build_dense_head", "efficientdet_losses", "retinanet_losses", "Matcher", "META_ARCH_REGISTRY",
    "DenseDetector", "EfficientDet", "RetinaNet", "build_model", "NECK_REGISTRY", "build_neck",
    "efficientdet_inference", "rescale_detections", "retinanet_inference",
    "retinanet_inference_single_image",
    "PROPOSAL_GENERATOR_REGISTRY", "RPN", "build_proposal_generator", "StandardRPNHead",
    "rpn_losses", "ROI_HEADS_REGISTRY", "ROI_BOX_HEAD_REGISTRY", "ROI_MASK_HEAD_REGISTRY",
    "ROIPooler", "StandardROIHeads", "build_roi_heads", "paste_masks_in_image",
]
