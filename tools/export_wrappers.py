"""The modules tools/export_model.py exports: a detector's networks alone (raw outputs), or
with its inference inside, written with static shapes up to the data-dependent selections so that
torch.export traces them. Input: the normalised, padded (1, 3, H, W) image of a fixed size (and,
with the inference inside, the int64 [h, w] of its unpadded part)."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import nms, roi_align

from detector.modeling.dense_heads import permute_to_N_HWA_K
from detector.modeling.meta_arch import EfficientDet, GeneralizedRCNN, RetinaNet
from detector.modeling.roi_heads.poolers import assign_boxes_to_levels

__all__ = ["DenseNetwork", "DenseFull", "RCNNNetwork", "RCNNFull", "export_wrapper",
           "output_names"]


def _nms_by_class(boxes, scores, classes, iou_threshold: float, offset: float):
    """``batched_nms`` with the coordinate offset fixed by the input size: torchvision picks its
    offset from the boxes' maximum or loops over classes depending on the count, neither of
    which torch.export can trace on a data-dependent number of boxes."""
    return nms(boxes + (classes.to(boxes.dtype) * offset)[:, None], scores, iou_threshold)


def _nms_per_class(boxes, scores, classes, iou_threshold: float, num_classes: int):
    """``batched_nms`` as a loop over the classes (torchvision's choice for many boxes): one
    NMS over thousands of (proposal, class) candidates costs the square of their number."""
    keep = torch.cat([idxs[nms(boxes[idxs], scores[idxs], iou_threshold)]
                      for idxs in (torch.nonzero(classes == c).squeeze(1)
                                   for c in range(num_classes))])
    return keep[torch.argsort(scores[keep], descending=True)]


def _clip(boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    limits = torch.stack([image_size[1], image_size[0], image_size[1], image_size[0]])
    return torch.min(boxes, limits.to(boxes.dtype)).clamp(min=0)


class DenseNetwork(nn.Module):
    """RetinaNet / EfficientDet networks: per-level logits, then per-level deltas."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        pred_logits, pred_deltas, _ = self.model.forward_features(images)
        return tuple(pred_logits) + tuple(pred_deltas)


class DenseFull(nn.Module):
    """RetinaNet / EfficientDet with their inference inside (see the postprocessing modules);
    anchors are constants of the fixed input size. Top-k runs before the score threshold (the
    same candidates: the top k of those above it are the top k overall that are above it)."""

    def __init__(self, model: nn.Module, padded_size: Tuple[int, int]):
        super().__init__()
        self.model = model
        with torch.no_grad():
            _, _, features = model.forward_features(torch.zeros((1, 3) + tuple(padded_size)))
        anchors = model.anchor_generator(features, padded_size)
        for i, a in enumerate(anchors):
            self.register_buffer(f"anchors_{i}", a, persistent=False)
        self.num_levels = len(anchors)
        self.nms_offset = float(max(padded_size) + 1)
        self.per_level_topk = isinstance(model, RetinaNet)

    def forward(self, images: torch.Tensor, image_size: torch.Tensor):
        m = self.model
        pred_logits, pred_deltas, _ = m.forward_features(images)
        anchors = [getattr(self, f"anchors_{i}") for i in range(self.num_levels)]
        logits = [permute_to_N_HWA_K(x, m.num_classes)[0].float() for x in pred_logits]
        deltas = [permute_to_N_HWA_K(x, 4)[0].float() for x in pred_deltas]
        if self.per_level_topk:  # RetinaNet: top-k per level
            groups = list(zip(logits, deltas, anchors))
        else:  # EfficientDet: top-k over all levels
            groups = [(torch.cat(logits), torch.cat(deltas), torch.cat(anchors))]
        boxes, scores, classes = [], [], []
        for level_logits, level_deltas, level_anchors in groups:
            flat = level_logits.flatten()
            top, idxs = flat.topk(min(m.topk_candidates_test, flat.numel()))
            anchor_idxs = torch.div(idxs, m.num_classes, rounding_mode="floor")
            decoded = m.box_coder.decode(level_deltas[anchor_idxs], level_anchors[anchor_idxs])
            boxes.append(_clip(decoded, image_size))
            scores.append(torch.sigmoid(top))
            classes.append(idxs % m.num_classes)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        if self.per_level_topk or m.score_thresh_test > 0:
            keep = torch.nonzero(scores > m.score_thresh_test).squeeze(1)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep = _nms_by_class(boxes, scores, classes, m.nms_thresh_test,
                             self.nms_offset)[:m.max_detections_per_image]
        return boxes[keep], scores[keep], classes[keep]


class RCNNNetwork(nn.Module):
    """Mask R-CNN's backbone + FPN and RPN head: pyramid features (the neck's order), then the
    RPN's per-level objectness logits and deltas."""

    def __init__(self, model: GeneralizedRCNN):
        super().__init__()
        self.model = model
        self.feature_names = list(model.neck.output_shape())

    def forward(self, images: torch.Tensor):
        features = self.model.neck(self.model.backbone(images))
        rpn = self.model.proposal_generator
        logits, deltas = rpn.head([features[f] for f in rpn.in_features])
        return tuple(features[f] for f in self.feature_names) + tuple(logits) + tuple(deltas)


def _pool(pooler: nn.Module, features: List[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """:class:`ROIPooler` for one image, without its branch on a level's box count (which
    torch.export cannot trace): every level pools its boxes, even none."""
    rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
    levels = assign_boxes_to_levels([boxes], pooler.min_level, pooler.max_level,
                                    pooler.canonical_box_size, pooler.canonical_level)
    output = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + pooler.output_size)
    for level, (feature, stride) in enumerate(zip(features, pooler.strides)):
        idxs = torch.nonzero(levels == level).squeeze(1)
        pooled = roi_align(feature, rois[idxs], pooler.output_size, spatial_scale=1.0 / stride,
                           sampling_ratio=pooler.sampling_ratio, aligned=pooler.aligned)
        output = output.index_put((idxs,), pooled)
    return output


class RCNNFull(nn.Module):
    """Mask R-CNN inference inside: the RPN's proposal selection
    (:meth:`RPN.find_top_proposals`), the box head's
    (:func:`fast_rcnn_inference_single_image`) and the mask head's choice of the class's mask."""

    def __init__(self, model: GeneralizedRCNN, padded_size: Tuple[int, int]):
        super().__init__()
        self.model = model
        rpn = model.proposal_generator
        with torch.no_grad():
            features = model.neck(model.backbone(torch.zeros((1, 3) + tuple(padded_size))))
        anchors = rpn.anchor_generator([features[f] for f in rpn.in_features],
                                       image_size=padded_size)
        for i, a in enumerate(anchors):
            self.register_buffer(f"anchors_{i}", a, persistent=False)
        self.nms_offset = float(max(padded_size) + 1)

    def proposals(self, features: Dict[str, torch.Tensor], image_size: torch.Tensor):
        rpn = self.model.proposal_generator
        raw_logits, raw_deltas = rpn.head([features[f] for f in rpn.in_features])
        boxes, scores, levels = [], [], []
        for level, (logits, deltas) in enumerate(zip(raw_logits, raw_deltas)):
            logits = permute_to_N_HWA_K(logits, 1)[0, :, 0].float()
            deltas = permute_to_N_HWA_K(deltas, 4)[0].float()
            top, idxs = logits.topk(min(rpn.pre_nms_topk[1], logits.numel()))
            anchors = getattr(self, f"anchors_{level}")
            boxes.append(rpn.box_coder.decode(deltas[idxs], anchors[idxs]))
            scores.append(top)
            levels.append(torch.full_like(idxs, level))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        keep = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes = _clip(boxes, image_size)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep &= (widths >= rpn.min_box_size) & (heights >= rpn.min_box_size)
        keep &= (widths > 0) & (heights > 0)
        if rpn.score_thresh > 0:
            keep &= torch.sigmoid(scores) >= rpn.score_thresh
        keep = torch.nonzero(keep).squeeze(1)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = _nms_by_class(boxes, scores, levels, rpn.nms_thresh,
                             self.nms_offset)[:rpn.post_nms_topk[1]]
        return boxes[keep]

    def forward(self, images: torch.Tensor, image_size: torch.Tensor):
        features = self.model.neck(self.model.backbone(images))
        proposals = self.proposals(features, image_size)
        heads = self.model.roi_heads
        feature_list = [features[f] for f in heads.in_features]
        predictor = heads.box_predictor
        class_logits, proposal_deltas = predictor(
            heads.box_head(_pool(heads.box_pooler, feature_list, proposals)))
        num_classes = class_logits.shape[1] - 1
        scores = torch.softmax(class_logits, dim=-1)[:, :num_classes]
        deltas = proposal_deltas.view(proposals.shape[0], -1, 4)
        boxes = predictor.box_coder.decode(
            deltas.reshape(-1, 4), proposals[:, None, :].expand(-1, deltas.shape[1], -1)
            .reshape(-1, 4))
        boxes = _clip(boxes, image_size).view(proposals.shape[0], -1, 4)
        boxes = boxes.expand(-1, num_classes, -1)
        finite = torch.isfinite(boxes).all(dim=2).all(dim=1) & torch.isfinite(scores).all(dim=1)
        candidates = (scores > predictor.score_thresh) & finite[:, None]
        proposal_idxs, classes = candidates.nonzero(as_tuple=True)
        boxes, scores = boxes[proposal_idxs, classes], scores[proposal_idxs, classes]
        if predictor.min_box_size > 0:
            large = torch.nonzero(
                ((boxes[:, 2] - boxes[:, 0]) >= predictor.min_box_size)
                & ((boxes[:, 3] - boxes[:, 1]) >= predictor.min_box_size)).squeeze(1)
            boxes, scores, classes = boxes[large], scores[large], classes[large]
        keep = _nms_per_class(boxes, scores, classes, predictor.nms_thresh,
                              num_classes)[:predictor.max_detections]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if not heads.mask_on:
            return boxes, scores, classes
        mask_logits = heads.mask_head(_pool(heads.mask_pooler, feature_list, boxes))
        if mask_logits.shape[1] > 1:
            rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
            mask_logits = mask_logits[rows, classes][:, None]
        return boxes, scores, classes, mask_logits.sigmoid()


def export_wrapper(model: nn.Module, mode: str, padded_size: Tuple[int, int]) -> nn.Module:
    if isinstance(model, (RetinaNet, EfficientDet)):
        wrapper = DenseNetwork(model) if mode == "network" else DenseFull(model, padded_size)
    elif isinstance(model, GeneralizedRCNN):
        wrapper = RCNNNetwork(model) if mode == "network" else RCNNFull(model, padded_size)
    else:
        raise ValueError(f"MODEL.META_ARCHITECTURE {type(model).__name__} cannot be exported "
                          "(RetinaNet, EfficientDet, GeneralizedRCNN)")
    return wrapper.eval()


def output_names(wrapper: nn.Module, example: Sequence[torch.Tensor]) -> List[str]:
    """Readable names of the flat outputs, e.g. ``logits_p3``, ``rpn_deltas_p6``, ``boxes``."""
    if isinstance(wrapper, (DenseFull, RCNNFull)):
        return ["boxes", "scores", "classes", "mask_probs"][:len(example)]
    if isinstance(wrapper, DenseNetwork):
        levels = wrapper.model.in_features
        return [f"logits_{f}" for f in levels] + [f"deltas_{f}" for f in levels]
    levels = wrapper.model.proposal_generator.in_features
    return (list(wrapper.feature_names) + [f"rpn_logits_{f}" for f in levels]
            + [f"rpn_deltas_{f}" for f in levels])
