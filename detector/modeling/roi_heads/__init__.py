"""Second stage of two-stage detectors: RoI poolers, box and mask heads, and the RoI heads that
sample proposals and run them."""
from .build import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    build_box_head,
    build_mask_head,
    build_roi_heads,
)
from .poolers import POOLER_TYPES, ROIPooler, assign_boxes_to_levels

# imported for their registrations
from .box_head import (  # noqa: E402
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    fast_rcnn_inference_single_image,
)
from .mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_inference  # noqa: E402
from .roi_heads import SampledProposals, StandardROIHeads  # noqa: E402

__all__ = [
    "ROI_HEADS_REGISTRY", "ROI_BOX_HEAD_REGISTRY", "ROI_MASK_HEAD_REGISTRY", "build_roi_heads",
    "build_box_head", "build_mask_head", "POOLER_TYPES", "ROIPooler", "assign_boxes_to_levels",
    "FastRCNNConvFCHead", "FastRCNNOutputLayers", "fast_rcnn_inference_single_image",
    "MaskRCNNConvUpsampleHead", "mask_rcnn_inference", "SampledProposals", "StandardROIHeads",
]
