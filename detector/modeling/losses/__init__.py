"""Losses as pure functions: generic per-anchor sums (:mod:`.focal`) and each detector's
assembly of them (:mod:`.retinanet`, :mod:`.efficientdet`)."""
from .efficientdet import EFFICIENTDET_BOX_LOSS_TYPES, efficientdet_losses
from .focal import (
    BBOX_REG_LOSS_TYPES,
    box_regression_loss_sum,
    focal_loss_sum,
    sparse_focal_loss_sum,
)
from .retinanet import LOSS_NORMALIZATIONS, check_retinanet_loss_options, retinanet_losses

__all__ = [
    "BBOX_REG_LOSS_TYPES", "box_regression_loss_sum", "focal_loss_sum", "sparse_focal_loss_sum",
    "LOSS_NORMALIZATIONS", "check_retinanet_loss_options", "retinanet_losses", "EFFICIENTDET_BOX_LOSS_TYPES",
    "efficientdet_losses",
]
