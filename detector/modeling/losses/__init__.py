"""Losses as pure functions: generic per-anchor sums (:mod:`.focal`) and each detector's
assembly of them (:mod:`.retinanet`, :mod:`.efficientdet`, :mod:`.rpn`)."""
from .efficientdet import EFFICIENTDET_BOX_LOSS_TYPES, efficientdet_losses
from .fast_rcnn import fast_rcnn_losses, select_class_deltas
from .focal import (
    BBOX_REG_LOSS_TYPES,
    box_regression_loss_sum,
    focal_loss_sum,
    sparse_focal_loss_sum,
)
from .mask_rcnn import MASK_TARGET_TYPES, mask_rcnn_loss, mask_rcnn_targets
from .retinanet import LOSS_NORMALIZATIONS, check_retinanet_loss_options, retinanet_losses
from .rpn import RPN_LOSS_NORMALIZATIONS, check_rpn_loss_options, rpn_loss_count, rpn_losses

__all__ = [
    "fast_rcnn_losses", "select_class_deltas", "MASK_TARGET_TYPES", "mask_rcnn_loss",
    "mask_rcnn_targets",
    "BBOX_REG_LOSS_TYPES", "box_regression_loss_sum", "focal_loss_sum", "sparse_focal_loss_sum",
    "LOSS_NORMALIZATIONS", "check_retinanet_loss_options", "retinanet_losses", "EFFICIENTDET_BOX_LOSS_TYPES",
    "efficientdet_losses", "RPN_LOSS_NORMALIZATIONS", "check_rpn_loss_options", "rpn_loss_count",
    "rpn_losses",
]
