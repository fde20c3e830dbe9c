"""Box branch of the RoI heads: a conv/fc head on pooled features, the class and box predictor,
and test-time decoding, thresholding and per-class NMS.

Class layout: background is the last of the K + 1 logits and box deltas are class-specific
(4 K) without a background slot (see :mod:`detector.modeling.losses.fast_rcnn`).
"""
from functools import partial
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import ConvNormAct, NormSpec, batched_nms
from detector.structures import Boxes, Instances

from ..box_coder import BoxCoder
from ..losses.fast_rcnn import fast_rcnn_losses
from ..losses.focal import BBOX_REG_LOSS_TYPES
from .build import ROI_BOX_HEAD_REGISTRY

__all__ = ["FastRCNNConvFCHead", "FastRCNNOutputLayers", "fast_rcnn_inference_single_image"]

_msra_fill = partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu")


@ROI_BOX_HEAD_REGISTRY.register()
class FastRCNNConvFCHead(nn.Module):
    """``conv_dims`` 3x3 conv-norm-ReLU blocks, then ``fc_dims`` fully connected + ReLU layers
    on the flattened (C, S, S) pooled feature. ``[]`` convs and ``[1024, 1024]`` fcs is the
    "2fc" head of Mask R-CNN FPN (torchvision's TwoMLPHead: fc6, fc7 -> fc1, fc2); four 256
    convs with GN and one 1024 fc is detectron2's "4conv1fc" GN head.

    Args:
        in_channels: C of the pooled features.
        pooler_resolution: S.
        norm: norm of the convs (the fcs have none).
    """

    def __init__(self, *, in_channels: int, pooler_resolution: int, conv_dims: Sequence[int] = (),
                 fc_dims: Sequence[int] = (1024, 1024), norm: NormSpec = NormSpec()):
        super().__init__()
        channels = in_channels
        self.num_convs, self.num_fcs = len(conv_dims), len(fc_dims)
        for i, dim in enumerate(conv_dims, start=1):
            self.add_module(f"conv{i}", ConvNormAct(channels, dim, 3, norm=norm,
                                                    weight_init=_msra_fill))
            channels = dim
        size = channels * pooler_resolution * pooler_resolution
        for i, dim in enumerate(fc_dims, start=1):
            fc = nn.Linear(size, dim)
            # Caffe2's XavierFill, as detectron2 initialises its fcs
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{i}", fc)
            size = dim
        self.output_size = size

    @classmethod
    def from_config(cls, cfg, in_channels: int, pooler_resolution: int) -> dict:
        h = cfg.MODEL.ROI_BOX_HEAD
        if h.NUM_CONV < 0 or h.NUM_FC < 0 or h.NUM_CONV + h.NUM_FC == 0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.NUM_CONV={h.NUM_CONV} and NUM_FC={h.NUM_FC} "
                             "must be >= 0 and not both 0")
        return {
            "in_channels": in_channels,
            "pooler_resolution": pooler_resolution,
            "conv_dims": [h.CONV_DIM] * h.NUM_CONV,
            "fc_dims": [h.FC_DIM] * h.NUM_FC,
            "norm": NormSpec.from_config(cfg, h.NORM, key="MODEL.ROI_BOX_HEAD.NORM"),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"conv{i}")(x)
        x = torch.flatten(x, start_dim=1)
        for i in range(1, self.num_fcs + 1):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return x


def fast_rcnn_inference_single_image(
    class_logits: torch.Tensor, proposal_deltas: torch.Tensor, proposal_boxes: torch.Tensor,
    image_size: Tuple[int, int], *, box_coder: BoxCoder, score_thresh: float, nms_thresh: float,
    min_box_size: float, max_detections: int,
) -> Instances:
    """Detections of one image from its (R, K + 1) logits and (R, 4 K or 4) deltas.

    Every (proposal, class) pair with softmax score above ``score_thresh`` is a candidate; its
    box is the class's decoded box clipped to ``image_size`` (h, w). Candidates narrower or
    shorter than ``min_box_size`` are dropped (when > 0), then per-class NMS and the
    ``max_detections`` best. Proposals with a non-finite box or score are skipped.
    """
    num_classes = class_logits.shape[1] - 1
    num_proposals = proposal_boxes.shape[0]
    scores = F.softmax(class_logits, dim=-1)[:, :num_classes]
    deltas = proposal_deltas.view(num_proposals, proposal_deltas.shape[1] // 4, 4)
    anchors = proposal_boxes[:, None, :].expand(-1, deltas.shape[1], -1)
    boxes = Boxes(box_coder.decode(deltas.reshape(-1, 4), anchors.reshape(-1, 4)))
    boxes.clip(image_size)
    boxes = boxes.tensor.view(num_proposals, deltas.shape[1], 4).expand(-1, num_classes, -1)

    finite = torch.isfinite(boxes).all(dim=2).all(dim=1) & torch.isfinite(scores).all(dim=1)
    candidates = (scores > score_thresh) & finite[:, None]
    proposal_idxs, classes = candidates.nonzero(as_tuple=True)
    boxes, scores = boxes[proposal_idxs, classes], scores[proposal_idxs, classes]
    if min_box_size > 0:
        large = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & (
            (boxes[:, 3] - boxes[:, 1]) >= min_box_size)
        boxes, scores, classes = boxes[large], scores[large], classes[large]
    keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
    return Instances(image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep],
                     pred_classes=classes[keep])


class FastRCNNOutputLayers(nn.Module):
    """Class logits (``cls_score``: K + 1, background last) and box deltas (``bbox_pred``:
    4 K class-specific or 4 class-agnostic) from the box head's features, with their losses and
    test-time decoding.

    Args:
        input_size: D, the box head's ``output_size``.
        box_coder: delta coding of boxes relative to proposals (weights 10, 10, 5, 5).
        score_thresh, nms_thresh, min_box_size, max_detections: see
            :func:`fast_rcnn_inference_single_image`.
        loss_type, smooth_l1_beta, box_loss_weight: see
            :func:`detector.modeling.losses.fast_rcnn_losses`.
    """

    def __init__(self, *, input_size: int, num_classes: int, box_coder: BoxCoder,
                 cls_agnostic_bbox_reg: bool = False, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, min_box_size: float = 0.0, max_detections: int = 100,
                 loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
                 box_loss_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        self.bbox_pred = nn.Linear(input_size, 4 if cls_agnostic_bbox_reg else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = box_coder
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.min_box_size, self.max_detections = min_box_size, max_detections
        self.loss_type, self.smooth_l1_beta = loss_type, smooth_l1_beta
        self.box_loss_weight = box_loss_weight

    @classmethod
    def from_config(cls, cfg, input_size: int) -> dict:
        h, r = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_HEADS
        weights = list(h.BBOX_REG_WEIGHTS)
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS={weights} must be 4 positive "
                             "numbers")
        if h.BBOX_REG_LOSS_TYPE not in BBOX_REG_LOSS_TYPES:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE='{h.BBOX_REG_LOSS_TYPE}' is "
                             f"not one of {list(BBOX_REG_LOSS_TYPES)}")
        return {
            "input_size": input_size,
            "num_classes": r.NUM_CLASSES,
            "box_coder": BoxCoder(weights),
            "cls_agnostic_bbox_reg": h.CLS_AGNOSTIC_BBOX_REG,
            "score_thresh": r.SCORE_THRESH_TEST,
            "nms_thresh": r.NMS_THRESH_TEST,
            "min_box_size": r.MIN_BOX_SIZE_TEST,
            "max_detections": cfg.TEST.DETECTIONS_PER_IMAGE,
            "loss_type": h.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": h.SMOOTH_L1_BETA,
            "box_loss_weight": h.BBOX_REG_LOSS_WEIGHT,
        }

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(R, K + 1) class logits and (R, 4 K or 4) box deltas of (R, D) box features."""
        x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    def losses(self, class_logits: torch.Tensor, proposal_deltas: torch.Tensor,
               proposal_boxes: torch.Tensor, gt_classes: torch.Tensor,
               gt_boxes: torch.Tensor, normalizer=None) -> Dict[str, torch.Tensor]:
        """``loss_cls`` and ``loss_box_reg`` of the sampled proposals of the whole batch
        (concatenated; ``gt_classes`` K = background); ``normalizer``: see
        :func:`detector.modeling.losses.fast_rcnn_losses`."""
        return fast_rcnn_losses(class_logits, proposal_deltas, proposal_boxes, gt_classes,
                                gt_boxes, box_coder=self.box_coder, loss_type=self.loss_type,
                                smooth_l1_beta=self.smooth_l1_beta,
                                box_loss_weight=self.box_loss_weight, normalizer=normalizer)

    def inference(self, class_logits: torch.Tensor, proposal_deltas: torch.Tensor,
                  proposal_boxes: List[torch.Tensor], image_sizes: List[Tuple[int, int]]
                  ) -> List[Instances]:
        """Per-image detections from the outputs for the concatenated per-image proposals."""
        counts = [len(b) for b in proposal_boxes]
        return [
            fast_rcnn_inference_single_image(
                logits, deltas, boxes, image_size, box_coder=self.box_coder,
                score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                min_box_size=self.min_box_size, max_detections=self.max_detections)
            for logits, deltas, boxes, image_size in zip(
                class_logits.split(counts), proposal_deltas.split(counts), proposal_boxes,
                image_sizes)
        ]
