"""IoU-threshold matching of anchors to ground-truth boxes."""
from typing import Sequence, Tuple

import torch

from detector.structures import pairwise_ioa

__all__ = ["Matcher", "split_crowd", "ignore_background_in_crowd"]


class Matcher:
    """Gives every anchor (a column of an (M gt, R anchors) IoU matrix) its best gt and a label.

    Args:
        thresholds: increasing IoU cut points, e.g. [0.4, 0.5].
        labels: one label per interval, e.g. [0, -1, 1]: IoU < 0.4 background (0),
            0.4 <= IoU < 0.5 ignored (-1), IoU >= 0.5 foreground (1).
        allow_low_quality_matches: for every ground truth, also mark the anchors with its highest
            IoU (ties included) as foreground, so no object is left without an anchor. Like
            torchvision and detectron2, such an anchor keeps its own best ground truth as match.
            Unlike them, a ground truth whose best IoU is 0 (degenerate or outside every anchor)
            adds nothing here instead of marking every anchor foreground.
    """

    def __init__(self, thresholds: Sequence[float] = (0.4, 0.5), labels: Sequence[int] = (0, -1, 1),
                 allow_low_quality_matches: bool = True):
        thresholds = [float(t) for t in thresholds]
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher needs one label per interval: {len(thresholds)} thresholds "
                             f"need {len(thresholds) + 1} labels, got {list(labels)}")
        if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"MODEL.RETINANET.IOU_THRESHOLDS={thresholds} must be increasing")
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher labels {list(labels)} must be -1, 0 or 1")
        self.thresholds = [-float("inf")] + thresholds + [float("inf")]
        self.labels = [int(x) for x in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def _interval_labels(self, matched_vals: torch.Tensor) -> torch.Tensor:
        """int8 label of the threshold interval each best-match quality falls in."""
        match_labels = torch.full(matched_vals.shape, -1, dtype=torch.int8,
                                  device=matched_vals.device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        return match_labels

    def __call__(self, match_quality_matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``matches`` (R,) int64 index of the best ground truth per anchor (0 when there is
        none) and ``match_labels`` (R,) int8 in {-1, 0, 1}."""
        num_gt, num_anchors = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0:
            matches = torch.zeros(num_anchors, dtype=torch.int64, device=device)
            # no objects: every anchor is background
            match_labels = torch.full((num_anchors,), self.labels[0], dtype=torch.int8,
                                      device=device)
            return matches, match_labels

        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = self._interval_labels(matched_vals)

        if self.allow_low_quality_matches:
            highest_per_gt, _ = match_quality_matrix.max(dim=1)
            best = (match_quality_matrix == highest_per_gt[:, None]) & (highest_per_gt[:, None] > 0)
            _, anchor_idxs = best.nonzero(as_tuple=True)
            match_labels[anchor_idxs] = 1
        return matches, match_labels

    def match_batch(self, match_quality: torch.Tensor, gt_valid: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__` of every image of a batch at once: (N, G, R) IoU matrices of the
        images' ground truth padded to G rows, ``gt_valid`` (N, G) marking the real rows.
        Returns (N, R) ``matches`` and ``match_labels``, equal to calling the matcher per image
        on its real rows."""
        num_images, _, num_anchors = match_quality.shape
        # padded rows never win an anchor; an image without ground truth gets background (-1 is
        # below every threshold) and match 0, as __call__ gives it
        quality = match_quality.masked_fill(~gt_valid[:, :, None], -1.0)
        if quality.shape[1] == 0:
            quality = quality.new_full((num_images, 1, num_anchors), -1.0)
        matched_vals, matches = quality.max(dim=1)
        match_labels = self._interval_labels(matched_vals)
        if self.allow_low_quality_matches:
            highest_per_gt = quality.max(dim=2, keepdim=True).values
            best = ((quality == highest_per_gt) & (highest_per_gt > 0)).any(dim=1)
            match_labels[best] = 1
        return matches, match_labels


def split_crowd(instances):
    """(the non-crowd instances, the crowd boxes or None): crowd regions (``gt_is_crowd``) take
    no part in the matching, so they never take anchors from real objects."""
    if not instances.has("gt_is_crowd"):
        return instances, None
    is_crowd = instances.gt_is_crowd.to(torch.bool)
    return instances[~is_crowd], instances.gt_boxes[is_crowd]


def ignore_background_in_crowd(labels: torch.Tensor, anchor_boxes, crowd_boxes,
                               background_label: int, fraction: float) -> torch.Tensor:
    """``labels`` (R,) with every background anchor that a crowd region covers by at least
    ``fraction`` of its area set to -1 (ignored), in place; unchanged without crowd boxes or with
    ``fraction`` above 1."""
    if crowd_boxes is None or len(crowd_boxes) == 0 or fraction > 1:
        return labels
    covered = pairwise_ioa(anchor_boxes, crowd_boxes.to(labels.device)).max(dim=1).values
    labels[(labels == background_label) & (covered >= fraction)] = -1
    return labels
