"""Registries of the second stage of two-stage detectors.

ROI_HEADS_REGISTRY maps ``MODEL.ROI_HEADS.NAME`` to an ``nn.Module`` class with a classmethod
``from_config(cls, cfg, input_shapes: dict[str, ShapeSpec]) -> dict`` of constructor keyword
arguments (``input_shapes``: the pyramid levels by name, e.g. "p2".."p6"). Its
``forward(image_sizes, features, proposals, gt_instances=None, *, generator=None)`` takes the
(h, w) of each unpadded network input, the feature dict, per-image proposal ``Instances``
(``proposal_boxes``) and, in training, the ground-truth ``Instances``; it returns
``(results, losses)``: in training ``([], {"loss_cls", "loss_box_reg"[, "loss_mask"]})``, in
eval one ``Instances`` per image (``pred_boxes``, ``scores``, ``pred_classes``[,
``pred_masks``]) and ``{}``.

ROI_BOX_HEAD_REGISTRY maps ``MODEL.ROI_BOX_HEAD.NAME`` to an ``nn.Module`` class with
``from_config(cls, cfg, in_channels: int, pooler_resolution: int) -> dict``; its forward maps
pooled (R, C, S, S) features to (R, D) box features and it has the attribute
``output_size`` = D.

ROI_MASK_HEAD_REGISTRY maps ``MODEL.ROI_MASK_HEAD.NAME`` to an ``nn.Module`` class with
``from_config(cls, cfg, in_channels: int, num_classes: int) -> dict``; its forward maps pooled
(R, C, S, S) features to (R, K, 2S, 2S) per-class mask logits ((R, 1, 2S, 2S) when
class-agnostic).
"""
from typing import Dict

from fvcore.common.registry import Registry
from torch import nn

from detector.layers import ShapeSpec

__all__ = ["ROI_HEADS_REGISTRY", "ROI_BOX_HEAD_REGISTRY", "ROI_MASK_HEAD_REGISTRY",
           "build_roi_heads", "build_box_head", "build_mask_head"]

ROI_HEADS_REGISTRY = Registry("ROI_HEADS")
ROI_BOX_HEAD_REGISTRY = Registry("ROI_BOX_HEAD")
ROI_MASK_HEAD_REGISTRY = Registry("ROI_MASK_HEAD")


def _get(registry: Registry, name: str, key: str):
    if name not in registry:
        raise KeyError(f"{key}='{name}' is not registered; valid names: "
                       f"{sorted(k for k, _ in registry)}")
    return registry.get(name)


def build_roi_heads(cfg, input_shapes: Dict[str, ShapeSpec]) -> nn.Module:
    """The RoI heads named by ``MODEL.ROI_HEADS.NAME`` for the given pyramid levels."""
    heads_cls = _get(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, "MODEL.ROI_HEADS.NAME")
    return heads_cls(**heads_cls.from_config(cfg, input_shapes))


def build_box_head(cfg, in_channels: int, pooler_resolution: int) -> nn.Module:
    """The box head named by ``MODEL.ROI_BOX_HEAD.NAME``."""
    head_cls = _get(ROI_BOX_HEAD_REGISTRY, cfg.MODEL.ROI_BOX_HEAD.NAME, "MODEL.ROI_BOX_HEAD.NAME")
    return head_cls(**head_cls.from_config(cfg, in_channels, pooler_resolution))


def build_mask_head(cfg, in_channels: int, num_classes: int) -> nn.Module:
    """The mask head named by ``MODEL.ROI_MASK_HEAD.NAME``."""
    head_cls = _get(ROI_MASK_HEAD_REGISTRY, cfg.MODEL.ROI_MASK_HEAD.NAME,
                    "MODEL.ROI_MASK_HEAD.NAME")
    return head_cls(**head_cls.from_config(cfg, in_channels, num_classes))
