"""Convert torchvision's ``maskrcnn_resnet50_fpn`` (v1) weights to this project's parameter names.

Mapping (torchvision -> ours); torchvision's current layout and the legacy one of the released COCO
checkpoint (``fpn.inner_blocks.0.weight``, ``rpn.head.conv.weight``, ``mask_head.mask_fcn1``) are
both accepted:

- ``backbone.body.*``, ``backbone.fpn.*``       -> ``backbone.*``, ``neck.*`` (FPN from ``p2``)
- ``rpn.head.conv[.0.0]``                        -> ``proposal_generator.head.convs.0``
- ``rpn.head.cls_logits`` / ``bbox_pred``        -> ``proposal_generator.head.objectness_logits`` /
  ``anchor_deltas``
- ``roi_heads.box_head.fc6`` / ``fc7``           -> ``roi_heads.box_head.fc1`` / ``fc2``
- ``roi_heads.box_predictor.*``                  -> ``roi_heads.box_predictor.*`` (rows moved)
- ``roi_heads.mask_head.i.0`` (``mask_fcn{i+1}``) -> ``roi_heads.mask_head.mask_fcn{i+1}.0``
- ``roi_heads.mask_predictor.conv5_mask``        -> ``roi_heads.mask_head.deconv``
- ``roi_heads.mask_predictor.mask_fcn_logits``   -> ``roi_heads.mask_head.predictor`` (rows moved)

Classes: torchvision's softmax has the background at index 0 and its COCO head 91 entries indexed by
COCO category id; ours has the K foreground classes first and the background last (detectron2's
layout), no background box regression and no background mask. So ``cls_score`` rows become
[1..90, 0], and the first 4 ``bbox_pred`` rows and the first mask channel are dropped: the model
has 90 classes, ours ``c`` = torchvision's ``c + 1``. :func:`select_classes` then keeps the classes
its caller lists (e.g. the 80 real COCO categories, ``detector.data.datasets.TORCHVISION_COCO80_INDICES``
minus 1) for MODEL.ROI_HEADS.NUM_CLASSES 80.
"""
import re
from typing import Dict, Mapping, Optional, Sequence

import torch

from .torchvision_retinanet import (
    TorchvisionConversionError,
    check_against,
    map_backbone_and_fpn_key,
    rename_state_dict,
)

__all__ = ["convert_torchvision_maskrcnn_state_dict", "select_classes"]

_BOX_PREDICTOR = "roi_heads.box_predictor"
_MASK_PREDICTOR = "roi_heads.mask_head.predictor"


def _map_key(key: str) -> Optional[str]:
    mapped = map_backbone_and_fpn_key(key, first_level=2)
    if mapped is not None:
        return mapped
    m = re.fullmatch(r"rpn\.head\.conv(?:\.0\.0)?\.(weight|bias)", key)
    if m:
        return f"proposal_generator.head.convs.0.{m.group(1)}"
    m = re.fullmatch(r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", key)
    if m:
        name = "objectness_logits" if m.group(1) == "cls_logits" else "anchor_deltas"
        return f"proposal_generator.head.{name}.{m.group(2)}"
    m = re.fullmatch(r"roi_heads\.box_head\.fc(6|7)\.(weight|bias)", key)
    if m:
        return f"roi_heads.box_head.fc{int(m.group(1)) - 5}.{m.group(2)}"
    m = re.fullmatch(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"roi_heads\.mask_head\.(?:(\d+)\.0|mask_fcn(\d+))\.(weight|bias)", key)
    if m:
        index = int(m.group(1)) + 1 if m.group(1) is not None else int(m.group(2))
        return f"roi_heads.mask_head.mask_fcn{index}.0.{m.group(3)}"
    m = re.fullmatch(r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)",
                     key)
    if m:
        name = "deconv" if m.group(1) == "conv5_mask" else "predictor"
        return f"roi_heads.mask_head.{name}.{m.group(2)}"
    return None


def _background_last(state_dict: Dict[str, torch.Tensor]) -> None:
    """torchvision's class layout (background 0) to ours (background last, no background box
    regression or mask), in place."""
    for suffix in ("weight", "bias"):
        cls = state_dict[f"{_BOX_PREDICTOR}.cls_score.{suffix}"]
        state_dict[f"{_BOX_PREDICTOR}.cls_score.{suffix}"] = torch.cat([cls[1:], cls[:1]])
        state_dict[f"{_BOX_PREDICTOR}.bbox_pred.{suffix}"] = \
            state_dict[f"{_BOX_PREDICTOR}.bbox_pred.{suffix}"][4:]
        key = f"{_MASK_PREDICTOR}.{suffix}"
        if key in state_dict:
            state_dict[key] = state_dict[key][1:]


def convert_torchvision_maskrcnn_state_dict(
    tv_state_dict: Mapping[str, torch.Tensor],
    expected_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Rename torchvision's ``maskrcnn_resnet50_fpn`` (or ``fasterrcnn_resnet50_fpn``) state dict
    to our GeneralizedRCNN's keys and class layout (module docstring).

    Args:
        tv_state_dict: torchvision's ``model.state_dict()``.
        expected_state_dict: optionally our model's ``state_dict()``; then every key must be
            present with the same shape.
    Raises:
        TorchvisionConversionError: one line listing unmapped, missing or mismatched keys.
    """
    converted = rename_state_dict(tv_state_dict, _map_key, "maskrcnn_resnet50_fpn v1")
    _background_last(converted)
    if expected_state_dict is not None:
        check_against(converted, expected_state_dict)
    return converted


def select_classes(state_dict: Mapping[str, torch.Tensor],
                   class_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Keep the classes ``class_indices`` (ours, 0-based, in that order) of a converted state
    dict; the background row of ``cls_score`` stays last."""
    state_dict = dict(state_dict)
    num_classes = state_dict[f"{_BOX_PREDICTOR}.cls_score.bias"].numel() - 1
    idx = torch.as_tensor(list(class_indices), dtype=torch.int64)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= num_classes:
        raise TorchvisionConversionError(
            f"class indices must lie in [0, {num_classes}) for a head with {num_classes} classes")
    rows = torch.cat([idx, torch.tensor([num_classes])])
    box_rows = (idx[:, None] * 4 + torch.arange(4)).reshape(-1)
    for suffix in ("weight", "bias"):
        state_dict[f"{_BOX_PREDICTOR}.cls_score.{suffix}"] = \
            state_dict[f"{_BOX_PREDICTOR}.cls_score.{suffix}"][rows].clone()
        state_dict[f"{_BOX_PREDICTOR}.bbox_pred.{suffix}"] = \
            state_dict[f"{_BOX_PREDICTOR}.bbox_pred.{suffix}"][box_rows].clone()
        key = f"{_MASK_PREDICTOR}.{suffix}"
        if key in state_dict:
            state_dict[key] = state_dict[key][idx].clone()
    return state_dict
