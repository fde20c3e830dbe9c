"""Backbone registry.

BACKBONE_REGISTRY maps ``MODEL.BACKBONE.NAME`` to a callable ``(cfg) -> Backbone`` that returns a
:class:`detector.modeling.backbone.Backbone` (feature maps ``c<k>`` with stride ``2**k`` and an
``output_shape()`` describing them).
"""
from fvcore.common.registry import Registry

from .base import Backbone

__all__ = ["BACKBONE_REGISTRY", "build_backbone"]

BACKBONE_REGISTRY = Registry("BACKBONE")


def build_backbone(cfg) -> Backbone:
    """The backbone named by ``cfg.MODEL.BACKBONE.NAME``."""
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONE_REGISTRY:
        valid = sorted(k for k, _ in BACKBONE_REGISTRY)
        raise KeyError(f"MODEL.BACKBONE.NAME='{name}' is not registered; valid names: {valid}")
    backbone = BACKBONE_REGISTRY.get(name)(cfg)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"MODEL.BACKBONE.NAME='{name}' returned {type(backbone).__name__}, "
                        "expected a detector.modeling.backbone.Backbone")
    return backbone
