"""Turning RetinaNet's raw per-level outputs into detections, for a whole batch at once."""
import math
from typing import List, Sequence, Tuple

import torch

from detector.layers import batched_nms
from detector.structures import Boxes, Instances

from ..box_coder import BoxCoder

__all__ = ["retinanet_inference", "retinanet_inference_single_image", "topk_above_threshold"]

def topk_above_threshold(scores: torch.Tensor, thresh: float, k: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of (N, M) ``scores``, the ``k`` best entries above ``thresh``, best first.

    Returns (N, k') values, (N, k') column indices and an (N, k') bool mask of the valid entries
    (rows with fewer than k' entries above ``thresh`` are padded), ``k' = min(k, the largest
    count of a row)``. Equal to thresholding and then ``topk`` row by row.
    """
    num_rows = scores.shape[0]
    rows, cols = torch.nonzero(scores > thresh, as_tuple=True)
    values = scores[rows, cols]
    counts = torch.bincount(rows, minlength=num_rows)
    width = int(counts.max()) if num_rows else 0
    # candidates of each row side by side (nonzero lists them row by row), padded with -inf
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(len(rows), device=scores.device) - starts[rows]
    padded = values.new_full((num_rows, width), -math.inf)
    padded[rows, slots] = values
    padded_cols = cols.new_zeros((num_rows, width))
    padded_cols[rows, slots] = cols
    top_values, top_slots = padded.topk(min(k, width), dim=1)
    return top_values, torch.gather(padded_cols, 1, top_slots), top_values > -math.inf


def retinanet_inference(
    pred_logits_per_level: Sequence[torch.Tensor], pred_deltas_per_level: Sequence[torch.Tensor],
    anchors_per_level: Sequence[torch.Tensor], image_sizes: Sequence[Tuple[int, int]], *,
    box_coder: BoxCoder, score_thresh: float, topk_candidates: int, nms_thresh: float,
    max_detections: int,
) -> List[Instances]:
    """Detections of every image of a batch.

    Per level: the sigmoid scores of all (anchor, class) pairs above ``score_thresh``, of those
    the ``topk_candidates`` best, their boxes decoded and clipped to the image's (h, w). Then per
    image class-aware NMS over all levels and the ``max_detections`` best. This is torchvision's
    and detectron2's RetinaNet postprocessing; everything but the NMS runs on the whole batch.

    Args: per-level (N, R_l, K) logits, (N, R_l, 4) deltas, (R_l, 4) anchors; the N (h, w).
    Returns: one Instances(image_size, pred_boxes, scores, pred_classes) per image, sorted by
    decreasing score. Computed in float32 whatever the dtype of the outputs.
    """
    num_images = len(image_sizes)
    boxes_all, scores_all, classes_all, valid_all = [], [], [], []
    for logits, deltas, anchors in zip(pred_logits_per_level, pred_deltas_per_level,
                                       anchors_per_level):
        num_classes = logits.shape[-1]
        scores, candidates, valid = topk_above_threshold(
            torch.sigmoid(logits.reshape(num_images, -1).float()), score_thresh, topk_candidates)
        anchor_idxs = torch.div(candidates, num_classes, rounding_mode="floor")
        picked = torch.gather(deltas.float(), 1, anchor_idxs.unsqueeze(2).expand(-1, -1, 4))
        boxes = box_coder.decode(picked.reshape(-1, 4), anchors[anchor_idxs.reshape(-1)])
        boxes_all.append(boxes.view(num_images, -1, 4))
        scores_all.append(scores)
        classes_all.append(candidates % num_classes)
        valid_all.append(valid)
    boxes = torch.cat(boxes_all, dim=1)
    limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=boxes.dtype,
                          device=boxes.device)
    boxes = torch.min(boxes, limits[:, None, :]).clamp_(min=0)
    scores, classes = torch.cat(scores_all, dim=1), torch.cat(classes_all, dim=1)
    valid = torch.cat(valid_all, dim=1)
    results = []
    for i, image_size in enumerate(image_sizes):
        # per image: one NMS over a batch would offset boxes by image index and lose precision
        keep_i = valid[i]
        boxes_i, scores_i, classes_i = boxes[i][keep_i], scores[i][keep_i], classes[i][keep_i]
        keep = batched_nms(boxes_i, scores_i, classes_i, nms_thresh)[:max_detections]
        results.append(Instances(tuple(image_size), pred_boxes=Boxes(boxes_i[keep]),
                                 scores=scores_i[keep], pred_classes=classes_i[keep]))
    return results


def retinanet_inference_single_image(
    pred_logits_per_level: List[torch.Tensor], pred_deltas_per_level: List[torch.Tensor],
    anchors_per_level: List[torch.Tensor], image_size: Tuple[int, int], **options,
) -> Instances:
    """:func:`retinanet_inference` of one image: per-level (R_l, K) logits and (R_l, 4) deltas
    and anchors; the same keyword options."""
    return retinanet_inference([x[None] for x in pred_logits_per_level],
                               [x[None] for x in pred_deltas_per_level], anchors_per_level,
                               [image_size], **options)[0]
