"""Proposal-generator registry.

PROPOSAL_GENERATOR_REGISTRY maps ``MODEL.PROPOSAL_GENERATOR.NAME`` to an ``nn.Module`` class with a
classmethod ``from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict`` of constructor
keyword arguments, where ``input_shape`` is the neck's ``output_shape()``. The module is called as
``proposals, losses = module(image_sizes, features, gt_instances=None, *, padded_size=None,
generator=None)``:

- ``image_sizes``: (h, w) of each unpadded network input; ``features``: ``{"p<k>": (N, C, H, W)}``;
  ``gt_instances``: per image ``Instances`` with ``gt_boxes`` (training only);
  ``padded_size``: (H, W) of the padded batch; ``generator``: the ``torch.Generator`` of the
  training-time sampling (None: torch's global one).
- ``proposals``: per image ``Instances(image_size, proposal_boxes=Boxes,
  objectness_logits=Tensor)``, sorted by decreasing objectness, without gradient.
- ``losses``: ``{"loss_rpn_cls", "loss_rpn_loc"}`` in training, ``{}`` in eval.
"""
from typing import Dict

from fvcore.common.registry import Registry
from torch import nn

from detector.layers import ShapeSpec

__all__ = ["PROPOSAL_GENERATOR_REGISTRY", "build_proposal_generator"]

PROPOSAL_GENERATOR_REGISTRY = Registry("PROPOSAL_GENERATOR")


def build_proposal_generator(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The proposal generator named by ``cfg.MODEL.PROPOSAL_GENERATOR.NAME`` over the pyramid
    levels described by ``input_shape``."""
    name = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    if name not in PROPOSAL_GENERATOR_REGISTRY:
        valid = sorted(k for k, _ in PROPOSAL_GENERATOR_REGISTRY)
        raise KeyError(f"MODEL.PROPOSAL_GENERATOR.NAME='{name}' is not registered; valid names: "
                       f"{valid}")
    generator_cls = PROPOSAL_GENERATOR_REGISTRY.get(name)
    return generator_cls(**generator_cls.from_config(cfg, input_shape))
