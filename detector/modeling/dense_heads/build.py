"""Dense-head registry: the per-location heads of one-stage detectors and of the RPN.

DENSE_HEAD_REGISTRY maps a head name (``MODEL.RETINANET.HEAD_NAME``,
``MODEL.EFFICIENTDET.HEAD_NAME``) to an ``nn.Module`` class with a classmethod
``from_config(cls, cfg, input_shapes: list[ShapeSpec], num_anchors: int) -> dict`` of constructor
keyword arguments, reading only the head's own config keys. ``input_shapes`` describes the
pyramid levels the head sees, in increasing level order; ``num_anchors`` is the anchors per
location A. The module's ``forward(features: list[Tensor])`` returns raw per-level lists
``pred_logits`` (N, A*K, H, W) and ``pred_anchor_deltas`` (N, A*4, H, W), and it has the
attributes ``num_classes`` and ``num_anchors``.
"""
from typing import List

from fvcore.common.registry import Registry
from torch import nn

from detector.layers import ShapeSpec

__all__ = ["DENSE_HEAD_REGISTRY", "build_dense_head", "permute_to_N_HWA_K"]

DENSE_HEAD_REGISTRY = Registry("DENSE_HEAD")


def build_dense_head(cfg, name: str, input_shapes: List[ShapeSpec], num_anchors: int, *,
                     key: str) -> nn.Module:
    """The head registered as ``name`` (the value of config key ``key``)."""
    if name not in DENSE_HEAD_REGISTRY:
        valid = sorted(k for k, _ in DENSE_HEAD_REGISTRY)
        raise KeyError(f"{key}='{name}' is not registered; valid names: {valid}")
    head_cls = DENSE_HEAD_REGISTRY.get(name)
    return head_cls(**head_cls.from_config(cfg, input_shapes, num_anchors))


def permute_to_N_HWA_K(tensor, num_values: int):
    """(N, A*K, H, W) head output -> (N, H*W*A, K), the order anchors are generated in."""
    n, _, h, w = tensor.shape
    tensor = tensor.reshape(n, -1, num_values, h, w).permute(0, 3, 4, 1, 2)
    return tensor.reshape(n, -1, num_values)
