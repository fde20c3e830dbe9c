"""Convert torchvision's ``retinanet_resnet50_fpn`` (v1) weights to this project's parameter names.

Mapping (torchvision -> ours); both torchvision's current layout and the legacy one of the released
COCO checkpoint (``fpn.inner_blocks.0.weight``, ``head.*.conv.2k.weight``) are accepted:

- ``backbone.body.<conv1|bn1|layerN...>``     -> ``backbone.<same>``
  (``num_batches_tracked`` dropped: FrozenBN has no step counter)
- ``backbone.fpn.inner_blocks.i[.0]``         -> ``neck.lateral_convs.p{3+i}.0``
- ``backbone.fpn.layer_blocks.i[.0]``         -> ``neck.output_convs.p{3+i}.0``
- ``backbone.fpn.extra_blocks.p6|p7``         -> ``neck.top_block.p6|p7``
- ``head.classification_head.conv.i.0``       -> ``head.cls_subnet.i.0`` (legacy ``conv.{2i}``)
- ``head.classification_head.cls_logits``     -> ``head.cls_score``
- ``head.regression_head.conv.i.0``           -> ``head.bbox_subnet.i.0`` (legacy ``conv.{2i}``)
- ``head.regression_head.bbox_reg``           -> ``head.bbox_pred``

The model to load into is built from configs/retinanet/retinanet_R_50_FPN_torchvision.yaml.
torchvision's COCO head has 91 outputs indexed by COCO category id (unused ids included);
:func:`select_classes` keeps the outputs its caller lists, e.g. the 80 real categories in id order
(``detector.data.datasets.TORCHVISION_COCO80_INDICES``, the contiguous ids of this project's COCO
datasets; then set MODEL.RETINANET.NUM_CLASSES 80).
"""
import re
from typing import Dict, Mapping, Optional

import torch

from .checkpointer import CheckpointError, atomic_torch_save, load_checkpoint_file
from .conversion import ConversionError, select_classifier_outputs, short_list, state_dict_problems

__all__ = ["convert_torchvision_retinanet_state_dict", "select_classes", "check_against",
           "TorchvisionConversionError", "map_backbone_and_fpn_key", "rename_state_dict",
           "load_torchvision_state_dict", "torchvision_converter_parser",
           "run_torchvision_converter"]


class TorchvisionConversionError(ConversionError):
    """A torchvision state dict that does not map one-to-one onto our RetinaNet."""


_PARAM = r"(weight|bias|running_mean|running_var)"
_BACKBONE_MODULE = r"(conv1|bn1|layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01]))"


def map_backbone_and_fpn_key(key: str, first_level: int) -> Optional[str]:
    """Our name for a key of torchvision's ``resnet_fpn_backbone`` (``backbone.body.*``,
    ``backbone.fpn.inner_blocks|layer_blocks.*``) whose first FPN level is ``p<first_level>``;
    "" for BatchNorm step counters (our FrozenBN has none); None for any other key."""
    m = re.fullmatch(r"backbone\.body\." + _BACKBONE_MODULE + r"\.num_batches_tracked", key)
    if m:
        return ""
    m = re.fullmatch(r"backbone\.body\." + _BACKBONE_MODULE + r"\." + _PARAM, key)
    if m:
        return f"backbone.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)(?:\.0)?\.(weight|bias)",
                     key)
    if m:
        block = "lateral_convs" if m.group(1) == "inner_blocks" else "output_convs"
        return f"neck.{block}.p{first_level + int(m.group(2))}.0.{m.group(3)}"
    return None


def _map_key(key: str) -> Optional[str]:
    """Our name for a torchvision key; "" for keys without counterpart by design; None if
    unknown."""
    mapped = map_backbone_and_fpn_key(key, first_level=3)
    if mapped is not None:
        return mapped
    m = re.fullmatch(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)", key)
    if m:
        return f"neck.top_block.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"head\.(classification|regression)_head\.conv\.(\d+)(\.0)?\.(weight|bias)",
                     key)
    if m:
        subnet = "cls_subnet" if m.group(1) == "classification" else "bbox_subnet"
        index = int(m.group(2))
        if m.group(3) is None:  # legacy Sequential(conv, relu, conv, relu, ...)
            if index % 2:
                return None
            index //= 2
        return f"head.{subnet}.{index}.0.{m.group(4)}"
    m = re.fullmatch(
        r"head\.(classification_head\.cls_logits|regression_head\.bbox_reg)\.(weight|bias)", key)
    if m:
        name = "cls_score" if m.group(1).startswith("classification") else "bbox_pred"
        return f"head.{name}.{m.group(2)}"
    return None


def convert_torchvision_retinanet_state_dict(
    tv_state_dict: Mapping[str, torch.Tensor],
    expected_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ``retinanet_resnet50_fpn`` state dict to our model's keys.

    Args:
        tv_state_dict: torchvision's ``model.state_dict()`` (a ``module.`` prefix from
            DataParallel/DDP is stripped).
        expected_state_dict: optionally our model's ``state_dict()``; then every key must be
            present with the same shape (keys absent from torchvision by design are listed).
    Raises:
        TorchvisionConversionError: one line listing unmapped, duplicate, missing or mismatched
            keys.
    """
    converted = rename_state_dict(tv_state_dict, _map_key, "retinanet_resnet50_fpn v1")
    if expected_state_dict is not None:
        check_against(converted, expected_state_dict)
    return converted


def load_torchvision_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A plain state dict, or the "model" entry of a torchvision reference training checkpoint,
    read with ``weights_only`` (one-line CheckpointError for anything else)."""
    obj = load_checkpoint_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TorchvisionConversionError(f"{path}: expected a state dict of tensors")
    return obj


def torchvision_converter_parser(description: str, default_config: str):
    """The command line of the torchvision converter tools: --input, --output, --config-file,
    --coco-contiguous."""
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="torchvision state dict (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--config-file", default=default_config,
                        help="config whose model the weights must fit (default: %(default)s)")
    parser.add_argument("--coco-contiguous", action="store_true",
                        help="keep the 80 COCO categories in contiguous order (NUM_CLASSES 80)")
    return parser


def run_torchvision_converter(convert, args, logger) -> int:
    """A converter tool's main: ``convert(args)`` -> state dict, written atomically to
    ``args.output`` as ``{"model": ...}``; 0, or 1 after a one-line error on stderr."""
    import sys

    try:
        converted = convert(args)
    except (TorchvisionConversionError, CheckpointError, OSError) as e:
        message = str(e) if isinstance(e, CheckpointError) else f"{args.input}: {e}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    atomic_torch_save({"model": converted}, args.output)
    logger.info("Wrote %d tensors to %s", len(converted), args.output)
    return 0


def rename_state_dict(tv_state_dict: Mapping[str, torch.Tensor], map_key, model_name: str
                      ) -> Dict[str, torch.Tensor]:
    """``tv_state_dict`` renamed by ``map_key`` (our key, "" to drop, None if unknown); a
    ``module.`` prefix from DataParallel/DDP is stripped. One-line error for unknown keys or two
    keys mapping to one."""
    if tv_state_dict and all(k.startswith("module.") for k in tv_state_dict):
        tv_state_dict = {k[len("module."):]: v for k, v in tv_state_dict.items()}
    converted: Dict[str, torch.Tensor] = {}
    unmapped, duplicates = [], []
    for key, value in tv_state_dict.items():
        new_key = map_key(key)
        if new_key is None:
            unmapped.append(key)
        elif new_key == "":
            continue
        elif new_key in converted:
            duplicates.append(key)
        else:
            converted[new_key] = value
    if unmapped:
        raise TorchvisionConversionError(
            f"{len(unmapped)} torchvision keys have no counterpart (expected a {model_name} "
            f"state dict): {short_list(unmapped, 12)}")
    if duplicates:
        raise TorchvisionConversionError(
            f"torchvision keys map to an already converted key (legacy and new layout mixed?): "
            f"{short_list(duplicates, 12)}")
    return converted


def check_against(converted: Mapping[str, torch.Tensor],
                  expected_state_dict: Mapping[str, torch.Tensor]) -> None:
    """One-line error unless ``converted`` has exactly the keys and shapes of
    ``expected_state_dict``."""
    problems = state_dict_problems(converted, expected_state_dict, source="torchvision", limit=6)
    if problems:
        raise TorchvisionConversionError("converted torchvision weights do not fit the model; "
                                         + "; ".join(problems))


def select_classes(state_dict: Mapping[str, torch.Tensor],
                   class_indices) -> Dict[str, torch.Tensor]:
    """Keep only the classifier outputs of ``class_indices`` (in that order) in a converted state
    dict; the caller owns the class layout (COCO's: ``detector.data.datasets``)."""
    return select_classifier_outputs(state_dict, class_indices, cls_prefix="head.cls_score",
                                     box_bias_key="head.bbox_pred.bias",
                                     error=TorchvisionConversionError)
