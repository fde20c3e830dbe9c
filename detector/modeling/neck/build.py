"""Neck registry.

NECK_REGISTRY maps ``MODEL.NECK.NAME`` to a callable
``(cfg, input_shape: dict[str, ShapeSpec]) -> nn.Module`` where ``input_shape`` is the backbone's
``output_shape()``. The returned module maps the backbone's feature dict to ``{"p<k>": Tensor}`` and
has an ``output_shape() -> dict[str, ShapeSpec]`` describing those levels.
"""
from typing import Dict

from fvcore.common.registry import Registry
from torch import nn

from detector.layers import NormSpec, ShapeSpec

__all__ = ["NECK_REGISTRY", "build_neck", "neck_options"]

NECK_REGISTRY = Registry("NECK")


def build_neck(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The neck named by ``cfg.MODEL.NECK.NAME`` on top of features described by ``input_shape``."""
    name = cfg.MODEL.NECK.NAME
    if name not in NECK_REGISTRY:
        valid = sorted(k for k, _ in NECK_REGISTRY)
        raise KeyError(f"MODEL.NECK.NAME='{name}' is not registered; valid names: {valid}")
    return NECK_REGISTRY.get(name)(cfg, input_shape)


def neck_options(cfg) -> dict:
    """The constructor arguments every pyramid neck reads from ``MODEL.NECK``: ``out_channels``,
    ``min_level``, ``max_level`` and ``norm`` (a NormSpec)."""
    return {
        "out_channels": cfg.MODEL.NECK.OUT_CHANNELS,
        "min_level": cfg.MODEL.NECK.MIN_LEVEL,
        "max_level": cfg.MODEL.NECK.MAX_LEVEL,
        "norm": NormSpec.from_config(cfg, cfg.MODEL.NECK.NORM, key="MODEL.NECK.NORM"),
    }
