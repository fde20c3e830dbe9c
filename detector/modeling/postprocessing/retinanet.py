"""Turning RetinaNet's raw per-level outputs into detections of one image."""
from typing import List, Tuple

import torch
from torchvision.ops import batched_nms

from detector.structures import Boxes, Instances

from ..box_coder import BoxCoder

__all__ = ["retinanet_inference_single_image"]


def retinanet_inference_single_image(
    pred_logits_per_level: List[torch.Tensor], pred_deltas_per_level: List[torch.Tensor],
    anchors_per_level: List[torch.Tensor], image_size: Tuple[int, int], *, box_coder: BoxCoder,
    score_thresh: float, topk_candidates: int, nms_thresh: float, max_detections: int,
) -> Instances:
    """Detections of one image.

    Per level: sigmoid scores of all (anchor, class) pairs, keep those above ``score_thresh``, then
    the ``topk_candidates`` best, decode their boxes and clip them to ``image_size`` (h, w). Then
    class-aware NMS over all levels and the ``max_detections`` best.

    Args: per-level (R_l, K) logits, (R_l, 4) deltas and (R_l, 4) anchors.
    Returns: Instances(image_size, pred_boxes, scores, pred_classes), sorted by decreasing score.
    """
    boxes_all, scores_all, classes_all = [], [], []
    for logits, deltas, anchors in zip(pred_logits_per_level, pred_deltas_per_level,
                                       anchors_per_level):
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits).flatten()
        keep = scores > score_thresh
        scores = scores[keep]
        candidate_idxs = torch.where(keep)[0]
        num_topk = min(topk_candidates, candidate_idxs.numel())
        scores, order = scores.topk(num_topk)
        candidate_idxs = candidate_idxs[order]
        anchor_idxs = torch.div(candidate_idxs, num_classes, rounding_mode="floor")
        classes = candidate_idxs % num_classes
        boxes = Boxes(box_coder.decode(deltas[anchor_idxs], anchors[anchor_idxs]))
        boxes.clip(image_size)
        boxes_all.append(boxes.tensor)
        scores_all.append(scores)
        classes_all.append(classes)
    boxes = torch.cat(boxes_all)
    scores = torch.cat(scores_all)
    classes = torch.cat(classes_all)
    keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
    return Instances(image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep],
                     pred_classes=classes[keep])
