"""EfficientDet inference for a whole batch: top-k over all levels and classes, decode, clip, one
class- and image-aware NMS for the batch, then the best ``max_detections`` per image."""
import math
from typing import List, Sequence, Tuple, Union

import torch

from detector.layers import batched_nms
from detector.structures import Boxes, Instances

from ..box_coder import BoxCoder

__all__ = ["efficientdet_inference", "topk_over_levels"]

# sample every _SAMPLE_STRIDE-th logit to bound the k-th largest from below; prime, so the sample
# does not fall on a subset of the classes
_SAMPLE_STRIDE = 31


def topk_over_levels(logits_per_level: Sequence[torch.Tensor], k: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.cat(logits_per_level, 1).topk(k, dim=1)`` for per-level (N, R_l) logits, in a
    fraction of the time when k is much smaller than the total.

    The largest ``2 k / stride`` of a strided sample give a threshold below which, with a sample
    spread like the whole, about 2 k logits lie above; only those are ranked exactly. If any image
    has fewer than k logits at or above its threshold (a sample unlike the whole), it falls back to
    the full top-k, so the returned values are always exactly the top-k values.

    Ties: the indices are k distinct positions holding those values, but among logits equal to
    the k-th value they may differ from ``torch.topk``'s choice. If many sampled logits equal the
    threshold (rounded logits), those equal to it are candidates only as far as an image needs
    them to reach k, the first in concatenation order.
    Returns (N, k) values in decreasing order and their (N, k) indices into the concatenation.
    """
    sizes = [x.shape[1] for x in logits_per_level]
    total = sum(sizes)
    num_images = logits_per_level[0].shape[0]
    if k * _SAMPLE_STRIDE * 2 > total:
        return torch.cat(list(logits_per_level), dim=1).topk(k, dim=1)
    sample = torch.cat([x[:, ::_SAMPLE_STRIDE] for x in logits_per_level], dim=1)
    num_sampled = min(sample.shape[1], 2 * math.ceil(k / _SAMPLE_STRIDE) + 8)
    threshold = sample.topk(num_sampled, dim=1).values[:, -1:]
    # the sample holding far more logits at or above the threshold than the num_sampled it was
    # chosen for means the threshold value is tied: rounded logits (bf16 autocast, weak heads)
    # can tie millions there, and ranking them all would dominate the time
    if int((sample >= threshold).count_nonzero(1).max()) > 2 * num_sampled:
        candidates = _above_and_needed_ties(logits_per_level, threshold, k)
    else:
        candidates = [x >= threshold for x in logits_per_level]
    images, indices, values = [], [], []
    offset = 0
    for x, size, mask in zip(logits_per_level, sizes, candidates):
        image_idxs, idxs = torch.nonzero(mask, as_tuple=True)
        images.append(image_idxs)
        indices.append(idxs + offset)
        values.append(x[image_idxs, idxs])
        offset += size
    images, indices, values = torch.cat(images), torch.cat(indices), torch.cat(values)
    counts = torch.bincount(images, minlength=num_images)
    if int(counts.min()) < k:
        return torch.cat(list(logits_per_level), dim=1).topk(k, dim=1)
    # candidates of each image side by side, padded with -inf, then an exact top-k of those
    order = torch.argsort(images, stable=True)
    images, indices, values = images[order], indices[order], values[order]
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(len(images), device=images.device) - starts[images]
    padded = values.new_full((num_images, int(counts.max())), float("-inf"))
    padded[images, slots] = values
    padded_idx = indices.new_zeros((num_images, int(counts.max())))
    padded_idx[images, slots] = indices
    top_values, top_slots = padded.topk(k, dim=1)
    return top_values, torch.gather(padded_idx, 1, top_slots)


def _above_and_needed_ties(logits_per_level: Sequence[torch.Tensor], threshold: torch.Tensor,
                           k: int) -> List[torch.Tensor]:
    """Per-level (N, R_l) masks of the logits above the (N, 1) threshold plus, per image, only as
    many equal to it as are needed to reach k, the first in concatenation order: max(#above, k)
    candidates per image, or fewer if fewer than k reach the threshold."""
    # int32 counts and ranks: int64 ones over millions of logits cost more than the rest
    above_per_level = [x > threshold for x in logits_per_level]
    num_above = sum(mask.sum(1, dtype=torch.int32) for mask in above_per_level)
    still_needed = (k - num_above).clamp_(min=0)[:, None]
    for x, above in zip(logits_per_level, above_per_level):
        if not bool(still_needed.any()):
            break
        if x.shape[1] == 0:
            continue
        ties = x == threshold
        tie_ranks = ties.cumsum(1, dtype=torch.int32)
        above |= ties & (tie_ranks <= still_needed)
        still_needed -= torch.minimum(tie_ranks[:, -1:], still_needed)
    return above_per_level


def efficientdet_inference(pred_logits: Union[torch.Tensor, Sequence[torch.Tensor]],
                           pred_deltas: torch.Tensor, anchors: torch.Tensor,
                           image_sizes: Sequence[Tuple[int, int]], *, box_coder: BoxCoder,
                           score_thresh: float, topk_candidates: int, nms_thresh: float,
                           max_detections: int) -> List[Instances]:
    """Detections per image, as effdet's ``DetBenchPredict`` computes them.

    Per image the ``topk_candidates`` best (anchor, class) logits over all levels are kept (no
    score threshold in effdet; ``score_thresh`` > 0 also drops scores at or below it), their
    boxes decoded and clipped to the image's (h, w), then NMS per class and the
    ``max_detections`` best.

    Args: (N, R, K) logits (or a list of per-level (N, R_l, K) logits in anchor order),
        (N, R, 4) deltas, (R, 4) anchors, the N (h, w) sizes.
    Returns: one Instances(image_size, pred_boxes, scores, pred_classes) per image, sorted by
    decreasing score.
    """
    per_level = [pred_logits] if isinstance(pred_logits, torch.Tensor) else list(pred_logits)
    num_images, _, num_classes = per_level[0].shape
    num_anchors = anchors.shape[0]
    device = anchors.device
    k = min(topk_candidates, num_anchors * num_classes)
    top_logits, top_idxs = topk_over_levels([x.reshape(num_images, -1) for x in per_level], k)
    anchor_idxs = torch.div(top_idxs, num_classes, rounding_mode="floor")
    classes = top_idxs % num_classes
    scores = torch.sigmoid(top_logits.float())
    deltas = torch.gather(pred_deltas, 1, anchor_idxs.unsqueeze(2).expand(-1, -1, 4))
    boxes = box_coder.decode(deltas.reshape(-1, 4).float(), anchors[anchor_idxs.reshape(-1)])
    boxes = boxes.view(num_images, k, 4)
    limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=boxes.dtype,
                          device=device)
    boxes = torch.min(boxes, limits[:, None, :]).clamp_(min=0)

    image_idxs = torch.arange(num_images, device=device)[:, None].expand(-1, k)
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
    flat_classes, flat_images = classes.reshape(-1), image_idxs.reshape(-1)
    if score_thresh > 0:
        keep = torch.nonzero(flat_scores > score_thresh).squeeze(1)
        flat_boxes, flat_scores = flat_boxes[keep], flat_scores[keep]
        flat_classes, flat_images = flat_classes[keep], flat_images[keep]
    # one NMS for the batch: boxes only suppress boxes of their own image and class
    keep = batched_nms(flat_boxes, flat_scores, flat_images * num_classes + flat_classes,
                       nms_thresh)
    kept_images = flat_images[keep]
    results = []
    for i, image_size in enumerate(image_sizes):
        keep_i = keep[kept_images == i][:max_detections]
        results.append(Instances(tuple(image_size), pred_boxes=Boxes(flat_boxes[keep_i]),
                                 scores=flat_scores[keep_i], pred_classes=flat_classes[keep_i]))
    return results
