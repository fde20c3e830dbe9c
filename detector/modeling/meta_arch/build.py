"""Meta-architecture registry.

META_ARCH_REGISTRY maps ``MODEL.META_ARCHITECTURE`` to an ``nn.Module`` class with a classmethod
``from_config(cls, cfg) -> dict`` of constructor keyword arguments. The model takes a list of
per-image dicts and returns a loss dict in training mode or a list of ``{"instances": Instances}``
in eval mode (docs/architecture.md).
"""
import logging

import torch
from fvcore.common.registry import Registry
from torch import nn

__all__ = ["META_ARCH_REGISTRY", "build_model"]

META_ARCH_REGISTRY = Registry("META_ARCH")


def build_model(cfg) -> nn.Module:
    """The model named by ``cfg.MODEL.META_ARCHITECTURE`` on ``cfg.MODEL.DEVICE``, randomly
    initialised (load weights with the checkpointer)."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        valid = sorted(k for k, _ in META_ARCH_REGISTRY)
        raise KeyError(f"MODEL.META_ARCHITECTURE='{name}' is not registered; valid names: {valid}")
    meta_arch = META_ARCH_REGISTRY.get(name)
    model = meta_arch(**meta_arch.from_config(cfg))
    model.to(torch.device(cfg.MODEL.DEVICE))
    logging.getLogger(__name__).debug("Model:\n%s", model)
    return model
